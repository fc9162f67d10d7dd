"""Write the template-browser thumbnail `<name>.jpg` beside each workflow in example_workflows/.

Each is a picture of the workflow's graph as ComfyUI's real frontend draws it: a real ComfyUI
server is started with this package linked in (scripts/comfyui_server.py, the base directory of
scripts/comfyui_check.py), a headless Chromium loads each UI workflow into the page with the
frontend's `app.loadGraphData`, the view is fitted to the nodes' bounding box (the frontend's
graph and canvas API) and that region, with a margin, is saved as a JPEG. Run from the
repository root with ComfyUI's Python (it has playwright):

    python -m scripts.make_thumbnails --comfyui ~/ComfyUI --python ~/ComfyUI/venv/bin/python \
        --browser /usr/bin/chromium [--front-end-root .../comfyui_frontend_package/static]

tests/test_workflows.py checks every workflow has one, a JPEG of sane size that looks like a
screenshot of a graph (the dark canvas with node-coloured regions), not a flat colour or noise.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

from scripts.comfyui_check import SCREENSHOT_SETTINGS, make_base, run_browser
from scripts.comfyui_server import ComfyServer, free_port
from tests.support import workflow_tools as wt

MARGIN_PX = 24  # screen pixels kept around the nodes
EDGE_PX = 120  # the frontend's menus and side bar sit on the canvas's edges: keep the graph off them
FAR_EDGE_PX = 240  # and its zoom controls in the bottom right corner
MAX_SIDE_PX = 768  # the saved picture's longer side at most
JPEG_QUALITY = 82

# Fits the view to the nodes (graph space: pos is a node's body, its title bar above it) inside
# the box `box` of the canvas, draws, and returns the nodes' screen rectangle [x, y, w, h].
FIT_TO_NODES = """async ([data, box]) => {
  await app.loadGraphData(data, true, true, 'thumbnail');
  const LG = window.LiteGraph || window.comfyAPI.litegraph.LiteGraph;
  const title = LG.NODE_TITLE_HEIGHT || 30;
  let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
  for (const n of app.graph._nodes) {
    const [x, y] = n.pos, [w, h] = n.size;
    x0 = Math.min(x0, x); y0 = Math.min(y0, y - title);
    x1 = Math.max(x1, x + w); y1 = Math.max(y1, y + h);
  }
  const canvas = app.canvas.canvas.getBoundingClientRect();
  const ds = app.canvas.ds;
  // Draw text and widgets at any zoom (the frontend's "low quality" mode hides them when zoomed out).
  app.canvas.min_font_size_for_lod = 0;
  app.canvas.low_quality_zoom_threshold = 0;
  const scale = Math.min(1, box.w / (x1 - x0), box.h / (y1 - y0));
  ds.scale = scale;
  ds.offset[0] = box.x / scale - x0;
  ds.offset[1] = box.y / scale - y0;
  if (app.canvas.updateLowQualityThreshold) app.canvas.updateLowQualityThreshold();
  app.canvas.setDirty(true, true);
  app.canvas.draw(true, true);
  await new Promise((r) => setTimeout(r, 500));
  return [canvas.left + box.x, canvas.top + box.y, (x1 - x0) * scale, (y1 - y0) * scale];
}"""


def shoot(page, ui_path: Path, target: Path) -> tuple[int, int, int]:
    """Saves `ui_path`'s graph as drawn, cropped to its nodes, as the JPEG `target`."""
    from PIL import Image

    page.keyboard.press("Escape")
    size = page.viewport_size
    box = {
        "x": EDGE_PX,
        "y": EDGE_PX,
        "w": size["width"] - EDGE_PX - FAR_EDGE_PX,
        "h": size["height"] - EDGE_PX - FAR_EDGE_PX,
    }
    x, y, w, h = page.evaluate(FIT_TO_NODES, [wt.load_json(ui_path), box])
    page.wait_for_timeout(1000)  # images, fonts and the DOM widgets (multiline text) settle
    clip = {"x": x - MARGIN_PX, "y": y - MARGIN_PX, "width": w + 2 * MARGIN_PX, "height": h + 2 * MARGIN_PX}
    raw = target.with_suffix(".raw.png")
    page.screenshot(path=str(raw), clip=clip)
    with Image.open(raw) as im:
        picture = im.convert("RGB")
    raw.unlink()
    picture.thumbnail((MAX_SIDE_PX, MAX_SIDE_PX), Image.Resampling.LANCZOS)
    picture.save(target, "JPEG", quality=JPEG_QUALITY, optimize=True, progressive=True)
    return picture.width, picture.height, target.stat().st_size


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--comfyui", type=Path, required=True, help="ComfyUI folder (has main.py)")
    parser.add_argument("--python", default=sys.executable, help="Python that runs ComfyUI")
    parser.add_argument("--browser", required=True, help="Chromium executable")
    parser.add_argument("--front-end-root", type=Path, help="this frontend build instead of ComfyUI's own")
    args = parser.parse_args(argv)
    comfyui = args.comfyui.expanduser().resolve()
    if not (comfyui / "main.py").is_file():
        parser.error(f"{comfyui} has no main.py: pass the ComfyUI folder")
    front_end_root = args.front_end_root.expanduser().resolve() if args.front_end_root else None
    base = Path(tempfile.mkdtemp(prefix="thumbnails-"))
    make_base(base, local=False)
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEAPI_")}
    server = ComfyServer(comfyui, args.python, base, free_port(), env, front_end_root)
    try:
        server.start()
        server.post("/settings", SCREENSHOT_SETTINGS)

        def all_workflows(page) -> None:
            for ui_path in wt.ui_workflow_paths():
                target = wt.thumbnail_path(ui_path)
                width, height, size = shoot(page, ui_path, target)
                print(f"{target.relative_to(wt.REPO)}: {width}x{height}, {size} bytes")

        run_browser(args.browser, server.url, all_workflows)
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
