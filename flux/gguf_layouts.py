"""Which GGUF files hold a network of FLUX.1 [schnell], and their tensor names in our key layout.

Two kinds of GGUF file are in use with FLUX (read for facts from city96's ComfyUI-GGUF, `loader.py`
and `tools/convert.py`, https://github.com/city96/ComfyUI-GGUF, and llama.cpp's tensor names in
`gguf-py/gguf/constants.py`, https://github.com/ggml-org/llama.cpp):

- the transformer, converted by ComfyUI-GGUF's `tools/convert.py` and quantized by its patched
  `llama-quantize`: `general.architecture` is "flux", tensor names are Black Forest Labs' own
  (`double_blocks.0.img_attn.qkv.weight`; a `model.diffusion_model.` prefix, when present, is
  dropped as ComfyUI-GGUF does). 1-D tensors and tensors of at most 1024 values stay F32, the
  embedders and the final layer (`img_in`, `txt_in`, `time_in`, `vector_in`, `final_layer`) stay
  F16/BF16, every other matrix is quantized. Files without `general.architecture` (made by
  stable-diffusion.cpp) are recognised by their keys, as ComfyUI-GGUF does;
- the T5 v1.1 encoder, converted by llama.cpp (`general.architecture` "t5encoder", or "t5" for a
  whole encoder-decoder whose decoder is then ignored), with llama.cpp's names. They map onto the
  Hugging Face names of `t5xxl_*.safetensors` as ComfyUI-GGUF's `T5_SD_MAP` maps them:
  `token_embd` -> `shared`, `enc.blk.N.attn_{q,k,v,o}` -> `encoder.block.N.layer.0.SelfAttention.
  {q,k,v,o}`, `attn_rel_b` -> `...SelfAttention.relative_attention_bias`, `attn_norm` ->
  `...layer.0.layer_norm`, `ffn_gate`/`ffn_up`/`ffn_down` -> `...layer.1.DenseReluDense.wi_0/wi_1/
  wo`, `ffn_norm` -> `...layer.1.layer_norm`, `enc.output_norm` -> `encoder.final_layer_norm`.

GGUF dims are stored innermost first; `gguf_file` already reverses them into torch order. A tensor
that ComfyUI-GGUF's converter reshaped to rows of 256 (SD1/SDXL only) carries its real shape in the
metadata `comfy.gguf.orig_shape.<name>`, which is honoured.

Any other architecture is refused by name (a llama.cpp language model, another image model).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import ModelLoadError
from .gguf_file import GGUFHeader, GGUFTensor

FLUX_ARCH = "flux"
T5_ARCHS = ("t5encoder", "t5")
FLUX_MARKER = "double_blocks.0.img_attn.qkv.weight"
FLUX_PREFIX = "model.diffusion_model."
ORIG_SHAPE_KEY = "comfy.gguf.orig_shape."

# image architectures ComfyUI-GGUF converts (`IMG_ARCH_LIST` of its loader.py), other than FLUX
OTHER_IMAGE_ARCHS = (
    "sd1",
    "sdxl",
    "sd3",
    "aura",
    "hidream",
    "cosmos",
    "ltxv",
    "hyvid",
    "wan",
    "lumina2",
    "qwen_image",
)

T5_BLOCK = re.compile(r"enc\.blk\.(\d+)\.(\w+)\.weight")
T5_BLOCK_NAMES = {
    "attn_q": "layer.0.SelfAttention.q",
    "attn_k": "layer.0.SelfAttention.k",
    "attn_v": "layer.0.SelfAttention.v",
    "attn_o": "layer.0.SelfAttention.o",
    "attn_rel_b": "layer.0.SelfAttention.relative_attention_bias",
    "attn_norm": "layer.0.layer_norm",
    "ffn_gate": "layer.1.DenseReluDense.wi_0",
    "ffn_up": "layer.1.DenseReluDense.wi_1",
    "ffn_down": "layer.1.DenseReluDense.wo",
    "ffn_norm": "layer.1.layer_norm",
}
T5_OTHER_NAMES = {
    "token_embd.weight": "shared.weight",
    "enc.output_norm.weight": "encoder.final_layer_norm.weight",
}


@dataclass(frozen=True)
class GGUFNetworkTensors:
    """The tensors of a GGUF file under our key names, and what the file is."""

    architecture: str  # "flux" or "t5encoder"/"t5"
    tensors: dict[str, GGUFTensor]  # our key -> the tensor (its `name` is the file's own)
    shapes: dict[str, tuple[int, ...]]  # our key -> the tensor's real shape (orig_shape honoured)


def t5_key(name: str) -> str | None:
    """The Hugging Face T5 key of a llama.cpp T5 encoder tensor name; None for the decoder's and
    the LM head's tensors (a whole T5 file), the name itself when it is unknown."""
    if name.startswith("dec.") or name.startswith("output."):
        return None
    if name in T5_OTHER_NAMES:
        return T5_OTHER_NAMES[name]
    m = T5_BLOCK.fullmatch(name)
    if m and m.group(2) in T5_BLOCK_NAMES:
        return f"encoder.block.{m.group(1)}.{T5_BLOCK_NAMES[m.group(2)]}.weight"
    return name


def network_tensors(header: GGUFHeader, fail: Callable[[str], ModelLoadError]) -> GGUFNetworkTensors:
    """The tensors of `header` under our key names; `fail(reason)` makes the error for another
    architecture or an inconsistent shape."""
    arch = header.metadata.get("general.architecture")
    names = list(header.tensors)
    if arch is None and any(n.endswith(FLUX_MARKER) for n in names):
        arch = FLUX_ARCH  # stable-diffusion.cpp files carry no architecture; ComfyUI-GGUF detects it
    if arch == FLUX_ARCH:
        if any(n.startswith(FLUX_PREFIX) for n in names):  # keep only the prefixed ones, as ComfyUI-GGUF
            keys = {n: n[len(FLUX_PREFIX) :] for n in names if n.startswith(FLUX_PREFIX)}
        else:
            keys = {n: n for n in names}
    elif arch in T5_ARCHS:
        keys = {n: key for n in names if (key := t5_key(n)) is not None}
    else:
        raise fail(f"it is {_describe_arch(arch)}, not a FLUX.1 transformer or T5 encoder GGUF")

    tensors, shapes = {}, {}
    for name, key in keys.items():
        t = header.tensors[name]
        shape = header.metadata.get(ORIG_SHAPE_KEY + name)
        if shape is None:
            shape = t.shape
        elif not isinstance(shape, tuple) or math.prod(shape) != math.prod(t.shape):
            raise fail(f"its metadata {ORIG_SHAPE_KEY}{name} = {shape!r} does not fit the tensor's {t.shape}")
        if key in tensors:
            raise fail(f"it holds {key!r} twice (as {tensors[key].name!r} and {name!r})")
        tensors[key], shapes[key] = t, tuple(int(n) for n in shape)
    return GGUFNetworkTensors(architecture=arch, tensors=tensors, shapes=shapes)


def _describe_arch(arch) -> str:
    if arch is None:
        return "a GGUF file without general.architecture whose tensors are not a FLUX transformer's"
    if arch in OTHER_IMAGE_ARCHS:
        return f"a GGUF of another image model (general.architecture {arch!r})"
    if arch in ("clip", "clip-vision", "mmproj"):
        return f"a GGUF of a CLIP/vision encoder (general.architecture {arch!r})"
    return f"a GGUF of architecture {arch!r} (a llama.cpp language model?)"
