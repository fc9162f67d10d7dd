"""Tests of flux/loading.py: every layout and dtype, config inference on the real key layouts,
zero-copy memory mapping, strict keys (missing, unexpected, wrong shape or dtype), refused variants
(FLUX.1 [dev], other autoencoders), `check_compatible` and `check_files_compatible`. Reading headers,
naming foreign files and finding the networks in a file (flux/checkpoint.py) are tested in
test_checkpoint.py.
"""

from __future__ import annotations

import errno
import sys
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from comfyui_flux_schnell.errors import InvalidInputError, ModelLoadError, OutOfMemoryError
from comfyui_flux_schnell.flux import loading, ops
from comfyui_flux_schnell.flux.autoencoder import AutoEncoderParams
from comfyui_flux_schnell.flux.clip import CLIPTextConfig, CLIPTextEncoder
from comfyui_flux_schnell.flux.model import Flux, FluxParams
from comfyui_flux_schnell.flux.t5 import T5Config
from safetensors.torch import load_file, save_file
from support import tiny_models as tm
from support.weight_file_cases import (
    LOADERS,
    load_error,
    real_layout,
    real_shapes,
    tiny_model_sets,
    write_real_all_in_one,
)

TINY_CONFIGS = {
    "transformer": tm.TINY_FLUX,
    "ae": tm.TINY_AE,
    "t5": tm.TINY_T5,
    "clip": tm.TINY_CLIP,
}
WRITERS = {
    "transformer": tm.transformer_weights,
    "ae": tm.autoencoder_weights,
    "t5": tm.t5_weights,
    "clip": tm.clip_weights,
}


def config_of(model):
    return getattr(model, "params", None) or model.config


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bits (works for fp8, where torch.equal is not implemented)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def narrow_keys(model) -> set[str]:
    """Keys of the weights the fp8 option narrows: matrices, kernels and vocabulary tables."""
    layers = (ops.Linear, ops.Conv2d, ops.TokenEmbedding)
    return {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, layers)}


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """dtype -> TinyModelFiles, written once per module."""
    return tiny_model_sets(tmp_path_factory)


# --- every accepted layout and dtype -------------------------------------------------------------


@pytest.mark.parametrize("dtype", tm.DTYPES, ids=tm.DTYPE_NAMES.get)
@pytest.mark.parametrize("component", LOADERS)
@pytest.mark.parametrize("all_in_one", [False, True], ids=["single", "all_in_one"])
def test_loads_every_layout_and_dtype_as_stored(sets, dtype, component, all_in_one):
    files = sets(dtype)
    path = files.all_in_one if all_in_one else getattr(files, component)
    prefix = tm.COMFY_PREFIXES[component] if all_in_one else ""

    model = LOADERS[component](path)

    stored = load_file(path)
    state = model.state_dict()
    assert {prefix + k for k in state} == {k for k in stored if k.startswith(prefix)}
    for key, value in state.items():
        assert same(value, stored[prefix + key]), key
    assert config_of(model) == TINY_CONFIGS[component]
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    if dtype == torch.float8_e4m3fn:  # fp8 stays fp8 in memory
        assert all(state[k].dtype == dtype for k in narrow_keys(model))


@pytest.mark.parametrize("component", LOADERS)
def test_fp8_weight_dtype_narrows_layer_weights_and_keeps_small_tensors(sets, component):
    path = getattr(sets(torch.float32), component)
    model = LOADERS[component](path, weight_dtype=torch.float8_e4m3fn)
    stored = load_file(path)
    narrow = narrow_keys(model)
    assert narrow
    for key, value in model.state_dict().items():
        if key in narrow:
            assert same(value, stored[key].to(torch.float8_e4m3fn)), key
        else:
            assert same(value, stored[key]), key


@pytest.mark.parametrize(
    ("component", "kept", "narrowed"),
    [
        (
            "t5",
            "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
            "shared.weight",
        ),
        (
            "clip",
            "text_model.embeddings.position_embedding.weight",
            "text_model.embeddings.token_embedding.weight",
        ),
    ],
)
def test_fp8_keeps_small_embedding_tables_and_narrows_vocabularies(sets, component, kept, narrowed):
    path = getattr(sets(torch.float32), component)
    state = LOADERS[component](path, weight_dtype=torch.float8_e4m3fn).state_dict()
    assert state[kept].dtype == torch.float32  # as stored: its fp8 error would reach every logit
    assert state[narrowed].dtype == torch.float8_e4m3fn


@pytest.mark.parametrize("weight_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_wider_weight_dtype_casts_every_tensor(sets, weight_dtype):
    path = sets(torch.float8_e4m3fn).all_in_one
    model = loading.load_clip(path, weight_dtype=weight_dtype)
    stored = load_file(path)
    for key, value in model.state_dict().items():
        assert same(value, stored[tm.COMFY_PREFIXES["clip"] + key].to(weight_dtype)), key


def test_fp8_cast_clamps_out_of_range_values(tmp_path):
    weights = tm.transformer_weights()
    weights["img_in.weight"][0, :3] = torch.tensor([1000.0, -1e6, 2.0])
    path = tm.save(tmp_path / "big.safetensors", weights)
    model = loading.load_transformer(path, weight_dtype=torch.float8_e4m3fn)
    assert model.img_in.weight[0, :3].float().tolist() == [448.0, -448.0, 2.0]


def test_loaded_tiny_set_runs(sets):
    files = sets(torch.bfloat16)
    flux = loading.load_transformer(files.all_in_one, weight_dtype=torch.float8_e4m3fn)
    img = torch.randn(1, 4, 64)
    out = flux(
        img,
        torch.zeros(1, 4, 3),
        torch.randn(1, 3, 64),
        torch.zeros(1, 3, 3),
        torch.ones(1),
        torch.randn(1, 64),
    )
    assert out.shape == (1, 4, 64)
    assert torch.isfinite(out).all()


# --- T5's tied embedding and CLIP's extra tensors ------------------------------------------------


def test_t5_with_tied_copy_loads_shared(tmp_path):
    weights = tm.add_hf_extras("t5", tm.t5_weights(), tied_copy=True)
    path = tm.save(tmp_path / "t5_tied.safetensors", weights)
    assert "encoder.embed_tokens.weight" in load_file(path)
    model = loading.load_t5(path)
    assert torch.equal(model.shared.weight, weights["shared.weight"])
    assert "encoder.embed_tokens.weight" not in model.state_dict()


def test_t5_with_only_the_tied_copy_uses_it(tmp_path):
    weights = tm.t5_weights()
    weights["encoder.embed_tokens.weight"] = weights.pop("shared.weight")
    path = tm.save(tmp_path / "t5_embed_tokens.safetensors", weights)
    model = loading.load_t5(path)
    assert torch.equal(model.shared.weight, weights["encoder.embed_tokens.weight"])
    assert model.config == tm.TINY_T5


def test_clip_extras_are_ignored(tmp_path):
    weights = tm.add_hf_extras("clip", tm.clip_weights(), clip_extras=True)
    path = tm.save(tmp_path / "clip_extras.safetensors", weights, torch.float16)
    assert load_file(path)["text_model.embeddings.position_ids"].dtype == torch.int64
    model = loading.load_clip(path)
    assert "text_projection.weight" not in model.state_dict()
    assert torch.equal(
        model.text_model.final_layer_norm.weight,
        weights["text_model.final_layer_norm.weight"].half(),
    )


# --- config inference on the real key layouts ----------------------------------------------------


def test_infer_schnell_config_from_real_layout():
    shapes, data = real_shapes("flux1_schnell")
    params = loading.infer_flux_params(shapes)
    assert params == FluxParams(**data["params"])
    assert params == FluxParams()
    assert params.guidance_embed is False


@pytest.mark.parametrize(("hidden", "mlp_hidden"), [(896, 1840), (3072, 12288), (1152, 2300)])
def test_inferred_mlp_width_rebuilds_the_files_shapes(hidden, mlp_hidden):
    """1840 / 896 * 896 is 1839.99...: the width must come back exact, not truncated."""
    params = FluxParams(hidden_size=hidden, num_heads=hidden // 128, mlp_ratio=mlp_hidden / hidden)
    params = replace(params, depth=1, depth_single_blocks=1)
    with torch.device("meta"):
        shapes = {k: list(t.shape) for k, t in Flux(params).state_dict().items()}
        rebuilt = Flux(loading.infer_flux_params(shapes))
    assert {k: list(t.shape) for k, t in rebuilt.state_dict().items()} == shapes
    assert shapes["single_blocks.0.linear1.weight"][0] == 3 * hidden + mlp_hidden


def test_infer_dev_config_from_real_layout():
    shapes, data = real_shapes("flux1_schnell")
    hidden = data["params"]["hidden_size"]
    dev_shapes = {
        "in_layer.weight": [hidden, 256],
        "in_layer.bias": [hidden],
        "out_layer.weight": [hidden, hidden],
        "out_layer.bias": [hidden],
    }
    assert sorted(f"guidance_in.{k}" for k in dev_shapes) == sorted(data["keys_only_in_flux_dev"])
    shapes.update({f"guidance_in.{k}": v for k, v in dev_shapes.items()})
    assert loading.infer_flux_params(shapes) == FluxParams(guidance_embed=True)


def test_infer_autoencoder_config_from_real_layout():
    shapes, data = real_shapes("ae")
    assert loading.infer_autoencoder_params(shapes) == AutoEncoderParams(**data["params"])
    assert loading.infer_autoencoder_params(shapes) == AutoEncoderParams()


@pytest.mark.parametrize("embedding", ["both", "shared_only", "embed_tokens_only"])
def test_infer_t5_xxl_config_from_real_layout(embedding):
    shapes, _ = real_shapes("t5xxl_hf")
    if embedding == "shared_only":
        del shapes["encoder.embed_tokens.weight"]
    elif embedding == "embed_tokens_only":
        del shapes["shared.weight"]
    assert loading.infer_t5_config(shapes) == T5Config()


def test_infer_clip_l_config_from_real_layout():
    shapes, _ = real_shapes("clip_l_hf")
    assert loading.infer_clip_config(shapes) == CLIPTextConfig()


@pytest.fixture(scope="module")
def real_all_in_one(tmp_path_factory) -> Path:
    """A header-only (sparse) ComfyUI checkpoint with the full-size layouts of all four networks."""
    return write_real_all_in_one(tmp_path_factory.mktemp("real") / "flux1-schnell-aio.safetensors")


def reduced(layout: dict, keep_blocks=("double_blocks.", "single_blocks.", "encoder.block.")):
    """`layout` without the numbered blocks 2 and above (real widths, fewer layers)."""
    out = {}
    for key, value in layout.items():
        rest = key.split("transformer.", 1)[-1].removeprefix("model.diffusion_model.")
        blocks = [p for p in keep_blocks if rest.startswith(p)]
        if blocks and int(rest[len(blocks[0]) :].split(".")[0]) >= 2:
            continue
        out[key] = value
    return out


@pytest.fixture(scope="module")
def real_width_all_in_one(tmp_path_factory) -> Path:
    """A header-only ComfyUI checkpoint of the real networks with 2 blocks per stack (1.9 GB nominal)."""
    layout = {
        **real_layout("flux1_schnell", "model.diffusion_model.", torch.float8_e4m3fn),
        **real_layout("ae", "vae.", torch.float32),
        **real_layout("t5xxl_hf", "text_encoders.t5xxl.transformer.", torch.float8_e4m3fn),
        **real_layout("clip_l_hf", "text_encoders.clip_l.transformer.", torch.float16),
    }
    return tm.write_header_only(tmp_path_factory.mktemp("real") / "reduced.safetensors", reduced(layout))


@pytest.mark.parametrize(
    ("component", "config"),
    [
        ("transformer", FluxParams(depth=2, depth_single_blocks=2)),
        ("ae", AutoEncoderParams()),
        ("t5", T5Config(num_layers=2)),
        ("clip", CLIPTextConfig()),
    ],
)
def test_load_real_width_networks_from_sparse_file(real_width_all_in_one, component, config):
    model = LOADERS[component](real_width_all_in_one)  # maps the file; reads no page of it
    assert config_of(model) == config
    if sys.platform.startswith("linux"):
        assert all_in_mapping(model, real_width_all_in_one)


# --- memory mapping ------------------------------------------------------------------------------


def mapped_ranges(path: Path) -> list[tuple[int, int]]:
    """Address ranges of this process that map `path` (Linux /proc/self/maps)."""
    ranges = []
    target = str(Path(path).resolve())
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == target:
            start, end = (int(x, 16) for x in fields[0].split("-"))
            ranges.append((start, end))
    return ranges


def all_in_mapping(model, path) -> bool:
    ranges = mapped_ranges(path)
    return bool(ranges) and all(
        any(start <= p.data_ptr() < end for start, end in ranges) for p in model.parameters()
    )


needs_proc = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")


@needs_proc
def test_parameters_are_the_memory_mapped_file_when_nothing_changes(sets):
    path = sets(torch.bfloat16).all_in_one
    model = loading.load_transformer(path)
    assert all_in_mapping(model, path)


def mapping_permissions(path: Path) -> set[str]:
    """The permissions ("r--s", "rw-p", ...) of this process's mappings of `path`."""
    target = str(Path(path).resolve())
    return {
        fields[1]
        for line in Path("/proc/self/maps").read_text().splitlines()
        if len(fields := line.split(maxsplit=5)) == 6 and fields[5] == target
    }


def run_each(models: dict) -> None:
    """One forward of each tiny network (inference, as the pipeline runs them)."""
    g = torch.Generator().manual_seed(4)
    with torch.inference_mode():
        models["transformer"](
            torch.randn(1, 4, 64, generator=g),
            torch.zeros(1, 4, 3),
            torch.randn(1, 3, 64, generator=g),
            torch.zeros(1, 3, 3),
            torch.ones(1),
            torch.randn(1, 64, generator=g),
        )
        models["t5"](torch.tensor([[5, 9, 1]]))
        models["clip"](torch.tensor([[3, 7, 2]]))
        models["ae"].decode(torch.randn(1, 16, 2, 2, generator=g))


@needs_proc
def test_mapping_is_read_only_and_running_never_writes_the_weights(sets):
    """A read-only mapping takes no commit charge; a write to it would crash, so none may happen."""
    path = sets(torch.float32).all_in_one
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's "buffer is not writable" warning stays inside
        models = {name: load(path) for name, load in LOADERS.items()}
    for model in models.values():
        assert all_in_mapping(model, path)
    assert mapping_permissions(path) == {"r--s"}  # read-only: no copy-on-write, no commit charge
    before = {(name, key): t.clone() for name, m in models.items() for key, t in m.state_dict().items()}
    run_each(models)
    for (name, key), value in before.items():
        assert torch.equal(models[name].state_dict()[key], value), (name, key)


@needs_proc
def test_cast_parameters_are_not_in_the_mapping(sets):
    path = sets(torch.bfloat16).transformer
    model = loading.load_transformer(path, weight_dtype=torch.float32)
    assert model.img_in.weight.dtype == torch.float32
    ranges = mapped_ranges(path)
    assert not any(start <= p.data_ptr() < end for p in model.parameters() for start, end in ranges)


# --- wrong files ---------------------------------------------------------------------------------


@pytest.mark.parametrize("all_in_one", [False, True])
def test_dev_transformer_is_refused_naming_schnell(tmp_path, all_in_one):
    path = tm.write_transformer(tmp_path / "flux1-dev.safetensors", dev=True)
    if all_in_one:
        dev = tm.transformer_weights(replace(tm.TINY_FLUX, guidance_embed=True))
        path = tm.write_all_in_one(tmp_path / "dev_aio.safetensors", {"transformer": dev})
    message = load_error(loading.load_transformer, path)
    assert "FLUX.1 [dev]" in message
    assert "guidance_in" in message
    assert "flux1-schnell.safetensors" in message


def test_stable_diffusion_vae_is_refused(tmp_path):
    sd_vae = replace(tm.TINY_AE, z_channels=4)
    path = tm.save(tmp_path / "sd_vae.safetensors", tm.autoencoder_weights(sd_vae))
    message = load_error(loading.load_autoencoder, path)
    assert "4 latent channels" in message
    assert "ae.safetensors" in message


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    weights = tm.transformer_weights()
    removed = [k for k in weights if k.startswith(("double_blocks.0.txt_", "single_blocks.0.linear2"))]
    assert len(removed) == 14
    for key in removed:
        del weights[key]
    weights["double_blocks.0.img_attn.extra.weight"] = torch.zeros(2, 2)
    path = tm.save(tmp_path / "holes.safetensors", weights)
    message = load_error(loading.load_transformer, path)
    assert "missing keys (14): double_blocks.0.txt_attn.norm.key_norm.scale" in message
    assert "... and 2 more" in message
    assert "unexpected keys (1): double_blocks.0.img_attn.extra.weight" in message


def test_missing_key_needed_for_inference_is_named(tmp_path):
    weights = tm.t5_weights()
    del weights["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
    message = load_error(loading.load_t5, tm.save(tmp_path / "t5.safetensors", weights))
    assert "'encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight'" in message
    assert "is missing" in message


def test_missing_keys_in_all_in_one_carry_the_prefix(tmp_path):
    weights = tm.clip_weights()
    del weights["text_model.final_layer_norm.bias"]
    path = tm.write_all_in_one(tmp_path / "aio.safetensors", {"clip": weights})
    message = load_error(loading.load_clip, path)
    assert "missing keys (1): text_encoders.clip_l.transformer.text_model.final_layer_norm.bias" in message


def test_shape_mismatch_names_key_expected_and_found(tmp_path):
    weights = tm.transformer_weights()
    weights["double_blocks.0.img_attn.proj.weight"] = torch.zeros(256, 128)
    message = load_error(loading.load_transformer, tm.save(tmp_path / "shape.safetensors", weights))
    assert (
        "shape mismatches (1): double_blocks.0.img_attn.proj.weight: expected (256, 256), found (256, 128)"
        in message
    )


def test_unsupported_dtype_is_named(tmp_path):
    weights = {k: v.half() for k, v in tm.clip_weights().items()}
    weights["text_model.final_layer_norm.weight"] = weights["text_model.final_layer_norm.weight"].double()
    path = tmp_path / "f64.safetensors"
    save_file(weights, str(path))
    message = load_error(loading.load_clip, path)
    assert "unsupported dtypes" in message
    assert "text_model.final_layer_norm.weight (F64)" in message


@pytest.mark.parametrize("weight_dtype", ["bf16", torch.int8, torch.float8_e5m2])
def test_bad_weight_dtype_is_refused(sets, weight_dtype):
    with pytest.raises(InvalidInputError, match="weight_dtype must be one of"):
        loading.load_clip(sets(torch.float32).clip, weight_dtype=weight_dtype)


def test_model_load_error_is_a_value_error():
    assert issubclass(ModelLoadError, ValueError)


# --- compatibility -------------------------------------------------------------------------------


def test_tiny_set_is_compatible():
    loading.check_compatible(tm.TINY_FLUX, t5=tm.TINY_T5, clip=tm.TINY_CLIP, autoencoder=tm.TINY_AE)
    loading.check_compatible(
        FluxParams(), t5=T5Config(), clip=CLIPTextConfig(), autoencoder=AutoEncoderParams()
    )


def test_wrong_clip_width_is_named():
    clip_g = CLIPTextConfig(hidden_size=1280, num_heads=20, intermediate_size=5120, num_layers=32)
    with pytest.raises(ModelLoadError, match=r"CLIP text encoder is 1280 wide.*clip_l\.safetensors"):
        loading.check_compatible(FluxParams(), clip=clip_g)


def test_mapping_refused_by_the_kernel_is_an_out_of_memory_error(sets, monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError(errno.ENOMEM, "Cannot allocate memory")

    monkeypatch.setattr(loading.mmap, "mmap", refuse)
    path = sets(torch.float32).clip
    with pytest.raises(OutOfMemoryError, match=r"could not be memory-mapped.*fp8"):
        loading.load_clip(path)
    loading.load_clip(path, weight_dtype=torch.bfloat16)  # cast loads read tensor by tensor


@pytest.fixture
def no_tensor_data(monkeypatch):
    """Fail the test if any tensor data is read or mapped (header-only checks)."""

    def refuse(*args, **kwargs):
        raise AssertionError("tensor data was read")

    monkeypatch.setattr(loading, "_read_tensors", refuse)
    monkeypatch.setattr(loading.mmap, "mmap", refuse)
    monkeypatch.setattr(loading, "_read_one", refuse)


@pytest.mark.parametrize("all_in_one", [False, True], ids=["single", "all_in_one"])
def test_check_files_compatible_accepts_matching_files(sets, no_tensor_data, all_in_one):
    files = sets(torch.float8_e4m3fn)
    paths = [files.all_in_one if all_in_one else getattr(files, c) for c in LOADERS]
    transformer, ae, t5, clip = paths  # LOADERS order
    loading.check_files_compatible(transformer, t5, clip, ae)


def test_check_files_compatible_reads_full_size_headers_only(real_all_in_one, no_tensor_data):
    loading.check_files_compatible(real_all_in_one, real_all_in_one, real_all_in_one, real_all_in_one)


def _meta_layout(build, config, dtype=torch.bfloat16) -> dict:
    with torch.device("meta"):
        model = build(config)
    return {k: (tuple(t.shape), dtype) for k, t in model.state_dict().items()}


@pytest.fixture(scope="module")
def clip_g(tmp_path_factory) -> Path:
    """A header-only CLIP-G text encoder (SDXL's: 1280 wide), 2 of its 32 layers."""
    config = CLIPTextConfig(hidden_size=1280, num_heads=20, intermediate_size=5120, num_layers=2)
    return tm.write_header_only(
        tmp_path_factory.mktemp("clip_g") / "clip_g.safetensors",
        _meta_layout(CLIPTextEncoder, config),
    )


def test_check_files_compatible_names_a_clip_g_file(real_all_in_one, clip_g, no_tensor_data):
    with pytest.raises(ModelLoadError) as caught:
        loading.check_files_compatible(real_all_in_one, real_all_in_one, clip_g, real_all_in_one)
    message = str(caught.value)
    assert f"the CLIP text encoder ({clip_g}) is 1280 wide" in message
    assert f"the transformer ({real_all_in_one}) takes a 768-wide pooled vector" in message
    assert "clip_l.safetensors" in message
    assert "T5" not in message
    assert "ae" not in message


@pytest.mark.parametrize(
    ("swap", "needles"),
    [
        (
            {"t5": replace(tm.TINY_T5, d_model=32)},
            ["the T5 text encoder ({t5}) is 32 wide", "takes 64-wide text", "t5xxl_fp16"],
        ),
        (
            {"clip": replace(tm.TINY_CLIP, hidden_size=128, num_heads=2)},
            ["the CLIP text encoder ({clip}) is 128 wide", "64-wide pooled vector"],
        ),
        (
            {"transformer": replace(tm.TINY_FLUX, in_channels=32, out_channels=32)},
            ["the autoencoder ({ae}) has 16 latent channels, 64 features", "takes 32"],
        ),
        (
            {
                "t5": replace(tm.TINY_T5, d_model=32),
                "clip": replace(tm.TINY_CLIP, hidden_size=128, num_heads=2),
            },
            ["({t5}) is 32 wide", "({clip}) is 128 wide"],
        ),
    ],
    ids=["t5", "clip", "ae", "t5_and_clip"],
)
def test_check_files_compatible_names_files_and_mismatch(sets, tmp_path, swap, needles):
    files = sets(torch.float32)
    paths = {c: getattr(files, c) for c in LOADERS}
    for component, config in swap.items():
        paths[component] = tmp_path / f"{component}.safetensors"
        save_file(tm.store(WRITERS[component](config), torch.float32), paths[component])
    with pytest.raises(ModelLoadError, match="do not belong together") as caught:
        loading.check_files_compatible(paths["transformer"], paths["t5"], paths["clip"], paths["ae"])
    message = str(caught.value)
    for needle in needles:
        assert needle.format(**paths) in message
    assert f"the transformer ({paths['transformer']})" in message


def test_check_files_compatible_names_a_file_of_the_wrong_kind(sets):
    files = sets(torch.float32)
    with pytest.raises(ModelLoadError, match=rf"{files.ae}.* as the CLIP-L text encoder"):
        loading.check_files_compatible(files.transformer, files.t5, files.ae, files.ae)
