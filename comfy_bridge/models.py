"""ComfyUI's model management: its device, free memory, and our models as `ModelPatcher`s that
ComfyUI loads, counts and unloads like its own."""

from __future__ import annotations

from .imports import comfy_module


def torch_device():
    """ComfyUI's compute device (it honours --cpu, --cuda-device, ...), or None outside ComfyUI."""
    mm = comfy_module("comfy.model_management")
    return mm.get_torch_device() if mm is not None else None


def free_memory(num_bytes: int, device) -> None:
    """Ask ComfyUI to move its own models out until `num_bytes` are free on `device`."""
    mm = comfy_module("comfy.model_management")
    if mm is None or device is None:
        return
    if hasattr(mm, "free_memory"):
        mm.free_memory(num_bytes, device)
    elif hasattr(mm, "unload_all_models"):
        mm.unload_all_models()
    if hasattr(mm, "soft_empty_cache"):
        mm.soft_empty_cache()


# --- ComfyUI's model management -------------------------------------------------------------------


def model_management_available() -> bool:
    """True inside a ComfyUI whose model management can hold our models (ModelPatcher and
    load_models_gpu, present for years); the local backend then leaves device memory to it."""
    mm, mp = comfy_module("comfy.model_management"), comfy_module("comfy.model_patcher")
    return (
        mm is not None
        and mp is not None
        and hasattr(mm, "load_models_gpu")
        and hasattr(mm, "current_loaded_models")
        and hasattr(mp, "ModelPatcher")
    )


_managed_classes: dict[type, type] = {}


def _managed_class(base: type) -> type:
    """A `comfy.model_patcher.ModelPatcher` whose weights move all at once by our own functions.

    ComfyUI's model management (https://github.com/comfyanonymous/ComfyUI/blob/master/comfy/
    model_management.py) keeps a `LoadedModel` per patcher in `current_loaded_models`, counts
    `model_size()` / `loaded_size()`, loads with `partially_load(device, memory)` and unloads with
    `partially_unload(...)` then `detach()`. ModelPatcher itself moves weights with `module.to()`,
    which would copy them into new CPU memory when they leave the GPU; ours go back to the CPU
    tensors they were loaded as (memory-mapped from the file), so loading and unloading are
    `move_in(device, budget)` and `move_out()`, no copy; under a low-VRAM budget the transformer keeps
    the blocks beyond it on the CPU and streams each in as it runs (local.memory.BlockStreamer).
    Everything else (patch lists, clones, hooks) is the base class's.
    """
    if base not in _managed_classes:

        class ManagedModel(base):
            def __init__(self, module, load_device, offload_device, size, move_in, move_out):
                super().__init__(module, load_device=load_device, offload_device=offload_device, size=size)
                self._move_in, self._move_out = move_in, move_out

            def partially_load(self, device_to, extra_memory=0, force_patch_weights=False):
                # ComfyUI's low-VRAM budget: what is loaded plus `extra_memory` more bytes; a model
                # that can stream its blocks keeps the rest on the CPU (`move_in(device, budget)`).
                before = self.model.model_loaded_weight_memory
                budget = before + extra_memory if extra_memory and before + extra_memory < self.size else None
                loaded = self._move_in(device_to, budget)
                loaded = self.size if loaded is None or budget is None else min(loaded, self.size)
                self.model.device = device_to
                self.model.model_loaded_weight_memory = loaded
                return loaded - before

            def partially_unload(self, device_to, memory_to_free=0):
                return 0  # all or nothing: ComfyUI then detaches the whole model

            def patch_model(self, device_to=None, lowvram_model_memory=0, load_weights=True, **kwargs):
                if load_weights and device_to is not None:  # lowvram_model_memory 0: load it all
                    self.partially_load(device_to, lowvram_model_memory or 1e32)
                return self.model

            def unpatch_model(self, device_to=None, unpatch_weights=True):
                if unpatch_weights:
                    self.detach()

            def detach(self, unpatch_all=True):
                # unpatch_all=False: load_models_gpu re-listing a model it holds already; the
                # weights stay where they are (as the base class leaves them).
                if unpatch_all:
                    self._move_out()
                    self.model.device = self.offload_device
                    self.model.model_loaded_weight_memory = 0
                return self.model

        ManagedModel.__qualname__ = ManagedModel.__name__ = f"FluxSchnell{base.__name__}"
        _managed_classes[base] = ManagedModel
    return _managed_classes[base]


def managed_model(module, size: int, load_device, offload_device, move_in, move_out):
    """A ModelPatcher for `module` (`size` bytes) that ComfyUI's model management can load onto
    `load_device` (`move_in(device, budget)`, returning the bytes it put there) and unload
    (`move_out()`), or None outside ComfyUI."""
    if not model_management_available():
        return None
    base = comfy_module("comfy.model_patcher").ModelPatcher
    return _managed_class(base)(module, load_device, offload_device, size, move_in, move_out)


def resize_managed(patcher, size: int) -> None:
    """Tell ComfyUI a managed model now holds `size` bytes (a LoRA was added or taken off): its
    planner counts `model_size()` / `loaded_size()`, which would otherwise keep the old size."""
    if patcher is None:
        return
    old, patcher.size = patcher.size, size
    loaded = patcher.model.model_loaded_weight_memory
    if loaded:  # loaded: all of it, unless blocks stream (then the adapters all moved in)
        patcher.model.model_loaded_weight_memory = max(0, min(size, loaded + size - old))


def load_managed(models: list, memory_required: int) -> None:
    """Have ComfyUI load `models` (ModelPatchers) for a stage that needs `memory_required` more
    bytes: it unloads whatever else it must (its own models or ours) and counts ours as loaded."""
    comfy_module("comfy.model_management").load_models_gpu(models, memory_required=memory_required)


def unload_managed(models: list) -> None:
    """Unload `models` and take them out of ComfyUI's loaded models (ComfyUI has no call for one
    model: this is what its free_memory does for each model it unloads)."""
    mm = comfy_module("comfy.model_management")
    loaded = getattr(mm, "current_loaded_models", None) if mm is not None else None
    if not loaded or not models:
        return
    for i in range(len(loaded) - 1, -1, -1):
        entry = loaded[i]
        if any(entry.model is m for m in models if m is not None):
            entry.model_unload()
            loaded.pop(i)


def previews_enabled() -> bool:
    """True when ComfyUI shows previews while sampling (its --preview-method is not 'none')."""
    cli_args = comfy_module("comfy.cli_args")
    if cli_args is None:
        return False
    method = getattr(getattr(cli_args, "args", None), "preview_method", None)
    return method is not None and str(getattr(method, "value", method)).lower() != "none"


def recover_from_out_of_memory() -> None:
    """After a stage ran out of device memory: what ComfyUI's executor does for torch's own
    out-of-memory error (it never sees ours), every model unloaded and the cache emptied; outside
    ComfyUI, torch's cache emptied."""
    mm = comfy_module("comfy.model_management")
    if mm is not None and hasattr(mm, "unload_all_models"):
        mm.unload_all_models()
        if hasattr(mm, "soft_empty_cache"):
            mm.soft_empty_cache()
        return
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def comfy_free_bytes(device) -> int | None:
    """Free memory on `device` as ComfyUI counts it (any device type), or None outside ComfyUI."""
    mm = comfy_module("comfy.model_management")
    if mm is None or not hasattr(mm, "get_free_memory"):
        return None
    return int(mm.get_free_memory(device))
