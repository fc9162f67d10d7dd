"""The review page of a draft folder: `<out-dir>/index.html` and its thumbnails in `<out-dir>/thumbs/`.

A static page that opens from disk (no server, no external asset): a grid of small JPEG
thumbnails, each linking to its full PNG and captioned with its prompts-file line, seed and prompt,
then the lines that failed with their reasons. Pick and promote: each card has a checkbox (Tab and
Space reach and tick it; `a` picks all, `n` none), a running count, and the picks export as
`picks.jsonl` (a download, or copied to the clipboard) in the JSONL prompts format with their seeds
(drafts/prompts.py; a seed the service never received is left out), beside the command that renders
them at final quality. The page's one inline script only builds that file. The images come from
the run manifest (drafts/manifest.py; the last record of each file holds) and from any other PNG in the folder
(captioned from its text chunks). A run writes each thumbnail as its image arrives; `write_gallery`
makes the ones that are missing or older than their PNG, then writes the page atomically.
"""

from __future__ import annotations

import html
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from PIL import Image

from .manifest import MANIFEST_NAME, RecordStatus, latest_by_file
from .png_files import (
    THUMBNAIL_SIDE,
    UNREADABLE,
    is_complete_png,
    read_png_text,
    save_thumbnail,
    write_atomically,
)
from .prompts import seed_was_sent

GALLERY_NAME = "index.html"
PICKS_NAME = "picks.jsonl"
THUMBS_DIR = "thumbs"
MAX_CAPTION_CHARS = 160


def thumbnail_path(out_dir: Path, image_name: str) -> Path:
    return Path(out_dir) / THUMBS_DIR / (Path(image_name).stem + ".jpg")


@dataclass
class Tile:
    file: str  # relative to the folder
    prompt: str
    seed: str
    line: int | None
    pick: dict  # its line of picks.jsonl: the prompt, and the seed when it made the image


@dataclass
class GalleryStats:
    images: int
    failures: int
    thumbnails_made: int
    path: Path


def write_gallery(out_dir: Path) -> GalleryStats:
    """Write the thumbnails that are missing and `<out_dir>/index.html`; returns what it holds."""
    out_dir = Path(out_dir)
    latest = latest_by_file(out_dir / MANIFEST_NAME)
    tiles: list[Tile] = []
    failures: list[dict] = []
    known = set()
    for name, record in latest.items():
        if record["status"] == RecordStatus.DONE and (out_dir / name).is_file():
            known.add(name)
            line = record.get("line")
            prompt = str(record.get("prompt", ""))
            tiles.append(Tile(name, prompt, str(record.get("seed", "")), line, _pick(prompt, record)))
        elif record["status"] == RecordStatus.FAILED and not (out_dir / name).is_file():
            failures.append(record)
    tiles.sort(key=lambda t: (t.line if isinstance(t.line, int) else 0, t.file))
    others = sorted(p.name for p in out_dir.glob("*.png") if p.name not in known and p.is_file())
    for name in others:
        try:
            text = read_png_text(out_dir / name)
        except UNREADABLE:
            continue  # not a readable PNG: nothing to show
        prompt = text.get("prompt", "")
        tiles.append(Tile(name, prompt, text.get("seed", ""), None, {"prompt": prompt}))
    failures.sort(key=lambda r: r.get("line") if isinstance(r.get("line"), int) else 0)

    made = 0
    shown = []
    for tile in tiles:
        thumb = thumbnail_path(out_dir, tile.file)
        if _thumbnail_needed(out_dir / tile.file, thumb):
            if not _make_thumbnail(out_dir / tile.file, thumb):
                continue  # a damaged PNG: left out of the page
            made += 1
        shown.append(tile)
    page = _page(out_dir, shown, failures)
    path = write_atomically(out_dir / GALLERY_NAME, lambda f: f.write(page.encode("utf-8")))
    return GalleryStats(len(shown), len(failures), made, path)


def _pick(prompt: str, record: dict) -> dict:
    seed = record.get("seed")
    if isinstance(seed, int) and not isinstance(seed, bool) and seed_was_sent(record):
        return {"prompt": prompt, "seed": seed}
    return {"prompt": prompt}


def _thumbnail_needed(image: Path, thumb: Path) -> bool:
    try:
        return thumb.stat().st_mtime < image.stat().st_mtime
    except FileNotFoundError:
        return True


def _make_thumbnail(image: Path, thumb: Path) -> bool:
    if not is_complete_png(image):
        return False
    thumb.parent.mkdir(exist_ok=True)
    with Image.open(image) as picture:
        picture.draft("RGB", (THUMBNAIL_SIDE, THUMBNAIL_SIDE))
        save_thumbnail(picture.convert("RGB"), thumb)
    return True


def _href(path: str) -> str:
    return quote(path.replace(os.sep, "/"))


def _cut(text: str, limit: int = MAX_CAPTION_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; background: #16181c; color: #e6e6e6; }
h1 { font-size: 1.3em; margin: 0 0 .3em; } p.summary { color: #a0a0a0; margin: 0 0 1.2em; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(200px, 1fr)); gap: 14px; }
figure { margin: 0; background: #22252b; border-radius: 6px; overflow: hidden; }
figure img { display: block; width: 100%; height: auto; aspect-ratio: 1 / 1; object-fit: contain;
  background: #0e0f12; }
figcaption { padding: 6px 8px 8px; font-size: 12px; }
figcaption .where { color: #8fb8ff; font-weight: 600; }
a { color: inherit; text-decoration: none; }
table { border-collapse: collapse; margin-top: .5em; }
td, th { border-bottom: 1px solid #333; padding: 4px 10px; text-align: left; vertical-align: top; }
td.error { color: #ff9c8f; }
.picks { position: sticky; top: 0; z-index: 1; background: #16181c; padding: .5em 0 .8em;
  display: flex; flex-wrap: wrap; gap: .6em; align-items: center; }
.picks button { font: inherit; padding: 3px 10px; }
.picks code { background: #22252b; padding: 2px 6px; border-radius: 4px; user-select: all; }
label.pick { display: block; cursor: pointer; padding: 4px 8px 0; font-size: 12px; }
figure:has(input:checked) { outline: 3px solid #8fb8ff; }
:focus-visible { outline: 2px solid #ffd27f; outline-offset: 2px; }
"""

_SCRIPT = """
(function () {
  const boxes = Array.from(document.querySelectorAll("input.pick"));
  const count = document.getElementById("pick-count");
  const status = document.getElementById("pick-status");
  function picksText() {
    return boxes.filter(b => b.checked).map(b => b.dataset.pick + "\\n").join("");
  }
  function update() {
    const n = boxes.filter(b => b.checked).length;
    count.textContent = n + " of " + boxes.length + " picked";
    document.getElementById("pick-export").disabled = n === 0;
    document.getElementById("pick-copy").disabled = n === 0;
  }
  function setAll(on) { boxes.forEach(b => { b.checked = on; }); update(); }
  boxes.forEach(b => b.addEventListener("change", update));
  document.getElementById("pick-all").addEventListener("click", () => setAll(true));
  document.getElementById("pick-none").addEventListener("click", () => setAll(false));
  document.getElementById("pick-export").addEventListener("click", () => {
    const url = URL.createObjectURL(new Blob([picksText()], {type: "application/x-ndjson"}));
    const a = document.createElement("a");
    a.href = url; a.download = "picks.jsonl";
    document.body.appendChild(a); a.click(); a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
    status.textContent = "picks.jsonl downloaded";
  });
  document.getElementById("pick-copy").addEventListener("click", () => {
    const text = picksText();
    const done = () => { status.textContent = "copied: paste it into picks.jsonl"; };
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(text).then(done, () => fallback(text, done));
    } else { fallback(text, done); }
  });
  function fallback(text, done) {
    const area = document.createElement("textarea");
    area.value = text; document.body.appendChild(area); area.select();
    document.execCommand("copy"); area.remove(); done();
  }
  document.addEventListener("keydown", e => {
    if (e.ctrlKey || e.metaKey || e.altKey || e.target.tagName === "TEXTAREA") return;
    if (e.key === "a") { setAll(true); e.preventDefault(); }
    if (e.key === "n") { setAll(false); e.preventDefault(); }
  });
  update();
})();
"""

PROMOTE_COMMAND = "flux-schnell generate --prompts-file picks.jsonl --steps 8 --out-dir finals"


def _page(out_dir: Path, tiles: list[Tile], failures: list[dict]) -> str:
    title = f"Drafts in {out_dir.resolve().name}"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="summary">{len(tiles)} image(s), {len(failures)} failed line(s); written '
        f"{time.strftime('%Y-%m-%d %H:%M')} by comfyui-flux-schnell. Click a picture for the full "
        "image; tick the ones to render again at final quality.</p>",
        '<div class="picks" role="toolbar" aria-label="picks">',
        '<span id="pick-count" aria-live="polite">0 picked</span>',
        '<button type="button" id="pick-all" title="key: a">Select all</button>',
        '<button type="button" id="pick-none" title="key: n">Select none</button>',
        f'<button type="button" id="pick-export">Export {PICKS_NAME}</button>',
        '<button type="button" id="pick-copy">Copy to clipboard</button>',
        '<span id="pick-status" aria-live="polite"></span>',
        f"<span>then: <code>{html.escape(PROMOTE_COMMAND)}</code></span>",
        "</div>",
        '<div class="grid">',
    ]
    for tile in tiles:
        where = f"line {tile.line}" if tile.line is not None else html.escape(tile.file)
        thumb = f"{THUMBS_DIR}/{Path(tile.file).stem}.jpg"
        seed = f" · seed {html.escape(tile.seed)}" if tile.seed else ""  # none when it was not sent
        parts.append(
            f'<figure><a href="{_href(tile.file)}">'
            f'<img src="{_href(thumb)}" alt="{html.escape(_cut(tile.prompt))}" loading="lazy" '
            f'width="{THUMBNAIL_SIDE}" height="{THUMBNAIL_SIDE}"></a>'
            f'<figcaption><span class="where">{where}</span>{seed}<br>'
            f'<span title="{html.escape(tile.prompt)}">{html.escape(_cut(tile.prompt))}</span>'
            "</figcaption>"
            f'<label class="pick"><input type="checkbox" class="pick" '
            f'data-pick="{html.escape(json.dumps(tile.pick, ensure_ascii=False))}" '
            f'aria-label="pick {where}"> pick</label></figure>'
        )
    parts.append("</div>")
    if failures:
        parts += [
            f'<h2 id="failed">Failed ({len(failures)})</h2>',
            "<table><tr><th>line</th><th>seed</th><th>prompt</th><th>reason</th></tr>",
        ]
        for record in failures:
            parts.append(
                f"<tr><td>{html.escape(str(record.get('line', '')))}</td>"
                f"<td>{html.escape(str(record.get('seed', '')))}</td>"
                f"<td>{html.escape(_cut(str(record.get('prompt', ''))))}</td>"
                f'<td class="error">{html.escape(str(record.get("error", "")))}</td></tr>'
            )
        parts.append("</table>")
    parts.append(f"<script>{_SCRIPT}</script></body></html>\n")
    return "\n".join(parts)
