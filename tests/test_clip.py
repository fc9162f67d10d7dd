"""Tests of flux/clip.py, the CLIP-L text encoder.

- The full-size model built on the meta device has exactly the keys and shapes of the reference key
  file (the HF layout of the clip_l single file).
- A small config with random weights matches transformers' `CLIPTextModel` (test-only reference;
  state dict copied across) to < 1e-5 in fp32 and to bf16/fp16 round-off in half precision, with
  randomised norm weights, batch 2 and end-of-text in different places followed by padding; the
  pooled output is taken at the first end-of-text; attention is causal.
- Bad configs, token ids, over-long sequences and fp8 compute are refused by name.
"""

from __future__ import annotations

import json

import pytest
import torch
from comfyui_flux_schnell.errors import ConfigurationError, InvalidInputError
from comfyui_flux_schnell.flux.clip import CLIPTextConfig, CLIPTextEncoder
from support import KEYS_DIR
from support.text_encoder_cases import TOL, UNEVEN_CLIP, clip_ids, randomise_, relative_error
from support.transformers_reference import hf_clip_config

# --- full-size layout ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "key_file", "file_only"),
    [
        (lambda: CLIPTextEncoder(CLIPTextConfig()), "keys_clip_l_hf.json", set()),
    ],
    ids=["clip_l"],
)
def test_full_size_meta_model_matches_reference_keys(build, key_file, file_only):
    reference = json.loads((KEYS_DIR / key_file).read_text())
    with torch.device("meta"):
        model = build()
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    expected = {k: v for k, v in reference["keys"].items() if k not in file_only}
    assert set(ours) == set(expected)
    assert ours == expected
    assert sum(p.numel() for p in model.parameters()) == reference["num_parameters"]
    assert all(p.device.type == "meta" for p in model.parameters())


# --- config --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "field", "value"),
    [
        (CLIPTextConfig, "hidden_size", 30),  # not divisible by 12 heads
        (CLIPTextConfig, "vocab_size", -1),
        (CLIPTextConfig, "layer_norm_eps", "1e-5"),
    ],
)
def test_config_rejects_bad_field(cls, field, value):
    with pytest.raises(ConfigurationError, match=rf"{cls.__name__}\.{field}"):
        cls(**{field: value})


# --- against transformers ------------------------------------------------------------------------


def hf_clip(config: CLIPTextConfig):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    return transformers.CLIPTextModel(hf_clip_config(config)).eval()


def clip_state_from_hf(model) -> dict[str, torch.Tensor]:
    """transformers' CLIPTextModel state dict in the on-disk layout (>= 5 drops `text_model.`)."""
    return {
        k if k.startswith("text_model.") else f"text_model.{k}": v
        for k, v in model.state_dict().items()
        if not k.endswith("position_ids")
    }


def test_clip_matches_transformers_fp32():
    reference = randomise_(hf_clip(UNEVEN_CLIP), seed=7)
    ours = CLIPTextEncoder(UNEVEN_CLIP).eval()
    ours.load_state_dict(clip_state_from_hf(reference), strict=True)

    ids = clip_ids([4, 11], total=16, vocab=UNEVEN_CLIP.vocab_size, seed=8)
    with torch.no_grad():
        out = reference(input_ids=ids)
        hidden, pooled = ours(ids)
    assert hidden.shape == (2, 16, 32)
    assert pooled.shape == (2, 32)
    hidden_diff = (hidden - out.last_hidden_state).abs().max().item()
    pooled_diff = (pooled - out.pooler_output).abs().max().item()
    assert hidden_diff < TOL, f"CLIP hidden max |diff| {hidden_diff:.2e}"
    assert pooled_diff < TOL, f"CLIP pooled max |diff| {pooled_diff:.2e}"
    # pooled is the first end-of-text position (5 and 12), not the last padding position
    assert torch.equal(pooled, hidden[torch.arange(2), torch.tensor([5, 12])])


def test_clip_is_causal():
    model = randomise_(CLIPTextEncoder(UNEVEN_CLIP), seed=9).eval()
    ids = clip_ids([6], total=10, vocab=UNEVEN_CLIP.vocab_size, seed=10)
    changed = ids.clone()
    changed[0, 8] = 3  # a later token must not change earlier positions
    with torch.no_grad():
        a, _ = model(ids)
        b, _ = model(changed)
    assert torch.equal(a[:, :8], b[:, :8])
    assert not torch.equal(a[:, 8:], b[:, 8:])


# --- half-precision compute ----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_clip_half_precision_matches_transformers(dtype):
    reference = randomise_(hf_clip(UNEVEN_CLIP), seed=15)
    ours = CLIPTextEncoder(UNEVEN_CLIP).eval()
    ours.load_state_dict(clip_state_from_hf(reference))
    ids = clip_ids([3, 9], total=14, vocab=UNEVEN_CLIP.vocab_size, seed=16)
    with torch.no_grad():
        hidden, pooled = ours(ids, dtype=dtype)
        out = reference.to(dtype)(input_ids=ids)
    assert hidden.dtype == dtype
    assert pooled.dtype == dtype
    assert relative_error(hidden, out.last_hidden_state) < 1e-3
    assert relative_error(pooled, out.pooler_output) < 1e-3


# --- bad inputs ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ids", "match"),
    [
        (torch.zeros(5, dtype=torch.long), "shape"),
        (torch.zeros(1, 0, dtype=torch.long), "shape"),
        (torch.zeros(1, 4), "integer"),
        (torch.full((1, 4), 10_000), "vocab_size"),
        (torch.full((1, 4), -1), "vocab_size"),
    ],
)
def test_clip_rejects_bad_ids(ids, match):
    with pytest.raises(InvalidInputError, match=match):
        CLIPTextEncoder(UNEVEN_CLIP)(ids)


def test_clip_rejects_sequences_longer_than_its_positions():
    with pytest.raises(InvalidInputError, match="max_length=16"):
        CLIPTextEncoder(UNEVEN_CLIP)(torch.zeros(1, 17, dtype=torch.long))


def test_clip_rejects_float8_compute():
    with pytest.raises(InvalidInputError, match="dtype"):
        CLIPTextEncoder(UNEVEN_CLIP)(torch.zeros(1, 4, dtype=torch.long), dtype=torch.float8_e4m3fn)
