"""What the saved workflows need to run in-process on a CPU: tiny local models and LoRAs under the
names the graphs pick, and the local graphs made small.

(The template-browser thumbnails `<name>.jpg` used to be rendered from the workflows' outputs here;
they are now screenshots of the graphs in ComfyUI's real frontend, made by scripts/make_thumbnails.py.)
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from . import workflow_tools as wt
from .comfy_stand_in import ComfyStandIn

LOCAL_SIDE = 256  # the local workflow's 1024 x 1024 is slow on a CPU: it runs at 256


def runnable_api(ui_path: Path) -> dict[str, Any]:
    """The API twin of `ui_path`, with the local workflow made small enough for a CPU."""
    api = copy.deepcopy(wt.load_json(wt.api_twin_path(ui_path)))
    for node in api.values():
        if node["class_type"] == "FluxSchnellGenerate" and node["inputs"].get("backend") == "local":
            node["inputs"].update(width=LOCAL_SIDE, height=LOCAL_SIDE)
    return api


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
