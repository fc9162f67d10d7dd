"""fp8 matrix products (`flux.fp8_matmul`, weight dtype `fp8_e4m3fn_fast`), proven on the CPU through
`FLUX_SCHNELL_FP8_MATMUL=force` (torch's CPU build has `_scaled_mm`).

Stated tolerances: a layer's output within 5 % relative (Frobenius) of the product with the upcast
weight; the end-to-end image within 30 dB PSNR of the `fp8_e4m3fn` one (tiny model, 2 steps)."""

from __future__ import annotations

import logging

import pytest
import torch
from comfyui_flux_schnell import local_backend
from comfyui_flux_schnell.flux import fp8_matmul
from comfyui_flux_schnell.flux.layers import linear_part
from comfyui_flux_schnell.flux.ops import Linear
from support.tiny_models import write_tiny_models
from support.tiny_tokenizers import write_flux_repo_tree
from test_local_backend import run, spec_for

pytestmark = pytest.mark.skipif(not hasattr(torch, "_scaled_mm"), reason="this torch has no _scaled_mm")

LAYER_TOLERANCE = 0.05
IMAGE_PSNR_DB = 30.0


@pytest.fixture(autouse=True)
def fresh_decisions(monkeypatch):
    fp8_matmul._DECIDED.clear()
    yield
    fp8_matmul._DECIDED.clear()


def fp8_layer(n=96, k=160, scale: float | None = None, seed=0) -> Linear:
    g = torch.Generator().manual_seed(seed)
    layer = Linear(k, n)
    w = torch.randn(n, k, generator=g) * 0.5
    layer.weight = torch.nn.Parameter(w.to(torch.float8_e4m3fn), requires_grad=False)
    layer.bias = torch.nn.Parameter(torch.randn(n, generator=g), requires_grad=False)
    if scale is not None:
        layer.register_buffer("weight_scale", torch.tensor(scale))
    return layer


def upcast_product(layer: Linear, x, rows=slice(None), cols=slice(None), bias=True):
    w = layer.weight.float()[rows, cols]
    if "weight_scale" in layer._buffers:
        w = w * layer.weight_scale
    return torch.nn.functional.linear(x, w, layer.bias[rows] if bias else None)


def rel_error(a, b) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("how", fp8_matmul.GRANULARITIES)
@pytest.mark.parametrize("scale", [None, 0.037])
def test_each_layer_within_tolerance_of_the_upcast_product(monkeypatch, how, scale):
    layer = fp8_layer(scale=scale)
    x = torch.randn(2, 7, 160) * torch.logspace(-2, 1, 7)[:, None]  # rows of very different sizes
    expected = upcast_product(layer, x)
    got = fp8_matmul.fp8_linear(x, layer.weight, layer._buffers.get("weight_scale"), layer.bias, how)
    assert got.shape == (2, 7, 96)
    assert got.dtype == x.dtype
    assert not torch.equal(got, expected)  # the input really was quantized
    assert rel_error(got, expected) < LAYER_TOLERANCE


def test_marked_layers_take_scaled_mm_only_when_usable(monkeypatch):
    layer = fp8_layer(scale=0.5)
    x = torch.randn(3, 160)
    calls = []
    real = torch._scaled_mm
    monkeypatch.setattr(torch, "_scaled_mm", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    monkeypatch.setenv(fp8_matmul.ENV, "force")
    assert torch.equal(layer(x), upcast_product(layer, x))  # not marked: upcast as before
    # the fp32 weight is left alone
    assert fp8_matmul.enable_fp8_matmul(torch.nn.Sequential(layer, Linear(4, 4))) == 1
    out = layer(x)
    assert calls == [1]
    assert rel_error(out, upcast_product(layer, x)) < LAYER_TOLERANCE
    monkeypatch.setenv(fp8_matmul.ENV, "off")
    assert torch.equal(layer(x), upcast_product(layer, x))
    assert calls == [1]


def test_row_and_column_parts_of_a_marked_layer(monkeypatch):
    monkeypatch.setenv(fp8_matmul.ENV, "force")
    layer = fp8_layer(n=96, k=160)
    layer.fp8_matmul = True
    x = torch.randn(1, 5, 160)
    got = linear_part(layer, x, rows=slice(32, None))
    assert rel_error(got, upcast_product(layer, x, rows=slice(32, None))) < LAYER_TOLERANCE
    xc = torch.randn(1, 5, 64)
    got = linear_part(layer, xc, cols=slice(96, None), bias=False)
    assert rel_error(got, upcast_product(layer, xc, cols=slice(96, None), bias=False)) < LAYER_TOLERANCE


def test_without_the_hardware_it_says_so_once_and_upcasts(monkeypatch, caplog):
    monkeypatch.delenv(fp8_matmul.ENV, raising=False)
    with caplog.at_level(logging.WARNING, logger=fp8_matmul.__name__):
        assert not fp8_matmul.usable(torch.device("cpu"))
        assert not fp8_matmul.usable(torch.device("cpu"))
    said = [r for r in caplog.records if "capability 8.9" in r.getMessage()]
    assert len(said) == 1
    assert "as fp8_e4m3fn" in said[0].getMessage()
    monkeypatch.setenv(fp8_matmul.ENV, "force")
    assert fp8_matmul.usable(torch.device("cpu"))


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a.float() - b.float()) ** 2).mean())
    return 10 * torch.log10(torch.tensor(1.0 / mse)).item()


def test_end_to_end_image_close_to_the_fp8_one(tmp_path, monkeypatch):
    write_flux_repo_tree(tmp_path)
    files = write_tiny_models(tmp_path / "w", torch.float32)
    monkeypatch.setenv(fp8_matmul.ENV, "force")
    local_backend.release_models()
    try:
        plain, _ = run(spec_for(files, tmp_path, weight_dtype="fp8_e4m3fn"), seed=4)
        fast, _ = run(spec_for(files, tmp_path, weight_dtype="fp8_e4m3fn_fast"), seed=4)
    finally:
        local_backend.release_models()
    assert plain.std() > 0
    assert not torch.equal(plain, fast)
    assert psnr(fast, plain) > IMAGE_PSNR_DB
