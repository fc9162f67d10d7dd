"""Test helper: writes tiny random-weight model files in every real layout, and wrong files.

Every file is written the way the real ones are (with `safetensors.torch.save_file`, in the key
layout of tests/data/keys/*.json): Black Forest Labs' `flux1-schnell.safetensors` (and a dev variant with
`guidance_in`) and `ae.safetensors` without prefix, the Hugging Face `t5xxl_*.safetensors` (with or
without the tied `encoder.embed_tokens.weight`) and `clip_l.safetensors` (`text_model.*`, optionally
with `text_projection.weight` and `text_model.embeddings.position_ids`), and ComfyUI's all-in-one
checkpoint (`model.diffusion_model.`, `vae.`, `text_encoders.{clip_l,t5xxl}.transformer.` and the
`logit_scale` scalars), in fp32, fp16, bf16 or float8_e4m3fn.

The tiny configs keep what the loader's config inference assumes of the real networks: FLUX head dim
128 with RoPE axes (16, 56, 56), an autoencoder with 4 levels (latent at 1/8 size) and 16 latent
channels, T5 relative attention over 32 buckets up to distance 128, CLIP heads 64 wide. Vocabulary
sizes match tests/support/tiny_tokenizers.py. Values are seeded: norm scales 1 + 0.2 N, biases 0.1 N,
matrices N / sqrt(fan_in), so a forgotten scale or bias changes outputs.

`write_header_only` writes a sparse file with only a header and no data, which makes the full-size
real layouts (a 24 GB transformer) loadable in tests at no disk or memory cost.

Usage: `files = write_tiny_models(tmp_path, dtype=torch.bfloat16)`; `files.transformer`, ...
"""

from __future__ import annotations

import json
import math
import pickle
import struct
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from comfyui_flux_schnell.flux.autoencoder import AutoEncoder, AutoEncoderParams
from comfyui_flux_schnell.flux.clip import CLIPTextConfig, CLIPTextEncoder
from comfyui_flux_schnell.flux.model import Flux, FluxParams
from comfyui_flux_schnell.flux.t5 import T5Config, T5Encoder
from safetensors.torch import save_file

from .tiny_tokenizers import CLIP_VOCAB_SIZE, T5_VOCAB_SIZE

TINY_FLUX = FluxParams(
    in_channels=64,
    out_channels=64,
    vec_in_dim=64,  # the CLIP's width
    context_in_dim=64,  # the T5's width
    hidden_size=256,
    mlp_ratio=4.0,
    num_heads=2,
    depth=1,
    depth_single_blocks=1,
    axes_dim=(16, 56, 56),
    theta=10_000,
    qkv_bias=True,
    guidance_embed=False,
)
TINY_AE = AutoEncoderParams(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1, z_channels=16)
TINY_T5 = T5Config(vocab_size=T5_VOCAB_SIZE, d_model=64, d_kv=16, d_ff=96, num_layers=2, num_heads=2)
TINY_CLIP = CLIPTextConfig(
    vocab_size=CLIP_VOCAB_SIZE,
    hidden_size=64,  # one 64-wide head, as inference assumes
    intermediate_size=128,
    num_layers=2,
    num_heads=1,
    max_position_embeddings=77,
)

# prefixes of a ComfyUI all-in-one checkpoint (keys_comfyui_prefixes.json)
COMFY_PREFIXES = {
    "transformer": "model.diffusion_model.",
    "ae": "vae.",
    "clip": "text_encoders.clip_l.transformer.",
    "t5": "text_encoders.t5xxl.transformer.",
}
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn)
DTYPE_NAMES = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float8_e4m3fn: "fp8_e4m3fn",
}


# --- random weights ------------------------------------------------------------------------------


def random_weights(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """fp32 values for every key of `model` (which may live on the meta device), seeded."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, t in model.state_dict().items():
        noise = torch.randn(tuple(t.shape), generator=g)
        leaf = key.rsplit(".", 1)[-1]
        if "norm" in key and leaf in ("weight", "scale"):
            out[key] = 1 + 0.2 * noise
        elif t.ndim == 1:
            out[key] = 0.1 * noise
        else:
            out[key] = noise / math.sqrt(math.prod(t.shape[1:]))
    return out


def store(weights: dict[str, torch.Tensor], dtype: torch.dtype, small_dtype=torch.bfloat16):
    """The weights as a file would store them; fp8 files keep 1-D tensors in `small_dtype`."""
    out = {}
    for key, t in weights.items():
        want = small_dtype if dtype.itemsize == 1 and t.ndim < 2 else dtype
        out[key] = t.to(want).contiguous()
    return out


def _on_meta(cls, config):
    with torch.device("meta"):
        return cls(config)


def transformer_weights(params: FluxParams = TINY_FLUX, seed: int = 0) -> dict[str, torch.Tensor]:
    return random_weights(_on_meta(Flux, params), seed)


def autoencoder_weights(params: AutoEncoderParams = TINY_AE, seed: int = 1):
    return random_weights(_on_meta(AutoEncoder, params), seed)


def t5_weights(config: T5Config = TINY_T5, seed: int = 2) -> dict[str, torch.Tensor]:
    return random_weights(_on_meta(T5Encoder, config), seed)


def clip_weights(config: CLIPTextConfig = TINY_CLIP, seed: int = 3) -> dict[str, torch.Tensor]:
    return random_weights(_on_meta(CLIPTextEncoder, config), seed)


def add_hf_extras(kind: str, weights: dict, *, tied_copy=False, clip_extras=False) -> dict:
    """Extra keys the Hugging Face files may hold: T5's tied embedding copy, CLIP's unused tensors."""
    weights = dict(weights)
    if kind == "t5" and tied_copy:
        weights["encoder.embed_tokens.weight"] = weights["shared.weight"].clone()
    if kind == "clip" and clip_extras:
        hidden = weights["text_model.final_layer_norm.weight"].shape[0]
        positions = weights["text_model.embeddings.position_embedding.weight"].shape[0]
        g = torch.Generator().manual_seed(9)
        weights["text_projection.weight"] = torch.randn(hidden, hidden, generator=g)
        weights["text_model.embeddings.position_ids"] = torch.arange(positions)[None]
    return weights


# --- the files -----------------------------------------------------------------------------------


def save(path: Path, tensors: dict[str, torch.Tensor], dtype=torch.float32, **kw) -> Path:
    """Write `tensors` (floating ones converted as `store` does, others kept) as a safetensors file."""
    floats = {k: t for k, t in tensors.items() if t.is_floating_point()}
    others = {k: t.contiguous() for k, t in tensors.items() if not t.is_floating_point()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({**store(floats, dtype, **kw), **others}, str(path))
    return path


@dataclass(frozen=True)
class TinyModelFiles:
    """Paths of one tiny model set, and the configs they were written with."""

    folder: Path
    dtype: torch.dtype
    transformer: Path  # flux1-schnell.safetensors layout
    ae: Path  # ae.safetensors layout
    t5: Path  # t5xxl_*.safetensors layout (no tied copy)
    clip: Path  # clip_l.safetensors layout (text_model.*)
    all_in_one: Path  # ComfyUI checkpoint with all four
    flux_params: FluxParams = field(default_factory=lambda: replace(TINY_FLUX))
    ae_params: AutoEncoderParams = field(default_factory=lambda: replace(TINY_AE))
    t5_config: T5Config = field(default_factory=lambda: replace(TINY_T5))
    clip_config: CLIPTextConfig = field(default_factory=lambda: replace(TINY_CLIP))

    def spec(self, tokenizers: Path, **fields):
        """The local backend's `LocalModelSpec` of these four files, with the tokenizer folders
        `tokenizers`/tokenizer_2 (T5) and `tokenizers`/tokenizer (CLIP); `fields` set the rest."""
        from comfyui_flux_schnell.local.files import LocalModelSpec

        return LocalModelSpec(
            transformer=self.transformer,
            t5=self.t5,
            clip=self.clip,
            ae=self.ae,
            t5_tokenizer=tokenizers / "tokenizer_2",
            clip_tokenizer=tokenizers / "tokenizer",
            **fields,
        )


def write_tiny_models(folder: Path, dtype: torch.dtype = torch.float32, seed: int = 0):
    """Write the four single files and the all-in-one checkpoint of one tiny model set."""
    folder = Path(folder)
    tag = DTYPE_NAMES[dtype]
    parts = {
        "transformer": transformer_weights(seed=seed),
        "ae": autoencoder_weights(seed=seed + 1),
        "t5": t5_weights(seed=seed + 2),
        "clip": clip_weights(seed=seed + 3),
    }
    paths = {
        "transformer": save(folder / f"flux1-schnell-tiny_{tag}.safetensors", parts["transformer"], dtype),
        "ae": save(folder / f"ae-tiny_{tag}.safetensors", parts["ae"], dtype),
        "t5": save(folder / f"t5xxl-tiny_{tag}.safetensors", parts["t5"], dtype),
        "clip": save(folder / f"clip_l-tiny_{tag}.safetensors", parts["clip"], dtype),
    }
    paths["all_in_one"] = write_all_in_one(folder / f"flux1-schnell-tiny-aio_{tag}.safetensors", parts, dtype)
    return TinyModelFiles(folder=folder, dtype=dtype, **paths)


def write_all_in_one(path: Path, parts: dict[str, dict], dtype=torch.float32) -> Path:
    """A ComfyUI all-in-one checkpoint of `parts` (component name -> weights), with logit scales."""
    tensors = {COMFY_PREFIXES[name] + k: t for name, w in parts.items() for k, t in w.items()}
    for encoder in ("clip_l", "t5xxl"):
        tensors[f"text_encoders.{encoder}.logit_scale"] = torch.tensor(4.6052)
    return save(path, tensors, dtype)


def write_transformer(path: Path, dtype=torch.float32, *, dev=False, seed=0, params=TINY_FLUX):
    """A BFL-layout transformer file; `dev=True` adds `guidance_in.*` as in flux1-dev."""
    return save(path, transformer_weights(replace(params, guidance_embed=dev), seed), dtype)


# --- wrong files ---------------------------------------------------------------------------------


def write_sd_unet(path: Path) -> Path:
    """A few keys of a Stable Diffusion 1.5 checkpoint (UNet, VAE and CLIP under their prefixes)."""
    g = torch.Generator().manual_seed(5)
    keys = {
        "model.diffusion_model.input_blocks.0.0.weight": (32, 4, 3, 3),
        "model.diffusion_model.input_blocks.0.0.bias": (32,),
        "model.diffusion_model.middle_block.0.in_layers.0.weight": (32,),
        "model.diffusion_model.out.2.weight": (4, 32, 3, 3),
        "first_stage_model.decoder.conv_in.weight": (32, 4, 3, 3),
    }
    return save(path, {k: torch.randn(s, generator=g) for k, s in keys.items()}, torch.float16)


def write_truncated(source: Path, path: Path, keep_fraction=0.6, keep_bytes=None) -> Path:
    """A copy of `source` cut short (to `keep_bytes`, or a fraction), as a broken download is."""
    data = source.read_bytes()
    path.write_bytes(data[: keep_bytes if keep_bytes is not None else int(len(data) * keep_fraction)])
    return path


def write_corrupt_header(path: Path) -> Path:
    """A safetensors length prefix followed by broken JSON."""
    body = b'{"img_in.weight": {"dtype": "F32", "shape": [2, 2], "data_off'
    path.write_bytes(struct.pack("<Q", len(body)) + body + b"\0" * 16)
    return path


def write_pickle(path: Path, zip_format: bool = True) -> Path:
    """A PyTorch checkpoint (.ckpt): torch.save's zip format or a legacy raw pickle."""
    if zip_format:
        torch.save({"state_dict": {"w": torch.zeros(2)}}, path)
    else:
        path.write_bytes(pickle.dumps({"state_dict": {"w": [0.0, 0.0]}}, protocol=2))
    return path


def write_gguf(path: Path) -> Path:
    """The start of a GGUF file (magic, version 3, one tensor, no metadata), then zeros: a tensor
    without a name or dimensions (tests/support/tiny_gguf.py writes real ones)."""
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 1, 0) + b"\0" * 64)
    return path


# --- header-only (sparse) files ------------------------------------------------------------------

SAFETENSORS_CODES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.int64: "I64",
}


def safetensors_header(layout: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> tuple[bytes, int]:
    """The 8-byte length and JSON header of a safetensors file of `layout` (key -> shape, dtype),
    tensors stored back to back in that order; and the number of data bytes that follow."""
    header, offset = {}, 0
    for key, (shape, dtype) in layout.items():
        nbytes = math.prod(shape) * dtype.itemsize
        header[key] = {
            "dtype": SAFETENSORS_CODES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # align the data to 8 bytes, as safetensors' own writer does
    return struct.pack("<Q", len(raw)) + raw, offset


def write_header_only(path: Path, layout: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> Path:
    """A safetensors file of the given keys, shapes and dtypes whose data is a hole (reads as 0).

    The file has its full nominal size but occupies only its header on disk (a sparse file), and a
    memory-mapped read of it costs no memory until a page is touched.
    """
    head, data_bytes = safetensors_header(layout)
    with path.open("wb") as f:
        f.write(head)
        f.truncate(len(head) + data_bytes)
    return path
