"""The four networks of FLUX.1 [schnell] and where each is found: the one registry of them.

For each network: its name (the field of `LocalModelSpec`/`ResolvedFiles` and the command-line flag
`--NAME`), a title and the file to give for messages, a key only it has (to find it in any file,
after a prefix), its prefix in a ComfyUI all-in-one checkpoint, and the ComfyUI model folders and
usual file names the local backend looks for. Torch-free: nodes.py imports it through local/files.py.

The all-in-one prefixes are those of ComfyUI's `Flux` model and its text encoders
(https://github.com/comfyanonymous/ComfyUI/blob/master/comfy/supported_models.py); the file names
are those of the public FLUX.1-schnell release and of ComfyUI's examples.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Component:
    """One network of FLUX.1 [schnell]: how to name it, find it in a file, and find its file."""

    name: str  # "transformer", "t5", "clip" or "ae"
    title: str  # for messages
    file_hint: str  # the file a user should give instead
    marker: str  # a key (after the prefix) that only this network has
    comfy_prefix: str  # its prefix in a ComfyUI all-in-one checkpoint
    folders: tuple[str, ...]  # ComfyUI model folders to look in, in order
    patterns: tuple[str, ...]  # usual file names (fnmatch, lower case), most specific first

    @property
    def flag(self) -> str:
        """The command-line flag that names its file."""
        return f"--{self.name}"


TRANSFORMER = Component(
    name="transformer",
    title="FLUX.1 [schnell] transformer",
    file_hint="flux1-schnell.safetensors or a flux1-schnell GGUF (models/diffusion_models)",
    marker="double_blocks.0.img_attn.qkv.weight",
    comfy_prefix="model.diffusion_model.",
    folders=("diffusion_models", "unet"),
    patterns=(
        "flux1-schnell.safetensors",
        "flux1-schnell*.safetensors",
        "flux1_schnell*.safetensors",
        "flux-schnell*.safetensors",
        "flux1-schnell*.sft",
        "flux1-schnell*.gguf",  # city96's GGUF files (ComfyUI-GGUF)
        "flux1_schnell*.gguf",
    ),
)
T5 = Component(
    name="t5",
    title="T5-XXL text encoder",
    file_hint=(
        "t5xxl_fp16.safetensors, t5xxl_fp8_e4m3fn(_scaled).safetensors or a T5-XXL encoder GGUF "
        "(models/text_encoders)"
    ),
    marker="encoder.block.0.layer.0.SelfAttention.q.weight",
    comfy_prefix="text_encoders.t5xxl.transformer.",
    folders=("text_encoders", "clip"),
    patterns=("t5xxl_fp16.safetensors", "t5xxl*.safetensors", "t5*xxl*.safetensors", "t5*xxl*.gguf"),
)
CLIP = Component(
    name="clip",
    title="CLIP-L text encoder",
    file_hint="clip_l.safetensors (models/text_encoders)",
    marker="text_model.encoder.layers.0.self_attn.q_proj.weight",
    comfy_prefix="text_encoders.clip_l.transformer.",
    folders=("text_encoders", "clip"),
    patterns=("clip_l.safetensors", "clip_l*.safetensors", "clip-l*.safetensors"),
)
AE = Component(
    name="ae",
    title="FLUX.1 autoencoder (VAE)",
    file_hint="ae.safetensors (models/vae)",
    marker="decoder.mid.block_1.conv1.weight",
    comfy_prefix="vae.",
    folders=("vae",),
    patterns=("ae.safetensors", "ae.sft", "flux*ae*.safetensors", "flux*vae*.safetensors"),
)
COMPONENTS = (TRANSFORMER, T5, CLIP, AE)
"""In the order the local backend resolves and reports them."""

CHECKPOINT_PATTERNS = ("flux1-schnell*.safetensors", "flux1_schnell*.safetensors")
"""Usual names of an all-in-one checkpoint (models/checkpoints) holding all four networks."""
