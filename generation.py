"""What one generation asks for, and the checks every backend needs before any work starts.

The node, the command line and both backends build a `GenerationRequest` and call `validate()`
first, so a request that must fail never costs a paid API call or a model load.
"""

from __future__ import annotations

import json
import unicodedata
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import InvalidInputError

BACKENDS = ("api", "local")
MODEL_NAME = "flux-schnell"
MIN_SIDE = 256
MAX_SIDE = 2048
SIDE_MULTIPLE = 16
MAX_STEPS = 8  # the service's hard cap for flux-schnell; schnell is distilled for 1-4 steps
MAX_BATCH = 16
# T5 reads the first 256 tokens of a prompt (about 1,000 characters of English) and CLIP 77: a longer
# prompt changes nothing in the image, but it would be sent, paid for and copied into every PNG.
MAX_PROMPT_CHARS = 2000
MAX_SEED = 2**64 - 1  # the seeds torch.Generator.manual_seed takes (unsigned 64-bit)


@dataclass(frozen=True)
class GenerationRequest:
    """A prompt, a size, a step count and the seeds `seed .. seed + batch_size - 1`."""

    prompt: str
    width: int = 1024
    height: int = 1024
    steps: int = 4
    seed: int = 0
    batch_size: int = 1

    @property
    def seeds(self) -> list[int]:
        """The seed of each image of the batch, in output order (wrapping past 2**64 - 1)."""
        return [(self.seed + i) % (MAX_SEED + 1) for i in range(self.batch_size)]

    def validate(self, backend: str = "api") -> GenerationRequest:
        """Raise `InvalidInputError` naming the first input that cannot be honoured."""
        if backend not in BACKENDS:
            raise InvalidInputError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}.")
        if isinstance(self.prompt, str) and _not_utf8(self.prompt):
            raise InvalidInputError(
                "prompt is not valid UTF-8 text (bytes a terminal in another encoding sent?): the "
                "service could take it and the PNG could not record it; type it again in a UTF-8 "
                "terminal or put it in a UTF-8 prompts file."
            )
        if not isinstance(self.prompt, str) or not visible_text(self.prompt):
            raise InvalidInputError(
                "prompt is empty: describe the image to generate (FLUX.1 [schnell] needs a non-empty prompt)."
            )
        if len(self.prompt) > MAX_PROMPT_CHARS:
            raise InvalidInputError(
                f"prompt is {len(self.prompt):,} characters long; at most {MAX_PROMPT_CHARS:,} are "
                "accepted (the text encoder reads about the first 1,000): shorten it."
            )
        for name, value in (("width", self.width), ("height", self.height)):
            _check_int(name, value)
            if not MIN_SIDE <= value <= MAX_SIDE:
                raise InvalidInputError(
                    f"{name} must be between {MIN_SIDE} and {MAX_SIDE} pixels; got {value}."
                )
            if value % SIDE_MULTIPLE:
                lower = value - value % SIDE_MULTIPLE
                raise InvalidInputError(
                    f"{name} must be a multiple of {SIDE_MULTIPLE}; got {value} "
                    f"(nearest allowed: {max(lower, MIN_SIDE)} or {min(lower + SIDE_MULTIPLE, MAX_SIDE)})."
                )
        _check_int("num_inference_steps", self.steps)
        if not 1 <= self.steps <= MAX_STEPS:
            raise InvalidInputError(
                f"num_inference_steps must be between 1 and {MAX_STEPS} for FLUX.1 [schnell] "
                f"(4 is the fast preset, {MAX_STEPS} the quality setting and the service's cap); "
                f"got {self.steps}."
            )
        _check_int("seed", self.seed)
        if not 0 <= self.seed <= MAX_SEED:
            raise InvalidInputError(f"seed must be between 0 and {MAX_SEED}; got {self.seed}.")
        _check_int("batch_size", self.batch_size)
        if not 1 <= self.batch_size <= MAX_BATCH:
            raise InvalidInputError(f"batch_size must be between 1 and {MAX_BATCH}; got {self.batch_size}.")
        return self


# Characters that draw nothing although Unicode files them as letters or symbols: the braille
# blank, the Hangul fillers, the Khmer inherent vowels.
_BLANK_CHARACTERS = frozenset("\u2800\u115f\u1160\u3164\uffa0\u17b4\u17b5")
# Categories that never draw a glyph: controls, format characters (U+200B, U+FEFF, ...),
# separators (spaces, line and paragraph separators), unassigned, private use.
_INVISIBLE_CATEGORIES = frozenset(("Cc", "Cf", "Cn", "Co", "Cs", "Zs", "Zl", "Zp"))


def visible_text(text: str) -> bool:
    """Whether `text` has at least one character that draws something: a prompt of only spaces,
    zero-width characters, byte-order marks or blank symbols is empty to the model and is refused
    before it is paid for."""
    return any(
        ch not in _BLANK_CHARACTERS and unicodedata.category(ch) not in _INVISIBLE_CATEGORIES for ch in text
    )


def _not_utf8(text: str) -> bool:
    """Lone surrogates: what Python makes of bytes that are not UTF-8 in argv (surrogateescape)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _check_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInputError(f"{name} must be a whole number; got {value!r}.")


@dataclass
class GenerationInfo:
    """What the node's `info` output reports (JSON). Holds nothing secret by construction."""

    backend: str
    model: str
    prompt: str
    width: int
    height: int
    steps: int
    seeds: list[int]
    seconds: float
    request_ids: list[str | None] | None = None
    seed_sent: bool | None = None
    device: str | None = None
    timings: dict[str, float] | None = None
    peak_memory_gib: float | None = None  # torch.cuda.max_memory_allocated of the run (CUDA only)
    loras: list[str] | None = None  # the LoRAs applied (local backend), "file:strength"
    notes: list[str] | None = None

    def to_json(self) -> str:
        data = {k: v for k, v in asdict(self).items() if v is not None}
        data["seconds"] = round(self.seconds, 3)
        if self.peak_memory_gib is not None:
            data["peak_memory_gib"] = round(self.peak_memory_gib, 3)
        if self.timings:
            data["timings"] = {k: round(v, 3) for k, v in self.timings.items()}
        return json.dumps(data, ensure_ascii=False)


@dataclass
class CallRecord:
    """What one image's calls to the hosted service were, for the manifest and a billing report.
    Filled by the api layer; the local backend leaves it empty. It never holds the key."""

    paid_calls: int = 0  # calls that may have been billed, the one that delivered included
    free_retries: int = 0  # calls refused before any work was done (429, connection refused, ...)
    request_ids: tuple[str, ...] = ()  # the service's ids of those calls, in order
    poll_url: str | None = None  # an async job's status URL (key-free), so a re-run collects it


@dataclass
class FinishedImage:
    """One finished image, from either backend. `data` and `format` are the file as the hosted
    service sent it (`"PNG"`, `"JPEG"`, ...), kept only when the caller asked for them (to write it
    without re-encoding); the local backend leaves them and `request_id` empty."""

    image: Any  # PIL.Image.Image, RGB, fully loaded (PIL is not imported here)
    request_id: str | None = None
    seconds: float = 0.0  # wall time for this image, retries included
    attempts: int = 1  # generate calls made (1 = no retry)
    billed_attempts: int = 0  # of those, calls sent again after one that may have been billed
    data: bytes | bytearray | None = None
    format: str | None = None
    requested_size: tuple[int, int] | None = None  # (width, height) the request asked for
    calls: CallRecord = field(default_factory=CallRecord)

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the decoded image, EXIF orientation applied."""
        return self.image.size

    @property
    def size_differs(self) -> bool:
        """Whether the image has another size than requested (to refuse or record it)."""
        return self.requested_size is not None and self.size != self.requested_size
