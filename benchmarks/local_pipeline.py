"""The whole local pipeline against diffusers' FluxPipeline, with the same random weights, in one run.

Stages timed for both: text encoding (T5 + CLIP), each sampling step, decoding, and end to end
(after warm-up; median of `--repeats`), plus the peak device memory of a run
(`torch.cuda.max_memory_allocated`, CUDA only). Speed and memory do not depend on the weights'
values, so seeded random weights at the real sizes stand in for the real files (none can be
downloaded here). Both sides get identical weights: ours in the files' layouts, diffusers' through
the test-only converters in tests/support/.

Configs: `schnell` (full FLUX.1-schnell size: 12B transformer, T5-XXL, CLIP-L, AE; bf16; 1024x1024;
needs a GPU with ~60 GB, as the two pipelines run one after the other) and `tiny` (small widths, to
check the script itself on a CPU). `--compile` also times our opt-in `torch.compile` mode.

    python -m benchmarks.local_pipeline --device cuda [--compile]      # on an H100/H200
    python -m benchmarks.local_pipeline --config tiny --device cpu     # script check, any machine
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
import time
from pathlib import Path

import torch
from comfyui_flux_schnell.comfy_bridge import Progress
from comfyui_flux_schnell.flux.autoencoder import AutoEncoder, AutoEncoderParams
from comfyui_flux_schnell.flux.clip import CLIPTextConfig, CLIPTextEncoder
from comfyui_flux_schnell.flux.model import Flux, FluxParams
from comfyui_flux_schnell.flux.t5 import T5Config, T5Encoder
from comfyui_flux_schnell.generation import GenerationRequest
from comfyui_flux_schnell.local import memory as local_memory
from comfyui_flux_schnell.local import models as local_models
from comfyui_flux_schnell.local import pipeline as local_pipeline

PROMPT = "a photo of a red fox in fresh snow at golden hour, shallow depth of field"
CONFIGS = {
    "schnell": dict(
        flux=FluxParams(),
        ae=AutoEncoderParams(),
        t5=T5Config(),
        clip=CLIPTextConfig(),
        size=1024,
        dtype=torch.bfloat16,
    ),
    "tiny": dict(
        flux=FluxParams(
            hidden_size=256, num_heads=2, depth=2, depth_single_blocks=4, context_in_dim=256, vec_in_dim=128
        ),
        ae=AutoEncoderParams(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1),
        t5=T5Config(d_model=256, d_kv=64, d_ff=512, num_layers=2, num_heads=4),
        clip=CLIPTextConfig(hidden_size=128, intermediate_size=256, num_layers=2, num_heads=2),
        size=256,
        dtype=torch.float32,
    ),
}


def random_module(cls, config, device, dtype, seed):
    """`cls(config)` with seeded N(0, 1/fan_in) weights, small biases, norm scales near 1."""
    with torch.device("meta"):
        module = cls(config)
    gen = torch.Generator(device).manual_seed(seed)
    state = {}
    for name, meta in module.state_dict().items():
        t = torch.randn(meta.shape, generator=gen, device=device, dtype=torch.float32)
        if meta.ndim == 1 and ("norm" in name or name.endswith(".scale")):
            t = 1 + 0.1 * t
        elif meta.ndim == 1:
            t = 0.02 * t
        else:
            t = t * (meta[0].numel() ** -0.5)
        state[name] = t.to(dtype)
        del t
    module.load_state_dict(state, assign=True, strict=True)
    return module.eval().requires_grad_(False)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


class StepClock:
    """Per-step wall times from the sampler's progress callback."""

    def __init__(self, device):
        self.device, self.marks = device, []

    def tick(self):
        sync(self.device)
        self.marks.append(time.perf_counter())

    def steps(self, start):
        points = [start, *self.marks]
        return [b - a for a, b in itertools.pairwise(points)]


def run_ours(cfg, models, device, steps, repeats, compile_mode):
    policy = local_memory.MemoryPolicy(models, device, "keep on GPU")
    request = GenerationRequest(PROMPT, cfg["size"], cfg["size"], steps, 0, 1)
    results = []
    for i in range(2 + repeats):  # two warm-ups (the first compiles, when compiling)
        clock = StepClock(device)
        progress = Progress(steps)
        progress.advance = lambda n=1, preview=None, c=clock: c.tick()
        timings: dict[str, float] = {}
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        sync(device)
        start = time.perf_counter()
        run = local_pipeline.PipelineRun(
            request, device, cfg["dtype"], policy, progress, compile=compile_mode, timings=timings
        )
        local_pipeline.run_pipeline(models, run)
        sync(device)
        total = time.perf_counter() - start
        step_times = clock.steps(start + timings["text encoding"])
        if i >= 2:
            results.append(
                dict(
                    text=timings["text encoding"],
                    steps=step_times,
                    decode=timings["decoding"],
                    total=total,
                    peak=_peak(device),
                )
            )
    return results


def run_diffusers(cfg, parts, tok_dirs, device, steps, repeats):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    from transformers import CLIPTokenizer, T5TokenizerFast

    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False),
        vae=parts["ae"],
        text_encoder=parts["clip"],
        tokenizer=CLIPTokenizer(
            str(tok_dirs[0] / "vocab.json"), str(tok_dirs[0] / "merges.txt"), model_max_length=77
        ),
        text_encoder_2=parts["t5"],
        tokenizer_2=T5TokenizerFast(tokenizer_file=str(tok_dirs[1] / "tokenizer.json")),
        transformer=parts["transformer"],
    ).to(device)
    pipe.set_progress_bar_config(disable=True)
    results = []
    for i in range(2 + repeats):
        clock = StepClock(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        sync(device)
        start = time.perf_counter()
        with torch.inference_mode():
            prompt_embeds, pooled, _ = pipe.encode_prompt(
                PROMPT, PROMPT, device=device, max_sequence_length=256
            )
            sync(device)
            text = time.perf_counter() - start
            latents = pipe(
                prompt_embeds=prompt_embeds,
                pooled_prompt_embeds=pooled,
                height=cfg["size"],
                width=cfg["size"],
                num_inference_steps=steps,
                guidance_scale=0.0,
                generator=torch.Generator("cpu").manual_seed(0),
                output_type="latent",
                callback_on_step_end=lambda p, i, t, kw, c=clock: (c.tick(), kw)[1],
            ).images
            sync(device)
            decode_start = time.perf_counter()
            latents = pipe._unpack_latents(latents, cfg["size"], cfg["size"], pipe.vae_scale_factor)
            latents = latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
            pipe.vae.decode(latents, return_dict=False)[0].clamp(-1, 1).float().cpu()
            sync(device)
        end = time.perf_counter()
        if i >= 2:
            results.append(
                dict(
                    text=text,
                    steps=clock.steps(start + text),
                    decode=end - decode_start,
                    total=end - start,
                    peak=_peak(device),
                )
            )
    return results


def _peak(device):
    return torch.cuda.max_memory_allocated() if device.type == "cuda" else float("nan")


def summarize(results):
    med = statistics.median
    return {
        "text encoding, s": med(r["text"] for r in results),
        **{f"step {k + 1}, s": med(r["steps"][k] for r in results) for k in range(len(results[0]["steps"]))},
        "decoding, s": med(r["decode"] for r in results),
        "end to end, s": med(r["total"] for r in results),
        "peak memory, GiB": max(r["peak"] for r in results) / 2**30,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="schnell")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also time our compiled mode")
    parser.add_argument("--skip-diffusers", action="store_true")
    args = parser.parse_args()
    cfg, device = CONFIGS[args.config], torch.device(args.device)
    from tests.support.tiny_tokenizers import write_flux_repo_tree

    tmp = Path(tempfile.mkdtemp())
    clip_dir, t5_dir = write_flux_repo_tree(tmp)
    dtype = cfg["dtype"]
    nets = dict(
        transformer=random_module(Flux, cfg["flux"], device, dtype, 0),
        ae=random_module(AutoEncoder, cfg["ae"], device, dtype, 1),
        t5=random_module(T5Encoder, cfg["t5"], device, dtype, 2),
        clip=random_module(CLIPTextEncoder, cfg["clip"], device, dtype, 3),
    )
    models = in_memory_models(nets, clip_dir, t5_dir, device)
    # diffusers is imported before anything runs: without it the table says so (ours still measured)
    if not args.skip_diffusers and not diffusers_available():
        print("diffusers: skipped: no diffusers", flush=True)
        args.skip_diffusers = True
    columns = {"ours (eager)": summarize(run_ours(cfg, models, device, args.steps, args.repeats, False))}
    if args.compile:
        columns["ours (compiled)"] = summarize(run_ours(cfg, models, device, args.steps, args.repeats, True))
    print_table(columns, args, device)  # ours now, so that a failure or kill in diffusers keeps it
    if not args.skip_diffusers:
        parts = to_diffusers(nets, cfg, device, dtype)
        del models, nets
        if device.type == "cuda":
            torch.cuda.empty_cache()
        columns["diffusers"] = summarize(
            run_diffusers(cfg, parts, (clip_dir, t5_dir), device, args.steps, args.repeats)
        )
        print_table(columns, args, device)


def diffusers_available() -> bool:
    try:
        import diffusers  # noqa: F401
    except ImportError:
        return False
    return True


def in_memory_models(nets: dict, clip_dir: Path, t5_dir: Path, device) -> local_models.LoadedModels:
    """One LoadedModels of `nets` (already on `device`), as the backend's cache would hold it."""
    from comfyui_flux_schnell.flux.tokenizers import load_clip_tokenizer, load_t5_tokenizer

    models = local_models.LoadedModels(
        files=None,
        stamps=(),
        weight_dtype="as stored",
        **{k: local_models.Placed(k, m) for k, m in nets.items()},
        t5_tokenizer=load_t5_tokenizer(t5_dir, 256),
        clip_tokenizer=load_clip_tokenizer(clip_dir, 77),
    )
    for placed in models.all():
        placed.device = device  # the weights were made there
    return models


def to_diffusers(nets, cfg, device, dtype):
    """The same weights in diffusers' and transformers' modules (moved, not copied)."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5EncoderModel

    from tests.support.diffusers_ae_convert import diffusers_config as ae_config
    from tests.support.diffusers_ae_convert import to_diffusers as ae_to_diffusers
    from tests.support.diffusers_flux_convert import bfl_to_diffusers, diffusers_config
    from tests.support.transformers_reference import hf_clip_config, hf_t5_config

    p: FluxParams = cfg["flux"]
    with torch.device("meta"):
        transformer = FluxTransformer2DModel(**diffusers_config(p))
        ae = AutoencoderKL(**ae_config(cfg["ae"]))
        t5 = T5EncoderModel(hf_t5_config(cfg["t5"]))
        clip = CLIPTextModel(hf_clip_config(cfg["clip"]))
    transformer.load_state_dict(bfl_to_diffusers(nets["transformer"].state_dict()), assign=True)
    ae.load_state_dict(ae_to_diffusers(nets["ae"].state_dict(), cfg["ae"]), assign=True)
    t5_state = nets["t5"].state_dict()
    t5_state["encoder.embed_tokens.weight"] = t5_state["shared.weight"]
    _check_loaded(t5, t5.load_state_dict(t5_state, assign=True, strict=False))
    clip_state = {
        k.removeprefix("text_model.")
        if not any(k2.startswith("text_model.") for k2 in clip.state_dict())
        else k: v
        for k, v in nets["clip"].state_dict().items()
    }
    _check_loaded(clip, clip.load_state_dict(clip_state, assign=True, strict=False))
    for module in (transformer, ae, t5, clip):
        _materialize_buffers(module)
        module.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return dict(transformer=transformer, ae=ae, t5=t5, clip=clip)


def _check_loaded(module, result) -> None:
    """Every weight of the reference module came from ours: nothing missing but the position-id
    buffer transformers may register, nothing of ours left over."""
    missing = [k for k in result.missing_keys if not k.endswith("position_ids")]
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"{type(module).__name__}: weights not carried over {missing[:5]}, "
            f"left over {result.unexpected_keys[:5]}"
        )


def _materialize_buffers(module):
    """Buffers that no state dict carries (CLIP's position ids) are still on meta: fill them."""
    for sub in module.modules():
        for name, buf in list(sub._buffers.items()):
            if buf is not None and buf.is_meta:
                if name != "position_ids":
                    raise RuntimeError(f"cannot fill the meta buffer {name} of {type(sub).__name__}")
                sub._buffers[name] = torch.arange(buf.shape[-1]).expand(buf.shape).clone()


def print_table(columns, args, device):
    names = list(columns)
    rows = list(next(iter(columns.values())))
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"\nFLUX.1-schnell pipeline, config {args.config}, {args.steps} steps, batch 1, {gpu}, "
        f"torch {torch.__version__}, median of {args.repeats} after 2 warm-ups"
    )
    header = f"{'stage':<20}" + "".join(f"{n:>18}" for n in names)
    if "diffusers" in columns:
        header += "".join(f"{'ratio ' + n.split()[-1]:>18}" for n in names if n != "diffusers")
    print(header)
    for row in rows:
        values = [columns[n][row] for n in names]
        line = f"{row:<20}" + "".join(f"{v:>18.4f}" for v in values)
        if "diffusers" in columns:
            ref = columns["diffusers"][row]
            line += "".join(f"{columns[n][row] / ref:>17.2f}x" for n in names if n != "diffusers")
        print(line)
    if "diffusers" in columns:
        print("ratio = ours / diffusers (below 1: ours is faster or smaller)")


if __name__ == "__main__":
    main()
