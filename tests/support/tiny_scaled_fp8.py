"""Test helper: ComfyUI's fp8 files with per-layer scales, in both formats, from fp32 weights.

The layouts follow ComfyUI (https://github.com/comfyanonymous/ComfyUI: `comfy/utils.py`
`convert_old_quants`, `comfy/ops.py` `mixed_precision_ops`, `comfy/quant_ops.py`):

- "scaled_fp8", as in `t5xxl_fp8_e4m3fn_scaled.safetensors`: a `scaled_fp8` marker (an empty fp8
  tensor) under the network's prefix, and for every matrix X an fp8 `X.weight` stored as
  weight / scale, a scalar fp32 `X.scale_weight` and a scalar `X.scale_input`;
- "comfy_quant": for every matrix X, `X.comfy_quant` (uint8 bytes of `{"format": "float8_e4m3fn"}`),
  `X.weight_scale` and `X.input_scale`;
- "metadata": as "comfy_quant", but the per-layer formats are in the safetensors metadata
  `_quantization_metadata` instead of `.comfy_quant` tensors.

Other tensors (norms, biases, embeddings) are bf16. `scaled_fp8` returns the tensors to write and
the reference weights: what ComfyUI computes with, `weight.float() * scale`, in fp32.
"""

from __future__ import annotations

import json

import torch

FP8_MAX = 448.0


def comfy_quant_bytes(fmt: str = "float8_e4m3fn") -> torch.Tensor:
    return torch.tensor(list(json.dumps({"format": fmt}).encode()), dtype=torch.uint8)


def scaled_fp8(
    weights: dict[str, torch.Tensor], prefix: str = "", form: str = "scaled_fp8", seed: int = 0
) -> tuple[dict[str, torch.Tensor], dict[str, str], dict[str, torch.Tensor]]:
    """(tensors, safetensors metadata, reference fp32 weights) of `weights` (our keys, no prefix)
    as ComfyUI stores them scaled, under `prefix`."""
    g = torch.Generator().manual_seed(seed)
    tensors, reference, layers = {}, {}, {}
    for key, w in weights.items():
        if w.ndim < 2 or "relative_attention_bias" in key:
            tensors[prefix + key] = w.to(torch.bfloat16)
            reference[key] = tensors[prefix + key].float()
            continue
        layer = key.removesuffix(".weight")
        scale = (w.abs().max() / FP8_MAX) * (0.5 + torch.rand((), generator=g))  # per layer, uneven
        fp8 = (w / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        tensors[prefix + key] = fp8
        reference[key] = fp8.float() * scale.float()
        if form == "scaled_fp8":
            tensors[f"{prefix}{layer}.scale_weight"] = scale.float()
            tensors[f"{prefix}{layer}.scale_input"] = torch.tensor(1.0)
        else:
            tensors[f"{prefix}{layer}.weight_scale"] = scale.float()
            tensors[f"{prefix}{layer}.input_scale"] = torch.tensor(0.5)
            layers[prefix + layer] = {"format": "float8_e4m3fn"}
            if form == "comfy_quant":
                tensors[f"{prefix}{layer}.comfy_quant"] = comfy_quant_bytes()
    metadata = {}
    if form == "scaled_fp8":
        tensors[prefix + "scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    elif form == "metadata":
        metadata["_quantization_metadata"] = json.dumps({"format_version": "1.0", "layers": layers})
    return tensors, metadata, reference
