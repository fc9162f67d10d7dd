"""Everything this package uses from ComfyUI, behind functions that also work without it.

Inside ComfyUI: `comfy.utils.ProgressBar`, `comfy.model_management` (interrupt, devices, the
loaded models), `comfy.model_patcher.ModelPatcher` (how our models join ComfyUI's memory
management), `folder_paths` (model folders, user directory) and
`server.PromptServer.instance.send_progress_text` (the text under a node's title while it runs).
Outside it (command line, tests) the same calls fall back to plain behaviour, so the rest of the
package never imports ComfyUI itself.

Async nodes: ComfyUI (0.3.45 and later) awaits a node function that is `async def` as a task, so
independent nodes of one graph overlap (https://github.com/comfyanonymous/ComfyUI/pull/8830).
`run_in_thread` runs a blocking call (the API client's batch) in a worker thread meanwhile, and
`Progress.status_text` shows elapsed seconds and what the run is doing on the node while it waits.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import sys
import threading
import time
from collections.abc import Callable
from types import ModuleType
from typing import TypeVar

from .errors import GenerationInterrupted

T = TypeVar("T")
STATUS_INTERVAL_S = 1.0

MODEL_FOLDERS = ("checkpoints", "diffusion_models", "text_encoders", "vae", "loras")
# Folders whose .gguf files are listed too: ComfyUI's own lists hold only its model extensions
# (.safetensors, .ckpt, ...); ComfyUI-GGUF's users keep GGUF transformers in diffusion_models/unet
# and GGUF text encoders in text_encoders/clip (its "unet_gguf" and "clip_gguf" folders).
GGUF_FOLDERS = ("diffusion_models", "text_encoders")


def _comfy(name: str) -> ModuleType | None:
    """The ComfyUI module `name`, or None when not running inside ComfyUI."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


class Progress:
    """Progress, interruption and the node's status text for one run.

    `advance(n, preview=None)` moves ComfyUI's bar (whose update also raises ComfyUI's interrupt
    exception when the user pressed Cancel); `should_stop()` can be polled while waiting, from any
    thread; `raise_if_interrupted()` raises ComfyUI's own exception inside ComfyUI (so the queue
    treats it as a cancel, not an error) and `GenerationInterrupted` outside it (`stop_flag` set,
    e.g. by Ctrl-C in the command line, or `stop()` called when the awaiting task was cancelled).

    ComfyUI clears its interrupt flag when its `throw_exception_if_processing_interrupted` raises;
    with several nodes awaiting at once the first would then hide the Cancel from the others. So a
    stop seen here is remembered, and `raise_if_interrupted` raises ComfyUI's exception itself,
    leaving the flag for the other nodes (ComfyUI resets it when the next prompt starts).
    """

    def __init__(
        self,
        total: int,
        bar=None,
        management: ModuleType | None = None,
        stop_flag: threading.Event | None = None,
        *,
        node_id: str | None = None,
        text: Callable[[str], None] | None = None,
        unit: str = "step",
        clock: Callable[[], float] = time.monotonic,
    ):
        self.total = total
        self._bar = bar
        self._mm = management
        self._stop = stop_flag if stop_flag is not None else threading.Event()
        self._interrupted = False
        self._text = text
        self.node_id = node_id
        self.unit = unit
        self.clock = clock
        self.started = clock()
        self.done = 0
        self.status = ""
        self._lock = threading.Lock()

    def advance(self, n: int = 1, preview=None) -> None:
        if self._mm is not None and self._mm.processing_interrupted():
            self._interrupted = True  # raised here, before ComfyUI's bar would clear the flag
            raise self._mm.InterruptProcessingException()
        with self._lock:
            self.done += n
            done = self.done
        if self._bar is not None:
            if preview is None:
                self._bar.update(n)
            else:
                self._bar.update_absolute(done, self.total, preview)

    def stop(self) -> None:
        """Ask the run to stop (from any thread): `should_stop()` is true from now on."""
        self._stop.set()

    def should_stop(self) -> bool:
        if self._stop.is_set():
            return True
        if self._mm is not None and self._mm.processing_interrupted():
            self._interrupted = True
            return True
        return False

    def raise_if_interrupted(self) -> None:
        if self._mm is not None and (self._interrupted or self._mm.processing_interrupted()):
            self._interrupted = True
            raise self._mm.InterruptProcessingException()
        if self.should_stop():
            raise GenerationInterrupted("interrupted by the user")

    # the text on the node

    def set_status(self, status: str) -> None:
        """What the run is doing now ("waiting for the service", ...); shown at once."""
        self.status = status
        self.show()

    def line(self) -> str:
        """The node's status text: what is happening, the seconds so far, the count finished."""
        seconds = self.clock() - self.started
        plural = "" if self.total == 1 else "s"
        count = f"{self.done} of {self.total} {self.unit}{plural} done"
        return f"{self.status}: {seconds:.0f} s\n{count}" if self.status else f"{count} in {seconds:.1f} s"

    def show(self) -> None:
        if self._text is not None:
            self._text(self.line())

    def status_text(self, status: str, interval_s: float | None = None) -> _StatusTicker:
        """A `with` block during which the node shows `status` and the seconds, once a second (from
        a thread of its own, so a long local run in the event loop does not freeze it)."""
        return _StatusTicker(self, status, interval_s or STATUS_INTERVAL_S)


class _StatusTicker:
    def __init__(self, progress: Progress, status: str, interval_s: float):
        self.progress, self.status, self.interval_s = progress, status, interval_s
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Progress:
        self.progress.set_status(self.status)
        if self.progress._text is not None:
            self._thread = threading.Thread(target=self._tick, name="flux-schnell-status", daemon=True)
            self._thread.start()
        return self.progress

    def _tick(self) -> None:
        while not self._done.wait(self.interval_s):
            self.progress.show()

    def __exit__(self, exc_type, exc, tb) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join()
        p = self.progress
        p.status = ""
        if exc_type is None:
            p.show()  # "N of M images done in S s"
        elif p._text is not None:
            seconds = p.clock() - p.started
            stopped = p._interrupted or p._stop.is_set() or issubclass(exc_type, GenerationInterrupted)
            p._text(f"{'cancelled' if stopped else 'failed'} after {seconds:.1f} s")


def _prompt_server():
    """ComfyUI's PromptServer instance, when this process is ComfyUI (its `server` module is loaded)."""
    module = sys.modules.get("server")
    server_class = getattr(module, "PromptServer", None)
    return getattr(server_class, "instance", None)


def progress_text(text: str, node_id: str | None) -> None:
    """Show `text` under the node's title (ComfyUI's progress text); nothing outside ComfyUI."""
    server = _prompt_server()
    if server is None or node_id is None or not hasattr(server, "send_progress_text"):
        return
    server.send_progress_text(text, node_id)


def progress_for(total: int, node_id: str | None = None, unit: str = "step") -> Progress:
    """A `Progress` wired to ComfyUI when it is present (bar, interrupt, the node's text), else a
    silent one. `node_id` is the node's UNIQUE_ID: with several nodes running at once it says which
    node's bar and text to move."""
    utils = _comfy("comfy.utils")
    bar = None
    if utils is not None:
        takes_node = "node_id" in inspect.signature(utils.ProgressBar).parameters
        bar = utils.ProgressBar(total, node_id=node_id) if takes_node else utils.ProgressBar(total)
    text = None
    if node_id is not None and _prompt_server() is not None:

        def text(line: str) -> None:
            progress_text(line, node_id)

    return Progress(total, bar, _comfy("comfy.model_management"), node_id=node_id, text=text, unit=unit)


async def run_in_thread(call: Callable[..., T], *args, progress: Progress) -> T:
    """`call(*args)` in a worker thread, awaited, so other nodes' tasks run meanwhile.

    When the awaiting task is cancelled (ComfyUI ends a prompt another node interrupted or failed)
    the call is told to stop through `progress`, so it sends nothing more.
    """
    try:
        return await asyncio.to_thread(call, *args)
    except asyncio.CancelledError:
        progress.stop()
        raise


def model_file_lists() -> dict[str, list[str]]:
    """File names ComfyUI knows in each model folder, and the .gguf files of `GGUF_FOLDERS`; empty
    lists outside ComfyUI."""
    folder_paths = _comfy("folder_paths")
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
    folder_paths = _comfy("folder_paths")
    table = getattr(folder_paths, "folder_names_and_paths", None)
    if table is None:
        return []
    key = f"flux_schnell_{folder}_gguf"
    table[key] = (model_folder_paths(folder), {".gguf"})
    return list(folder_paths.get_filename_list(key))


def full_model_path(folder: str, filename: str) -> str | None:
    folder_paths = _comfy("folder_paths")
    if folder_paths is None:
        return None
    return folder_paths.get_full_path(folder, filename)


def model_folder_paths(folder: str) -> list[str]:
    folder_paths = _comfy("folder_paths")
    if folder_paths is None:
        return []
    try:
        return list(folder_paths.get_folder_paths(folder))
    except KeyError:
        return []


def user_directory() -> str | None:
    folder_paths = _comfy("folder_paths")
    if folder_paths is None:
        return None
    return folder_paths.get_user_directory()


def torch_device():
    """ComfyUI's compute device (it honours --cpu, --cuda-device, ...), or None outside ComfyUI."""
    mm = _comfy("comfy.model_management")
    return mm.get_torch_device() if mm is not None else None


def free_memory(num_bytes: int, device) -> None:
    """Ask ComfyUI to move its own models out until `num_bytes` are free on `device`."""
    mm = _comfy("comfy.model_management")
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
    mm, mp = _comfy("comfy.model_management"), _comfy("comfy.model_patcher")
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
    `move_in(device)` and `move_out()`: the whole model, no copy, no partial (low-VRAM) load.
    Everything else (patch lists, clones, hooks) is the base class's.
    """
    if base not in _managed_classes:

        class ManagedModel(base):
            def __init__(self, module, load_device, offload_device, size, move_in, move_out):
                super().__init__(module, load_device=load_device, offload_device=offload_device, size=size)
                self._move_in, self._move_out = move_in, move_out

            def partially_load(self, device_to, extra_memory=0, force_patch_weights=False):
                before = self.model.model_loaded_weight_memory
                self._move_in(device_to)
                self.model.device = device_to
                self.model.model_loaded_weight_memory = self.size
                return self.size - before

            def partially_unload(self, device_to, memory_to_free=0):
                return 0  # all or nothing: ComfyUI then detaches the whole model

            def patch_model(self, device_to=None, lowvram_model_memory=0, load_weights=True, **kwargs):
                if load_weights and device_to is not None:
                    self.partially_load(device_to)
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
    `load_device` (`move_in(device)`) and unload (`move_out()`), or None outside ComfyUI."""
    if not model_management_available():
        return None
    base = _comfy("comfy.model_patcher").ModelPatcher
    return _managed_class(base)(module, load_device, offload_device, size, move_in, move_out)


def load_managed(models: list, memory_required: int) -> None:
    """Have ComfyUI load `models` (ModelPatchers) for a stage that needs `memory_required` more
    bytes: it unloads whatever else it must (its own models or ours) and counts ours as loaded."""
    _comfy("comfy.model_management").load_models_gpu(models, memory_required=memory_required)


def unload_managed(models: list) -> None:
    """Unload `models` and take them out of ComfyUI's loaded models (ComfyUI has no call for one
    model: this is what its free_memory does for each model it unloads)."""
    mm = _comfy("comfy.model_management")
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
    cli_args = _comfy("comfy.cli_args")
    if cli_args is None:
        return False
    method = getattr(getattr(cli_args, "args", None), "preview_method", None)
    return method is not None and str(getattr(method, "value", method)).lower() != "none"


def recover_from_out_of_memory() -> None:
    """After a stage ran out of device memory: what ComfyUI's executor does for torch's own
    out-of-memory error (it never sees ours), every model unloaded and the cache emptied; outside
    ComfyUI, torch's cache emptied."""
    mm = _comfy("comfy.model_management")
    if mm is not None and hasattr(mm, "unload_all_models"):
        mm.unload_all_models()
        if hasattr(mm, "soft_empty_cache"):
            mm.soft_empty_cache()
        return
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def free_bytes(device) -> int | None:
    """Free memory on `device` as ComfyUI counts it (any device type), or None outside ComfyUI."""
    mm = _comfy("comfy.model_management")
    if mm is None or not hasattr(mm, "get_free_memory"):
        return None
    return int(mm.get_free_memory(device))
