"""Everything this package uses from ComfyUI, behind functions that also work without it.

Inside ComfyUI: `comfy.utils.ProgressBar`, `comfy.model_management` (interrupt, devices, the
loaded models), `comfy.model_patcher.ModelPatcher` (how our models join ComfyUI's memory
management), `folder_paths` (model folders, user directory) and
`server.PromptServer.instance.send_progress_text` (the text under a node's title while it runs).
Outside it (command line, tests) the same calls fall back to plain behaviour, so the rest of the
package never imports ComfyUI itself.

The modules: `progress` (bar, status text, interrupt, worker thread), `folders` (model
folders, user directory), `models` (model management); `imports` finds ComfyUI's modules.

Async nodes: ComfyUI (0.3.45 and later) awaits a node function that is `async def` as a task, so
independent nodes of one graph overlap (https://github.com/comfyanonymous/ComfyUI/pull/8830).
`run_in_thread` runs a blocking call (the API client's batch) in a worker thread meanwhile, and
`Progress.status_text` shows elapsed seconds and what the run is doing on the node while it waits.
"""

from .folders import (
    GGUF_FOLDERS,
    MODEL_FOLDERS,
    full_model_path,
    input_directory,
    inside_comfyui,
    model_file_lists,
    model_folder_paths,
    output_directory,
    user_directory,
)
from .models import (
    comfy_free_bytes,
    free_memory,
    load_managed,
    managed_model,
    model_management_available,
    previews_enabled,
    recover_from_out_of_memory,
    resize_managed,
    torch_device,
    unload_managed,
)
from .progress import Progress, progress_for, progress_text, run_in_thread

__all__ = [
    "GGUF_FOLDERS",
    "MODEL_FOLDERS",
    "Progress",
    "comfy_free_bytes",
    "free_memory",
    "full_model_path",
    "input_directory",
    "inside_comfyui",
    "load_managed",
    "managed_model",
    "model_file_lists",
    "model_folder_paths",
    "model_management_available",
    "output_directory",
    "previews_enabled",
    "progress_for",
    "progress_text",
    "recover_from_out_of_memory",
    "resize_managed",
    "run_in_thread",
    "torch_device",
    "unload_managed",
    "user_directory",
]
