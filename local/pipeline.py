"""The pipeline on loaded models: text encoding, sampling (one image per seed) and decoding."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from .. import comfy_bridge
from ..comfy_bridge import Progress
from ..errors import OutOfMemoryError
from ..generation import GenerationRequest
from .device import decode_dtype
from .memory import GIB, MemoryPolicy, decoding_bytes, fused_attention_likely, sampling_bytes
from .models import LoadedModels

__all__ = ["PipelineRun", "run_pipeline", "timed_stage"]

PREVIEW_MAX_SIZE = 512


@contextlib.contextmanager
def timed_stage(name: str, request: GenerationRequest, timings: dict[str, float]):
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


COMPILE_BACKEND = "inductor"  # torch.compile's backend for compile_blocks (tests use "eager")


def compile_blocks(transformer: nn.Module, backend: str) -> str:
    """torch.compile each double and single block in place (`nn.Module.compile`), not the whole model.

    The 19 double blocks share one class and so one compiled graph (dynamo inlines the modules and
    takes their weights as inputs), as do the 38 single blocks: two graphs to compile (seconds, not
    the minutes of the whole model), reused by every block, and by the blocks of a model loaded
    again from the files. Returns the backend (kept as `LoadedModels.compiled`).
    """
    for block in [*transformer.double_blocks, *transformer.single_blocks]:
        block.compile(backend=backend)
    return backend


@torch.inference_mode()
def run_pipeline(models: LoadedModels, run: PipelineRun) -> torch.Tensor:
    """Text encoding, sampling (one image per seed) and decoding: IMAGE tensor (B, H, W, 3) on the CPU."""
    from ..flux import decode_to_images, encode_prompts

    request, policy, timings, device, dtype = run.request, run.policy, run.timings, run.device, run.dtype
    height, width = request.height, request.width
    with (
        timed_stage("text encoding", request, timings),
        policy.use([models.t5, models.clip], GIB // 2),
    ):
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
    if run.compile and models.compiled is None:  # opt-in: the first run compiles, later runs are faster
        models.compiled = compile_blocks(transformer, COMPILE_BACKEND)
    previews = comfy_bridge.previews_enabled()
    latents = []
    reserve = sampling_bytes(height, width, fused_attention_likely(device))
    sampling_stage = policy.use([models.transformer], reserve)
    with timed_stage("sampling", request, timings), sampling_stage:
        for seed in request.seeds:
            latents.append(_sample_one(transformer, txt, vec, seed, run, previews))

    decoding_stage = policy.use([models.ae], decoding_bytes(height, width))
    with timed_stage("decoding", request, timings), decoding_stage:
        images = [
            decode_to_images(models.ae.module, x, height, width, dtype=decode_dtype(dtype)) for x in latents
        ]  # each (1, H, W, 3) float32 on the CPU
    return torch.cat(images)


def _sample_one(
    transformer: nn.Module, txt: torch.Tensor, vec: torch.Tensor, seed: int, run: PipelineRun, previews: bool
) -> torch.Tensor:
    """The packed latent (1, H/16 * W/16, 64) of one seed, after `run.request.steps` Euler steps."""
    from ..flux import denoise, get_noise, get_schedule, image_ids, latent_preview, pack, text_ids, unpack

    request, device, dtype, progress = run.request, run.device, run.dtype, run.progress
    height, width = request.height, request.width
    # Drawn by a CPU generator (the same numbers on every device), in bf16 as the reference does.
    noise = get_noise(1, height, width, seed, device=device, dtype=torch.bfloat16)
    noise = noise.to(dtype)
    img, img_ids = pack(noise), image_ids(1, height, width, device=device)
    txt_ids = text_ids(1, txt.shape[1], device=device)

    schedule = get_schedule(request.steps)
    last = [img]  # the latent before the step, to recover the step's velocity for the preview

    def on_step(done: int, total: int, x: torch.Tensor) -> None:
        preview = None
        if previews:  # show the predicted clean image, not the noisy latent
            t_prev, t_curr = schedule[done], schedule[done - 1]
            velocity = (x - last[0]) / (t_prev - t_curr)  # Euler: x = last + (t_prev - t_curr) v
            picture = latent_preview(unpack(x - t_prev * velocity, height, width))
            preview = ("JPEG", picture, PREVIEW_MAX_SIZE)
            last[0] = x
        progress.advance(1, preview)  # ComfyUI's bar raises its interrupt exception here
        progress.raise_if_interrupted()

    return denoise(transformer, img, img_ids, txt, txt_ids, vec, schedule, on_step=on_step)
