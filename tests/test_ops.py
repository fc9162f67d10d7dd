"""Tests of flux/ops.py, the layers that compute in their input's dtype whatever dtype their weights
are stored in.

- The T5 and CLIP encoders (built from these layers) with weights stored as bf16 / fp16 /
  float8_e4m3fn compute in fp32 exactly as with the same values held in fp32, and nothing is widened
  in place.
- `Embedding` gathers rows of any stored dtype (fp8 included, without an fp8 index kernel) and
  `cast_to` changes the dtype only.
"""

from __future__ import annotations

import pytest
import torch
from comfyui_flux_schnell.flux import ops
from comfyui_flux_schnell.flux.clip import CLIPTextEncoder
from comfyui_flux_schnell.flux.t5 import T5Encoder
from support.text_encoder_cases import TOL, UNEVEN_CLIP, UNEVEN_T5, clip_ids, randomise_, t5_ids

# --- stored dtypes -------------------------------------------------------------------------------

STORED = [torch.bfloat16, torch.float16, torch.float8_e4m3fn]


def _ids_for(model: torch.nn.Module) -> torch.LongTensor:
    if isinstance(model, T5Encoder):
        return t5_ids([6, 17], total=20, vocab=UNEVEN_T5.vocab_size, seed=11)
    return clip_ids([3, 9], total=14, vocab=UNEVEN_CLIP.vocab_size, seed=11)


@pytest.mark.parametrize("stored", STORED, ids=str)
@pytest.mark.parametrize("build", [lambda: T5Encoder(UNEVEN_T5), lambda: CLIPTextEncoder(UNEVEN_CLIP)])
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


# --- Embedding and cast_to -----------------------------------------------------------------------


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
