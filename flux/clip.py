"""The CLIP ViT-L/14 text encoder whose pooled output is FLUX's (B, 768) conditioning vector.

Based on the CLIP paper (Radford et al., 2021, https://arxiv.org/abs/2103.00020), checked against
transformers' `CLIPTextModel` (src/transformers/models/clip/modeling_clip.py in
https://github.com/huggingface/transformers), the tests' reference:
token + learned position embeddings, pre-norm transformer layers with a causal mask, quick_gelu
MLP (x * sigmoid(1.702 x)), LayerNorm eps 1e-5 and a final LayerNorm.

The pooled output is the final-norm hidden state at `input_ids.argmax(-1)`: the end-of-text token
has the largest id of CLIP's vocabulary (49407), and argmax returns its first occurrence even when
the padding also uses it. This is the rule transformers keeps for configs with the legacy
`eos_token_id == 2`, which openai/clip-vit-large-patch14 has, and so what FLUX was trained with.

Weights may be stored as fp32/fp16/bf16/float8_e4m3fn; every layer casts them to the compute dtype.
State-dict keys are the on-disk layout of `clip_l.safetensors`: `text_model.embeddings.
{token_embedding,position_embedding}.weight`, `text_model.encoder.layers.N.{self_attn.{q,k,v,out}_proj,
layer_norm1, mlp.fc1, mlp.fc2, layer_norm2}.{weight,bias}`, `text_model.final_layer_norm.{weight,bias}`.
Files may also hold `text_projection.weight` and `text_model.embeddings.position_ids`; FLUX needs
neither, so they are not parameters or buffers here.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ..errors import ConfigurationError, InvalidInputError
from .ops import Embedding, Linear, TokenEmbedding, cast_to
from .t5 import check_token_ids


@dataclass
class CLIPTextConfig:
    """Hyper-parameters of a CLIP text encoder; the defaults are CLIP ViT-L/14 as used by FLUX."""

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    max_position_embeddings: int = 77
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "layer_norm_eps":
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                    raise ConfigurationError(
                        f"CLIPTextConfig.layer_norm_eps must be a number > 0, got {value!r}"
                    )
            elif isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigurationError(f"CLIPTextConfig.{f.name} must be an integer >= 1, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise ConfigurationError(
                f"CLIPTextConfig.hidden_size ({self.hidden_size}) must be divisible by num_heads "
                f"({self.num_heads})"
            )


class LayerNorm(nn.LayerNorm):
    """`nn.LayerNorm` that computes in its input's dtype whatever dtype its parameters are stored in."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(
            x, self.normalized_shape, cast_to(self.weight, x), cast_to(self.bias, x), self.eps
        )


class CLIPAttention(nn.Module):
    """Causal multi-head self-attention with the default 1/sqrt(head_dim) scale."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.num_heads = config.num_heads
        width = config.hidden_size
        self.q_proj = Linear(width, width)
        self.k_proj = Linear(width, width)
        self.v_proj = Linear(width, width)
        self.out_proj = Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (
            rearrange(proj(x), "B L (H D) -> B H L D", H=self.num_heads)
            for proj in (self.q_proj, self.k_proj, self.v_proj)
        )
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, L, D)
        return self.out_proj(rearrange(out, "B H L D -> B L (H D)"))


class CLIPMLP(nn.Module):
    """fc2(quick_gelu(fc1 x))."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.fc1 = Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        return self.fc2(h * torch.sigmoid(1.702 * h))


class CLIPEncoderLayer(nn.Module):
    """Pre-norm residual attention then MLP."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.self_attn = CLIPAttention(config)
        self.layer_norm1 = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(config)
        self.layer_norm2 = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEmbeddings(nn.Module):
    """Token embedding plus learned absolute position embedding."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.token_embedding = TokenEmbedding(config.vocab_size, config.hidden_size)
        self.position_embedding = Embedding(config.max_position_embeddings, config.hidden_size)

    def forward(self, input_ids: torch.LongTensor, dtype: torch.dtype) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)  # (L,)
        tokens = self.token_embedding(input_ids, out_dtype=dtype)  # (B, L, H)
        return tokens + self.position_embedding(positions, out_dtype=dtype)[None]


class CLIPEncoder(nn.Module):
    """The stack of encoder layers (the `text_model.encoder.` prefix of the keys)."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.layers = nn.ModuleList([CLIPEncoderLayer(config) for _ in range(config.num_layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class CLIPTextTransformer(nn.Module):
    """Embeddings, encoder and final norm (everything under the `text_model.` prefix)."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.embeddings = CLIPEmbeddings(config)
        self.encoder = CLIPEncoder(config)
        self.final_layer_norm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, input_ids: torch.LongTensor, dtype: torch.dtype) -> torch.Tensor:
        return self.final_layer_norm(self.encoder(self.embeddings(input_ids, dtype)))


class CLIPTextEncoder(nn.Module):
    """CLIP text encoder: token ids (B, L) -> (last hidden state (B, L, H), pooled (B, H))."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.config = config
        self.text_model = CLIPTextTransformer(config)

    def forward(
        self, input_ids: torch.LongTensor, dtype: torch.dtype | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode `input_ids` (B, L), L <= max_position_embeddings, computing in `dtype` (default fp32)."""
        dtype = torch.float32 if dtype is None else dtype
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise InvalidInputError(
                f"CLIPTextEncoder dtype must be torch.float32, torch.bfloat16 or torch.float16, got {dtype}"
            )
        check_token_ids(input_ids, self.config.vocab_size, "CLIPTextEncoder")
        if input_ids.shape[1] > self.config.max_position_embeddings:
            raise InvalidInputError(
                f"CLIPTextEncoder input_ids are {input_ids.shape[1]} tokens long but the model has "
                f"{self.config.max_position_embeddings} positions: tokenize with max_length="
                f"{self.config.max_position_embeddings}"
            )
        hidden = self.text_model(input_ids, dtype)  # (B, L, H)
        eos = input_ids.argmax(dim=-1)  # (B,) first position of the largest id (end of text)
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), eos]  # (B, H)
        return hidden, pooled
