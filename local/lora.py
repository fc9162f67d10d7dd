"""Which LoRAs the local backend applies, and putting them on the loaded models.

A `LoraChoice` is one LoRA file and its strength, as the "FLUX Schnell LoRA" node (a file of
ComfyUI's `models/loras` folder) or the command line (`--lora FILE[:STRENGTH]`) chose it; a
`LocalModelSpec` carries them in order, and several stack. `use_loras` puts them on the cached models
(`flux.lora`): the base weights stay loaded and are never read again, only the LoRA files are read,
and only when the choice (a file, its contents or a strength) changed since the last run.

Torch-free at import (nodes.py imports this module): `flux.lora` is imported when LoRAs are applied.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .. import comfy_bridge
from ..errors import InvalidInputError

LORA_FOLDER = "loras"  # ComfyUI's model folder of LoRAs
STRENGTH_LIMIT = 10.0  # |strength| at most this (the node's slider range)
_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")


@dataclass(frozen=True)
class LoraChoice:
    """One LoRA to apply: its file and strength (the update is strength * alpha / rank * up @ down)."""

    path: Path
    strength: float = 1.0

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))
        strength = self.strength
        number = isinstance(strength, (int, float)) and not isinstance(strength, bool)
        if not number or not math.isfinite(strength):
            raise InvalidInputError(f"LoRA strength must be a number, got {strength!r} for {self.path.name}")
        if abs(strength) > STRENGTH_LIMIT:
            raise InvalidInputError(
                f"LoRA strength must lie in [-{STRENGTH_LIMIT:g}, {STRENGTH_LIMIT:g}], got {strength:g} for "
                f"{self.path.name}"
            )
        object.__setattr__(self, "strength", float(strength))

    def describe(self) -> str:
        """`name:strength`, for info output and PNG text."""
        return f"{self.path.name}:{self.strength:g}"


def parse_lora_option(text: str) -> LoraChoice:
    """`FILE[:STRENGTH]` of the command line's --lora.

    The strength is what follows the last colon, when that is a plain number (negative allowed);
    otherwise the whole text is the file, so Windows paths (`C:\\loras\\a.safetensors`) and names
    with colons keep working. A file that exists under the whole text is always taken whole.
    """
    head, colon, tail = text.rpartition(":")
    if colon and head and _NUMBER.fullmatch(tail.strip()) and not Path(text).exists():
        return LoraChoice(Path(head), float(tail))
    if not text:
        raise InvalidInputError("--lora needs a file name: --lora FILE[:STRENGTH]")
    return LoraChoice(Path(text), 1.0)


def lora_from_comfy(name: str, strength: float) -> LoraChoice:
    """A file of ComfyUI's loras folder (the node's dropdown) to a LoraChoice with its full path."""
    full = comfy_bridge.full_model_path(LORA_FOLDER, name)
    if full is None:
        folders = ", ".join(comfy_bridge.model_folder_paths(LORA_FOLDER)) or "none known"
        raise InvalidInputError(
            f"lora_name: {name!r} is not in ComfyUI's {LORA_FOLDER} folders ({folders}); refresh the "
            "page (R) after adding files, or pick another file"
        )
    return LoraChoice(Path(full), strength)


def lora_state(choices: Sequence[LoraChoice]) -> tuple:
    """What decides the applied updates: each file (path, size, modification time) and strength."""
    state = []
    for choice in choices:
        try:
            stat = choice.path.stat()
            state.append((str(choice.path.resolve()), stat.st_size, stat.st_mtime_ns, choice.strength))
        except OSError:  # reading it will say what is wrong
            state.append((str(choice.path), None, None, choice.strength))
    return tuple(state)


def use_loras(networks: Mapping[str, object], choices: Sequence[LoraChoice], dtype) -> int:
    """Put exactly `choices` on the networks (name -> module), replacing what was there; returns how
    many layers carry an update. Reads the LoRA files, never a base weight file. Every file is
    checked before anything changes: on an error the networks keep their previous LoRAs."""
    from ..flux import apply_loras, read_lora

    loras = [(read_lora(c.path), c.strength) for c in choices]
    return apply_loras(networks, loras, dtype)
