"""Image files on disk, without torch: PNGs with text chunks, written atomically; thumbnails; checks.

Every file is written to a temporary `.NAME.<pid>-<random>.part` beside its target and renamed into
place, so a killed run never leaves half a file under the real name; `remove_stale_parts` deletes
the `.part` files of runs that are no longer alive. A PNG the service sent is written as it came,
with the prompt, seed and model added as iTXt chunks before its image data and the
service's own text chunks left out (no decode and re-encode;
chunk layout from the PNG specification, https://www.w3.org/TR/png/#11iTXt); other images are
encoded with Pillow. Thumbnails are small JPEGs for the draft gallery.
"""

from __future__ import annotations

import io
import os
import re
import secrets
import struct
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path

from PIL import Image, PngImagePlugin

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TEXT_CHUNKS = (b"tEXt", b"zTXt", b"iTXt")
THUMBNAIL_SIDE = 256  # longest side of a gallery thumbnail, in pixels
THUMBNAIL_QUALITY = 80
# `.NAME.<pid>-<random>.part`; older versions wrote `.NAME.<random>.part` (no pid).
_PART = re.compile(r"^\.(?P<name>.+?)\.(?:(?P<pid>\d+)-)?[A-Za-z0-9_]+\.part$")


def write_atomically(path: Path, write) -> Path:
    """Call `write(file)` on a temporary file beside `path`, then rename it into place."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.part")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def save_png(image: Image.Image, path: str | os.PathLike, text: Mapping[str, str]) -> Path:
    """Encode `image` as a PNG with `text` as iTXt chunks, written atomically."""
    info = PngImagePlugin.PngInfo()
    for key, value in text.items():
        info.add_itxt(key, str(value))
    return write_atomically(Path(path), lambda f: image.save(f, format="PNG", pnginfo=info, compress_level=4))


def save_png_bytes(data: bytes | bytearray, path: str | os.PathLike, text: Mapping[str, str]) -> Path:
    """Write PNG `data` as it is, with `text` added as iTXt chunks (replacing text chunks of the
    same keywords), atomically. Raises ValueError when `data` is not a well-formed PNG."""
    with_text = png_with_text(data, text)
    return write_atomically(Path(path), lambda f: f.write(with_text))


def png_with_text(data: bytes | bytearray, text: Mapping[str, str]) -> bytes:
    """`data` (a PNG) with iTXt chunks for `text` inserted before its first IDAT chunk. The
    service's own text chunks (tEXt, zTXt, iTXt) are all left out: a key or anything else it echoed
    there never lands in a saved file; only our own text is kept."""
    if not data.startswith(PNG_SIGNATURE):
        raise ValueError("not a PNG: the signature is missing")
    out = [PNG_SIGNATURE]
    inserted = False
    for kind, chunk in _chunks(data):
        if kind == b"IDAT" and not inserted:
            out += [_itxt_chunk(_keyword(k), str(v)) for k, v in text.items()]
            inserted = True
        if kind in TEXT_CHUNKS:
            continue  # the service's own text
        out.append(chunk)
    if not inserted:
        raise ValueError("not a PNG: no image data (IDAT) chunk")
    return b"".join(out)


def _chunks(data: bytes | bytearray) -> Iterator[tuple[bytes, bytes | bytearray]]:
    """(type, whole chunk: length, type, data, CRC) for each chunk up to IEND."""
    pos = len(PNG_SIGNATURE)
    while pos + 8 <= len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        end = pos + 12 + length
        if end > len(data):
            raise ValueError("not a PNG: a chunk runs past the end of the data")
        kind = bytes(data[pos + 4 : pos + 8])
        yield kind, data[pos:end]
        pos = end
        if kind == b"IEND":
            return
    raise ValueError("not a PNG: no IEND chunk")


def _keyword(key: str) -> bytes:
    """A PNG text keyword: 1-79 Latin-1 characters."""
    word = key.encode("latin-1", "replace")[:79]
    if not word:
        raise ValueError("an empty PNG text keyword")
    return word


def _itxt_chunk(keyword: bytes, text: str) -> bytes:
    # keyword, 0, compression flag 0, method 0, language "", 0, translated keyword "", 0, UTF-8 text
    body = b"iTXt" + keyword + b"\0\0\0\0\0" + text.encode("utf-8")
    return struct.pack(">I", len(body) - 4) + body + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)


# What reading a PNG of the folder may raise when the file is not one we can use: damaged, of
# another kind, or claiming more pixels than Pillow agrees to decode (not an OSError).
UNREADABLE = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def is_complete_png(path: str | os.PathLike) -> bool:
    """True when `path` is a PNG that decodes to the end (so a resumed run may skip it)."""
    try:
        with Image.open(path) as image:
            if image.format != "PNG":
                return False
            image.load()
    except UNREADABLE:
        return False
    return True


def read_png_text(path: str | os.PathLike) -> dict[str, str]:
    """The text chunks before a PNG's image data (what this package writes), without decoding."""
    with Image.open(path) as image:
        return {k: v for k, v in image.info.items() if isinstance(v, str)}


def thumbnail_jpeg(image: Image.Image, side: int = THUMBNAIL_SIDE) -> bytes:
    """A JPEG of `image` whose longest side is at most `side` pixels."""
    small = image if image.mode == "RGB" else image.convert("RGB")
    factor = max(1, max(small.width, small.height) // side)
    # An integer box reduction averages whole pixel blocks (no aliasing) and costs a fifth of a
    # Lanczos resize; what is left (sizes that are no multiple of `side`) is a small resize.
    small = small.reduce(factor) if factor > 1 else small.copy()
    small.thumbnail((side, side), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    small.save(out, format="JPEG", quality=THUMBNAIL_QUALITY, optimize=True)
    return out.getvalue()


def save_thumbnail(image: Image.Image, path: str | os.PathLike) -> Path:
    data = thumbnail_jpeg(image)
    return write_atomically(Path(path), lambda f: f.write(data))


def remove_stale_parts(folder: Path, name: str | None = None) -> list[Path]:
    """Delete the `.part` files in `folder` (only those of `name` when given) left by runs that
    are no longer alive; returns what was removed."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        match = _PART.match(entry.name)
        if match is None or not entry.is_file(follow_symlinks=False):
            continue
        if name is not None and match["name"] != name:
            continue
        if match["pid"] is not None and _alive(int(match["pid"])):
            continue  # another run is writing it right now
        try:
            os.unlink(entry.path)
        except OSError:
            continue
        removed.append(Path(entry.path))
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True
