"""GGUF files: decoding of every GGML type against the `gguf` package, the header reader, loading
city96's FLUX transformer and llama.cpp's T5 encoder layouts, and every refusal."""

# ruff: noqa: E402 (the imports below the gguf check need the gguf package)
from __future__ import annotations

import sys
from dataclasses import replace

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf", reason="the GGUF tests compare with the gguf package")
from comfyui_flux_schnell.errors import ModelLoadError
from comfyui_flux_schnell.flux import gguf_quants, loading, ops
from comfyui_flux_schnell.flux.checkpoint import inspect_file
from comfyui_flux_schnell.flux.gguf_file import read_gguf_header
from comfyui_flux_schnell.flux.model import Flux
from comfyui_flux_schnell.flux.t5 import T5Encoder
from comfyui_flux_schnell.local.models import Placed, module_bytes
from support import tiny_gguf as tg
from support import tiny_models as tm
from support.reference_networks import flux_inputs, reference, t5_ids

BLOCK_TYPES = [t for t in tg.GGUF_TYPES if t not in ("F32", "F16", "BF16")]
WIDE_T5 = replace(tm.TINY_T5, d_model=256, d_kv=128, d_ff=256)  # rows of whole 256-value blocks


# --- decoding -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", tg.GGUF_TYPES)
def test_every_type_decodes_like_the_gguf_package(name):
    rng = np.random.default_rng(1)
    rows, cols = 6, 2 * 256
    if name in tg.K_QUANTS:
        raw = tg.random_blocks(name, rows * cols // 256, rng, scale=0.05).reshape(rows, -1)
    else:
        raw = tg.encode(torch.from_numpy(rng.standard_normal((rows, cols), dtype=np.float32)), name, rng)
    expected = torch.from_numpy(np.asarray(gguf.quants.dequantize(raw, tg.qtype(name)), dtype=np.float32))
    ours = gguf_quants.dequantize(torch.from_numpy(np.ascontiguousarray(raw)), name)
    assert ours.dtype == torch.float32
    assert ours.shape == (rows, cols)
    assert torch.isfinite(ours).all()
    assert torch.equal(ours, expected)


# the types whose values are q * scale + minimum, and the bytes of the minimum in each block
MINIMUM_FIELD = {"Q4_1": (2, 4), "Q5_1": (2, 4), "Q2_K": (82, 84), "Q4_K": (2, 4), "Q5_K": (2, 4)}
UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


@pytest.mark.parametrize("dtype", list(UNIT_ROUNDOFF))
@pytest.mark.parametrize("name", tg.GGUF_TYPES)
def test_narrow_decoding_is_the_reference_rounded_or_within_two_roundings(name, dtype):
    """In bf16/fp16: bit-identical to the reference rounded to the dtype for the types without a
    minimum; within u * (|q * dl| + |value|) of the exact value for those with one."""
    rng = np.random.default_rng(2)
    rows, cols = 6, 2 * 256
    if name in tg.K_QUANTS:
        raw = tg.random_blocks(name, rows * cols // 256, rng, scale=0.05).reshape(rows, -1)
    else:
        raw = tg.encode(torch.from_numpy(rng.standard_normal((rows, cols), dtype=np.float32)), name, rng)
    raw = np.ascontiguousarray(raw)
    exact = torch.from_numpy(np.asarray(gguf.quants.dequantize(raw, tg.qtype(name)), dtype=np.float32))
    ours = gguf_quants.dequantize(torch.from_numpy(raw), name, dtype)
    assert ours.dtype == dtype
    if name not in MINIMUM_FIELD:
        assert torch.equal(ours, exact.to(dtype))
        return
    start, stop = MINIMUM_FIELD[name]
    no_minimum = raw.copy()
    no_minimum.reshape(-1, gguf_quants.GGML_TYPES[name].type_size)[:, start:stop] = 0
    scaled = torch.from_numpy(
        np.asarray(gguf.quants.dequantize(no_minimum, tg.qtype(name)), dtype=np.float32)
    )
    bound = UNIT_ROUNDOFF[dtype] * (scaled.abs() + exact.abs()) * 1.001 + 1e-30
    assert ((ours.float() - exact).abs() <= bound).all()
    assert not torch.equal(ours, exact.to(dtype))  # two roundings: not always the rounded reference


@pytest.mark.parametrize("name", BLOCK_TYPES)
def test_every_block_type_decodes_any_bytes_like_the_gguf_package(name):
    """Random bytes everywhere, scales included (NaN and inf among them): still the same values."""
    t = gguf_quants.GGML_TYPES[name]
    raw = np.random.default_rng(2).integers(0, 256, size=(3, 4 * t.type_size), dtype=np.uint8)
    with np.errstate(all="ignore"):
        expected = np.asarray(gguf.quants.dequantize(raw, tg.qtype(name)), dtype=np.float32)
    ours = gguf_quants.dequantize(torch.from_numpy(raw), name).numpy()
    assert np.array_equal(ours, expected, equal_nan=True)


def test_type_table_matches_the_gguf_package():
    for name, t in gguf_quants.GGML_TYPES.items():
        assert t.type_id == tg.qtype(name).value
        assert (t.block_size, t.type_size) == gguf.GGML_QUANT_SIZES[tg.qtype(name)]


# --- the header reader ----------------------------------------------------------------------------


def test_header_reader_agrees_with_the_gguf_package(tmp_path):
    weights = tm.transformer_weights()
    path = tmp_path / "flux.gguf"
    tg.write_flux_gguf(path, weights, "Q5_K", metadata={"general.name": "tiny", "comfy.test": [1, 2, 3]})
    ours = read_gguf_header(path, ModelLoadError)
    theirs = gguf.GGUFReader(path)
    assert ours.version == 3
    assert ours.metadata["general.architecture"] == "flux"
    assert ours.metadata["comfy.test"] == (1, 2, 3)
    assert [t.name for t in theirs.tensors] == list(ours.tensors)
    for t in theirs.tensors:
        mine = ours.tensors[t.name]
        assert mine.type_name == t.tensor_type.name
        assert mine.shape == tuple(reversed(t.shape.tolist())) == tuple(weights[t.name].shape)
        assert (mine.start, mine.end - mine.start) == (t.data_offset, t.n_bytes)


# --- loading: the transformer ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def flux_weights():
    return tm.transformer_weights()


@pytest.mark.parametrize("name", tg.GGUF_TYPES)
def test_flux_gguf_of_every_type_computes_its_decoded_weights(tmp_path, flux_weights, name):
    path = tmp_path / f"flux1-schnell-{name}.gguf"
    decoded = tg.write_flux_gguf(path, flux_weights, name)
    model = loading.load_transformer(path)
    quantized = {n for n, m in model.named_modules() if isinstance(m, ops.StoredWeight) and m.gguf_type}
    if name in BLOCK_TYPES:
        assert "double_blocks.0.img_attn.qkv" in quantized
        assert "img_in" not in quantized  # kept F16, as city96's files keep it
        layer = model.double_blocks[0].img_attn.qkv
        assert layer.weight.dtype == torch.uint8
        assert layer.gguf_shape == tuple(flux_weights["double_blocks.0.img_attn.qkv.weight"].shape)
    else:
        assert not quantized
    expected = reference(Flux, tm.TINY_FLUX, decoded)(*flux_inputs(tm.TINY_FLUX))
    assert torch.equal(model(*flux_inputs(tm.TINY_FLUX)), expected)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_quantized_weights_stay_bytes_mapped_from_the_file(tmp_path, flux_weights):
    from test_loading import all_in_mapping

    path = tmp_path / "flux1-schnell-Q4_K.gguf"
    tg.write_flux_gguf(path, flux_weights, "Q4_K")
    model = loading.load_transformer(path)
    assert all_in_mapping(model, path)  # no copy: the parameters are the file's pages
    size = path.stat().st_size
    assert 0.9 * size < module_bytes(model) <= size  # memory is the file's size, less its header


def test_placed_model_holds_the_bytes(tmp_path, flux_weights):
    path = tmp_path / "flux1-schnell-Q8_0.gguf"
    tg.write_flux_gguf(path, flux_weights, "Q8_0")
    placed = Placed("transformer", loading.load_transformer(path))
    layer = placed.module.double_blocks[0].img_mlp[0]
    assert placed.cpu_tensors["double_blocks.0.img_mlp.0.weight"].dtype == torch.uint8  # what moves
    assert placed.nbytes == module_bytes(placed.module) < path.stat().st_size
    assert layer.gguf_type == "Q8_0"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_memory_policy_moves_the_bytes_to_the_gpu_and_back(tmp_path, flux_weights):
    path = tmp_path / "flux1-schnell-Q4_K.gguf"
    decoded = tg.write_flux_gguf(path, flux_weights, "Q4_K")
    placed = Placed("transformer", loading.load_transformer(path))
    layer = placed.module.double_blocks[0].img_mlp[0]
    stored = layer.weight.data
    placed.to(torch.device("cuda"))
    assert layer.weight.device.type == "cuda"
    assert layer.weight.dtype == torch.uint8
    inputs = [t.cuda() for t in flux_inputs(tm.TINY_FLUX)]
    got = placed.module(*inputs).cpu()
    expected = reference(Flux, tm.TINY_FLUX, decoded)(*flux_inputs(tm.TINY_FLUX))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)  # TF32 aside, the same weights
    placed.home()
    assert layer.weight.data is stored
    on_gpu = loading.load_transformer(path, device="cuda")  # read tensor by tensor, bytes moved
    assert on_gpu.double_blocks[0].img_mlp[0].weight.dtype == torch.uint8
    torch.testing.assert_close(on_gpu(*inputs).cpu(), expected, rtol=1e-4, atol=1e-4)


def test_a_weight_dtype_keeps_blocks_as_they_are(tmp_path, flux_weights):
    path = tmp_path / "flux1-schnell-Q4_K.gguf"
    tg.write_flux_gguf(path, flux_weights, "Q4_K")
    model = loading.load_transformer(path, weight_dtype=torch.bfloat16)
    assert model.double_blocks[0].img_attn.qkv.weight.dtype == torch.uint8
    assert model.img_in.weight.dtype == torch.bfloat16  # an F16 tensor follows weight_dtype
    fp8 = loading.load_transformer(path, weight_dtype=torch.float8_e4m3fn)
    assert fp8.double_blocks[0].img_attn.qkv.weight.dtype == torch.uint8
    assert fp8.img_in.weight.dtype == torch.float8_e4m3fn


def test_prefixed_and_architecture_less_files_load(tmp_path, flux_weights):
    prefixed = {f"model.diffusion_model.{k}": w for k, w in flux_weights.items()}
    decoded = tg.write_gguf(tmp_path / "p.gguf", {k: (w, "Q8_0") for k, w in prefixed.items()}, "flux")
    model = loading.load_transformer(tmp_path / "p.gguf")
    expected = reference(
        Flux, tm.TINY_FLUX, {k.removeprefix("model.diffusion_model."): w for k, w in decoded.items()}
    )
    assert torch.equal(model(*flux_inputs(tm.TINY_FLUX)), expected(*flux_inputs(tm.TINY_FLUX)))
    tg.write_flux_gguf(tmp_path / "sdcpp.gguf", flux_weights, "Q8_0", arch=None)  # stable-diffusion.cpp
    assert inspect_file(tmp_path / "sdcpp.gguf").components["transformer"].prefix == ""


def test_original_shape_metadata_is_honoured(tmp_path, flux_weights):
    """ComfyUI-GGUF's converter may store a tensor as rows of 256 with its shape in the metadata."""
    key = "double_blocks.0.img_mlp.0.weight"  # (1024, 256)
    weights = dict(flux_weights)
    tensors = {k: (w, tg.flux_type(k, tuple(w.shape), "Q8_0")) for k, w in weights.items()}
    tensors[key] = (weights[key].reshape(-1, 512), "Q8_0")  # stored as (512, 512)
    decoded = tg.write_gguf(
        tmp_path / "r.gguf",
        tensors,
        "flux",
        metadata={f"comfy.gguf.orig_shape.{key}": list(weights[key].shape)},
    )
    decoded[key] = decoded[key].reshape(weights[key].shape)
    model = loading.load_transformer(tmp_path / "r.gguf")
    assert model.double_blocks[0].img_mlp[0].weight.shape == (512, 512 // 32 * 34)
    expected = reference(Flux, tm.TINY_FLUX, decoded)(*flux_inputs(tm.TINY_FLUX))
    assert torch.equal(model(*flux_inputs(tm.TINY_FLUX)), expected)


@pytest.mark.parametrize(
    ("rows", "cols"),
    [
        (slice(None), slice(None)),
        (slice(256, None), slice(None)),
        (slice(None), slice(256, 1280)),
        (slice(3, 9), slice(5, 40)),
    ],
    ids=["whole", "rows", "block columns", "unaligned"],
)
def test_compute_weight_decodes_the_rows_and_columns_asked_for(rows, cols):
    layer = ops.Linear(1280, 512)
    raw = tg.random_blocks("Q4_K", 512 * 5, np.random.default_rng(3), 0.1).reshape(512, -1)
    from comfyui_flux_schnell.flux.stored_layers import make_gguf_layer

    make_gguf_layer(layer, "Q4_K", (512, 1280), torch.from_numpy(raw))
    full = torch.from_numpy(np.asarray(gguf.quants.dequantize(raw, tg.qtype("Q4_K")), dtype=np.float32))
    got = ops.compute_weight(layer, torch.empty(0), rows, cols)
    assert torch.equal(got, full[rows, cols])


def test_quantized_embedding_decodes_only_the_rows_looked_up(monkeypatch):
    table = ops.Embedding(100, 64)
    raw = tg.encode(torch.randn(100, 64), "Q8_0", np.random.default_rng(4))
    from comfyui_flux_schnell.flux.stored_layers import make_gguf_layer

    make_gguf_layer(table, "Q8_0", (100, 64), torch.from_numpy(raw))
    seen = []
    original = gguf_quants.dequantize
    monkeypatch.setattr(ops, "dequantize", lambda raw, *a: seen.append(raw.shape) or original(raw, *a))
    ids = torch.tensor([[3, 7, 3]])
    got = table(ids, out_dtype=torch.float32)
    full = torch.from_numpy(np.asarray(gguf.quants.dequantize(raw, tg.qtype("Q8_0")), dtype=np.float32))
    assert torch.equal(got, full[ids])
    assert seen == [(1, 3, 68)]  # three rows of bytes, not the table


# --- loading: the T5 encoder ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "config"),
    [("Q8_0", tm.TINY_T5), ("Q5_1", tm.TINY_T5), ("F16", tm.TINY_T5), ("Q4_K", WIDE_T5), ("Q6_K", WIDE_T5)],
)
def test_t5_gguf_in_llama_cpp_names_computes_its_decoded_weights(tmp_path, name, config):
    weights = tm.t5_weights(config)
    path = tmp_path / f"t5-v1_1-xxl-encoder-{name}.gguf"
    decoded = tg.write_t5_gguf(path, weights, name)
    model = loading.load_t5(path)
    assert loading.infer_t5_config({k: tuple(w.shape) for k, w in weights.items()}) == model.config
    if name != "F16":
        assert model.shared.gguf_type == name  # the vocabulary table stays quantized too
        assert model.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.gguf_type is None
    expected = reference(T5Encoder, config, decoded)(t5_ids(config))
    assert torch.equal(model(t5_ids(config)), expected)


def test_whole_t5_gguf_loads_its_encoder(tmp_path):
    weights = tm.t5_weights()
    tensors = {tg.llama_t5_name(k): (w, tg.t5_type(k, tuple(w.shape), "Q8_0")) for k, w in weights.items()}
    tensors["dec.blk.0.attn_q.weight"] = (torch.randn(32, 64), "Q8_0")  # a decoder and an LM head
    tensors["output.weight"] = (torch.randn(100, 64), "Q8_0")
    decoded = tg.write_gguf(tmp_path / "t5.gguf", tensors, "t5")
    model = loading.load_t5(tmp_path / "t5.gguf")
    expected = reference(T5Encoder, tm.TINY_T5, {k: decoded[tg.llama_t5_name(k)] for k in weights})
    assert torch.equal(model(t5_ids(tm.TINY_T5)), expected(t5_ids(tm.TINY_T5)))


# --- what is refused ------------------------------------------------------------------------------


def error_of(loader, path) -> str:
    with pytest.raises(ModelLoadError) as caught:
        loader(path)
    assert str(path) in str(caught.value)
    return str(caught.value)


def test_another_architecture_is_refused_by_name(tmp_path):
    path = tmp_path / "llama-3-8b-Q4_K_M.gguf"
    tg.write_gguf(path, {"token_embd.weight": (torch.randn(64, 64), "Q8_0")}, "llama")
    message = error_of(loading.load_transformer, path)
    assert "architecture 'llama'" in message
    assert "not a FLUX.1 transformer or T5 encoder GGUF" in message
    tg.write_gguf(tmp_path / "sdxl.gguf", {"input_blocks.0.0.weight": (torch.randn(32, 64), "F16")}, "sdxl")
    assert "another image model (general.architecture 'sdxl')" in error_of(
        loading.load_t5, tmp_path / "sdxl.gguf"
    )
    tg.write_gguf(tmp_path / "none.gguf", {"a.weight": (torch.randn(32, 64), "F16")}, None)
    assert "without general.architecture" in error_of(loading.load_transformer, tmp_path / "none.gguf")


def test_flux_dev_gguf_is_refused(tmp_path):
    dev = tm.transformer_weights(replace(tm.TINY_FLUX, guidance_embed=True))
    tg.write_flux_gguf(tmp_path / "flux1-dev-Q4_K_S.gguf", dev, "Q4_K")
    assert "FLUX.1 [dev] transformer (it has guidance_in.* keys)" in error_of(
        loading.load_transformer, tmp_path / "flux1-dev-Q4_K_S.gguf"
    )


def test_swapped_gguf_files_are_named(tmp_path, flux_weights):
    tg.write_t5_gguf(tmp_path / "t5.gguf", tm.t5_weights(), "Q8_0")
    message = error_of(loading.load_transformer, tmp_path / "t5.gguf")
    assert "it holds a T5-XXL text encoder" in message
    tg.write_flux_gguf(tmp_path / "flux.gguf", flux_weights, "Q8_0")
    assert "it holds a FLUX.1 [schnell] transformer" in error_of(loading.load_t5, tmp_path / "flux.gguf")


@pytest.mark.parametrize(
    ("cut", "needle"),
    [
        ({"keep_fraction": 0.7}, "truncated: tensor"),
        ({"keep_bytes": 100}, "truncated or corrupt: its GGUF header lists 48 tensors"),
        ({"keep_bytes": 1500}, "truncated: its GGUF header runs past the end"),
    ],
    ids=["data", "header", "tensor table"],
)
def test_truncated_gguf_is_refused(tmp_path, flux_weights, cut, needle):
    whole = tmp_path / "whole.gguf"
    tg.write_flux_gguf(whole, flux_weights, "Q4_K")
    message = error_of(loading.load_transformer, tm.write_truncated(whole, tmp_path / "cut.gguf", **cut))
    assert needle in message
    assert "download it again" in message


def test_unsupported_quantization_is_refused_by_name(tmp_path):
    path = tmp_path / "flux1-schnell-IQ4_XS.gguf"
    writer = gguf.GGUFWriter(str(path), "flux")
    raw = np.zeros((4, 136), dtype=np.uint8)  # IQ4_XS: 136 bytes per 256 values
    writer.add_tensor("double_blocks.0.img_attn.qkv.weight", raw, raw_dtype=tg.qtype("IQ4_XS"))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    message = error_of(loading.load_transformer, path)
    assert "stored as GGML type IQ4_XS, which this loader does not decode" in message
    assert "Q4_K" in message  # names the types it does read


def test_header_only_check_reads_gguf_files(tmp_path, flux_weights):
    files = tm.write_tiny_models(tmp_path)
    tg.write_flux_gguf(tmp_path / "flux.gguf", flux_weights, "Q4_K")
    tg.write_t5_gguf(tmp_path / "t5.gguf", tm.t5_weights(), "Q8_0")
    loading.check_files_compatible(tmp_path / "flux.gguf", tmp_path / "t5.gguf", files.clip, files.ae)
    tg.write_t5_gguf(tmp_path / "wide_t5.gguf", tm.t5_weights(WIDE_T5), "Q4_K")
    with pytest.raises(ModelLoadError) as caught:
        loading.check_files_compatible(
            tmp_path / "flux.gguf", tmp_path / "wide_t5.gguf", files.clip, files.ae
        )
    assert f"the T5 text encoder ({tmp_path / 'wide_t5.gguf'}) is 256 wide" in str(caught.value)
