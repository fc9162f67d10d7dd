"""Layers whose weights may be stored in a narrower dtype than the one they compute in.

FLUX files come as fp32, fp16, bf16 or float8_e4m3fn. Weights stay in memory as stored and each layer
casts its weight (and bias) to the dtype of its input when it runs, so an fp8 file needs 1 byte a
parameter and the arithmetic runs in bf16 on a GPU or fp32 on a CPU. When the dtypes already agree
nothing is copied.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def cast_to(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    """`t` in the dtype of `like` (a no-op when it already matches).

    Only the dtype changes: a weight on another device than its input is a placement bug, and
    torch's own error for it is clearer than a silent copy at every call.
    """
    if t is None:
        return None
    return t.to(dtype=like.dtype)


class Linear(nn.Linear):
    """`nn.Linear` that computes in its input's dtype whatever dtype its weight is stored in.

    `lora`: the LoRAs' low-rank updates (`flux.lora_adapter.LowRankAdapter`), added to the output at
    run time; None (no LoRA) by default. Not a parameter: the stored weights never change.
    """

    lora = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, cast_to(self.weight, x), cast_to(self.bias, x))
        return out if self.lora is None else self.lora.add_to(out, x)


class Conv2d(nn.Conv2d):
    """`nn.Conv2d` that computes in its input's dtype whatever dtype its weight is stored in."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, cast_to(self.weight, x), cast_to(self.bias, x))


class Embedding(nn.Embedding):
    """`nn.Embedding` whose output is in `out_dtype` (given per call) rather than the stored dtype."""

    def forward(self, ids: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        w = self.weight
        if w.dtype.itemsize == 1:  # fp8: gather the bytes, since some torch versions (mid-2024)
            rows = F.embedding(ids, w.view(torch.uint8)).view(w.dtype)  # cannot index fp8 tables
        else:
            rows = F.embedding(ids, w)  # gather first: never cast the whole table
        return rows if out_dtype is None else rows.to(out_dtype)


class TokenEmbedding(Embedding):
    """A vocabulary table (tens of thousands of rows): the one kind of embedding fp8 loading narrows.

    Small tables (T5's relative position bias, CLIP's positions) stay plain `Embedding`s and keep their
    stored dtype: narrowing them saves nothing and their error would reach every attention logit.
    """
