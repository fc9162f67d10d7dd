"""Every device path of the local backend, once, through the product's own entry point.

`generate_local` runs on weight files written here with seeded random values in the real layouts
(none can be downloaded): each weight dtype ("as stored" bf16, "fp8_e4m3fn"), GGUF Q4_K files for
the transformer and T5, a LoRA on the bf16 and on the GGUF base, each memory choice ("auto",
"keep on GPU", "offload to CPU", "free after run"), `torch.compile`, and the out-of-memory message
(the device's memory capped with `torch.cuda.set_per_process_memory_fraction`). Each row is one
case: its status, the second run's seconds, the first run's (loading or compiling) and the peak
device memory of the run (`peak_memory_gib` of the node's `info`, CUDA only). Random weights make
noise images: this checks that the paths run and what they cost, not what they draw.

    python -m benchmarks.gpu_paths                                  # CUDA, full width, reduced depth
    python -m benchmarks.gpu_paths --config tiny --device cpu       # the script itself, any machine

The default config `reduced` has FLUX.1's and T5-XXL's widths with 1 double + 2 single blocks and 2
T5 layers (full CLIP-L and autoencoder): about 3.5 GB of files, written in seconds, where the full
size would write 43.5 GB. Each layer's cost and every device path are as at full size. A SIGTERM
(a `timeout`) ends the run like Ctrl-C: the temporary files are removed and the table of the cases
measured so far is printed.

The speed of the same pipeline against diffusers' FluxPipeline is `benchmarks.local_pipeline`;
`benchmarks/gpu_check.sh` runs both, with the other CUDA checks.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import signal
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from comfyui_flux_schnell import local_backend
from comfyui_flux_schnell.comfy_bridge import Progress
from comfyui_flux_schnell.errors import FluxSchnellError, OutOfMemoryError
from comfyui_flux_schnell.flux.autoencoder import AutoEncoder
from comfyui_flux_schnell.flux.clip import CLIPTextEncoder
from comfyui_flux_schnell.flux.gguf_quants import GGML_TYPES
from comfyui_flux_schnell.flux.model import Flux, FluxParams
from comfyui_flux_schnell.flux.t5 import T5Config, T5Encoder
from comfyui_flux_schnell.generation import GenerationRequest
from comfyui_flux_schnell.local.files import LocalModelSpec

from benchmarks.local_pipeline import CONFIGS, PROMPT

GIB = 2**30
# full width, reduced depth: every layer as at full size, a few GB of files instead of 43.5 GB
CONFIGS = {
    **CONFIGS,
    "reduced": {
        **CONFIGS["schnell"],
        "flux": FluxParams(depth=1, depth_single_blocks=2),
        "t5": T5Config(num_layers=2),
    },
}
# The dtypes of the official files (flux1-schnell, t5xxl_fp16, clip_l, ae); bf16 stands in for the
# T5's fp16 so that one file serves CPU and GPU alike.
STORED = {"transformer": torch.bfloat16, "t5": torch.bfloat16, "clip": torch.float16, "ae": torch.float32}
NETWORKS = {"transformer": Flux, "t5": T5Encoder, "clip": CLIPTextEncoder, "ae": AutoEncoder}
CONFIG_KEYS = {"transformer": "flux", "t5": "t5", "clip": "clip", "ae": "ae"}
# GGUF: matrices in Q4_K (city96 keeps the embedders and the final layer in F16, vectors in F32);
# per block, the fp16 scale fields (byte offset -> value x sqrt(fan_in)) that give weights ~1/sqrt(fan_in)
GGUF_TYPE = "Q4_K"
GGUF_SCALE_FIELDS = {0: 1 / 240, 2: 7.5 / 240}
GGUF_UNQUANTIZED = ("img_in.", "txt_in.", "time_in.", "vector_in.", "final_layer.")
LORA_RANK = 16
# what a failing case may raise (ours, torch's, and Python's for a wrong argument), reported as its row
CASE_ERRORS = (FluxSchnellError, RuntimeError, ValueError, TypeError, OSError, AssertionError)


@dataclass
class Row:
    case: str
    status: str = "not run"
    first_s: float = float("nan")
    second_s: float = float("nan")
    peak_gib: float | None = None
    note: str = ""


# --- random weight files -------------------------------------------------------------------------


def random_state(name: str, config, device: torch.device, seed: int) -> dict[str, torch.Tensor]:
    """Seeded values for every tensor of network `name` (N(0, 1/fan_in) matrices, norm scales near 1,
    small biases), generated on `device` one tensor at a time and kept on the CPU."""
    with torch.device("meta"):
        shapes = {k: t.shape for k, t in NETWORKS[name](config).state_dict().items()}
    gen = torch.Generator(device).manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        t = torch.randn(shape, generator=gen, device=device)
        if len(shape) == 1:
            t = 1 + 0.1 * t if ("norm" in key or key.endswith(".scale")) else 0.02 * t
        else:
            t = t * (shape[1:].numel() ** -0.5)
        state[key] = t.to(STORED[name]).cpu()
    return state


def write_safetensors(path: Path, state: dict[str, torch.Tensor]) -> Path:
    from safetensors.torch import save_file

    save_file(state, str(path))
    return path


def random_gguf_bytes(rows: int, cols: int, gen: torch.Generator) -> np.ndarray:
    """(rows, bytes per row) of valid Q4_K blocks: random bits, finite fp16 scales."""
    t = GGML_TYPES[GGUF_TYPE]
    raw = torch.randint(0, 256, (rows, cols // t.block_size * t.type_size), dtype=torch.uint8, generator=gen)
    blocks = raw.view(-1, t.type_size)  # (rows * blocks per row, type_size)
    for offset, factor in GGUF_SCALE_FIELDS.items():
        d = torch.full((blocks.shape[0],), factor * cols**-0.5, dtype=torch.float16)
        blocks[:, offset : offset + 2] = d.view(torch.uint8).view(-1, 2)
    return raw.numpy()


def write_gguf(path: Path, state: dict[str, torch.Tensor], arch: str, rename: Callable[[str], str]) -> Path:
    """A GGUF file of `state` in city96's (arch "flux") or llama.cpp's (arch "t5encoder") layout,
    its matrices as random Q4_K blocks; written with the `gguf` package (llama.cpp's writer)."""
    import gguf

    gen = torch.Generator().manual_seed(7)
    block = GGML_TYPES[GGUF_TYPE].block_size
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in state.items():
        name = rename(key)
        quantize = value.ndim == 2 and value.shape[1] % block == 0 and not key.startswith(GGUF_UNQUANTIZED)
        if quantize and "relative_attention_bias" not in key:
            raw = random_gguf_bytes(*value.shape, gen)
            writer.add_tensor(name, raw, raw_dtype=gguf.GGMLQuantizationType[GGUF_TYPE])
        else:
            kind = np.float32 if value.ndim == 1 else np.float16
            writer.add_tensor(name, value.float().numpy().astype(kind))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_lora(path: Path, transformer: dict[str, torch.Tensor], rank: int) -> Path:
    """A rank-`rank` LoRA in ComfyUI's BFL names (`diffusion_model.<layer>.lora_A/B.weight`) on every
    matrix of the double and single blocks."""
    gen = torch.Generator().manual_seed(11)
    tensors = {}
    for key, value in transformer.items():
        if value.ndim != 2 or not key.startswith(("double_blocks.", "single_blocks.")):
            continue
        layer = "diffusion_model." + key.removesuffix(".weight")
        rows, cols = value.shape
        tensors[f"{layer}.lora_A.weight"] = (torch.randn(rank, cols, generator=gen) * cols**-0.5).bfloat16()
        tensors[f"{layer}.lora_B.weight"] = (torch.randn(rows, rank, generator=gen) * 0.01).bfloat16()
    return write_safetensors(path, tensors)


def write_files(folder: Path, config: dict, device: torch.device, with_gguf: bool) -> dict[str, Path]:
    from tests.support.tiny_tokenizers import write_flux_repo_tree

    if with_gguf:  # the gguf package (the writer) only when the GGUF rows run: --no-gguf runs without it
        from tests.support.tiny_gguf import llama_t5_name

    clip_tok, t5_tok = write_flux_repo_tree(folder)
    files = {"clip_tokenizer": clip_tok, "t5_tokenizer": t5_tok}
    for seed, name in enumerate(NETWORKS):
        started = time.perf_counter()
        state = random_state(name, config[CONFIG_KEYS[name]], device, seed)
        files[name] = write_safetensors(folder / f"{name}.safetensors", state)
        if name == "transformer":
            files["lora"] = write_lora(folder / "lora_r16.safetensors", state, LORA_RANK)
            if with_gguf:
                files["transformer_gguf"] = write_gguf(folder / "transformer-Q4_K.gguf", state, "flux", str)
        if name == "t5" and with_gguf:
            state.pop("encoder.embed_tokens.weight", None)
            files["t5_gguf"] = write_gguf(folder / "t5-Q4_K.gguf", state, "t5encoder", llama_t5_name)
        del state
        print(f"wrote {name} in {time.perf_counter() - started:.1f} s", flush=True)
    return files


# --- the cases -----------------------------------------------------------------------------------


def spec_for(files: dict[str, Path], device: torch.device, **changes) -> LocalModelSpec:
    base = LocalModelSpec(
        transformer=files["transformer"],
        t5=files["t5"],
        clip=files["clip"],
        ae=files["ae"],
        t5_tokenizer=files["t5_tokenizer"],
        clip_tokenizer=files["clip_tokenizer"],
        device=str(device),
    )
    return dataclasses.replace(base, **changes)


def timed_run(spec: LocalModelSpec, size: int, steps: int) -> tuple[float, float | None]:
    request = GenerationRequest(PROMPT, width=size, height=size, steps=steps, seed=0, batch_size=1)
    started = time.perf_counter()
    images, info = local_backend.generate_local(request, spec, Progress(steps))
    if not torch.isfinite(images).all():
        raise FluxSchnellError("the image has non-finite values")
    return time.perf_counter() - started, info.peak_memory_gib


def run_case(row: Row, spec: LocalModelSpec, size: int, steps: int, fresh: bool = True) -> None:
    """Two runs of one case (the first loads or compiles), the models released before and after."""
    if fresh:
        local_backend.release_models()
    try:
        row.first_s, _ = timed_run(spec, size, steps)
        row.second_s, row.peak_gib = timed_run(spec, size, steps)
        row.status = "ok"
    except CASE_ERRORS as e:  # report every case, whatever fails
        row.status, row.note = "FAILED", f"{type(e).__name__}: {e}"[:300]
        traceback.print_exc()
    finally:
        if fresh:
            local_backend.release_models()


def out_of_memory_case(
    row: Row, spec: LocalModelSpec, size: int, steps: int, device: torch.device, cap_gib: float
) -> None:
    """With the device capped below the transformer's size, the run must end in our message."""
    if device.type != "cuda":
        row.status, row.note = "skipped", "CUDA only"
        return
    local_backend.release_models()
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(cap_gib * GIB / total, device)
    try:
        timed_run(dataclasses.replace(spec, memory="keep on GPU"), size, steps)
        row.status, row.note = "FAILED", f"no out-of-memory error under a {cap_gib:g} GiB cap"
    except OutOfMemoryError as e:
        named = any(stage in str(e) for stage in ("loading", "text encoding", "sampling", "decoding"))
        row.status = "ok" if named else "FAILED"
        row.note = str(e)[:300]
    except CASE_ERRORS as e:
        row.status, row.note = "FAILED", f"{type(e).__name__} instead of OutOfMemoryError: {e}"[:300]
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
        local_backend.release_models()


def stop_on_sigterm(signum, frame) -> None:
    """A SIGTERM (from `timeout`) unwinds like Ctrl-C, so `finally` blocks run."""
    raise SystemExit(128 + signum)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="reduced")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--folder", type=Path, help="where to write the weight files (default: a temp dir)")
    parser.add_argument("--no-gguf", action="store_true", help="skip the GGUF cases (needs the gguf package)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile case")
    parser.add_argument(
        "--oom-cap-gib", type=float, default=0.5, help="device memory cap of the out-of-memory case"
    )
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, stop_on_sigterm)
    config, device = CONFIGS[args.config], torch.device(args.device)
    size = config["size"]
    folder = args.folder or Path(tempfile.mkdtemp(prefix="flux-gpu-paths-"))
    folder.mkdir(parents=True, exist_ok=True)
    rows: list[Row] = []  # filled as the cases run: a kill still prints those measured
    try:
        files = write_files(folder, config, device, with_gguf=not args.no_gguf)
        run_cases(files, device, size, args, rows)
    finally:
        if args.folder is None:
            shutil.rmtree(folder, ignore_errors=True)
        print_table(rows, args, device, size)
    if any(r.status == "FAILED" for r in rows):
        raise SystemExit(1)


def run_cases(files: dict[str, Path], device: torch.device, size: int, args, rows: list[Row]) -> None:
    from comfyui_flux_schnell.local.lora import LoraChoice

    lora = (LoraChoice(files["lora"], 0.8),)
    gguf = {"transformer": files.get("transformer_gguf"), "t5": files.get("t5_gguf")}
    cases: list[tuple[str, dict]] = [
        ("as stored (bf16), auto", {}),
        ("as stored, keep on GPU", {"memory": "keep on GPU"}),
        ("as stored, offload to CPU", {"memory": "offload to CPU"}),
        ("as stored, free after run", {"memory": "free after run"}),
        ("bf16, auto", {"weight_dtype": "bf16"}),
        ("fp8_e4m3fn, offload to CPU", {"weight_dtype": "fp8_e4m3fn", "memory": "offload to CPU"}),
        ("fp8_e4m3fn, auto", {"weight_dtype": "fp8_e4m3fn"}),
        (f"LoRA r{LORA_RANK} on bf16, auto", {"loras": lora}),
    ]
    if not args.no_gguf:
        cases += [
            ("GGUF Q4_K, offload to CPU", {**gguf, "memory": "offload to CPU"}),
            ("GGUF Q4_K, auto", gguf),
            (f"LoRA r{LORA_RANK} on GGUF Q4_K, auto", {**gguf, "loras": lora}),
        ]
    if not args.no_compile:
        cases.append(("compile, keep on GPU", {"compile": True, "memory": "keep on GPU"}))
    for name, changes in cases:
        row = Row(name)
        rows.append(row)  # "not run" in the table if a kill stops this case
        print(f"--- {name}", flush=True)
        run_case(row, spec_for(files, device, **changes), size, args.steps)
        print(f"    {row.status} {row.first_s:.2f} s, then {row.second_s:.2f} s {row.note}", flush=True)
    row = Row(f"out of memory ({args.oom_cap_gib:g} GiB cap)")
    rows.append(row)
    out_of_memory_case(row, spec_for(files, device), size, args.steps, device, args.oom_cap_gib)
    print(f"    {row.status} {row.note}", flush=True)


def print_table(rows: list[Row], args, device: torch.device, size: int) -> None:
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"\nLocal backend device paths: config {args.config}, {size}x{size}, {args.steps} steps, {where}, "
        f"torch {torch.__version__}"
    )
    print(f"{'case':<34} {'status':>8} {'first s':>9} {'second s':>9} {'peak GiB':>9}  note")
    for r in rows:
        peak = f"{r.peak_gib:9.2f}" if r.peak_gib is not None else f"{'-':>9}"
        print(f"{r.case:<34} {r.status:>8} {r.first_s:9.2f} {r.second_s:9.2f} {peak}  {r.note[:120]}")
    print("first s: loading (and compiling) included; peak: torch.cuda.max_memory_allocated of the run")


if __name__ == "__main__":
    main()
