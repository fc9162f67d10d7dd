"""The loaded models and their cache: weight files to CPU-resident modules, kept between runs.

Models are loaded once, memory-mapped onto the CPU, and kept while the files, the weight dtype and
the device are unchanged; a new prompt or seed reloads nothing. Moving a model out of the device
costs no copy: its parameters go back to the CPU tensors it was loaded as (memory-mapped from the
file, or cast once at load time).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import torch
from torch import nn

from .. import comfy_bridge
from .files import ResolvedFiles

log = logging.getLogger("flux_schnell.local")

__all__ = [
    "MODEL_CACHE",
    "LoadedModels",
    "ModelCache",
    "Placed",
    "empty_cache",
    "file_stamps",
    "module_bytes",
    "resident_block_count",
]

# local.files.WEIGHT_DTYPE_OPTIONS -> the dtype weights are converted to at load (None: as stored)
LOAD_DTYPE_OF_OPTION = {
    "as stored": None,
    "bf16": torch.bfloat16,
    "fp8_e4m3fn": torch.float8_e4m3fn,
    "fp8_e4m3fn_fast": torch.float8_e4m3fn,  # and the transformer's fp8 layers multiply as fp8
}
FP8_MATMUL_OPTIONS = ("fp8_e4m3fn_fast",)
T5_MAX_LENGTH = 256  # FLUX.1 [schnell] encodes 256 T5 tokens (dev: 512)
CLIP_MAX_LENGTH = 77


def module_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def resident_block_count(rest_bytes: int, block_bytes: list[int], budget: int) -> int:
    """How many of a transformer's blocks (in the order they run) stay on the device within `budget`
    bytes, besides its other layers (`rest_bytes`); the others stream, two at a time on the device
    (the running block and the next one's copy), so room for the two largest is kept free."""
    if rest_bytes + sum(block_bytes) <= budget:
        return len(block_bytes)
    room = budget - rest_bytes - 2 * max(block_bytes)
    count = used = 0
    for nbytes in block_bytes:
        if used + nbytes > room:
            break
        used += nbytes
        count += 1
    return count


class Placed:
    """A model with a CPU home: `to(device)` for its stage, `home()` back without a copy."""

    def __init__(self, name: str, module: nn.Module):
        self.name = name
        self.module = module.eval().requires_grad_(False)
        self.cpu_tensors = {k: t.data for k, t in self._tensors()}
        self.nbytes = module_bytes(module)
        self.device = torch.device("cpu")
        self.last_used = 0.0
        self.patcher = None  # its ModelPatcher while ComfyUI's model management holds it
        self.streamer = None  # memory.BlockStreamer while some blocks stay on the CPU ("stream blocks")
        self.resident_bytes = 0  # bytes on the device (all of nbytes unless blocks stream)
        self.staging = None  # memory.PinnedStaging for its moves (None: the process's memory.STAGING)

    def managed(self, device: torch.device):
        """The ModelPatcher through which ComfyUI loads this model onto `device` and unloads it."""
        if self.patcher is None or self.patcher.load_device != device:
            comfy_bridge.unload_managed([self.patcher])
            self.patcher = comfy_bridge.managed_model(
                self.module, self.nbytes, device, torch.device("cpu"), self.to, self.home
            )
        return self.patcher

    def _tensors(self):
        yield from self.module.named_parameters()
        yield from self.module.named_buffers()

    def blocks(self) -> list[tuple[str, nn.Module]]:
        """The transformer's blocks in the order they run, (name prefix, block); [] for other models."""
        module = self.module
        return [
            (f"{kind}.{i}.", block)
            for kind in ("double_blocks", "single_blocks")
            for i, block in enumerate(getattr(module, kind, ()))
        ]

    def streamable(self) -> bool:
        return bool(self.blocks())

    def to(self, device: torch.device, budget: int | None = None) -> int:
        """Everything onto `device`; with a `budget` (bytes) smaller than the model, the blocks that do
        not fit it (the last ones to run) stay on the CPU and stream in as they run."""
        streamed = self._streamed_blocks(budget)
        if self.device != device or (self.streamer is not None) != bool(streamed):
            self._restore()
            try:
                skip = tuple(prefix for prefix, _block in streamed)
                moved = 0
                with self._staging().copies(device) as move:  # pinned, non-blocking on CUDA
                    for name, t in self._tensors():
                        if not name.startswith(skip):
                            t.data = move(self.cpu_tensors[name])
                            moved += t.data.numel() * t.data.element_size()
                _move_loras(self.module, device)
                if streamed:
                    self._stream(streamed, device)
            except BaseException:  # out of memory half way: give back what did move
                self._restore()
                raise
            self.device, self.resident_bytes = device, moved
        self.last_used = time.monotonic()
        return self.resident_bytes

    def _staging(self):
        from .memory import STAGING

        return self.staging or STAGING

    def _streamed_blocks(self, budget: int | None) -> list[tuple[str, nn.Module]]:
        blocks = self.blocks()
        if budget is None or budget >= self.nbytes or not blocks:
            return []
        sizes = [module_bytes(b) for _p, b in blocks]
        rest = self.nbytes - sum(sizes)  # embeddings, final layer, LoRA updates
        return blocks[resident_block_count(rest, sizes, budget) :]

    def _stream(self, streamed: list[tuple[str, nn.Module]], device: torch.device) -> None:
        from .memory import BlockStreamer

        pin = torch.cuda.is_available() and device.type == "cuda"
        sources = []
        for prefix, _block in streamed:
            names = [n for n in self.cpu_tensors if n.startswith(prefix)]
            if pin:  # pinned once: the copies are then real asynchronous ones
                for n in names:
                    if not self.cpu_tensors[n].is_pinned():
                        self.cpu_tensors[n] = self.cpu_tensors[n].pin_memory()
            sources.append({n.removeprefix(prefix): self.cpu_tensors[n] for n in names})
        self.streamer = BlockStreamer([b for _p, b in streamed], sources, device)
        self.streamer.attach()

    def home(self) -> None:
        if self.device != torch.device("cpu"):
            self._restore()

    def _restore(self) -> None:
        if self.streamer is not None:
            self.streamer.detach()
            self.streamer = None
        for name, t in self._tensors():
            t.data = self.cpu_tensors[name]
        _move_loras(self.module, torch.device("cpu"))
        self.device = torch.device("cpu")
        self.resident_bytes = 0

    def refresh_size(self) -> None:
        """Recount `nbytes` (the weights and the LoRA updates now attached), also for ComfyUI."""
        from ..flux import adapters

        self.nbytes = module_bytes(self.module) + sum(a.nbytes for a in adapters(self.module))
        comfy_bridge.resize_managed(self.patcher, self.nbytes)


def _move_loras(module: nn.Module, device: torch.device) -> None:
    from ..flux import move_loras

    move_loras(module, device)


@dataclass
class LoadedModels:
    """Everything one set of files loads to, plus the tokenizers."""

    files: ResolvedFiles
    weight_dtype: str
    stamps: tuple  # file_stamps(files) when loaded: a file replaced or rewritten since means reload
    t5: Placed
    clip: Placed
    transformer: Placed
    ae: Placed
    t5_tokenizer: object
    clip_tokenizer: object
    compiled: str | None = None  # the backend its blocks were compiled with (local.pipeline.compile_blocks)
    lora_state: tuple = ()  # local.lora.lora_state of the LoRAs on the models (() : none)

    def all(self) -> list[Placed]:
        return [self.t5, self.clip, self.transformer, self.ae]


class ModelCache:
    """The one set of loaded models of this process, behind a lock that a run holds throughout."""

    def __init__(self):
        self.lock = threading.Lock()
        self.loaded: LoadedModels | None = None

    def release(self) -> None:
        """Drop the cached models and give back the device memory they held."""
        with self.lock:
            self.drop()

    def drop(self, keep_compiled_code: bool = False) -> None:
        """Forget the cached models (the caller holds `lock`). Each is moved home first, so its
        device memory is freed even while something else still refers to the module.

        Dynamo's compiled code is dropped too (`torch._dynamo.reset()`) unless `keep_compiled_code`:
        "free after run" keeps it, since the per-block graphs serve the same blocks loaded again
        (no recompile each run)."""
        if self.loaded is not None:
            comfy_bridge.unload_managed([placed.patcher for placed in self.loaded.all()])
            for placed in self.loaded.all():
                placed.home()
            if self.loaded.compiled is not None and not keep_compiled_code:
                torch._dynamo.reset()
            self.loaded = None
        empty_cache()

    def load(self, files: ResolvedFiles, weight_dtype: str) -> tuple[LoadedModels, bool]:
        """The models for these files and dtype, and whether they had to be loaded (the caller
        holds `lock`). A different set is released first, so two never share the memory."""
        from ..flux import (
            check_files_compatible,
            enable_fp8_matmul,
            load_autoencoder,
            load_clip,
            load_clip_tokenizer,
            load_t5,
            load_t5_tokenizer,
            load_transformer,
        )

        stamps = file_stamps(files)
        cached = self.loaded
        if (
            cached is not None
            and cached.files == files
            and cached.stamps == stamps
            and cached.weight_dtype == weight_dtype
        ):
            return cached, False
        # The four files must belong together: checked from their headers, before gigabytes load.
        check_files_compatible(files.transformer, files.t5, files.clip, files.ae)
        narrow = LOAD_DTYPE_OF_OPTION[weight_dtype]
        self.drop()
        transformer = load_transformer(files.transformer, weight_dtype=narrow)
        if weight_dtype in FP8_MATMUL_OPTIONS:
            count = enable_fp8_matmul(transformer)
            log.info("fp8 matrix products for %d transformer layers (where the GPU has them)", count)
        log.info("loading FLUX.1-schnell (weights %s) from %s", weight_dtype, files.transformer.parent)
        self.loaded = LoadedModels(
            files=files,
            weight_dtype=weight_dtype,
            stamps=stamps,
            t5=Placed("T5-XXL", load_t5(files.t5, weight_dtype=narrow)),
            clip=Placed("CLIP-L", load_clip(files.clip)),
            transformer=Placed("transformer", transformer),
            ae=Placed("autoencoder", load_autoencoder(files.ae)),
            t5_tokenizer=load_t5_tokenizer(files.t5_tokenizer, max_length=T5_MAX_LENGTH),
            clip_tokenizer=load_clip_tokenizer(files.clip_tokenizer, max_length=CLIP_MAX_LENGTH),
        )
        return self.loaded, True


MODEL_CACHE = ModelCache()


def empty_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    elif getattr(torch, "mps", None) is not None and torch.backends.mps.is_available():
        torch.mps.empty_cache()


def file_stamps(files: ResolvedFiles) -> tuple:
    """Identity and version of each weight file: (device, inode, size, mtime in ns).

    The loaded weights are memory maps of these files, so a cached model is only reused while
    every file is the very one it was loaded from: a file renamed over another gets a new inode, a
    file rewritten in place a new size or time, and either means the models load again.
    """
    stamps = []
    for path in dict.fromkeys((files.transformer, files.t5, files.clip, files.ae)):
        st = path.stat()
        stamps.append((str(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(stamps)


def set_loras(models: LoadedModels, choices, dtype: torch.dtype) -> None:
    """Put the chosen LoRAs on the loaded models when they differ from what is there (the caller
    holds the cache's lock). Only the LoRA files are read; a LoRA that does not fit raises and leaves the
    models as they were."""
    from ..flux import CLIP, T5, TRANSFORMER
    from .lora import lora_state, use_loras

    state = (lora_state(choices), dtype) if choices else ()
    if state == models.lora_state:
        return
    networks = {TRANSFORMER.name: models.transformer, CLIP.name: models.clip, T5.name: models.t5}
    layers = use_loras({name: placed.module for name, placed in networks.items()}, choices, dtype)
    models.lora_state = state
    models.compiled = None  # compiled code holds on to the layers' previous updates
    for placed in networks.values():
        placed.refresh_size()
    if choices:
        log.info("LoRAs %s on %d layers", ", ".join(c.describe() for c in choices), layers)
