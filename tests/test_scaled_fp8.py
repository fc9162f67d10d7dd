"""ComfyUI's fp8 files with per-layer scales: the legacy `scaled_fp8` files and the per-layer
`comfy_quant` format (as tensors or as safetensors metadata), alone and in all-in-one checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from comfyui_flux_schnell.errors import ModelLoadError
from comfyui_flux_schnell.flux import loading, ops
from comfyui_flux_schnell.flux.model import Flux
from comfyui_flux_schnell.flux.t5 import T5Encoder
from safetensors.torch import save_file
from support import tiny_models as tm
from support.reference_networks import flux_inputs, reference, t5_ids
from support.tiny_scaled_fp8 import comfy_quant_bytes, scaled_fp8

FORMS = ("scaled_fp8", "comfy_quant", "metadata")
NETWORKS = {
    "transformer": (tm.transformer_weights, loading.load_transformer, Flux, tm.TINY_FLUX),
    "t5": (tm.t5_weights, loading.load_t5, T5Encoder, tm.TINY_T5),
}


def write(path, tensors, metadata=None):
    save_file({k: t.contiguous() for k, t in tensors.items()}, str(path), metadata=metadata or None)
    return path


def run(name, model):
    _, _, _, config = NETWORKS[name]
    return model(*flux_inputs(config)) if name == "transformer" else model(t5_ids(config))


def scaled_layers(model) -> list[str]:
    return [n for n, m in model.named_modules() if "weight_scale" in m._buffers]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name", list(NETWORKS))
def test_scaled_file_computes_weight_times_scale(tmp_path, name, form):
    weights_of, load, build, config = NETWORKS[name]
    tensors, metadata, ref = scaled_fp8(weights_of(), form=form)
    model = load(write(tmp_path / f"{name}_fp8_scaled.safetensors", tensors, metadata))
    layers = scaled_layers(model)
    assert len(layers) == sum(1 for k in tensors if k.endswith((".scale_weight", ".weight_scale")))
    for layer_name in layers:  # the weight stays fp8, its scale a one-number fp32 buffer
        layer = model.get_submodule(layer_name)
        assert layer.weight.dtype == torch.float8_e4m3fn
        assert layer.weight_scale.shape == ()
        assert layer.weight_scale.dtype == torch.float32
    assert torch.equal(run(name, model), run(name, reference(build, config, ref)))


def test_all_in_one_checkpoint_with_scaled_transformer_and_t5(tmp_path):
    flux, _, flux_ref = scaled_fp8(tm.transformer_weights(), prefix=tm.COMFY_PREFIXES["transformer"])
    t5, _, t5_ref = scaled_fp8(tm.t5_weights(), prefix=tm.COMFY_PREFIXES["t5"], seed=1)
    others = {
        tm.COMFY_PREFIXES[name] + k: w.to(torch.bfloat16)
        for name, weights in (("clip", tm.clip_weights()), ("ae", tm.autoencoder_weights()))
        for k, w in weights.items()
    }
    path = write(tmp_path / "flux1-schnell-fp8-scaled-aio.safetensors", {**flux, **t5, **others})
    loading.check_files_compatible(path, path, path, path)
    transformer, encoder = loading.load_transformer(path), loading.load_t5(path)
    assert torch.equal(
        run("transformer", transformer), run("transformer", reference(Flux, tm.TINY_FLUX, flux_ref))
    )
    assert torch.equal(run("t5", encoder), run("t5", reference(T5Encoder, tm.TINY_T5, t5_ref)))
    assert loading.load_clip(path).text_model.final_layer_norm.weight.dtype == torch.bfloat16


def test_a_wider_weight_dtype_folds_the_scales_in_at_load(tmp_path):
    tensors, metadata, ref = scaled_fp8(tm.t5_weights())
    path = write(tmp_path / "t5xxl_fp8_e4m3fn_scaled.safetensors", tensors, metadata)
    model = loading.load_t5(path, weight_dtype=torch.bfloat16)
    assert scaled_layers(model) == []
    q = model.encoder.block[0].layer[0].SelfAttention.q.weight
    assert q.dtype == torch.bfloat16
    assert torch.equal(q, ref["encoder.block.0.layer.0.SelfAttention.q.weight"].to(torch.bfloat16))
    fp8 = loading.load_t5(path, weight_dtype=torch.float8_e4m3fn)  # already fp8: kept with its scales
    assert len(scaled_layers(fp8)) == len(scaled_layers(loading.load_t5(path)))


def test_scaled_embedding_scales_the_rows_it_gathers():
    table = ops.Embedding(10, 4)
    table.weight = torch.nn.Parameter(torch.randn(10, 4).to(torch.float8_e4m3fn), requires_grad=False)
    table.register_buffer("weight_scale", torch.tensor(0.25))
    ids = torch.tensor([[1, 5]])
    assert torch.equal(table(ids, out_dtype=torch.float32), table.weight.float()[ids] * 0.25)


# --- what is refused ------------------------------------------------------------------------------


def refusal(tmp_path, tensors, metadata=None) -> str:
    path = write(tmp_path / "t5.safetensors", tensors, metadata)
    with pytest.raises(ModelLoadError) as caught:
        loading.load_t5(path)
    assert str(path) in str(caught.value)
    return str(caught.value)


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp8", "int8_tensorwise"])
def test_other_comfy_quant_formats_are_refused_by_name(tmp_path, fmt):
    tensors, _, _ = scaled_fp8(tm.t5_weights(), form="comfy_quant")
    tensors["encoder.block.0.layer.0.SelfAttention.q.comfy_quant"] = comfy_quant_bytes(fmt)
    message = refusal(tmp_path, tensors)
    assert f"ComfyUI's per-layer 'comfy_quant' format '{fmt}'" in message
    assert "encoder.block.0.layer.0.SelfAttention.q" in message
    tensors, metadata, _ = scaled_fp8(tm.t5_weights(), form="metadata")
    layers = json.loads(metadata["_quantization_metadata"])
    layers["layers"]["encoder.block.1.layer.1.DenseReluDense.wo"] = {"format": fmt}
    message = refusal(tmp_path, tensors, {"_quantization_metadata": json.dumps(layers)})
    assert (
        f"'comfy_quant' format '{fmt}' (1 layers, e.g. encoder.block.1.layer.1.DenseReluDense.wo)" in message
    )


def test_scales_that_are_not_one_number_per_layer_are_refused(tmp_path):
    tensors, _, _ = scaled_fp8(tm.t5_weights())
    tensors["encoder.block.0.layer.0.SelfAttention.k.scale_weight"] = torch.ones(32)  # per channel
    assert "SelfAttention.k.scale_weight has 32 values" in refusal(tmp_path, tensors)
    tensors, _, _ = scaled_fp8(tm.t5_weights(), form="comfy_quant")
    del tensors["encoder.block.1.layer.0.SelfAttention.v.weight_scale"]
    assert "encoder.block.1.layer.0.SelfAttention.v has no weight_scale" in refusal(tmp_path, tensors)
    tensors, _, _ = scaled_fp8(tm.t5_weights())
    tensors["encoder.final_layer_norm.scale_weight"] = torch.tensor(2.0)  # a norm has no scaled weight
    message = refusal(tmp_path, tensors)
    assert "fp8 scales for 1 tensors that are no Linear, Conv2d or Embedding weight" in message
    assert "encoder.final_layer_norm" in message
