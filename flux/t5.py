"""The T5 v1.1 encoder that turns a FLUX prompt into the (B, 256, 4096) text sequence.

Based on the T5 paper (Raffel et al., 2020, https://arxiv.org/abs/1910.10683) with the v1.1 changes
(gated-GELU feed-forward, no bias anywhere, no tied output head), checked against transformers'
`T5EncoderModel` (src/transformers/models/t5/modeling_t5.py in
https://github.com/huggingface/transformers), which the tests use as the reference. What FLUX needs:

- RMS layer norm without mean subtraction. As in transformers, the variance is taken in fp32, the
  normalised value is cast back to the compute dtype and only then multiplied by the scale.
- Attention logits are NOT scaled by 1/sqrt(d_kv); a learned relative position bias (bidirectional
  buckets, block 0 only) is added to them instead. It is computed once per forward and shared by
  every layer, and goes into `scaled_dot_product_attention` as an additive float mask.
- FLUX calls the encoder without an attention mask, so padding tokens are attended.

Precision: weights may be stored as fp32/fp16/bf16/float8_e4m3fn and are cast to the compute dtype
per layer (`flux/ops.py`). The compute dtype must be bf16 or fp32: the feed-forward activations of
the real T5-XXL checkpoints exceed the fp16 range (~65504) and turn into inf/NaN, so fp16 is refused.

State-dict keys are the transformers layout of single-file `t5xxl_*.safetensors`:
`shared.weight`, `encoder.block.N.layer.0.SelfAttention.{q,k,v,o}.weight`,
`encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight`,
`encoder.block.N.layer.{0,1}.layer_norm.weight`, `encoder.block.N.layer.1.DenseReluDense.{wi_0,wi_1,wo}
.weight`, `encoder.final_layer_norm.weight`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ..errors import ConfigurationError, InvalidInputError
from .ops import Embedding, Linear, TokenEmbedding, cast_to


@dataclass
class T5Config:
    """Hyper-parameters of a T5 v1.1 encoder; the defaults are T5-XXL as used by FLUX."""

    vocab_size: int = 32128
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "layer_norm_epsilon":
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                    raise ConfigurationError(
                        f"T5Config.layer_norm_epsilon must be a number > 0, got {value!r}"
                    )
            elif isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigurationError(f"T5Config.{f.name} must be an integer >= 1, got {value!r}")
        buckets = self.relative_attention_num_buckets
        if buckets < 4 or buckets % 2:
            raise ConfigurationError(
                "T5Config.relative_attention_num_buckets must be even and >= 4 (half the buckets "
                f"look left, half right, each half has exact and log-spaced buckets), got {buckets}"
            )
        if self.relative_attention_max_distance <= buckets // 4:
            raise ConfigurationError(
                "T5Config.relative_attention_max_distance must exceed relative_attention_num_buckets"
                f" // 4 = {buckets // 4} (where the log-spaced buckets start), "
                f"got {self.relative_attention_max_distance}"
            )

    @property
    def inner_dim(self) -> int:
        """Width of the concatenated attention heads (num_heads * d_kv)."""
        return self.num_heads * self.d_kv


def relative_position_buckets(
    query_len: int, key_len: int, num_buckets: int, max_distance: int, device: torch.device
) -> torch.LongTensor:
    """Bidirectional T5 bucket index of every (query, key) offset, shape (query_len, key_len).

    Half of the buckets hold keys at or before the query, half keys after it. Within a half, offsets
    below `num_buckets // 4` get a bucket each; larger ones share log-spaced buckets up to
    `max_distance`, beyond which all offsets share the last bucket.
    """
    q_pos = torch.arange(query_len, dtype=torch.long, device=device)
    k_pos = torch.arange(key_len, dtype=torch.long, device=device)
    offset = k_pos[None, :] - q_pos[:, None]  # (Lq, Lk): key position minus query position
    half = num_buckets // 2
    direction = (offset > 0).long() * half
    distance = offset.abs()
    exact = half // 2
    # fp32 log as in the original; clamp so distances below `exact` (not used) avoid log(0)
    ratio = distance.clamp(min=exact).float() / exact
    log_bucket = exact + (torch.log(ratio) / math.log(max_distance / exact) * (half - exact)).long()
    log_bucket = log_bucket.clamp(max=half - 1)
    return direction + torch.where(distance < exact, distance, log_bucket)


class T5LayerNorm(nn.Module):
    """RMS norm with a learned scale: no mean subtraction and no bias."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim))
        self.eps = eps
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        variance = x32.pow(2).mean(dim=-1, keepdim=True)
        normed = (x32 * torch.rsqrt(variance + self.eps)).to(x.dtype)
        return normed * cast_to(self.weight, normed)


class T5Attention(nn.Module):
    """Multi-head self-attention without logit scaling; block 0 also owns the position bias table."""

    def __init__(self, config: T5Config, has_relative_bias: bool):
        super().__init__()
        self.num_heads = config.num_heads
        self.num_buckets = config.relative_attention_num_buckets
        self.max_distance = config.relative_attention_max_distance
        self.q = Linear(config.d_model, config.inner_dim, bias=False)
        self.k = Linear(config.d_model, config.inner_dim, bias=False)
        self.v = Linear(config.d_model, config.inner_dim, bias=False)
        self.o = Linear(config.inner_dim, config.d_model, bias=False)
        if has_relative_bias:
            self.relative_attention_bias = Embedding(self.num_buckets, config.num_heads)

    def position_bias(self, length: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The additive attention bias for a sequence of `length` tokens, shape (1, H, L, L), contiguous.

        The embedding gives (L, L, H); the permuted view has last-dim stride H, and CUDA's fused SDPA
        kernels refuse a mask whose last dimension is not stride 1 (they fall back to the math kernel),
        so the bias is made contiguous once here, not in each of the 24 layers.
        """
        buckets = relative_position_buckets(length, length, self.num_buckets, self.max_distance, device)
        table = self.relative_attention_bias.weight
        bias = self.relative_attention_bias(buckets.to(table.device), out_dtype=dtype)  # (L, L, H)
        return rearrange(bias, "Lq Lk H -> 1 H Lq Lk").to(device).contiguous()

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        q, k, v = (
            rearrange(proj(x), "B L (H D) -> B H L D", H=self.num_heads) for proj in (self.q, self.k, self.v)
        )
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)  # (B, H, L, D)
        return self.o(rearrange(out, "B H L D -> B L (H D)"))


class T5LayerSelfAttention(nn.Module):
    """Pre-norm residual self-attention sub-layer (`layer.0`)."""

    def __init__(self, config: T5Config, has_relative_bias: bool):
        super().__init__()
        self.SelfAttention = T5Attention(config, has_relative_bias)
        self.layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return x + self.SelfAttention(self.layer_norm(x), bias)


class T5DenseGatedGelu(nn.Module):
    """v1.1 feed-forward: wo(gelu_tanh(wi_0 x) * wi_1 x), no biases."""

    def __init__(self, config: T5Config):
        super().__init__()
        self.wi_0 = Linear(config.d_model, config.d_ff, bias=False)
        self.wi_1 = Linear(config.d_model, config.d_ff, bias=False)
        self.wo = Linear(config.d_ff, config.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.wo(F.gelu(self.wi_0(x), approximate="tanh") * self.wi_1(x))


class T5LayerFF(nn.Module):
    """Pre-norm residual feed-forward sub-layer (`layer.1`)."""

    def __init__(self, config: T5Config):
        super().__init__()
        self.DenseReluDense = T5DenseGatedGelu(config)  # the transformers name, kept for the keys
        self.layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.DenseReluDense(self.layer_norm(x))


class T5Block(nn.Module):
    """One encoder block: self-attention then feed-forward."""

    def __init__(self, config: T5Config, has_relative_bias: bool):
        super().__init__()
        self.layer = nn.ModuleList([T5LayerSelfAttention(config, has_relative_bias), T5LayerFF(config)])

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        attn, ff = self.layer
        return ff(attn(x, bias))


class T5Stack(nn.Module):
    """The encoder blocks and the final norm (the `encoder.` prefix of the keys)."""

    def __init__(self, config: T5Config):
        super().__init__()
        self.block = nn.ModuleList(
            [T5Block(config, has_relative_bias=i == 0) for i in range(config.num_layers)]
        )
        self.final_layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.block[0].layer[0].SelfAttention.position_bias(x.shape[1], x.dtype, x.device)
        for block in self.block:
            x = block(x, bias)
        return self.final_layer_norm(x)


class T5Encoder(nn.Module):
    """T5 v1.1 encoder: token ids (B, L) -> last hidden state (B, L, d_model) after the final norm."""

    def __init__(self, config: T5Config):
        super().__init__()
        self.config = config
        self.shared = TokenEmbedding(config.vocab_size, config.d_model)
        self.encoder = T5Stack(config)

    def forward(self, input_ids: torch.LongTensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Encode `input_ids` (B, L) computing in `dtype` (default fp32; bf16 or fp32 only)."""
        dtype = torch.float32 if dtype is None else dtype
        if dtype not in (torch.float32, torch.bfloat16):
            raise InvalidInputError(
                f"T5Encoder dtype must be torch.float32 or torch.bfloat16, got {dtype}: T5-XXL "
                "overflows fp16 in its feed-forward layers; compute in bf16 (GPU) or fp32 (CPU)"
            )
        check_token_ids(input_ids, self.config.vocab_size, "T5Encoder")
        x = self.shared(input_ids, out_dtype=dtype)  # (B, L, d_model)
        return self.encoder(x)


def check_token_ids(input_ids: torch.Tensor, vocab_size: int, who: str) -> None:
    """Raise InvalidInputError unless `input_ids` is a non-empty (B, L) integer tensor in range."""
    if input_ids.dim() != 2 or input_ids.numel() == 0:
        raise InvalidInputError(
            f"{who} input_ids must have shape (batch, length) with both > 0, got {tuple(input_ids.shape)}"
        )
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise InvalidInputError(f"{who} input_ids must be an integer tensor, got {input_ids.dtype}")
    if input_ids.device.type != "meta":
        low, high = int(input_ids.min()), int(input_ids.max())
        if low < 0 or high >= vocab_size:
            raise InvalidInputError(
                f"{who} input_ids must lie in [0, {vocab_size}) (the model's vocab_size), got ids "
                f"from {low} to {high}: was the prompt tokenized with this model's tokenizer?"
            )
