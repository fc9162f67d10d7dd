"""Tests of drafts/gallery.py: the page's content (parsed, not eyeballed), its thumbnails, the
`flux-schnell gallery DIR` command, and, where Chromium is installed, that every image loads in a
real headless browser."""

from __future__ import annotations

import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import pytest
from comfyui_flux_schnell.cli import main
from comfyui_flux_schnell.drafts.png_files import save_png_bytes
from PIL import Image
from support.fake_imageapi import Reply, error_reply, request_image, solid_image


class Page(HTMLParser):
    """The parts of index.html the tests look at: figures (link, thumbnail, caption), failure rows,
    and every URL the page would load."""

    def __init__(self, text: str):
        super().__init__()
        self.figures: list[dict] = []
        self.failures: list[list[str]] = []
        self.urls: list[str] = []
        self._figure: dict | None = None
        self._row: list[str] | None = None
        self._cell: list[str] | None = None
        self._in_caption = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        for name in ("src", "href"):
            if name in attrs:
                self.urls.append(attrs[name])
        if (
            tag == "link"
            or (tag == "script" and "src" in attrs)
            or (tag == "img" and "://" in attrs.get("src", ""))
        ):
            self.urls.append("EXTERNAL:" + str(attrs))
        if tag == "figure":
            self._figure = {"caption": ""}
        elif self._figure is not None and tag == "a":
            self._figure["href"] = attrs["href"]
        elif self._figure is not None and tag == "img":
            self._figure["src"] = attrs["src"]
        elif tag == "figcaption":
            self._in_caption = True
        elif tag == "tr":
            self._row = []
        elif tag == "td" and self._row is not None:
            self._cell = []

    def handle_endtag(self, tag):
        if tag == "figure":
            self.figures.append(self._figure)
            self._figure = None
        elif tag == "figcaption":
            self._in_caption = False
        elif tag == "td" and self._row is not None:
            self._row.append("".join(self._cell))
            self._cell = None
        elif tag == "tr":
            if self._row:
                self.failures.append(self._row)
            self._row = None

    def handle_data(self, data):
        if self._in_caption and self._figure is not None:
            self._figure["caption"] += data
        if self._cell is not None:
            self._cell.append(data)


@pytest.fixture
def draft_folder(fake_api, tmp_path) -> Path:
    """A real draft run: five lines, one refused by the service, one repeated."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(
        "a red fox\na blue whale\n# comment\na <b>bold</b> & odd prompt\nrefuse me\na red fox\n"
    )

    def answer(req, fake):
        if req.prompt == "refuse me":
            return error_reply(400, "prompt refused by the moderation filter")
        return Reply.image(request_image(req))

    fake_api.set_default(answer)
    out = tmp_path / "drafts"
    args = ["generate", "--prompts-file", str(prompts), "--out-dir", str(out), "--seed", "5"]
    assert main([*args, "--width", "512", "--height", "512"]) == 1
    return out


@pytest.fixture
def seeded_draft_folder(send_seed, draft_folder) -> Path:
    """`draft_folder` made with `send_seed` on (the config is written first): seeds are recorded."""
    return draft_folder


def test_gallery_lists_every_image_with_line_and_seed_and_every_failure(seeded_draft_folder):
    draft_folder = seeded_draft_folder
    page = Page((draft_folder / "index.html").read_text(encoding="utf-8"))
    assert not [u for u in page.urls if u.startswith("EXTERNAL:")]  # opens from disk, alone
    assert len(page.figures) == 3  # fox, whale, the odd one; the repeated fox is no new image
    captions = sorted(f["caption"] for f in page.figures)
    assert captions[0].startswith("line 1 · seed 5")
    assert "a red fox" in captions[0]
    assert captions[1].startswith("line 2 · seed 5")
    assert captions[2].startswith("line 4 · seed 5")
    assert "a <b>bold</b> & odd prompt" in captions[2]  # shown as text, not markup
    for figure in page.figures:
        png = draft_folder / unquote(figure["href"])
        thumb = draft_folder / unquote(figure["src"])
        assert png.suffix == ".png"
        assert png.is_file()
        with Image.open(thumb) as small, Image.open(png) as full:
            assert small.format == "JPEG"
            assert max(small.size) <= 256 < max(full.size)
        assert thumb.stat().st_size < png.stat().st_size
    (failure,) = page.failures
    assert failure[0] == "5"
    assert failure[2] == "refuse me"
    assert "prompt refused by the moderation filter" in failure[3]


def test_gallery_command_for_a_folder_without_manifest(tmp_path, capsys):
    folder = tmp_path / "old"
    folder.mkdir()
    save_png_bytes(solid_image(300, 200, (1, 2, 3)), folder / "b.png", {"prompt": "second", "seed": "9"})
    save_png_bytes(solid_image(300, 200, (4, 5, 6)), folder / "a.png", {"prompt": "first", "seed": "8"})
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    assert main(["gallery", str(folder)]) == 0
    assert "2 image(s), 0 failed line(s), 2 new thumbnail(s)" in capsys.readouterr().out
    page = Page((folder / "index.html").read_text(encoding="utf-8"))
    assert [(f["href"], f["caption"]) for f in page.figures] == [
        ("a.png", "a.png · seed 8first"),
        ("b.png", "b.png · seed 9second"),
    ]
    assert main(["gallery", str(folder)]) == 0  # thumbnails are made once
    assert "0 new thumbnail(s)" in capsys.readouterr().out


def test_gallery_command_refuses_what_is_not_a_folder(tmp_path, capsys):
    assert main(["gallery", str(tmp_path / "nothing")]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_the_last_record_of_a_line_holds_after_a_re_run(draft_folder, fake_api, tmp_path):
    fake_api.set_default(lambda req, fake: Reply.image(request_image(req)))
    prompts = tmp_path / "prompts.txt"
    args = ["generate", "--prompts-file", str(prompts), "--out-dir", str(draft_folder), "--seed", "5"]
    assert main([*args, "--width", "512", "--height", "512"]) == 0
    page = Page((draft_folder / "index.html").read_text(encoding="utf-8"))
    assert len(page.figures) == 4
    assert page.failures == []


# Runs when the page and every image in it have loaded (or failed): records what did not decode.
CHECK_SCRIPT = """<script>
window.addEventListener("load", () => {
  const imgs = [...document.images];
  const bad = imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.getAttribute("src"));
  const out = document.createElement("pre");
  out.id = "check";
  out.textContent = JSON.stringify({images: imgs.length, broken: bad});
  document.body.appendChild(out);
});
</script>"""


def chromium() -> str | None:
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


@pytest.mark.skipif(chromium() is None, reason="no Chromium installed (Debian: apt-get install chromium)")
def test_every_image_loads_in_headless_chromium(draft_folder):
    page = (draft_folder / "index.html").read_text(encoding="utf-8")
    links = [f["href"] for f in Page(page).figures]
    # The same page, with every thumbnail loaded at once (not lazily, when scrolled to) and the full
    # images it links to added, so that the load event waits for all of them.
    full = "".join(f'<img src="{href}">' for href in links)
    check_page = page.replace('loading="lazy"', 'loading="eager"')
    check_page = check_page.replace("</body>", f"<div hidden>{full}</div>{CHECK_SCRIPT}</body>")
    check = draft_folder / "check.html"  # beside it, so relative links resolve the same way
    check.write_text(check_page, encoding="utf-8")
    dom = subprocess.run(
        [
            chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--dump-dom",
            "--virtual-time-budget=10000",
            check.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    report = json.loads(dom.split('<pre id="check">', 1)[1].split("</pre>", 1)[0])
    assert report == {"images": 6, "broken": []}  # three thumbnails, three full images


def test_picks_hold_a_seed_only_where_the_service_received_it(draft_folder):
    import html as html_module
    import re

    page = (draft_folder / "index.html").read_text(encoding="utf-8")
    picks = [json.loads(html_module.unescape(m)) for m in re.findall(r'data-pick="([^"]*)"', page)]
    assert len(picks) == 3
    assert all("seed" not in pick for pick in picks)  # the default config sends no seed
    assert {"prompt": "a red fox"} in picks


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims `width` x `height` pixels, with almost no image data."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 16))
        + chunk(b"IEND", b"")
    )


def test_a_png_claiming_100000_squared_pixels_is_left_out_not_a_crash(tmp_path):
    from comfyui_flux_schnell.cli import main

    (tmp_path / "bomb.png").write_bytes(_png_claiming(100_000, 100_000))
    Image.new("RGB", (32, 32), (9, 9, 9)).save(tmp_path / "fine.png")
    assert main(["gallery", str(tmp_path)]) == 0
    page = (tmp_path / "index.html").read_text()
    assert "fine.png" in page
    assert "bomb.png" not in page
