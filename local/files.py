"""Which files the local backend loads: the user's choice, or the usual names in the usual folders.

A `LocalModelSpec` is what the loader node (or the command line) chose; `resolve()` turns it into
six paths (four weight files, two tokenizer folders) or one error that lists everything it looked
for and where. Inside ComfyUI the folders are ComfyUI's own (`models/diffusion_models` and
`models/unet`, `models/text_encoders` and `models/clip`, `models/vae`, `models/checkpoints`) and the
tokenizers are the ones ComfyUI ships; outside it, files are named on the command line, and the
tokenizer folders may also sit beside the transformer as in the FLUX.1-schnell repository
(`tokenizer/`, `tokenizer_2/`). The spec also carries the LoRAs to apply (`local.lora.LoraChoice`);
they are not part of the loaded models' identity, so changing them reloads nothing.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, replace
from pathlib import Path

from .. import comfy_bridge
from ..errors import InvalidInputError, LocalBackendUnavailable
from ..flux import CHECKPOINT_PATTERNS, COMPONENTS, Component
from .lora import LoraChoice

WEIGHT_DTYPE_OPTIONS = ("as stored", "bf16", "fp8_e4m3fn", "fp8_e4m3fn_fast")
"""How the transformer and T5 weights are kept in memory (the loader node's and --dtype's choices)."""
MEMORY_CHOICES = ("auto", "keep on GPU", "offload to CPU", "free after run", "stream blocks")


@dataclass(frozen=True)
class ResolvedFiles:
    """Absolute paths of everything one pipeline loads (the cache key of loaded models)."""

    transformer: Path
    t5: Path
    clip: Path
    ae: Path
    t5_tokenizer: Path
    clip_tokenizer: Path


@dataclass(frozen=True)
class LocalModelSpec:
    """The local backend's files and options, as chosen by the user (None: find it)."""

    checkpoint: Path | None = None
    transformer: Path | None = None
    t5: Path | None = None
    clip: Path | None = None
    ae: Path | None = None
    t5_tokenizer: Path | None = None
    clip_tokenizer: Path | None = None
    weight_dtype: str = "as stored"
    memory: str = "auto"
    device: str | None = None
    compile: bool = False  # torch.compile each transformer block (faster after a slower first run)
    loras: tuple[LoraChoice, ...] = ()  # applied in order, stacked; not part of the loaded models

    def __post_init__(self):
        if self.weight_dtype not in WEIGHT_DTYPE_OPTIONS:
            raise InvalidInputError(
                f"weight_dtype must be one of {', '.join(WEIGHT_DTYPE_OPTIONS)}; got {self.weight_dtype!r}"
            )
        if self.memory not in MEMORY_CHOICES:
            raise InvalidInputError(f"memory must be one of {', '.join(MEMORY_CHOICES)}; got {self.memory!r}")

    @classmethod
    def from_node_inputs(cls, *, checkpoint, transformer, t5, clip, vae, weight_dtype, memory, compile=False):
        """File names from ComfyUI's dropdowns (None: find it) to full paths."""
        named = {
            "checkpoint": (checkpoint, "checkpoints"),
            "transformer": (transformer, "diffusion_models"),
            "t5": (t5, "text_encoders"),
            "clip": (clip, "text_encoders"),
            "ae": (vae, "vae"),
        }
        paths = {}
        for field_name, (filename, folder) in named.items():
            if filename is None:
                paths[field_name] = None
                continue
            full = comfy_bridge.full_model_path(folder, filename)
            if full is None:
                raise InvalidInputError(
                    f"{field_name}: {filename!r} is not in ComfyUI's {folder} folders "
                    f"({', '.join(comfy_bridge.model_folder_paths(folder)) or 'none known'}); "
                    "refresh the page (R) after adding files, or pick another file"
                )
            paths[field_name] = Path(full)
        return cls(**paths, weight_dtype=weight_dtype, memory=memory, compile=compile)

    def resolve(self) -> ResolvedFiles:
        """Every path this spec needs, checked to exist; one error listing all that is missing."""
        files: dict[str, Path | None] = {}
        looked: dict[str, str] = {}
        for component in COMPONENTS:
            given = getattr(self, component.name) or self.checkpoint
            if given is not None:
                files[component.name] = Path(given)
                continue
            files[component.name], where = _find(component, self.weight_dtype)
            if files[component.name] is None:
                looked[component.name] = f"{component.name} ({component.flag}): {where}"
        if looked:  # an all-in-one checkpoint holds every network
            checkpoint, where = _find_checkpoint()
            if checkpoint is not None:
                files.update(dict.fromkeys(looked, checkpoint))
                looked.clear()
            elif where:
                looked["checkpoint"] = where
        files.update(self._tokenizers(files.get("transformer")))
        not_there = [
            f"{name}: {path} does not exist"
            for name, path in files.items()
            if path is not None and not path.exists()
        ]
        not_there += [f"lora: {c.path} does not exist" for c in self.loras if not c.path.is_file()]
        missing = [name for name, path in files.items() if path is None]
        if missing or not_there:
            raise LocalBackendUnavailable(_missing_message(missing, list(looked.values()), not_there))
        return ResolvedFiles(**{k: v.resolve() for k, v in files.items()})

    def _tokenizers(self, transformer: Path | None) -> dict[str, Path | None]:
        if self.t5_tokenizer is not None and self.clip_tokenizer is not None:
            return {
                "t5_tokenizer": Path(self.t5_tokenizer),
                "clip_tokenizer": Path(self.clip_tokenizer),
            }
        from ..flux import find_comfyui_tokenizer_folders

        bundled = find_comfyui_tokenizer_folders()
        candidates = []
        if bundled is not None:
            candidates.append((bundled.t5, bundled.clip))
        if transformer is not None:  # the FLUX.1-schnell repository layout
            for root in (transformer.parent, transformer.parent.parent):
                candidates.append((root / "tokenizer_2", root / "tokenizer"))
        t5 = self.t5_tokenizer or next((t for t, _ in candidates if t.is_dir()), None)
        clip = self.clip_tokenizer or next((c for _, c in candidates if c.is_dir()), None)
        return {"t5_tokenizer": _path(t5), "clip_tokenizer": _path(clip)}

    def with_lora(self, choice: LoraChoice) -> LocalModelSpec:
        """This spec with one more LoRA, applied after (stacked on) the ones it has."""
        return replace(self, loras=(*self.loras, choice))


def _path(p) -> Path | None:
    return None if p is None else Path(p)


def _find(component: Component, weight_dtype: str = "as stored") -> tuple[Path | None, str]:
    """The first file of a usual name in the component's ComfyUI folders."""
    folders = [Path(p) for f in component.folders for p in comfy_bridge.model_folder_paths(f)]
    patterns = component.patterns
    if weight_dtype.startswith("fp8_e4m3fn"):  # prefer a file that is already fp8
        patterns = tuple(p.replace("*.", "*fp8*.") for p in patterns if "*" in p) + patterns
    where = (
        f"{' or '.join(patterns[:3])} in {', '.join(map(str, folders))}"
        if folders
        else f"not running inside ComfyUI: name the file with {component.flag}"
    )
    files = [  # each folder listed once, however many patterns are tried
        sorted(p for p in folder.rglob("*") if p.is_file()) for folder in folders if folder.is_dir()
    ]
    for pattern in patterns:
        for entries in files:
            for entry in entries:
                if fnmatch.fnmatch(entry.name.lower(), pattern):
                    return entry, where
    return None, where


def _find_checkpoint() -> tuple[Path | None, str]:
    folders = [Path(p) for p in comfy_bridge.model_folder_paths("checkpoints")]
    for pattern in CHECKPOINT_PATTERNS:
        for folder in folders:
            if folder.is_dir():
                for entry in sorted(folder.glob(pattern)):
                    return entry, ""
    where = f"all-in-one checkpoint {CHECKPOINT_PATTERNS[0]} in {', '.join(map(str, folders))}"
    return None, where if folders else ""


def _missing_message(missing: list[str], looked: list[str], missing_paths: list[str]) -> str:
    lines = ["the local backend cannot find its files:"]
    lines += [f"  - {m}" for m in missing_paths]
    tokenizers = [m for m in missing if m.endswith("tokenizer")]
    lines += [f"  - {entry}" for entry in looked if entry]
    if comfy_bridge.inside_comfyui():  # its folders and inputs; outside it the flags
        if tokenizers:
            lines.append(
                "  - tokenizer folders: ComfyUI's comfy/text_encoders/t5_tokenizer and comfy/sd1_tokenizer"
            )
        lines.append(
            "FLUX.1-schnell needs flux1-schnell.safetensors (models/diffusion_models), "
            "t5xxl_fp16.safetensors or t5xxl_fp8_e4m3fn.safetensors and clip_l.safetensors "
            "(models/text_encoders), ae.safetensors (models/vae), or one all-in-one checkpoint "
            "(models/checkpoints); or use backend 'api'."
        )
        return "\n".join(lines)
    if tokenizers:
        lines.append(
            "  - tokenizer folders (--t5-tokenizer, --clip-tokenizer): the tokenizer_2/ and tokenizer/ "
            "folders of the FLUX.1-schnell repository, kept next to the transformer file"
        )
    lines.append(
        "FLUX.1-schnell needs --transformer flux1-schnell.safetensors and --ae ae.safetensors (from "
        "black-forest-labs/FLUX.1-schnell), --t5 t5xxl_fp16.safetensors (or t5xxl_fp8_e4m3fn) and "
        "--clip clip_l.safetensors (from comfyanonymous/flux_text_encoders), or one --checkpoint; "
        "or use --backend api."
    )
    return "\n".join(lines)
