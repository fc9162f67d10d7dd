"""FLUX.1 [schnell] sampling: noise, time schedule, latent packing, position ids, Euler loop, decode.

Follows Black Forest Labs' reference, `src/flux/sampling.py` in https://github.com/black-forest-labs/flux:

- noise is drawn on the CPU from `torch.Generator("cpu").manual_seed(seed)`, so a seed gives the
  same image on every device; image i of a batch uses seed + i. This equals the reference's
  `get_noise(..., device="cpu", dtype=torch.bfloat16)`; on a GPU the reference draws with a CUDA
  generator, whose numbers differ;
- schnell's schedule is `linspace(1, 0, steps + 1)`, without the resolution-dependent shift of dev;
- the 16 x H/8 x W/8 latent is packed into (H/16 * W/16) tokens of 2x2x16 = 64 features;
- each Euler step adds (t_prev - t_curr) * velocity; there is no guidance and no negative prompt;
- the decoded image in [-1, 1] becomes (clamp(x, -1, 1) + 1) / 2.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from itertools import pairwise

import torch
from einops import rearrange, repeat
from torch import Tensor

from ..errors import InvalidInputError
from .autoencoder import AutoEncoder
from .model import Flux, joint_ids

GENERATOR_MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes unsigned 64-bit seeds

LATENT_CHANNELS = 16
PATCH = 2  # latent pixels per token side
PIXELS_PER_TOKEN = 16  # image pixels per token side: the autoencoder's 8 times the 2x2 patch

StepCallback = Callable[[int, int, Tensor], None]


def check_image_size(height: int, width: int) -> None:
    """Raise InvalidInputError unless both sides are positive multiples of 16 pixels."""
    for name, size in (("height", height), ("width", width)):
        if isinstance(size, bool) or not isinstance(size, int) or size < PIXELS_PER_TOKEN:
            raise InvalidInputError(
                f"{name} must be an integer of at least {PIXELS_PER_TOKEN} pixels, got {size!r}"
            )
        if size % PIXELS_PER_TOKEN:
            below = size // PIXELS_PER_TOKEN * PIXELS_PER_TOKEN
            raise InvalidInputError(
                f"{name} {size} is not a multiple of {PIXELS_PER_TOKEN} (FLUX works on 16x16-pixel "
                f"tokens): use {below} or {below + PIXELS_PER_TOKEN}"
            )


def _tokens(height: int, width: int) -> tuple[int, int]:
    """The token grid (rows, cols) of an image, rounded up as the reference does."""
    return math.ceil(height / PIXELS_PER_TOKEN), math.ceil(width / PIXELS_PER_TOKEN)


def get_noise(
    num: int,
    height: int,
    width: int,
    seed: int,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Initial latents (num, 16, 2*ceil(height/16), 2*ceil(width/16)); image i from seed + i.

    Each image is drawn on the CPU from its own generator, so image i equals the single-image noise
    of seed + i, on any device. The reference uses bf16 (`dtype=torch.bfloat16`). Seeds wrap
    around at 2**64.
    """
    if isinstance(num, bool) or not isinstance(num, int) or num < 1:
        raise InvalidInputError(f"the number of images must be an integer >= 1, got {num!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= GENERATOR_MAX_SEED:
        raise InvalidInputError(f"seed must be an integer in [0, {GENERATOR_MAX_SEED}], got {seed!r}")
    for name, size in (("height", height), ("width", width)):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise InvalidInputError(f"{name} must be a positive integer, got {size!r}")
    rows, cols = _tokens(height, width)
    shape = (1, LATENT_CHANNELS, PATCH * rows, PATCH * cols)
    noise = [
        torch.randn(shape, dtype=dtype, generator=torch.Generator("cpu").manual_seed((seed + i) % 2**64))
        for i in range(num)
    ]
    return torch.cat(noise).to(device)  # (num, 16, 2*rows, 2*cols)


def get_schedule(num_steps: int) -> list[float]:
    """Times from 1 (pure noise) to 0 (image): `num_steps + 1` evenly spaced values, no shift."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise InvalidInputError(f"steps must be an integer >= 1, got {num_steps!r}")
    return torch.linspace(1, 0, num_steps + 1).tolist()


def pack(latent: Tensor) -> Tensor:
    """(B, C, H/8, W/8) latent -> (B, H/16 * W/16, C*4) tokens: token i*(W/16)+j, feature c*4+ph*2+pw."""
    return rearrange(latent, "b c (h ph) (w pw) -> b (h w) (c ph pw)", ph=PATCH, pw=PATCH)


def unpack(x: Tensor, height: int, width: int) -> Tensor:
    """(B, tokens, C*4) -> (B, C, 2*ceil(height/16), 2*ceil(width/16)): the inverse of `pack`."""
    rows, cols = _tokens(height, width)
    if x.ndim != 3 or x.shape[1] != rows * cols or x.shape[2] % (PATCH * PATCH):
        raise InvalidInputError(
            f"packed latents for a {width}x{height} image must have shape (batch, {rows * cols}, "
            f"4*channels), got {tuple(x.shape)}"
        )
    return rearrange(x, "b (h w) (c ph pw) -> b c (h ph) (w pw)", h=rows, w=cols, ph=PATCH, pw=PATCH)


def image_ids(batch: int, height: int, width: int, *, device: str | torch.device = "cpu") -> Tensor:
    """Position ids (B, rows*cols, 3) of an image's tokens: (0, row, col), row-major."""
    rows, cols = _tokens(height, width)
    ids = torch.zeros(rows, cols, 3, device=device)
    ids[..., 1] = torch.arange(rows, device=device)[:, None]
    ids[..., 2] = torch.arange(cols, device=device)[None, :]
    return repeat(ids, "h w k -> b (h w) k", b=batch)


def text_ids(batch: int, length: int, *, device: str | torch.device = "cpu") -> Tensor:
    """Position ids (B, length, 3) of the text tokens: all zeros (text is not rotated)."""
    return torch.zeros(batch, length, 3, device=device)


@torch.inference_mode()
def denoise(
    model: Flux,
    # the latents and their positions
    img: Tensor,
    img_ids: Tensor,
    # the conditioning: T5 sequence and its positions, CLIP pooled vector
    txt: Tensor,
    txt_ids: Tensor,
    vec: Tensor,
    # the times, from get_schedule
    timesteps: list[float],
    *,
    on_step: StepCallback | None = None,
) -> Tensor:
    """Euler integration of the velocity field from timesteps[0] to timesteps[-1], in img's dtype.

    `on_step(done, total, img)` runs after each step (`done` counts from 1 to `total`); it may raise
    to stop the loop (progress, previews, interrupt).
    """
    total = len(timesteps) - 1
    pe = model.rope(joint_ids(txt_ids, img_ids))  # RoPE table, the same at every step
    for step, (t_curr, t_prev) in enumerate(pairwise(timesteps), start=1):
        t_vec = torch.full((img.shape[0],), t_curr, dtype=img.dtype, device=img.device)
        pred = model(img, img_ids, txt, txt_ids, timesteps=t_vec, y=vec, pe=pe)
        img = img + (t_prev - t_curr) * pred
        if on_step is not None:
            on_step(step, total, img)
    return img


@torch.inference_mode()
def decode_to_images(
    ae: AutoEncoder, x: Tensor, height: int, width: int, *, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Packed latents (B, tokens, 64) -> IMAGE (B, height, width, 3) float32 on the CPU in [0, 1].

    The autoencoder runs in `dtype` on the device its weights are on.
    """
    device = next(ae.parameters()).device
    z = unpack(x, height, width).to(device=device, dtype=dtype)  # (B, 16, H/8, W/8)
    pixels = ae.decode(z).float().clamp(-1, 1)  # (B, 3, H, W)
    return rearrange((pixels + 1) / 2, "b c h w -> b h w c").cpu().contiguous()
