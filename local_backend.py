"""The local backend: weight files to loaded models to images, and the device-memory policy.

A run has three stages that never need to share the GPU: text encoding (T5-XXL + CLIP-L), sampling
(the transformer, one image at a time so image i of a batch is exactly the single image of seed
+ i and the memory does not grow with the batch) and decoding (the autoencoder). Models are loaded
once, memory-mapped onto the CPU, and kept between runs while the files, the weight dtype and the
device are unchanged; a new prompt or seed reloads nothing.

Memory choices (the loader node's `memory` input):
- "auto": a stage's model goes to the GPU when it runs; other models stay there as long as the
  free memory allows, and are moved out (oldest use first) when it does not.
- "keep on GPU": every model stays on the GPU after its stage (fastest repeat runs).
- "offload to CPU": only the running stage's model is on the GPU.
- "free after run": like "offload to CPU", and the loaded models are released after each run.
Moving a model out costs no copy: its parameters go back to the CPU tensors it was loaded as
(memory-mapped from the file, or cast once at load time).

Inside ComfyUI the models join ComfyUI's own model management (`ComfyManagedPolicy`): ComfyUI
loads them for each stage, counts them, and unloads them when another model needs the room or the
user asks it to.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from . import comfy_bridge
from .comfy_bridge import Progress
from .errors import LocalBackendUnavailable, OutOfMemoryError
from .generation import MODEL_NAME, GenerationInfo, GenerationRequest
from .local_files import LocalModelSpec, ResolvedFiles

log = logging.getLogger("flux_schnell.local")

__all__ = ["PipelineRun", "generate_local", "release_models", "run_pipeline"]

# local_files.WEIGHT_DTYPE_OPTIONS -> the dtype weights are converted to at load (None: as stored)
LOAD_DTYPE_OF_OPTION = {"as stored": None, "bf16": torch.bfloat16, "fp8_e4m3fn": torch.float8_e4m3fn}
T5_MAX_LENGTH = 256  # FLUX.1 [schnell] encodes 256 T5 tokens (dev: 512)
CLIP_MAX_LENGTH = 77
PREVIEW_MAX_SIZE = 512
GIB = 2**30


def pick_device(requested: str | None) -> torch.device:
    """The device the user named, else ComfyUI's device, else the first GPU, else the CPU."""
    if requested:
        try:
            device = torch.device(requested)
        except RuntimeError as e:
            raise LocalBackendUnavailable(f"device {requested!r} is not a torch device: {e}") from e
        if device.type == "cuda" and not torch.cuda.is_available():
            raise LocalBackendUnavailable(
                f"device {requested!r} was asked for, but this torch has no CUDA device; "
                "use --device cpu (slow) or backend 'api'"
            )
        return device
    comfy_device = comfy_bridge.torch_device()
    if comfy_device is not None:
        return torch.device(comfy_device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def compute_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPUs with native bf16 (NVIDIA Ampere or newer, AMD, Intel), else fp32.

    Never fp16: FLUX's activations overflow it. `torch.cuda.is_bf16_supported()` also says yes
    for emulated bf16 (Turing, Volta), which is slow, so the capability is asked instead.
    """
    if device.type == "cuda":
        native = torch.version.hip is not None or torch.cuda.get_device_capability(device)[0] >= 8
        return torch.bfloat16 if native else torch.float32
    if device.type == "xpu":
        return torch.bfloat16
    return torch.float32


def module_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


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

    def to(self, device: torch.device) -> None:
        if self.device != device:
            try:
                for name, t in self._tensors():
                    t.data = self.cpu_tensors[name].to(device, non_blocking=True)
                _move_loras(self.module, device)
            except BaseException:  # out of memory half way: give back what did move
                self._restore()
                raise
            self.device = device
        self.last_used = time.monotonic()

    def home(self) -> None:
        if self.device.type != "cpu":
            self._restore()

    def _restore(self) -> None:
        for name, t in self._tensors():
            t.data = self.cpu_tensors[name]
        _move_loras(self.module, torch.device("cpu"))
        self.device = torch.device("cpu")

    def refresh_size(self) -> None:
        """Recount `nbytes` (the weights and the LoRA updates now attached)."""
        from .flux.lora import adapters

        self.nbytes = module_bytes(self.module) + sum(a.nbytes for a in adapters(self.module))


def _move_loras(module: nn.Module, device: torch.device) -> None:
    from .flux.lora import move_loras

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
    compiled: object = None  # torch.compile of the transformer, made on first use
    lora_state: tuple = ()  # local_lora.lora_state of the LoRAs on the models (() : none)

    def all(self) -> list[Placed]:
        return [self.t5, self.clip, self.transformer, self.ae]


_lock = threading.Lock()
_loaded: LoadedModels | None = None


def release_models() -> None:
    """Drop the cached models and give back the device memory they held."""
    with _lock:
        _drop_loaded()


def _drop_loaded() -> None:
    """Forget the cached models (the caller holds `_lock`). Each is moved home first, so its
    device memory is freed even while something else still refers to the module."""
    global _loaded
    if _loaded is not None:
        comfy_bridge.unload_managed([placed.patcher for placed in _loaded.all()])
        for placed in _loaded.all():
            placed.home()
        if _loaded.compiled is not None:  # compiled graphs and their guards hold the old modules
            torch._dynamo.reset()
        _loaded = None
    _empty_cache()


def _empty_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    elif getattr(torch, "mps", None) is not None and torch.backends.mps.is_available():
        torch.mps.empty_cache()


def load_models(files: ResolvedFiles, weight_dtype: str) -> tuple[LoadedModels, bool]:
    """The models for these files and dtype, and whether they had to be loaded (the caller holds
    `_lock`). A different set is released first, so two never share the memory."""
    global _loaded
    from .flux import loading, tokenizers

    stamps = file_stamps(files)
    if (
        _loaded is not None
        and _loaded.files == files
        and _loaded.stamps == stamps
        and _loaded.weight_dtype == weight_dtype
    ):
        return _loaded, False
    # The four files must belong together: checked from their headers, before gigabytes load.
    loading.check_files_compatible(files.transformer, files.t5, files.clip, files.ae)
    narrow = LOAD_DTYPE_OF_OPTION[weight_dtype]
    _drop_loaded()
    log.info("loading FLUX.1-schnell (weights %s) from %s", weight_dtype, files.transformer.parent)
    loaded = LoadedModels(
        files=files,
        weight_dtype=weight_dtype,
        stamps=stamps,
        t5=Placed("T5-XXL", loading.load_t5(files.t5, weight_dtype=narrow)),
        clip=Placed("CLIP-L", loading.load_clip(files.clip)),
        transformer=Placed("transformer", loading.load_transformer(files.transformer, weight_dtype=narrow)),
        ae=Placed("autoencoder", loading.load_autoencoder(files.ae)),
        t5_tokenizer=tokenizers.load_t5_tokenizer(files.t5_tokenizer, max_length=T5_MAX_LENGTH),
        clip_tokenizer=tokenizers.load_clip_tokenizer(files.clip_tokenizer, max_length=CLIP_MAX_LENGTH),
    )
    _loaded = loaded
    return loaded, True


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
        if self.choice in ("offload to CPU", "free after run"):
            for placed in others:
                placed.home()
        elif self.choice == "auto":
            _empty_cache()  # the last stage's cached blocks are free memory too
            for placed in others:
                free = _free_bytes(self.device)
                if free is not None and free >= need:
                    break
                log.info("moving %s out of %s to make room", placed.name, self.device)
                placed.home()
                _empty_cache()
        if others:
            _empty_cache()
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


def _free_bytes(device: torch.device) -> int | None:
    """Free memory on `device`, or None where it cannot be known (then 'auto' moves models out)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free
    return comfy_bridge.free_bytes(device)


@contextlib.contextmanager
def _stage(name: str, request: GenerationRequest, timings: dict[str, float]):
    """Times a stage and turns running out of device memory into an error that says what to do.

    The device memory is given back once the `except` block is left, so that the failed forward's
    frames (and the activations they hold) are gone first: inside ComfyUI as its own handler for
    torch's out-of-memory error does (every model unloaded, ours included), else the cache emptied.
    The error is not chained to torch's, whose traceback would keep those activations alive.
    """
    started = time.monotonic()
    out_of_memory = False
    try:
        yield
    except torch.cuda.OutOfMemoryError:  # also torch.OutOfMemoryError in newer torch
        out_of_memory = True
    finally:
        timings[name] = timings.get(name, 0.0) + time.monotonic() - started
    if out_of_memory:
        comfy_bridge.recover_from_out_of_memory()
        raise OutOfMemoryError(
            f"out of memory on the GPU during {name} at {request.width}x{request.height}: use a "
            "smaller width/height, weight_dtype 'fp8_e4m3fn' (half the transformer's memory), a GGUF "
            "transformer and T5 (Q4_K_S: about a quarter), memory 'offload to CPU', or close other "
            "programs using the GPU"
        )


def generate_local(request: GenerationRequest, spec: LocalModelSpec | None, progress: Progress):
    """Run `request` on this machine; returns `(IMAGE tensor [B, H, W, 3], GenerationInfo)`."""
    from .flux.sampling import check_image_size

    request.validate("local")
    check_image_size(request.height, request.width)
    spec = spec or LocalModelSpec()
    files = spec.resolve()
    device = pick_device(spec.device)
    dtype = compute_dtype(device)
    started = time.monotonic()
    timings: dict[str, float] = {}
    with _lock:  # the peak is this run's: read and reset under the lock another run would take
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        with _stage("loading", request, timings):
            models, loaded_now = load_models(files, spec.weight_dtype)
        if not loaded_now:
            timings.pop("loading")
        _check_device_can_hold(models, device)
        _set_loras(models, spec.loras, dtype)
        run = PipelineRun(
            request=request,
            device=device,
            dtype=dtype,
            policy=MemoryPolicy.for_run(models, device, spec.memory),
            progress=progress,
            compile=spec.compile,
            timings=timings,
        )
        try:
            images = run_pipeline(models, run)
        finally:
            peak = torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None
            if spec.memory == "free after run":
                _drop_loaded()
    info = GenerationInfo(
        backend="local",
        model=MODEL_NAME,
        prompt=request.prompt,
        width=request.width,
        height=request.height,
        steps=request.steps,
        seeds=request.seeds,
        seconds=time.monotonic() - started,
        device=f"{device} ({str(dtype).removeprefix('torch.')}, weights {spec.weight_dtype})",
        timings=timings,
        peak_memory_gib=peak,
        loras=[c.describe() for c in spec.loras] or None,
    )
    return images, info


def _set_loras(models: LoadedModels, choices, dtype: torch.dtype) -> None:
    """Put the chosen LoRAs on the loaded models when they differ from what is there (the caller
    holds `_lock`). Only the LoRA files are read; a LoRA that does not fit raises and leaves the
    models as they were."""
    from .local_components import CLIP, T5, TRANSFORMER
    from .local_lora import lora_state, use_loras

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


def _check_device_can_hold(models: LoadedModels, device: torch.device) -> None:
    """fp8 tensors exist on CPUs and CUDA GPUs only (not on Apple's MPS, for one)."""
    if device.type in ("cpu", "cuda"):
        return
    for placed in models.all():
        if any(t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) for t in placed.cpu_tensors.values()):
            raise LocalBackendUnavailable(
                f"the {placed.name} weights are fp8, which {device.type} cannot hold: choose "
                "weight_dtype 'bf16' (or a bf16/fp16 file), or the api backend"
            )


@dataclass
class PipelineRun:
    """One generation on loaded models: what to make, where and in which dtype, how the models
    share the device, and where progress and stage timings go."""

    request: GenerationRequest
    device: torch.device
    dtype: torch.dtype  # the compute dtype (compute_dtype(device))
    policy: MemoryPolicy
    progress: Progress
    compile: bool = False  # torch.compile the transformer (kept on the LoadedModels)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage, filled in


@torch.inference_mode()
def run_pipeline(models: LoadedModels, run: PipelineRun) -> torch.Tensor:
    """Text encoding, sampling (one image per seed) and decoding: IMAGE tensor (B, H, W, 3) on the CPU."""
    from .flux import sampling
    from .flux.conditioning import encode_prompts

    request, policy, timings, device, dtype = run.request, run.policy, run.timings, run.device, run.dtype
    height, width = request.height, request.width
    with _stage("text encoding", request, timings), policy.use([models.t5, models.clip], GIB // 2):
        txt, vec = encode_prompts(
            models.t5.module,
            models.clip.module,
            models.t5_tokenizer,
            models.clip_tokenizer,
            [request.prompt],
            device,
            dtype,
        )  # (1, 256, 4096), (1, 768): one prompt serves every image of the batch
    run.progress.raise_if_interrupted()

    transformer = models.transformer.module
    if run.compile:  # opt-in: the first run compiles (tens of seconds), later runs are faster
        if models.compiled is None:  # a second image size recompiles once with dynamic shapes,
            models.compiled = torch.compile(transformer)  # not once per size up to dynamo's limit
        transformer = models.compiled
    previews = comfy_bridge.previews_enabled()
    latents = []
    sampling_stage = policy.use([models.transformer], _sampling_bytes(height, width))
    with _stage("sampling", request, timings), sampling_stage:
        for seed in request.seeds:
            latents.append(_sample_one(transformer, txt, vec, seed, run, previews))

    decoding_stage = policy.use([models.ae], _decoding_bytes(height, width))
    with _stage("decoding", request, timings), decoding_stage:
        images = [
            sampling.decode_to_images(models.ae.module, x, height, width, dtype=dtype) for x in latents
        ]  # each (1, H, W, 3) float32 on the CPU
    return torch.cat(images)


def _sample_one(
    transformer: nn.Module, txt: torch.Tensor, vec: torch.Tensor, seed: int, run: PipelineRun, previews: bool
) -> torch.Tensor:
    """The packed latent (1, H/16 * W/16, 64) of one seed, after `run.request.steps` Euler steps."""
    from .flux import sampling
    from .flux.preview import latent_preview

    request, device, dtype, progress = run.request, run.device, run.dtype, run.progress
    height, width = request.height, request.width
    # Drawn by a CPU generator (the same numbers on every device), in bf16 as the reference does.
    noise = sampling.get_noise(1, height, width, seed, device=device, dtype=torch.bfloat16)
    noise = noise.to(dtype)
    img, img_ids = sampling.pack(noise), sampling.image_ids(1, height, width, device=device)
    txt_ids = sampling.text_ids(1, txt.shape[1], device=device)

    schedule = sampling.get_schedule(request.steps)
    last = [img]  # the latent before the step, to recover the step's velocity for the preview

    def on_step(done: int, total: int, x: torch.Tensor) -> None:
        preview = None
        if previews:  # show the predicted clean image, not the noisy latent
            t_prev, t_curr = schedule[done], schedule[done - 1]
            velocity = (x - last[0]) / (t_prev - t_curr)  # Euler: x = last + (t_prev - t_curr) v
            picture = latent_preview(sampling.unpack(x - t_prev * velocity, height, width))
            preview = ("JPEG", picture, PREVIEW_MAX_SIZE)
            last[0] = x
        progress.advance(1, preview)  # ComfyUI's bar raises its interrupt exception here
        progress.raise_if_interrupted()

    return sampling.denoise(transformer, img, img_ids, txt, txt_ids, vec, schedule, on_step=on_step)


def _sampling_bytes(height: int, width: int) -> int:
    """A generous bound on the transformer's activations for one image (bf16, 3072 wide)."""
    tokens = (height // 16) * (width // 16) + T5_MAX_LENGTH
    return tokens * 3072 * 2 * 24 + GIB // 2


def _decoding_bytes(height: int, width: int) -> int:
    """A generous bound on the autoencoder decoder's activations at full resolution (bf16)."""
    return height * width * 128 * 2 * 6 + GIB // 2
