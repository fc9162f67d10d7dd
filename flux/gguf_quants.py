"""GGML tensor types and their dequantization in torch, vectorised over every block at once.

A GGUF file stores each tensor in one GGML type. F32, F16 and BF16 are plain torch dtypes. The
block types cut each row into blocks of 32 values (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1) or 256 values
(the "K-quants" Q2_K ... Q6_K) and store every block as `type_size` bytes: one or two fp16 scales,
packed sub-block scales (K-quants) and 2- to 8-bit integers. A row of N values therefore takes
N / block_size * type_size bytes, and rows stay whole: row r of the byte matrix (rows, bytes per row)
decodes to row r of the weight, which is what lets an embedding table decode only the rows it looks
up, and `linear_part` decode only some output rows.

`dequantize(raw, type_name, dtype)` turns such bytes (..., bytes per row) into values (..., values
per row). Each decoder works on all blocks of a tensor at once with torch tensor ops (shifts and
masks on uint8, no Python loop over blocks) and yields the integers q of each sub-block, its scale
dl and, for the types with a minimum, its offset (-ml): value = q * dl + offset (`_Decoded`). In
fp32 that is computed with the same operations in the same order as the reference decoder, so the
result is bit-identical to `gguf.quants.dequantize` (checked by tests/test_gguf.py for every type).

In a narrower `dtype` (bf16, fp16: the compute dtype of a GPU) the values are written straight in
that dtype, without an fp32 buffer of the whole weight and its cast (`_finish`):
- `q * dl` is one kernel that multiplies in fp32 and writes `dtype`: bit-identical to the reference
  rounded to `dtype` for the types without a minimum (Q8_0, Q4_0, Q5_0, Q3_K, Q6_K);
- the types with a minimum (Q4_1, Q5_1, Q2_K, Q4_K, Q5_K) then add the offset in `dtype`: two
  roundings instead of one, so a value is within u * (|q * dl| + |value|) of the exact one (u = 2^-8
  in bf16, 2^-11 in fp16), instead of u * |value|.
About 7 bytes of memory traffic per value in bf16 for Q4_K, against 27 for the fp32 path and its cast.

On the CPU the bit fields are cut with scalar shifts on contiguous copies of the byte fields, which
torch's CPU kernels run several times faster than on strided views; on other devices (GPUs, meta)
the fields stay views (no copies: fewer kernels). It runs on whatever device the bytes are on (meta
included, for memory estimates).

Block layouts (byte offsets within one block) follow llama.cpp's `ggml-common.h` and the numpy
reference decoders of its Python package, `gguf-py/gguf/quants.py`
(https://github.com/ggml-org/llama.cpp/blob/master/gguf-py/gguf/quants.py); type ids and sizes are
`GGMLQuantizationType` and `GGML_QUANT_SIZES` of `gguf-py/gguf/constants.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

QK_K = 256  # values per K-quant block


@dataclass(frozen=True)
class GGMLType:
    """One GGML tensor type: its id in the file, and how many values `type_size` bytes hold."""

    name: str
    type_id: int
    block_size: int  # values per block
    type_size: int  # bytes per block
    torch_dtype: torch.dtype | None = None  # for the plain float types

    def byte_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The (..., bytes per row) shape that holds a tensor of `shape` (..., values per row)."""
        return (*shape[:-1], shape[-1] // self.block_size * self.type_size)

    def nbytes(self, numel: int) -> int:
        return numel // self.block_size * self.type_size


# the types this package reads (ids and sizes: gguf-py's constants.py)
GGML_TYPES: dict[str, GGMLType] = {
    t.name: t
    for t in (
        GGMLType("F32", 0, 1, 4, torch.float32),
        GGMLType("F16", 1, 1, 2, torch.float16),
        GGMLType("BF16", 30, 1, 2, torch.bfloat16),
        GGMLType("Q4_0", 2, 32, 2 + 16),
        GGMLType("Q4_1", 3, 32, 2 + 2 + 16),
        GGMLType("Q5_0", 6, 32, 2 + 4 + 16),
        GGMLType("Q5_1", 7, 32, 2 + 2 + 4 + 16),
        GGMLType("Q8_0", 8, 32, 2 + 32),
        GGMLType("Q2_K", 10, QK_K, QK_K // 16 + QK_K // 4 + 2 + 2),
        GGMLType("Q3_K", 11, QK_K, QK_K // 8 + QK_K // 4 + 12 + 2),
        GGMLType("Q4_K", 12, QK_K, 2 + 2 + 12 + QK_K // 2),
        GGMLType("Q5_K", 13, QK_K, 2 + 2 + 12 + QK_K // 8 + QK_K // 2),
        GGMLType("Q6_K", 14, QK_K, QK_K // 2 + QK_K // 4 + QK_K // 16 + 2),
    )
}
GGML_TYPES_BY_ID = {t.type_id: t for t in GGML_TYPES.values()}
BLOCK_TYPES = tuple(name for name, t in GGML_TYPES.items() if t.torch_dtype is None)

# GGML types that exist but that this package does not decode (names for the error message)
OTHER_GGML_TYPES = {
    9: "Q8_1",
    15: "Q8_K",
    16: "IQ2_XXS",
    17: "IQ2_XS",
    18: "IQ3_XXS",
    19: "IQ1_S",
    20: "IQ4_NL",
    21: "IQ3_S",
    22: "IQ2_S",
    23: "IQ4_XS",
    24: "I8",
    25: "I16",
    26: "I32",
    27: "I64",
    28: "F64",
    29: "IQ1_M",
    34: "TQ1_0",
    35: "TQ2_0",
    39: "MXFP4",
    40: "NVFP4",
    41: "Q1_0",
}


def dequantize(raw: torch.Tensor, type_name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Bytes (..., bytes per row) of GGML type `type_name` -> values (..., values per row) in `dtype`.

    For F32/F16/BF16 `raw` may also be the tensor itself (any shape, that dtype): it is cast.
    """
    t = GGML_TYPES[type_name]
    if t.torch_dtype is not None:
        values = raw if raw.dtype == t.torch_dtype else raw.view(t.torch_dtype)
        return values.to(dtype)
    rows, nbytes = raw.shape[:-1], raw.shape[-1]
    blocks = raw.reshape(-1, t.type_size)  # (rows * blocks per row, type_size)
    values = _finish(_DECODERS[type_name](blocks), dtype)  # (rows * blocks per row, block_size)
    return values.reshape(*rows, nbytes // t.type_size * t.block_size).to(dtype)


@dataclass
class _Decoded:
    """A decoder's parts: value = q * dl (+ offset), shapes (N, S, L) and (N, S, 1), one row per block."""

    q: torch.Tensor  # the integers, uint8 or int8
    dl: torch.Tensor  # fp32 scale per sub-block
    offset: torch.Tensor | None = None  # fp32 per sub-block (minus the minimum), when the type has one


NARROW_DTYPES = (torch.bfloat16, torch.float16)


def _finish(parts: _Decoded, dtype: torch.dtype) -> torch.Tensor:
    """(N, S, L) values in fp32 (bit-exact) or, for bf16/fp16, written in that dtype (see the docstring)."""
    q, dl, offset = parts.q, parts.dl, parts.offset
    n = q.shape[0]
    if dtype not in NARROW_DTYPES:
        values = q.float().mul_(dl)
        return (values if offset is None else values.add_(offset)).reshape(n, -1)
    values = torch.empty(q.shape, dtype=dtype, device=q.device)
    torch.mul(q, dl, out=values)  # multiplied in fp32, rounded once to dtype
    if offset is not None:
        values.add_(offset)
    return values.reshape(n, -1)  # (N, S, L) -> (N, S * L)


# --- helpers --------------------------------------------------------------------------------------


def _split(blocks: torch.Tensor, *sizes: int) -> list[torch.Tensor]:
    """The byte fields of each block: (N, type_size) -> [(N, size), ...] in order; contiguous copies
    on the CPU (torch's CPU element-wise kernels are much slower on the strided views), views elsewhere."""
    fields = torch.split(blocks, sizes, dim=1)
    return [f.contiguous() for f in fields] if blocks.device.type == "cpu" else list(fields)


def _half(field: torch.Tensor) -> torch.Tensor:
    """A 2-byte little-endian fp16 field (N, 2) -> (N, 1) fp32."""
    return field.view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """Bytes (N, G, L) -> 4-bit values (N, G, 2, L): low nibbles first, then high ones."""
    return torch.stack([qs & 0x0F, qs >> 4], dim=-2)


def _bits(qh: torch.Tensor, count: int, width: int = 1) -> torch.Tensor:
    """Bytes (N, G, L) -> fields of `width` bits (N, G, count, L): field i of byte b is bits
    i*width .. of b (the layout of the K-quants' high bits and Q2_K/Q3_K's packed values).

    Shifts by a number, one per field (`count` <= 8 ops, whatever the tensor's size): torch's
    element-wise kernels are several times faster with a scalar than with a broadcast tensor.
    """
    mask = (1 << width) - 1
    return torch.stack([(qh >> (i * width)) & mask for i in range(count)], dim=-2)


def _high_bits_32(qh: torch.Tensor) -> torch.Tensor:
    """A 4-byte little-endian bit field (N, 4) -> bit j of the 32-bit word at position j (N, 32)."""
    return _bits(qh.unsqueeze(-1), 8).reshape(-1, 32)  # (N, 4 bytes, 8 bits, 1) -> "N (byte bit)"


# --- 32-value blocks ------------------------------------------------------------------------------


def _q8_0(blocks: torch.Tensor) -> torch.Tensor:
    d, qs = _split(blocks, 2, 32)  # fp16 scale, 32 int8
    return _Decoded(qs.view(torch.int8).unsqueeze(1), _half(d).unsqueeze(-1))  # (N, 1, 32), (N, 1, 1)


def _q4_0(blocks: torch.Tensor) -> torch.Tensor:
    d, qs = _split(blocks, 2, 16)  # fp16 scale, 32 4-bit values: byte i holds values i and i + 16
    q = _nibbles(qs.unsqueeze(1)).reshape(-1, 1, 32)  # "N 1 2 16 -> N 1 (2 16)"
    return _Decoded(q.view(torch.int8) - 8, _half(d).unsqueeze(-1))


def _q4_1(blocks: torch.Tensor) -> torch.Tensor:
    d, m, qs = _split(blocks, 2, 2, 16)  # fp16 scale, fp16 minimum, 32 4-bit values
    q = _nibbles(qs.unsqueeze(1)).reshape(-1, 1, 32)
    return _Decoded(q, _half(d).unsqueeze(-1), _half(m).unsqueeze(-1))


def _q5_0(blocks: torch.Tensor) -> torch.Tensor:
    d, qh, qs = _split(blocks, 2, 4, 16)  # fp16 scale, the 5th bit of each value, low 4 bits
    q = _nibbles(qs.unsqueeze(1)).reshape(-1, 32) | (_high_bits_32(qh) << 4)
    return _Decoded((q.view(torch.int8) - 16).unsqueeze(1), _half(d).unsqueeze(-1))


def _q5_1(blocks: torch.Tensor) -> torch.Tensor:
    d, m, qh, qs = _split(blocks, 2, 2, 4, 16)
    q = _nibbles(qs.unsqueeze(1)).reshape(-1, 32) | (_high_bits_32(qh) << 4)
    return _Decoded(q.unsqueeze(1), _half(d).unsqueeze(-1), _half(m).unsqueeze(-1))


# --- 256-value blocks (K-quants) ------------------------------------------------------------------


def _q2_k(blocks: torch.Tensor) -> torch.Tensor:
    # 16 sub-blocks of 16: a byte of 4-bit scale and 4-bit minimum each, 2-bit values, fp16 d, dmin
    scales, qs, d, dmin = _split(blocks, QK_K // 16, QK_K // 4, 2, 2)
    dl = (_half(d) * (scales & 0x0F).float()).unsqueeze(-1)  # (N, 16, 1)
    ml = (_half(dmin) * (scales >> 4).float()).unsqueeze(-1)
    q = _bits(qs.reshape(-1, 2, 32), 4, width=2).reshape(-1, QK_K // 16, 16)  # (N, 2, 4, 32) -> 16 x 16
    return _Decoded(q, dl, ml.neg_())


def _q3_k(blocks: torch.Tensor) -> torch.Tensor:
    # high bits of the 3-bit values, their low 2 bits, 16 6-bit scales packed in 12 bytes, fp16 d
    hmask, qs, scales, d = _split(blocks, QK_K // 8, QK_K // 4, 12, 2)
    low = _nibbles(scales[:, :8].unsqueeze(1)).reshape(-1, 16)  # bytes 0-7: low 4 bits
    high = _bits(scales[:, 8:].unsqueeze(1), 4, width=2).reshape(-1, 16)  # bytes 8-11: top 2 bits
    sc = ((low | (high << 4)).to(torch.int8) - 32).float()
    dl = (_half(d) * sc).unsqueeze(-1)  # (N, 16, 1)
    ql = _bits(qs.reshape(-1, 2, 32), 4, width=2).reshape(-1, 16, 16)  # (N, 2, 4, 32) -> 16 x 16
    qh = _bits(hmask.unsqueeze(1), 8).reshape(-1, 16, 16) ^ 1  # a set bit means no offset of -4
    q = ql.view(torch.int8) - (qh << 2).view(torch.int8)
    return _Decoded(q, dl)


def _scale_min_k4(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 8 6-bit scales and 8 6-bit minimums that Q4_K and Q5_K pack in 12 bytes, each (N, 8)."""
    d, m, md = scales.reshape(-1, 3, 4).unbind(1)  # bytes 0-3, 4-7, 8-11
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn


def _q4_k(blocks: torch.Tensor) -> torch.Tensor:
    d, dmin, scales, qs = _split(blocks, 2, 2, 12, QK_K // 2)  # 8 sub-blocks of 32
    sc, mn = _scale_min_k4(scales)
    dl = (_half(d) * sc.float()).unsqueeze(-1)  # (N, 8, 1)
    ml = (_half(dmin) * mn.float()).unsqueeze(-1)
    q = _nibbles(qs.reshape(-1, 4, 32)).reshape(-1, 8, 32)  # (N, 4, 2, 32) -> 8 x 32
    return _Decoded(q, dl, ml.neg_())


def _q5_k(blocks: torch.Tensor) -> torch.Tensor:
    d, dmin, scales, qh, qs = _split(blocks, 2, 2, 12, QK_K // 8, QK_K // 2)
    sc, mn = _scale_min_k4(scales)
    dl = (_half(d) * sc.float()).unsqueeze(-1)
    ml = (_half(dmin) * mn.float()).unsqueeze(-1)
    ql = _nibbles(qs.reshape(-1, 4, 32)).reshape(-1, 8, 32)
    high = _bits(qh.unsqueeze(1), 8).reshape(-1, 8, 32)  # bit i of byte j -> value j of sub-block i
    return _Decoded(ql | (high << 4), dl, ml.neg_())


def _q6_k(blocks: torch.Tensor) -> torch.Tensor:
    # low 4 bits, high 2 bits, 16 int8 sub-block scales, fp16 d
    ql, qh, scales, d = _split(blocks, QK_K // 2, QK_K // 4, QK_K // 16, 2)
    dl = (_half(d) * scales.view(torch.int8).float()).unsqueeze(-1)  # (N, 16, 1)
    low = _nibbles(ql.reshape(-1, 2, 64)).reshape(-1, 8, 32)  # (N, 2, 2, 64) -> 8 x 32
    high = _bits(qh.reshape(-1, 2, 32), 4, width=2).reshape(-1, 8, 32)  # (N, 2, 4, 32) -> 8 x 32
    q = ((low | (high << 4)).view(torch.int8) - 32).reshape(-1, QK_K // 16, 16)  # 8 x 32 -> 16 x 16
    return _Decoded(q, dl)


_DECODERS = {
    "Q8_0": _q8_0,
    "Q4_0": _q4_0,
    "Q4_1": _q4_1,
    "Q5_0": _q5_0,
    "Q5_1": _q5_1,
    "Q2_K": _q2_k,
    "Q3_K": _q3_k,
    "Q4_K": _q4_k,
    "Q5_K": _q5_k,
    "Q6_K": _q6_k,
}
