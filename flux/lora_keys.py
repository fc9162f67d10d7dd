"""The names LoRA files give FLUX.1's layers, mapped onto our networks' Linear layers.

A LoRA key is `<module alias><suffix>`: the suffix says which tensor it is (`.lora_down.weight` /
`.lora_up.weight`, `.lora_A.weight` / `.lora_B.weight`, ... and `.alpha`), the alias which layer.
The aliases in use for FLUX.1 (facts from ComfyUI's `comfy/lora.py` `model_lora_keys_unet` /
`model_lora_keys_clip`, https://github.com/comfyanonymous/ComfyUI/blob/master/comfy/lora.py, and
diffusers' `_convert_kohya_flux_lora_to_diffusers`,
https://github.com/huggingface/diffusers/blob/main/src/diffusers/loaders/lora_conversion_utils.py):

- transformer, Black Forest Labs names (`double_blocks.0.img_attn.qkv`):
  kohya / sd-scripts `lora_unet_double_blocks_0_img_attn_qkv` (dots become underscores), ComfyUI
  `diffusion_model.double_blocks.0.img_attn.qkv`, or no prefix at all;
- transformer, diffusers names (`transformer_blocks.0.attn.to_q`): ai-toolkit / diffusers / PEFT
  `transformer.<name>`, raw PEFT `base_model.model.<name>`, OneTrainer `lora_transformer_<name_>`,
  SimpleTuner LyCORIS `lycoris_<name_>`, or no prefix. diffusers splits the fused layers: the q, k, v
  rows of `img_attn.qkv` (`attn.to_{q,k,v}`) and `txt_attn.qkv` (`attn.add_{q,k,v}_proj`), and the
  q, k, v, MLP rows of a single block's `linear1` (`attn.to_{q,k,v}`, `proj_mlp`); such a LoRA
  updates a row range of the fused layer. diffusers' `norm_out.linear` is BFL's
  `final_layer.adaLN_modulation.1` with its two halves in the other order (scale, shift);
- CLIP-L (`text_model.encoder.layers.0.self_attn.q_proj`): kohya `lora_te1_...` / `lora_te_...`,
  diffusers `text_encoder.<name>`, ComfyUI `text_encoders.clip_l.transformer.<name>`;
- T5-XXL (`encoder.block.0.layer.0.SelfAttention.q`): kohya `lora_te3_...`, OneTrainer
  `lora_te2_...`, diffusers `text_encoder_2.<name>`, ComfyUI `text_encoders.t5xxl.transformer.<name>`.

`alias_map` builds every alias of the layers a set of networks has (from their names and shapes, so
any width and depth works), `split_key` cuts a key into alias and tensor kind, and `describe_foreign`
says what a LoRA that fits none of them was made for.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from .components import CLIP, T5, TRANSFORMER

NETWORKS = {c.name: c for c in (TRANSFORMER, CLIP, T5)}  # the networks LoRAs update, by name


@dataclass(frozen=True)
class Target:
    """The part of one of our Linear layers a LoRA module updates."""

    network: str  # the network's name: "transformer", "clip" or "t5" (local_components)
    module: str  # the layer's name in that network, e.g. "double_blocks.0.img_attn.qkv"
    rows: tuple[int, int] | None = None  # the output rows [start, stop) it updates; None: all
    swap_halves: bool = False  # its output halves come in the other order (diffusers' norm_out)


# --- tensor kinds ----------------------------------------------------------------------------------

# suffix -> what the tensor is; longest first so that no suffix hides a longer one
TENSOR_SUFFIXES = (
    (".lora_linear_layer.down.weight", "down"),
    (".lora_linear_layer.up.weight", "up"),
    (".lora_down.weight", "down"),
    (".lora_up.weight", "up"),
    ("_lora.down.weight", "down"),
    ("_lora.up.weight", "up"),
    (".lora.down.weight", "down"),
    (".lora.up.weight", "up"),
    (".lora_A.weight", "down"),
    (".lora_B.weight", "up"),
    (".alpha", "alpha"),
)
# (substring, what it is): adapter kinds other than plain LoRA, refused by name
UNSUPPORTED_KINDS = (
    (".dora_scale", "DoRA (weight-decomposed LoRA)"),
    (".lora_mid.", "LoCon with a mid weight"),
    (".hada_", "LoHa (LyCORIS)"),
    (".lokr_", "LoKr (LyCORIS)"),
    (".a1.weight", "GLoRA (LyCORIS)"),
    (".lora_B.bias", "LoRA with bias updates (lora_B.bias)"),
    (".diff_b", "full bias differences (.diff_b)"),
    (".diff", "full weight differences (.diff)"),
    (".set_weight", "replacement weights (.set_weight)"),
    (".w_norm", "norm weight updates (.w_norm)"),
    (".b_norm", "norm bias updates (.b_norm)"),
    (".reshape_weight", "a control LoRA that reshapes layers (.reshape_weight)"),
    (".processor.", "an XLabs LoRA (double_blocks.N.processor.qkv_lora1 ...: its own attention processors)"),
)


def split_key(key: str) -> tuple[str, str] | None:
    """(alias, kind) with kind "down", "up" or "alpha"; None for a key of no known kind."""
    for suffix, kind in TENSOR_SUFFIXES:
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[: -len(suffix)], kind
    return None


def unsupported_kind(key: str) -> str | None:
    """The adapter kind this key belongs to when it is one we refuse (DoRA, LoKr, ...)."""
    return next((what for needle, what in UNSUPPORTED_KINDS if needle in key), None)


# --- diffusers' names of the BFL transformer layers ------------------------------------------------

_TOP = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer.linear": "proj_out",
}
_FINAL_MODULATION = ("final_layer.adaLN_modulation.1", "norm_out.linear")  # halves swapped
_DOUBLE = {
    "img_mod.lin": "norm1.linear",
    "txt_mod.lin": "norm1_context.linear",
    "img_attn.proj": "attn.to_out.0",
    "txt_attn.proj": "attn.to_add_out",
    "img_mlp.0": "ff.net.0.proj",
    "img_mlp.2": "ff.net.2",
    "txt_mlp.0": "ff_context.net.0.proj",
    "txt_mlp.2": "ff_context.net.2",
}
_DOUBLE_QKV = {  # fused [q | k | v] rows -> diffusers' three layers
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
}
_SINGLE = {"linear2": "proj_out", "modulation.lin": "norm.linear"}
_SINGLE_LINEAR1 = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")  # rows [q | k | v | mlp]
_BLOCK = re.compile(r"^(double_blocks|single_blocks)\.(\d+)\.(.+)$")


Rows = tuple[int, int] | None


def diffusers_names(module: str, out_features: int, hidden: int) -> list[tuple[str, Rows, bool]]:
    """[(diffusers module name, rows or None, swap_halves)] of one BFL transformer Linear layer.

    `hidden` is the transformer's width (img_in's output), which sets the fused layers' row splits.
    """
    if module in _TOP:
        return [(_TOP[module], None, False)]
    if module == _FINAL_MODULATION[0]:
        return [(_FINAL_MODULATION[1], None, True)]
    match = _BLOCK.match(module)
    if match is None:
        return []
    group, index, rest = match.groups()
    if group == "double_blocks":
        prefix = f"transformer_blocks.{index}."
        if rest in _DOUBLE_QKV:
            return [
                (prefix + name, (i * hidden, (i + 1) * hidden), False)
                for i, name in enumerate(_DOUBLE_QKV[rest])
            ]
        return [(prefix + _DOUBLE[rest], None, False)] if rest in _DOUBLE else []
    prefix = f"single_transformer_blocks.{index}."
    if rest == "linear1":
        bounds = (0, hidden, 2 * hidden, 3 * hidden, out_features)
        return [(prefix + name, (bounds[i], bounds[i + 1]), False) for i, name in enumerate(_SINGLE_LINEAR1)]
    return [(prefix + _SINGLE[rest], None, False)] if rest in _SINGLE else []


# --- every alias of every layer -------------------------------------------------------------------


def _underscored(name: str) -> str:
    return name.replace(".", "_")


def alias_map(layers: Mapping[str, Mapping[str, tuple[int, int]]]) -> dict[str, Target]:
    """Every LoRA module alias of the given layers -> the Target it updates.

    `layers`: network name ("transformer", "clip", "t5") -> {Linear layer name: (out_features,
    in_features)}.
    """
    aliases: dict[str, Target] = {}

    def add(names: Iterable[str], target: Target) -> None:
        for name in names:
            aliases[name] = target

    transformer = layers.get(TRANSFORMER.name, {})
    hidden = transformer["img_in"][0] if "img_in" in transformer else 0
    for module, (out_features, _) in transformer.items():
        whole = Target(TRANSFORMER.name, module)
        add((module, f"diffusion_model.{module}", f"lora_unet_{_underscored(module)}"), whole)
        for name, rows, swap in diffusers_names(module, out_features, hidden):
            target = Target(TRANSFORMER.name, module, rows, swap)
            add(
                (
                    name,
                    f"transformer.{name}",
                    f"base_model.model.{name}",
                    f"lora_transformer_{_underscored(name)}",
                    f"lycoris_{_underscored(name)}",
                ),
                target,
            )
    for module in layers.get(CLIP.name, {}):
        add(
            (
                f"lora_te1_{_underscored(module)}",
                f"lora_te_{_underscored(module)}",
                f"text_encoder.{module}",
                f"text_encoder.{module.removeprefix('text_model.')}",  # as transformers >= 5 names it
                f"text_encoders.clip_l.transformer.{module}",
            ),
            Target(CLIP.name, module),
        )
    for module in layers.get(T5.name, {}):
        add(
            (
                f"lora_te3_{_underscored(module)}",
                f"lora_te2_{_underscored(module)}",
                f"text_encoder_2.{module}",
                f"text_encoders.t5xxl.transformer.{module}",
            ),
            Target(T5.name, module),
        )
    return aliases


# --- what a LoRA that fits nothing was made for ---------------------------------------------------

_FOREIGN = (
    (("joint_blocks",), "a Stable Diffusion 3 LoRA"),
    (
        (
            "input_blocks",
            "output_blocks",
            "middle_block",
            "down_blocks",
            "up_blocks",
            "mid_block",
            "unet.",
        ),
        "a Stable Diffusion 1.x/2.x LoRA (UNet layer names)",
    ),
    (("guidance_in", "guidance_embedder"), "a FLUX.1 [dev] LoRA for its guidance layers"),
    (("blocks.0.self_attn", "blocks_0_self_attn", "cross_attn"), "a video-model LoRA (Wan-style names)"),
)
METADATA_HINTS = ("ss_base_model_version", "modelspec.architecture")  # kohya's and modelspec's base model
_SDXL_HINTS = ("lora_te2_", "text_encoder_2.", "label_emb", "input_blocks_4_1", "input_blocks.4.1")


def describe_foreign(aliases: Iterable[str], metadata: Mapping[str, str]) -> str:
    """What a LoRA whose layer names fit none of ours seems to be, e.g. "an SDXL LoRA"."""
    names = list(aliases)
    what = "a LoRA for another model"
    for needles, description in _FOREIGN:
        if any(n in a for a in names for n in needles):
            what = description
            if description.startswith("a Stable Diffusion 1") and any(
                h in a for a in names for h in _SDXL_HINTS
            ):
                what = "a Stable Diffusion XL LoRA (UNet layer names, two text encoders)"
            break
    said = [f"{k}={metadata[k]!r}" for k in METADATA_HINTS if k in metadata]
    return what + (f" (its metadata says {', '.join(said)})" if said else "")
