"""Networks whose weights stay GGUF-quantized or fp8-with-a-scale: preparing their layers for loading.

`flux.loading` builds a network on the meta device, matches the file's keys to it and then assigns
the tensors read from the file. For the two stored forms `flux.ops.compute_weight` turns into the
compute weight at run time, the layers are prepared first, on meta, so that the assignment fits:

- a weight stored in a GGML block type (Q8_0 ... Q6_K) of a `flux.ops` Linear, Conv2d or Embedding
  becomes a uint8 parameter of the bytes' shape (rows, bytes per row), and the layer records the
  type and the weight's real shape (`gguf_type`, `gguf_shape`). The bytes are what is read, kept
  and moved between devices: memory is the file's size. Any other tensor in a block type (a norm
  scale or bias, which converters keep in F32 anyway) is dequantized once at load;
- a layer with a ComfyUI fp8 scale (`flux.scaled_fp8`) gets a one-element fp32 buffer
  `weight_scale` (moved with the layer) and keeps its weight as stored; when the weights are to be
  widened (`weight_dtype` bf16/fp16/fp32) the scale is folded in at load instead:
  `(weight.float() * scale).to(weight_dtype)`, layer by layer.

`prepare` does both on the meta network and says what to read; `finish` turns what was read into
the state to assign. `make_gguf_layer` is the part the memory benchmark uses to build meta
networks in GGUF form.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import ModelLoadError
from . import ops
from .checkpoint import TensorEntry
from .gguf_quants import dequantize

STORED_FORM_LAYERS = (ops.Linear, ops.Conv2d, ops.Embedding)  # layers with `compute_weight`
SCALE = "weight_scale"
WIDE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def make_gguf_layer(layer: ops.StoredWeight, type_name: str, shape: tuple[int, ...], raw: torch.Tensor):
    """Make `layer.weight` the bytes `raw` (rows, bytes per row) of a `type_name` weight of `shape`."""
    layer.weight = nn.Parameter(raw, requires_grad=False)
    layer.gguf_type = type_name
    layer.gguf_shape = tuple(shape)


@dataclass
class LoadPlan:
    """What to read for a prepared network, and how to turn it into the state to assign."""

    entries: dict[str, TensorEntry]  # key -> tensor in the file (weights, then scales)
    dtypes: dict[str, torch.dtype]  # key -> the dtype to read it in
    dequantize_at_load: dict[str, TensorEntry] = field(default_factory=dict)  # small block tensors
    fold: dict[str, str] = field(default_factory=dict)  # weight key -> its scale's key (widened)
    scales: dict[str, str] = field(default_factory=dict)  # scale buffer key -> the key read
    weight_dtype: torch.dtype | None = None

    def finish(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The tensors read -> the state to assign (in place; also returned)."""
        for key, entry in self.dequantize_at_load.items():
            dtype = self.weight_dtype if self.weight_dtype in WIDE_DTYPES else torch.float32
            state[key] = dequantize(state[key], entry.dtype, dtype).reshape(entry.shape)
        for weight_key, scale_key in self.fold.items():
            scale = state.pop(scale_key).float().reshape(())
            state[weight_key] = (state[weight_key].float() * scale).to(self.weight_dtype)
        for buffer_key, scale_key in self.scales.items():
            state[buffer_key] = state.pop(scale_key).float().reshape(())
        return state


def prepare(
    model: nn.Module,
    entries: dict[str, TensorEntry],
    dtypes: dict[str, torch.dtype],
    scales: dict[str, TensorEntry],
    weight_dtype: torch.dtype | None,
    fail: Callable[[str], ModelLoadError],
) -> LoadPlan:
    """Prepare `model` (on meta) for `entries` (its key -> tensor in the file, read in `dtypes`)
    and `scales` (layer name -> its fp8 scale); returns what to read."""
    modules = dict(model.named_modules())
    plan = LoadPlan(entries=dict(entries), dtypes=dict(dtypes), weight_dtype=weight_dtype)
    for key, entry in entries.items():
        if not entry.quantized:
            continue
        layer_name, _, leaf = key.rpartition(".")
        layer = modules.get(layer_name)
        plan.dtypes[key] = torch.uint8
        if leaf == "weight" and isinstance(layer, STORED_FORM_LAYERS):
            raw = torch.empty(entry.stored_shape, dtype=torch.uint8, device="meta")
            make_gguf_layer(layer, entry.dtype, entry.shape, raw)
        else:
            plan.dequantize_at_load[key] = entry

    not_scalable = []
    for layer_name, scale in scales.items():
        layer, weight_key = modules.get(layer_name), f"{layer_name}.weight"
        if not isinstance(layer, STORED_FORM_LAYERS) or weight_key not in entries:
            not_scalable.append(layer_name)
            continue
        scale_key = f"{layer_name}.{SCALE} (file)"  # read under a key no network has
        plan.entries[scale_key], plan.dtypes[scale_key] = scale, torch.float32
        plan.dtypes[weight_key] = entries[weight_key].torch_dtype  # never narrowed: it is scaled
        if weight_dtype in WIDE_DTYPES:
            plan.fold[weight_key] = scale_key
        else:
            layer.register_buffer(SCALE, torch.empty((), dtype=torch.float32, device="meta"))
            plan.scales[f"{layer_name}.{SCALE}"] = scale_key
    if not_scalable:
        raise fail(
            f"it has fp8 scales for {len(not_scalable)} tensors that are no Linear, Conv2d or Embedding "
            f"weight of this network: {', '.join(not_scalable[:8])}"
        )
    return plan
