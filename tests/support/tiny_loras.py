"""Test helper: random LoRAs for tiny models, written in the key layouts LoRA trainers use.

A LoRA here is a dict layer name -> `Factors` (down (r, in), up (out, r), alpha or None), made for the
Linear layers of any torch module (ours in BFL names, diffusers' `FluxTransformer2DModel` in its own
names, transformers' CLIP) and written as a safetensors file in one of the layouts found in the wild:

- kohya / sd-scripts: `lora_unet_<bfl name, dots as underscores>.lora_down.weight`, `.lora_up.weight`,
  `.alpha`; `lora_te1_...` for CLIP-L, `lora_te3_...` (kohya) or `lora_te2_...` (OneTrainer) for T5;
- diffusers / PEFT (ai-toolkit, diffusers' trainers): `transformer.<diffusers name>.lora_A.weight`,
  `.lora_B.weight`, `text_encoder.<name>...`, optionally `.alpha` keys or diffusers'
  `lora_adapter_metadata` (the PEFT LoraConfig as JSON);
- BFL / ComfyUI: `diffusion_model.<bfl name>.lora_A.weight` / `lora_B`, or `lora_down` / `lora_up`
  with `alpha`.

Values are seeded: down ~ N / sqrt(in), up ~ 0.3 N / sqrt(r), so an update is about a third of the
size of a tiny model's weights: large enough that any lost or misplaced update shows.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn


@dataclass(frozen=True)
class Factors:
    """One layer's LoRA: W += strength * alpha / r * up @ down (alpha None: scale 1)."""

    down: torch.Tensor  # (r, in)
    up: torch.Tensor  # (out, r)
    alpha: float | None = None

    def delta(self, strength: float = 1.0) -> torch.Tensor:
        r = self.down.shape[0]
        scale = strength * (1.0 if self.alpha is None else self.alpha / r)
        return scale * (self.up.double() @ self.down.double()).float()


def linear_shapes(module: nn.Module, skip: tuple[str, ...] = ()) -> dict[str, tuple[int, int]]:
    """(out, in) of every nn.Linear of `module` whose name contains none of `skip`."""
    return {
        name: (m.out_features, m.in_features)
        for name, m in module.named_modules()
        if isinstance(m, nn.Linear) and not any(s in name for s in skip)
    }


def random_lora(
    shapes: Mapping[str, tuple[int, int]], rank: int = 4, seed: int = 0, alpha: float | None = None
) -> dict[str, Factors]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, (n_out, n_in) in shapes.items():
        down = torch.randn(rank, n_in, generator=g) / math.sqrt(n_in)
        up = 0.3 * torch.randn(n_out, rank, generator=g) / math.sqrt(rank)
        out[name] = Factors(down, up, alpha)
    return out


def _underscored(name: str) -> str:
    return name.replace(".", "_")


def _pair(prefix: str, f: Factors, down: str, up: str) -> dict[str, torch.Tensor]:
    tensors = {f"{prefix}.{down}": f.down, f"{prefix}.{up}": f.up}
    if f.alpha is not None:
        tensors[f"{prefix}.alpha"] = torch.tensor(float(f.alpha))
    return tensors


def kohya_tensors(
    transformer: Mapping[str, Factors] = (),
    clip: Mapping[str, Factors] = (),
    t5: Mapping[str, Factors] = (),
    t5_prefix: str = "lora_te3_",
) -> dict[str, torch.Tensor]:
    """kohya names: `lora_unet_` (BFL transformer names), `lora_te1_` (CLIP-L), `t5_prefix` (T5)."""
    out = {}
    for prefix, layers in (("lora_unet_", transformer), ("lora_te1_", clip), (t5_prefix, t5)):
        for name, f in dict(layers).items():
            out.update(_pair(prefix + _underscored(name), f, "lora_down.weight", "lora_up.weight"))
    return out


def peft_tensors(
    transformer: Mapping[str, Factors] = (), text_encoder: Mapping[str, Factors] = ()
) -> dict[str, torch.Tensor]:
    """diffusers / PEFT names: `transformer.<diffusers name>`, `text_encoder.<CLIP name>`."""
    out = {}
    for prefix, layers in (("transformer.", transformer), ("text_encoder.", text_encoder)):
        for name, f in dict(layers).items():
            out.update(_pair(prefix + name, f, "lora_A.weight", "lora_B.weight"))
    return out


def bfl_tensors(
    transformer: Mapping[str, Factors], prefix: str = "diffusion_model.", style: str = "lora_A"
) -> dict[str, torch.Tensor]:
    """BFL names under `prefix`, as lora_A/lora_B (style "lora_A") or lora_down/lora_up."""
    down, up = (
        ("lora_A.weight", "lora_B.weight") if style == "lora_A" else ("lora_down.weight", "lora_up.weight")
    )
    out = {}
    for name, f in transformer.items():
        out.update(_pair(prefix + name, f, down, up))
    return out


def save_lora(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping | None = None, dtype=None):
    """Write a LoRA file (`dtype`: store the matrices in it, e.g. bf16 as most LoRAs are)."""
    stored = {
        k: (v.to(dtype) if dtype is not None and v.ndim == 2 else v).contiguous() for k, v in tensors.items()
    }
    text = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(dict(stored), str(path), metadata=text or None)
    return path


def merged(base: Mapping[str, torch.Tensor], layers: Mapping[str, Factors], strength: float = 1.0) -> dict:
    """`base` (fp32 state dict) with each layer's update merged into `<layer>.weight`."""
    out = dict(base)
    for name, f in layers.items():
        key = f"{name}.weight"
        out[key] = base[key].float() + f.delta(strength)
    return out


def write_sdxl_lora(path: Path) -> Path:
    """A few keys of a kohya SDXL LoRA: UNet input/output blocks and both text encoders."""
    g = torch.Generator().manual_seed(11)
    tensors = {}
    for name, (n_out, n_in) in {
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q": (640, 640),
        "lora_unet_output_blocks_0_1_transformer_blocks_0_attn2_to_k": (1280, 2048),
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (768, 768),
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj": (1280, 1280),
    }.items():
        tensors.update(
            _pair(
                name,
                Factors(torch.randn(4, n_in, generator=g), torch.randn(n_out, 4, generator=g), 4.0),
                "lora_down.weight",
                "lora_up.weight",
            )
        )
    return save_lora(path, tensors, {"ss_base_model_version": "sdxl_base_v1-0"}, dtype=torch.float16)


def write_tiny_lora(path: Path, seed: int = 0, rank: int = 4) -> Path:
    """A kohya LoRA of every Linear layer of the tiny transformer (tiny_models.TINY_FLUX), bf16."""
    from comfyui_flux_schnell.flux.model import Flux

    from .tiny_models import TINY_FLUX

    with torch.device("meta"):
        shapes = linear_shapes(Flux(TINY_FLUX))
    return save_lora(
        path, kohya_tensors(random_lora(shapes, rank, seed, alpha=rank / 2)), dtype=torch.bfloat16
    )
