"""Tests of flux/t5.py, the T5 v1.1 encoder.

- The full-size model built on the meta device has exactly the keys and shapes of the reference key
  file (the HF layout of the t5xxl single files).
- A small config with random weights matches transformers' `T5EncoderModel` (test-only reference;
  state dict copied across) to < 1e-5 in fp32, with randomised norm weights, batch 2, end-of-text in
  different places followed by padding, and a sequence long enough to reach the log-spaced and the
  last relative-position buckets; in bf16 it casts where transformers does.
- Bad configs and token ids are refused by name; fp16 compute is refused.
"""

from __future__ import annotations

import json

import pytest
import torch
from comfyui_flux_schnell.errors import ConfigurationError, InvalidInputError
from comfyui_flux_schnell.flux import t5 as t5_module
from comfyui_flux_schnell.flux.t5 import T5Config, T5Encoder, relative_position_buckets
from support import KEYS_DIR
from support.text_encoder_cases import TOL, UNEVEN_T5, randomise_, relative_error, t5_ids
from support.transformers_reference import hf_t5_config

# --- full-size layout ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "key_file", "file_only"),
    [
        (lambda: T5Encoder(T5Config()), "keys_t5xxl_hf.json", {"encoder.embed_tokens.weight"}),
    ],
    ids=["t5xxl"],
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
        (T5Config, "d_model", 0),
        (T5Config, "num_heads", 2.5),
        (T5Config, "num_layers", True),
        (T5Config, "layer_norm_epsilon", 0.0),
        (T5Config, "relative_attention_num_buckets", 7),
        (T5Config, "relative_attention_max_distance", 2),
    ],
)
def test_config_rejects_bad_field(cls, field, value):
    with pytest.raises(ConfigurationError, match=rf"{cls.__name__}\.{field}"):
        cls(**{field: value})


# --- against transformers ------------------------------------------------------------------------


def hf_t5(config: T5Config):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    return transformers.T5EncoderModel(hf_t5_config(config)).eval()


def t5_state_from_hf(model) -> dict[str, torch.Tensor]:
    """transformers' T5EncoderModel state dict without the tied `encoder.embed_tokens` copy."""
    state = model.state_dict()
    assert torch.equal(state.pop("encoder.embed_tokens.weight"), state["shared.weight"])
    return state


def test_relative_position_buckets_match_transformers():
    transformers = pytest.importorskip("transformers")
    bucket_fn = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket
    for buckets, max_distance, length in [(8, 16, 40), (32, 128, 300)]:
        offsets = torch.arange(length)[None, :] - torch.arange(length)[:, None]
        expected = bucket_fn(offsets, True, buckets, max_distance)
        ours = relative_position_buckets(length, length, buckets, max_distance, torch.device("cpu"))
        assert torch.equal(ours, expected)
        assert ours.min() == 0
        assert ours.max() == buckets - 1


def test_t5_matches_transformers_fp32():
    reference = randomise_(hf_t5(UNEVEN_T5), seed=1)
    ours = T5Encoder(UNEVEN_T5).eval()
    ours.load_state_dict(t5_state_from_hf(reference), strict=True)

    ids = t5_ids([9, 33], total=40, vocab=UNEVEN_T5.vocab_size, seed=2)  # 40 > max_distance 16
    with torch.no_grad():
        expected = reference(input_ids=ids).last_hidden_state
        got = ours(ids)
    assert got.shape == (2, 40, UNEVEN_T5.d_model)
    assert got.dtype == torch.float32
    diff = (got - expected).abs().max().item()
    assert diff < TOL, f"T5 max |diff| {diff:.2e}"


def test_t5_position_bias_computed_once_per_forward(monkeypatch):
    model = randomise_(T5Encoder(UNEVEN_T5), seed=3)
    calls = []
    original = t5_module.T5Attention.position_bias

    def counting(self, *args, **kwargs):
        calls.append(args)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(t5_module.T5Attention, "position_bias", counting)
    with torch.no_grad():
        model(t5_ids([5], total=12, vocab=UNEVEN_T5.vocab_size, seed=4))
    assert len(calls) == 1
    assert not hasattr(model.encoder.block[1].layer[0].SelfAttention, "relative_attention_bias")


def test_t5_position_bias_reaches_sdpa_contiguous(monkeypatch):
    """CUDA's fused SDPA kernels need a mask with last-dim stride 1; the bias must arrive contiguous."""
    model = randomise_(T5Encoder(UNEVEN_T5), seed=5)
    ids = t5_ids([7], total=20, vocab=UNEVEN_T5.vocab_size, seed=6)
    with torch.no_grad():
        before = model(ids)
    masks = []
    original = t5_module.F.scaled_dot_product_attention

    def recording(q, k, v, attn_mask=None, **kwargs):
        masks.append(attn_mask)
        return original(q, k, v, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(t5_module.F, "scaled_dot_product_attention", recording)
    with torch.no_grad():
        after = model(ids)
    assert len(masks) == UNEVEN_T5.num_layers
    assert all(m.is_contiguous() and m.stride(-1) == 1 for m in masks)
    assert torch.equal(before, after)


def test_t5_refuses_fp16_compute():
    model = T5Encoder(UNEVEN_T5)
    with pytest.raises(InvalidInputError, match="fp16"):
        model(t5_ids([3], total=8, vocab=UNEVEN_T5.vocab_size, seed=6), dtype=torch.float16)


# --- bf16 compute -------------------------------------------------------------------------------


def test_t5_bf16_matches_transformers_bf16():
    """Same cast points as transformers in bf16 (fp32 variance, scale after casting back).

    transformers' `gelu_new` rounds each elementwise step to bf16 while torch's tanh GELU rounds
    once; with that one op swapped in the reference the two agree to bf16 round-off, where a
    different cast point gives a relative difference of ~1e-2 on these random weights.
    """
    reference = randomise_(hf_t5(UNEVEN_T5), seed=5)
    ours = T5Encoder(UNEVEN_T5).eval()
    ours.load_state_dict(t5_state_from_hf(reference))
    ids = t5_ids([7, 20], total=24, vocab=UNEVEN_T5.vocab_size, seed=6)
    with torch.no_grad():
        exact = ours(ids)
        got = ours(ids, dtype=torch.bfloat16)
        reference = reference.to(torch.bfloat16)
        as_is = reference(input_ids=ids).last_hidden_state
        for block in reference.encoder.block:
            block.layer[1].DenseReluDense.act = torch.nn.GELU(approximate="tanh")
        same_gelu = reference(input_ids=ids).last_hidden_state
    assert got.dtype == torch.bfloat16
    assert relative_error(got, same_gelu) < 1e-3
    assert relative_error(got, exact) < 1.5 * relative_error(as_is, exact)  # no worse than HF


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
def test_t5_rejects_bad_ids(ids, match):
    with pytest.raises(InvalidInputError, match=match):
        T5Encoder(UNEVEN_T5)(ids)
