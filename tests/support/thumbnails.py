"""Template-browser thumbnails: what a saved workflow produced, as `<name>.jpg` beside it.

ComfyUI's frontend shows each `example_workflows/<name>.json` of a package under *Templates* with
the picture `/api/workflow_templates/<package>/<name>.jpg` (ComfyUI serves the folder there; the
frontend builds that URL from the file name). A thumbnail here is a real output of its workflow:
the graph runs in-process (our nodes loaded the ComfyUI way, the core-node stand-ins of
workflow_tools.py) against the loopback fake ImageAPI, the local one with tiny random-weight models,
and the images its output nodes wrote become one small picture (a grid when there are several).

`python -m scripts.make_thumbnails` writes them; tests/test_workflows.py re-renders each and
compares it with the file.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from . import TEST_KEY
from . import workflow_tools as wt
from .comfy_stand_in import ComfyStandIn

TILE = 256  # one output: a 256 x 256 picture
GRID_TILE = 192  # several: a grid of 192 x 192 squares
JPEG_QUALITY = 88
LOCAL_SIDE = 256  # the local workflow's 1024 x 1024 is slow on a CPU; its thumbnail is made at 256


def montage(pictures: list[Image.Image]) -> Image.Image:
    """One output: itself at TILE x TILE. Several: a grid (columns = ceil(sqrt(n))) of squares."""
    if not pictures:
        raise ValueError("the workflow wrote no image to make a thumbnail of")
    if len(pictures) == 1:
        return ImageOps.fit(pictures[0].convert("RGB"), (TILE, TILE), Image.Resampling.LANCZOS)
    cols = math.ceil(math.sqrt(len(pictures)))
    rows = math.ceil(len(pictures) / cols)
    sheet = Image.new("RGB", (cols * GRID_TILE, rows * GRID_TILE), (24, 24, 24))
    for i, picture in enumerate(pictures):
        tile = ImageOps.fit(picture.convert("RGB"), (GRID_TILE, GRID_TILE), Image.Resampling.LANCZOS)
        sheet.paste(tile, ((i % cols) * GRID_TILE, (i // cols) * GRID_TILE))
    return sheet


def output_pictures(result: wt.RunResult, api: Mapping[str, Any]) -> list[Image.Image]:
    """The first image each image-writing node saved, in node-id order."""
    pictures = []
    for node_id in sorted(result.ui, key=lambda k: (len(k), k)):
        if api[node_id]["class_type"] not in ("SaveImage", "PreviewImage"):
            continue
        saved = result.ui[node_id].get("images", [])
        if saved:
            with Image.open(saved[0]["path"]) as im:
                pictures.append(im.convert("RGB"))
    return pictures


def runnable_api(ui_path: Path) -> dict[str, Any]:
    """The API twin of `ui_path`, with the local workflow made small enough for a CPU."""
    api = copy.deepcopy(wt.load_json(wt.api_twin_path(ui_path)))
    for node in api.values():
        if node["class_type"] == "FluxSchnellGenerate" and node["inputs"].get("backend") == "local":
            node["inputs"].update(width=LOCAL_SIDE, height=LOCAL_SIDE)
    return api


def render(ui_path: Path, node_classes: Mapping[str, type], out_dir: Path) -> Image.Image:
    """Run the workflow in-process and make its thumbnail (ComfyUI stand-ins must be in place)."""
    api = runnable_api(ui_path)
    classes = {**node_classes, **wt.core_stand_ins(out_dir, api)}
    result = wt.run_api_graph(api, classes)
    return montage(output_pictures(result, api))


def save_jpeg(picture: Image.Image, path: Path) -> Path:
    picture.save(path, format="JPEG", quality=JPEG_QUALITY, optimize=True)
    return path


def difference(a: Image.Image, b: Image.Image, side: int = 32) -> float:
    """Mean absolute difference (0..255 levels) of two pictures of one size, each averaged down to
    `side` x `side` first: JPEG's error on fine noise (a tiny random model's output) averages out,
    a different picture does not."""
    if a.size != b.size:
        return 255.0
    small = (side, side)
    pa = np.asarray(a.convert("RGB").resize(small, Image.Resampling.BOX), dtype=np.int16)  # (s, s, 3)
    pb = np.asarray(b.convert("RGB").resize(small, Image.Resampling.BOX), dtype=np.int16)
    return float(np.abs(pa - pb).mean())


def install_tiny_local_models(stand_in: ComfyStandIn, root: Path) -> None:
    """Tiny random-weight FLUX files where 'auto' looks in the stand-in's models/, and ComfyUI's
    bundled tokenizer folders (tiny vocabularies) in a stand-in `comfy` package under `root`."""
    from .tiny_models import write_tiny_models
    from .tiny_tokenizers import write_comfyui_tree

    write_comfyui_tree(root / "pkg")
    stand_in.comfy.__path__ = [str(root / "pkg" / "comfy")]
    files = write_tiny_models(root / "tiny")
    for source, folder, name in (
        (files.transformer, "diffusion_models", "flux1-schnell.safetensors"),
        (files.t5, "text_encoders", "t5xxl_fp16.safetensors"),
        (files.clip, "text_encoders", "clip_l.safetensors"),
        (files.ae, "vae", "ae.safetensors"),
    ):
        (stand_in.models_dir / folder).mkdir(parents=True, exist_ok=True)
        source.replace(stand_in.models_dir / folder / name)
    install_tiny_loras(stand_in.models_dir / "loras")


def install_tiny_loras(folder: Path) -> list[Path]:
    """Tiny LoRAs (fitting the tiny transformer) under every name the saved workflows' LoRA nodes pick."""
    from .tiny_loras import write_tiny_lora

    names = sorted(
        {
            node["inputs"]["lora_name"]
            for path in wt.API_DIR.glob("*.json")
            for node in wt.load_json(path).values()
            if node["class_type"] == "FluxSchnellLoRA"
        }
    )
    return [write_tiny_lora(folder / name, seed=i) for i, name in enumerate(names)]


@dataclass
class InProcess:
    package: ModuleType
    stand_in: ComfyStandIn
    out_dir: Path


@contextlib.contextmanager
def in_process_comfy(workdir: Path) -> Iterator[InProcess]:
    """Outside pytest (the thumbnail script): ComfyUI stand-ins, the package loaded the ComfyUI way,
    a fake ImageAPI with the environment pointing at it, tiny local models; all undone on exit."""
    from .fake_imageapi import FakeImageAPI

    stand_in = ComfyStandIn(workdir)
    saved_modules = {name: sys.modules.get(name) for name in stand_in.modules()}
    env_names = ("IMAGEAPI_BASE_URL", "IMAGEAPI_API_KEY", "IMAGEAPI_KEY", "IMAGEAPI_CONFIG")
    saved_env = {name: os.environ.get(name) for name in env_names}
    fake = FakeImageAPI().start()
    try:
        sys.modules.update(stand_in.modules())
        os.environ.pop("IMAGEAPI_KEY", None)
        os.environ.update(
            IMAGEAPI_BASE_URL=fake.base_url,
            IMAGEAPI_API_KEY=TEST_KEY,
            IMAGEAPI_CONFIG=str(workdir / "flux_schnell_config.json"),
        )
        install_tiny_local_models(stand_in, workdir)
        yield InProcess(wt.load_like_comfyui(), stand_in, workdir / "out")
    finally:
        fake.stop()
        for name, module in saved_modules.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
