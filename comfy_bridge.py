"""Everything this package uses from ComfyUI, behind functions that also work without it.

Inside ComfyUI: `comfy.utils.ProgressBar`, `comfy.model_management` (interrupt, devices) and
`folder_paths` (model folders, user directory). Outside it (command line, tests) the same calls fall
back to plain behaviour, so the rest of the package never imports ComfyUI itself.
"""

from __future__ import annotations

import importlib
import os
import threading
from pathlib import Path
from types import ModuleType

from .errors import GenerationInterrupted

MODEL_FOLDERS = ("checkpoints", "diffusion_models", "text_encoders", "vae", "loras")
# Folders whose .gguf files are listed too: ComfyUI's own lists hold only its model extensions
# (.safetensors, .ckpt, ...); ComfyUI-GGUF's users keep GGUF transformers in diffusion_models/unet
# and GGUF text encoders in text_encoders/clip (its "unet_gguf" and "clip_gguf" folders).
GGUF_FOLDERS = ("diffusion_models", "text_encoders")


def _comfy(name: str) -> ModuleType | None:
    """The ComfyUI module `name`, or None when not running inside ComfyUI."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


class Progress:
    """Progress and interruption for one run.

    `advance(n, preview=None)` moves ComfyUI's bar (whose update also raises ComfyUI's interrupt
    exception when the user pressed Cancel); `should_stop()` can be polled while waiting;
    `raise_if_interrupted()` raises ComfyUI's own exception inside ComfyUI (so the queue treats it
    as a cancel, not an error) and `GenerationInterrupted` outside it (`stop_flag` set, e.g. by
    Ctrl-C in the command line).
    """

    def __init__(
        self,
        total: int,
        bar=None,
        management: ModuleType | None = None,
        stop_flag: threading.Event | None = None,
    ):
        self.total = total
        self._bar = bar
        self._mm = management
        self._stop = stop_flag
        self.done = 0

    def advance(self, n: int = 1, preview=None) -> None:
        self.done += n
        if self._bar is not None:
            if preview is None:
                self._bar.update(n)
            else:
                self._bar.update_absolute(self.done, self.total, preview)

    def should_stop(self) -> bool:
        if self._stop is not None and self._stop.is_set():
            return True
        return bool(self._mm is not None and self._mm.processing_interrupted())

    def raise_if_interrupted(self) -> None:
        if self._mm is not None:
            self._mm.throw_exception_if_processing_interrupted()
        if self.should_stop():
            raise GenerationInterrupted("interrupted by the user")


def progress_for(total: int) -> Progress:
    """A `Progress` wired to ComfyUI when it is present, else a silent one."""
    utils = _comfy("comfy.utils")
    bar = utils.ProgressBar(total) if utils is not None else None
    return Progress(total, bar, _comfy("comfy.model_management"))


def model_file_lists() -> dict[str, list[str]]:
    """File names ComfyUI knows in each model folder, and the .gguf files of `GGUF_FOLDERS`; empty
    lists outside ComfyUI."""
    folder_paths = _comfy("folder_paths")
    lists: dict[str, list[str]] = {}
    for folder in MODEL_FOLDERS:
        try:
            lists[folder] = list(folder_paths.get_filename_list(folder)) if folder_paths else []
        except KeyError:  # a ComfyUI too old to know this folder name
            lists[folder] = []
        if folder in GGUF_FOLDERS:
            lists[folder] += [name for name in _gguf_files(folder) if name not in lists[folder]]
    return lists


def _gguf_files(folder: str) -> list[str]:
    """The .gguf files under ComfyUI's paths of `folder`, named relative to their path as ComfyUI
    names files (so `full_model_path(folder, name)` finds them)."""
    names = set()
    for root in model_folder_paths(folder):
        if os.path.isdir(root):
            names.update(os.path.relpath(p, root) for p in Path(root).rglob("*.gguf") if p.is_file())
    return sorted(names)


def full_model_path(folder: str, filename: str) -> str | None:
    folder_paths = _comfy("folder_paths")
    if folder_paths is None:
        return None
    return folder_paths.get_full_path(folder, filename)


def model_folder_paths(folder: str) -> list[str]:
    folder_paths = _comfy("folder_paths")
    if folder_paths is None:
        return []
    try:
        return list(folder_paths.get_folder_paths(folder))
    except KeyError:
        return []


def user_directory() -> str | None:
    folder_paths = _comfy("folder_paths")
    if folder_paths is None:
        return None
    return folder_paths.get_user_directory()


def torch_device():
    """ComfyUI's compute device (it honours --cpu, --cuda-device, ...), or None outside ComfyUI."""
    mm = _comfy("comfy.model_management")
    return mm.get_torch_device() if mm is not None else None


def free_memory(num_bytes: int, device) -> None:
    """Ask ComfyUI to move its own models out until `num_bytes` are free on `device`."""
    mm = _comfy("comfy.model_management")
    if mm is None or device is None:
        return
    if hasattr(mm, "free_memory"):
        mm.free_memory(num_bytes, device)
    elif hasattr(mm, "unload_all_models"):
        mm.unload_all_models()
    if hasattr(mm, "soft_empty_cache"):
        mm.soft_empty_cache()


def previews_enabled() -> bool:
    """True when ComfyUI shows previews while sampling (its --preview-method is not 'none')."""
    cli_args = _comfy("comfy.cli_args")
    if cli_args is None:
        return False
    method = getattr(getattr(cli_args, "args", None), "preview_method", None)
    return method is not None and str(getattr(method, "value", method)).lower() != "none"


def free_bytes(device) -> int | None:
    """Free memory on `device` as ComfyUI counts it (any device type), or None outside ComfyUI."""
    mm = _comfy("comfy.model_management")
    if mm is None or not hasattr(mm, "get_free_memory"):
        return None
    return int(mm.get_free_memory(device))
