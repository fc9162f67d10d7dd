"""fp8 matrix products: an fp8 weight times its input, quantized to fp8, through `torch._scaled_mm`.

With fp8 storage alone (`weight_dtype=fp8_e4m3fn`) each layer upcasts its weight to the compute dtype
and multiplies in bf16, so it is never faster than bf16. GPUs of compute capability 8.9 and newer
(RTX 40xx, L4, L40, H100) multiply fp8 by fp8 at twice the bf16 rate: the input is scaled into
float8_e4m3fn's range (one scale per row of the input, or one for the whole input), both operands go
to `torch._scaled_mm` with their scales (a scaled fp8 file's per-layer `weight_scale`, else 1), which
accumulates in fp32 and writes the compute dtype. This is ComfyUI's `--fast fp8_matrix_mult` idea
(https://github.com/comfyanonymous/ComfyUI, `comfy/ops.py` `fp8_linear`) and that of
https://github.com/aredden/flux-fp8-api; the code here is our own.

A layer takes this path when `fp8_matmul` is set on it (`enable_fp8_matmul`) and `usable(device)` says yes:
- a CUDA GPU of capability >= (8, 9): yes;
- `FLUX_SCHNELL_FP8_MATMUL=force`: yes wherever this torch has `_scaled_mm` (the CPU too, which is
  how the tests prove the path: torch 2.13's CPU build has it);
- `FLUX_SCHNELL_FP8_MATMUL=off`: never;
- elsewhere no, logged once per device: the layer computes as plain fp8 storage (upcast, bf16 product).

Accuracy: the input is rounded to e4m3 (3 mantissa bits: at most 2^-4 relative per value). Against the
product with the upcast weight, the relative Frobenius error of a layer's output is about 2-3 % on
random inputs (tests/test_fp8_matmul.py bounds it by 5 %).
"""

from __future__ import annotations

import logging
import os

import torch
from torch import Tensor, nn

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
ENV = "FLUX_SCHNELL_FP8_MATMUL"  # "force" | "off" | unset (capability decides)
MIN_CAPABILITY = (8, 9)
GRANULARITIES = ("row", "tensor")  # one input scale per row, or one per call

log = logging.getLogger(__name__)
_DECIDED: dict[tuple[str, int | None, str], bool] = {}


def usable(device: torch.device) -> bool:
    """Whether fp8 layers on `device` multiply through `_scaled_mm` (see the module docstring)."""
    mode = os.environ.get(ENV, "").strip().lower()
    key = (device.type, device.index, mode)
    if key not in _DECIDED:
        _DECIDED[key] = _decide(device, mode)
    return _DECIDED[key]


def _decide(device: torch.device, mode: str) -> bool:
    has = hasattr(torch, "_scaled_mm")
    if mode == "off":
        return False
    if mode == "force":
        if not has:
            log.warning("%s=force, but torch %s has no _scaled_mm: weights upcast", ENV, torch.__version__)
        return has
    if device.type == "cuda" and has and torch.cuda.get_device_capability(device) >= MIN_CAPABILITY:
        return True
    where = (
        f"{torch.cuda.get_device_name(device)} (capability {torch.cuda.get_device_capability(device)})"
        if device.type == "cuda"
        else device.type
    )
    log.warning(
        "weight_dtype fp8_e4m3fn_fast: fp8 matrix products need an NVIDIA GPU of compute capability %d.%d "
        "or newer; on %s the fp8 weights are upcast and multiplied in the compute dtype (as fp8_e4m3fn)",
        *MIN_CAPABILITY,
        where,
    )
    return False


def granularity(device: torch.device) -> str:
    """Row-wise input scales where `_scaled_mm` takes them (Hopper and newer, the CPU), else per tensor."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (9, 0):
        return "tensor"
    return "row"


def enable_fp8_matmul(model: nn.Module) -> int:
    """Mark the fp8 Linear layers of `model` for fp8 matrix products; returns how many."""
    from .ops import Linear

    count = 0
    for layer in model.modules():
        if isinstance(layer, Linear) and layer.gguf_type is None and layer.weight.dtype == FP8:
            layer.fp8_matmul = True
            count += 1
    return count


def fp8_linear(
    x: Tensor, weight: Tensor, weight_scale: Tensor | None, bias: Tensor | None, how: str = "row"
) -> Tensor:
    """x (..., K) in the compute dtype, weight (N, K) float8_e4m3fn -> (..., N) in x's dtype.

    `weight_scale`: the weight's per-layer scale (a scaled fp8 file), None for 1. `how`: "row" (one
    input scale per row of x) or "tensor".
    """
    if how not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {how!r}")
    lead, k = x.shape[:-1], x.shape[-1]
    rows = x.reshape(-1, k)  # (..., K) -> (M, K)
    amax = rows.abs().amax(dim=-1, keepdim=True) if how == "row" else rows.abs().amax()
    x_scale = (amax.float() / FP8_MAX).clamp_(min=1e-12)  # (M, 1) or ()
    x8 = (rows.float() / x_scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8)
    w_scale = torch.ones((), device=x.device) if weight_scale is None else weight_scale.float().reshape(())
    n = weight.shape[0]
    if how == "row":  # _scaled_mm's row-wise form: (M, 1) and (1, N) scales
        w_scale = w_scale.expand(1, n).contiguous()
    out = torch._scaled_mm(x8, weight.contiguous().t(), x_scale, w_scale, out_dtype=x.dtype)  # (M, N)
    if bias is not None:
        out = out + bias.to(x.dtype)
    return out.reshape(*lead, n)  # (M, N) -> (..., N)
