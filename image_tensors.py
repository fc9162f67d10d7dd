"""Conversions between PIL images and ComfyUI IMAGE tensors (torch; image files are drafts/png_files.py).

An IMAGE is float32 `[B, H, W, 3]` in [0, 1] on the CPU, as ComfyUI's LoadImage makes it
(`uint8 / 255`); back to PIL the way SaveImage rounds an IMAGE (`clip(255 * x)` as uint8), see
https://github.com/comfyanonymous/ComfyUI (`nodes.py`, LoadImage and SaveImage).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image


def pil_to_tensor(images: Sequence[Image.Image]) -> torch.Tensor:
    """RGB PIL images of one size to an IMAGE tensor `[B, H, W, 3]`."""
    if not images:
        raise ValueError("no images to convert")
    width, height = images[0].size
    out = torch.empty((len(images), height, width, 3), dtype=torch.float32)
    for i, image in enumerate(images):
        if image.size != (width, height):
            raise ValueError(
                f"image {i} is {image.size[0]}x{image.size[1]}, image 0 is {width}x{height}: "
                "a batch needs one size"
            )
        rgb = np.array(image.convert("RGB") if image.mode != "RGB" else image)  # (H, W, 3) uint8, writable
        out[i].copy_(torch.from_numpy(rgb))  # uint8 -> float32 straight into the batch
    return out.div_(255.0)


def tensor_to_pil(images: torch.Tensor) -> list[Image.Image]:
    """An IMAGE tensor `[B, H, W, 3]` in [0, 1] to RGB PIL images (as SaveImage rounds them)."""
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected an IMAGE tensor [B, H, W, 3]; got shape {tuple(images.shape)}")
    arrays = (images.detach().float().cpu().clamp(0, 1) * 255.0).round().to(torch.uint8).numpy()
    return [Image.fromarray(a, mode="RGB") for a in arrays]
