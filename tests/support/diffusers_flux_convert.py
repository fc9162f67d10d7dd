"""Test-only helper: a BFL FLUX.1 transformer state dict in diffusers' `FluxTransformer2DModel` layout.

diffusers' own single-file converter hard-codes the schnell width (3072, mlp ratio 4), so parity tests
on tiny configs need this generic mapping. It follows the key mapping of diffusers'
`convert_flux_transformer_checkpoint_to_diffusers` (src/diffusers/loaders/single_file_utils.py in
https://github.com/huggingface/diffusers) and works for any width: the hidden size is read
from `img_in.weight`. Fused weights are split (double-block `qkv` into `to_{q,k,v}` / `add_{q,k,v}_proj`;
single-block `linear1` into `to_{q,k,v}` + `proj_mlp`) and the final adaLN halves are swapped from
(shift, scale) to diffusers' (scale, shift). Splits are views of the input tensors; `load_state_dict`
copies them.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

# One-to-one renames: BFL module path -> diffusers module path (suffixes .weight/.bias/.scale follow).
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
_DOUBLE = {
    "img_mod.lin": "norm1.linear",
    "txt_mod.lin": "norm1_context.linear",
    "img_attn.norm.query_norm": "attn.norm_q",
    "img_attn.norm.key_norm": "attn.norm_k",
    "txt_attn.norm.query_norm": "attn.norm_added_q",
    "txt_attn.norm.key_norm": "attn.norm_added_k",
    "img_attn.proj": "attn.to_out.0",
    "txt_attn.proj": "attn.to_add_out",
    "img_mlp.0": "ff.net.0.proj",
    "img_mlp.2": "ff.net.2",
    "txt_mlp.0": "ff_context.net.0.proj",
    "txt_mlp.2": "ff_context.net.2",
}
_SINGLE = {
    "norm.query_norm": "attn.norm_q",
    "norm.key_norm": "attn.norm_k",
    "modulation.lin": "norm.linear",
    "linear2": "proj_out",
}
_KEY = re.compile(r"^(?:(double_blocks|single_blocks)\.(\d+)\.)?(.+)\.(weight|bias|scale)$")


def bfl_to_diffusers(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """BFL-layout FLUX transformer state dict -> diffusers FluxTransformer2DModel state dict."""
    hidden = sd["img_in.weight"].shape[0]
    out: dict[str, Tensor] = {}
    for key, tensor in sd.items():
        match = _KEY.match(key)
        if match is None:
            raise KeyError(f"unexpected key {key!r}")
        group, index, module, kind = match.groups()
        suffix = "weight" if kind == "scale" else kind  # RMSNorm `scale` -> `weight`
        if group is None and module == "final_layer.adaLN_modulation.1":
            shift, scale = tensor.chunk(2, dim=0)  # BFL (shift, scale) -> diffusers (scale, shift)
            out[f"norm_out.linear.{suffix}"] = torch.cat((scale, shift), dim=0)
        elif group is None:
            out[f"{_TOP[module]}.{suffix}"] = tensor
        elif group == "double_blocks":
            prefix = f"transformer_blocks.{index}"
            if module in ("img_attn.qkv", "txt_attn.qkv"):
                names = (
                    ("to_q", "to_k", "to_v")
                    if module.startswith("img")
                    else ("add_q_proj", "add_k_proj", "add_v_proj")
                )
                for name, part in zip(names, tensor.chunk(3, dim=0), strict=True):  # [q | k | v] rows
                    out[f"{prefix}.attn.{name}.{suffix}"] = part
            else:
                out[f"{prefix}.{_DOUBLE[module]}.{suffix}"] = tensor
        else:
            prefix = f"single_transformer_blocks.{index}"
            if module == "linear1":  # rows [q | k | v | mlp]
                mlp_hidden = tensor.shape[0] - 3 * hidden
                parts = tensor.split((hidden, hidden, hidden, mlp_hidden), dim=0)
                names = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")
                for name, part in zip(names, parts, strict=True):
                    out[f"{prefix}.{name}.{suffix}"] = part
            else:
                out[f"{prefix}.{_SINGLE[module]}.{suffix}"] = tensor
    return out


def diffusers_config(params) -> dict:
    """Keyword arguments of diffusers' `FluxTransformer2DModel` for a `FluxParams`.

    diffusers fixes the MLP ratio (4), the qkv bias (on) and the RoPE theta (10000): a `FluxParams`
    with others has no diffusers twin, said here rather than as a shape error at load time.
    """
    if params.mlp_ratio != 4.0 or not params.qkv_bias or params.theta != 10_000:
        raise ValueError(
            "diffusers' FluxTransformer2DModel fixes mlp_ratio=4, qkv_bias=True and theta=10000; "
            f"got mlp_ratio={params.mlp_ratio}, qkv_bias={params.qkv_bias}, theta={params.theta}"
        )
    return dict(
        patch_size=1,
        in_channels=params.in_channels,
        out_channels=params.out_channels,
        num_layers=params.depth,
        num_single_layers=params.depth_single_blocks,
        attention_head_dim=params.hidden_size // params.num_heads,
        num_attention_heads=params.num_heads,
        joint_attention_dim=params.context_in_dim,
        pooled_projection_dim=params.vec_in_dim,
        guidance_embeds=params.guidance_embed,
        axes_dims_rope=params.axes_dim,
    )
