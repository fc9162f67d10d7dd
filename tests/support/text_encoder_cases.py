"""Test helper: small T5 and CLIP configs, seeded random weights and token rows for the text-encoder
tests (test_t5.py, test_clip.py, test_ops.py, test_conditioning.py).

The configs are deliberately uneven, unlike tiny_models.py's (which keep the real head widths the
loader's config inference assumes): T5's attention inner width (4 heads x 6 = 24) differs from its
model width 32, CLIP's MLP is 37 wide, and T5 has 8 relative-position buckets up to distance 16, so
a sequence of 40 tokens reaches both the log-spaced and the last bucket. Vocabulary sizes match
tiny_tokenizers.py.
"""

from __future__ import annotations

import torch
from comfyui_flux_schnell.flux.clip import CLIPTextConfig
from comfyui_flux_schnell.flux.t5 import T5Config

from .tiny_tokenizers import CLIP_VOCAB_SIZE, T5_VOCAB_SIZE

TOL = 1e-5
"""Largest |difference| allowed between two fp32 computations of the same encoder output."""

UNEVEN_T5 = T5Config(
    vocab_size=T5_VOCAB_SIZE,
    d_model=32,
    d_kv=6,  # inner width 4 * 6 = 24 differs from d_model on purpose
    d_ff=40,
    num_layers=3,
    num_heads=4,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=16,
)
UNEVEN_CLIP = CLIPTextConfig(
    vocab_size=CLIP_VOCAB_SIZE,
    hidden_size=32,
    intermediate_size=37,
    num_layers=2,
    num_heads=4,
    max_position_embeddings=16,
)


def randomise_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Give every parameter seeded random values; norm scales 1 + 0.2*N so a lost scale shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * noise)
            else:
                p.copy_(0.2 * noise)
    return model


def t5_ids(lengths: list[int], total: int, vocab: int, seed: int) -> torch.LongTensor:
    """T5-style rows: `n` random tokens, </s> (1), then <pad> (0) up to `total`."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(lengths), total, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, :n] = torch.randint(3, vocab, (n,), generator=gen)
        ids[row, n] = 1
    return ids


def clip_ids(lengths: list[int], total: int, vocab: int, seed: int) -> torch.LongTensor:
    """CLIP-style rows: BOS (vocab-2), `n` random tokens, then EOS (vocab-1) as end and padding."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.full((len(lengths), total), vocab - 1, dtype=torch.long)
    ids[:, 0] = vocab - 2
    for row, n in enumerate(lengths):
        ids[row, 1 : n + 1] = torch.randint(0, vocab - 2, (n,), generator=gen)
    return ids


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """||approx - exact|| / ||exact||, computed in fp32."""
    return ((approx.float() - exact.float()).norm() / exact.float().norm()).item()
