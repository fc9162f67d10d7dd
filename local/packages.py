"""The Python packages the local backend needs beyond the base install, and the error when one is
missing.

`pip install comfyui-flux-schnell` installs what the hosted-API path needs (requests, pillow,
numpy); the `local` extra adds torch, tokenizers and einops. The command line and the node call
`require_local_packages()` before importing anything of the local backend, so a missing package is
one clear error naming it and the pip command, never a bare ModuleNotFoundError from deep inside.
"""

from __future__ import annotations

import importlib.util

from .. import comfy_bridge
from ..errors import LocalBackendUnavailable

LOCAL_PACKAGES = ("torch", "einops", "tokenizers")
INSTALL_COMMAND = 'pip install "comfyui-flux-schnell[local]"'


def missing_local_packages() -> list[str]:
    missing = []
    for name in LOCAL_PACKAGES:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a broken install, or a stand-in without a spec
            found = False
        if not found:
            missing.append(name)
    return missing


def require_local_packages() -> None:
    """Raise `LocalBackendUnavailable` naming every missing package and the command to install it."""
    missing = missing_local_packages()
    if missing:
        names = ", ".join(f"'{m}'" for m in missing)
        raise LocalBackendUnavailable(
            f"backend 'local' needs the Python package{'s' if len(missing) > 1 else ''} {names}, "
            f"not installed in this Python environment. Install the local backend's extra with: "
            f"{INSTALL_COMMAND}"
            + (
                f" (or python -m pip install {' '.join(missing)}), with ComfyUI's own Python."
                if comfy_bridge.inside_comfyui()
                else "."
            )
        )
