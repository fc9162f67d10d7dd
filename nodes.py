"""ComfyUI node classes: inputs, outputs, and the mapping to a backend. No HTTP or tensor math here.

- `FluxSchnellGenerate` ("FLUX Schnell Generate"): prompt to IMAGE through the hosted API or the local
  model.
- `FluxSchnellLocalModel` ("FLUX Schnell Local Model"): picks the weight files of the local backend.
- `FluxSchnellLoRA` ("FLUX Schnell LoRA"): adds a LoRA (models/loras) to a local model; several chain.
- `FluxSchnellDrafts` ("FLUX Schnell Drafts"): a list of prompts into a draft folder (drafts/node_run.py).
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import ClassVar

from . import comfy_bridge
from .errors import InvalidInputError
from .generation import (
    BACKENDS,
    MAX_BATCH,
    MAX_PROMPT_CHARS,
    MAX_SEED,
    MAX_SIDE,
    MAX_STEPS,
    MIN_SIDE,
    SIDE_MULTIPLE,
    GenerationRequest,
)
from .local import LORA_FOLDER, MEMORY_CHOICES, STRENGTH_LIMIT, WEIGHT_DTYPE_OPTIONS, lora_from_comfy

CATEGORY = "image/generation/FLUX Schnell"
# What the node search also matches (the V1 attribute SEARCH_ALIASES, Comfy-Org/ComfyUI PR #12010)
SEARCH_WORDS = ("flux", "schnell", "flux.1", "bfl", "draft")
LOCAL_MODEL_TYPE = "FLUX_SCHNELL_MODEL"

AUTO = "auto"
NO_CHECKPOINT = "none"
COMPILE_ENV = "FLUX_SCHNELL_COMPILE"  # "1": torch.compile the transformer (ComfyUI has no CLI flag for it)


def _compile_requested() -> bool:
    """The environment is read here, where ComfyUI enters the package, not deep in the backend."""
    return os.environ.get(COMPILE_ENV, "").strip().lower() in ("1", "true", "yes")


class FluxSchnellGenerate:
    DESCRIPTION = (
        "Turns a prompt into images with FLUX.1 [schnell], either through the hosted ImageAPI "
        "service (backend 'api', paid per image; the API key is read from the environment variable "
        "IMAGEAPI_API_KEY or the package's config file, never from a widget) or on this machine "
        "(backend 'local', from the weight files in ComfyUI's models folders)."
    )
    CATEGORY = CATEGORY
    SEARCH_ALIASES: ClassVar[list[str]] = [*SEARCH_WORDS, "text to image", "txt2img", "imageapi", "generate"]
    FUNCTION = "generate"
    RETURN_TYPES = ("IMAGE", "STRING")
    RETURN_NAMES = ("images", "info")
    OUTPUT_TOOLTIPS = (
        "The generated images, float32 [batch, height, width, 3] in 0..1, in seed order.",
        "JSON: backend, model, size, steps, the seed of each image, seconds taken, and the "
        "service's request ids where it gave them. Never contains the API key.",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "prompt": (
                    "STRING",
                    {
                        "multiline": True,
                        "default": "",
                        "placeholder": "A photo of a red fox in fresh snow, golden hour",
                        "tooltip": f"What to draw (at most {MAX_PROMPT_CHARS:,} characters). "
                        "FLUX.1 [schnell] has no negative prompt.",
                    },
                ),
                "backend": (
                    list(BACKENDS),
                    {
                        "default": "api",
                        "tooltip": "'api': the hosted ImageAPI service (needs an API key, paid per "
                        "image). 'local': this machine's GPU or CPU with FLUX.1-schnell weight files.",
                    },
                ),
                "width": (
                    "INT",
                    {
                        "default": 1024,
                        "min": MIN_SIDE,
                        "max": MAX_SIDE,
                        "step": SIDE_MULTIPLE,
                        "tooltip": f"Image width in pixels, a multiple of {SIDE_MULTIPLE}.",
                    },
                ),
                "height": (
                    "INT",
                    {
                        "default": 1024,
                        "min": MIN_SIDE,
                        "max": MAX_SIDE,
                        "step": SIDE_MULTIPLE,
                        "tooltip": f"Image height in pixels, a multiple of {SIDE_MULTIPLE}.",
                    },
                ),
                "num_inference_steps": (
                    "INT",
                    {
                        "default": 4,
                        "min": 1,
                        "max": MAX_STEPS,
                        "step": 1,
                        "tooltip": "Sampling steps. 4 is the fast preset, 8 the quality setting "
                        "and the service's hard cap.",
                    },
                ),
                "seed": (
                    "INT",
                    {
                        "default": 0,
                        "min": 0,
                        "max": MAX_SEED,
                        "control_after_generate": True,
                        "tooltip": "Seed of the first image; image i of a batch uses seed + i. "
                        "The hosted API receives it only if 'send_seed' is enabled in the config.",
                    },
                ),
                "batch_size": (
                    "INT",
                    {
                        "default": 1,
                        "min": 1,
                        "max": MAX_BATCH,
                        "step": 1,
                        "tooltip": "How many images (seeds seed .. seed + batch_size - 1). With "
                        "the api backend each image is one paid request.",
                    },
                ),
            },
            "optional": {
                "local_model": (
                    LOCAL_MODEL_TYPE,
                    {
                        "tooltip": "Weight files from a 'FLUX Schnell Local Model' node (local "
                        "backend only). Unplugged, the usual files are looked up in models/."
                    },
                ),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},  # which node's bar and text to move
        }

    async def generate(
        self,
        prompt,
        backend,
        width,
        height,
        num_inference_steps,
        seed,
        batch_size,
        local_model=None,
        unique_id=None,
    ):
        """Async, so ComfyUI runs several generate nodes of a graph at once: the api backend waits
        for the service in a worker thread; the local backend runs here, on ComfyUI's executor
        thread, one generation at a time (its models are ComfyUI's to manage from that thread)."""
        request = GenerationRequest(
            prompt=prompt,
            width=width,
            height=height,
            steps=num_inference_steps,
            seed=seed,
            batch_size=batch_size,
        )
        request.validate(backend)
        if backend == "api" and local_model is not None and local_model.loras:
            raise InvalidInputError(
                "LoRAs run on the local backend only: set backend to 'local', or bypass the FLUX "
                "Schnell LoRA nodes (the hosted API would make the images without them)"
            )
        if backend == "api":
            from .api import load_settings
            from .api_client import generate_api

            settings = load_settings()  # the environment and config file, read on every run
            progress = comfy_bridge.progress_for(request.batch_size, unique_id, unit="image")
            with progress.status_text("waiting for the service"):
                images, info = await comfy_bridge.run_in_thread(
                    functools.partial(generate_api, on_event=lambda e: progress.set_status(e.node_status())),
                    request,
                    progress,
                    settings,
                    progress=progress,
                )
        else:
            from .local import require_local_packages

            require_local_packages()  # one clear error naming the package and the pip command
            from .local_backend import generate_local

            progress = comfy_bridge.progress_for(request.steps * request.batch_size, unique_id)
            images, info = generate_local(request, local_model, progress)
        return (images, info.to_json())


class FluxSchnellLocalModel:
    DESCRIPTION = (
        "Chooses the FLUX.1 [schnell] weight files for the local backend: a transformer "
        "(models/diffusion_models), the T5-XXL and CLIP-L text encoders (models/text_encoders) and "
        "the autoencoder (models/vae), or one all-in-one checkpoint (models/checkpoints). 'auto' "
        "finds the usual file names. Loaded models are kept between runs."
    )
    CATEGORY = CATEGORY
    SEARCH_ALIASES: ClassVar[list[str]] = [
        *SEARCH_WORDS,
        "model loader",
        "load checkpoint",
        "gguf",
        "local model",
    ]
    FUNCTION = "select"
    RETURN_TYPES = (LOCAL_MODEL_TYPE,)
    RETURN_NAMES = ("local_model",)
    OUTPUT_TOOLTIPS = ("Plug into the local_model input of FLUX Schnell Generate.",)

    @classmethod
    def INPUT_TYPES(cls):
        files = comfy_bridge.model_file_lists()
        return {
            "required": {
                "checkpoint": (
                    [NO_CHECKPOINT, *files["checkpoints"]],
                    {
                        "default": NO_CHECKPOINT,
                        "tooltip": "An all-in-one FLUX.1-schnell checkpoint (transformer, text "
                        "encoders and autoencoder in one file). Parts left on 'auto' below "
                        "come from it; a file chosen below replaces that part.",
                    },
                ),
                "transformer": (
                    [AUTO, *files["diffusion_models"]],
                    {
                        "default": AUTO,
                        "tooltip": "flux1-schnell*.safetensors (bf16, fp8, scaled fp8) or a "
                        "FLUX.1-schnell GGUF (Q8_0 ... Q2_K)",
                    },
                ),
                "t5": (
                    [AUTO, *files["text_encoders"]],
                    {
                        "default": AUTO,
                        "tooltip": "t5xxl_fp16 / t5xxl_fp8_e4m3fn(_scaled) .safetensors or a T5-XXL "
                        "encoder GGUF",
                    },
                ),
                "clip": (
                    [AUTO, *files["text_encoders"]],
                    {"default": AUTO, "tooltip": "clip_l.safetensors"},
                ),
                "vae": (
                    [AUTO, *files["vae"]],
                    {"default": AUTO, "tooltip": "ae.safetensors (the FLUX autoencoder)"},
                ),
                "weight_dtype": (
                    list(WEIGHT_DTYPE_OPTIONS),
                    {
                        "default": "as stored",
                        "tooltip": "How the transformer and T5 weights are kept in memory. "
                        "fp8_e4m3fn halves the memory of bf16 (about 12 GB instead of 24 GB for "
                        "the transformer); the arithmetic still runs in bf16. fp8_e4m3fn_fast also "
                        "multiplies the transformer's fp8 weights as fp8 (RTX 40xx, L4, H100 and newer: "
                        "faster, slightly less exact); other GPUs compute it as fp8_e4m3fn.",
                    },
                ),
                "memory": (
                    list(MEMORY_CHOICES),
                    {
                        "default": "auto",
                        "tooltip": "'auto': keep models on the GPU when they fit, else move each "
                        "stage out after use. 'keep on GPU': fastest repeat runs. 'offload to CPU': "
                        "only the running stage is on the GPU. 'free after run': release all.",
                    },
                ),
            }
        }

    def select(self, checkpoint, transformer, t5, clip, vae, weight_dtype, memory):
        from .local import require_local_packages

        require_local_packages()  # the same clear error as FLUX Schnell Generate's
        from .local import LocalModelSpec

        spec = LocalModelSpec.from_node_inputs(
            checkpoint=None if checkpoint == NO_CHECKPOINT else checkpoint,
            transformer=None if transformer == AUTO else transformer,
            t5=None if t5 == AUTO else t5,
            clip=None if clip == AUTO else clip,
            vae=None if vae == AUTO else vae,
            weight_dtype=weight_dtype,
            memory=memory,
            compile=_compile_requested(),
        )
        return (spec,)


class FluxSchnellLoRA:
    DESCRIPTION = (
        "Adds a LoRA from models/loras to the local FLUX.1 [schnell] model: kohya / sd-scripts, "
        "diffusers / ai-toolkit (PEFT) and ComfyUI files, for the transformer and the CLIP-L / T5 "
        "text encoders. Chain several to stack them. The model stays loaded: changing a LoRA or its "
        "strength reads only the LoRA file. A LoRA made for another model is refused by name."
    )
    CATEGORY = CATEGORY
    SEARCH_ALIASES: ClassVar[list[str]] = [*SEARCH_WORDS, "lora", "lora loader", "load lora"]
    FUNCTION = "apply"
    RETURN_TYPES = (LOCAL_MODEL_TYPE,)
    RETURN_NAMES = ("local_model",)
    OUTPUT_TOOLTIPS = ("The model with this LoRA added: into FLUX Schnell Generate or another LoRA node.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "local_model": (
                    LOCAL_MODEL_TYPE,
                    {"tooltip": "From 'FLUX Schnell Local Model' or another 'FLUX Schnell LoRA'."},
                ),
                "lora_name": (
                    comfy_bridge.model_file_lists()[LORA_FOLDER],
                    {"tooltip": "A FLUX.1 LoRA file in models/loras (refresh with R after adding one)."},
                ),
                "strength": (
                    "FLOAT",
                    {
                        "default": 1.0,
                        "min": -STRENGTH_LIMIT,
                        "max": STRENGTH_LIMIT,
                        "step": 0.01,
                        "tooltip": "How strongly the LoRA changes the model: 1 as trained, 0 off, "
                        "negative values push the other way.",
                    },
                ),
            }
        }

    def apply(self, local_model, lora_name, strength):
        return (local_model.with_lora(lora_from_comfy(lora_name, strength)),)


NONE_FILE = "none"
PROMPTS_SUFFIXES = (".txt", ".jsonl")


def _input_files(suffixes: tuple[str, ...]) -> list[str]:
    folder = comfy_bridge.input_directory()
    if folder is None or not os.path.isdir(folder):
        return []
    return sorted(name for name in os.listdir(folder) if name.lower().endswith(suffixes))


class FluxSchnellDrafts:
    DESCRIPTION = (
        "Drafts a list of prompts (one a line, '#' comments, or a .txt/.jsonl prompts file from the "
        "input folder) into a folder under ComfyUI's output folder, as the command line's "
        "`flux-schnell generate --prompts-file` does: each image saved as it arrives, manifest.jsonl "
        "and index.html (tick images there and export picks.jsonl, then plug it into 'picks' to render "
        "only those). Queue it again to finish what is missing: nothing is paid twice."
    )
    CATEGORY = CATEGORY
    SEARCH_ALIASES: ClassVar[list[str]] = [*SEARCH_WORDS, "drafts", "batch", "prompt list", "imageapi"]
    FUNCTION = "draft"
    OUTPUT_NODE = True
    RETURN_TYPES = ("IMAGE", "STRING")
    RETURN_NAMES = ("contact_sheet", "folder")
    OUTPUT_TOOLTIPS = (
        "A grid of the drafts' thumbnails captioned with their line numbers (at most 64).",
        "The draft folder's path.",
    )

    @classmethod
    def INPUT_TYPES(cls):
        generate = FluxSchnellGenerate.INPUT_TYPES()["required"]
        return {
            "required": {
                "prompts": (
                    "STRING",
                    {
                        "multiline": True,
                        "default": "",
                        "placeholder": "one prompt a line\n# a comment",
                        "tooltip": "One prompt a line; blank lines and lines starting with # are skipped.",
                    },
                ),
                "backend": generate["backend"],
                "width": generate["width"],
                "height": generate["height"],
                "num_inference_steps": generate["num_inference_steps"],
                "seed": generate["seed"],
                "concurrency": (
                    "INT",
                    {"default": 4, "min": 1, "max": 16, "tooltip": "api: requests in flight at once."},
                ),
                "folder": (
                    "STRING",
                    {"default": "flux_drafts", "tooltip": "A folder name under ComfyUI's output folder."},
                ),
            },
            "optional": {
                "prompts_file": (
                    [NONE_FILE, *_input_files(PROMPTS_SUFFIXES)],
                    {"default": NONE_FILE, "tooltip": "A .txt or .jsonl prompts file in the input folder."},
                ),
                "picks": (
                    [NONE_FILE, *_input_files((".jsonl",))],
                    {"default": NONE_FILE, "tooltip": "A picks.jsonl exported from index.html: only those."},
                ),
                "local_model": (LOCAL_MODEL_TYPE, {"tooltip": "Weight files (local backend)."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID", "prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"},
        }

    async def draft(
        self,
        prompts,
        backend,
        width,
        height,
        num_inference_steps,
        seed,
        concurrency,
        folder,
        prompts_file=NONE_FILE,
        picks=NONE_FILE,
        local_model=None,
        unique_id=None,
        prompt=None,
        extra_pnginfo=None,
    ):
        from .drafts import RunSettings, drafts_folder, run_drafts
        from .image_tensors import pil_to_tensor

        out_dir, subfolder = drafts_folder(comfy_bridge.output_directory(), folder)
        chosen = picks if picks not in (None, NONE_FILE) else prompts_file
        source = None
        if chosen not in (None, NONE_FILE):
            source = os.path.join(comfy_bridge.input_directory() or "", chosen)
        extra = {}
        if prompt is not None:
            extra["prompt"] = json.dumps(prompt)
        for key, value in (extra_pnginfo or {}).items():
            extra[key] = json.dumps(value)
        settings = RunSettings(
            backend=backend,
            request=GenerationRequest("", width, height, num_inference_steps, seed, 1),
            seed_given=seed,
            concurrency=concurrency,
            out_dir=out_dir,
            png_extra=tuple(extra.items()),
        )
        progress = comfy_bridge.progress_for(1, unique_id, unit="image")
        if backend == "api":
            from dataclasses import replace

            from .api import load_settings

            api_settings = load_settings()
            settings = replace(settings, seed_sent=api_settings.send_seed)
            with progress.status_text("drafting"):
                result = await comfy_bridge.run_in_thread(
                    run_drafts,
                    settings,
                    prompts,
                    source and Path(source),
                    progress,
                    api_settings,
                    progress=progress,
                )
        else:
            from .local import require_local_packages

            require_local_packages()
            result = run_drafts(settings, prompts, source and Path(source), progress, spec=local_model)
        if result.interrupted:
            progress.raise_if_interrupted()  # ComfyUI's cancel, once what was paid is saved
        images = [{"filename": name, "subfolder": subfolder, "type": "output"} for name in result.previews]
        return {"ui": {"images": images}, "result": (pil_to_tensor([result.sheet]), str(result.folder))}


NODE_CLASS_MAPPINGS = {
    "FluxSchnellGenerate": FluxSchnellGenerate,
    "FluxSchnellLocalModel": FluxSchnellLocalModel,
    "FluxSchnellLoRA": FluxSchnellLoRA,
    "FluxSchnellDrafts": FluxSchnellDrafts,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "FluxSchnellGenerate": "FLUX Schnell Generate",
    "FluxSchnellLocalModel": "FLUX Schnell Local Model",
    "FluxSchnellLoRA": "FLUX Schnell LoRA",
    "FluxSchnellDrafts": "FLUX Schnell Drafts",
}
