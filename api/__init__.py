"""The hosted ImageAPI service, without torch: what the backend's face (`api_client.py`), the
command line and the nodes use of it.

- `service.py`: the client (`ImageApiClient`: a bounded worker pool, one image's attempts, collecting a
  recorded job); `control.py`: run control (`StopRequest`: a graceful stop and a hard one);
- `http.py`: one exchange, proxies, download hosts; `retry.py`: which failed calls are sent again;
  `failures.py`: what a status or transport error means;
- `answers.py`, `answer_shapes.py`: an answer to an image (downloads, jobs, decoding);
- `redact.py`: the key out of text (`scrub`); `types.py`: one image's request, events, the
  idempotency key; `settings.py`: the key, base URL and limits, and where each comes from.

The entry points below are imported on first use (PEP 562): `from ..api import scrub` loads
`redact.py` only.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .control import StopRequest
    from .redact import scrub
    from .service import ImageApiClient, OnEvent
    from .settings import (
        ApiSettings,
        config_search_paths,
        default_config_path,
        describe_settings,
        load_settings,
        missing_key_message,
        save_api_key,
    )
    from .types import ApiImageRequest, EventKind

__all__ = [
    "ApiImageRequest",
    "ApiSettings",
    "EventKind",
    "ImageApiClient",
    "OnEvent",
    "StopRequest",
    "config_search_paths",
    "default_config_path",
    "describe_settings",
    "load_settings",
    "missing_key_message",
    "save_api_key",
    "scrub",
]
_HOME = {  # entry point -> the module that defines it
    "StopRequest": "control",
    "scrub": "redact",
    "ImageApiClient": "service",
    "OnEvent": "service",
    "ApiSettings": "settings",
    "config_search_paths": "settings",
    "default_config_path": "settings",
    "describe_settings": "settings",
    "load_settings": "settings",
    "missing_key_message": "settings",
    "save_api_key": "settings",
    "ApiImageRequest": "types",
    "EventKind": "types",
}


def __getattr__(name: str):
    if name in _HOME:
        return getattr(importlib.import_module(f".{_HOME[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
