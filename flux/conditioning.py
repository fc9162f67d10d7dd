"""Prompt encoding: prompts -> (txt, vec), the two text inputs of the FLUX transformer.

Follows the reference `HFEmbedder` (src/flux/modules/conditioner.py in
https://github.com/black-forest-labs/flux):
- txt = the T5 encoder's last hidden state (after its final norm) for ids padded to 256, computed
  with NO attention mask (padding tokens are attended), shape (B, 256, 4096);
- vec = CLIP's pooled output (final-norm hidden state at the end-of-text token, not the projected
  text embedding), shape (B, 768);
both cast to the requested dtype. The matching txt_ids (all zeros) are the sampler's business.

T5 never computes in fp16 (its feed-forward activations overflow it); see `t5_compute_dtype`.
"""

from __future__ import annotations

import torch

from ..errors import InvalidInputError
from .clip import CLIPTextEncoder
from .t5 import T5Encoder
from .tokenizers import PromptTokenizer, check_prompts


def t5_compute_dtype(dtype: torch.dtype, device: torch.device | str) -> torch.dtype:
    """The dtype T5 computes in when `dtype` is wanted: bf16 or fp32, never fp16.

    fp32 stays fp32 and bf16 stays bf16; fp16 becomes bf16 where the device has it natively (CUDA
    Ampere or newer, AMD, or the CPU) and fp32 otherwise (Turing, Volta).
    """
    if dtype in (torch.float32, torch.bfloat16):
        return dtype
    if dtype != torch.float16:
        raise InvalidInputError(
            f"text encoder dtype must be torch.float32, torch.bfloat16 or torch.float16, got {dtype}"
        )
    device = torch.device(device)
    # The capability, not `is_bf16_supported()`, which also says yes for emulated bf16 (Turing, Volta)
    nvidia = device.type == "cuda" and torch.version.hip is None
    if nvidia and torch.cuda.get_device_capability(device)[0] < 8:
        return torch.float32
    return torch.bfloat16


@torch.inference_mode()
def encode_prompts(
    t5: T5Encoder,
    clip: CLIPTextEncoder,
    t5_tokenizer: PromptTokenizer,
    clip_tokenizer: PromptTokenizer,
    prompts: list[str],
    device: torch.device | str,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode `prompts` into txt (B, L_t, 4096) and vec (B, 768), both in `dtype` on `device`.

    L_t is the T5 tokenizer's max_length (256 for schnell). The encoders' weights must already be
    on `device` (or be moved there by the caller's offloading); they compute in `dtype`, except that
    T5 uses `t5_compute_dtype(dtype, device)`.
    """
    prompts = check_prompts(prompts)
    t5_ids = t5_tokenizer(prompts).to(device)  # (B, L_t)
    clip_ids = clip_tokenizer(prompts).to(device)  # (B, 77)
    txt = t5(t5_ids, dtype=t5_compute_dtype(dtype, device)).to(dtype)  # (B, L_t, d_model)
    _, vec = clip(clip_ids, dtype=dtype)  # (B, hidden)
    return txt, vec.to(dtype)
