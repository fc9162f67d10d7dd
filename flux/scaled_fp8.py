"""ComfyUI's fp8 files with per-layer scales: which layers are scaled, from the header alone.

Read for facts from ComfyUI (https://github.com/comfyanonymous/ComfyUI): `comfy/utils.py`
(`convert_old_quants`), `comfy/ops.py` (`mixed_precision_ops`) and `comfy/quant_ops.py`
(`QUANT_ALGOS`, `TensorCoreFP8Layout.dequantize`). Two formats are in use:

- **scaled fp8** (e.g. `t5xxl_fp8_e4m3fn_scaled.safetensors`, `flux1-*-fp8_scaled` files): a marker
  tensor `scaled_fp8` under the network's prefix (its dtype is the fp8 format; two elements instead
  of none mean "compute in full precision"), and for each scaled layer X an fp8 `X.weight`, a
  one-element fp32 `X.scale_weight` and optionally `X.scale_input`;
- **comfy_quant** ("mixed precision", ComfyUI's newer per-layer format, into which current ComfyUI
  converts the one above on load): for each quantized layer X, `X.comfy_quant` (a uint8 tensor
  holding JSON such as `{"format": "float8_e4m3fn"}`), `X.weight_scale` and optionally
  `X.input_scale`; or the same per-layer configs as JSON in the safetensors metadata
  `_quantization_metadata` (`{"layers": {X: {"format": ...}}}`).

Either way, for the fp8 formats (`float8_e4m3fn`, `float8_e5m2`) the weight is
`X.weight.float() * scale`, which `flux.ops.compute_weight` computes per layer at run time from a
`weight_scale` buffer on the layer. The input scales only serve ComfyUI's fp8 matrix products (the
input quantized to fp8 too); we compute in bf16/fp32, as ComfyUI does without fp8 matrix
support, so they are not used. The other comfy_quant formats (`nvfp4`, `mxfp8`, `int8_tensorwise`,
`convrot_w4a4`, `asym_w4a8_int8`, `awq_w4a16`, ...) use block or per-channel scales and packed
integers that this loader does not decode: they are refused by name.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from ..errors import ModelLoadError

MARKER = "scaled_fp8"
FP8_FORMATS = ("float8_e4m3fn", "float8_e5m2")
METADATA_KEY = "_quantization_metadata"
# suffix -> what it is, for the keys of a scaled layer X
WEIGHT_SCALE_SUFFIXES = (".scale_weight", ".weight_scale")
UNUSED_SUFFIXES = (".scale_input", ".input_scale")  # only for fp8 matrix products
CONFIG_SUFFIX = ".comfy_quant"


@dataclass(frozen=True)
class LayerScales:
    """The scaled layers of one network: layer name -> the key of its one-element scale."""

    scales: dict[str, str] = field(default_factory=dict)  # e.g. "encoder.block.0...q" -> "...q.scale_weight"
    metadata_keys: tuple[str, ...] = ()  # keys that describe the quantization (marker, configs, inputs)
    kind: str = ""  # "scaled fp8" or "comfy_quant fp8", for messages

    def __bool__(self) -> bool:
        return bool(self.scales)


def find_layer_scales(
    shapes: Mapping[str, tuple[int, ...]],
    file_metadata: Mapping[str, str],
    prefix: str,
    read_config: Callable[[str], bytes],
    fail: Callable[[str], ModelLoadError],
) -> LayerScales:
    """The scaled layers among `shapes` (one network's keys, its `prefix` removed).

    `read_config(key)` returns the bytes of a `.comfy_quant` tensor; `fail(reason)` makes the error
    for a format this loader cannot read.
    """
    configs = _layer_configs(shapes, file_metadata, prefix, read_config, fail)
    scales, meta = {}, []
    for key in shapes:
        if key == MARKER or key.endswith(UNUSED_SUFFIXES) or key.endswith(CONFIG_SUFFIX):
            meta.append(key)
        elif key.endswith(WEIGHT_SCALE_SUFFIXES):
            layer = key.rsplit(".", 1)[0]
            if key.endswith(".weight_scale") and layer not in configs:
                continue  # not a comfy_quant layer: an ordinary tensor of that name, left to the loader
            scales[layer] = key
    unsupported = {layer: fmt for layer, fmt in configs.items() if fmt not in FP8_FORMATS}
    if unsupported:
        formats = sorted(set(unsupported.values()))
        raise fail(
            f"it is quantized in ComfyUI's per-layer 'comfy_quant' format {', '.join(map(repr, formats))} "
            f"({len(unsupported)} layers, e.g. {next(iter(unsupported))}), which this loader does not "
            "decode (it reads the fp8 formats float8_e4m3fn and float8_e5m2): use an fp8, fp16, bf16 or "
            "GGUF file"
        )
    problems = [f"{layer} has no weight_scale" for layer in configs if layer not in scales]
    problems += [f"{layer} has a scale but no weight" for layer in scales if f"{layer}.weight" not in shapes]
    problems += [
        f"{key} has {math.prod(shapes[key])} values" for key in scales.values() if math.prod(shapes[key]) != 1
    ]
    if problems:
        raise fail(
            "its per-layer fp8 scales are not the one-number-per-layer kind this loader reads: "
            + "; ".join(problems[:8])
            + (f"; ... and {len(problems) - 8} more" if len(problems) > 8 else "")
        )
    kind = "comfy_quant fp8" if configs else "scaled fp8" if scales else ""
    return LayerScales(scales=scales, metadata_keys=tuple(meta), kind=kind)


def _layer_configs(shapes, file_metadata, prefix, read_config, fail) -> dict[str, str]:
    """Layer name -> its comfy_quant format, from `.comfy_quant` tensors or the file's metadata."""
    configs: dict[str, object] = {}
    raw = file_metadata.get(METADATA_KEY)
    if raw is not None:
        try:
            layers = json.loads(raw)["layers"]
            items = dict(layers).items()
        except (ValueError, KeyError, TypeError) as e:
            raise fail(f"its safetensors metadata {METADATA_KEY} is not valid ({e})") from e
        for layer, conf in items:
            if layer.startswith(prefix):
                layer = layer[len(prefix) :]
            if f"{layer}.weight" in shapes:  # layers of this network only (an all-in-one file)
                configs[layer] = conf
    for key in shapes:
        if key.endswith(CONFIG_SUFFIX):
            try:
                configs[key[: -len(CONFIG_SUFFIX)]] = json.loads(read_config(key))
            except (ValueError, UnicodeDecodeError) as e:
                raise fail(f"its per-layer config {prefix}{key} is not valid JSON ({e})") from e
    formats = {}
    for layer, conf in configs.items():
        fmt = conf.get("format") if isinstance(conf, dict) else conf
        formats[layer] = str(fmt)
    return formats
