"""Peak memory of loading a multi-GB transformer file: does loading hold a second copy?

Writes a random-weight file in the real FLUX.1 [schnell] transformer layout (real widths, fewer
blocks so that it is about --size-gb large), then loads it with `flux.loading.load_transformer` in a
fresh subprocess per case, touches every byte of every parameter, and reports the peak resident set
size (`resource.getrusage(...).ru_maxrss`, which counts the mapped file pages the process touched)
against the file size (and the same less the resident size before loading: Python +
torch). Cases: as stored (memory-mapped, zero copy), and cast at load time to fp8 and
to fp32 (read tensor by tensor).

Usage: python -m benchmarks.load_memory [--size-gb 3] [--folder DIR] [--keep]
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from comfyui_flux_schnell.flux.model import Flux, FluxParams

from tests.support.tiny_models import safetensors_header

CASES = {"as stored (mmap)": "none", "cast to fp8": "float8_e4m3fn", "cast to fp32": "float32"}


def layout(params: FluxParams) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        return {k: tuple(t.shape) for k, t in Flux(params).state_dict().items()}


def pick_params(size_gb: float, dtype: torch.dtype) -> FluxParams:
    """Real schnell widths with as many blocks (double:single = 1:2) as fit in `size_gb`."""

    def nbytes(p):
        return sum(math.prod(s) for s in layout(p).values()) * dtype.itemsize

    depth = 1
    while nbytes(FluxParams(depth=depth + 1, depth_single_blocks=2 * depth + 2)) <= size_gb * 1e9:
        depth += 1
    return FluxParams(depth=depth, depth_single_blocks=2 * depth)


def write_random(path: Path, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype) -> None:
    """A safetensors file streamed tensor by tensor (never the whole state dict in memory)."""
    head, _ = safetensors_header({key: (shape, dtype) for key, shape in shapes.items()})
    g = torch.Generator().manual_seed(0)
    with path.open("wb") as f:
        f.write(head)
        for shape in shapes.values():
            t = (torch.randn(shape, generator=g) * 0.02).to(dtype)
            f.write(t.view(torch.uint8).numpy().tobytes())


def current_rss() -> int:
    """Resident bytes now (not the peak: ru_maxrss of a child starts at its parent's at fork time)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("this benchmark reads /proc/self/status (Linux only)")


def child(path: str, weight_dtype: str) -> None:
    """Runs in the subprocess: load, touch every parameter byte, print the measurements as JSON."""
    from comfyui_flux_schnell.flux.loading import load_transformer

    before = current_rss()
    start = time.perf_counter()
    model = load_transformer(
        path, weight_dtype=None if weight_dtype == "none" else getattr(torch, weight_dtype)
    )
    loaded = time.perf_counter() - start
    for p in model.parameters():  # read every page, in 16 MiB pieces (no big temporaries)
        for piece in p.detach().reshape(-1).view(torch.uint8).split(1 << 24):
            piece.max()
    print(
        json.dumps(
            {
                "baseline": before,
                "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # Linux: KiB
                "load_s": loaded,
                "touch_s": time.perf_counter() - start - loaded,
                "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size-gb", type=float, default=3.0, help="approximate file size")
    parser.add_argument("--folder", type=Path, help="where to write the file (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the file afterwards")
    parser.add_argument("--child", nargs=2, metavar=("PATH", "WEIGHT_DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return

    folder = Path(args.folder or tempfile.mkdtemp(prefix="flux_load_memory_"))
    folder.mkdir(parents=True, exist_ok=True)
    params = pick_params(args.size_gb, torch.bfloat16)
    path = folder / "flux1-schnell-reduced_bf16.safetensors"
    start = time.perf_counter()
    write_random(path, layout(params), torch.bfloat16)
    size = path.stat().st_size
    print(
        f"wrote {path} ({size / 1e9:.2f} GB, bf16, depth {params.depth} + {params.depth_single_blocks} "
        f"single blocks at full width) in {time.perf_counter() - start:.0f} s"
    )
    try:
        print(
            f"{'case':<18} {'params GB':>9} {'peak RSS GB':>11} {'peak/file':>9} {'(peak-base)/file':>16} "
            f"{'load s':>7} {'touch s':>7}"
        )
        for name, weight_dtype in CASES.items():
            out = subprocess.run(
                [sys.executable, "-m", "benchmarks.load_memory", "--child", str(path), weight_dtype],
                cwd=Path(__file__).resolve().parent.parent,
                check=True,
                capture_output=True,
                text=True,
            )
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(
                f"{name:<18} {r['param_bytes'] / 1e9:>9.2f} {r['peak'] / 1e9:>11.2f} "
                f"{r['peak'] / size:>9.3f} "
                f"{(r['peak'] - r['baseline']) / size:>16.3f} {r['load_s']:>7.2f} {r['touch_s']:>7.2f}"
            )
    finally:
        if not args.keep:
            path.unlink()


if __name__ == "__main__":
    main()
