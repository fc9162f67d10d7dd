"""Device-memory policies: which models are on the device while each stage runs.

A run has three stages that never need to share the GPU: text encoding (T5-XXL + CLIP-L), sampling
(the transformer, one image at a time) and decoding (the autoencoder).

Memory choices (the loader node's `memory` input, the command line's `--memory`):
- "auto": a stage's model goes to the GPU when it runs; other models stay there as long as the
  free memory allows, and are moved out (oldest use first) when it does not.
- "keep on GPU": every model stays on the GPU after its stage (fastest repeat runs).
- "offload to CPU": only the running stage's model is on the GPU.
- "free after run": like "offload to CPU", and the loaded models are released after each run.

Inside ComfyUI the models join ComfyUI's own model management (`ComfyManagedPolicy`).
"""

from __future__ import annotations

import contextlib
import logging
import time

import torch

from .. import comfy_bridge
from .models import T5_MAX_LENGTH, LoadedModels, Placed, empty_cache

log = logging.getLogger("flux_schnell.local")

__all__ = ["GIB", "ComfyManagedPolicy", "MemoryPolicy", "decoding_bytes", "free_bytes", "sampling_bytes"]

GIB = 2**30


class MemoryPolicy:
    """Puts each stage's model on the device, and moves the others out as the choice says
    (outside ComfyUI; inside it `ComfyManagedPolicy` leaves this to ComfyUI)."""

    def __init__(self, models: LoadedModels, device: torch.device, choice: str):
        self.models, self.device, self.choice = models, device, choice

    @staticmethod
    def for_run(models: LoadedModels, device: torch.device, choice: str) -> MemoryPolicy:
        if comfy_bridge.model_management_available():
            return ComfyManagedPolicy(models, device, choice)
        return MemoryPolicy(models, device, choice)

    def enter(self, stage: list[Placed], activation_bytes: int) -> None:
        if self.device.type == "cpu":
            return
        need = sum(p.nbytes for p in stage if p.device != self.device) + activation_bytes
        others = sorted(
            (p for p in self.models.all() if p not in stage and p.device == self.device),
            key=lambda p: p.last_used,
        )
        moved = False  # the allocator's cache is emptied only when a model left the device
        if self.choice in ("offload to CPU", "free after run"):
            for placed in others:
                placed.home()
                moved = True
        elif self.choice == "auto":
            emptied = False
            for placed in others:
                free = free_bytes(self.device)
                if free is not None and free < need and not emptied:
                    empty_cache()  # the last stage's cached blocks are free memory too: count them
                    emptied, free = True, free_bytes(self.device)
                if free is not None and free >= need:
                    break
                log.info("moving %s out of %s to make room", placed.name, self.device)
                placed.home()
                moved = True
        if moved:
            empty_cache()
        comfy_bridge.free_memory(need, self.device)  # other ComfyUI models make room too
        for placed in stage:
            placed.to(self.device)

    def leave(self, stage: list[Placed]) -> None:
        if self.choice in ("offload to CPU", "free after run"):
            for placed in stage:
                placed.home()

    @contextlib.contextmanager
    def use(self, stage: list[Placed], activation_bytes: int):
        """The stage's models on the device for the `with` body, and out again after it as the
        memory choice says, also when the body raises (an interrupt, out of memory)."""
        self.enter(stage, activation_bytes)
        try:
            yield
        finally:
            self.leave(stage)


class ComfyManagedPolicy(MemoryPolicy):
    """Inside ComfyUI: its model management holds our models as it holds its own.

    Each stage's models are loaded with ComfyUI's `load_models_gpu` (which unloads other models,
    ComfyUI's or ours, when the room is needed), so ComfyUI counts them in
    `current_loaded_models` and can unload them when a later model in the graph needs the room or
    the user presses "Unload models" (`POST /free`). Unloading moves a model back to the CPU
    tensors it was loaded as: the next run loads nothing from the files. 'auto' and 'keep on
    GPU' leave the models loaded for ComfyUI to unload when it must; 'offload to CPU' and 'free
    after run' unload each stage's models after it.
    """

    def enter(self, stage: list[Placed], activation_bytes: int) -> None:
        comfy_bridge.load_managed([p.managed(self.device) for p in stage], activation_bytes)
        for placed in stage:
            placed.last_used = time.monotonic()

    def leave(self, stage: list[Placed]) -> None:
        if self.choice in ("offload to CPU", "free after run"):
            comfy_bridge.unload_managed([p.patcher for p in stage])


def free_bytes(device: torch.device) -> int | None:
    """Free memory on `device`, or None where it cannot be known (then 'auto' moves models out)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free
    return comfy_bridge.free_bytes(device)


def sampling_bytes(height: int, width: int) -> int:
    """A generous bound on the transformer's activations for one image (bf16, 3072 wide)."""
    tokens = (height // 16) * (width // 16) + T5_MAX_LENGTH
    return tokens * 3072 * 2 * 24 + GIB // 2


def decoding_bytes(height: int, width: int) -> int:
    """A generous bound on the autoencoder decoder's activations at full resolution (bf16)."""
    return height * width * 128 * 2 * 6 + GIB // 2
