"""LoRAs on the FLUX networks (flux/lora.py, flux/lora_keys.py, flux/lora_adapter.py).

- parity with diffusers' own LoRA loading (`FluxPipeline.load_lora_weights` + `fuse_lora`, with PEFT)
  on the same tiny weights, for kohya files (transformer + CLIP-L) and diffusers / PEFT files (split
  q/k/v, proj_mlp, norm_out's swapped halves, alphas from `.alpha` keys or from diffusers' metadata):
  the fused weights equal ours merged, and our run-time updates give diffusers' fused outputs;
- BFL / ComfyUI names and T5 keys against a plain merge `W + strength * alpha / r * up @ down`;
- stacking, negative strength, strength 0, removal; fp8, scaled fp8 and GGUF (Q8_0, Q4_K) bases:
  the result is that of the dequantized weights plus the update (never rounded into the storage);
- every refusal: a LoRA for another model, keys that match no layer, shapes that do not fit, other
  adapter kinds, a full model or a non-safetensors file given as a LoRA.

diffusers' kohya converter leaves out what it does not load right, which is tested against a plain
merge instead: it drops the layers outside the blocks (img_in, txt_in, time_in, vector_in and the
final layer lose their `transformer.` prefix and are not loaded; ComfyUI and we apply them, with
their alphas), and it hard-codes FLUX.1's full widths for single blocks' `linear1`.
"""

from __future__ import annotations

import pytest
import torch
from comfyui_flux_schnell.errors import ModelLoadError
from comfyui_flux_schnell.flux import lora as flux_lora
from comfyui_flux_schnell.flux.clip import CLIPTextEncoder
from comfyui_flux_schnell.flux.model import Flux
from comfyui_flux_schnell.flux.t5 import T5Encoder
from support.diffusers_flux_convert import bfl_to_diffusers, diffusers_config
from support.tiny_loras import (
    bfl_tensors,
    kohya_tensors,
    linear_shapes,
    merged,
    peft_tensors,
    random_lora,
    save_lora,
    write_sdxl_lora,
)
from support.tiny_models import (
    TINY_CLIP,
    TINY_FLUX,
    TINY_T5,
    clip_weights,
    t5_weights,
    transformer_weights,
)

TOL = 2e-5  # fp32: merged weights and outputs agree to rounding


# --- models ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base():
    """fp32 weights of the tiny transformer, CLIP-L and T5 (BFL / Hugging Face layouts)."""
    return {"transformer": transformer_weights(), "clip": clip_weights(), "t5": t5_weights()}


def build(weights: dict) -> dict[str, torch.nn.Module]:
    classes = {
        "transformer": lambda: Flux(TINY_FLUX),
        "clip": lambda: CLIPTextEncoder(TINY_CLIP),
        "t5": lambda: T5Encoder(TINY_T5),
    }
    out = {}
    for name, sd in weights.items():
        model = classes[name]()
        model.load_state_dict(sd, strict=True)
        out[name] = model.eval().requires_grad_(False)
    return out


def merged_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights with every attached LoRA merged in (what fuse_lora would give)."""
    sd = {k: v.float().clone() for k, v in model.state_dict().items()}
    for name, layer in model.named_modules():
        if getattr(layer, "lora", None) is not None:
            sd[f"{name}.weight"] += layer.lora.delta_weight()
    return sd


def flux_inputs(seed: int = 1, tokens: int = 12, text: int = 5) -> dict:
    g = torch.Generator().manual_seed(seed)
    p = TINY_FLUX
    side = int(tokens**0.5)
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(tokens // side), indexing="ij")
    img_ids = torch.stack((torch.zeros_like(rows), rows, cols), -1).view(1, -1, 3).float()
    return dict(
        img=torch.randn(1, img_ids.shape[1], p.in_channels, generator=g),
        txt=torch.randn(1, text, p.context_in_dim, generator=g),
        y=torch.randn(1, p.vec_in_dim, generator=g),
        timesteps=torch.tensor([0.6]),
        img_ids=img_ids,
        txt_ids=torch.zeros(1, text, 3),
    )


def run_ours(flux: Flux, x: dict) -> torch.Tensor:
    with torch.no_grad():
        return flux(**x)


def run_diffusers(model, x: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(
            hidden_states=x["img"],
            encoder_hidden_states=x["txt"],
            pooled_projections=x["y"],
            timestep=x["timesteps"],
            img_ids=x["img_ids"][0],
            txt_ids=x["txt_ids"][0],
            return_dict=False,
        )[0]


def clip_ids(seed: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, TINY_CLIP.vocab_size - 2, (1, 9), generator=g)
    ids[0, 6] = TINY_CLIP.vocab_size - 1  # end of text: pooled here
    return ids


def max_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


# --- diffusers' reference ---------------------------------------------------------------------------


def diffusers_pipeline(base: dict):
    """diffusers' FluxPipeline holding only the tiny transformer and CLIP-L (enough to load LoRAs)."""
    pytest.importorskip("peft")
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from support.transformers_reference import hf_clip_config
    from transformers import CLIPTextModel

    transformer = FluxTransformer2DModel(**diffusers_config(TINY_FLUX))
    transformer.load_state_dict(bfl_to_diffusers(base["transformer"]), strict=True)
    clip = CLIPTextModel(hf_clip_config(TINY_CLIP))
    clip.load_state_dict(hf_clip_layout(base["clip"], clip), strict=True)
    return FluxPipeline(
        scheduler=None,
        vae=None,
        text_encoder=clip.eval(),
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=transformer.eval(),
    )


def hf_clip_layout(sd: dict, hf_model) -> dict:
    """Our CLIP state dict in the key layout of this transformers version (>= 5 drops `text_model.`)."""
    own = set(hf_model.state_dict())
    return {
        k if k in own else k.removeprefix("text_model."): v for k, v in sd.items() if "position_ids" not in k
    }


def diffusers_fused(base: dict, path, strength: float):
    """The transformer and CLIP weights diffusers gets from `path` fused at `strength`, and the model."""
    pipe = diffusers_pipeline(base)
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora(components=["transformer", "text_encoder"], lora_scale=strength)
    pipe.unload_lora_weights()  # keeps the fused weights, removes the PEFT layers
    return pipe.transformer.state_dict(), pipe.text_encoder.state_dict(), pipe


def check_against_diffusers(base: dict, path, strength: float) -> None:
    theirs_t, theirs_c, pipe = diffusers_fused(base, path, strength)
    nets = build({"transformer": base["transformer"], "clip": base["clip"]})
    flux_lora.apply_loras(nets, [(flux_lora.read_lora(path), strength)])

    ours_t = bfl_to_diffusers(merged_state(nets["transformer"]))
    ours_c = hf_clip_layout(merged_state(nets["clip"]), pipe.text_encoder)
    base_t = bfl_to_diffusers(base["transformer"])
    changed = [k for k in theirs_t if not torch.equal(theirs_t[k], base_t[k])]
    assert len(changed) > 10, "the LoRA changed (almost) nothing in diffusers: the test would prove nothing"
    assert max_diff(ours_t, theirs_t) < TOL
    assert max_diff(ours_c, {k: theirs_c[k] for k in ours_c}) < TOL

    x = flux_inputs()  # our run-time updates give what diffusers' fused weights give
    ours_out = run_ours(nets["transformer"], x)
    theirs_out = run_diffusers(pipe.transformer, x)
    plain_out = run_ours(build({"transformer": base["transformer"]})["transformer"], x)
    assert (ours_out - theirs_out).abs().max().item() < 1e-4
    assert (ours_out - plain_out).abs().max().item() > 1e-2  # and the LoRA does change the output
    with torch.no_grad():
        pooled = nets["clip"](clip_ids())[1]
        pooled_theirs = pipe.text_encoder(input_ids=clip_ids()).pooler_output
    assert (pooled - pooled_theirs).abs().max().item() < 1e-4


# --- parity ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("strength", [0.7, -0.6])
def test_kohya_lora_matches_diffusers(tmp_path, base, strength):
    shapes = linear_shapes(Flux(TINY_FLUX), skip=("linear1",))
    blocks = {k: v for k, v in shapes.items() if k.startswith(("double_blocks.", "single_blocks."))}
    transformer = random_lora(blocks, rank=4, seed=1, alpha=8.0)  # scale 2
    clip = random_lora(linear_shapes(CLIPTextEncoder(TINY_CLIP)), rank=4, seed=3, alpha=2.0)
    path = save_lora(tmp_path / "kohya.safetensors", kohya_tensors(transformer, clip), dtype=torch.bfloat16)
    check_against_diffusers(base, path, strength)


def diffusers_layer_names():
    from diffusers import FluxTransformer2DModel
    from support.transformers_reference import hf_clip_config
    from transformers import CLIPTextModel

    transformer = linear_shapes(FluxTransformer2DModel(**diffusers_config(TINY_FLUX)))
    clip = {
        k if k.startswith("text_model.") else f"text_model.{k}": v
        for k, v in linear_shapes(CLIPTextModel(hf_clip_config(TINY_CLIP))).items()
    }
    return transformer, clip


@pytest.mark.parametrize("alphas", ["none", "alpha keys", "metadata", "rslora metadata"])
def test_peft_lora_matches_diffusers(tmp_path, base, alphas):
    pytest.importorskip("peft")
    transformer_shapes, clip_shapes = diffusers_layer_names()
    assert {
        "single_transformer_blocks.0.proj_mlp",
        "norm_out.linear",
        "transformer_blocks.0.attn.add_k_proj",
    } < set(transformer_shapes)
    alpha = 6.0 if alphas == "alpha keys" else None
    transformer = random_lora(transformer_shapes, rank=4, seed=4, alpha=alpha)
    clip = random_lora(clip_shapes, rank=2, seed=5, alpha=alpha)
    metadata = None
    if alphas.endswith("metadata"):  # as diffusers' save_lora_weights writes a LoraConfig
        metadata = {
            "lora_adapter_metadata": {
                "transformer.r": 4,
                "transformer.lora_alpha": 8,
                "transformer.alpha_pattern": {"proj_mlp": 2, "norm_out.linear": 12},
                "transformer.target_modules": sorted(transformer_shapes),
                "text_encoder.r": 2,
                "text_encoder.lora_alpha": 1,
                "text_encoder.target_modules": sorted(k.removeprefix("text_model.") for k in clip_shapes),
            }
        }
        if alphas == "rslora metadata":  # scale alpha / sqrt(r)
            metadata["lora_adapter_metadata"]["transformer.use_rslora"] = True
    path = save_lora(tmp_path / "peft.safetensors", peft_tensors(transformer, clip), metadata)
    check_against_diffusers(base, path, 0.8)


# --- plain merges ----------------------------------------------------------------------------------


def flux_shapes(**kw) -> dict[str, tuple[int, int]]:
    return linear_shapes(Flux(TINY_FLUX), **kw)


def check_plain_merge(base: dict, nets: dict, expected: dict) -> None:
    """Our merged weights equal `expected` and the run-time outputs equal those of merged models."""
    reference = build(expected)
    for name, model in nets.items():
        assert max_diff(merged_state(model), {k: v.float() for k, v in expected[name].items()}) < TOL
    if "transformer" in nets:
        x = flux_inputs()
        out, want = run_ours(nets["transformer"], x), run_ours(reference["transformer"], x)
        assert (out - want).abs().max().item() < 1e-4
        assert (
            out - run_ours(build({"transformer": base["transformer"]})["transformer"], x)
        ).abs().max() > 1e-2
    if "t5" in nets:
        ids = torch.randint(0, TINY_T5.vocab_size, (1, 7), generator=torch.Generator().manual_seed(4))
        with torch.no_grad():
            assert (nets["t5"](ids) - reference["t5"](ids)).abs().max().item() < 1e-4


@pytest.mark.parametrize(
    ("prefix", "style", "alpha"),
    [("diffusion_model.", "lora_A", None), ("diffusion_model.", "lora_down", 2.0), ("", "lora_A", 16.0)],
)
def test_bfl_names_equal_a_plain_merge(tmp_path, base, prefix, style, alpha):
    layers = random_lora(flux_shapes(), rank=4, seed=6, alpha=alpha)
    path = save_lora(tmp_path / "bfl.safetensors", bfl_tensors(layers, prefix, style))
    nets = build({"transformer": base["transformer"]})
    assert flux_lora.apply_loras(nets, [(flux_lora.read_lora(path), 0.9)]) == len(layers)
    check_plain_merge(base, nets, {"transformer": merged(base["transformer"], layers, 0.9)})


@pytest.mark.parametrize("t5_prefix", ["lora_te3_", "lora_te2_"])  # kohya, OneTrainer
def test_kohya_outside_blocks_linear1_and_t5_equal_a_plain_merge(tmp_path, base, t5_prefix):
    shapes = flux_shapes()
    outside = {k: v for k, v in shapes.items() if not k.startswith(("double_blocks.", "single_blocks."))}
    outside |= {k: v for k, v in shapes.items() if k.endswith("linear1")}
    assert {"img_in", "final_layer.adaLN_modulation.1", "single_blocks.0.linear1"} <= set(outside)
    transformer = random_lora(outside, rank=3, seed=7, alpha=1.5)
    t5 = random_lora(linear_shapes(T5Encoder(TINY_T5)), rank=2, seed=8, alpha=4.0)
    path = save_lora(tmp_path / "k.safetensors", kohya_tensors(transformer, t5=t5, t5_prefix=t5_prefix))
    nets = build({"transformer": base["transformer"], "t5": base["t5"]})
    flux_lora.apply_loras(nets, [(flux_lora.read_lora(path), -1.3)])
    expected = {
        "transformer": merged(base["transformer"], transformer, -1.3),
        "t5": merged(base["t5"], t5, -1.3),
    }
    check_plain_merge(base, nets, expected)


def test_loras_stack_and_strength_zero_or_removal_restores_the_base(tmp_path, base):
    shapes = flux_shapes()
    one = random_lora(shapes, rank=4, seed=9, alpha=2.0)
    two = random_lora({k: v for k, v in shapes.items() if "double_blocks" in k}, rank=8, seed=10)
    path_one = save_lora(tmp_path / "one.safetensors", kohya_tensors(one))
    path_two = save_lora(tmp_path / "two.safetensors", bfl_tensors(two))
    lora_one, lora_two = flux_lora.read_lora(path_one), flux_lora.read_lora(path_two)
    nets = build({"transformer": base["transformer"]})
    flux_lora.apply_loras(nets, [(lora_one, 0.5), (lora_two, -1.0)])
    expected = merged(merged(base["transformer"], one, 0.5), two, -1.0)
    check_plain_merge(base, nets, {"transformer": expected})

    x = flux_inputs()
    plain = run_ours(build({"transformer": base["transformer"]})["transformer"], x)
    flux_lora.apply_loras(nets, [(lora_one, 0.0)])
    assert torch.equal(run_ours(nets["transformer"], x), plain)  # strength 0: exactly the base
    flux_lora.apply_loras(nets, [(lora_one, 1.0)])
    flux_lora.remove_loras(nets)
    assert not list(flux_lora.adapters(nets["transformer"]))
    assert torch.equal(run_ours(nets["transformer"], x), plain)


def computed_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's fp32 weights as its layers compute with them, whatever the storage: every Linear's
    weight is read back through the layer (`layer(I) - layer(0)`, LoRA updates included)."""
    from comfyui_flux_schnell.flux.ops import Linear

    out = {k: v.float() for k, v in model.named_parameters() if v.is_floating_point()}  # no scale buffers
    with torch.no_grad():
        for name, layer in model.named_modules():
            if isinstance(layer, Linear):
                eye, zero = torch.eye(layer.in_features), torch.zeros(1, layer.in_features)
                out[f"{name}.weight"] = (layer(eye) - layer(zero)).T.contiguous()  # (out, in)
    return out


def write_fp8_base(stem, weights):
    from support.tiny_models import save

    return save(stem.with_suffix(".safetensors"), weights, torch.float8_e4m3fn)


def write_scaled_fp8_base(stem, weights):
    from safetensors.torch import save_file
    from support.tiny_scaled_fp8 import scaled_fp8

    tensors, metadata, _reference = scaled_fp8(weights)
    path = stem.with_suffix(".safetensors")
    save_file(tensors, str(path), metadata=metadata or None)
    return path


def gguf_base(quant: str):
    def write(stem, weights):
        from support.tiny_gguf import write_flux_gguf

        path = stem.with_suffix(".gguf")
        write_flux_gguf(path, weights, quant)
        return path

    return write


# Quantized bases a LoRA must not be rounded into: name -> writer(path stem, weights) of the tiny
# transformer's weights in that storage; `computed_weights` reads any storage back through the layers.
QUANTIZED_BASES = {
    "fp8": write_fp8_base,
    "scaled fp8": write_scaled_fp8_base,
    "GGUF Q8_0": gguf_base("Q8_0"),
    "GGUF Q4_K": gguf_base("Q4_K"),
}


@pytest.mark.parametrize("storage", sorted(QUANTIZED_BASES))
def test_lora_on_a_quantized_base_equals_merging_into_the_dequantized_weights(tmp_path, base, storage):
    from comfyui_flux_schnell.flux.loading import load_transformer

    stem = tmp_path / f"flux-{storage.replace(' ', '_')}"
    model = load_transformer(QUANTIZED_BASES[storage](stem, base["transformer"]))
    stored = {k: v.clone() for k, v in model.state_dict().items()}
    dequantized = computed_weights(model)
    assert max_diff(dequantized, {k: v.float() for k, v in base["transformer"].items()}) > 1e-4  # lossy
    layers = random_lora(flux_shapes(), rank=4, seed=11, alpha=3.0)
    path = save_lora(tmp_path / "l.safetensors", kohya_tensors(layers))
    flux_lora.apply_loras({"transformer": model}, [(flux_lora.read_lora(path), 1.2)])

    expected = merged(dequantized, layers, 1.2)
    assert max_diff(computed_weights(model), expected) < TOL
    x = flux_inputs()
    assert (
        run_ours(model, x) - run_ours(build({"transformer": expected})["transformer"], x)
    ).abs().max() < 1e-4
    assert all(torch.equal(v, stored[k]) for k, v in model.state_dict().items())  # stored weights untouched
    if storage == "fp8":  # merging into fp8, as ComfyUI does, would round the update: not a small change
        rounded = {k: v.to(torch.float8_e4m3fn).float() if v.ndim == 2 else v for k, v in expected.items()}
        assert max_diff(rounded, expected) > 1e-3


# --- the run-time update ---------------------------------------------------------------------------


@pytest.mark.parametrize(("rows", "cols"), [(None, None), (slice(0, 12), None), (slice(8, 30), slice(3, 17))])
def test_adapter_adds_exactly_its_dense_update_to_any_part_of_a_layer(rows, cols):
    from comfyui_flux_schnell.flux.lora_adapter import LowRankAdapter, LowRankPiece

    g = torch.Generator().manual_seed(5)
    out_features, in_features = 30, 20
    pieces = [  # a whole-layer LoRA, split q/k/v-like ranges, and one overlapping another
        LowRankPiece(0, 30, torch.randn(3, in_features, generator=g), torch.randn(30, 3, generator=g)),
        LowRankPiece(0, 10, torch.randn(2, in_features, generator=g), torch.randn(10, 2, generator=g)),
        LowRankPiece(10, 20, torch.randn(4, in_features, generator=g), torch.randn(10, 4, generator=g)),
        LowRankPiece(20, 30, torch.randn(1, in_features, generator=g), torch.randn(10, 1, generator=g)),
        LowRankPiece(5, 25, torch.randn(2, in_features, generator=g), torch.randn(20, 2, generator=g)),
    ]
    adapter = LowRankAdapter(out_features, pieces, torch.float32)
    assert adapter.rank == 12
    dense = torch.zeros(out_features, in_features)
    for p in pieces:
        dense[p.start : p.stop] += p.up @ p.down
    assert torch.allclose(adapter.delta_weight(), dense, atol=1e-5)

    r, c = rows or slice(None), cols or slice(None)
    x = torch.randn(2, 7, dense[:, c].shape[1], generator=g)  # (B, L, in part)
    base = torch.randn(2, 7, dense[r].shape[0], generator=g)  # the layer's own output part
    got = adapter.add_to(base.clone(), x, rows, cols)
    assert torch.allclose(got, base + x @ dense[r, c].T, atol=1e-5)


# --- refusals --------------------------------------------------------------------------------------


def small_kohya(seed: int = 12) -> dict[str, torch.Tensor]:
    shapes = {k: v for k, v in flux_shapes().items() if k.startswith("double_blocks.0.img_")}
    return kohya_tensors(random_lora(shapes, rank=2, seed=seed, alpha=1.0))


def refusal(path, networks=("transformer", "clip", "t5")) -> str:
    nets = build(
        {
            name: w
            for name, w in {
                "transformer": transformer_weights(),
                "clip": clip_weights(),
                "t5": t5_weights(),
            }.items()
            if name in networks
        }
    )
    with pytest.raises(ModelLoadError) as caught:
        flux_lora.apply_loras(nets, [(flux_lora.read_lora(path), 1.0)])
    message = str(caught.value)
    assert str(path) in message
    return message


def test_a_lora_for_another_model_is_refused_saying_what_it_looks_like(tmp_path):
    message = refusal(write_sdxl_lora(tmp_path / "sdxl_style.safetensors"))
    assert "3 of its 4 layers are no layer of FLUX.1's" in message
    assert "Stable Diffusion XL" in message
    assert "sdxl_base_v1-0" in message  # kohya's metadata
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in message


def test_keys_that_match_no_layer_fail_naming_how_many_and_which(tmp_path):
    tensors = small_kohya()
    extra = {"lora_unet_double_blocks_7_img_attn_qkv", "lora_unet_single_blocks_3_linear2"}
    for name in extra:
        tensors[f"{name}.lora_down.weight"] = torch.zeros(2, 256)
        tensors[f"{name}.lora_up.weight"] = torch.zeros(256, 2)
    message = refusal(save_lora(tmp_path / "deeper.safetensors", tensors))
    assert "2 of its 7 layers match no layer" in message
    assert "apply only in part" in message
    assert all(name in message for name in extra)


def test_a_dev_lora_on_the_guidance_layers_is_named(tmp_path):
    tensors = small_kohya()
    tensors["lora_unet_guidance_in_in_layer.lora_down.weight"] = torch.zeros(2, 256)
    tensors["lora_unet_guidance_in_in_layer.lora_up.weight"] = torch.zeros(256, 2)
    message = refusal(save_lora(tmp_path / "dev.safetensors", tensors))
    assert "lora_unet_guidance_in_in_layer" in message
    assert "FLUX.1 [dev]" in message


def test_shapes_that_do_not_fit_fail_naming_how_many_and_which(tmp_path):
    tensors = small_kohya()
    tensors["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"] = torch.zeros(2, 3072)
    tensors["lora_unet_double_blocks_0_img_mlp_2.lora_up.weight"] = torch.zeros(3072, 2)
    message = refusal(save_lora(tmp_path / "wide.safetensors", tensors))
    assert "2 of its 5 layers do not fit" in message
    assert "lora_unet_double_blocks_0_img_attn_qkv: up (768, 2), down (2, 3072)" in message
    assert "lora_unet_double_blocks_0_img_mlp_2" in message
    assert "down (r, 256)" in message


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({"lora_unet_double_blocks_0_img_attn_qkv.dora_scale": torch.ones(1, 256)}, "DoRA"),
        ({"lora_unet_double_blocks_0_img_attn_proj.lokr_w1": torch.ones(4, 4)}, "LoKr"),
        ({"lora_unet_double_blocks_0_img_attn_proj.hada_w1_a": torch.ones(4, 4)}, "LoHa"),
        ({"lora_unet_double_blocks_0_txt_attn_proj.lora_up.weight": torch.ones(256, 2)}, "has no down"),
        ({"emb_params": torch.ones(2, 64)}, "not LoRA tensors"),
        ({"double_blocks.0.processor.qkv_lora1.down.weight": torch.ones(4, 256)}, "XLabs"),
        ({"lora_unet_double_blocks_0_img_attn_qkv.alpha": torch.ones(2)}, "should be one number"),
    ],
)
def test_other_adapter_kinds_and_broken_loras_are_refused(tmp_path, extra, expected):
    path = save_lora(tmp_path / "odd.safetensors", small_kohya() | extra)
    with pytest.raises(ModelLoadError, match=expected) as caught:
        flux_lora.read_lora(path)
    assert str(path) in str(caught.value)


def test_a_full_model_or_another_format_given_as_a_lora_is_named(tmp_path):
    from support.tiny_models import write_gguf, write_transformer

    with pytest.raises(ModelLoadError, match=r"not a LoRA: .*FLUX.1 \[schnell\] transformer"):
        flux_lora.read_lora(write_transformer(tmp_path / "flux1-schnell.safetensors"))
    with pytest.raises(ModelLoadError, match="GGUF"):
        flux_lora.read_lora(write_gguf(tmp_path / "model.gguf"))
    with pytest.raises(ModelLoadError, match="no such file"):
        flux_lora.read_lora(tmp_path / "missing.safetensors")


def test_a_lora_that_fails_leaves_the_applied_ones_in_place(tmp_path, base):
    good = flux_lora.read_lora(save_lora(tmp_path / "good.safetensors", small_kohya()))
    bad_tensors = small_kohya(seed=13)
    bad_tensors["lora_unet_double_blocks_0_img_mlp_0.lora_down.weight"] = torch.zeros(2, 99)
    bad = flux_lora.read_lora(save_lora(tmp_path / "bad.safetensors", bad_tensors))
    nets = build({"transformer": base["transformer"]})
    flux_lora.apply_loras(nets, [(good, 1.0)])
    before = list(flux_lora.adapters(nets["transformer"]))
    with pytest.raises(ModelLoadError, match=r"bad\.safetensors"):
        flux_lora.apply_loras(nets, [(good, 0.5), (bad, 1.0)])
    assert list(flux_lora.adapters(nets["transformer"])) == before
