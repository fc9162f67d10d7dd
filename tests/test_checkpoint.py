"""Tests of flux/checkpoint.py: reading a safetensors header and naming truncated, corrupt and
foreign files (pickle, broken GGUF, JSON, ...); `inspect_file` on every layout (single files,
ComfyUI all-in-one, a header-only full-size checkpoint); and the component found in a file named in
the message when it is not the one asked for.
"""

from __future__ import annotations

import itertools
import struct
from pathlib import Path

import pytest
import torch
from comfyui_flux_schnell.flux import checkpoint, loading
from safetensors.torch import load_file, save_file
from support import tiny_models as tm
from support.weight_file_cases import (
    HINTS,
    LOADERS,
    TITLES,
    load_error,
    tiny_model_sets,
    write_real_all_in_one,
)


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """dtype -> TinyModelFiles, written once per module."""
    return tiny_model_sets(tmp_path_factory)


@pytest.fixture(scope="module")
def real_all_in_one(tmp_path_factory) -> Path:
    """A header-only (sparse) ComfyUI checkpoint with the full-size layouts of all four networks."""
    return write_real_all_in_one(tmp_path_factory.mktemp("real") / "flux1-schnell-aio.safetensors")


# --- header reading and foreign formats ----------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda d, src: tm.write_truncated(src, d / "cut.safetensors", 0.6), "truncated: tensor"),
        (
            lambda d, src: tm.write_truncated(src, d / "cut_head.safetensors", keep_bytes=1000),
            "truncated: its header",
        ),
        (lambda d, src: tm.write_corrupt_header(d / "corrupt.safetensors"), "header is corrupt"),
        (lambda d, src: tm.write_pickle(d / "model.ckpt"), "PyTorch checkpoint (.ckpt/.pt/.pth"),
        (lambda d, src: tm.write_pickle(d / "model.bin", zip_format=False), "Python pickle"),
        (lambda d, src: tm.write_gguf(d / "flux1-schnell-Q4_K.gguf"), "its GGUF header is corrupt"),
        (lambda d, src: _write(d / "empty.safetensors", b""), "too short"),
        (lambda d, src: _write(d / "config.json", b'{"a": 1}'), "JSON text file"),
        (lambda d, src: _write(d / "noise.bin", bytes(range(7, 200))), "not a safetensors file"),
        (lambda d, src: d / "missing.safetensors", "no such file"),
        (lambda d, src: d, "is a folder"),
    ],
    ids=[
        "truncated",
        "truncated_header",
        "corrupt",
        "zip_ckpt",
        "pickle",
        "gguf",
        "empty",
        "json",
        "random",
        "missing",
        "folder",
    ],
)
def test_broken_and_foreign_files_are_named(sets, tmp_path, make, needle):
    path = make(tmp_path, sets(torch.float32).transformer)
    message = load_error(loading.load_transformer, path)
    assert needle in message
    assert TITLES["transformer"] in message


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("header_len", [896, 1152, 23328, 31520, 66432])
def test_header_lengths_that_look_like_other_formats_are_still_safetensors(tmp_path, header_len):
    """Bytes 0..7 are the header's length: 896 = 80 03 ..., like a pickle's first bytes; 31520 =
    20 7b ..., which a JSON sniffer that strips spaces would take for '{'."""
    save_file({"w": torch.ones(2, 3)}, tmp_path / "plain.safetensors")
    raw = (tmp_path / "plain.safetensors").read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header, data = raw[8 : 8 + length].rstrip(), raw[8 + length :]
    padded = header + b" " * (header_len - len(header))  # safetensors allows trailing spaces
    path = _write(tmp_path / "padded.safetensors", struct.pack("<Q", header_len) + padded + data)
    assert load_file(path)["w"].shape == (2, 3)  # the reference reader takes it
    assert checkpoint.read_header(path).tensors["w"].shape == (2, 3)


# --- inspect_file --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("attr", "layout", "components"),
    [
        ("transformer", "Black Forest Labs single file", {"transformer"}),
        ("ae", "Black Forest Labs single file", {"ae"}),
        ("t5", "Hugging Face single file", {"t5"}),
        ("clip", "Hugging Face single file", {"clip"}),
        (
            "all_in_one",
            "ComfyUI all-in-one checkpoint",
            {"transformer", "ae", "t5", "clip"},
        ),
    ],
)
def test_inspect_file_layouts(sets, attr, layout, components):
    info = checkpoint.inspect_file(getattr(sets(torch.float8_e4m3fn), attr))
    assert info.layout == layout
    assert set(info.components) == components
    assert info.unsupported is None
    for comp in info.components.values():
        assert set(comp.dtypes) == {"F8_E4M3", "BF16"}


def test_inspect_file_tells_dev_from_schnell(tmp_path):
    info = checkpoint.inspect_file(tm.write_transformer(tmp_path / "dev.safetensors", dev=True))
    assert info.components["transformer"].variant == "dev"
    assert "FLUX.1 [dev] transformer" in info.describe()


def test_inspect_real_size_all_in_one(real_all_in_one):
    info = checkpoint.inspect_file(real_all_in_one)
    assert info.layout == "ComfyUI all-in-one checkpoint"
    assert set(info.components) == {"transformer", "ae", "t5", "clip"}
    transformer = info.components["transformer"]
    assert transformer.variant == "schnell"
    assert transformer.num_params == 11_891_178_560
    assert transformer.dtypes == {"BF16": 776}
    assert info.components["ae"].num_params == 83_819_683
    assert info.components["t5"].dtypes == {"F8_E4M3": 220}
    assert len(info.components["clip"].keys) == 196
    assert "a FLUX.1 [schnell] transformer (under 'model.diffusion_model.'; 776" in info.describe()


# --- the component found, named when it is the wrong one -----------------------------------------


@pytest.mark.parametrize(("expected", "given"), list(itertools.permutations(LOADERS, 2)))
def test_every_swap_between_components_is_named(sets, expected, given):
    path = getattr(sets(torch.float16), given)
    message = load_error(LOADERS[expected], path)
    assert f"cannot be loaded as the {TITLES[expected]}" in message
    assert f"it holds a {TITLES[given]} (no prefix;" in message
    assert HINTS[expected] in message


def test_all_in_one_without_the_component(tmp_path):
    parts = {"transformer": tm.transformer_weights(), "clip": tm.clip_weights()}
    path = tm.write_all_in_one(tmp_path / "no_t5.safetensors", parts)
    message = load_error(loading.load_t5, path)
    assert "a FLUX.1 [schnell] transformer (under 'model.diffusion_model.';" in message
    assert "; a CLIP-L text encoder (under 'text_encoders.clip_l.transformer.';" in message
    assert HINTS["t5"] in message


def test_stable_diffusion_checkpoint_is_named(tmp_path):
    path = tm.write_sd_unet(tmp_path / "v1-5-pruned.safetensors")
    message = load_error(loading.load_transformer, path)
    assert "Stable Diffusion 1.x/2.x/SDXL UNet" in message
    assert HINTS["transformer"] in message
