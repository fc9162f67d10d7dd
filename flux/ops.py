"""Layers whose weights may be stored in a narrower form than the dtype they compute in.

FLUX files come as fp32, fp16, bf16 or float8, as ComfyUI's scaled fp8 (fp8 times a per-layer
scale) or as GGUF block quantizations (Q8_0 ... Q2_K). Weights stay in memory as stored and each
layer turns its stored weight into the weight it computes with when it runs (`compute_weight`), in
the dtype of its input, so an fp8 file needs 1 byte a parameter, a Q4_K file 4.5 bits, and the
arithmetic runs in bf16 on a GPU or fp32 on a CPU:

- a plain tensor is cast (when the dtypes already agree nothing is copied);
- a scaled one (a `weight_scale` buffer on the layer, set by `flux.loading` for ComfyUI's scaled fp8
  and `comfy_quant` fp8 layers) becomes `weight.to(dtype).mul_(weight_scale)`: one copy in the compute
  dtype, scaled in place (about 7 bytes of traffic per weight in bf16, against 19 with an fp32 temporary;
  one more bf16 rounding, as ComfyUI's scaled-fp8 layers compute);
- a GGUF one (`gguf_type` set on the layer: `weight` holds the bytes of its blocks, one row of bytes
  per row of the weight, and `gguf_shape` the weight's shape) is dequantized on the layer's device
  (`flux.gguf_quants`), only the rows and columns asked for where the blocks allow it.

A Linear layer with an fp8 weight and `fp8_matmul` set (weight dtype `fp8_e4m3fn_fast`) multiplies
without upcasting, through `torch._scaled_mm`, where `flux.fp8_matmul.usable` says so.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import fp8_matmul
from .gguf_quants import GGML_TYPES, dequantize

FULL = slice(None)


def cast_to(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    """`t` in the dtype of `like` (a no-op when it already matches).

    Only the dtype changes: a weight on another device than its input is a placement bug, and
    torch's own error for it is clearer than a silent copy at every call.
    """
    if t is None:
        return None
    return t.to(dtype=like.dtype)


class StoredWeight:
    """How a layer's `weight` is stored, when it is not a plain tensor (see `compute_weight`)."""

    gguf_type: str | None = None  # a GGML block type: `weight` holds its bytes (rows, bytes per row)
    gguf_shape: tuple[int, ...] | None = None  # the weight's own shape, then
    fp8_matmul: bool = False  # an fp8 Linear weight multiplied as fp8 (`flux.fp8_matmul`)


def compute_weight(
    layer: nn.Module, like: torch.Tensor, rows: slice = FULL, cols: slice = FULL
) -> torch.Tensor:
    """The weight `layer` computes with, in the dtype of `like`, on the device of the stored weight.

    `rows`/`cols` restrict it to some output rows / input columns of a 2-D weight: a view for plain
    weights, and for GGUF ones only those rows (and columns, when they fall on block bounds) are
    dequantized.
    """
    if layer.gguf_type is not None:
        return _dequantized(layer, like.dtype, rows, cols)
    w = layer.weight if rows == FULL and cols == FULL else layer.weight[rows, cols]
    scale = layer._buffers.get("weight_scale")  # ComfyUI's scaled fp8: a per-layer fp32 scale
    if scale is not None:
        return w.to(like.dtype).mul_(scale) if w.dtype != like.dtype else w * scale
    return w.to(dtype=like.dtype)


def stored_linear(
    layer: nn.Linear, x: torch.Tensor, rows: slice = FULL, cols: slice = FULL, bias: bool = True
) -> torch.Tensor:
    """`F.linear` of x with the layer's weight restricted to `rows`/`cols` (and its bias to `rows`,
    when `bias`), through fp8 matrix products when the layer is marked for them and the device has
    them (`flux.fp8_matmul`); without the LoRAs."""
    b = layer.bias if bias and layer.bias is not None else None
    if b is not None and rows != FULL:
        b = b[rows]
    if layer.fp8_matmul and fp8_matmul.usable(x.device):
        w = layer.weight if rows == FULL and cols == FULL else layer.weight[rows, cols]
        how = fp8_matmul.granularity(x.device)
        return fp8_matmul.fp8_linear(x, w, layer._buffers.get("weight_scale"), b, how)
    return F.linear(x, compute_weight(layer, x, rows, cols), cast_to(b, x))


def _dequantized(layer: StoredWeight, dtype: torch.dtype, rows: slice, cols: slice) -> torch.Tensor:
    raw, shape, qtype = layer.weight, layer.gguf_shape, GGML_TYPES[layer.gguf_type]
    if not _rowwise(layer):  # rows of bytes that are not the weight's rows (a reshaped tensor)
        w = dequantize(raw, layer.gguf_type, dtype).reshape(shape)
        return w if rows == FULL and cols == FULL else w[rows, cols]
    if rows != FULL:
        raw = raw[rows]
    start, stop, step = cols.indices(shape[-1])
    block = qtype.block_size
    if cols != FULL and step == 1 and start % block == 0 and stop % block == 0:
        raw = raw[:, start // block * qtype.type_size : stop // block * qtype.type_size]
        cols = FULL
    w = dequantize(raw, layer.gguf_type, dtype)  # (rows, values per row)
    return w if cols == FULL else w[:, cols]


def _rowwise(layer: StoredWeight) -> bool:
    """Whether row r of the stored bytes decodes to row r of the 2-D weight."""
    shape, raw = layer.gguf_shape, layer.weight
    return len(shape) == 2 and raw.dim() == 2 and raw.shape[0] == shape[0]


class Linear(StoredWeight, nn.Linear):
    """`nn.Linear` that computes in its input's dtype whatever form its weight is stored in.

    `lora`: the LoRAs' low-rank updates (`flux.lora_adapter.LowRankAdapter`), added to the output at
    run time; None (no LoRA) by default. Not a parameter: the stored weights never change.
    """

    lora = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = stored_linear(self, x)
        return out if self.lora is None else self.lora.add_to(out, x)


class Conv2d(StoredWeight, nn.Conv2d):
    """`nn.Conv2d` that computes in its input's dtype whatever form its weight is stored in."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, compute_weight(self, x), cast_to(self.bias, x))


class Embedding(StoredWeight, nn.Embedding):
    """`nn.Embedding` whose output is in `out_dtype` (given per call) rather than the stored dtype.

    Only the rows looked up are gathered and then cast, scaled or dequantized: never the whole table.
    """

    def forward(self, ids: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        w = self.weight
        if self.gguf_type is not None:
            if not _rowwise(self):
                table = compute_weight(self, torch.empty(0, dtype=out_dtype or torch.float32))
                return F.embedding(ids, table)
            return dequantize(F.embedding(ids, w), self.gguf_type, out_dtype or torch.float32)
        if w.dtype.itemsize == 1:  # fp8: gather the bytes, since some torch versions (mid-2024)
            rows = F.embedding(ids, w.view(torch.uint8)).view(w.dtype)  # cannot index fp8 tables
        else:
            rows = F.embedding(ids, w)  # gather first: never cast the whole table
        scale = self._buffers.get("weight_scale")
        if scale is not None:
            return (rows.float() * scale).to(out_dtype or torch.float32)
        return rows if out_dtype is None else rows.to(out_dtype)


class TokenEmbedding(Embedding):
    """A vocabulary table (tens of thousands of rows): the one kind of embedding fp8 loading narrows.

    Small tables (T5's relative position bias, CLIP's positions) stay plain `Embedding`s and keep their
    stored dtype: narrowing them saves nothing and their error would reach every attention logit.
    """
