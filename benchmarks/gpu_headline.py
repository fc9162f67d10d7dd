"""The GPU check's measurements on full-size random models built in device memory (no weight files).

Each `--part` is one process that `benchmarks/gpu_check.sh` runs under its own time limit; every row is
printed (and flushed) as soon as it is measured, so a kill keeps what was measured.

- `probe`: which attention kernels (flash, memory-efficient, cuDNN, math) take the real shapes: the
  transformer's (1, 24, 4352, 128) q/k/v as transposed views of one qkv, the autoencoder's
  (1, 1, 16384, 512), T5's (1, 64, 256, 64) with its position bias as the permuted view it is and made
  contiguous, CLIP's causal (1, 12, 77, 64); and whether `torch._scaled_mm` runs here.
- `headline`: FLUX.1-schnell at full size (bf16, random N(0, 1/fan_in) weights made on the device),
  1024x1024, 4 steps, "keep on GPU": seconds per image and the peak memory of each stage
  (`torch.cuda.max_memory_allocated`, reset at each stage) for
  1. ours bf16;
  2. diffusers' FluxPipeline on the same weight storages (tests/support converters), and max|Δ| of one
     transformer forward (ours against `FluxTransformer2DModel`, same inputs) and of the final packed
     latent (both pipelines draw the same CPU bf16 noise from seed 0);
  3. ours fp8: the transformer's Linear weights cast in place to float8_e4m3fn (clamped to ±448),
     upcast at each layer call;
  4. ours fp8 with fp8 matrix products (`flux.fp8_matmul`, `torch._scaled_mm` where `usable` says so);
  5. ours GGUF Q4_K: the transformer's matrices as random Q4_K blocks (`local_speed.to_gguf`; the
     values are not those of the bf16 weights, so no Δ), decoded at each layer call.
  Rows 3-4 give max|Δ| of the final latent against row 1 (fp8 rounding of random weights).
- `compile`: per-block compile (when the code offers one; else "skipped: no per-block compile"),
  whole-model `torch.compile` (first image = compile time, then s/image), a second image size
  (768x1360: the first image recompiles), eager at that size for reference.
- `gguf-compile`: one (3072, 12288) Q4_K weight decoded eager against `torch.compile(dequantize)`
  (ms, max|Δ|), then the Q4_K transformer compiled whole (dequantization fused into the graph).

`--tiny` (or FLUX_SCHNELL_GPU_CHECK_TINY=1) runs every part on the CPU in seconds with tiny widths,
fp32, and `torch.compile(backend="eager")` (dynamo traces, no code generation): a rehearsal of the
script, not a measurement. A missing diffusers turns its rows into "skipped: no diffusers".

    python -m benchmarks.gpu_headline --part headline            # on the GPU machine
    python -m benchmarks.gpu_headline --part headline --tiny     # rehearsal, any machine
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

TINY_ENV = "FLUX_SCHNELL_GPU_CHECK_TINY"
GIB = 2**30
PARTS = ("probe", "headline", "compile", "gguf-compile")
SECOND_SIZE = {"schnell": (768, 1360), "tiny": (128, 256)}  # (height, width)


@dataclass
class Setup:
    """Where and at which size a part runs."""

    config: str  # local_pipeline.CONFIGS key: "schnell" or "tiny"
    device: torch.device
    steps: int = 4
    repeats: int = 2  # timed images after one warm-up
    compile_backend: str = "inductor"
    folder: Path = field(default_factory=Path)  # a temporary folder (tokenizer files), removed at the end

    @property
    def cfg(self) -> dict:
        from benchmarks.local_pipeline import CONFIGS

        return CONFIGS[self.config]

    @property
    def dtype(self) -> torch.dtype:
        return self.cfg["dtype"]


def row(*cells) -> None:
    """One table row, printed at once (a kill keeps it)."""
    print("| " + " | ".join(str(c) for c in cells) + " |", flush=True)


def header(title: str, *columns: str) -> None:
    print(f"\n### {title}\n", flush=True)
    row(*columns)
    row(*(["---"] * len(columns)))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gib(n: float | None) -> str:
    return "-" if n is None else f"{n / GIB:.2f}"


def optional(module: str):
    """The module, or None when it is not installed (its rows then say "skipped: no <module>")."""
    try:
        return __import__(module)
    except ImportError:
        return None


# --- probe ---------------------------------------------------------------------------------------


def attention_cases(tiny: bool) -> dict[str, tuple]:
    """name -> (q, k, v, attention kwargs), in the real shapes (divided down for --tiny)."""
    d = 16 if tiny else 1  # tokens / divisor in the rehearsal
    gen = torch.Generator("cpu").manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen)

    tokens = 4352 // d
    qkv = rand(1, tokens, 3, 24, 128)  # (B, L, 3, H, D): the transformer's qkv projection, split
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, L, D), transposed views
    vae = rand(1, 1, 16384 // d, 512)  # (B, 1 head, H/8 * W/8 pixels, 512 channels)
    t5q = rand(1, 64, 256 // d, 64)
    bias = rand(1, 256 // d, 256 // d, 64).permute(0, 3, 1, 2)  # (1, H, L, L), strides as in flux/t5.py
    clip = rand(1, 12, 77, 64)
    return {
        "transformer (1, 24, 4352, 128), transposed views": (q, k, v, {}),
        "autoencoder (1, 1, 16384, 512)": (vae, vae, vae, {}),
        "T5 (1, 64, 256, 64), permuted bias": (t5q, t5q, t5q, {"attn_mask": bias}),
        "T5 (1, 64, 256, 64), contiguous bias": (t5q, t5q, t5q, {"attn_mask": bias.contiguous()}),
        "CLIP (1, 12, 77, 64), causal": (clip, clip, clip, {"is_causal": True}),
    }


def part_probe(setup: Setup) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    device, dtype = setup.device, setup.dtype
    backends = ["FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"]
    header("Attention kernels on the real shapes", "shape", *backends, "default, ms")
    for name, (q, k, v, kwargs) in attention_cases(setup.config == "tiny").items():
        q, k, v = (t.to(device=device, dtype=dtype) for t in (q, k, v))
        kwargs = {n: t.to(device=device, dtype=dtype) if torch.is_tensor(t) else t for n, t in kwargs.items()}
        cells = []
        for backend in backends:
            try:
                with sdpa_kernel([getattr(SDPBackend, backend)]):
                    F.scaled_dot_product_attention(q, k, v, **kwargs)
                sync(device)
                cells.append("ok")
            except RuntimeError as e:  # "No available kernel": this backend refuses the inputs
                cells.append("refused" if "kernel" in str(e).lower() else f"error: {str(e)[:60]}")
        start = time.perf_counter()
        F.scaled_dot_product_attention(q, k, v, **kwargs)
        sync(device)
        row(name, *cells, f"{1000 * (time.perf_counter() - start):.2f}")
    from comfyui_flux_schnell.flux import fp8_matmul

    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else "-"
    try:
        x = torch.randn(32, 64, device=device).to(fp8_matmul.FP8)
        w = torch.randn(48, 64, device=device).to(fp8_matmul.FP8)
        one = torch.ones((), device=device)
        torch._scaled_mm(x, w.t(), one, one, out_dtype=torch.bfloat16)
        scaled_mm = "runs"
    except (RuntimeError, AttributeError) as e:
        scaled_mm = f"fails: {str(e)[:80]}"
    print(f"\ntorch._scaled_mm: {scaled_mm}; capability {capability}; "
          f"fp8_matmul.usable: {fp8_matmul.usable(device)}", flush=True)  # fmt: skip


# --- headline ------------------------------------------------------------------------------------


@dataclass
class Measured:
    """One variant's images: seconds per image (median), per-stage seconds and peaks, its final latent."""

    seconds: list[float] = field(default_factory=list)
    stage_s: dict[str, list[float]] = field(default_factory=dict)
    peaks: dict[str, int] = field(default_factory=dict)
    latent: torch.Tensor | None = None

    def add(self, stage: str, seconds: float, peak: int | None) -> None:
        self.stage_s.setdefault(stage, []).append(seconds)
        if peak is not None:
            self.peaks[stage] = max(self.peaks.get(stage, 0), peak)


class Stage:
    """A timed stage: synchronized wall time and, on CUDA, the peak allocated memory inside it."""

    def __init__(self, measured: Measured, name: str, device: torch.device, keep: bool):
        self.measured, self.name, self.device, self.keep = measured, name, device, keep

    def __enter__(self):
        sync(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        sync(self.device)
        seconds = time.perf_counter() - self.start
        peak = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None
        if self.keep and exc[0] is None:
            self.measured.add(self.name, seconds, peak)
        return False


def build_models(setup: Setup):
    """Our four networks with seeded random weights made on the device, as one LoadedModels."""
    from comfyui_flux_schnell.flux.autoencoder import AutoEncoder
    from comfyui_flux_schnell.flux.clip import CLIPTextEncoder
    from comfyui_flux_schnell.flux.model import Flux
    from comfyui_flux_schnell.flux.t5 import T5Encoder

    from benchmarks.local_pipeline import in_memory_models, random_module
    from tests.support.tiny_tokenizers import write_flux_repo_tree

    cfg, device, dtype = setup.cfg, setup.device, setup.dtype
    tokenizers = write_flux_repo_tree(Path(tempfile.mkdtemp(dir=setup.folder)))
    nets = dict(
        transformer=random_module(Flux, cfg["flux"], device, dtype, 0),
        ae=random_module(AutoEncoder, cfg["ae"], device, dtype, 1),
        t5=random_module(T5Encoder, cfg["t5"], device, dtype, 2),
        clip=random_module(CLIPTextEncoder, cfg["clip"], device, dtype, 3),
    )
    return nets, tokenizers, in_memory_models(nets, *tokenizers, device)


def run_ours(models, setup: Setup, size: tuple[int, int], transformer=None) -> Measured:
    """1 warm-up and `setup.repeats` timed images through the stages the pipeline runs."""
    from comfyui_flux_schnell.flux import sampling
    from comfyui_flux_schnell.flux.conditioning import encode_prompts
    from comfyui_flux_schnell.local.device import decode_dtype

    from benchmarks.local_pipeline import PROMPT

    device, dtype = setup.device, setup.dtype
    height, width = size
    transformer = models.transformer.module if transformer is None else transformer
    measured = Measured()
    with torch.inference_mode():
        for i in range(1 + setup.repeats):
            keep = i > 0
            start = time.perf_counter()
            with Stage(measured, "text encoding", device, keep):
                txt, vec = encode_prompts(
                    models.t5.module,
                    models.clip.module,
                    models.t5_tokenizer,
                    models.clip_tokenizer,
                    [PROMPT],
                    device,
                    dtype,
                )
            with Stage(measured, "sampling", device, keep):
                noise = sampling.get_noise(1, height, width, 0, device=device, dtype=torch.bfloat16)
                img = sampling.pack(noise.to(dtype))  # (1, H/16 * W/16, 64)
                img_ids = sampling.image_ids(1, height, width, device=device)
                txt_ids = sampling.text_ids(1, txt.shape[1], device=device)
                schedule = sampling.get_schedule(setup.steps)
                latent = sampling.denoise(transformer, img, img_ids, txt, txt_ids, vec, schedule)
            with Stage(measured, "decoding", device, keep):
                sampling.decode_to_images(models.ae.module, latent, height, width, dtype=decode_dtype(dtype))
            if keep:
                measured.seconds.append(time.perf_counter() - start)
    measured.latent = latent.float().cpu()
    return measured


def report(name: str, m: Measured, reference: torch.Tensor | None, note: str = "") -> None:
    med = statistics.median
    delta = "-" if reference is None else f"{(m.latent - reference).abs().max().item():.3g}"
    stages = [f"{med(m.stage_s[s]):.3f}" for s in ("text encoding", "sampling", "decoding")]
    peaks = [gib(m.peaks.get(s)) for s in ("text encoding", "sampling", "decoding")]
    row(name, f"{med(m.seconds):.3f}", *stages, *peaks, delta, note)


HEADLINE_COLUMNS = (
    "variant",
    "s/image",
    "text s",
    "sampling s",
    "decoding s",
    "text peak GiB",
    "sampling peak GiB",
    "decoding peak GiB",
    "max|Δ| final latent vs ours bf16",
    "note",
)


def transformer_inputs(setup: Setup, size: tuple[int, int]) -> dict:
    """Seeded inputs of one transformer forward (local_speed's layout), on the device."""
    p = setup.cfg["flux"]
    rows, cols = size[0] // 16, size[1] // 16
    gen = torch.Generator("cpu").manual_seed(1)
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    x = dict(
        img=torch.randn(1, rows * cols, p.in_channels, generator=gen),
        txt=torch.randn(1, 256, p.context_in_dim, generator=gen),
        y=torch.randn(1, p.vec_in_dim, generator=gen),
        t=torch.tensor([0.75]),
        img_ids=torch.stack((torch.zeros_like(r), r, c), -1).view(-1, 3).float(),  # (rows * cols, 3)
        txt_ids=torch.zeros(256, 3),
    )
    floats = ("img", "txt", "y")
    return {k: v.to(device=setup.device, dtype=setup.dtype if k in floats else None) for k, v in x.items()}


def part_headline(setup: Setup) -> None:
    from comfyui_flux_schnell.flux import fp8_matmul, ops

    from benchmarks import local_speed

    size = (setup.cfg["size"],) * 2
    nets, tokenizers, models = build_models(setup)
    header(
        f"Headline: config {setup.config}, {size[0]}x{size[1]}, {setup.steps} steps, {where(setup.device)}, "
        f"median of {setup.repeats} after 1 warm-up",
        *HEADLINE_COLUMNS,
    )
    ours = run_ours(models, setup, size)
    report("ours bf16" if setup.dtype == torch.bfloat16 else "ours fp32 (rehearsal)", ours, None)
    run_diffusers(nets, tokenizers, models, setup, size, ours.latent)
    del nets
    empty_cache(setup.device)

    transformer = models.transformer.module
    to_fp8(transformer)
    report("ours fp8_e4m3fn", run_ours(models, setup, size), ours.latent, "weights upcast per layer call")
    enabled = fp8_matmul.enable_fp8_matmul(transformer)
    usable = fp8_matmul.usable(setup.device)
    note = f"{enabled} layers, _scaled_mm " + ("used" if usable else "not usable here: computes as fp8")
    report("ours fp8_e4m3fn_fast", run_ours(models, setup, size), ours.latent, note)

    for layer in transformer.modules():
        if isinstance(layer, ops.Linear):
            layer.fp8_matmul = False
    local_speed.to_gguf(transformer, "Q4_K", torch.Generator(setup.device).manual_seed(2))
    back_to(transformer, setup.dtype)  # the unquantized embedders and final layer, as city96's files
    empty_cache(setup.device)
    report("ours GGUF Q4_K", run_ours(models, setup, size), None, "random blocks: no Δ")


def run_diffusers(nets, tokenizers, models, setup: Setup, size, reference: torch.Tensor) -> None:
    if optional("diffusers") is None:
        row("diffusers FluxPipeline", *(["skipped: no diffusers"] + ["-"] * (len(HEADLINE_COLUMNS) - 2)))
        return
    from benchmarks import local_speed
    from benchmarks.local_pipeline import to_diffusers

    parts = to_diffusers(nets, setup.cfg, setup.device, setup.dtype)  # the same storages, moved
    x = transformer_inputs(setup, size)
    with torch.inference_mode():
        ours_out = local_speed.forward("ours", models.transformer.module, x).float()
        theirs_out = local_speed.forward("diffusers", parts["transformer"], x).float()
    forward_delta = (ours_out - theirs_out).abs().max().item()
    scale = theirs_out.abs().max().item()
    del ours_out, theirs_out
    measured = diffusers_images(parts, tokenizers, setup, size)
    report(
        "diffusers FluxPipeline", measured, reference,
        f"one transformer forward: max|Δ| {forward_delta:.3g} (outputs up to {scale:.3g})",
    )  # fmt: skip
    del parts
    empty_cache(setup.device)


def diffusers_images(parts, tokenizers, setup: Setup, size) -> Measured:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    from transformers import CLIPTokenizer, T5TokenizerFast

    from benchmarks.local_pipeline import PROMPT

    clip_dir, t5_dir = tokenizers
    device = setup.device
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False),
        vae=parts["ae"],
        text_encoder=parts["clip"],
        tokenizer=CLIPTokenizer(
            str(clip_dir / "vocab.json"), str(clip_dir / "merges.txt"), model_max_length=77
        ),
        text_encoder_2=parts["t5"],
        tokenizer_2=T5TokenizerFast(tokenizer_file=str(t5_dir / "tokenizer.json")),
        transformer=parts["transformer"],
    )
    pipe.set_progress_bar_config(disable=True)
    height, width = size
    measured = Measured()
    with torch.inference_mode():
        for i in range(1 + setup.repeats):
            keep = i > 0
            start = time.perf_counter()
            with Stage(measured, "text encoding", device, keep):
                embeds, pooled, _ = pipe.encode_prompt(PROMPT, PROMPT, device=device, max_sequence_length=256)
            with Stage(measured, "sampling", device, keep):
                latent = pipe(
                    prompt_embeds=embeds,
                    pooled_prompt_embeds=pooled,
                    height=height,
                    width=width,
                    num_inference_steps=setup.steps,
                    guidance_scale=0.0,
                    generator=torch.Generator("cpu").manual_seed(0),
                    output_type="latent",
                ).images  # packed (1, H/16 * W/16, 64), as ours
            with Stage(measured, "decoding", device, keep):
                z = pipe._unpack_latents(latent, height, width, pipe.vae_scale_factor)
                z = z / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
                pipe.vae.decode(z, return_dict=False)[0].clamp(-1, 1).float().cpu()
            if keep:
                measured.seconds.append(time.perf_counter() - start)
    measured.latent = latent.float().cpu()
    return measured


def to_fp8(model: torch.nn.Module) -> int:
    """Every floating Linear weight of `model` cast in place to float8_e4m3fn (clamped to its range)."""
    from comfyui_flux_schnell.flux import fp8_matmul, ops

    count = 0
    for layer in model.modules():
        if isinstance(layer, ops.Linear) and layer.weight.dtype.is_floating_point:
            w = layer.weight.detach()
            narrow = w.clamp(-fp8_matmul.FP8_MAX, fp8_matmul.FP8_MAX).to(fp8_matmul.FP8)
            layer.weight = torch.nn.Parameter(narrow, requires_grad=False)
            count += 1
    return count


def back_to(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """fp8 weights left in `model` (the layers GGUF keeps unquantized) cast back to `dtype`."""
    for layer in model.modules():
        w = getattr(layer, "weight", None)
        if isinstance(w, torch.Tensor) and w.dtype == torch.float8_e4m3fn:
            layer.weight = torch.nn.Parameter(w.detach().to(dtype), requires_grad=False)


def empty_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def where(device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    return f"{name}, torch {torch.__version__}"


# --- compile -------------------------------------------------------------------------------------


def per_block_compile():
    """The code's per-block (regional) compile, if it offers one: a callable taking the transformer."""
    from comfyui_flux_schnell.flux import model as flux_model
    from comfyui_flux_schnell.local import pipeline as local_pipeline

    for module in (local_pipeline, flux_model):
        for name in ("compile_blocks", "compile_per_block", "compile_regions"):
            if callable(getattr(module, name, None)):
                return getattr(module, name)
    return None


def first_and_rest(models, setup: Setup, size, transformer) -> tuple[float, Measured]:
    """Seconds of the first image (compiling included), then the timed images."""
    start = time.perf_counter()
    once = Setup(setup.config, setup.device, setup.steps, 0, setup.compile_backend, setup.folder)
    run_ours(models, once, size, transformer)
    first = time.perf_counter() - start
    return first, run_ours(models, setup, size, transformer)


COMPILE_COLUMNS = ("variant", "size", "first image s (compile)", "s/image", "sampling s", "sampling peak GiB")


def compile_row(name: str, size, first: float | None, m: Measured) -> None:
    med = statistics.median
    first_s = "-" if first is None else f"{first:.2f}"
    sampling = med(m.stage_s["sampling"])
    row(
        name,
        f"{size[0]}x{size[1]}",
        first_s,
        f"{med(m.seconds):.3f}",
        f"{sampling:.3f}",
        gib(m.peaks.get("sampling")),
    )


def part_compile(setup: Setup) -> None:
    size, second = (setup.cfg["size"],) * 2, SECOND_SIZE[setup.config]
    _, _, models = build_models(setup)
    header(
        f"Compile: config {setup.config}, {setup.steps} steps, {where(setup.device)}, "
        f"backend {setup.compile_backend}, median of {setup.repeats}",
        *COMPILE_COLUMNS,
    )
    transformer = models.transformer.module
    compile_row("eager", size, None, run_ours(models, setup, size))
    whole = torch.compile(transformer, backend=setup.compile_backend)
    compile_row("whole-model compile", size, *first_and_rest(models, setup, size, whole))
    compile_row("eager", second, None, run_ours(models, setup, second))
    compile_row("whole-model compile, second size", second, *first_and_rest(models, setup, second, whole))
    del whole
    torch._dynamo.reset()
    # Last: local.pipeline.compile_blocks compiles the blocks in place (nn.Module.compile), for good.
    compile_blocks = per_block_compile()
    if compile_blocks is None:
        row("per-block compile", "skipped: no per-block compile", "-", "-", "-", "-")
    else:
        compile_blocks(transformer, setup.compile_backend)
        compile_row("per-block compile", size, *first_and_rest(models, setup, size, transformer))
        compile_row(
            "per-block compile, second size", second, *first_and_rest(models, setup, second, transformer)
        )


def part_gguf_compile(setup: Setup) -> None:
    from comfyui_flux_schnell.flux.gguf_quants import GGML_TYPES, dequantize

    from benchmarks import local_speed

    device, dtype = setup.device, setup.dtype
    rows, cols = (3072, 12288) if setup.config == "schnell" else (256, 1024)
    t = GGML_TYPES["Q4_K"]
    gen = torch.Generator(device).manual_seed(3)
    raw = torch.randint(0, 256, t.byte_shape((rows, cols)), dtype=torch.uint8, generator=gen, device=device)
    blocks = raw.view(-1, t.type_size)  # (blocks, 144): finite fp16 d and dmin (2^-7)
    blocks[:, 0:4] = torch.tensor([0x00, 0x20, 0x00, 0x20], dtype=torch.uint8, device=device)
    header(
        f"GGUF Q4_K with a compiled dequantizer: one ({rows}, {cols}) weight, {where(device)}, "
        f"backend {setup.compile_backend}",
        "decoder", "ms per decode (median of 10)", "max|Δ| vs eager",
    )  # fmt: skip
    eager = dequantize(raw, "Q4_K", dtype)
    compiled = torch.compile(dequantize, backend=setup.compile_backend, dynamic=False)
    start = time.perf_counter()
    out = compiled(raw, "Q4_K", dtype)
    sync(device)
    compile_s = time.perf_counter() - start
    for name, fn in (("eager", dequantize), (f"compiled (first call {compile_s:.1f} s)", compiled)):
        times = []
        for _ in range(10):
            sync(device)
            start = time.perf_counter()
            out = fn(raw, "Q4_K", dtype)
            sync(device)
            times.append(time.perf_counter() - start)
        row(
            name,
            f"{1000 * statistics.median(times):.3f}",
            f"{(out.float() - eager.float()).abs().max().item():.3g}",
        )
    del raw, blocks, eager, out
    torch._dynamo.reset()

    size = (setup.cfg["size"],) * 2
    _, _, models = build_models(setup)
    transformer = local_speed.to_gguf(
        models.transformer.module, "Q4_K", torch.Generator(device).manual_seed(2)
    )
    header(f"GGUF Q4_K transformer, {size[0]}x{size[1]}, {setup.steps} steps", *COMPILE_COLUMNS)
    compile_row("GGUF Q4_K eager", size, None, run_ours(models, setup, size))
    whole = torch.compile(transformer, backend=setup.compile_backend)
    compile_row("GGUF Q4_K whole-model compile", size, *first_and_rest(models, setup, size, whole))


def stop_on_sigterm(signum, frame) -> None:
    """A SIGTERM (from `timeout`) unwinds like Ctrl-C: temporary folders are removed on the way out."""
    raise SystemExit(128 + signum)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=PARTS, required=True)
    parser.add_argument("--tiny", action="store_true", help=f"CPU rehearsal (also {TINY_ENV}=1)")
    parser.add_argument("--repeats", type=int, help="timed images per variant (default 2; 1 with --tiny)")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, stop_on_sigterm)
    tiny = args.tiny or os.environ.get(TINY_ENV) == "1"
    if tiny:
        setup = Setup("tiny", torch.device("cpu"), repeats=1, compile_backend="eager")
        os.environ.setdefault("FLUX_SCHNELL_FP8_MATMUL", "force")  # the CPU's _scaled_mm: the path runs
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run with --tiny (or FLUX_SCHNELL_GPU_CHECK_TINY=1) on a CPU")
        setup = Setup("schnell", torch.device("cuda"))
    if args.repeats is not None:
        setup.repeats = args.repeats
    parts = {"probe": part_probe, "headline": part_headline, "compile": part_compile}
    with tempfile.TemporaryDirectory(prefix="flux-gpu-headline-") as folder:
        setup.folder = Path(folder)
        {**parts, "gguf-compile": part_gguf_compile}[args.part](setup)


if __name__ == "__main__":
    main()
