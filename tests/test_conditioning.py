"""Tests of flux/conditioning.py: `t5_compute_dtype` picks the dtype T5 runs in, and `encode_prompts`
composes the tokenizers and the T5 and CLIP encoders as the reference `HFEmbedder` does.
"""

from __future__ import annotations

import pytest
import torch
from comfyui_flux_schnell.errors import InvalidInputError
from comfyui_flux_schnell.flux.clip import CLIPTextEncoder
from comfyui_flux_schnell.flux.conditioning import encode_prompts, t5_compute_dtype
from comfyui_flux_schnell.flux.t5 import T5Encoder
from comfyui_flux_schnell.flux.tokenizers import load_clip_tokenizer, load_t5_tokenizer
from support.text_encoder_cases import UNEVEN_CLIP, UNEVEN_T5, randomise_
from support.tiny_tokenizers import write_clip_tokenizer, write_t5_tokenizer


@pytest.mark.parametrize(
    ("dtype", "device", "expected"),
    [
        (torch.float32, "cpu", torch.float32),
        (torch.bfloat16, "cpu", torch.bfloat16),
        (torch.float16, "cpu", torch.bfloat16),
    ],
)
def test_t5_compute_dtype(dtype, device, expected):
    assert t5_compute_dtype(dtype, device) == expected


def test_t5_compute_dtype_rejects_other_dtypes():
    with pytest.raises(InvalidInputError, match="float64"):
        t5_compute_dtype(torch.float64, "cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_encode_prompts_composes_tokenizers_and_encoders(tmp_path, dtype):
    clip_tok = load_clip_tokenizer(write_clip_tokenizer(tmp_path / "clip"), max_length=16)
    t5_tok = load_t5_tokenizer(write_t5_tokenizer(tmp_path / "t5"), max_length=24)
    t5 = randomise_(T5Encoder(UNEVEN_T5), seed=13).eval()
    clip = randomise_(CLIPTextEncoder(UNEVEN_CLIP), seed=14).eval()
    prompts = ["a photo of a cat", "a red car in the forest at sunset, detailed painting"]

    txt, vec = encode_prompts(t5, clip, t5_tok, clip_tok, prompts, "cpu", dtype)

    assert txt.shape == (2, 24, UNEVEN_T5.d_model)
    assert vec.shape == (2, UNEVEN_CLIP.hidden_size)
    assert txt.dtype == dtype
    assert vec.dtype == dtype
    with torch.no_grad():
        expected_txt = t5(t5_tok(prompts), dtype=dtype)
        _, expected_vec = clip(clip_tok(prompts), dtype=dtype)
    assert torch.equal(txt, expected_txt)
    assert torch.equal(vec, expected_vec)
    assert not torch.equal(txt[0], txt[1])
    assert not torch.equal(vec[0], vec[1])


def test_encode_prompts_rejects_a_bare_string(tmp_path):
    clip_tok = load_clip_tokenizer(write_clip_tokenizer(tmp_path / "clip"), max_length=16)
    t5_tok = load_t5_tokenizer(write_t5_tokenizer(tmp_path / "t5"), max_length=24)
    with pytest.raises(InvalidInputError, match="list"):
        encode_prompts(
            T5Encoder(UNEVEN_T5),
            CLIPTextEncoder(UNEVEN_CLIP),
            t5_tok,
            clip_tok,
            "a cat",
            "cpu",
            torch.float32,
        )
