"""The FLUX.1 autoencoder: an image in [-1, 1] to a 16-channel latent at 1/8 size, and back.

Follows Black Forest Labs' `src/flux/modules/autoencoder.py` (https://github.com/black-forest-labs/flux):
a convolutional Encoder and Decoder with GroupNorm ResNet blocks and one single-head
self-attention block at the lowest resolution, no quant_conv / post_quant_conv, and the latent
normalised as `scale_factor * (mean - shift_factor)`. Module names reproduce the keys of
`ae.safetensors` (`encoder.down.{i}.block.{j}.norm1.weight`, `decoder.up.{i}.upsample.conv.bias`, ...).

Every layer computes in the dtype of its input whatever dtype its weights are stored in (`ops.Conv2d`,
`_GroupNorm`), so an fp32 file can decode a bf16 latent. `encode` and `decode` run one image of a
batch at a time, so peak memory does not grow with the batch size.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigurationError, InvalidInputError
from .ops import Conv2d, cast_to

TILE_PIXELS_ENV = "FLUX_SCHNELL_VAE_TILE_PIXELS"
DEFAULT_TILE_PIXELS = 4_000_000  # decodes above about 4 MP go in tiles (2048²: 5 GiB untiled in bf16)
TILE_OVERLAP = 4  # a tile overlaps each neighbour by a quarter of its side (in latent pixels: side // 4)
GROUPS = 32  # GroupNorm groups in every normalisation layer of the reference
GROUP_NORM_EPS = 1e-6


@dataclass
class AutoEncoderParams:
    """Hyper-parameters of the autoencoder; the defaults are FLUX.1's `ae.safetensors`.

    `ch_mult` has one entry per resolution level: level i has `ch * ch_mult[i]` channels, and the
    image is halved between consecutive levels, so the latent is `2**(len(ch_mult)-1)` times smaller.
    `resolution` is kept for fidelity with the reference's field names; it does not shape the model.
    """

    resolution: int = 256
    in_channels: int = 3
    ch: int = 128
    out_ch: int = 3
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 16
    scale_factor: float = 0.3611
    shift_factor: float = 0.1159

    def __post_init__(self) -> None:
        for name in ("resolution", "in_channels", "ch", "out_ch", "num_res_blocks", "z_channels"):
            _check_positive_int(name, getattr(self, name))
        if isinstance(self.ch_mult, list):
            self.ch_mult = tuple(self.ch_mult)  # JSON configs give lists
        if not isinstance(self.ch_mult, tuple) or not self.ch_mult:
            raise ConfigurationError(
                "AutoEncoderParams.ch_mult must be a non-empty tuple of positive ints (one per "
                f"level), got {self.ch_mult!r}"
            )
        for m in self.ch_mult:
            _check_positive_int("ch_mult entry", m)
            if self.ch * m % GROUPS:
                raise ConfigurationError(
                    f"AutoEncoderParams.ch * ch_mult must be divisible by the {GROUPS} GroupNorm "
                    f"groups at every level, got ch={self.ch} and ch_mult={self.ch_mult}: use a ch "
                    f"that is a multiple of {GROUPS}"
                )
        for name in ("scale_factor", "shift_factor"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigurationError(f"AutoEncoderParams.{name} must be a finite number, got {value!r}")
        if self.scale_factor == 0:
            raise ConfigurationError("AutoEncoderParams.scale_factor must not be 0 (decode divides by it)")

    @property
    def downscale_factor(self) -> int:
        """How many times smaller the latent is than the image along each side (8 for FLUX)."""
        return 2 ** (len(self.ch_mult) - 1)


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigurationError(f"AutoEncoderParams.{name} must be a positive int, got {value!r}")


# --- building blocks ---------------------------------------------------------------------------


class _GroupNorm(nn.GroupNorm):
    """`nn.GroupNorm` that computes in its input's dtype whatever dtype its affine weights are in."""

    def forward(self, x: Tensor) -> Tensor:
        return F.group_norm(x, self.num_groups, cast_to(self.weight, x), cast_to(self.bias, x), self.eps)


def _norm(channels: int) -> _GroupNorm:
    return _GroupNorm(GROUPS, channels, eps=GROUP_NORM_EPS, affine=True)


def _swish(h: Tensor) -> Tensor:
    """SiLU in place: `h` is always a GroupNorm's fresh output, so no extra full-size tensor is made."""
    return F.silu(h, inplace=True)


class ResnetBlock(nn.Module):
    """GN → swish → conv3×3 → GN → swish → conv3×3, plus the input (through a 1×1 conv if widths differ)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = _norm(in_channels)
        self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels)
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = Conv2d(in_channels, out_channels, 1)
        else:
            self.nin_shortcut = None

    def forward(self, x: Tensor) -> Tensor:
        # Written so that no full-size intermediate outlives its use: conv1's output is dropped as
        # soon as norm2 has read it, and the skip is added in place into conv2's fresh output.
        h = self.norm2(self.conv1(_swish(self.norm1(x))))
        h = self.conv2(_swish(h))
        return h.add_(x if self.nin_shortcut is None else self.nin_shortcut(x))


class AttnBlock(nn.Module):
    """Single-head self-attention over all h*w positions, with 1×1 convs for q, k, v and output."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _norm(channels)
        self.q = Conv2d(channels, channels, 1)
        self.k = Conv2d(channels, channels, 1)
        self.v = Conv2d(channels, channels, 1)
        self.proj_out = Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        hn = self.norm(x)

        def tokens(t: Tensor) -> Tensor:
            # "b c h w -> b 1 (h w) c"; contiguous so that SDPA's fused GPU kernels accept it
            return t.reshape(b, 1, c, h * w).transpose(2, 3).contiguous()

        q, k, v = tokens(self.q(hn)), tokens(self.k(hn)), tokens(self.v(hn))
        del hn
        a = F.scaled_dot_product_attention(q, k, v)  # (b, 1, h*w, c), scale 1/sqrt(c)
        del q, k, v
        a = a.transpose(2, 3).reshape(b, c, h, w)  # "b 1 (h w) c -> b c h w"
        return x + self.proj_out(a)


class Downsample(nn.Module):
    """Halve the size: pad one pixel on the right and bottom, then a stride-2 conv3×3 without padding."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Double the size: nearest-neighbour ×2, then conv3×3."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: `block.{j}` ResNet blocks, then a `downsample` or `upsample` if given.

    A container: the Encoder and Decoder run `layers()` themselves, so that no call frame keeps the
    level's input alive while its later blocks run.
    """

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, *, down: bool, up: bool):
        super().__init__()
        self.block = nn.ModuleList(
            ResnetBlock(in_channels if j == 0 else out_channels, out_channels) for j in range(num_blocks)
        )
        self.downsample = Downsample(out_channels) if down else None
        self.upsample = Upsample(out_channels) if up else None

    def layers(self) -> list[nn.Module]:
        """The modules of this level in the order they run."""
        resample = [m for m in (self.downsample, self.upsample) if m is not None]
        return [*self.block, *resample]


class _Mid(nn.Module):
    """The lowest-resolution stage: ResNet block, attention, ResNet block (keys `mid.*`)."""

    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


# --- encoder and decoder -----------------------------------------------------------------------


class Encoder(nn.Module):
    """Image (B, in_channels, H, W) to the Gaussian's mean and log-variance (B, 2*z, H/f, W/f)."""

    def __init__(self, params: AutoEncoderParams):
        super().__init__()
        widths = [params.ch * m for m in params.ch_mult]
        last = len(widths) - 1
        self.conv_in = Conv2d(params.in_channels, params.ch, 3, padding=1)
        self.down = nn.ModuleList(
            _Level(
                params.ch if i == 0 else widths[i - 1],
                widths[i],
                params.num_res_blocks,
                down=i != last,
                up=False,
            )
            for i in range(len(widths))
        )
        self.mid = _Mid(widths[-1])
        self.norm_out = _norm(widths[-1])
        self.conv_out = Conv2d(widths[-1], 2 * params.z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for layer in (layer for level in self.down for layer in level.layers()):
            h = layer(h)
        h = self.mid(h)
        return self.conv_out(_swish(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent (B, z, h, w) to an image (B, out_ch, h*f, w*f); levels run from `up.{L-1}` to `up.0`."""

    def __init__(self, params: AutoEncoderParams):
        super().__init__()
        widths = [params.ch * m for m in params.ch_mult]
        last = len(widths) - 1
        self.conv_in = Conv2d(params.z_channels, widths[-1], 3, padding=1)
        self.mid = _Mid(widths[-1])
        # up.i is level i: it takes level i+1's width (the mid's for the last) and ends at widths[i]
        self.up = nn.ModuleList(
            _Level(
                widths[min(i + 1, last)],
                widths[i],
                params.num_res_blocks + 1,
                down=False,
                up=i != 0,
            )
            for i in range(len(widths))
        )
        self.norm_out = _norm(widths[0])
        self.conv_out = Conv2d(widths[0], params.out_ch, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for layer in (layer for level in reversed(self.up) for layer in level.layers()):
            h = layer(h)
        return self.conv_out(_swish(self.norm_out(h)))


# --- the autoencoder ---------------------------------------------------------------------------


class AutoEncoder(nn.Module):
    """FLUX's VAE as used for sampling: `encode` returns the normalised mean latent, `decode` inverts it."""

    def __init__(self, params: AutoEncoderParams):
        super().__init__()
        self.params = params
        self.encoder = Encoder(params)
        self.decoder = Decoder(params)
        self.scale_factor = params.scale_factor
        self.shift_factor = params.shift_factor

    def encode(self, x: Tensor) -> Tensor:
        """Image (B, in_channels, H, W) in [-1, 1] to the latent (B, z_channels, H/8, W/8).

        Returns `scale_factor * (mean - shift_factor)`: the Gaussian's mean, never a sample.
        """
        params = self.params
        f = params.downscale_factor
        _check_batch("image", x, params.in_channels)
        if x.shape[-2] % f or x.shape[-1] % f:
            raise InvalidInputError(
                f"image height and width must be multiples of {f}, got {tuple(x.shape[-2:])}: "
                f"crop or resize the image first"
            )
        z = torch.cat([self.encoder(xi)[:, : params.z_channels] for xi in x.split(1)])  # (B, z, h, w)
        return (z - self.shift_factor) * self.scale_factor

    def decode(self, z: Tensor, tile_pixels: int | None = None) -> Tensor:
        """Latent (B, z_channels, h, w) to the image (B, out_ch, 8h, 8w), roughly in [-1, 1], unclamped.

        An image of more than `tile_pixels` output pixels (default: `vae_tile_pixels()`) is decoded
        in overlapping tiles of at most that many pixels, blended with linear ramps (`decode_tiled`).
        """
        _check_batch("latent", z, self.params.z_channels)
        z = z / self.scale_factor + self.shift_factor
        f = self.params.downscale_factor
        limit = vae_tile_pixels() if tile_pixels is None else tile_pixels
        if z.shape[-2] * z.shape[-1] * f * f > limit:
            return torch.cat([self.decode_tiled(zi, limit) for zi in z.split(1)])
        return torch.cat([self.decoder(zi) for zi in z.split(1)])  # one image at a time

    def decode_tiled(self, z: Tensor, tile_pixels: int) -> Tensor:
        """One unnormalised latent (1, z, h, w) to (1, out_ch, f*h, f*w) in overlapping tiles.

        Each tile is a square of `side` latent pixels (side² f² <= tile_pixels, at least 8), its
        neighbours overlap it by side // 4; in the overlaps the tiles' outputs are blended with
        weights ramping linearly across the overlap. The decoder's GroupNorms and its mid attention
        see the whole tile, not the whole image, so the result is close to the untiled decode, not
        equal (tests/test_autoencoder.py states the measured difference).
        """
        f = self.params.downscale_factor
        side = max(8, math.isqrt(tile_pixels) // f)
        overlap = side // TILE_OVERLAP
        _b, _c, h, w = z.shape
        out = weight = None
        for top in _tile_starts(h, side, overlap):
            for left in _tile_starts(w, side, overlap):
                tile = z[:, :, top : top + side, left : left + side]  # (1, z, th, tw)
                pixels = self.decoder(tile).float()  # (1, out_ch, f*th, f*tw)
                th, tw = tile.shape[-2:]
                ramp = (
                    _ramp(th * f, overlap * f, top > 0, top + th < h, pixels.device)[:, None]
                    * _ramp(tw * f, overlap * f, left > 0, left + tw < w, pixels.device)[None, :]
                )  # (f*th, f*tw)
                if out is None:
                    out = pixels.new_zeros(1, pixels.shape[1], h * f, w * f)  # (1, out_ch, f*h, f*w)
                    weight = pixels.new_zeros(h * f, w * f)
                rows, cols = slice(top * f, (top + th) * f), slice(left * f, (left + tw) * f)
                out[:, :, rows, cols] += pixels * ramp
                weight[rows, cols] += ramp
        return (out / weight).to(z.dtype)

    def forward(self, x: Tensor) -> Tensor:
        """Encode then decode (a reconstruction of `x`)."""
        return self.decode(self.encode(x))


def vae_tile_pixels() -> int:
    """Output pixels above which `decode` tiles: $FLUX_SCHNELL_VAE_TILE_PIXELS, else 4 MP."""
    raw = os.environ.get(TILE_PIXELS_ENV, "").strip()
    if not raw:
        return DEFAULT_TILE_PIXELS
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ConfigurationError(
            f"{TILE_PIXELS_ENV}={raw!r} is not a positive whole number of pixels: set it to e.g. "
            f"{DEFAULT_TILE_PIXELS}, or unset it"
        )
    return value


def _tile_starts(size: int, side: int, overlap: int) -> list[int]:
    """Where tiles of `side` start along an axis of `size`, overlapping by `overlap` at least;
    the last tile ends at the edge."""
    if size <= side:
        return [0]
    stride = side - overlap
    starts = list(range(0, size - side, stride))
    return [*starts, size - side]


def _ramp(length: int, overlap: int, rise: bool, fall: bool, device) -> Tensor:
    """Blend weights (length,): rising linearly over the first `overlap` if `rise`, falling over
    the last `overlap` if `fall`, 1 elsewhere."""
    w = torch.ones(length, device=device)
    steps = (
        torch.arange(overlap, device=device, dtype=torch.float32) + 0.5
    ) / overlap  # (overlap,) in (0, 1)
    if rise:
        w[:overlap] = torch.minimum(w[:overlap], steps)
    if fall:
        w[length - overlap :] = torch.minimum(w[length - overlap :], steps.flip(0))
    return w


def _check_batch(name: str, t: Tensor, channels: int) -> None:
    if not isinstance(t, Tensor):
        raise InvalidInputError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.ndim != 4 or t.shape[1] != channels:
        raise InvalidInputError(
            f"{name} must have shape (batch, {channels}, height, width), got {tuple(t.shape)}"
        )
    if not t.is_floating_point():
        raise InvalidInputError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if t.shape[0] == 0 or t.shape[2] == 0 or t.shape[3] == 0:
        raise InvalidInputError(f"{name} must not be empty, got shape {tuple(t.shape)}")
