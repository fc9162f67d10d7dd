"""fp16 compute for GPUs without native bf16 (Turing, Volta): `compute_dtype` picks it, T5 and the
autoencoder stay fp32, and the transformer blocks keep their residual streams finite
(`flux.layers.keep_finite`) on inputs that overflow fp16 without the clamps; in bf16/fp32 the clamp
changes nothing."""

from __future__ import annotations

import pytest
import torch
from comfyui_flux_schnell.flux import layers
from comfyui_flux_schnell.flux.conditioning import t5_compute_dtype
from comfyui_flux_schnell.flux.rope import rope_table
from comfyui_flux_schnell.local.device import compute_dtype, decode_dtype

HIDDEN, HEADS, MLP = 64, 2, 128


@pytest.fixture
def capability(monkeypatch):
    def set_to(cap, hip=None):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cap)
        monkeypatch.setattr(torch.version, "hip", hip)

    return set_to


@pytest.mark.parametrize(
    ("cap", "hip", "expected"),
    [((7, 5), None, torch.float16), ((7, 0), None, torch.float16), ((8, 6), None, torch.bfloat16),
     ((9, 0), None, torch.bfloat16), ((9, 4), "6.2", torch.bfloat16)],
)  # fmt: skip
def test_compute_dtype_by_capability(capability, cap, hip, expected):
    capability(cap, hip)
    assert compute_dtype(torch.device("cuda")) == expected
    assert compute_dtype(torch.device("cpu")) == torch.float32


def test_t5_and_the_autoencoder_stay_out_of_fp16(capability):
    capability((7, 5))
    assert t5_compute_dtype(torch.float16, "cuda") == torch.float32
    capability((8, 0))
    assert t5_compute_dtype(torch.float16, "cuda") == torch.bfloat16
    assert decode_dtype(torch.float16) == torch.float32
    assert decode_dtype(torch.bfloat16) == torch.bfloat16


def seeded(module: torch.nn.Module, seed: int, dtype: torch.dtype) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return module.to(dtype)


def near_fp16_max(shape, seed: int) -> torch.Tensor:
    """Residual-stream values up to 64000: within fp16's range, but a block's update takes some past it."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 4000 + 58000).clamp(max=64000)


def pe_for(length: int) -> torch.Tensor:
    ids = torch.zeros(1, length, 3)
    ids[0, :, 2] = torch.arange(length)
    return rope_table(ids, (8, 12, 12), 10_000)  # head dim 32


def single_block_out(dtype, x32, vec32):
    block = seeded(layers.SingleStreamBlock(HIDDEN, HEADS, MLP), 0, dtype)
    with torch.no_grad():
        return block(x32.to(dtype), vec32.to(dtype) * 40, pe_for(x32.shape[1]))


def double_block_out(dtype, img32, txt32, vec32):
    block = seeded(layers.DoubleStreamBlock(HIDDEN, HEADS, MLP, qkv_bias=True), 1, dtype)
    with torch.no_grad():
        pe = pe_for(img32.shape[1] + txt32.shape[1])
        return block(img32.to(dtype), txt32.to(dtype), vec32.to(dtype) * 40, pe)


def test_single_block_stays_finite_in_fp16(monkeypatch):
    x, vec = near_fp16_max((1, 12, HIDDEN), 2), torch.randn(1, HIDDEN)
    reference = single_block_out(torch.float32, x, vec)
    assert reference.abs().max() > layers.FP16_MAX  # fp16 cannot hold this block's output
    clamped = single_block_out(torch.float16, x, vec)
    assert torch.isfinite(clamped).all()
    assert clamped.abs().max() == layers.FP16_MAX
    monkeypatch.setattr(layers, "keep_finite", lambda t: t)  # without the clamp: inf
    assert not torch.isfinite(single_block_out(torch.float16, x, vec)).all()


def test_double_block_keeps_both_streams_finite_in_fp16(monkeypatch):
    img, txt, vec = near_fp16_max((1, 8, HIDDEN), 3), near_fp16_max((1, 4, HIDDEN), 4), torch.randn(1, HIDDEN)
    ref_img, ref_txt = double_block_out(torch.float32, img, txt, vec)
    assert ref_txt.abs().max() > layers.FP16_MAX
    assert ref_img.abs().max() > layers.FP16_MAX
    out_img, out_txt = double_block_out(torch.float16, img, txt, vec)
    assert torch.isfinite(out_img).all()
    assert torch.isfinite(out_txt).all()
    monkeypatch.setattr(layers, "keep_finite", lambda t: t)
    out_img, out_txt = double_block_out(torch.float16, img, txt, vec)
    assert not (torch.isfinite(out_img).all() and torch.isfinite(out_txt).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_clamp_is_a_no_op_outside_fp16(dtype):
    x = torch.tensor([1e6, -1e6, float("inf"), float("nan"), 3.0], dtype=dtype)
    assert layers.keep_finite(x) is x
    half = torch.tensor([float("inf"), -float("inf"), float("nan"), 3.0], dtype=torch.float16)
    assert layers.keep_finite(half).tolist() == [layers.FP16_MAX, -layers.FP16_MAX, 0.0, 3.0]
