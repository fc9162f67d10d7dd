"""Tests of benchmarks/memory_estimate.py: the live-bytes tracker, the fused-kernel stand-ins, the
allocator rounding, the "auto" simulation, and the pipeline measured on tiny and full-size models.

Every expected number is computed here from shapes and dtypes, independently of the tracker.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch
from comfyui_flux_schnell.flux import ops
from comfyui_flux_schnell.flux.model import Flux
from comfyui_flux_schnell.generation import GenerationRequest
from comfyui_flux_schnell.local import memory as local_memory
from comfyui_flux_schnell.local import models as local_models
from support.tiny_models import TINY_AE, TINY_CLIP, TINY_FLUX, TINY_T5

_PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "memory_estimate.py"
_spec = importlib.util.spec_from_file_location("memory_estimate", _PATH)
me = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = me  # dataclasses look their module up there
_spec.loader.exec_module(me)

MIB = 2**20
META = "meta"


@pytest.mark.parametrize(
    ("nbytes", "counted"),
    [
        (0, 0),
        (1, 512),
        (512, 512),
        (513, 1024),
        (9 * MIB + 1, 9 * MIB + 512),  # below 10 MiB: 512-byte blocks only
        (63 * MIB, 64 * MIB),  # 1 MiB left in a 64 MiB segment: not split, counted whole
        (20 * MIB + MIB // 2, 20 * MIB + MIB // 2),  # 1.5 MiB would be left: split
        (36 * MIB, 36 * MIB),
    ],
)
def test_allocator_bytes(nbytes, counted):
    assert me.allocator_bytes(nbytes) == counted


@pytest.mark.parametrize("inference", [False, True])
def test_tracker_counts_each_storage_once_until_it_dies(inference):
    tracker = me.LiveTensorTracker(META)
    mode = torch.inference_mode() if inference else torch.no_grad()
    with mode, tracker:
        a = torch.empty(1000, device=META)  # 4000 bytes
        views = (a[10:], a.view(10, 100), a.view(10, 100).t())
        a.add_(1)
        assert tracker.current == 4000  # views and in-place results share a's storage
        b = a * 2
        assert tracker.current == 8000
        c = b.to(torch.bfloat16)  # 2000 bytes
        del b
        assert tracker.current == 6000
        same = c.to(torch.bfloat16)  # no-op cast: the same tensor
        assert same is c
        del views
    assert tracker.peak == 10_000
    assert tracker.current == 6000
    assert sorted(x.nbytes for x in tracker.peak_live) == [2000, 4000, 4000]


@pytest.mark.parametrize(
    ("weight_dtype", "cast_bytes"),
    [(torch.float8_e4m3fn, 32 * 64 * 2), (torch.bfloat16, 0), (None, 0)],
)
@pytest.mark.parametrize("inference", [False, True])
def test_weight_cast_is_a_transient_inside_the_peak(weight_dtype, cast_bytes, inference):
    """ops.Linear with fp8 weights holds a bf16 copy of its weight while it runs, and only then."""
    layer = me.on_meta(lambda _: ops.Linear(64, 32), None, torch.bfloat16, weight_dtype)
    narrow = weight_dtype or torch.bfloat16
    assert layer.weight.dtype == narrow
    assert layer.bias.dtype == torch.bfloat16  # fp8 narrows the matrices only, as loading does
    tracker = me.LiveTensorTracker(META)
    tracker.add_weights(layer, "lin")
    mode = torch.inference_mode() if inference else torch.no_grad()
    with mode, tracker.module_names(), tracker:
        x = torch.empty(4, 64, dtype=torch.bfloat16, device=META)
        y = layer(x)
    x_bytes, y_bytes = 4 * 64 * 2, 4 * 32 * 2
    assert tracker.peak == x_bytes + cast_bytes + y_bytes
    assert tracker.current == x_bytes + y_bytes
    if cast_bytes:
        alloc, what = tracker.largest_cast
        assert alloc.nbytes == cast_bytes
        assert what == "lin.weight float8_e4m3fn -> bfloat16"
        assert alloc.module == "lin"
    else:
        assert tracker.largest_cast is None
    del y


def _attention_peak(fused: bool, q_shape, mask=None, causal=False) -> int:
    tracker = me.LiveTensorTracker(META)
    with torch.inference_mode(), me.gpu_kernels(fused), tracker:
        q, k, v = (torch.empty(q_shape, dtype=torch.bfloat16, device=META) for _ in range(3))
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        assert out.shape == q_shape
    return tracker.peak


@pytest.mark.parametrize("causal", [False, True])
def test_flash_attention_holds_no_scores(causal):
    b, h, length, d = 1, 2, 1024, 64
    qkv = 3 * b * h * length * d * 2
    out = b * h * length * d * 2
    scores = b * h * length * length * 4  # the math path's float32 L x L
    fused = _attention_peak(True, (b, h, length, d), causal=causal)
    assert qkv + out <= fused <= qkv + out + b * h * length * 4 + 1024  # + logsumexp, seeds
    assert _attention_peak(False, (b, h, length, d), causal=causal) >= qkv + scores


def test_memory_efficient_attention_with_bias_and_wide_head():
    """T5's additive bias (non-contiguous) is copied once; a 512-wide head adds an fp32 accumulator."""
    b, h, length, d = 1, 1, 256, 512
    qkv, out = 3 * length * d * 2, length * d * 2
    peak = _attention_peak(True, (b, h, length, d))
    assert peak == qkv + out + length * d * 4  # efficient attention: no logsumexp in inference

    bias_rows = torch.empty(length, length, 4, dtype=torch.bfloat16, device=META)
    tracker = me.LiveTensorTracker(META)
    with torch.inference_mode(), me.gpu_kernels(True), tracker:
        bias = bias_rows.permute(2, 0, 1)[None]  # (1, H, L, L), last-dim stride 4: not usable
        q = torch.empty(1, 4, length, 64, dtype=torch.bfloat16, device=META)
        torch.nn.functional.scaled_dot_product_attention(q, q, q, attn_mask=bias, scale=1.0)
    q_bytes = 4 * length * 64 * 2
    expected = q_bytes + 4 * length * length * 2 + q_bytes  # q (= k = v), bias copy, output
    assert 0 <= tracker.peak - expected <= 64  # + the kernel's two scalar RNG tensors


def test_fused_rms_norm_copies_a_non_contiguous_input_once():
    tracker = me.LiveTensorTracker(META)
    with torch.inference_mode(), me.gpu_kernels(True), tracker:
        qkv = torch.empty(1, 100, 3, 4, 128, dtype=torch.bfloat16, device=META)
        q = qkv.unbind(2)[0]  # (1, 100, 4, 128), not contiguous
        y = torch.nn.functional.rms_norm(q, (128,), eps=1e-6)
    part = 100 * 4 * 128 * 2
    assert y.shape == q.shape
    assert y.dtype == q.dtype
    assert tracker.peak == 3 * part + 2 * part + 100 * 4 * 4  # qkv, copy, output, fp32 rstd


def _tiny_configs():
    return me.Configs(TINY_FLUX, TINY_T5, TINY_CLIP, TINY_AE)


def _expected_weight_bytes(module, narrow_itemsize: int | None, stored_itemsize: int) -> int:
    casting = tuple(me.loading.CASTING_LAYERS)
    total = 0
    for m in module.modules():
        for name, p in m.named_parameters(recurse=False):
            itemsize = stored_itemsize
            if narrow_itemsize and (narrow_itemsize > 1 or (isinstance(m, casting) and name == "weight")):
                itemsize = narrow_itemsize
            total += p.numel() * itemsize
    return total


@pytest.mark.parametrize(("weight_dtype", "itemsize"), [("fp8_e4m3fn", 1), ("bf16", 2)])
def test_measure_tiny_pipeline(weight_dtype, itemsize):
    request = GenerationRequest(prompt="a cat", width=64, height=48, steps=2, batch_size=2)
    result = me.measure(weight_dtype, request, _tiny_configs())
    assert [s.name for s in result.stages] == ["text encoding", "sampling", "decoding"]
    text, sampling, decoding = result.stages
    with torch.device(META):
        flux = Flux(TINY_FLUX)
    assert sampling.weight_bytes == _expected_weight_bytes(flux, itemsize, 2)
    assert result.model_bytes["transformer"] == sampling.weight_bytes
    assert text.models == ["T5-XXL", "CLIP-L"]
    assert decoding.models == ["autoencoder"]
    assert text.carried_bytes == 0
    txt = local_models.T5_MAX_LENGTH * TINY_T5.d_model * 2
    vec = TINY_CLIP.hidden_size * 2
    assert sampling.carried_bytes == txt + vec  # the prompt's encodings, bf16
    latent = math.ceil(48 / 16) * (64 // 16) * 64 * 2
    assert decoding.carried_bytes == txt + vec + 2 * latent  # + one packed latent per image
    for stage in result.stages:
        assert stage.activation_peak > stage.carried_bytes
        assert stage.activation_peak_rounded >= stage.activation_peak
        assert stage.peak_tensors
    assert sampling.reserved == local_memory.sampling_bytes(48, 64)
    assert decoding.reserved == local_memory.decoding_bytes(48, 64)
    assert result.offload_peak == max(s.weight_bytes + s.activation_peak for s in result.stages)
    assert result.keep_peak > result.offload_peak
    if itemsize == 1:
        assert "float8_e4m3fn -> bfloat16" in sampling.largest_cast
        assert text.largest_cast.endswith(")")  # T5 (fp8) or CLIP (fp16) -> bf16
    else:
        assert sampling.largest_cast == ""
    assert "float32 -> bfloat16" in decoding.largest_cast  # the autoencoder stays fp32


def _stages(reserved=0):
    def stage(name, models, weights, activations):
        return me.StageMemory(name, models, weights, weights, 0, activations, activations, reserved)

    gib = me.GIB
    model_bytes = {"T5-XXL": 4 * gib, "CLIP-L": gib // 4, "transformer": 11 * gib, "autoencoder": gib // 4}
    stages = [
        stage("text encoding", ["T5-XXL", "CLIP-L"], 4 * gib + gib // 4, gib // 8),
        stage("sampling", ["transformer"], 11 * gib, gib // 4),
        stage("decoding", ["autoencoder"], gib // 4, 2 * gib),
    ]
    return me.PipelineMemory("fp8_e4m3fn", 1024, 1024, 4, 1, True, model_bytes, model_bytes, stages)


@pytest.mark.parametrize(
    ("card_gib", "resident_while_decoding", "peak_gib"),
    [
        (64, ["CLIP-L", "T5-XXL", "autoencoder", "transformer"], 15.5 + 2),  # room for all
        (16, ["autoencoder", "transformer"], 11.25 + 2),  # T5/CLIP out, transformer stays
        (12.5, ["autoencoder"], 11.25),  # no room: only the stage's own model
    ],
)
def test_simulate_auto(card_gib, resident_while_decoding, peak_gib):
    rows = me.simulate_auto(_stages(reserved=me.GIB), int(card_gib * me.GIB), runs=1)
    assert [r[1] for r in rows] == ["text encoding", "sampling", "decoding"]
    assert rows[2][2] == resident_while_decoding
    assert max(r[3] for r in rows) == int(peak_gib * me.GIB)


@pytest.mark.slow
@pytest.mark.parametrize("weight_dtype", ["fp8_e4m3fn", "bf16"])
def test_full_size_pipeline_meets_the_targets(weight_dtype):
    """FLUX.1-schnell at 1024x1024 with "offload to CPU": within 16 GB (fp8) / 26 GB (bf16)."""
    request = GenerationRequest(prompt="a cat", width=1024, height=1024, steps=1)
    result = me.measure(weight_dtype, request)
    assert result.model_bytes["transformer"] == pytest.approx(
        11_891_178_560 * {"fp8_e4m3fn": 1, "bf16": 2}[weight_dtype], rel=0.002
    )
    rounded = max(s.weight_bytes_rounded + s.activation_peak_rounded for s in result.stages)
    assert rounded < me.TARGETS[weight_dtype]
    for stage in result.stages:  # the reservation `run_pipeline` asks the "auto" policy for is enough
        assert stage.activation_peak < stage.reserved


@pytest.mark.parametrize(("form", "block_type"), [("gguf-Q8_0", "Q8_0"), ("gguf-Q4_K_S", "Q4_K")])
def test_measure_tiny_pipeline_in_gguf_form(form, block_type):
    """Matrices as their blocks' bytes (city96's unquantized layers in bf16, 1-D tensors fp32), and
    each layer's dequantized fp32 copy counted among the activations while it runs."""
    from comfyui_flux_schnell.flux.gguf_quants import GGML_TYPES

    request = GenerationRequest(prompt="a cat", width=64, height=48, steps=1)
    result = me.measure(form, request, _tiny_configs())
    block = GGML_TYPES[block_type]
    with torch.device(META):
        flux = Flux(TINY_FLUX)
    expected, largest = 0, 0
    for name, p in flux.named_parameters():
        if p.dim() == 1:
            expected += p.numel() * 4
        elif name.startswith(me.FLUX_UNQUANTIZED) or p.shape[-1] % block.block_size:
            expected += p.numel() * 2
        else:
            expected += block.nbytes(p.numel())
            largest = max(largest, p.numel() * 4)
    sampling = result.stages[1]
    assert sampling.weight_bytes == expected == result.model_bytes["transformer"]
    assert sampling.activation_peak >= largest  # a dequantized weight is live in fp32 for a moment
    assert any("uint8" in line or "float32" in line for line in sampling.peak_tensors)


def test_stream_blocks_rows_use_the_codes_resident_block_count():
    gib = me.GIB
    result = _stages()
    result.block_bytes = [gib // 5] * 50  # 10 GiB of blocks, 1 GiB of other layers
    reserve = local_memory.sampling_bytes(1024, 1024, True)
    peak, resident = me.simulate_stream_blocks(result, 12 * gib)
    budget = 12 * gib - me.CUDA_CONTEXT - reserve
    rest = result.model_bytes["transformer"] - sum(result.block_bytes)
    assert resident == local_models_count(rest, result.block_bytes, budget) < 50
    assert peak == rest + resident * (gib // 5) + 2 * (gib // 5) + gib // 4
    assert peak <= 12 * gib - me.CUDA_CONTEXT
    assert me.simulate_stream_blocks(result, 24 * gib) == (result.offload_peak, 50)  # all fit: no streaming


def local_models_count(rest, blocks, budget):
    from comfyui_flux_schnell.local.models import resident_block_count

    return resident_block_count(rest, blocks, budget)
