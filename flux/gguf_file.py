"""The GGUF container: its header, metadata and tensor table, read without touching tensor data.

A GGUF file (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md) is, little-endian:

- the magic `GGUF`, a uint32 version (2 or 3; version 1 used 32-bit counts), a uint64 tensor count
  and a uint64 metadata count;
- the metadata: key (uint64 length + UTF-8), uint32 value type, value. Types 0-12 are uint8, int8,
  uint16, int16, uint32, int32, float32, bool, string, array (uint32 item type, uint64 count,
  items), uint64, int64, float64;
- the tensor table: name (string), uint32 number of dims, that many uint64 dims *innermost first*
  (ggml's ne[0] is the length of a row, so torch's shape is the reverse), uint32 GGML type, uint64
  offset of the data relative to the data section;
- padding to `general.alignment` (default 32), then the data section; every tensor's data starts at
  a multiple of the alignment.

Why our own reader and not the `gguf` package (llama.cpp's `gguf-py`, which ComfyUI-GGUF uses):
the header format is simple (the parser below is short), and the package would be a runtime
dependency of the local backend (numpy memmaps of the whole file, its own errors) for no more. Ours
reads the header only (a few kilobytes to a few megabytes, for the T5 files' tokenizer arrays),
names a truncated file, an unknown or unsupported tensor type and a damaged table in this package's
own errors before anything is loaded, and returns byte ranges that `flux.loading` maps read-only
exactly as it maps safetensors files. The `gguf` package remains a test dependency: tests write
their GGUF files with its `GGUFWriter` and compare our decoding with `gguf.quants.dequantize`.
"""

from __future__ import annotations

import math
import mmap
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ModelLoadError
from .gguf_quants import GGML_TYPES, GGML_TYPES_BY_ID, OTHER_GGML_TYPES

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
KEEP_ARRAY_ITEMS = 64  # metadata arrays up to this long are kept; longer ones only counted

# value type -> struct format of one item (string and array are handled apart)
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class LongArray:
    """A metadata array too long to keep (e.g. a tokenizer's vocabulary): its item type and count."""

    item_type: int
    count: int


@dataclass(frozen=True)
class GGUFTensor:
    """One entry of the tensor table; `start`/`end` are absolute byte offsets in the file."""

    name: str
    type_name: str  # a key of gguf_quants.GGML_TYPES
    shape: tuple[int, ...]  # torch order (outermost first): the file's dims reversed
    start: int
    end: int


@dataclass(frozen=True)
class GGUFHeader:
    """What the header of a GGUF file says: version, metadata and where each tensor lies."""

    path: Path
    file_size: int
    version: int
    metadata: dict[str, object]
    tensors: dict[str, GGUFTensor] = field(default_factory=dict)


class _Truncated(Exception):
    """The header runs past the end of the file."""


class _Cursor:
    """Reads little-endian values one after the other from a buffer."""

    def __init__(self, buf, size: int):
        self.buf, self.size, self.pos = buf, size, 0

    def take(self, fmt: str):
        n = struct.calcsize(fmt)
        if self.pos + n > self.size:
            raise _Truncated
        values = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += n
        return values[0] if len(values) == 1 else values

    def skip(self, n: int) -> None:
        if self.pos + n > self.size:
            raise _Truncated
        self.pos += n

    def string(self) -> str:
        n = self.take("Q")
        if self.pos + n > self.size:
            raise _Truncated
        raw = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def value(self, value_type: int):
        if value_type in _SCALARS:
            return self.take(_SCALARS[value_type])
        if value_type == _STRING:
            return self.string()
        if value_type == _ARRAY:
            item_type, count = self.take("I"), self.take("Q")
            if count <= KEEP_ARRAY_ITEMS:
                return tuple(self.value(item_type) for _ in range(count))
            if item_type in _SCALARS:
                self.skip(count * struct.calcsize(_SCALARS[item_type]))
            else:
                for _ in range(count):  # strings (a vocabulary) or nested arrays: walk them
                    self.value(item_type)
            return LongArray(item_type, count)
        raise ValueError(f"unknown metadata value type {value_type}")


def read_gguf_header(path: Path, fail: Callable[[str], ModelLoadError]) -> GGUFHeader:
    """The header of the GGUF file at `path`; `fail(reason)` makes the error for a bad file.

    Raises for another version, a big-endian file, a truncated header or data, an unknown or
    unsupported tensor type, and a tensor table that does not fit the file.
    """
    size = path.stat().st_size
    if size < 24:
        raise fail(f"the file is {size} bytes long, too short for a GGUF file; download it again")
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        cur = _Cursor(buf, size)
        try:
            return _parse(cur, path, size, fail)
        except _Truncated:
            raise fail(
                f"the file is truncated: its GGUF header runs past the end of the file ({size} bytes); "
                "download it again"
            ) from None
        except (ValueError, UnicodeDecodeError, struct.error) as e:
            raise fail(f"its GGUF header is corrupt ({e})") from e


def _parse(cur: _Cursor, path: Path, size: int, fail) -> GGUFHeader:
    cur.skip(4)  # the magic, checked by the caller
    version = cur.take("I")
    if version not in SUPPORTED_VERSIONS:
        if version & 0xFFFF == 0:
            raise fail("it is a big-endian GGUF file; only little-endian GGUF files are read")
        raise fail(f"it is a GGUF file of version {version}; versions {SUPPORTED_VERSIONS} are read")
    n_tensors, n_values = cur.take("Q"), cur.take("Q")
    if n_tensors > size // 24 or n_values > size // 12:  # each entry takes at least that many bytes
        raise fail(
            f"the file is truncated or corrupt: its GGUF header lists {n_tensors} tensors and {n_values} "
            f"metadata values, more than its {size} bytes can hold; download it again"
        )

    metadata: dict[str, object] = {}
    for _ in range(n_values):
        key = cur.string()
        metadata[key] = cur.value(cur.take("I"))

    table = []
    for _ in range(n_tensors):
        name = cur.string()
        n_dims = cur.take("I")
        if not 1 <= n_dims <= MAX_DIMS:
            raise fail(f"its GGUF header is corrupt: tensor {name!r} has {n_dims} dimensions")
        dims = [cur.take("Q") for _ in range(n_dims)]
        table.append((name, tuple(reversed(dims)), cur.take("I"), cur.take("Q")))

    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise fail(f"its GGUF header is corrupt: general.alignment is {alignment!r}")
    data_start = -(-cur.pos // alignment) * alignment

    tensors: dict[str, GGUFTensor] = {}
    for name, shape, type_id, offset in table:
        t = GGML_TYPES_BY_ID.get(type_id)
        if t is None:
            known = OTHER_GGML_TYPES.get(type_id)
            what = f"GGML type {known}" if known else f"an unknown GGML type (id {type_id})"
            raise fail(
                f"tensor {name!r} is stored as {what}, which this loader does not decode (it reads "
                f"{', '.join(GGML_TYPES)}): use a file quantized to one of those (e.g. Q8_0, Q5_K_S, "
                "Q4_K_S)"
            )
        if shape[-1] % t.block_size or offset % alignment:
            raise fail(
                f"its GGUF header is corrupt: tensor {name!r} ({t.name}, shape {shape}) at offset "
                f"{offset} does not fit {t.name}'s blocks of {t.block_size} or the alignment {alignment}"
            )
        if name in tensors:
            raise fail(f"its GGUF header is corrupt: tensor {name!r} is listed twice")
        start = data_start + offset
        end = start + t.nbytes(math.prod(shape))
        if end > size:
            raise fail(
                f"the file is truncated: tensor {name!r} ends at byte {end} but the file has {size} "
                f"bytes ({end - size} missing); download it again"
            )
        tensors[name] = GGUFTensor(name, t.name, shape, start, end)
    return GGUFHeader(path=path, file_size=size, version=version, metadata=metadata, tensors=tensors)
