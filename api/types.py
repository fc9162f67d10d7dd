"""What the hosted-API client takes and gives: one image's request, its result, progress events.

`ApiImageRequest` is one image to ask the service for: only the fields its public documentation
names (https://imageapi.org: `prompt`, `model`, `width`, `height`, `num_inference_steps`) go into
the JSON body, plus the undocumented `seed` when the user opts in. Its `label` says, in messages
only, which image it is (a prompts-file line and output file, "image 3" of a batch). `ApiImage` is
a finished image; `ApiEvent` is a progress report (a retry, a rate limit, a pending job, done,
failed) for a terminal or a ComfyUI node. None of these ever holds the API key or a URL.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from PIL import Image

from ..errors import InvalidInputError

# What an `ApiEvent` reports (its `kind`).
STARTED = "started"  # the image's first call is going out
RATE_LIMITED = "rate limited"  # the service asked to slow down (429): waiting before asking again
RETRYING = "retrying"  # a failed call is sent again after a wait
WAITING = "waiting"  # the service answered with a job that is not done yet: polling it
DONE = "done"
FAILED = "failed"
EVENT_KINDS = (STARTED, RATE_LIMITED, RETRYING, WAITING, DONE, FAILED)


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

    def name(self, index: int) -> str:
        """What messages call this image: its label, else its place in the batch."""
        return self.label or f"image {index + 1}"


@dataclass
class ApiImage:
    """A finished image. `data` and `format` are the file as the service sent it (`"PNG"`,
    `"JPEG"`, ...), kept only when the caller asked for them (to write it without re-encoding)."""

    image: Image.Image  # RGB, fully loaded
    request_id: str | None
    seconds: float  # wall time for this image, retries included
    attempts: int  # generate calls made (1 = no retry)
    billed_attempts: int = 0  # of those, calls sent again after one that may have been billed
    data: bytes | bytearray | None = None
    format: str | None = None
    requested_size: tuple[int, int] | None = None  # (width, height) the request asked for

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the decoded image, EXIF orientation applied."""
        return self.image.size

    @property
    def size_differs(self) -> bool:
        """Whether the service sent another size than requested (to refuse or record it)."""
        return self.requested_size is not None and self.size != self.requested_size


@dataclass(frozen=True)
class ApiEvent:
    """Progress of one image, for a terminal line or a ComfyUI node's status text.

    `index` is the image's place in the run's input (from 0), `label` what messages call it,
    `kind` one of `EVENT_KINDS`, `attempt` the generate calls made so far, `retry_in_s` the wait
    before the next call (rate limited, retrying, waiting), `message` a short reason (an HTTP
    status, "connection dropped mid-answer"). Never holds the API key or a URL.
    """

    index: int
    label: str
    kind: str
    attempt: int = 0
    retry_in_s: float | None = None
    message: str = ""

    def node_status(self) -> str:
        """What a node waiting on the batch shows: "rate limited, retrying in 3 s", "HTTP 503,
        retrying in 2 s", "the service is still working on it", else "waiting for the service"."""
        wait = f" in {self.retry_in_s:.0f} s" if self.retry_in_s is not None else ""
        if self.kind == RATE_LIMITED:
            return f"rate limited, retrying{wait}"
        if self.kind == RETRYING:
            return f"{self.message or 'a call failed'}, retrying{wait}"
        if self.kind == WAITING:
            return "the service is still working on it"
        return "waiting for the service"

    def __str__(self) -> str:
        text = f"{self.label}: {self.kind}"
        if self.message:
            text += f" ({self.message})"
        if self.retry_in_s is not None:
            text += f", next try in {self.retry_in_s:.1f} s"
        return text
