"""The local backend: weight files to loaded models to images.

Not available yet: the pure-PyTorch FLUX.1-schnell lands with the local backend issue.
"""

from __future__ import annotations

from .errors import LocalBackendUnavailable


def generate_local(*args, **kwargs):
    raise LocalBackendUnavailable(
        "backend 'local' is not available in this version yet; choose backend 'api'."
    )
