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
    from .components import CHECKPOINT_PATTERNS, CLIP, COMPONENTS, T5, TRANSFORMER, Component
    from .conditioning import encode_prompts
    from .fp8_matmul import enable_fp8_matmul
    from .loading import check_files_compatible, load_autoencoder, load_clip, load_t5, load_transformer
    from .lora import adapters, apply_loras, move_loras, read_lora
    from .model import Flux, FluxParams
    from .preview import latent_preview
    from .sampling import (
        check_image_size,
        decode_to_images,
        denoise,
        get_noise,
        get_schedule,
        image_ids,
        pack,
        text_ids,
        unpack,
    )
    from .tokenizers import find_comfyui_tokenizer_folders, load_clip_tokenizer, load_t5_tokenizer

__all__ = [
    "CHECKPOINT_PATTERNS",
    "CLIP",
    "COMPONENTS",
    "T5",
    "TRANSFORMER",
    "AutoEncoder",
    "AutoEncoderParams",
    "Component",
    "Flux",
    "FluxParams",
    "adapters",
    "apply_loras",
    "check_files_compatible",
    "check_image_size",
    "decode_to_images",
    "denoise",
    "enable_fp8_matmul",
    "encode_prompts",
    "find_comfyui_tokenizer_folders",
    "get_noise",
    "get_schedule",
    "image_ids",
    "latent_preview",
    "load_autoencoder",
    "load_clip",
    "load_clip_tokenizer",
    "load_t5",
    "load_t5_tokenizer",
    "load_transformer",
    "move_loras",
    "pack",
    "read_lora",
    "text_ids",
    "unpack",
]
_HOME = {  # entry point -> the module that defines it
    "AutoEncoder": "autoencoder",
    "AutoEncoderParams": "autoencoder",
    "CHECKPOINT_PATTERNS": "components",
    "CLIP": "components",
    "COMPONENTS": "components",
    "Component": "components",
    "T5": "components",
    "TRANSFORMER": "components",
    "encode_prompts": "conditioning",
    "enable_fp8_matmul": "fp8_matmul",
    "check_files_compatible": "loading",
    "load_autoencoder": "loading",
    "load_clip": "loading",
    "load_t5": "loading",
    "load_transformer": "loading",
    "adapters": "lora",
    "apply_loras": "lora",
    "move_loras": "lora",
    "read_lora": "lora",
    "Flux": "model",
    "FluxParams": "model",
    "latent_preview": "preview",
    "check_image_size": "sampling",
    "decode_to_images": "sampling",
    "denoise": "sampling",
    "get_noise": "sampling",
    "get_schedule": "sampling",
    "image_ids": "sampling",
    "pack": "sampling",
    "text_ids": "sampling",
    "unpack": "sampling",
    "find_comfyui_tokenizer_folders": "tokenizers",
    "load_clip_tokenizer": "tokenizers",
    "load_t5_tokenizer": "tokenizers",
}


def __getattr__(name: str):
    if name in _HOME:
        return getattr(importlib.import_module(f".{_HOME[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
