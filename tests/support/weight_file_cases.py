"""Test helper shared by test_checkpoint.py and test_loading.py: the four loaders with the titles and
file hints their messages use, tiny model sets written on first use, header-only (sparse) files of
the full-size key layouts, and `load_error`.

The full-size layouts come from tests/data/keys/*.json (the tensor names and shapes of the public
FLUX.1-schnell, autoencoder, T5-XXL and CLIP-L files).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from comfyui_flux_schnell.errors import ModelLoadError
from comfyui_flux_schnell.flux import loading

from . import KEYS_DIR
from . import tiny_models as tm

LOADERS = {
    "transformer": loading.load_transformer,
    "ae": loading.load_autoencoder,
    "t5": loading.load_t5,
    "clip": loading.load_clip,
}
TITLES = {
    "transformer": "FLUX.1 [schnell] transformer",
    "ae": "FLUX.1 autoencoder (VAE)",
    "t5": "T5-XXL text encoder",
    "clip": "CLIP-L text encoder",
}
HINTS = {
    "transformer": "flux1-schnell.safetensors",
    "ae": "ae.safetensors",
    "t5": "t5xxl_fp16.safetensors",
    "clip": "clip_l.safetensors",
}


def tiny_model_sets(tmp_path_factory) -> Callable[[torch.dtype], tm.TinyModelFiles]:
    """dtype -> TinyModelFiles, each set written on first use into its own folder of `tmp_path_factory`."""
    written = {}

    def get(dtype):
        if dtype not in written:
            written[dtype] = tm.write_tiny_models(tmp_path_factory.mktemp(tm.DTYPE_NAMES[dtype]), dtype)
        return written[dtype]

    return get


def real_shapes(name: str) -> tuple[dict, dict]:
    data = json.loads((KEYS_DIR / f"keys_{name}.json").read_text())
    shapes = {k: v["shape"] if isinstance(v, dict) else v for k, v in data["keys"].items()}
    return shapes, data


def real_layout(name: str, prefix: str = "", dtype=torch.bfloat16) -> dict:
    shapes, _ = real_shapes(name)
    return {prefix + k: (tuple(v), dtype) for k, v in shapes.items()}


def write_real_all_in_one(path: Path) -> Path:
    """A header-only (sparse) ComfyUI checkpoint with the full-size layouts of all four networks."""
    layout = {
        **real_layout("flux1_schnell", "model.diffusion_model."),
        **real_layout("ae", "vae.", torch.float32),
        **real_layout("t5xxl_hf", "text_encoders.t5xxl.transformer.", torch.float8_e4m3fn),
        **real_layout("clip_l_hf", "text_encoders.clip_l.transformer.", torch.float16),
        "text_encoders.clip_l.logit_scale": ((), torch.float32),
        "text_encoders.t5xxl.logit_scale": ((), torch.float32),
    }
    return tm.write_header_only(path, layout)


def load_error(loader, path, **kwargs) -> str:
    """The message of the ModelLoadError `loader(path, **kwargs)` raises, checked to name `path`."""
    with pytest.raises(ModelLoadError) as caught:
        loader(path, **kwargs)
    message = str(caught.value)
    assert str(path) in message
    return message
