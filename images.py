"""Conversions between PIL images, ComfyUI IMAGE tensors and PNG files.

An IMAGE is float32 `[B, H, W, 3]` in [0, 1] on the CPU, as ComfyUI's LoadImage makes it
(`uint8 / 255`); PNGs are written the way SaveImage reads an IMAGE back (`clip(255 * x)` as uint8).
PNG files are written atomically (a temporary file, then a rename), so an interrupted run never
leaves half an image behind, and carry the prompt, seed and model as text chunks.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, PngImagePlugin


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


def save_png(image: Image.Image, path: str | os.PathLike, text: Mapping[str, str]) -> Path:
    """Write `image` to `path` with `text` as tEXt/iTXt chunks, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = PngImagePlugin.PngInfo()
    for key, value in text.items():
        info.add_itxt(key, str(value))
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes it private; a PNG is not
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", pnginfo=info, compress_level=4)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it
    os.umask(mask)
    return mask


def is_complete_png(path: str | os.PathLike) -> bool:
    """True when `path` is a PNG that decodes to the end (so a resumed run may skip it)."""
    try:
        with Image.open(path) as image:
            if image.format != "PNG":
                return False
            image.load()
    except (OSError, SyntaxError, ValueError):
        return False
    return True
