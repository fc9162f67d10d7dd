"""The low-rank updates one Linear layer adds to its output at run time (its LoRAs).

A LoRA changes a layer's weight W (out, in) by `scale * up @ down`, with down (r, in), up (out, r)
and scale = strength * alpha / r. Instead of merging that product into W (a second copy of every
weight, and on an fp8 or quantized base a rounding back into the stored format), the layer adds
`scale * up @ (down @ x)` to its output: the same result as running the merged weight, at r * (in +
out) multiply-adds a token instead of in * out, and the stored weights are never touched, so a new
LoRA or strength costs no reload.

Several LoRAs on one layer are stacked along the rank: all `down`s form one (R, in) matrix, run as
one matmul. A LoRA may update only a row range of the layer (diffusers' split q/k/v of a fused qkv
layer): updates are kept in groups by row range, each group one (rows, r_group) `up`, the scales
folded in. `add_to` also serves the parts of a layer that `flux.layers.linear_part` runs (a row
range, a column range of the input).

The adapter lives on its layer as the attribute `lora` (not a parameter or buffer: outside
`state_dict`), with a CPU home copy; `to(device)` places it beside the layer's weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LowRankPiece:
    """One LoRA's update of one layer: rows [start, stop) += up @ down (scale folded into up)."""

    start: int
    stop: int
    down: torch.Tensor  # (r, in)
    up: torch.Tensor  # (stop - start, r), already multiplied by strength * alpha / r


@dataclass
class _Group:
    start: int  # output rows [start, stop)
    stop: int
    rank_start: int  # its ranks [rank_start, rank_stop) of the stacked down
    rank_stop: int
    up: torch.Tensor  # (stop - start, rank_stop - rank_start)


class LowRankAdapter:
    """The sum of low-rank updates of one Linear layer of `out_features` outputs."""

    def __init__(self, out_features: int, pieces: Sequence[LowRankPiece], dtype: torch.dtype):
        if not pieces:
            raise ValueError("a LowRankAdapter needs at least one piece")
        self.out_features = out_features
        by_rows: dict[tuple[int, int], list[LowRankPiece]] = {}
        for piece in pieces:
            by_rows.setdefault((piece.start, piece.stop), []).append(piece)
        downs, self._home_groups, rank = [], [], 0
        for (start, stop), group in sorted(by_rows.items()):
            r = sum(p.down.shape[0] for p in group)
            downs += [p.down for p in group]
            up = torch.cat([p.up for p in group], dim=1).to(dtype)  # (stop - start, r)
            self._home_groups.append(_Group(start, stop, rank, rank + r, up))
            rank += r
        self._home_down = torch.cat(downs).to(dtype)  # (R, in)
        self.rank = rank
        self.dtype = dtype
        self.device = torch.device("cpu")
        self.down, self.groups = self._home_down, self._home_groups

    @property
    def nbytes(self) -> int:
        """Bytes of one copy (home or placed)."""
        tensors = [self._home_down, *(g.up for g in self._home_groups)]
        return sum(t.numel() * t.element_size() for t in tensors)

    def to(self, device: torch.device | str) -> LowRankAdapter:
        """Place the adapter on `device` (a copy; the CPU home copy is kept and reused)."""
        device = torch.device(device)
        if device == self.device:
            return self
        if device.type == "cpu":
            self.down, self.groups = self._home_down, self._home_groups
        else:
            self.down = self._home_down.to(device, non_blocking=True)
            self.groups = [
                _Group(g.start, g.stop, g.rank_start, g.rank_stop, g.up.to(device, non_blocking=True))
                for g in self._home_groups
            ]
        self.device = device
        return self

    def delta_weight(self) -> torch.Tensor:
        """The dense update of the weight, (out_features, in) in float32 (for checks, not for runs)."""
        delta = torch.zeros(self.out_features, self.down.shape[1], device=self.down.device)
        for g in self.groups:
            delta[g.start : g.stop] += g.up.float() @ self.down[g.rank_start : g.rank_stop].float()
        return delta

    def add_to(
        self, out: torch.Tensor, x: torch.Tensor, rows: slice | None = None, cols: slice | None = None
    ) -> torch.Tensor:
        """`out` (..., n_rows) plus this update applied to `x` (..., n_cols), in place.

        `rows` / `cols` restrict the layer to some output rows / input columns, as
        `flux.layers.linear_part` does; by default the whole layer.
        """
        r0, r1 = (0, self.out_features) if rows is None else rows.indices(self.out_features)[:2]
        needed = [g for g in self.groups if g.start < r1 and g.stop > r0]
        if not needed:
            return out
        k0 = min(g.rank_start for g in needed)
        k1 = max(g.rank_stop for g in needed)
        down = self.down[k0:k1] if cols is None else self.down[k0:k1, cols]
        h = F.linear(x, down.to(x.dtype)).view(-1, k1 - k0)  # (tokens, k1 - k0)
        flat = out.view(-1, r1 - r0)  # (tokens, n_rows): F.linear's output is contiguous
        for g in needed:
            lo, hi = max(g.start, r0), min(g.stop, r1)
            up = g.up[lo - g.start : hi - g.start].to(x.dtype)  # (hi - lo, r_group)
            # one GEMM that accumulates into the output (beta = 1): no (tokens, rows) temporary
            flat[:, lo - r0 : hi - r0].addmm_(h[:, g.rank_start - k0 : g.rank_stop - k0], up.T)
        return out
