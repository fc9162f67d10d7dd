"""Tests of drafts/png_files.py: PNG text chunks added to the service's bytes, atomic writes, leftovers
of killed runs, thumbnails. No torch."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest
from comfyui_flux_schnell.drafts import png_files as image_files
from PIL import Image
from support.fake_imageapi import solid_image


def png_bytes(size=(32, 24), color=(10, 20, 30), **info) -> bytes:
    out = io.BytesIO()
    pnginfo = None
    if info:
        from PIL import PngImagePlugin

        pnginfo = PngImagePlugin.PngInfo()
        for key, value in info.items():
            pnginfo.add_text(key, value)
    Image.new("RGB", size, color).save(out, format="PNG", pnginfo=pnginfo)
    return out.getvalue()


def test_text_chunks_are_added_to_the_bytes_without_re_encoding(tmp_path):
    data = png_bytes(prompt="the service's own prompt", other="kept")
    path = image_files.save_png_bytes(data, tmp_path / "a.png", {"prompt": "a fox · 狐", "seed": "7"})
    written = path.read_bytes()
    with Image.open(path) as image:
        assert image.info["prompt"] == "a fox · 狐"  # ours replaces the service's chunk
        assert image.info["seed"] == "7"
        assert "other" not in image.info  # issue 15 (18): only our own text chunks are kept
        assert image.getpixel((0, 0)) == (10, 20, 30)
    # The image data chunks are the service's, byte for byte.
    idat = [c for kind, c in image_files._chunks(data) if kind == b"IDAT"]
    assert idat
    assert all(c in written for c in idat)
    assert image_files.is_complete_png(path)
    assert image_files.read_png_text(path)["seed"] == "7"


def test_the_services_text_chunks_of_every_kind_are_left_out(tmp_path):
    from PIL import PngImagePlugin

    pnginfo = PngImagePlugin.PngInfo()
    pnginfo.add_text("echo", "sk_live_ECHOED_KEY_123456")  # tEXt
    pnginfo.add_text("zecho", "sk_live_ECHOED_KEY_123456" * 20, zip=True)  # zTXt
    pnginfo.add_itxt("iecho", "sk_live_ECHOED_KEY_123456")  # iTXt
    out = io.BytesIO()
    Image.new("RGB", (8, 8)).save(out, format="PNG", pnginfo=pnginfo)
    path = image_files.save_png_bytes(out.getvalue(), tmp_path / "b.png", {"prompt": "p"})
    assert b"ECHOED" not in path.read_bytes()
    assert image_files.read_png_text(path) == {"prompt": "p"}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"GIF89a....", "signature"),
        (png_bytes()[:50], "past the end"),
        (png_bytes()[:-12], "no IEND"),
        (image_files.PNG_SIGNATURE + b"\0\0\0\0IEND\xae\x42\x60\x82", "IDAT"),
    ],
    ids=["gif", "cut_in_a_chunk", "no_end", "no_image_data"],
)
def test_malformed_pngs_are_refused_and_nothing_is_written(tmp_path, data, message):
    with pytest.raises(ValueError, match=message):
        image_files.save_png_bytes(data, tmp_path / "x.png", {"seed": "1"})
    assert list(tmp_path.iterdir()) == []


def test_a_failed_write_leaves_no_part_file(tmp_path):
    def broken(f):
        f.write(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        image_files.write_atomically(tmp_path / "x.png", broken)
    assert list(tmp_path.iterdir()) == []


def test_stale_part_files_of_dead_runs_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    dead_pid = int(dead.stdout)
    names = {
        "dead": f".a.png.{dead_pid}-1a2b.part",
        "alive": f".b.png.{os.getpid()}-3c4d.part",
        "old_style": ".c.png.k2j_x9q.part",  # what versions before the pid in the name wrote
        "not_ours": "notes.part",
        "image": "d.png",
    }
    for name in names.values():
        (tmp_path / name).write_bytes(b"x")
    removed = image_files.remove_stale_parts(tmp_path)
    assert sorted(p.name for p in removed) == sorted([names["dead"], names["old_style"]])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [names["alive"], names["not_ours"], names["image"]]
    )


def test_stale_parts_of_one_name_only(tmp_path):
    (tmp_path / ".fox.png.abc.part").write_bytes(b"x")
    (tmp_path / ".other.png.abc.part").write_bytes(b"x")
    image_files.remove_stale_parts(tmp_path, "fox.png")
    assert [p.name for p in tmp_path.iterdir()] == [".other.png.abc.part"]


def test_thumbnail_is_a_small_jpeg(tmp_path):
    image = Image.open(io.BytesIO(solid_image(1024, 768, (200, 100, 50))))
    path = image_files.save_thumbnail(image.convert("RGB"), tmp_path / "t.jpg")
    with Image.open(path) as thumb:
        assert thumb.format == "JPEG"
        assert max(thumb.size) == image_files.THUMBNAIL_SIDE
        assert thumb.size == (256, 192)
    assert path.stat().st_size < 20_000


def test_incomplete_png_is_not_complete(tmp_path):
    path = tmp_path / "cut.png"
    path.write_bytes(png_bytes((64, 64))[:-30])
    assert not image_files.is_complete_png(path)
    (tmp_path / "j.png").write_bytes(solid_image(8, 8, (1, 2, 3), fmt="JPEG"))
    assert not image_files.is_complete_png(tmp_path / "j.png")  # a JPEG named .png
