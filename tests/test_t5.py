"""Tests of the T5 and CLIP text encoders and of prompt encoding.

- Full-size models built on the meta device have exactly the keys and shapes of the reference key
  files (the HF layouts of t5xxl / clip_l single files).
- Tiny configs with random weights match transformers' `T5EncoderModel` and `CLIPTextModel` (test-only
  references; state dict copied across) to < 1e-5 in fp32, with randomised norm weights, batch 2,
  end-of-text in different places followed by padding, and (T5) a sequence long enough to reach the
  log-spaced and the last relative-position buckets.
- Weights stored as bf16 / fp16 / float8_e4m3fn compute in the input dtype.
- `encode_prompts` composes the tokenizers and encoders as the reference `HFEmbedder` does.
"""

from __future__ import annotations

import json

import pytest
import torch
from comfyui_flux_schnell.errors import ConfigurationError, InvalidInputError
from comfyui_flux_schnell.flux import ops
from comfyui_flux_schnell.flux import t5 as t5_module
from comfyui_flux_schnell.flux.clip import CLIPTextConfig, CLIPTextEncoder
from comfyui_flux_schnell.flux.conditioning import encode_prompts, t5_compute_dtype
from comfyui_flux_schnell.flux.t5 import T5Config, T5Encoder, relative_position_buckets
from comfyui_flux_schnell.flux.tokenizers import load_clip_tokenizer, load_t5_tokenizer
from support import KEYS_DIR
from support.tiny_tokenizers import (
    CLIP_VOCAB_SIZE,
    T5_VOCAB_SIZE,
    write_clip_tokenizer,
    write_t5_tokenizer,
)
from support.transformers_reference import hf_clip_config, hf_t5_config

TOL = 1e-5

TINY_T5 = T5Config(
    vocab_size=T5_VOCAB_SIZE,
    d_model=32,
    d_kv=6,  # inner width 4 * 6 = 24 differs from d_model on purpose
    d_ff=40,
    num_layers=3,
    num_heads=4,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=16,
)
TINY_CLIP = CLIPTextConfig(
    vocab_size=CLIP_VOCAB_SIZE,
    hidden_size=32,
    intermediate_size=37,
    num_layers=2,
    num_heads=4,
    max_position_embeddings=16,
)


def randomise_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Give every parameter seeded random values; norm scales 1 + 0.2*N so a lost scale shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * noise)
            else:
                p.copy_(0.2 * noise)
    return model


def t5_ids(lengths: list[int], total: int, vocab: int, seed: int) -> torch.LongTensor:
    """T5-style rows: `n` random tokens, </s> (1), then <pad> (0) up to `total`."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(lengths), total, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, :n] = torch.randint(3, vocab, (n,), generator=gen)
        ids[row, n] = 1
    return ids


def clip_ids(lengths: list[int], total: int, vocab: int, seed: int) -> torch.LongTensor:
    """CLIP-style rows: BOS (vocab-2), `n` random tokens, then EOS (vocab-1) as end and padding."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.full((len(lengths), total), vocab - 1, dtype=torch.long)
    ids[:, 0] = vocab - 2
    for row, n in enumerate(lengths):
        ids[row, 1 : n + 1] = torch.randint(0, vocab - 2, (n,), generator=gen)
    return ids


# --- full-size layouts ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "key_file", "file_only"),
    [
        (lambda: T5Encoder(T5Config()), "keys_t5xxl_hf.json", {"encoder.embed_tokens.weight"}),
        (lambda: CLIPTextEncoder(CLIPTextConfig()), "keys_clip_l_hf.json", set()),
    ],
    ids=["t5xxl", "clip_l"],
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


# --- configs -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "field", "value"),
    [
        (T5Config, "d_model", 0),
        (T5Config, "num_heads", 2.5),
        (T5Config, "num_layers", True),
        (T5Config, "layer_norm_epsilon", 0.0),
        (T5Config, "relative_attention_num_buckets", 7),
        (T5Config, "relative_attention_max_distance", 2),
        (CLIPTextConfig, "hidden_size", 30),  # not divisible by 12 heads
        (CLIPTextConfig, "vocab_size", -1),
        (CLIPTextConfig, "layer_norm_eps", "1e-5"),
    ],
)
def test_config_rejects_bad_field(cls, field, value):
    with pytest.raises(ConfigurationError, match=rf"{cls.__name__}\.{field}"):
        cls(**{field: value})


# --- T5 ------------------------------------------------------------------------------------------


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
    reference = randomise_(hf_t5(TINY_T5), seed=1)
    ours = T5Encoder(TINY_T5).eval()
    ours.load_state_dict(t5_state_from_hf(reference), strict=True)

    ids = t5_ids([9, 33], total=40, vocab=TINY_T5.vocab_size, seed=2)  # 40 > max_distance 16
    with torch.no_grad():
        expected = reference(input_ids=ids).last_hidden_state
        got = ours(ids)
    assert got.shape == (2, 40, TINY_T5.d_model)
    assert got.dtype == torch.float32
    diff = (got - expected).abs().max().item()
    assert diff < TOL, f"T5 max |diff| {diff:.2e}"


def test_t5_position_bias_computed_once_per_forward(monkeypatch):
    model = randomise_(T5Encoder(TINY_T5), seed=3)
    calls = []
    original = t5_module.T5Attention.position_bias

    def counting(self, *args, **kwargs):
        calls.append(args)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(t5_module.T5Attention, "position_bias", counting)
    with torch.no_grad():
        model(t5_ids([5], total=12, vocab=TINY_T5.vocab_size, seed=4))
    assert len(calls) == 1
    assert not hasattr(model.encoder.block[1].layer[0].SelfAttention, "relative_attention_bias")


def test_t5_refuses_fp16_compute():
    model = T5Encoder(TINY_T5)
    with pytest.raises(InvalidInputError, match="fp16"):
        model(t5_ids([3], total=8, vocab=TINY_T5.vocab_size, seed=6), dtype=torch.float16)


# --- CLIP ----------------------------------------------------------------------------------------


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
    reference = randomise_(hf_clip(TINY_CLIP), seed=7)
    ours = CLIPTextEncoder(TINY_CLIP).eval()
    ours.load_state_dict(clip_state_from_hf(reference), strict=True)

    ids = clip_ids([4, 11], total=16, vocab=TINY_CLIP.vocab_size, seed=8)
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
    model = randomise_(CLIPTextEncoder(TINY_CLIP), seed=9).eval()
    ids = clip_ids([6], total=10, vocab=TINY_CLIP.vocab_size, seed=10)
    changed = ids.clone()
    changed[0, 8] = 3  # a later token must not change earlier positions
    with torch.no_grad():
        a, _ = model(ids)
        b, _ = model(changed)
    assert torch.equal(a[:, :8], b[:, :8])
    assert not torch.equal(a[:, 8:], b[:, 8:])


# --- bf16 compute -------------------------------------------------------------------------------


def _relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return ((approx.float() - exact.float()).norm() / exact.float().norm()).item()


def test_t5_bf16_matches_transformers_bf16():
    """Same cast points as transformers in bf16 (fp32 variance, scale after casting back).

    transformers' `gelu_new` rounds each elementwise step to bf16 while torch's tanh GELU rounds
    once; with that one op swapped in the reference the two agree to bf16 round-off, where a
    different cast point gives a relative difference of ~1e-2 on these random weights.
    """
    reference = randomise_(hf_t5(TINY_T5), seed=5)
    ours = T5Encoder(TINY_T5).eval()
    ours.load_state_dict(t5_state_from_hf(reference))
    ids = t5_ids([7, 20], total=24, vocab=TINY_T5.vocab_size, seed=6)
    with torch.no_grad():
        exact = ours(ids)
        got = ours(ids, dtype=torch.bfloat16)
        reference = reference.to(torch.bfloat16)
        as_is = reference(input_ids=ids).last_hidden_state
        for block in reference.encoder.block:
            block.layer[1].DenseReluDense.act = torch.nn.GELU(approximate="tanh")
        same_gelu = reference(input_ids=ids).last_hidden_state
    assert got.dtype == torch.bfloat16
    assert _relative_error(got, same_gelu) < 1e-3
    assert _relative_error(got, exact) < 1.5 * _relative_error(as_is, exact)  # no worse than HF


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_clip_half_precision_matches_transformers(dtype):
    reference = randomise_(hf_clip(TINY_CLIP), seed=15)
    ours = CLIPTextEncoder(TINY_CLIP).eval()
    ours.load_state_dict(clip_state_from_hf(reference))
    ids = clip_ids([3, 9], total=14, vocab=TINY_CLIP.vocab_size, seed=16)
    with torch.no_grad():
        hidden, pooled = ours(ids, dtype=dtype)
        out = reference.to(dtype)(input_ids=ids)
    assert hidden.dtype == dtype
    assert pooled.dtype == dtype
    assert _relative_error(hidden, out.last_hidden_state) < 1e-3
    assert _relative_error(pooled, out.pooler_output) < 1e-3


# --- stored dtypes -------------------------------------------------------------------------------

STORED = [torch.bfloat16, torch.float16, torch.float8_e4m3fn]


def _ids_for(model: torch.nn.Module) -> torch.LongTensor:
    if isinstance(model, T5Encoder):
        return t5_ids([6, 17], total=20, vocab=TINY_T5.vocab_size, seed=11)
    return clip_ids([3, 9], total=14, vocab=TINY_CLIP.vocab_size, seed=11)


@pytest.mark.parametrize("stored", STORED, ids=str)
@pytest.mark.parametrize("build", [lambda: T5Encoder(TINY_T5), lambda: CLIPTextEncoder(TINY_CLIP)])
def test_narrow_stored_weights_compute_in_fp32(build, stored):
    narrow = randomise_(build(), seed=12).eval()
    with torch.no_grad():
        for p in narrow.parameters():
            p.data = p.data.to(stored)
    widened = build().eval()  # the same (rounded) values kept in fp32
    widened.load_state_dict({k: v.float() for k, v in narrow.state_dict().items()})
    ids = _ids_for(narrow)
    with torch.no_grad():
        got, expected = narrow(ids), widened(ids)
    got, expected = (got, expected) if isinstance(got, tuple) else ((got,), (expected,))
    for g, e in zip(got, expected, strict=True):
        assert g.dtype == torch.float32
        assert torch.isfinite(g).all()
        assert (g - e).abs().max().item() < TOL
    assert all(p.dtype == stored for p in narrow.parameters())  # nothing was widened in place


@pytest.mark.parametrize("out_dtype", [None, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("stored", [torch.float8_e4m3fn, torch.bfloat16, torch.float32], ids=str)
def test_embedding_gathers_rows_of_any_stored_dtype(monkeypatch, stored, out_dtype):
    """Rows equal indexing the table; fp8 tables are gathered without an fp8 index kernel."""
    real_embedding = ops.F.embedding

    def embedding_without_fp8(ids, weight, *args, **kwargs):  # as in torch versions of mid-2024
        if weight.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            raise NotImplementedError("\"index_select_cuda\" not implemented for 'Float8_e4m3fn'")
        return real_embedding(ids, weight, *args, **kwargs)

    monkeypatch.setattr(ops.F, "embedding", embedding_without_fp8)
    table = ops.Embedding(11, 6)
    with torch.no_grad():
        table.weight.copy_(torch.randn(11, 6, generator=torch.Generator().manual_seed(5)))
    table.weight.data = table.weight.data.to(stored)
    ids = torch.tensor([[0, 10, 3], [3, 3, 7]])
    rows = table(ids, out_dtype=out_dtype)
    expected = table.weight.data[ids]  # (2, 3, 6): plain indexing, no embedding kernel
    expected = expected if out_dtype is None else expected.to(out_dtype)
    assert rows.dtype == expected.dtype
    assert torch.equal(rows.view(torch.uint8), expected.view(torch.uint8))


def test_cast_to_changes_the_dtype_only(monkeypatch):
    calls = []
    real_to = torch.Tensor.to

    def recording_to(self, *args, **kwargs):
        calls.append((args, kwargs))
        return real_to(self, *args, **kwargs)

    weight = torch.arange(6, dtype=torch.bfloat16)
    like = torch.zeros(2, dtype=torch.float32)
    monkeypatch.setattr(torch.Tensor, "to", recording_to)
    cast = ops.cast_to(weight, like)
    monkeypatch.undo()
    assert cast.dtype == torch.float32
    assert torch.equal(cast, weight.float())
    assert calls == [((), {"dtype": torch.float32})]  # no device move, no non_blocking copy
    assert ops.cast_to(like, like) is like
    assert ops.cast_to(None, like) is None


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
@pytest.mark.parametrize("build", [lambda: T5Encoder(TINY_T5), lambda: CLIPTextEncoder(TINY_CLIP)])
def test_encoders_reject_bad_ids(build, ids, match):
    with pytest.raises(InvalidInputError, match=match):
        build()(ids)


def test_clip_rejects_sequences_longer_than_its_positions():
    with pytest.raises(InvalidInputError, match="max_length=16"):
        CLIPTextEncoder(TINY_CLIP)(torch.zeros(1, 17, dtype=torch.long))


def test_clip_rejects_float8_compute():
    with pytest.raises(InvalidInputError, match="dtype"):
        CLIPTextEncoder(TINY_CLIP)(torch.zeros(1, 4, dtype=torch.long), dtype=torch.float8_e4m3fn)


# --- prompt encoding -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dtype", "device", "expected"),
    [
        (torch.float32, "cpu", torch.float32),
        (torch.bfloat16, "cpu", torch.bfloat16),
        (torch.float16, "cpu", torch.bfloat16),
    ],
)
def test_t5_compute_dtype(dtype, device, expected):
    assert t5_compute_dtype(dtype, device) == expected


def test_t5_compute_dtype_rejects_other_dtypes():
    with pytest.raises(InvalidInputError, match="float64"):
        t5_compute_dtype(torch.float64, "cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_encode_prompts_composes_tokenizers_and_encoders(tmp_path, dtype):
    clip_tok = load_clip_tokenizer(write_clip_tokenizer(tmp_path / "clip"), max_length=16)
    t5_tok = load_t5_tokenizer(write_t5_tokenizer(tmp_path / "t5"), max_length=24)
    t5 = randomise_(T5Encoder(TINY_T5), seed=13).eval()
    clip = randomise_(CLIPTextEncoder(TINY_CLIP), seed=14).eval()
    prompts = ["a photo of a cat", "a red car in the forest at sunset, detailed painting"]

    txt, vec = encode_prompts(t5, clip, t5_tok, clip_tok, prompts, "cpu", dtype)

    assert txt.shape == (2, 24, TINY_T5.d_model)
    assert vec.shape == (2, TINY_CLIP.hidden_size)
    assert txt.dtype == dtype
    assert vec.dtype == dtype
    with torch.no_grad():
        expected_txt = t5(t5_tok(prompts), dtype=dtype)
        _, expected_vec = clip(clip_tok(prompts), dtype=dtype)
    assert torch.equal(txt, expected_txt)
    assert torch.equal(vec, expected_vec)
    assert not torch.equal(txt[0], txt[1])
    assert not torch.equal(vec[0], vec[1])


def test_encode_prompts_rejects_a_bare_string(tmp_path):
    clip_tok = load_clip_tokenizer(write_clip_tokenizer(tmp_path / "clip"), max_length=16)
    t5_tok = load_t5_tokenizer(write_t5_tokenizer(tmp_path / "t5"), max_length=24)
    with pytest.raises(InvalidInputError, match="list"):
        encode_prompts(
            T5Encoder(TINY_T5),
            CLIPTextEncoder(TINY_CLIP),
            t5_tok,
            clip_tok,
            "a cat",
            "cpu",
            torch.float32,
        )
