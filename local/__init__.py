"""The local backend's machinery behind its face (`local_backend.py`): files, models, memory, pipeline.

- `files.py`: which weight files and tokenizers (`LocalModelSpec`), the node's choice lists;
- `lora.py`: which LoRAs, and putting them on the loaded models; `packages.py`: the `local` extra;
- `device.py`: the device and compute dtype; `models.py`: the model cache (`MODEL_CACHE`);
- `memory.py`: memory policies and block streaming; `pipeline.py`: text to image on loaded models.

The entry points below are imported on first use (PEP 562), so that the node's inputs and the command
line's checks (`files.py`, `lora.py`, `packages.py`) are read without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .device import check_device_can_hold, compute_dtype, pick_device
    from .files import MEMORY_CHOICES, WEIGHT_DTYPE_OPTIONS, LocalModelSpec
    from .lora import LORA_FOLDER, STRENGTH_LIMIT, LoraChoice, lora_from_comfy, parse_lora_option
    from .memory import GIB, MemoryPolicy
    from .models import MODEL_CACHE, set_loras
    from .packages import require_local_packages
    from .pipeline import PipelineRun, run_pipeline, timed_stage

__all__ = [
    "GIB",
    "LORA_FOLDER",
    "MEMORY_CHOICES",
    "MODEL_CACHE",
    "STRENGTH_LIMIT",
    "WEIGHT_DTYPE_OPTIONS",
    "LocalModelSpec",
    "LoraChoice",
    "MemoryPolicy",
    "PipelineRun",
    "check_device_can_hold",
    "compute_dtype",
    "lora_from_comfy",
    "parse_lora_option",
    "pick_device",
    "require_local_packages",
    "run_pipeline",
    "set_loras",
    "timed_stage",
]
_HOME = {  # entry point -> the module that defines it
    "check_device_can_hold": "device",
    "compute_dtype": "device",
    "pick_device": "device",
    "LocalModelSpec": "files",
    "MEMORY_CHOICES": "files",
    "WEIGHT_DTYPE_OPTIONS": "files",
    "LORA_FOLDER": "lora",
    "LoraChoice": "lora",
    "STRENGTH_LIMIT": "lora",
    "lora_from_comfy": "lora",
    "parse_lora_option": "lora",
    "GIB": "memory",
    "MemoryPolicy": "memory",
    "MODEL_CACHE": "models",
    "set_loras": "models",
    "require_local_packages": "packages",
    "PipelineRun": "pipeline",
    "run_pipeline": "pipeline",
    "timed_stage": "pipeline",
}


def __getattr__(name: str):
    if name in _HOME:
        return getattr(importlib.import_module(f".{_HOME[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
