"""Building blocks of the FLUX.1 transformer: embedders, QK-norm, modulation, double and single blocks.

Follows Black Forest Labs' reference, `src/flux/modules/layers.py` and `src/flux/math.py` in
https://github.com/black-forest-labs/flux. Module
and parameter names follow the reference so that `state_dict()` keys are those of
flux1-schnell.safetensors.

Conventions: activations are (B, L, D) and attention heads are kept as (B, L, H, D) until the
attention call. Every Linear is `ops.Linear`, which computes in its input's dtype whatever dtype the
weight is stored in. LayerNorms have no affine parameters and eps 1e-6; modulation is applied as
`(1 + scale) * LayerNorm(x) + shift`, and residual updates as `x + gate * f(x)`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .ops import Linear, cast_to, stored_linear
from .rope import apply_rope

NORM_EPS = 1e-6  # LayerNorm and QK RMSNorm epsilon of the reference


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """`(1 + scale) * LayerNorm(x) + shift`; x (B, L, D), shift and scale (B, 1, D)."""
    normed = F.layer_norm(x, (x.shape[-1],), eps=NORM_EPS)
    return torch.addcmul(shift, 1 + scale, normed)


def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """SDPA with the default 1/sqrt(D) scale, no mask. q, k, v (B, L, H, D) -> (B, L, H*D)."""
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    )  # "B L H D -> B H L D" for the inputs; out (B, H, L, D)
    return out.transpose(1, 2).flatten(2)  # "B H L D -> B L (H D)"


def linear_part(
    layer: Linear, x: Tensor, rows: slice = slice(None), cols: slice = slice(None), bias: bool = True
) -> Tensor:
    """`layer` restricted to some output rows / input columns of its stored weight (a view of a plain
    weight; only those rows of a GGUF one are dequantized)."""
    out = stored_linear(layer, x, rows, cols, bias)
    return out if layer.lora is None else layer.lora.add_to(out, x, rows, cols)


def qkv_heads(qkv: Tensor, num_heads: int, norm: QKNorm, pe: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Fused projections (B, L, 3*H*D) -> q, k (QK-normed, then rotated by pe) and v, each (B, L, H, D)."""
    b, seq, width = qkv.shape
    heads = qkv.view(b, seq, 3, num_heads, width // (3 * num_heads))  # "B L (K H D) -> B L K H D"
    q, k, v = heads.unbind(2)  # [q | k | v], each (B, L, H, D)
    q, k = norm(q, k, v)
    q = apply_rope(q, pe)  # one at a time, so each unrotated copy is freed at once
    k = apply_rope(k, pe)
    return q, k, v


class MLPEmbedder(nn.Module):
    """Linear -> SiLU -> Linear (keys `in_layer`, `out_layer`)."""

    def __init__(self, in_dim: int, hidden_dim: int):
        super().__init__()
        self.in_layer = Linear(in_dim, hidden_dim)
        self.out_layer = Linear(hidden_dim, hidden_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(F.silu(self.in_layer(x)))


class RMSNorm(nn.Module):
    """RMS norm over the head dim: float32 statistics, cast back to x's dtype, then times `scale`."""

    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return rms_normalize(x) * cast_to(self.scale, x)


def rms_normalize(x: Tensor) -> Tensor:
    """`x * rsqrt(mean(x^2) + eps)` over the last dim, computed in float32, rounded once to x's dtype."""
    if hasattr(F, "rms_norm"):  # torch >= 2.4: one fused kernel that computes in float32
        return F.rms_norm(x, (x.shape[-1],), eps=NORM_EPS)
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + NORM_EPS)).to(x.dtype)


class QKNorm(nn.Module):
    """Separate RMS norms for queries and keys (keys `query_norm.scale`, `key_norm.scale`)."""

    def __init__(self, head_dim: int):
        super().__init__()
        self.query_norm = RMSNorm(head_dim)
        self.key_norm = RMSNorm(head_dim)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return self.query_norm(q).to(v.dtype), self.key_norm(k).to(v.dtype)


class Modulation(nn.Module):
    """`lin(silu(vec))` cut into 3 (single block) or 6 (double block) (B, 1, D) chunks.

    Chunk order: (shift, scale, gate) for the attention branch, then the same for the MLP branch.
    """

    def __init__(self, dim: int, double: bool):
        super().__init__()
        self.multiplier = 6 if double else 3
        self.lin = Linear(dim, self.multiplier * dim)

    def forward(self, vec: Tensor) -> tuple[Tensor, ...]:
        out = self.lin(F.silu(vec))[:, None, :]  # (B, 1, multiplier * D)
        return out.chunk(self.multiplier, dim=-1)


class SelfAttention(nn.Module):
    """Weights of one stream's attention: fused `qkv`, QK `norm`, output `proj`.

    The double block runs the attention itself, jointly over both streams.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = Linear(dim, 3 * dim, bias=qkv_bias)
        self.norm = QKNorm(dim // num_heads)
        self.proj = Linear(dim, dim)

    def heads(self, x: Tensor, pe: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, L, D) -> q, k (normed, rotated) and v, each (B, L, H, D/H)."""
        return qkv_heads(self.qkv(x), self.num_heads, self.norm, pe)


FP16_MAX = float(torch.finfo(torch.float16).max)  # 65504


def keep_finite(x: Tensor) -> Tensor:
    """In fp16, the residual stream `x` with inf/-inf at +-65504 and NaN at 0; other dtypes as they are.

    FLUX's residual streams grow past fp16's range in some blocks (huggingface/diffusers#9096). The
    known fix clips them after each block: diffusers after the text stream of its double blocks and
    after its single blocks (https://github.com/huggingface/diffusers/pull/9097,
    `transformer_flux.py`); ComfyUI with `nan_to_num` on `txt` after each double block and on the
    stream after each single block (https://github.com/comfyanonymous/ComfyUI, `comfy/ldm/flux/layers.py`).
    Here both streams of a double block are kept finite, and the joint one after a single block.
    """
    if x.dtype != torch.float16:
        return x
    return torch.nan_to_num(x, nan=0.0, posinf=FP16_MAX, neginf=-FP16_MAX)


def mlp(hidden: int, mlp_hidden: int) -> nn.Sequential:
    """Linear -> GELU(tanh) -> Linear, keys `0` and `2` as in the reference."""
    return nn.Sequential(Linear(hidden, mlp_hidden), nn.GELU(approximate="tanh"), Linear(mlp_hidden, hidden))


class DoubleStreamBlock(nn.Module):
    """Image and text streams with separate weights and one joint attention over [txt, img]."""

    def __init__(self, hidden: int, num_heads: int, mlp_hidden: int, qkv_bias: bool):
        super().__init__()
        self.img_mod = Modulation(hidden, double=True)
        self.img_attn = SelfAttention(hidden, num_heads, qkv_bias)
        self.img_mlp = mlp(hidden, mlp_hidden)
        self.txt_mod = Modulation(hidden, double=True)
        self.txt_attn = SelfAttention(hidden, num_heads, qkv_bias)
        self.txt_mlp = mlp(hidden, mlp_hidden)

    def forward(self, img: Tensor, txt: Tensor, vec: Tensor, pe: Tensor) -> tuple[Tensor, Tensor]:
        """img (B, N, D), txt (B, L, D), vec (B, D), pe for the L + N tokens -> (img, txt)."""
        img_sh1, img_sc1, img_g1, img_sh2, img_sc2, img_g2 = self.img_mod(vec)
        txt_sh1, txt_sc1, txt_g1, txt_sh2, txt_sc2, txt_g2 = self.txt_mod(vec)
        q, k, v = self.joint_heads(modulate(img, img_sh1, img_sc1), modulate(txt, txt_sh1, txt_sc1), pe)
        attn = attention(q, k, v)  # (B, L + N, D), text first
        del q, k, v  # (dels here and below free activations early: lower peak memory)
        img = torch.addcmul(img, img_g1, self.img_attn.proj(attn[:, txt.shape[1] :]))
        txt = torch.addcmul(txt, txt_g1, self.txt_attn.proj(attn[:, : txt.shape[1]]))
        del attn
        img = torch.addcmul(img, img_g2, self.img_mlp(modulate(img, img_sh2, img_sc2)))
        txt = torch.addcmul(txt, txt_g2, self.txt_mlp(modulate(txt, txt_sh2, txt_sc2)))
        return keep_finite(img), keep_finite(txt)

    def joint_heads(self, img: Tensor, txt: Tensor, pe: Tensor) -> list[Tensor]:
        """Modulated img (B, N, D), txt (B, L, D) -> joint q, k, v, each (B, L + N, H, D/H), text first."""
        img_q, img_k, img_v = self.img_attn.heads(img, pe[:, txt.shape[1] :])
        txt_q, txt_k, txt_v = self.txt_attn.heads(txt, pe[:, : txt.shape[1]])
        return [torch.cat(pair, dim=1) for pair in ((txt_q, img_q), (txt_k, img_k), (txt_v, img_v))]


class SingleStreamBlock(nn.Module):
    """Parallel attention and MLP over the joint sequence, with fused in (`linear1`) and out (`linear2`)."""

    def __init__(self, hidden: int, num_heads: int, mlp_hidden: int):
        super().__init__()
        self.num_heads = num_heads
        self.mlp_hidden = mlp_hidden
        self.linear1 = Linear(hidden, 3 * hidden + self.mlp_hidden)  # always with a bias
        self.linear2 = Linear(hidden + self.mlp_hidden, hidden)
        self.norm = QKNorm(hidden // num_heads)
        self.modulation = Modulation(hidden, double=False)

    def forward(self, x: Tensor, vec: Tensor, pe: Tensor) -> Tensor:
        """x (B, L, D) -> (B, L, D)."""
        shift, scale, gate = self.modulation(vec)
        # linear1's rows are [q | k | v | mlp] and linear2's columns [attn | mlp]. Running each as two
        # matmuls on views of the stored weights (as fast) avoids keeping the whole linear1 output
        # alive through the attention and concatenating [attn, mlp]: a lower peak memory.
        width = x.shape[-1]
        x_mod = modulate(x, shift, scale)
        qkv = linear_part(self.linear1, x_mod, rows=slice(3 * width))  # (B, L, 3D)
        q, k, v = qkv_heads(qkv, self.num_heads, self.norm, pe)
        del qkv
        attn = attention(q, k, v)  # (B, L, D)
        del q, k, v
        mlp = F.gelu(linear_part(self.linear1, x_mod, rows=slice(3 * width, None)), approximate="tanh")
        del x_mod
        out = linear_part(self.linear2, attn, cols=slice(width), bias=False)  # (B, L, D)
        out += linear_part(self.linear2, mlp, cols=slice(width, None))
        return keep_finite(torch.addcmul(x, gate, out))


class LastLayer(nn.Module):
    """`(1 + scale) * LN(x) + shift` with (shift, scale) = adaLN(vec), shift first; then a Linear."""

    def __init__(self, hidden: int, out_channels: int):
        super().__init__()
        self.linear = Linear(hidden, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), Linear(hidden, 2 * hidden))

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(vec)[:, None, :].chunk(2, dim=-1)  # 2 x (B, 1, D)
        return self.linear(modulate(x, shift, scale))
