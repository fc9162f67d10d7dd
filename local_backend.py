"""The local backend's face: `generate_local` runs a request on this machine's FLUX.1-schnell.

Behind it, `local/`: which files (`files`), the loaded models and their cache (`models`), the
device-memory policies (`memory`), the pipeline (`pipeline`), the device choice (`device`) and the
LoRA choice (`lora`).
"""

from __future__ import annotations

import time

import torch

from .comfy_bridge import Progress
from .generation import MODEL_NAME, GenerationInfo, GenerationRequest
from .local import (
    GIB,
    MODEL_CACHE,
    LocalModelSpec,
    MemoryPolicy,
    PipelineRun,
    check_device_can_hold,
    compute_dtype,
    pick_device,
    run_pipeline,
    set_loras,
    timed_stage,
)

__all__ = ["generate_local", "release_models"]


def release_models() -> None:
    """Drop the cached models and give back the device memory they held."""
    MODEL_CACHE.release()


def generate_local(request: GenerationRequest, spec: LocalModelSpec | None, progress: Progress):
    """Run `request` on this machine; returns `(IMAGE tensor [B, H, W, 3], GenerationInfo)`."""
    from .flux import check_image_size

    request.validate("local")
    check_image_size(request.height, request.width)
    spec = spec or LocalModelSpec()
    files = spec.resolve()
    device = pick_device(spec.device)
    dtype = compute_dtype(device)
    started = time.monotonic()
    timings: dict[str, float] = {}
    with MODEL_CACHE.lock:  # the peak is this run's: read and reset under the lock another run would take
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        with timed_stage("loading", request, timings):
            models, loaded_now = MODEL_CACHE.load(files, spec.weight_dtype)
        if not loaded_now:
            timings.pop("loading")
        check_device_can_hold(models, device)
        set_loras(models, spec.loras, dtype)
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
                MODEL_CACHE.drop(keep_compiled_code=True)
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
