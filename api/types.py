"""What the hosted-API client takes and gives: one image's request, its result, progress events.

`ApiImageRequest` is one image to ask the service for: only the fields its public documentation
names (https://imageapi.org: `prompt`, `model`, `width`, `height`, `num_inference_steps`) go into
the JSON body, plus the undocumented `seed` when the user opts in. Its `label` says, in messages
only, which image it is (a prompts-file line and output file, "image 3" of a batch). A finished image
is a generation.FinishedImage; `ApiEvent` is a progress report (a retry, a rate limit, a pending job, done,
failed) for a terminal or a ComfyUI node. None of these ever holds the API key or a URL.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from enum import Enum

from ..errors import InvalidInputError


class EventKind(str, Enum):
    """What an `ApiEvent` reports (its `kind`); the value is the word messages show."""

    STARTED = "started"  # the image's first call is going out
    RATE_LIMITED = "rate limited"  # the service asked to slow down (429): waiting before asking again
    RETRYING = "retrying"  # a failed call is sent again after a wait
    WAITING = "waiting"  # the service answered with a job that is not done yet: polling it
    DONE = "done"  # the image arrived
    FAILED = "failed"  # the image will not arrive (its error says why)

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class ApiImageRequest:
    """One image to ask the service for. Only documented fields are sent unless told otherwise.

    Two requests are equal when they ask for the same image: `label` is for messages only.
    """

    prompt: str
    width: int
    height: int
    num_inference_steps: int
    seed: int | None = None
    model: str = "flux-schnell"
    label: str = field(default="", compare=False)
    index_in_batch: int = 0  # the image's place in its batch: part of its identity (idempotency key)

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise InvalidInputError("prompt must be a non-empty string.")
        for name in ("width", "height", "num_inference_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidInputError(f"{name} must be a positive whole number; got {value!r}.")
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0
        ):
            raise InvalidInputError(f"seed must be None or a whole number >= 0; got {self.seed!r}.")
        if not isinstance(self.model, str) or not self.model:
            raise InvalidInputError(f"model must be a non-empty string; got {self.model!r}.")
        if (
            isinstance(self.index_in_batch, bool)
            or not isinstance(self.index_in_batch, int)
            or self.index_in_batch < 0
        ):
            raise InvalidInputError(
                f"index_in_batch must be a whole number >= 0; got {self.index_in_batch!r}."
            )
        if not isinstance(self.label, str):
            raise InvalidInputError(f"label must be a string; got {self.label!r}.")

    def to_body(self, send_seed: bool) -> dict:
        """The JSON body: documented fields, plus the undocumented `seed` only when opted in."""
        body = {
            "prompt": self.prompt,
            "model": self.model,
            "width": self.width,
            "height": self.height,
            "num_inference_steps": self.num_inference_steps,
        }
        if send_seed and self.seed is not None:
            body["seed"] = self.seed
        return body

    def idempotency_key(self, base_url: str, send_seed: bool) -> str:
        """The `Idempotency-Key` every POST for this image carries (see `idempotency_key`)."""
        return idempotency_key(base_url, self, send_seed)

    def name(self, index: int) -> str:
        """What messages call this image: its label, else its place in the batch."""
        return self.label or f"image {index + 1}"


IDEMPOTENCY_HEADER = "Idempotency-Key"


def idempotency_key(base_url: str, request: ApiImageRequest, send_seed: bool) -> str:
    """A hex SHA-256 of the image's identity: the base URL, the model, the prompt after trimming,
    width, height, steps, the seed only when it is sent, and the image's index in its batch. Every
    retry and every re-run of one image gives the same key; two different images never share one.
    The service does not document the header; one that ignores it loses nothing. Drafts record it."""
    identity = {
        "base_url": base_url.rstrip("/"),
        "model": request.model,
        "prompt": request.prompt.strip(),
        "width": request.width,
        "height": request.height,
        "steps": request.num_inference_steps,
        "seed": request.seed if send_seed else None,
        "index_in_batch": request.index_in_batch,
    }
    text = json.dumps(identity, sort_keys=True, ensure_ascii=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class ApiEvent:
    """Progress of one image, for a terminal line or a ComfyUI node's status text.

    `index` is the image's place in the run's input (from 0), `label` what messages call it,
    `kind` an `EventKind`, `attempt` the generate calls made so far, `retry_in_s` the wait
    before the next call (rate limited, retrying, waiting), `message` a short reason (an HTTP
    status, "connection dropped mid-answer"). Never holds the API key or a URL.
    """

    index: int
    label: str
    kind: EventKind
    attempt: int = 0
    retry_in_s: float | None = None
    message: str = ""

    def node_status(self) -> str:
        """What a node waiting on the batch shows: "rate limited, retrying in 3 s", "HTTP 503,
        retrying in 2 s", "the service is still working on it", else "waiting for the service"."""
        wait = f" in {self.retry_in_s:.0f} s" if self.retry_in_s is not None else ""
        if self.kind == EventKind.RATE_LIMITED:
            return f"rate limited, retrying{wait}"
        if self.kind == EventKind.RETRYING:
            return f"{self.message or 'a call failed'}, retrying{wait}"
        if self.kind == EventKind.WAITING:
            return "the service is still working on it"
        return "waiting for the service"

    def __str__(self) -> str:
        text = f"{self.label}: {self.kind}"
        if self.message:
            text += f" ({self.message})"
        if self.retry_in_s is not None:
            text += f", next try in {self.retry_in_s:.1f} s"
        return text
