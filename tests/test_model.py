"""Tests of the FLUX.1 transformer as a whole (flux/model.py); its parts: test_layers.py, test_rope.py.

- layout: the full-size model built on the meta device has exactly the keys and shapes of
  flux1-schnell.safetensors (and of flux1-dev with `guidance_embed=True`);
- parity: on tiny configs with random weights (norm scales 1 + 0.2*N, non-zero biases), one forward
  and a 4-step Euler loop match diffusers' FluxTransformer2DModel loaded through the test-only
  converter in diffusers_flux_convert.py, which is itself checked against diffusers' full-size layout;
- storage dtypes: fp8/bf16/fp16-stored weights give exactly what the dequantized fp32 weights give;
- the errors for bad configs and inputs.
"""

from __future__ import annotations

import itertools
import json
import math
import warnings

import pytest
import torch
from comfyui_flux_schnell.errors import InvalidInputError
from comfyui_flux_schnell.flux.model import Flux, FluxParams
from support import KEYS_DIR
from support.diffusers_flux_convert import bfl_to_diffusers, diffusers_config

KEYS_JSON = KEYS_DIR / "keys_flux1_schnell.json"
TINY = dict(
    in_channels=16,
    out_channels=16,
    vec_in_dim=24,
    context_in_dim=32,
    hidden_size=64,
    num_heads=2,
    depth=2,
    depth_single_blocks=2,
    axes_dim=(8, 12, 12),
)
TXT_LEN, GRID = 7, (3, 5)  # 7 text tokens, a non-square 3x5 token grid


def reference_keys() -> dict:
    return json.loads(KEYS_JSON.read_text())


def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Weights ~ N(0, 1/fan_in), biases ~ 0.1*N, norm scales ~ 1 + 0.2*N, all seeded."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            if name.endswith(".scale"):
                param.copy_(1 + 0.2 * noise)
            elif name.endswith(".bias"):
                param.copy_(0.1 * noise)
            else:
                param.copy_(noise / math.sqrt(param.shape[1]))
    return model


def tiny_flux(seed: int = 0, **overrides) -> Flux:
    return randomize_(Flux(FluxParams(**{**TINY, **overrides})), seed).eval()


def tiny_diffusers(flux: Flux):
    """diffusers' FluxTransformer2DModel of the same size, loaded with flux's weights."""
    from diffusers import FluxTransformer2DModel

    p = flux.params
    model = FluxTransformer2DModel(**diffusers_config(p))
    model.load_state_dict(bfl_to_diffusers(flux.state_dict()), strict=True)
    return model.eval()


def grid_ids(rows: int, cols: int, axis0: float = 0.0) -> torch.Tensor:
    """(rows*cols, 3) ids (axis0, row, col), row-major."""
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    return torch.stack((torch.full_like(r, 0).float() + axis0, r.float(), c.float()), -1).view(-1, 3)


def make_inputs(p: FluxParams, batch: int, ids_kind: str, seed: int = 1) -> dict:
    """Seeded inputs; ids are 2-D (shared by the batch) here, batched for Flux by `flux_args`."""
    gen = torch.Generator().manual_seed(seed)
    n = GRID[0] * GRID[1]
    if ids_kind == "txt2img":  # text ids zero, image ids (0, row, col)
        txt_ids, img_ids = torch.zeros(TXT_LEN, 3), grid_ids(*GRID)
    else:  # every axis rotates, text too (as Kontext-style conditioning would)
        txt_ids = torch.randint(0, 9, (TXT_LEN, 3), generator=gen).float()
        img_ids = grid_ids(*GRID, axis0=1.0) + torch.tensor([0.0, 4.0, 2.0])
    return dict(
        img=torch.randn(batch, n, p.in_channels, generator=gen),
        txt=torch.randn(batch, TXT_LEN, p.context_in_dim, generator=gen),
        y=torch.randn(batch, p.vec_in_dim, generator=gen),
        timesteps=torch.tensor([0.75, 0.3])[:batch],
        guidance=torch.tensor([3.5, 2.0])[:batch] if p.guidance_embed else None,
        txt_ids=txt_ids,
        img_ids=img_ids,
    )


def run_flux(model: Flux, x: dict, img: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    b = img.shape[0]
    return model(
        img=img,
        img_ids=x["img_ids"].expand(b, -1, -1),
        txt=x["txt"],
        txt_ids=x["txt_ids"].expand(b, -1, -1),
        timesteps=t,
        y=x["y"],
        guidance=x["guidance"],
    )


def run_diffusers(model, x: dict, img: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return model(
        hidden_states=img,
        encoder_hidden_states=x["txt"],
        pooled_projections=x["y"],
        timestep=t,
        img_ids=x["img_ids"],
        txt_ids=x["txt_ids"],
        guidance=x["guidance"],
        return_dict=False,
    )[0]


# --- layout ----------------------------------------------------------------------------------


def test_full_size_meta_model_has_schnell_checkpoint_layout():
    ref = reference_keys()
    with torch.device("meta"):
        model = Flux(FluxParams())
    sd = model.state_dict()
    assert set(sd) == set(ref["keys"])
    assert {k: list(v.shape) for k, v in sd.items()} == {k: v["shape"] for k, v in ref["keys"].items()}
    assert len(sd) == ref["num_tensors"] == 776
    assert sum(v.numel() for v in sd.values()) == ref["num_parameters"] == 11_891_178_560


def test_dev_params_add_exactly_the_guidance_keys():
    ref = reference_keys()
    with torch.device("meta"):
        dev = Flux(FluxParams(guidance_embed=True)).state_dict()
    assert sorted(set(dev) - set(ref["keys"])) == sorted(ref["keys_only_in_flux_dev"])
    assert set(ref["keys"]) <= set(dev)


@pytest.mark.parametrize("guidance_embed", [False, True])
def test_converter_gives_diffusers_full_size_layout(guidance_embed):
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        ours = Flux(FluxParams(guidance_embed=guidance_embed)).state_dict()
        theirs = FluxTransformer2DModel(guidance_embeds=guidance_embed).state_dict()
    converted = bfl_to_diffusers(ours)
    assert len(theirs) == (1160 if guidance_embed else 1156)
    assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in theirs.items()}


# --- parity with diffusers -------------------------------------------------------------------


@pytest.mark.parametrize("guidance_embed", [False, True], ids=["schnell", "dev"])
@pytest.mark.parametrize("ids_kind", ["txt2img", "all-axes"])
def test_one_forward_matches_diffusers(ids_kind, guidance_embed):
    flux = tiny_flux(guidance_embed=guidance_embed)
    ref = tiny_diffusers(flux)
    x = make_inputs(flux.params, batch=2, ids_kind=ids_kind)
    with torch.no_grad():
        ours = run_flux(flux, x, x["img"], x["timesteps"])
        theirs = run_diffusers(ref, x, x["img"], x["timesteps"])
    assert ours.shape == (2, GRID[0] * GRID[1], 16)
    assert theirs.abs().max() > 0.5  # a meaningful output, not a degenerate one
    diff = (ours - theirs).abs().max().item()
    print(f"one forward ({ids_kind}, guidance_embed={guidance_embed}): max|diff| = {diff:.3g}")
    assert diff < 1e-5


def test_four_step_euler_loop_matches_diffusers():
    flux = tiny_flux(seed=3)
    ref = tiny_diffusers(flux)
    x = make_inputs(flux.params, batch=2, ids_kind="txt2img", seed=4)
    schedule = torch.linspace(1, 0, 5).tolist()
    ours, theirs = x["img"].clone(), x["img"].clone()
    with torch.no_grad():
        for t_curr, t_prev in itertools.pairwise(schedule):
            t_vec = torch.full((2,), t_curr)
            ours = ours + (t_prev - t_curr) * run_flux(flux, x, ours, t_vec)
            theirs = theirs + (t_prev - t_curr) * run_diffusers(ref, x, theirs, t_vec)
    assert (ours - x["img"]).abs().max() > 0.5  # the loop moved the latents
    diff = (ours - theirs).abs().max().item()
    print(f"4-step Euler loop: max|diff| = {diff:.3g}")
    assert diff < 5e-5


def test_a_forgotten_norm_scale_would_be_caught():
    """The parity tolerance is tight enough: resetting one QK-norm scale to 1 breaks it."""
    flux = tiny_flux()
    ref = tiny_diffusers(flux)
    with torch.no_grad():
        flux.single_blocks[1].norm.key_norm.scale.fill_(1.0)
    x = make_inputs(flux.params, batch=2, ids_kind="txt2img")
    with torch.no_grad():
        diff = run_flux(flux, x, x["img"], x["timesteps"]) - run_diffusers(ref, x, x["img"], x["timesteps"])
    assert diff.abs().max() > 1e-3


# --- the model's own behaviour ---------------------------------------------------------------


def test_precomputed_pe_and_batch_one_ids_give_the_same_output():
    flux = tiny_flux()
    x = make_inputs(flux.params, batch=2, ids_kind="all-axes")
    img, txt, t, y = x["img"], x["txt"], x["timesteps"], x["y"]
    ids = torch.cat((x["txt_ids"], x["img_ids"]))[None]  # (1, L + N, 3), broadcast over the batch
    with torch.no_grad():
        inner = run_flux(flux, x, img, t)  # ids (2, ., 3), pe built inside
        outer = flux(img, x["img_ids"][None], txt, x["txt_ids"][None], t, y, pe=flux.rope(ids))
        mixed = flux(img, x["img_ids"][None], txt, x["txt_ids"].expand(2, -1, -1), t, y)
    torch.testing.assert_close(outer, inner, rtol=0, atol=0)
    torch.testing.assert_close(mixed, inner, rtol=0, atol=0)


def test_batch_entries_are_independent():
    flux = tiny_flux()
    x = make_inputs(flux.params, batch=2, ids_kind="txt2img")
    with torch.no_grad():
        both = run_flux(flux, x, x["img"], x["timesteps"])
        second = run_flux(flux, {**x, "txt": x["txt"][1:], "y": x["y"][1:]}, x["img"][1:], x["timesteps"][1:])
    torch.testing.assert_close(both[1:], second, rtol=1e-5, atol=1e-6)
    assert (both[0] - both[1]).abs().max() > 1e-2


@pytest.mark.parametrize("stored", [torch.float8_e4m3fn, torch.bfloat16, torch.float16])
def test_narrow_stored_weights_compute_like_their_dequantized_values(stored):
    flux = tiny_flux(seed=5)
    narrow = Flux(flux.params)
    narrow.load_state_dict({k: v.to(stored) for k, v in flux.state_dict().items()}, assign=True)
    dequantized = Flux(flux.params)
    dequantized.load_state_dict({k: v.float() for k, v in narrow.state_dict().items()}, assign=True)
    x = make_inputs(flux.params, batch=2, ids_kind="txt2img")
    with torch.no_grad():
        out = run_flux(narrow, x, x["img"], x["timesteps"])
        want = run_flux(dequantized, x, x["img"], x["timesteps"])
        full = run_flux(flux, x, x["img"], x["timesteps"])
    assert out.dtype == torch.float32
    assert all(p.dtype == stored for p in narrow.parameters())  # never widened in place
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    assert (out - full).abs().max() > 1e-6  # the rounding did reach the computation


@pytest.mark.parametrize("stored", [torch.float32, torch.float8_e4m3fn])
def test_bf16_activations_compute_in_bf16(stored):
    flux = tiny_flux(seed=6)
    model = Flux(flux.params)
    model.load_state_dict({k: v.to(stored) for k, v in flux.state_dict().items()}, assign=True)
    x = make_inputs(flux.params, batch=2, ids_kind="txt2img")
    t = torch.tensor([0.5, 0.25])  # exact in bf16 (0.75 would become 752/1000 there, on purpose)
    with torch.no_grad():
        out = run_flux(model, x, x["img"].bfloat16(), t)
        full = run_flux(model, x, x["img"], t)
    assert out.dtype == torch.bfloat16
    err = (out.float() - full).abs()
    assert err.max() < 0.05 * full.abs().max()
    assert err.mean() < 0.01 * full.abs().mean()


# --- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (dict(num_heads=3), "hidden_size"),
        (dict(axes_dim=(8, 12, 14)), "axes_dim"),
        (dict(axes_dim=(7, 13, 12)), "axes_dim"),
        (dict(hidden_size=0), "hidden_size"),
        (dict(in_channels=-1), "in_channels"),
        (dict(depth=-1), "depth"),
        (dict(mlp_ratio=0.0), "mlp_ratio"),
    ],
)
def test_bad_params_raise_value_error_naming_the_field(change, field):
    with pytest.raises(ValueError, match=field):
        FluxParams(**{**TINY, **change})


@pytest.mark.parametrize(
    ("name", "bad"),
    [
        ("img", torch.zeros(2, 15, 12)),
        ("txt", torch.zeros(2, TXT_LEN, 31)),
        ("img_ids", torch.zeros(2, 14, 3)),
        ("txt_ids", torch.zeros(2, TXT_LEN, 2)),
        ("timesteps", torch.zeros(3)),
        ("y", torch.zeros(2, 23)),
        ("pe", torch.zeros(1, 5, 1, 16, 2, 2)),
    ],
)
def test_bad_inputs_raise_invalid_input_naming_the_input(name, bad):
    flux = tiny_flux()
    x = make_inputs(flux.params, batch=2, ids_kind="txt2img")
    args = dict(
        img=x["img"],
        img_ids=x["img_ids"].expand(2, -1, -1),
        txt=x["txt"],
        txt_ids=x["txt_ids"].expand(2, -1, -1),
        timesteps=x["timesteps"],
        y=x["y"],
    )
    with pytest.raises(InvalidInputError, match=f"`{name}`"):
        flux(**{**args, name: bad})


def test_dev_model_requires_guidance():
    flux = tiny_flux(guidance_embed=True)
    x = make_inputs(flux.params, batch=2, ids_kind="txt2img")
    with pytest.raises(InvalidInputError, match="guidance"):
        run_flux(flux, {**x, "guidance": None}, x["img"], x["timesteps"])


def test_full_size_model_builds_on_meta_without_allocating():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.device("meta"):
            model = Flux(FluxParams())
    assert all(p.is_meta for p in model.parameters())
