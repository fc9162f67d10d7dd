"""ComfyUI's model folders (`folder_paths`) and its user directory."""

from __future__ import annotations

from .imports import comfy_module

MODEL_FOLDERS = ("checkpoints", "diffusion_models", "text_encoders", "vae", "loras")
# Folders whose .gguf files are listed too: ComfyUI's own lists hold only its model extensions
# (.safetensors, .ckpt, ...); ComfyUI-GGUF's users keep GGUF transformers in diffusion_models/unet
# and GGUF text encoders in text_encoders/clip (its "unet_gguf" and "clip_gguf" folders).
GGUF_FOLDERS = ("diffusion_models", "text_encoders")


def inside_comfyui() -> bool:
    """True in a ComfyUI process (its `folder_paths` is loaded): messages then speak of ComfyUI's
    folders and inputs; outside it (the command line) of flags."""
    return comfy_module("folder_paths") is not None


def model_file_lists() -> dict[str, list[str]]:
    """File names ComfyUI knows in each model folder, and the .gguf files of `GGUF_FOLDERS`; empty
    lists outside ComfyUI."""
    folder_paths = comfy_module("folder_paths")
    lists: dict[str, list[str]] = {}
    for folder in MODEL_FOLDERS:
        try:
            lists[folder] = list(folder_paths.get_filename_list(folder)) if folder_paths else []
        except KeyError:  # a ComfyUI too old to know this folder name
            lists[folder] = []
        if folder in GGUF_FOLDERS:
            lists[folder] += [name for name in _gguf_files(folder) if name not in lists[folder]]
    return lists


def _gguf_files(folder: str) -> list[str]:
    """The .gguf files under ComfyUI's paths of `folder`, as ComfyUI names files (relative to their
    path, so `full_model_path(folder, name)` finds them). Listed by ComfyUI itself, with its cache
    of folder listings: under a folder name of ours with the same paths and the extension .gguf
    (as ComfyUI-GGUF registers `unet_gguf`), re-registered each time so the paths stay current."""
    folder_paths = comfy_module("folder_paths")
    table = getattr(folder_paths, "folder_names_and_paths", None)
    if table is None:
        return []
    key = f"flux_schnell_{folder}_gguf"
    table[key] = (model_folder_paths(folder), {".gguf"})
    return list(folder_paths.get_filename_list(key))


def full_model_path(folder: str, filename: str) -> str | None:
    folder_paths = comfy_module("folder_paths")
    if folder_paths is None:
        return None
    return folder_paths.get_full_path(folder, filename)


def model_folder_paths(folder: str) -> list[str]:
    folder_paths = comfy_module("folder_paths")
    if folder_paths is None:
        return []
    try:
        return list(folder_paths.get_folder_paths(folder))
    except KeyError:
        return []


def user_directory() -> str | None:
    folder_paths = comfy_module("folder_paths")
    if folder_paths is None:
        return None
    return folder_paths.get_user_directory()


def output_directory() -> str | None:
    """ComfyUI's output folder (where SaveImage writes), None outside ComfyUI."""
    folder_paths = comfy_module("folder_paths")
    return None if folder_paths is None else folder_paths.get_output_directory()


def input_directory() -> str | None:
    """ComfyUI's input folder (uploads), None outside ComfyUI."""
    folder_paths = comfy_module("folder_paths")
    return None if folder_paths is None else folder_paths.get_input_directory()
