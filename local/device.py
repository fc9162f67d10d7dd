"""Which device a local run uses, and in which compute dtype."""

from __future__ import annotations

import torch

from .. import comfy_bridge
from ..errors import LocalBackendUnavailable

__all__ = ["check_device_can_hold", "compute_dtype", "decode_dtype", "pick_device"]


def pick_device(requested: str | None) -> torch.device:
    """The device the user named, else ComfyUI's device, else the first GPU, else the CPU."""
    if requested:
        try:
            device = torch.device(requested)
        except RuntimeError as e:
            raise LocalBackendUnavailable(f"device {requested!r} is not a torch device: {e}") from e
        if device.type == "cuda" and not torch.cuda.is_available():
            raise LocalBackendUnavailable(
                f"device {requested!r} was asked for, but this torch has no CUDA device; "
                "use --device cpu (slow) or backend 'api'"
            )
        return device
    comfy_device = comfy_bridge.torch_device()
    if comfy_device is not None:
        return torch.device(comfy_device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def compute_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPUs with native bf16 (NVIDIA Ampere or newer, AMD, Intel), fp16 on older NVIDIA GPUs
    (Turing, Volta: tensor cores for fp16 only), else fp32.

    `torch.cuda.is_bf16_supported()` also says yes for emulated bf16 (Turing, Volta), which is slow,
    so the capability is asked instead. In fp16 the transformer keeps its residual streams finite
    (`flux.layers.keep_finite`), T5 still computes in fp32 (`flux.conditioning.t5_compute_dtype`) and
    the autoencoder decodes in fp32 (`decode_dtype`); fp32 throughout is 4-6x slower on those cards.
    """
    if device.type == "cuda":
        native = torch.version.hip is not None or torch.cuda.get_device_capability(device)[0] >= 8
        return torch.bfloat16 if native else torch.float16
    if device.type == "xpu":
        return torch.bfloat16
    return torch.float32


def decode_dtype(compute: torch.dtype) -> torch.dtype:
    """The autoencoder's dtype for a run in `compute`: fp32 in place of fp16, whose range its decoder
    activations may leave (ComfyUI, too, decodes FLUX latents in fp32 on GPUs without bf16)."""
    return torch.float32 if compute == torch.float16 else compute


def check_device_can_hold(models, device: torch.device) -> None:
    """fp8 tensors exist on CPUs and CUDA GPUs only (not on Apple's MPS, for one)."""
    if device.type in ("cpu", "cuda"):
        return
    for placed in models.all():
        if any(t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) for t in placed.cpu_tensors.values()):
            raise LocalBackendUnavailable(
                f"the {placed.name} weights are fp8, which {device.type} cannot hold: choose "
                "weight_dtype 'bf16' (or a bf16/fp16 file), or the api backend"
            )
