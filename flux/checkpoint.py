"""Weight files without loading them: the safetensors or GGUF header, and which networks a file holds.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON (`{key: {dtype, shape,
data_offsets}}`, plus an optional `__metadata__`), then the tensor bytes. `read_header` reads and
checks only that header, so telling a 24 GB file apart from another costs a few kilobytes, and a
truncated or foreign file (pickle, HDF5, ...) is named before any tensor is touched. The tensors
themselves are read later, memory-mapped, by `flux.loading`. A GGUF file (city96's FLUX transformer
or a llama.cpp T5 encoder, `flux.gguf_layouts`) is read by `flux.gguf_file` into the same `Header`:
its tensors under our key names, those stored in a GGML block type (Q8_0 ... Q6_K) with the shape
of their bytes (`byte_shape`), which the loader keeps as they are.

`inspect_file` finds each network of FLUX.1 [schnell] in a file by one key only that network has
(its marker), whatever prefix precedes it. That covers the layouts in use:

- Black Forest Labs' single files: `flux1-schnell.safetensors` and `ae.safetensors`, no prefix;
- the Hugging Face single files of the text encoders: `t5xxl_fp16.safetensors`,
  `t5xxl_fp8_e4m3fn.safetensors` (`shared.weight`, `encoder.block.N...`) and `clip_l.safetensors`
  (`text_model.*`);
- ComfyUI's all-in-one checkpoints: `model.diffusion_model.`, `vae.`,
  `text_encoders.clip_l.transformer.` and `text_encoders.t5xxl.transformer.` prefixes, plus the
  unused `text_encoders.*.logit_scale` scalars;
- any of these as ComfyUI's scaled fp8 (per-layer scales, read by `flux.scaled_fp8`), and the
  GGUF files above.

Key layouts: those of the public files (recorded in tests/data/keys/*.json); the all-in-one
prefixes are those of ComfyUI's `comfy/supported_models.py` (`Flux`),
https://github.com/comfyanonymous/ComfyUI/blob/master/comfy/supported_models.py.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import ModelLoadError
from .components import AE, COMPONENTS, TRANSFORMER, Component
from .gguf_file import GGUF_MAGIC, read_gguf_header
from .gguf_layouts import network_tensors
from .gguf_quants import BLOCK_TYPES, GGML_TYPES

# safetensors dtype codes (the header's "dtype" strings) and the torch dtypes they store
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
# the dtypes a weight of ours may be stored in: safetensors codes, and GGUF's block types
STORED_DTYPES = ("F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", *BLOCK_TYPES)

MAX_HEADER_BYTES = 100_000_000  # the limit the safetensors library itself enforces
LIST_LIMIT = 12  # how many keys an error message lists before "... and N more"


# --- the header ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as the header describes it; `start`/`end` are absolute byte offsets in the file."""

    dtype: str  # safetensors code, e.g. "BF16", or a GGML type name, e.g. "Q4_K"
    shape: tuple[int, ...]
    start: int
    end: int
    byte_shape: tuple[int, ...] | None = None  # GGML block types: (..., bytes per row) as stored

    @property
    def quantized(self) -> bool:
        """Stored in a GGML block type: its data is bytes, kept as `stored_shape` uint8."""
        return self.byte_shape is not None

    @property
    def torch_dtype(self) -> torch.dtype:
        """The dtype its data is read as (uint8 for the bytes of a block type)."""
        return torch.uint8 if self.quantized else SAFETENSORS_DTYPES[self.dtype]

    @property
    def stored_shape(self) -> tuple[int, ...]:
        """The shape its data is read in: `byte_shape`, else `shape`."""
        return self.byte_shape or self.shape

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Header:
    """A weight file's table of contents: every tensor's dtype, shape and place in the file."""

    path: Path
    file_size: int
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str] = field(default_factory=dict)
    format: str = "safetensors"  # or "gguf"


def _fail(path: Path, expected: str | None, reason: str) -> ModelLoadError:
    what = f"cannot be loaded as the {expected}" if expected else "cannot be read"
    return ModelLoadError(f"{path} {what}: {reason}")


def _foreign_format(head: bytes) -> str | None:
    """Name the file format given its first bytes, when it is a known format other than safetensors."""
    if head.startswith(b"PK\x03\x04"):
        return (
            "a PyTorch checkpoint (.ckpt/.pt/.pth: a zip of pickled tensors), not safetensors; "
            "pickles can run code and are not loaded"
        )
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return (
            "a Python pickle (a legacy PyTorch .ckpt/.bin), not safetensors; "
            "pickles can run code and are not loaded"
        )
    if head.startswith(b"\x89HDF"):
        return "an HDF5 file (Keras .h5), not safetensors"
    if head.lstrip()[:1] in (b"{", b"["):
        return "a JSON text file (a config?), not a weight file"
    return None


def read_header(path: str | Path, *, expected: str | None = None) -> Header:
    """Read and check the header of the safetensors or GGUF file at `path`; no tensor data is read.

    `expected` names what the caller wants from the file (e.g. "FLUX.1 transformer"); it goes into
    the error messages. Raises ModelLoadError for a missing file, a folder, another format (named),
    a corrupt header or a file shorter than its header says (truncated download).
    """
    path = Path(path)
    if not path.exists():
        raise _fail(path, expected, "no such file")
    if path.is_dir():
        raise _fail(
            path,
            expected,
            "it is a folder (a diffusers model folder?); give the single .safetensors file",
        )
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(16)
        if head.startswith(GGUF_MAGIC):  # as a safetensors length, "GGUF" + version is > 100 MB
            return _read_gguf(path, expected)
        # safetensors' own rules first: its first 8 bytes are a length, and some lengths look like
        # the magic bytes of other formats (896 starts like a pickle, 31520 like JSON text).
        header_len = struct.unpack("<Q", head[:8])[0] if len(head) >= 8 else 0
        if not (2 <= header_len <= MAX_HEADER_BYTES and head[8:9] == b"{"):
            foreign = _foreign_format(head)
            if foreign:
                raise _fail(path, expected, f"it is {foreign}")
            if size < 8:
                raise _fail(
                    path, expected, f"the file is {size} bytes long, too short for a safetensors file"
                )
            raise _fail(
                path,
                expected,
                f"it is not a safetensors file (unrecognised format; first bytes {head[:8].hex(' ')})",
            )
        if 8 + header_len > size:
            raise _fail(
                path,
                expected,
                f"the file is truncated: its header alone needs {8 + header_len} bytes but the "
                f"file has {size}; download it again",
            )
        f.seek(8)
        raw = f.read(header_len)
    try:
        table = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _fail(path, expected, f"its safetensors header is corrupt ({e})") from e
    if not isinstance(table, dict):
        raise _fail(path, expected, "its safetensors header is not a JSON object")

    metadata = table.pop("__metadata__", None) or {}
    data_start = 8 + header_len
    tensors: dict[str, TensorEntry] = {}
    for key, desc in table.items():
        entry = _parse_entry(path, expected, key, desc, data_start)
        if entry.end > size:
            raise _fail(
                path,
                expected,
                f"the file is truncated: tensor {key!r} ends at byte {entry.end} but the file "
                f"has {size} bytes ({entry.end - size} missing); download it again",
            )
        tensors[key] = entry
    return Header(path=path, file_size=size, tensors=tensors, metadata=dict(metadata))


def _read_gguf(path: Path, expected: str | None) -> Header:
    """A GGUF file's tensors under our key names (`flux.gguf_layouts`), as a `Header`."""

    def fail(reason: str) -> ModelLoadError:
        return _fail(path, expected, reason)

    gguf = read_gguf_header(path, fail)
    found = network_tensors(gguf, fail)
    tensors = {}
    for key, t in found.tensors.items():
        ggml = GGML_TYPES[t.type_name]
        tensors[key] = TensorEntry(
            dtype=t.type_name,
            shape=found.shapes[key],
            start=t.start,
            end=t.end,
            byte_shape=ggml.byte_shape(t.shape) if t.type_name in BLOCK_TYPES else None,
        )
    metadata = {"general.architecture": found.architecture}
    return Header(path=path, file_size=gguf.file_size, tensors=tensors, metadata=metadata, format="gguf")


def _parse_entry(path: Path, expected: str | None, key: str, desc: object, data_start: int) -> TensorEntry:
    try:
        dtype = desc["dtype"]  # type: ignore[index]
        shape = tuple(int(n) for n in desc["shape"])  # type: ignore[index]
        begin, end = (int(n) for n in desc["data_offsets"])  # type: ignore[index]
    except (TypeError, KeyError, ValueError) as e:
        raise _fail(path, expected, f"its safetensors header is corrupt at {key!r}: {desc!r}") from e
    if dtype not in SAFETENSORS_DTYPES:
        raise _fail(path, expected, f"tensor {key!r} has dtype {dtype!r}, unknown to this loader")
    itemsize = SAFETENSORS_DTYPES[dtype].itemsize
    if any(n < 0 for n in shape) or end - begin != math.prod(shape) * itemsize or begin < 0:
        raise _fail(
            path,
            expected,
            f"its safetensors header is corrupt: tensor {key!r} of shape {shape} ({dtype}) "
            f"spans bytes {begin}..{end}",
        )
    return TensorEntry(dtype=dtype, shape=shape, start=data_start + begin, end=data_start + end)


# --- which networks a file holds -----------------------------------------------------------------


# The four networks (names, marker keys, all-in-one prefixes): flux/components.py.

# keys of an all-in-one checkpoint that belong to no network and are never loaded
COMFY_EXTRA_KEYS = ("text_encoders.clip_l.logit_scale", "text_encoders.t5xxl.logit_scale")

# (substring any key contains, what the file then is): for naming files of other architectures
FOREIGN_SIGNATURES = (
    ("input_blocks.", "a Stable Diffusion 1.x/2.x/SDXL UNet checkpoint"),
    ("joint_blocks.", "a Stable Diffusion 3 (MMDiT) checkpoint"),
    (
        "single_transformer_blocks.",
        "a FLUX transformer in the diffusers layout (diffusion_pytorch_model*.safetensors); "
        "this loader reads Black Forest Labs' single file",
    ),
    ("down_blocks.", "a diffusers-layout UNet or VAE"),
    ("lora_", "a LoRA (not a full model)"),
    (".lora_A.", "a LoRA (not a full model)"),
    ("vision_model.", "a CLIP vision encoder"),
)

# (how to recognise it, what it is): variants of our networks this loader cannot read
# (ComfyUI's scaled fp8 and comfy_quant files are read, or refused by format: flux.scaled_fp8)
UNSUPPORTED_VARIANTS = (
    (
        lambda k: "bitsandbytes__" in k or k.endswith(".absmax"),
        "a bitsandbytes NF4/FP4 quantized file; it is not supported: use the fp8_e4m3fn, fp16 or bf16 file",
    ),
)


@dataclass(frozen=True)
class ComponentInfo:
    """Where one network lies in a file: its key prefix, its keys, dtypes and size."""

    spec: Component
    prefix: str
    keys: tuple[str, ...]  # full keys in the file
    dtypes: dict[str, int]  # safetensors dtype code -> number of tensors
    num_params: int
    variant: str | None = None  # the transformer's "schnell" or "dev"

    def describe(self) -> str:
        """E.g. "a CLIP-L text encoder (no prefix; 196 tensors, 123,060,480 parameters: 196 F16)"."""
        dtypes = ", ".join(f"{n} {d}" for d, n in sorted(self.dtypes.items()))
        where = f"under {self.prefix!r}" if self.prefix else "no prefix"
        name = f"FLUX.1 [{self.variant}] transformer" if self.variant else self.spec.title
        return f"a {name} ({where}; {len(self.keys)} tensors, {self.num_params:,} parameters: {dtypes})"


@dataclass(frozen=True)
class CheckpointInfo:
    """What `inspect_file` found in a file: its networks, its layout, and what else it may be."""

    header: Header
    components: dict[str, ComponentInfo]  # by Component.name
    layout: str  # "BFL single file", "Hugging Face single file", "ComfyUI all-in-one", "GGUF ...", ...
    looks_like: str | None  # another architecture this file seems to be, if any
    unsupported: str | None  # a variant of ours this loader cannot read, if any

    @property
    def path(self) -> Path:
        return self.header.path

    def describe(self) -> str:
        """One line a user can read: what the file holds."""
        if self.unsupported:
            return self.unsupported
        if self.looks_like:
            return self.looks_like
        if self.components:
            parts = "; ".join(c.describe() for c in self.components.values())
            return f"{self.layout} holding {parts}"
        keys = list_keys(self.header.tensors, 5)
        return f"an unknown set of {len(self.header.tensors)} tensors (first keys: {keys})"


def list_keys(keys, limit: int = LIST_LIMIT) -> str:
    """`keys` in natural order, at most `limit` of them, then how many more there are."""
    ordered = sorted(keys, key=_natural)
    shown = ", ".join(ordered[:limit])
    more = len(ordered) - limit
    return f"{shown}, ... and {more} more" if more > 0 else shown


def _natural(key: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", key)]


def _find_prefixes(keys, spec: Component) -> list[str]:
    """Every prefix under which `spec`'s marker key occurs (a prefix is empty or ends with '.')."""
    found = []
    for key in keys:
        if key.endswith(spec.marker):
            prefix = key[: -len(spec.marker)]
            if prefix == "" or prefix.endswith("."):
                found.append(prefix)
    return found


def inspect_file(path: str | Path, *, expected: str | None = None) -> CheckpointInfo:
    """Read the header of `path` and tell which FLUX networks it holds, in which layout and dtypes.

    Only the header is read. A file may hold several networks (an all-in-one checkpoint) or none
    (`components` empty: then `looks_like` names the architecture it seems to be, when known).
    """
    header = read_header(path, expected=expected)
    keys = list(header.tensors)

    prefixes: dict[str, str] = {}
    for spec in COMPONENTS:
        found = _find_prefixes(keys, spec)
        if spec.comfy_prefix in found:
            prefixes[spec.name] = spec.comfy_prefix
        elif len(found) == 1:
            prefixes[spec.name] = found[0]
        elif len(found) > 1:
            raise _fail(
                header.path,
                expected,
                f"it holds {len(found)} {spec.title}s (under {', '.join(map(repr, found))}) and "
                f"none under {spec.comfy_prefix!r}; it is not a FLUX.1 checkpoint",
            )

    components = {}
    for name, prefix in prefixes.items():
        others = [p for n, p in prefixes.items() if n != name and len(p) > len(prefix)]
        own = tuple(
            k
            for k in keys
            if k.startswith(prefix) and not any(k.startswith(p) for p in others) and k not in COMFY_EXTRA_KEYS
        )
        spec = next(s for s in COMPONENTS if s.name == name)
        entries = [header.tensors[k] for k in own]
        variant = None
        if spec is TRANSFORMER:
            variant = "dev" if f"{prefix}guidance_in.in_layer.weight" in header.tensors else "schnell"
        components[name] = ComponentInfo(
            spec=spec,
            prefix=prefix,
            keys=own,
            dtypes=dict(Counter(e.dtype for e in entries)),
            num_params=sum(e.numel for e in entries),
            variant=variant,
        )

    return CheckpointInfo(
        header=header,
        components=components,
        layout=_layout(components, header),
        looks_like=_looks_like(keys),
        unsupported=next((what for test, what in UNSUPPORTED_VARIANTS if any(map(test, keys))), None),
    )


def _layout(components: dict[str, ComponentInfo], header: Header) -> str:
    if not components:
        return "unknown"
    if header.format == "gguf":
        return f"GGUF file (architecture {header.metadata.get('general.architecture')!r})"
    if len(components) > 1 or any(c.prefix == c.spec.comfy_prefix for c in components.values()):
        return "ComfyUI all-in-one checkpoint"
    (only,) = components.values()
    if only.prefix:
        return f"single file with prefix {only.prefix!r}"
    if only.spec in (TRANSFORMER, AE):
        return "Black Forest Labs single file"
    return "Hugging Face single file"


def _looks_like(keys: list[str]) -> str | None:
    for needle, what in FOREIGN_SIGNATURES:
        if any(needle in k for k in keys):
            if needle == "input_blocks." and any("label_emb." in k for k in keys):
                return "a Stable Diffusion XL UNet checkpoint"
            return what
    return None


def describe_other(info: CheckpointInfo) -> str:
    """What the file is, for a message saying it is not what was expected."""
    if info.looks_like:
        return f"it looks like {info.looks_like}"
    if info.components:
        return "it holds " + "; ".join(c.describe() for c in info.components.values())
    return (
        f"it holds none of the FLUX.1 networks ({len(info.header.tensors)} tensors; first keys: "
        f"{list_keys(info.header.tensors, 5)})"
    )
