"""ComfyUI's own modules, imported only when this package runs inside ComfyUI."""

from __future__ import annotations

import importlib
from types import ModuleType


def comfy_module(name: str) -> ModuleType | None:
    """The ComfyUI module `name`, or None when not running inside ComfyUI."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None
