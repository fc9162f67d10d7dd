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

Configs: `small` (default; hidden 768, 6 heads of 128, 4 double + 8 single blocks, 1024 image + 256
text tokens, batch 1), and with `--device cuda` also `schnell` (full size, bf16 weights, 1024x1024 =
4096 image + 256 text tokens). Run: `python -m benchmarks.local_speed [--device cuda] [--threads 2]`.
"""

from __future__ import annotations

import argparse
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
    "schnell": (dict(), (64, 64), 256, "bfloat16"),
}


def build(kind: str, config: str, device: str) -> tuple[torch.nn.Module, dict]:
    """The named model with seeded random weights (identical for both kinds), and its inputs."""
    from comfyui_flux_schnell.flux.model import Flux, FluxParams

    overrides, (rows, cols), txt_len, dtype_name = CONFIGS[config]
    dtype = getattr(torch, dtype_name)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument(
        "--config", choices=sorted(CONFIGS), action="append", help="default: small (and schnell on cuda)"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5, help="timed forwards per model; 0: memory only")
    parser.add_argument("--worker", choices=["time", "ours", "diffusers"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        (config,) = args.config
        if args.worker == "time":
            result = worker_time(config, args.device, args.warmup, args.repeats)
        else:
            result = worker_memory(args.worker, config, args.device)
        print(json.dumps(result))
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    configs = args.config or (["small", "schnell"] if args.device == "cuda" else ["small"])
    print(f"torch {torch.__version__}, diffusers {__import__('diffusers').__version__}")
    for config in configs:
        report(config, args.device, args.threads, args.warmup, args.repeats)


if __name__ == "__main__":
    main()
