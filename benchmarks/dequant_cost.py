"""Cost of decoding one GGUF weight for a layer call: kernels, bytes of memory traffic per weight,
and CPU time, before (decode in fp32, then cast: the decoders up to the compute-dtype change) and
after (`dequantize(raw, type, bf16)`: written straight in bf16).

- kernels: the non-view aten ops one decode dispatches (counted with a TorchDispatchMode), on the CPU
  (contiguous byte fields) and on meta, which takes the path of a GPU (byte fields as views);
- bytes/weight: the bytes each of those ops reads and writes (its tensor inputs and outputs), summed,
  per weight value (before: the old ops, field copies included; after: the GPU path): a roofline
  proxy, since every element-wise op is memory-bound;
- CPU ms: median of `--repeats` decodes on this machine's CPU (`--threads`).

"before" is `dequantize(raw, type, torch.float32).to(torch.bfloat16)`: the fp32 decoders are the
same operations as before the change (bit-identical results), and the CPU keeps their contiguous
field copies, so its kernel count and time are those of the old bf16 path (the old decoders copied
the fields on every device, so its CPU count is also its GPU count).

Run: `python -m benchmarks.dequant_cost [--rows 3072 --cols 12288] [--repeats 5] [--threads 2]`.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from comfyui_flux_schnell.flux.gguf_quants import BLOCK_TYPES, GGML_TYPES, dequantize
from torch.utils._python_dispatch import TorchDispatchMode

TYPES = ("Q8_0", "Q4_0", "Q5_0", "Q4_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
VIEWS = {
    "view",
    "_unsafe_view",
    "split",
    "split_with_sizes",
    "slice",
    "unsqueeze",
    "reshape",
    "alias",
    "t",
    "expand",
    "unbind",
    "select",
    "as_strided",
    "permute",
    "squeeze",
    "detach",
    "lift_fresh",
}


class OpCounter(TorchDispatchMode):
    """Counts non-view ops and the bytes their tensor inputs and outputs hold."""

    def __init__(self):
        super().__init__()
        self.kernels = 0
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket.__name__ not in VIEWS:
            self.kernels += 1
            flat = [*args, *(kwargs or {}).values(), *(out if isinstance(out, (tuple, list)) else [out])]
            self.bytes += sum(t.numel() * t.element_size() for t in flat if isinstance(t, torch.Tensor))
        return out


def before(raw: torch.Tensor, name: str, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The old decode: in fp32, then cast to `dtype` (also `benchmarks.local_speed --gguf`'s "before")."""
    return dequantize(raw, name, torch.float32).to(dtype)


def after(raw: torch.Tensor, name: str) -> torch.Tensor:
    return dequantize(raw, name, torch.bfloat16)


def counted(fn, raw: torch.Tensor, name: str) -> OpCounter:
    with OpCounter() as counter:
        fn(raw, name)
    return counter


def cpu_ms(fn, raw: torch.Tensor, name: str, repeats: int) -> float:
    fn(raw, name)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(raw, name)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=3072)
    parser.add_argument("--cols", type=int, default=12288)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    values = args.rows * args.cols
    print(f"\n## One ({args.rows}, {args.cols}) weight decoded to bf16, CPU {args.threads} threads\n")
    print(
        "| type | kernels before | after, CPU | after, GPU path | bytes/weight before | after (GPU path) "
        "| CPU ms before | after | after / before |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        flush=True,
    )
    gen = torch.Generator().manual_seed(0)
    for name in TYPES:
        assert name in BLOCK_TYPES
        shape = GGML_TYPES[name].byte_shape((args.rows, args.cols))
        raw = torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen)
        blocks = raw.view(-1, GGML_TYPES[name].type_size)
        blocks[:, :2] = torch.tensor([0x00, 0x20], dtype=torch.uint8)  # finite fp16 scales (2^-7)
        if name in ("Q2_K", "Q3_K", "Q6_K"):  # their fp16 d sits at the end of the block
            blocks[:, -2:] = torch.tensor([0x00, 0x20], dtype=torch.uint8)
        meta = raw.to("meta")
        old_cpu, new_cpu, new_meta = (
            counted(before, raw, name),
            counted(after, raw, name),
            counted(after, meta, name),
        )
        t_old, t_new = cpu_ms(before, raw, name, args.repeats), cpu_ms(after, raw, name, args.repeats)
        print(
            f"| {name} | {old_cpu.kernels} | {new_cpu.kernels} | {new_meta.kernels} "
            f"| {old_cpu.bytes / values:.1f} | {new_meta.bytes / values:.1f} "
            f"| {t_old:.1f} | {t_new:.1f} | {t_new / t_old:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
