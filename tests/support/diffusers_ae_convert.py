"""Test-only: the FLUX (BFL) autoencoder layout mapped onto diffusers' `AutoencoderKL`, for any config.

diffusers' own single-file converter assumes the full-size FLUX AE; parity tests on tiny configs need
a mapping that follows `AutoEncoderParams`. Written from the two modules' key lists (read on meta):

    {enc,dec}.conv_in / conv_out             -> same names
    {enc,dec}.norm_out                       -> conv_norm_out
    encoder.down.i.block.j                   -> encoder.down_blocks.i.resnets.j
    encoder.down.i.downsample.conv           -> encoder.down_blocks.i.downsamplers.0.conv
    decoder.up.i.block.j                     -> decoder.up_blocks.(L-1-i).resnets.j   (diffusers runs
    decoder.up.i.upsample.conv               -> decoder.up_blocks.(L-1-i).upsamplers.0.conv  in order)
    *.nin_shortcut                           -> *.conv_shortcut
    {enc,dec}.mid.block_1 / block_2          -> {enc,dec}.mid_block.resnets.0 / resnets.1
    {enc,dec}.mid.attn_1.norm                -> {enc,dec}.mid_block.attentions.0.group_norm
    {enc,dec}.mid.attn_1.q / k / v / proj_out -> ...attentions.0.to_q / to_k / to_v / to_out.0
                                                (1x1 conv weights (C, C, 1, 1) become Linear (C, C))
"""

from __future__ import annotations

import re

import torch
from comfyui_flux_schnell.flux.autoencoder import AutoEncoderParams

_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def diffusers_config(p: AutoEncoderParams) -> dict:
    """Keyword arguments for `diffusers.AutoencoderKL` that build the same network as `p`."""
    levels = len(p.ch_mult)
    return {
        "in_channels": p.in_channels,
        "out_channels": p.out_ch,
        "down_block_types": ("DownEncoderBlock2D",) * levels,
        "up_block_types": ("UpDecoderBlock2D",) * levels,
        "block_out_channels": tuple(p.ch * m for m in p.ch_mult),
        "layers_per_block": p.num_res_blocks,
        "act_fn": "silu",
        "latent_channels": p.z_channels,
        "norm_num_groups": 32,
        "sample_size": p.resolution,
        "scaling_factor": p.scale_factor,
        "shift_factor": p.shift_factor,
        "use_quant_conv": False,
        "use_post_quant_conv": False,
        "mid_block_add_attention": True,
    }


def diffusers_key(key: str, num_levels: int) -> str:
    """The diffusers name of one BFL autoencoder key; KeyError for a key outside the layout."""
    part, rest = key.split(".", 1)
    if part not in ("encoder", "decoder"):
        raise KeyError(f"not an autoencoder key: {key}")
    rest = rest.replace("nin_shortcut", "conv_shortcut")
    if m := re.fullmatch(r"down\.(\d+)\.block\.(\d+)\.(.+)", rest):
        rest = f"down_blocks.{m[1]}.resnets.{m[2]}.{m[3]}"
    elif m := re.fullmatch(r"down\.(\d+)\.downsample\.(.+)", rest):
        rest = f"down_blocks.{m[1]}.downsamplers.0.{m[2]}"
    elif m := re.fullmatch(r"up\.(\d+)\.block\.(\d+)\.(.+)", rest):
        rest = f"up_blocks.{num_levels - 1 - int(m[1])}.resnets.{m[2]}.{m[3]}"
    elif m := re.fullmatch(r"up\.(\d+)\.upsample\.(.+)", rest):
        rest = f"up_blocks.{num_levels - 1 - int(m[1])}.upsamplers.0.{m[2]}"
    elif m := re.fullmatch(r"mid\.block_([12])\.(.+)", rest):
        rest = f"mid_block.resnets.{int(m[1]) - 1}.{m[2]}"
    elif m := re.fullmatch(r"mid\.attn_1\.(norm|q|k|v|proj_out)\.(weight|bias)", rest):
        rest = f"mid_block.attentions.0.{_ATTN[m[1]]}.{m[2]}"
    elif m := re.fullmatch(r"norm_out\.(weight|bias)", rest):
        rest = f"conv_norm_out.{m[1]}"
    elif not re.fullmatch(r"conv_(in|out)\.(weight|bias)", rest):
        raise KeyError(f"not an autoencoder key: {key}")
    return f"{part}.{rest}"


def to_diffusers(state_dict: dict[str, torch.Tensor], p: AutoEncoderParams) -> dict:
    """A BFL-layout autoencoder state dict renamed (and attention weights reshaped) for diffusers.

    Works on meta tensors too, so the mapping can be checked at full size without weights.
    """
    out = {}
    for key, t in state_dict.items():
        new = diffusers_key(key, len(p.ch_mult))
        if ".attentions.0.to_" in new and new.endswith(".weight"):
            t = t.reshape(t.shape[0], t.shape[1])  # 1x1 conv "o i 1 1 -> o i" (a Linear)
        out[new] = t
    return out
