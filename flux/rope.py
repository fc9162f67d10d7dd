"""Position and time encodings of the FLUX.1 transformer: 3-axis RoPE and the sinusoidal timestep embedding.

Follows Black Forest Labs' reference, `src/flux/math.py` and `src/flux/modules/layers.py` in
https://github.com/black-forest-labs/flux.

- RoPE: every token carries 3 integer-valued ids (axis 0, row, col). Axis i rotates `axes_dim[i]` of
  the head's features, as interleaved pairs (2j, 2j+1), by the angle `id_i * theta**(-2j/axes_dim[i])`.
  The table is a 2x2 rotation matrix per pair, `[[cos, -sin], [sin, cos]]`, always in float32, and the
  rotation itself is computed in float32 whatever the activation dtype.
- Timestep embedding: `t * 1000` (in t's own dtype, so bf16 rounds 0.75 to 752 as the reference does),
  then `[cos(args), sin(args)]` (cos first) with `args = t * 10000**(-k/half)` in float32.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def rope(pos: Tensor, dim: int, theta: int) -> Tensor:
    """Rotation matrices for one axis: pos (B, L) -> (B, L, dim/2, 2, 2) float32."""
    if dim % 2:
        raise ValueError(f"RoPE axis dim must be even, got {dim}")
    exponent = torch.arange(0, dim, 2, dtype=torch.float32, device=pos.device) / dim
    omega = 1.0 / (theta**exponent)  # (dim/2,)
    angle = pos.float()[..., None] * omega  # (B, L, dim/2)
    cos, sin = torch.cos(angle), torch.sin(angle)
    matrix = torch.stack((cos, -sin, sin, cos), dim=-1)  # (B, L, dim/2, 4)
    return matrix.view(*angle.shape, 2, 2)  # "B L P (i j) -> B L P i j": [[cos, -sin], [sin, cos]]


def rope_table(ids: Tensor, axes_dim: tuple[int, ...], theta: int) -> Tensor:
    """RoPE table for ids (B, L, n_axes) -> (B, L, 1, D/2, 2, 2) float32, D = sum(axes_dim).

    The singleton axis broadcasts over heads in the (B, L, H, D) layout `apply_rope` works on.
    """
    if ids.ndim != 3 or ids.shape[-1] != len(axes_dim):
        raise ValueError(
            f"position ids must have shape (batch, tokens, {len(axes_dim)}), got {tuple(ids.shape)}"
        )
    tables = [rope(ids[..., i], d, theta) for i, d in enumerate(axes_dim)]
    return torch.cat(tables, dim=-3).unsqueeze(2)  # (B, L, 1, D/2, 2, 2)


def apply_rope(x: Tensor, pe: Tensor) -> Tensor:
    """Rotate x (B, L, H, D) by pe (B, L, 1, D/2, 2, 2); computed in float32, returned in x's dtype.

    Pair p = (x[2p], x[2p+1]) becomes (cos*x0 - sin*x1, sin*x0 + cos*x1).
    """
    pairs = x.view(*x.shape[:-1], -1, 1, 2)  # "B L H (P two) -> B L H P 1 two"
    # pe[..., 0] is the column (cos, sin), pe[..., 1] the column (-sin, cos); each (B, L, 1, D/2, 2).
    # Mixed-dtype arithmetic promotes to float32 inside the kernels, so bf16 x needs no float copy.
    out = pe[..., 0] * pairs[..., 0]  # (B, L, H, D/2, 2) float32
    out.addcmul_(pe[..., 1], pairs[..., 1])  # in place: one float32 temporary fewer
    return out.view(x.shape).to(x.dtype)  # "B L H P two -> B L H (P two)"


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10_000.0, time_factor: float = 1000.0):
    """Sinusoidal embedding of t (B,) -> (B, dim) in t's dtype: [cos(args), sin(args)], cos first."""
    if dim % 2:
        raise ValueError(f"timestep embedding dim must be even, got {dim}")
    t = time_factor * t  # in t's dtype on purpose: bf16 rounds 750 to 752 exactly like the reference
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )  # (half,)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat((torch.cos(args), torch.sin(args)), dim=-1)  # (B, dim)
    return emb.to(t.dtype) if t.is_floating_point() else emb
