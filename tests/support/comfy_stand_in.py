"""Small fakes of the few ComfyUI modules the package touches: `comfy.utils`,
`comfy.model_management`, `comfy.model_patcher`, `folder_paths` and `server` (what comfy_bridge.py
calls, nothing more).

The model management part follows ComfyUI 0.3.64's comfy/model_management.py and
comfy/model_patcher.py (https://github.com/comfyanonymous/ComfyUI): `current_loaded_models` holds
one LoadedModel per ModelPatcher; `load_models_gpu` takes a model it holds already out of the list
with `detach(unpatch_all=False)`, then loads every model with `partially_load` and puts it first;
unloading is `partially_unload` and, when that frees too little, `detach()`;
`unload_all_models` (what POST /free {"unload_models": true} runs) unloads everything.
"""

from __future__ import annotations

import types
from pathlib import Path

import torch

# folder_paths.supported_pt_extensions of ComfyUI
MODEL_EXTENSIONS = (".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft")


class InterruptProcessingException(Exception):
    """Stand-in for comfy.model_management.InterruptProcessingException."""


class ModelPatcherBase:
    """Stand-in for comfy.model_patcher.ModelPatcher: what its constructor keeps and puts on the
    model. Moving weights is left to the subclass (the package's); these raise if it did not."""

    def __init__(self, model, load_device, offload_device, size=0, weight_inplace_update=False):
        self.model, self.load_device, self.offload_device, self.size = (
            model,
            load_device,
            offload_device,
            size,
        )
        self.parent = None
        if getattr(model, "device", None) is None:
            model.device = offload_device
        if not hasattr(model, "model_loaded_weight_memory"):
            model.model_loaded_weight_memory = 0

    def model_size(self):
        return self.size

    def loaded_size(self):
        return self.model.model_loaded_weight_memory

    def current_loaded_device(self):
        return self.model.device

    def partially_load(self, device_to, extra_memory=0, force_patch_weights=False):
        raise AssertionError("ModelPatcher.partially_load would move weights with module.to()")

    def partially_unload(self, device_to, memory_to_free=0):
        raise AssertionError("ModelPatcher.partially_unload would move weights with module.to()")

    def detach(self, unpatch_all=True):
        raise AssertionError("ModelPatcher.detach would move weights with module.to()")


class LoadedModelStandIn:
    """Stand-in for comfy.model_management.LoadedModel."""

    def __init__(self, patcher):
        self.model, self.device = patcher, patcher.load_device

    def model_memory(self):
        return self.model.model_size()

    def model_unload(self, memory_to_free=None, unpatch_weights=True):
        patcher = self.model
        partly = memory_to_free is not None and memory_to_free < patcher.loaded_size()
        if partly and patcher.partially_unload(patcher.offload_device, memory_to_free) >= memory_to_free:
            return False
        self.model.detach(unpatch_weights)
        return True


class ComfyStandIn:
    """`comfy.utils`, `comfy.model_management`, `folder_paths` and `server` as small fakes.

    Like ComfyUI's, `ProgressBar.update*` raises the interrupt exception once an interrupt was
    requested; `interrupt()` is what the Cancel button does. `texts` collects (node id, text) of
    every `PromptServer.instance.send_progress_text` call, from any thread.
    """

    def __init__(self, tmp_path: Path):
        self.interrupted = False
        self.bars: list = []
        self.updates: list[tuple[int, int, object]] = []
        self.bar_updates: list[tuple[str | None, int]] = []  # (node id, value) of every update
        self.texts: list[tuple[str, str]] = []
        self.user_dir = tmp_path / "comfy_user"
        self.models_dir = tmp_path / "comfy_models"
        stand_in = self

        class ProgressBar:
            def __init__(self, total, node_id=None):
                self.total, self.current, self.node_id = total, 0, node_id
                stand_in.bars.append(self)

            def update_absolute(self, value, total=None, preview=None):
                stand_in.throw_if_interrupted()
                self.current = value
                stand_in.updates.append((value, total or self.total, preview))
                stand_in.bar_updates.append((self.node_id, value))

            def update(self, value):
                self.update_absolute(self.current + value, self.total)

        self.utils = types.ModuleType("comfy.utils")
        self.utils.ProgressBar = ProgressBar
        self.mm = types.ModuleType("comfy.model_management")
        self.mm.InterruptProcessingException = InterruptProcessingException
        self.mm.processing_interrupted = lambda: stand_in.interrupted
        self.mm.throw_exception_if_processing_interrupted = stand_in.throw_if_interrupted
        self.mm.get_torch_device = lambda: torch.device("cpu")
        self.mm.freed: list[tuple[int, object]] = []
        self.mm.free_memory = lambda num_bytes, device: self.mm.freed.append((num_bytes, device))
        self.mm.soft_empty_cache = lambda: None
        self.mm.current_loaded_models: list[LoadedModelStandIn] = []
        self.loads: list[tuple[list, int]] = []  # (models, memory_required) of each load_models_gpu
        self.mm.load_models_gpu = self._load_models_gpu
        self.mm.unload_all_models = self._unload_all_models
        self.model_patcher = types.ModuleType("comfy.model_patcher")
        self.model_patcher.ModelPatcher = ModelPatcherBase
        self.comfy = types.ModuleType("comfy")
        self.comfy.utils, self.comfy.model_management = self.utils, self.mm
        self.comfy.model_patcher = self.model_patcher
        self.folder_paths = types.ModuleType("folder_paths")
        self.folder_paths.get_user_directory = lambda: str(stand_in.user_dir)
        self.output_dir = tmp_path / "comfy_output"
        self.input_dir = tmp_path / "comfy_input"
        self.folder_paths.get_output_directory = lambda: str(stand_in.output_dir)
        self.folder_paths.get_input_directory = lambda: str(stand_in.input_dir)
        self.folder_paths.get_filename_list = self._filenames
        self.folder_paths.get_folder_paths = lambda name: [str(stand_in.models_dir / name)]
        self.folder_paths.get_full_path = self._full_path
        # folder names registered by packages: name -> (paths, extensions), as ComfyUI's table
        self.folder_paths.folder_names_and_paths = {}

        class PromptServer:
            instance = None

            def send_progress_text(self, text, node_id, sid=None):
                stand_in.texts.append((str(node_id), text))

        PromptServer.instance = PromptServer()
        self.server = types.ModuleType("server")
        self.server.PromptServer = PromptServer

    def throw_if_interrupted(self):
        if self.interrupted:
            self.interrupted = False  # ComfyUI clears the flag when it raises
            raise InterruptProcessingException()

    def interrupt(self):
        self.interrupted = True

    def _load_models_gpu(self, models, memory_required=0, force_patch_weights=False, **kwargs):
        self.loads.append((list(models), memory_required))
        current = self.mm.current_loaded_models
        for patcher in models:
            for i in range(len(current) - 1, -1, -1):
                if current[i].model is patcher:
                    current.pop(i).model.detach(unpatch_all=False)
        for patcher in models:
            entry = LoadedModelStandIn(patcher)
            patcher.partially_load(patcher.load_device, 1e32, force_patch_weights=force_patch_weights)
            current.insert(0, entry)

    def _unload_all_models(self):
        current = self.mm.current_loaded_models
        for i in range(len(current) - 1, -1, -1):
            if current[i].model_unload(1e30):
                current.pop(i)

    def next_prompt(self):
        """What ComfyUI's executor does as a prompt starts: clear a Cancel left from the last one."""
        self.interrupted = False

    def _filenames(self, name):
        """Like ComfyUI's: the files with one of its model extensions (never .gguf); for a folder
        name a package registered, the files under its paths (recursively) with its extensions."""
        registered = self.folder_paths.folder_names_and_paths.get(name)
        if registered is not None:
            paths, extensions = registered
            return sorted(
                str(p.relative_to(root))
                for root in map(Path, paths)
                if root.is_dir()
                for p in root.rglob("*")
                if p.is_file() and p.suffix in extensions
            )
        folder = self.models_dir / name
        files = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
        return [f for f in files if f.endswith(MODEL_EXTENSIONS)]

    def _full_path(self, name, filename):
        path = self.models_dir / name / filename
        return str(path) if path.is_file() else None

    def modules(self) -> dict[str, types.ModuleType]:
        return {
            "comfy": self.comfy,
            "comfy.utils": self.utils,
            "comfy.model_management": self.mm,
            "comfy.model_patcher": self.model_patcher,
            "folder_paths": self.folder_paths,
            "server": self.server,
        }
