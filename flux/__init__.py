"""FLUX.1 [schnell] in pure PyTorch: the networks, their weight loading, and sampling.

- `model.py`, `layers.py`, `rope.py`: the flow transformer (`Flux`, `FluxParams`);
- `autoencoder.py`: the autoencoder (`AutoEncoder`, `AutoEncoderParams`);
- `t5.py`, `clip.py`, `tokenizers.py`, `conditioning.py`: the text encoders and prompt encoding;
- `checkpoint.py`, `loading.py`: weight files to modules (memory-mapped, config from shapes);
- `gguf_file.py`, `gguf_layouts.py`, `gguf_quants.py`: GGUF files (header, key layouts, block
  types and their dequantization); `scaled_fp8.py`: ComfyUI's fp8 files with per-layer scales;
  `stored_layers.py`: layers prepared to keep either form as stored;
- `sampling.py`, `preview.py`: noise, schedule, Euler steps, decoding, latent previews;
- `ops.py`: layers that compute in their input's dtype whatever form their weights are stored in;
- `lora.py`, `lora_keys.py`, `lora_adapter.py`: LoRA files matched to the layers and added at run time.

- `components.py`: the four networks of a FLUX.1 set and their file names (no torch).

The entry points below are imported on first use (PEP 562), so that `flux.components` can be read
without torch; every other module of this package imports torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .autoencoder import AutoEncoder, AutoEncoderParams
    from .model import Flux, FluxParams

__all__ = ["AutoEncoder", "AutoEncoderParams", "Flux", "FluxParams"]
_HOME = {
    "AutoEncoder": "autoencoder",
    "AutoEncoderParams": "autoencoder",
    "Flux": "model",
    "FluxParams": "model",
}


def __getattr__(name: str):
    if name in _HOME:
        return getattr(importlib.import_module(f".{_HOME[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
