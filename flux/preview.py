"""A cheap RGB preview of a FLUX latent while sampling: one 16x3 linear map, no autoencoder.

The factors are a least-squares fit from the 16 FLUX latent channels (in the sampler's scaled and
shifted space) to RGB in [-1, 1]: measured data about the FLUX.1 autoencoder's latent space, as
published in ComfyUI's `comfy/latent_formats.py`, class `Flux`
(https://github.com/comfyanonymous/ComfyUI/blob/master/comfy/latent_formats.py).
"""

from __future__ import annotations

import torch
from PIL import Image

# (16, 3): latent channel -> (R, G, B) contribution
FLUX_LATENT_RGB = (
    (-0.0346, 0.0244, 0.0681),
    (0.0034, 0.0210, 0.0687),
    (0.0275, -0.0668, -0.0433),
    (-0.0174, 0.0160, 0.0617),
    (0.0859, 0.0721, 0.0329),
    (0.0004, 0.0383, 0.0115),
    (0.0405, 0.0861, 0.0915),
    (-0.0236, -0.0185, -0.0259),
    (-0.0245, 0.0250, 0.1180),
    (0.1008, 0.0755, -0.0421),
    (-0.0515, 0.0201, 0.0011),
    (0.0428, -0.0012, -0.0036),
    (0.0817, 0.0765, 0.0749),
    (-0.1264, -0.0522, -0.1103),
    (-0.0280, -0.0881, -0.0499),
    (-0.1262, -0.0982, -0.0778),
)
FLUX_LATENT_RGB_BIAS = (-0.0329, -0.0718, -0.0851)


def latent_preview(latent: torch.Tensor) -> Image.Image:
    """The first image of a latent batch (B, 16, h, w) as a small RGB picture of h x w pixels."""
    if latent.ndim != 4 or latent.shape[1] != len(FLUX_LATENT_RGB):
        raise ValueError(f"expected a (B, 16, h, w) FLUX latent; got {tuple(latent.shape)}")
    factors = torch.tensor(FLUX_LATENT_RGB, dtype=torch.float32, device=latent.device)  # (16, 3)
    bias = torch.tensor(FLUX_LATENT_RGB_BIAS, dtype=torch.float32, device=latent.device)  # (3,)
    rgb = torch.einsum("chw,cr->hwr", latent[0].float(), factors) + bias  # (h, w, 3) in ~[-1, 1]
    pixels = ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()
    return Image.fromarray(pixels, mode="RGB")
