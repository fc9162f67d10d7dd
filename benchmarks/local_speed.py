"""Speed and peak memory of this package's `Flux` against diffusers' `FluxTransformer2DModel`.

Both models get the same random weights (ours in the BFL layout, diffusers' through
tests/support/diffusers_flux_convert.py) and the same seeded inputs, and run under `torch.inference_mode()`.

Method:
- time: one worker process builds both models and alternates them (A B A B ...) so that load from
  other processes hits both alike; after warm-up, the median of `--repeats` forwards is reported
  (CUDA: synchronized before and after each forward). The worker also reports max|ours - diffusers|.
- memory: a fresh worker process per model. After building and one warm-up forward it records the
  resident memory, runs one more forward and reports the peak above that baseline ("activations"),
  next to the parameter bytes.
  * CPU: glibc would keep freed blocks in its heap and hide later peaks, so workers run with
    MALLOC_MMAP_THRESHOLD_=65536 (every block >= 64 KiB is its own mmap, returned on free, so RSS
    follows the live tensors). The peak is VmHWM from /proc/self/status after resetting it by
    writing "5" to /proc/self/clear_refs; the baseline is VmRSS just before the forward.
  * CUDA: torch.cuda.reset_peak_memory_stats(), then max_memory_allocated() minus
    memory_allocated() before the forward; the total max_memory_allocated() is shown as well.

LoRA overhead (`--part lora`, also part of the default `all`): one worker builds our model and a
LoRA of rank 16 and one of rank 64 on every Linear layer (random factors, kohya names, applied by
`flux.lora.apply_loras` as run-time updates), and alternates no LoRA / rank 16 / rank 64 forwards
the same way; it reports the median s/forward of each, the ratio to no LoRA, the bytes of the
updates and the seconds `apply_loras` took (what changing a LoRA or its strength costs).
`lora_overhead(config, device, ...)` returns the numbers, `report_lora` prints the table.

Configs: `small` (default; hidden 768, 6 heads of 128, 4 double + 8 single blocks, 1024 image + 256
text tokens, batch 1), `wide` (FLUX.1's widths, 1 double + 2 single blocks, 512 + 64 tokens), and
with `--device cuda` also `schnell` (full size, bf16 weights, 1024x1024 = 4096 image + 256 text
tokens). Run: `python -m benchmarks.local_speed [--device cuda] [--threads 2] [--config NAME]
[--part all|compare|lora]`.

`--gguf` instead times our `Flux` with its matrices stored as GGUF blocks (Q8_0, Q4_K) against the
same model with bf16 weights, in one worker alternating the three (A B C A B C ...): the cost of
dequantizing every layer's weight at each forward (compute dtype fp32 on the CPU, where bf16
weights are cast to fp32 at each forward too; bf16 on CUDA). Every matrix whose rows split into
whole blocks is stored in the type (city96's files keep `img_in`, `txt_in`, `time_in`, `vector_in`
and `final_layer` unquantized; so does this), with random block bytes whose scales give weights of
about 1/sqrt(fan_in): the speed does not depend on the values. It also reports the time to
dequantize all those weights once, outside a forward.

Each GGUF type runs twice on the same blocks: "after" with this package's decoder (written straight in
the compute dtype, `flux.gguf_quants.dequantize`), and "before" with the decode as it was before
issue 17, a benchmark-side reference only: `benchmarks.dequant_cost.before` (decode in fp32, then cast
to the compute dtype) put in place of `flux.ops`' decoder while those forwards run (`decoded_as_before`).
In fp32 compute (the CPU default) the two are the same operations, so compare them with
`--compute bf16`. Kernels per layer call are the non-view aten ops of one GGUF `Linear` call (decode,
cast, matrix product, bias) on a one-token input, averaged over the model's GGUF layers, counted with
`dequant_cost.OpCounter`: on the CPU and, for "after", on the meta device (the GPU's path, where the
byte fields stay views; the old decoders copied them on every device, so "before" counts the same).
Run: `python -m benchmarks.local_speed --gguf [--device cuda] [--config small|schnell] [--compute bf16]`.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent  # workers run as `python -m benchmarks.local_speed` here

CONFIGS = {
    # name: (FluxParams overrides, image grid (rows, cols), text tokens, dtype)
    "tiny": (
        dict(hidden_size=128, num_heads=2, depth=2, depth_single_blocks=2, axes_dim=(16, 24, 24)),
        (16, 16),
        64,
        "float32",
    ),
    "small": (dict(hidden_size=768, num_heads=6, depth=4, depth_single_blocks=8), (32, 32), 256, "float32"),
    # FLUX.1's layer widths (3072, MLP 12288) with 1 double + 2 single blocks: per-layer costs as at full size
    "wide": (dict(depth=1, depth_single_blocks=2), (16, 32), 64, "float32"),
    "schnell": (dict(), (64, 64), 256, "bfloat16"),
}


def build(kind: str, config: str, device: str, dtype_name: str | None = None) -> tuple[torch.nn.Module, dict]:
    """The named model with seeded random weights (identical for both kinds), and its inputs;
    `dtype_name` overrides the config's dtype."""
    from comfyui_flux_schnell.flux.model import Flux, FluxParams

    overrides, (rows, cols), txt_len, config_dtype = CONFIGS[config]
    dtype = getattr(torch, dtype_name or config_dtype)
    params = FluxParams(**overrides)
    with torch.device("meta"):
        ours = Flux(params)
    gen = torch.Generator(device).manual_seed(0)
    weights = {}
    for (
        name,
        meta,
    ) in ours.state_dict().items():  # N(0, 1/fan_in) weights, 0.1*N biases, 1+0.2*N norm scales
        t = torch.randn(meta.shape, generator=gen, device=device, dtype=torch.float32)
        t = 1 + 0.2 * t if name.endswith(".scale") else t * (0.1 if meta.ndim == 1 else meta.shape[1] ** -0.5)
        weights[name] = t.to(dtype)
        del t
    if kind == "ours":
        model = ours
        model.load_state_dict(weights, assign=True, strict=True)
    else:
        from diffusers import FluxTransformer2DModel

        from tests.support.diffusers_flux_convert import bfl_to_diffusers, diffusers_config

        with torch.device("meta"):
            model = FluxTransformer2DModel(**diffusers_config(params))
        model.load_state_dict(bfl_to_diffusers(weights), assign=True, strict=True)
    del weights
    model.eval()

    gen = torch.Generator("cpu").manual_seed(1)
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    inputs = dict(
        img=torch.randn(1, rows * cols, params.in_channels, generator=gen),
        txt=torch.randn(1, txt_len, params.context_in_dim, generator=gen),
        y=torch.randn(1, params.vec_in_dim, generator=gen),
        t=torch.tensor([0.75]),
        img_ids=torch.stack((torch.zeros_like(r), r, c), -1).view(-1, 3).float(),  # (N, 3)
        txt_ids=torch.zeros(txt_len, 3),
    )
    inputs = {
        k: v.to(device=device, dtype=dtype if k in ("img", "txt", "y") else None) for k, v in inputs.items()
    }
    return model, inputs


def forward(kind: str, model: torch.nn.Module, x: dict) -> torch.Tensor:
    if kind == "ours":
        return model(x["img"], x["img_ids"][None], x["txt"], x["txt_ids"][None], x["t"], x["y"])
    return model(
        hidden_states=x["img"],
        encoder_hidden_states=x["txt"],
        pooled_projections=x["y"],
        timestep=x["t"],
        img_ids=x["img_ids"],
        txt_ids=x["txt_ids"],
        return_dict=False,
    )[0]


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def proc_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def worker_time(config: str, device: str, warmup: int, repeats: int) -> dict:
    models = {kind: build(kind, config, device) for kind in ("ours", "diffusers")}
    times: dict[str, list[float]] = {kind: [] for kind in models}
    cpu: dict[str, list[float]] = {kind: [] for kind in models}  # CPU seconds of all threads
    outs = {}
    with torch.inference_mode():
        for i in range(warmup + repeats):
            for kind, (model, x) in models.items():
                sync(device)
                start, start_cpu = time.perf_counter(), time.process_time()
                outs[kind] = forward(kind, model, x)
                sync(device)
                if i >= warmup:
                    times[kind].append(time.perf_counter() - start)
                    cpu[kind].append(time.process_time() - start_cpu)
    diff = (outs["ours"].float() - outs["diffusers"].float()).abs().max().item()
    out_max = outs["diffusers"].float().abs().max().item()
    return dict(times=times, cpu=cpu, max_abs_diff=diff, out_max=out_max)


LORA_RANKS = (16, 64)


def random_lora_for(model: torch.nn.Module, rank: int, seed: int):
    """A LoRA (flux.lora.LoRA, in memory, on the CPU as read from a file) of `rank` on every Linear
    layer of `model`, in kohya names: down ~ N/sqrt(in), up ~ 0.01 N (stored bf16, as most are)."""
    from comfyui_flux_schnell.flux import lora as flux_lora
    from comfyui_flux_schnell.flux.ops import Linear

    gen = torch.Generator("cpu").manual_seed(seed)
    modules = {}
    for name, layer in model.named_modules():
        if isinstance(layer, Linear):
            down = torch.randn(rank, layer.in_features, generator=gen) * layer.in_features**-0.5
            up = 0.01 * torch.randn(layer.out_features, rank, generator=gen)
            modules[f"lora_unet_{name.replace('.', '_')}"] = flux_lora.LoRAModule(
                down.to(torch.bfloat16), up.to(torch.bfloat16)
            )
    return flux_lora.LoRA(path=Path(f"random-rank-{rank}.safetensors"), modules=modules, metadata={})


def lora_overhead(config: str, device: str, warmup: int = 1, repeats: int = 5) -> dict:
    """Seconds per forward of our model with no LoRA and with a LoRA of each rank in LORA_RANKS on
    every Linear layer (alternated, medians), the LoRAs' bytes on the device, and apply seconds."""
    from comfyui_flux_schnell.flux import lora as flux_lora

    model, x = build("ours", config, device)
    dtype = x["img"].dtype
    networks = {"transformer": model}
    variants: dict[str, dict] = {"none": {}}
    info = {"none": dict(layers=0, bytes=0, apply_s=0.0)}
    for i, rank in enumerate(LORA_RANKS):
        lora = random_lora_for(model, rank, seed=10 + i)
        sync(device)
        start = time.perf_counter()
        layers = flux_lora.apply_loras(networks, [(lora, 1.0)], dtype)
        sync(device)
        apply_s = time.perf_counter() - start
        variants[f"rank {rank}"] = {
            name: layer.lora
            for name, layer in model.named_modules()
            if getattr(layer, "lora", None) is not None
        }
        info[f"rank {rank}"] = dict(
            layers=layers, bytes=sum(a.nbytes for a in variants[f"rank {rank}"].values()), apply_s=apply_s
        )
        flux_lora.remove_loras(networks)
        del lora
    layers_by_name = dict(model.named_modules())
    times: dict[str, list[float]] = {name: [] for name in variants}
    cpu: dict[str, list[float]] = {name: [] for name in variants}  # CPU seconds of all threads
    with torch.inference_mode():
        for i in range(warmup + repeats):
            for name, adapters in variants.items():
                flux_lora.remove_loras(networks)
                for layer_name, adapter in adapters.items():
                    layers_by_name[layer_name].lora = adapter
                sync(device)
                start, start_cpu = time.perf_counter(), time.process_time()
                forward("ours", model, x)
                sync(device)
                if i >= warmup:
                    times[name].append(time.perf_counter() - start)
                    cpu[name].append(time.process_time() - start_cpu)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return dict(times=times, cpu=cpu, info=info, param_bytes=param_bytes)


def report_lora(config: str, device: str, threads: int, warmup: int, repeats: int) -> dict:
    """Print the LoRA overhead table of one config (measured in a worker process); returns its data."""
    args = ["--worker", "lora", "--config", config, "--device", device]
    result = run_worker([*args, "--warmup", str(warmup), "--repeats", str(max(repeats, 1))], threads)
    overrides, (rows, cols), txt_len, dtype = CONFIGS[config]
    where = f"{device}, {threads} threads" if device == "cpu" else device
    print(
        f"\n## LoRA overhead, {config}: {overrides or 'full FLUX.1-schnell'}, {rows * cols} image + "
        f"{txt_len} text tokens, {dtype}, {where}; weights {mib(result['param_bytes'])}\n"
    )
    print(
        "| LoRA | layers | median s/forward | / no LoRA | min s/forward | / no LoRA | median CPU s/forward "
        "| / no LoRA | update bytes | apply s |\n" + "| --- " * 10 + "|"
    )
    base = statistics.median(result["times"]["none"])
    base_min = min(result["times"]["none"])
    base_cpu = statistics.median(result["cpu"]["none"])
    for name, ts in result["times"].items():
        i = result["info"][name]
        med, best, med_cpu = statistics.median(ts), min(ts), statistics.median(result["cpu"][name])
        apply_s = f"{i['apply_s']:.3f}" if name != "none" else "-"
        print(
            f"| {name} | {i['layers']} | {med:.3f} | {med / base:.3f} | {best:.3f} | {best / base_min:.3f} "
            f"| {med_cpu:.3f} | {med_cpu / base_cpu:.3f} | {mib(i['bytes'])} | {apply_s} |"
        )
    for name, ts in result["times"].items():
        print(f"\n{name} runs (s): " + ", ".join(f"{t:.3f}" for t in ts), end="")
    print()
    return result


def worker_memory(kind: str, config: str, device: str) -> dict:
    model, x = build(kind, config, device)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    with torch.inference_mode():
        forward(kind, model, x)  # warm-up: one-time allocations (kernels, thread pools) are not counted
        sync(device)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            out = forward(kind, model, x)
            sync(device)
            peak = torch.cuda.max_memory_allocated()
            return dict(params=param_bytes, activations=peak - base, total=peak, out_bytes=out.nbytes)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        base = proc_kib("VmRSS")
        out = forward(kind, model, x)
        peak = proc_kib("VmHWM")
    return dict(
        params=param_bytes,
        activations=(peak - base) * 1024,
        total=peak * 1024,
        out_bytes=out.nbytes,
    )


# --- GGUF: dequantization overhead ---------------------------------------------------------------

GGUF_TYPES = ("Q8_0", "Q4_K")
UNQUANTIZED = ("img_in", "txt_in", "time_in", "vector_in", "final_layer")
# per type: byte offset of each fp16 scale field in a block -> its value x sqrt(fan_in) (about
# 1 / the typical |integer part| of a value, so that the weights come out near 1/sqrt(fan_in))
SCALE_FIELDS = {"Q8_0": {0: 1 / 64}, "Q4_K": {0: 1 / 240, 2: 7.5 / 240}}


def to_gguf(model: torch.nn.Module, type_name: str, gen: torch.Generator) -> torch.nn.Module:
    """`model` with its matrices (those whose rows split into whole blocks, outside `UNQUANTIZED`)
    replaced, in place, by random `type_name` blocks."""
    from comfyui_flux_schnell.flux import ops
    from comfyui_flux_schnell.flux.gguf_quants import GGML_TYPES
    from comfyui_flux_schnell.flux.stored_layers import make_gguf_layer

    t = GGML_TYPES[type_name]
    for name, layer in model.named_modules():
        if not isinstance(layer, ops.Linear) or name.split(".")[0] in UNQUANTIZED:
            continue
        rows, cols = layer.weight.shape
        if cols % t.block_size:
            continue
        device = layer.weight.device
        nbytes = cols // t.block_size * t.type_size
        raw = torch.randint(0, 256, (rows, nbytes), dtype=torch.uint8, generator=gen, device=device)
        blocks = raw.view(-1, t.type_size)  # (rows * blocks per row, type_size)
        for offset, factor in SCALE_FIELDS[type_name].items():
            d = torch.full((blocks.shape[0],), factor * cols**-0.5, dtype=torch.float16, device=device)
            blocks[:, offset : offset + 2] = d.view(torch.uint8).view(-1, 2)
        make_gguf_layer(layer, type_name, (rows, cols), raw)
    return model


COMPUTE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DECODES = ("before", "after")


@contextlib.contextmanager
def decoded_as_before():
    """`flux.ops` decodes GGUF weights the old way while the `with` body runs: in fp32, then cast to the
    compute dtype (`dequant_cost.before`). A benchmark-side reference; the package is not changed."""
    from comfyui_flux_schnell.flux import ops

    from benchmarks import dequant_cost

    current = ops.dequantize
    ops.dequantize = dequant_cost.before  # same signature: (raw, type name, dtype)
    try:
        yield
    finally:
        ops.dequantize = current


def decoding(way: str):
    return decoded_as_before() if way == "before" else contextlib.nullcontext()


def kernels_per_layer_call(model: torch.nn.Module, compute: torch.dtype, way: str, device: str) -> float:
    """Non-view aten ops of one call of each GGUF `Linear` of `model` (one token in), averaged."""
    from comfyui_flux_schnell.flux import ops

    from benchmarks.dequant_cost import OpCounter

    layers = [m for m in model.modules() if isinstance(m, ops.Linear) and m.gguf_type]
    counts = []
    # no_grad, not inference_mode: under inference_mode composite ops (`to`, `linear`) reach the
    # counter whole, a no-op `.to` counted as a kernel; with autograd's keys they decompose first
    with torch.no_grad(), decoding(way):
        for layer in layers:
            if device == "meta":
                layer = copy.deepcopy(layer).to("meta")
            x = torch.zeros(1, layer.in_features, dtype=compute, device=layer.weight.device)
            with OpCounter() as counter:
                layer(x)
            counts.append(counter.kernels)
    return statistics.mean(counts)


def worker_gguf(config: str, device: str, warmup: int, repeats: int, compute_name: str | None = None) -> dict:
    """Forward times of the bf16 model and its GGUF twins (each decoded before and after), alternated;
    dequantization alone; kernels per GGUF layer call."""
    from comfyui_flux_schnell.flux import ops

    default = torch.float32 if device == "cpu" else torch.bfloat16
    compute = COMPUTE_DTYPES[compute_name] if compute_name else default
    gen = torch.Generator(device).manual_seed(2)
    models = {}
    for form in ("bf16", *GGUF_TYPES):
        model, x = build("ours", config, device, dtype_name="bfloat16")
        models[form] = to_gguf(model, form, gen) if form in GGUF_TYPES else model
    x = {k: v.to(compute) if k in ("img", "txt", "y") else v for k, v in x.items()}
    runs = [("bf16", "after"), *((form, way) for form in GGUF_TYPES for way in DECODES)]
    label = {run: run[0] if run[0] == "bf16" else f"{run[0]} {run[1]}" for run in runs}
    times: dict[str, list[float]] = {label[run]: [] for run in runs}
    dequant: dict[str, list[float]] = {label[run]: [] for run in runs if run[0] in GGUF_TYPES}
    like = torch.empty(0, dtype=compute, device=device)
    with torch.inference_mode():
        for i in range(warmup + repeats):
            for form, way in runs:
                with decoding(way):
                    sync(device)
                    start = time.perf_counter()
                    forward("ours", models[form], x)
                    sync(device)
                if i >= warmup:
                    times[label[form, way]].append(time.perf_counter() - start)
            for form, way in runs[1:]:  # every quantized weight once, as a forward dequantizes them
                layers = [m for m in models[form].modules() if isinstance(m, ops.Linear) and m.gguf_type]
                with decoding(way):
                    sync(device)
                    start = time.perf_counter()
                    for layer in layers:
                        ops.compute_weight(layer, like)
                    sync(device)
                if i >= warmup:
                    dequant[label[form, way]].append(time.perf_counter() - start)
    kernels = {
        label[form, way]: kernels_per_layer_call(models[form], compute, way, device) for form, way in runs[1:]
    }
    gpu_path = {
        label[form, "after"]: kernels_per_layer_call(models[form], compute, "after", "meta")
        for form in GGUF_TYPES
    }
    weight_bytes = {
        form: sum(t.numel() * t.element_size() for t in model.parameters()) for form, model in models.items()
    }
    return dict(
        times=times,
        dequant=dequant,
        kernels=kernels,
        kernels_gpu_path=gpu_path,
        weight_bytes=weight_bytes,
        compute=str(compute),
    )


def report_gguf(
    config: str, device: str, threads: int, warmup: int, repeats: int, compute_name: str | None = None
) -> None:
    args = ["--worker", "gguf", "--config", config, "--device", device]
    if compute_name:
        args += ["--compute", compute_name]
    result = run_worker([*args, "--warmup", str(warmup), "--repeats", str(max(repeats, 1))], threads)
    med = {form: statistics.median(ts) for form, ts in result["times"].items()}
    once = {form: statistics.median(ts) for form, ts in result["dequant"].items()}
    overrides, (rows, cols), txt_len, _ = CONFIGS[config]
    where = f"{device}, {threads} threads" if device == "cpu" else device
    print(
        f"\n## GGUF, {config}: {overrides or 'full FLUX.1-schnell'}, {rows * cols} image + {txt_len} text "
        f"tokens, batch 1, compute {result['compute'].removeprefix('torch.')}, {where}\n"
    )
    print(
        "| weights | s/forward before | after | after / before | after / bf16 "
        "| kernels per layer call before | after | after, GPU path "
        "| dequantizing all weights once, s, before | after | weight bytes |\n"
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    )
    bf16 = med["bf16"]
    bf16_bytes = mib(result["weight_bytes"]["bf16"])
    print(f"| bf16 | - | {bf16:.3f} | - | 1.000 | - | - | - | - | - | {bf16_bytes} |")
    for form in GGUF_TYPES:
        old, new = f"{form} before", f"{form} after"
        print(
            f"| {form} | {med[old]:.3f} | {med[new]:.3f} | {med[new] / med[old]:.3f} | {med[new] / bf16:.3f} "
            f"| {result['kernels'][old]:.1f} | {result['kernels'][new]:.1f} "
            f"| {result['kernels_gpu_path'][new]:.1f} "
            f"| {once[old]:.3f} | {once[new]:.3f} | {mib(result['weight_bytes'][form])} |"
        )
    for form, ts in result["times"].items():
        print(f"\n{form} runs (s): " + ", ".join(f"{t:.3f}" for t in ts), end="")
    print()


def run_worker(args: list[str], threads: int) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "benchmarks.local_speed", "--threads", str(threads), *args]
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"worker {' '.join(args)} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def report(config: str, device: str, threads: int, warmup: int, repeats: int) -> None:
    common = ["--config", config, "--device", device]
    memory = {kind: run_worker(["--worker", kind, *common], threads) for kind in ("ours", "diffusers")}
    if repeats == 0:  # memory only
        nan = {k: [math.nan] for k in memory}
        timing = dict(times=nan, cpu=nan, max_abs_diff=math.nan, out_max=math.nan)
    else:
        timing_args = [
            "--worker",
            "time",
            *common,
            "--warmup",
            str(warmup),
            "--repeats",
            str(repeats),
        ]
        timing = run_worker(timing_args, threads)
    med = {kind: statistics.median(ts) for kind, ts in timing["times"].items()}
    best = {kind: min(ts) for kind, ts in timing["times"].items()}
    cpu = {kind: statistics.median(ts) for kind, ts in timing["cpu"].items()}
    overrides, (rows, cols), txt_len, dtype = CONFIGS[config]
    where = f"{device}, {threads} threads" if device == "cpu" else device
    print(
        f"\n## {config}: {overrides or 'full FLUX.1-schnell'}, {rows * cols} image + {txt_len} text "
        f"tokens, batch 1, {dtype}, {where}"
    )
    print(f"max|ours - diffusers| = {timing['max_abs_diff']:.3g} (outputs up to {timing['out_max']:.3g})\n")
    print(
        "| model | median s/forward | min s/forward | median CPU s/forward | params | activation peak "
        "| total peak |\n| --- | --- | --- | --- | --- | --- | --- |"
    )
    for kind in ("ours", "diffusers"):
        m = memory[kind]
        print(
            f"| {kind} | {med[kind]:.3f} | {best[kind]:.3f} | {cpu[kind]:.3f} | {mib(m['params'])} "
            f"| {mib(m['activations'])} | {mib(m['total'])} |"
        )
    ours, theirs = memory["ours"], memory["diffusers"]
    print(
        f"| ours / diffusers | {med['ours'] / med['diffusers']:.3f} "
        f"| {best['ours'] / best['diffusers']:.3f} "
        f"| {cpu['ours'] / cpu['diffusers']:.3f} | {ours['params'] / theirs['params']:.3f} "
        f"| {ours['activations'] / max(theirs['activations'], 1):.3f} "
        f"| {ours['total'] / theirs['total']:.3f} |"
    )
    for kind in ("ours", "diffusers"):
        print(f"\n{kind} runs (s): " + ", ".join(f"{t:.3f}" for t in timing["times"][kind]), end="")
    print()
    if repeats and not math.isfinite(timing["max_abs_diff"]):
        print("warning: non-finite outputs")


def diffusers_version() -> str:
    """diffusers' version from its metadata, without importing it ("not installed" without it)."""
    from importlib import metadata

    try:
        return metadata.version("diffusers")
    except metadata.PackageNotFoundError:
        return "not installed"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument(
        "--config", choices=sorted(CONFIGS), action="append", help="default: small (and schnell on cuda)"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5, help="timed forwards per model; 0: memory only")
    parser.add_argument(
        "--part",
        choices=["all", "compare", "lora"],
        default="all",
        help="ours vs diffusers, LoRA overhead, or both",
    )
    parser.add_argument("--gguf", action="store_true", help="time GGUF Q8_0 / Q4_K weights against bf16")
    parser.add_argument(
        "--compute",
        choices=sorted(COMPUTE_DTYPES),
        help="--gguf: the compute dtype (default fp32 on the CPU, bf16 on CUDA)",
    )
    parser.add_argument(
        "--worker", choices=["time", "gguf", "ours", "diffusers", "lora"], help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        (config,) = args.config
        if args.worker == "time":
            result = worker_time(config, args.device, args.warmup, args.repeats)
        elif args.worker == "lora":
            result = lora_overhead(config, args.device, args.warmup, args.repeats)
        elif args.worker == "gguf":
            result = worker_gguf(config, args.device, args.warmup, args.repeats, args.compute)
        else:
            result = worker_memory(args.worker, config, args.device)
        print(json.dumps(result))
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    configs = args.config or (["small", "schnell"] if args.device == "cuda" else ["small"])
    if args.gguf:
        print(f"torch {torch.__version__}")
        for config in configs:
            report_gguf(config, args.device, args.threads, args.warmup, args.repeats, args.compute)
        return
    print(f"torch {torch.__version__}, diffusers {diffusers_version()}")
    for config in configs:
        if args.part in ("all", "compare"):
            report(config, args.device, args.threads, args.warmup, args.repeats)
        if args.part in ("all", "lora"):
            report_lora(config, args.device, args.threads, args.warmup, args.repeats)


if __name__ == "__main__":
    main()
