"""The FLUX.1 flow transformer (`Flux`) and its hyper-parameters (`FluxParams`).

Follows Black Forest Labs' reference, `src/flux/model.py` in https://github.com/black-forest-labs/flux.
State-dict keys and shapes are exactly those of flux1-schnell.safetensors (flux1-dev with
`guidance_embed=True`). The model computes in the dtype of `img`, whatever dtype its weights are
stored in (fp32, fp16, bf16 or float8_e4m3fn), and can be built on the meta device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import ConfigurationError, InvalidInputError
from .layers import DoubleStreamBlock, LastLayer, MLPEmbedder, SingleStreamBlock
from .ops import Linear
from .rope import rope_table, timestep_embedding

TIME_EMBED_DIM = 256  # width of the sinusoidal timestep (and guidance) embedding


@dataclass
class FluxParams:
    """Hyper-parameters, named as in the reference; the defaults are FLUX.1 [schnell]'s."""

    in_channels: int = 64
    out_channels: int = 64
    vec_in_dim: int = 768
    context_in_dim: int = 4096
    hidden_size: int = 3072
    mlp_ratio: float = 4.0
    num_heads: int = 24
    depth: int = 19
    depth_single_blocks: int = 38
    axes_dim: tuple[int, ...] = (16, 56, 56)
    theta: int = 10_000
    qkv_bias: bool = True
    guidance_embed: bool = False

    def __post_init__(self):
        self.axes_dim = tuple(self.axes_dim)
        for name in (
            "in_channels",
            "out_channels",
            "vec_in_dim",
            "context_in_dim",
            "hidden_size",
            "num_heads",
            "theta",
            "mlp_ratio",
        ):
            if not getattr(self, name) > 0:
                raise ConfigurationError(f"FluxParams.{name} must be positive, got {getattr(self, name)}")
        for name in ("depth", "depth_single_blocks"):
            if getattr(self, name) < 0:
                raise ConfigurationError(f"FluxParams.{name} must be >= 0, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads:
            raise ConfigurationError(
                f"FluxParams.hidden_size ({self.hidden_size}) must be divisible by "
                f"num_heads ({self.num_heads})"
            )
        head_dim = self.hidden_size // self.num_heads
        if not self.axes_dim or any(d <= 0 or d % 2 for d in self.axes_dim):
            raise ConfigurationError(f"FluxParams.axes_dim must be positive even sizes, got {self.axes_dim}")
        if sum(self.axes_dim) != head_dim:
            raise ConfigurationError(
                f"FluxParams.axes_dim {self.axes_dim} sums to {sum(self.axes_dim)}, but must sum to the "
                f"head dim hidden_size / num_heads = {head_dim}"
            )

    @property
    def mlp_hidden_dim(self) -> int:
        """The MLP width. Rounded, not truncated: a ratio inferred from a file (e.g. 1840 / 896)
        must give back that file's width, and `int()` of the product can land one below it."""
        return round(self.hidden_size * self.mlp_ratio)


class Flux(nn.Module):
    """FLUX.1 transformer: packed latents + text + pooled vector + timestep -> velocity (B, N, out)."""

    def __init__(self, params: FluxParams):
        super().__init__()
        self.params = p = params
        self.img_in = Linear(p.in_channels, p.hidden_size)
        self.time_in = MLPEmbedder(TIME_EMBED_DIM, p.hidden_size)
        self.vector_in = MLPEmbedder(p.vec_in_dim, p.hidden_size)
        self.guidance_in = MLPEmbedder(TIME_EMBED_DIM, p.hidden_size) if p.guidance_embed else None
        self.txt_in = Linear(p.context_in_dim, p.hidden_size)
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(p.hidden_size, p.num_heads, p.mlp_hidden_dim, p.qkv_bias)
            for _ in range(p.depth)
        )
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(p.hidden_size, p.num_heads, p.mlp_hidden_dim)
            for _ in range(p.depth_single_blocks)
        )
        self.final_layer = LastLayer(p.hidden_size, p.out_channels)

    def rope(self, ids: Tensor) -> Tensor:
        """RoPE table for ids (B, L + N, 3) of [txt, img] tokens (`joint_ids`); reuse it as `pe=`."""
        return rope_table(ids, self.params.axes_dim, self.params.theta)

    def forward(
        self,
        img: Tensor,
        img_ids: Tensor,
        txt: Tensor,
        txt_ids: Tensor,
        timesteps: Tensor,
        y: Tensor,
        guidance: Tensor | None = None,
        pe: Tensor | None = None,
    ) -> Tensor:
        """Velocity (B, N, out_channels), computed in img's dtype. `pe`: optional `self.rope(ids)`."""
        check_inputs(self.params, img, img_ids, txt, txt_ids, timesteps, y, guidance, pe)
        dtype = img.dtype
        img = self.img_in(img)  # (B, N, D)
        vec = self.time_in(timestep_embedding(timesteps.to(dtype), TIME_EMBED_DIM))  # (B, D)
        if self.guidance_in is not None:  # flux-dev only; schnell ignores `guidance`
            vec = vec + self.guidance_in(timestep_embedding(guidance.to(dtype), TIME_EMBED_DIM))
        vec = vec + self.vector_in(y.to(dtype))
        txt = self.txt_in(txt.to(dtype))  # (B, L, D)
        if pe is None:  # computed once per forward and shared by all blocks
            pe = self.rope(joint_ids(txt_ids, img_ids))

        for block in self.double_blocks:
            img, txt = block(img, txt, vec, pe)
        n_txt = txt.shape[1]
        x = torch.cat((txt, img), dim=1)  # (B, L + N, D), text first
        del img, txt  # the single blocks need x alone
        for block in self.single_blocks:
            x = block(x, vec, pe)
        return self.final_layer(x[:, n_txt:], vec)  # (B, N, out_channels)


def joint_ids(txt_ids: Tensor, img_ids: Tensor) -> Tensor:
    """Position ids of the joint sequence, text first: (B|1, L, 3) + (B|1, N, 3) -> (B|1, L + N, 3)."""
    batch = max(txt_ids.shape[0], img_ids.shape[0])
    return torch.cat((txt_ids.expand(batch, -1, -1), img_ids.expand(batch, -1, -1)), dim=1)


def check_inputs(p: FluxParams, img, img_ids, txt, txt_ids, timesteps, y, guidance, pe) -> None:
    """Raise InvalidInputError naming the first input whose shape or dtype does not fit."""

    def fail(name: str, want: str, got: Tensor) -> None:
        raise InvalidInputError(f"Flux input `{name}` must be {want}, got shape {tuple(got.shape)}")

    if img.ndim != 3 or img.shape[-1] != p.in_channels:
        fail("img", f"(batch, tokens, {p.in_channels}) packed latents", img)
    if img.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise InvalidInputError(f"Flux input `img` must be float32, float16 or bfloat16, got {img.dtype}")
    b, n = img.shape[:2]
    if txt.ndim != 3 or txt.shape[0] != b or txt.shape[-1] != p.context_in_dim:
        fail("txt", f"({b}, text tokens, {p.context_in_dim}) text embeddings", txt)
    seq = txt.shape[1] + n
    for name, ids, length in (("img_ids", img_ids, n), ("txt_ids", txt_ids, txt.shape[1])):
        if ids.ndim != 3 or ids.shape[0] not in (1, b) or ids.shape[1:] != (length, len(p.axes_dim)):
            fail(name, f"({b}, {length}, {len(p.axes_dim)}) position ids", ids)
    if timesteps.shape != (b,):
        fail("timesteps", f"({b},) times in [0, 1]", timesteps)
    if y.shape != (b, p.vec_in_dim):
        fail("y", f"({b}, {p.vec_in_dim}) pooled text vector", y)
    if p.guidance_embed and (guidance is None or guidance.shape != (b,)):
        raise InvalidInputError(
            f"Flux input `guidance` must be a ({b},) tensor for a guidance-distilled model"
        )
    head_half = sum(p.axes_dim) // 2
    if pe is not None and (
        pe.ndim != 6 or pe.shape[0] not in (1, b) or pe.shape[1:] != (seq, 1, head_half, 2, 2)
    ):
        fail("pe", f"Flux.rope(ids) for {seq} tokens: ({b}, {seq}, 1, {head_half}, 2, 2)", pe)
