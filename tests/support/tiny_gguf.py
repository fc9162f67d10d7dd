"""Test helper: tiny GGUF files in the layouts in use for FLUX, written with the `gguf` package.

The transformer file follows city96's ComfyUI-GGUF (`tools/convert.py` and the patched
`llama-quantize` of `tools/lcpp.patch`, https://github.com/city96/ComfyUI-GGUF):
`general.architecture` "flux", BFL key names, 1-D tensors and tensors of at most 1024 values in
F32, the embedders and the final layer (`img_in`, `txt_in`, `time_in`, `vector_in`, `final_layer`)
in F16, every other matrix in the chosen type (F16 when its rows do not split into whole blocks).
The T5 file follows llama.cpp's T5 encoder (`general.architecture` "t5encoder", names such as
`enc.blk.0.attn_q.weight` and `token_embd.weight`), with `attn_rel_b` and 1-D tensors unquantized.

Types `gguf.quants.quantize` implements (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) are
quantized from the weights. The K-quants (Q2_K ... Q6_K) it cannot quantize: their blocks are
random bytes whose fp16 scale fields are set to finite values sized like the weights. Either way
`write_*` also returns the reference weights: the file's tensors decoded by
`gguf.quants.dequantize`, in fp32, under our key names.
"""

from __future__ import annotations

import math
from pathlib import Path

import gguf
import numpy as np
import torch

GGUF_TYPES = (
    "F32",
    "F16",
    "BF16",
    "Q8_0",
    "Q4_0",
    "Q4_1",
    "Q5_0",
    "Q5_1",
    "Q2_K",
    "Q3_K",
    "Q4_K",
    "Q5_K",
    "Q6_K",
)
K_QUANTS = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
UNQUANTIZED_FLUX = ("img_in.", "txt_in.", "time_in.", "vector_in.", "guidance_in.", "final_layer.")

# K-quants: byte offset of each fp16 field in a block, and the value it gets relative to `scale`
# (the typical |sub-block scale x value| of the type, so that decoded values are about `scale`)
_K_FIELDS = {
    "Q2_K": {80: 1 / 11, 82: 1.5 / 11},
    "Q3_K": {108: 1 / 32},
    "Q4_K": {0: 1 / 240, 2: 7.5 / 240},
    "Q5_K": {0: 1 / 496, 2: 15.5 / 496},
    "Q6_K": {208: 1 / 1024},
}

T5_NAMES = {  # Hugging Face name (after "encoder.block.N.") -> llama.cpp name (after "enc.blk.N.")
    "layer.0.SelfAttention.q": "attn_q",
    "layer.0.SelfAttention.k": "attn_k",
    "layer.0.SelfAttention.v": "attn_v",
    "layer.0.SelfAttention.o": "attn_o",
    "layer.0.SelfAttention.relative_attention_bias": "attn_rel_b",
    "layer.0.layer_norm": "attn_norm",
    "layer.1.DenseReluDense.wi_0": "ffn_gate",
    "layer.1.DenseReluDense.wi_1": "ffn_up",
    "layer.1.DenseReluDense.wo": "ffn_down",
    "layer.1.layer_norm": "ffn_norm",
}


def qtype(name: str) -> gguf.GGMLQuantizationType:
    return gguf.GGMLQuantizationType[name]


def block_size(name: str) -> int:
    return gguf.GGML_QUANT_SIZES[qtype(name)][0]


def random_blocks(name: str, n_blocks: int, rng: np.random.Generator, scale: float = 1.0) -> np.ndarray:
    """Valid random blocks of a K-quant, (n_blocks, type_size) uint8: random bits, finite scales."""
    type_size = gguf.GGML_QUANT_SIZES[qtype(name)][1]
    blocks = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    for offset, factor in _K_FIELDS[name].items():
        d = (scale * factor * rng.uniform(0.5, 1.5, size=n_blocks)).astype(np.float16)
        blocks[:, offset : offset + 2] = d.view(np.uint8).reshape(n_blocks, 2)
    return blocks


def encode(weight: torch.Tensor, name: str, rng: np.random.Generator) -> np.ndarray:
    """`weight` (fp32) as GGUF stores it in type `name`: a float array, or (..., bytes per row) uint8."""
    data = weight.detach().float().numpy()
    if name in K_QUANTS:
        n_blocks = data.size // block_size(name)
        scale = float(np.abs(data).mean()) or 1.0
        return random_blocks(name, n_blocks, rng, scale).reshape(*data.shape[:-1], -1)
    return gguf.quants.quantize(data, qtype(name))


def decode(raw: np.ndarray, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """The reference: `gguf.quants.dequantize` of what was written, fp32, in `shape`."""
    return torch.from_numpy(np.array(gguf.quants.dequantize(raw, qtype(name)), dtype=np.float32)).reshape(
        shape
    )


def flux_type(key: str, shape: tuple[int, ...], name: str) -> str:
    """The type city96's tools give a FLUX tensor when quantizing to `name`."""
    if len(shape) == 1 or math.prod(shape) <= 1024:
        return "F32"
    if key.startswith(UNQUANTIZED_FLUX) or shape[-1] % block_size(name):
        return "F16"
    return name


def t5_type(key: str, shape: tuple[int, ...], name: str) -> str:
    """The type llama-quantize gives a T5 encoder tensor when quantizing to `name`."""
    if len(shape) == 1:
        return "F32"
    if "relative_attention_bias" in key or shape[-1] % block_size(name):
        return "F16"
    return name


def llama_t5_name(key: str) -> str:
    """Our (Hugging Face) T5 key -> llama.cpp's tensor name."""
    if key == "shared.weight":
        return "token_embd.weight"
    if key == "encoder.final_layer_norm.weight":
        return "enc.output_norm.weight"
    _, _, n, rest = key.split(".", 3)  # "encoder.block.N.<rest>.weight"
    return f"enc.blk.{n}.{T5_NAMES[rest.removesuffix('.weight')]}.weight"


def write_gguf(
    path: Path,
    tensors: dict[str, tuple[torch.Tensor, str]],
    arch: str | None,
    seed: int = 0,
    metadata: dict | None = None,
) -> dict[str, torch.Tensor]:
    """Write `tensors` (file name -> (fp32 weight, GGUF type)); returns file name -> the decoded
    reference weight. `arch` None writes no general.architecture (as stable-diffusion.cpp)."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), arch or "none")
    if arch is None:
        writer.kv_data[0].pop("general.architecture")
    for key, value in (metadata or {}).items():
        writer.add_array(key, value) if isinstance(value, (list, tuple)) else writer.add_string(key, value)
    reference = {}
    for name, (weight, type_name) in tensors.items():
        raw = encode(weight, type_name, rng)
        if type_name in ("F32", "F16"):
            writer.add_tensor(name, raw.reshape(weight.shape))
        else:
            writer.add_tensor(name, raw, raw_dtype=qtype(type_name))
        reference[name] = decode(raw, type_name, tuple(weight.shape))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return reference


def write_flux_gguf(path: Path, weights: dict[str, torch.Tensor], name: str, **kw) -> dict[str, torch.Tensor]:
    """A city96-layout FLUX transformer GGUF quantized to `name`; returns the decoded weights."""
    tensors = {k: (w, flux_type(k, tuple(w.shape), name)) for k, w in weights.items()}
    return write_gguf(path, tensors, kw.pop("arch", "flux"), **kw)


def write_t5_gguf(path: Path, weights: dict[str, torch.Tensor], name: str, **kw) -> dict[str, torch.Tensor]:
    """A llama.cpp-layout T5 encoder GGUF quantized to `name`; returns the decoded weights by our keys."""
    tensors = {llama_t5_name(k): (w, t5_type(k, tuple(w.shape), name)) for k, w in weights.items()}
    decoded = write_gguf(path, tensors, kw.pop("arch", "t5encoder"), **kw)
    return {k: decoded[llama_t5_name(k)] for k in weights}
