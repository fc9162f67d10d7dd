"""Device-memory policies: which models are on the device while each stage runs.

A run has three stages that never need to share the GPU: text encoding (T5-XXL + CLIP-L), sampling
(the transformer, one image at a time) and decoding (the autoencoder).

Memory choices (the loader node's `memory` input, the command line's `--memory`):
- "auto": a stage's model goes to the GPU when it runs; other models stay there as long as the
  free memory allows, and are moved out (oldest use first) when it does not.
- "keep on GPU": every model stays on the GPU after its stage (fastest repeat runs).
- "offload to CPU": only the running stage's model is on the GPU.
- "free after run": like "offload to CPU", and the loaded models are released after each run.
- "stream blocks" (low VRAM): like "offload to CPU", and the transformer's blocks that do not fit
  the free memory stay on the CPU (pinned where CUDA is available) and each moves in as it runs,
  the next block's copy overlapping the current block (`BlockStreamer`).

Inside ComfyUI the models join ComfyUI's own model management (`ComfyManagedPolicy`).

Whole-model moves onto a CUDA device go through a small reusable pinned buffer, non-blocking
(`PinnedStaging`); moves back cost no copy (a model's parameters return to its CPU tensors).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time

import torch

from .. import comfy_bridge
from .models import T5_MAX_LENGTH, LoadedModels, Placed, empty_cache

log = logging.getLogger("flux_schnell.local")

__all__ = [
    "GIB",
    "BlockStreamer",
    "ComfyManagedPolicy",
    "MemoryPolicy",
    "PinnedStaging",
    "decoding_bytes",
    "free_bytes",
    "fused_attention_likely",
    "math_attention_bytes",
    "sampling_bytes",
]

OFFLOADING_CHOICES = ("offload to CPU", "free after run", "stream blocks")

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
        if self.choice in OFFLOADING_CHOICES:
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
            if self.choice == "stream blocks" and placed.streamable():
                free = free_bytes(self.device)
                budget = 0 if free is None else max(0, free - activation_bytes)
                placed.to(self.device, budget=budget)
            else:
                placed.to(self.device)

    def leave(self, stage: list[Placed]) -> None:
        if self.choice in OFFLOADING_CHOICES:
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
        if self.choice in OFFLOADING_CHOICES:
            comfy_bridge.unload_managed([p.patcher for p in stage])


class BlockStreamer:
    """Moves streamed blocks onto the device as they run: block i's copy is waited for as it
    starts, block i+1's copy is started then (so it overlaps block i's compute), and block i goes
    back to its CPU tensors when it ends. Blocks run in the order given; after the last the first
    is prefetched (the next sampling step starts with it).

    `copy_in(i)` starts block i's copy and returns what `wait(i, ticket)` waits on; `copy_out(i)`
    sends it home. The defaults copy from the CPU tensors (pinned where CUDA is available) with
    `non_blocking=True` on a side CUDA stream and an event per block; on other devices they copy
    in order and the wait is nothing. Tests inject recording functions.
    """

    def __init__(self, blocks: list, sources: list[dict], device: torch.device, copy_in=None, copy_out=None):
        self.blocks, self.sources, self.device = blocks, sources, device
        self.index = {id(b): i for i, b in enumerate(blocks)}
        self.copy_in = copy_in or self._copy_in
        self.copy_out = copy_out or self._copy_out
        self.pending: dict[int, object] = {}  # block index -> its copy's ticket (an event, or None)
        self.handles = []
        self.side = torch.cuda.Stream(device) if device.type == "cuda" else None

    def attach(self) -> None:
        for block in self.blocks:
            self.handles.append(block.register_forward_pre_hook(self._before))
            self.handles.append(block.register_forward_hook(self._after))
        if self.blocks:
            self.pending[0] = self.copy_in(0)  # the first block's copy overlaps what runs before it

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        if self.side is not None:
            self.side.synchronize()
        for i in list(self.pending):
            self.copy_out(i)
        self.pending.clear()

    def _before(self, module, args) -> None:
        i = self.index[id(module)]
        if i not in self.pending:
            self.pending[i] = self.copy_in(i)
        self.wait(i, self.pending[i])
        following = (i + 1) % len(self.blocks)
        if following not in self.pending:
            self.pending[following] = self.copy_in(following)

    def _after(self, module, args, output) -> None:
        i = self.index[id(module)]
        if i in self.pending and len(self.blocks) > 1:
            del self.pending[i]
            self.copy_out(i)

    def _tensors(self, i: int):
        block = self.blocks[i]
        yield from block.named_parameters()
        yield from block.named_buffers()

    def _copy_in(self, i: int):
        source = self.sources[i]
        if self.side is None:
            for name, t in self._tensors(i):
                t.data = source[name].to(self.device, non_blocking=True)
            return None
        self.side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.side):
            for name, t in self._tensors(i):
                t.data = source[name].to(self.device, non_blocking=True)  # pinned: a real async copy
            event = torch.cuda.Event()
            event.record(self.side)
        return event

    def wait(self, i: int, ticket) -> None:
        if ticket is not None:
            torch.cuda.current_stream(self.device).wait_event(ticket)

    def _copy_out(self, i: int) -> None:
        source = self.sources[i]
        for name, t in self._tensors(i):
            if self.side is not None and t.device.type == "cuda":
                t.data.record_stream(torch.cuda.current_stream(self.device))  # freed after its last use
            t.data = source[name]


class PinnedStaging:
    """Copies whole models' CPU tensors onto a CUDA device through a few reusable pinned buffers,
    with `non_blocking=True`: `with staging.copies(device) as move: t.data = move(cpu_tensor)`.

    A model's CPU tensors are memory maps of its file (or tensors cast once at load time): pageable
    memory, from which a CUDA copy is a blocking one through the driver's own small buffer. Pinning
    each model's CPU copy once would make every later move a real asynchronous copy, but it would
    duplicate the memory-mapped weights wholesale into page-locked RAM that the system can neither
    page out nor reclaim (9.6 GB for T5-XXL, 23.8 GB for a bf16 transformer: more than many
    machines have), so whole models are not pinned. Instead the bytes pass through `slots` pinned
    buffers of `chunk_bytes` each (2 x 64 MiB: the host RAM this costs, allocated at the first
    staged move and kept for the process): the host copies a chunk from the memory map into a free
    buffer while the device copies the previous buffer in (the two overlap), and a buffer is written
    again only after the copies that read it have ended (a CUDA event per buffer, waited for on the
    host). Tensors that are pinned already (the blocks "stream blocks" pinned) are copied straight.

    Ordering: the copies are queued on the device's current stream, the stream the stage then
    computes on, so compute that uses the weights runs after them without a host wait. Moves out of
    the device make no copy (the parameters point at their CPU tensors again, which the device never
    writes), so no device-to-host copy has to be waited for before a CPU tensor is read; a device
    tensor dropped while its copy is still queued is freed in stream order by CUDA's allocator.

    Only CUDA devices with a working CUDA runtime stage (`uses`); elsewhere (CPU, MPS, a CPU-only
    torch) `move` is `t.to(device, non_blocking=True)`, as before. Non-contiguous and empty tensors
    are copied that way too. Where pinned memory cannot be had (a container's lock limit), it says
    so once and copies as before. Tests inject `pin` (a CPU tensor -> its pinned copy), `pinned`
    (whether a tensor is pinned already), `copy` (`Tensor.copy_`), `record` (device -> a ticket whose
    `synchronize()` waits for the copies queued so far; a CUDA event) and `enabled`.
    """

    ALIGN = 512  # bytes: each tensor's bytes start at an aligned offset in a buffer

    def __init__(
        self, chunk_bytes=64 * 2**20, slots=2, pin=None, pinned=None, copy=None, record=None, enabled=None
    ):
        self.chunk_bytes, self.slots = chunk_bytes, slots
        self.pin = pin or (lambda t: t.pin_memory())
        self.pinned = pinned or (lambda t: t.is_pinned())
        self.copy = copy or torch.Tensor.copy_  # copy(dst, src, non_blocking=True)
        self.record = record or _record_event
        self.enabled = enabled  # None: on CUDA devices when CUDA is available
        self.buffers: list[torch.Tensor] = []  # (chunk_bytes,) uint8 each, pinned
        self.events: list[object] = [None] * slots  # per buffer: the event after its last copy
        self.slot = self.offset = 0  # the buffer being filled and the next free byte in it
        self.failed = False  # pinned memory could not be allocated: copy as before
        self.lock = threading.Lock()

    def uses(self, device: torch.device) -> bool:
        if self.failed:
            return False
        if self.enabled is not None:
            return self.enabled
        return device.type == "cuda" and torch.cuda.is_available()

    @contextlib.contextmanager
    def copies(self, device: torch.device):
        """A `move(cpu_tensor) -> device tensor` for one model's tensors; on leaving, the buffer in
        use is closed with an event (the next move starts on a fresh one, on whatever stream)."""
        if not self.uses(device):
            yield lambda src: src.to(device, non_blocking=True)
            return
        with self.lock:
            try:
                yield lambda src: self._move(src, device)
            finally:
                if self.offset:
                    self._next_buffer(device)

    def _move(self, src: torch.Tensor, device: torch.device) -> torch.Tensor:
        if src.numel() == 0 or not src.is_contiguous() or src.device.type != "cpu":
            return src.to(device, non_blocking=True)
        dst = torch.empty(src.shape, dtype=src.dtype, device=device)
        if self.pinned(src):
            self.copy(dst, src, non_blocking=True)
            return dst
        if not self.buffers and not self._allocate():
            return src.to(device, non_blocking=True)
        # (numel * element_size,) uint8 views of the two contiguous tensors' bytes
        src_bytes, dst_bytes = src.reshape(-1).view(torch.uint8), dst.reshape(-1).view(torch.uint8)
        pos, total = 0, src_bytes.numel()
        while pos < total:
            if self.offset >= self.chunk_bytes:
                self._next_buffer(device)
            n = min(total - pos, self.chunk_bytes - self.offset)
            buffer = self.buffers[self.slot][self.offset : self.offset + n]
            buffer.copy_(src_bytes[pos : pos + n])  # on the host: reads the memory map
            self.copy(dst_bytes[pos : pos + n], buffer, non_blocking=True)
            pos += n
            self.offset = -(-(self.offset + n) // self.ALIGN) * self.ALIGN
        return dst

    def _allocate(self) -> bool:
        try:
            empty = [torch.empty(self.chunk_bytes, dtype=torch.uint8) for _ in range(self.slots)]
            self.buffers = [self.pin(b) for b in empty]
        except RuntimeError as exc:  # no pinned memory to be had: pageable copies, as before
            log.warning("no pinned memory for staging model copies (%s); copying from pageable memory", exc)
            self.failed, self.buffers = True, []
            return False
        return True

    def _next_buffer(self, device: torch.device) -> None:
        """Close the buffer being filled with an event after its copies, and wait (on the host) for
        the copies that last read the next one before it is written again."""
        self.events[self.slot] = self.record(device)
        self.slot, self.offset = (self.slot + 1) % self.slots, 0
        pending = self.events[self.slot]
        if pending is not None:
            pending.synchronize()
            self.events[self.slot] = None


def _record_event(device: torch.device):
    """A CUDA event after the copies queued on the device's current stream (None elsewhere: those
    copies have ended when they return)."""
    if device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    return event


STAGING = PinnedStaging()  # the process's staging buffers (whole-model moves hold its lock in turn)


def free_bytes(device: torch.device) -> int | None:
    """Free memory on `device`, or None where it cannot be known (then 'auto' moves models out)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free
    return comfy_bridge.comfy_free_bytes(device)


def fused_attention_likely(device: torch.device) -> bool:
    """Whether SDPA will take a fused kernel (O(L) memory) on `device`: CUDA with flash or
    memory-efficient attention enabled. Elsewhere the math kernel holds L x L scores."""
    return device.type == "cuda" and (
        torch.backends.cuda.flash_sdp_enabled() or torch.backends.cuda.mem_efficient_sdp_enabled()
    )


def math_attention_bytes(height: int, width: int) -> int:
    """The math SDPA kernel's extra memory at one attention: fp32 scores and probabilities (24 heads)."""
    tokens = (height // 16) * (width // 16) + T5_MAX_LENGTH
    return 2 * 24 * tokens * tokens * 4


def sampling_bytes(height: int, width: int, fused_attention: bool = True) -> int:
    """A generous bound on the transformer's activations for one image (bf16, 3072 wide), and the
    math SDPA kernel's L x L scores where no fused kernel runs (`fused_attention_likely`)."""
    tokens = (height // 16) * (width // 16) + T5_MAX_LENGTH
    extra = 0 if fused_attention else math_attention_bytes(height, width)
    return tokens * 3072 * 2 * 24 + GIB // 2 + extra


def decoding_bytes(height: int, width: int) -> int:
    """A generous bound on the autoencoder decoder's activations at full resolution (bf16)."""
    return height * width * 128 * 2 * 6 + GIB // 2
