"""Tests of flux/rope.py: RoPE and the timestep embedding against independent formulas."""

from __future__ import annotations

import torch
from comfyui_flux_schnell.flux.rope import apply_rope, rope_table, timestep_embedding


def test_rope_rotates_interleaved_pairs_by_axis_angles():
    axes, theta = (4, 6, 6), 10_000
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 20, (2, 5, 3), generator=gen).float()
    x = torch.randn(2, 5, 3, sum(axes), generator=gen)  # (B, L, H, D)
    out = apply_rope(x, rope_table(ids, axes, theta))
    # independent reference: pair p of axis a is the complex number x[2p] + i x[2p+1] times e^{i angle}
    angles = torch.cat(
        [
            ids[..., a, None].double() * theta ** (-torch.arange(0, d, 2).double() / d)
            for a, d in enumerate(axes)
        ],
        dim=-1,
    )  # (B, L, D/2)
    z = torch.view_as_complex(x.double().view(2, 5, 3, -1, 2).contiguous())
    want = torch.view_as_real(z * torch.polar(torch.ones_like(angles), angles)[:, :, None]).flatten(-2)
    torch.testing.assert_close(out.double(), want, rtol=0, atol=1e-5)


def test_rope_leaves_zero_ids_unrotated_and_keeps_bf16():
    x = torch.randn(1, 4, 2, 32, dtype=torch.bfloat16)
    out = apply_rope(x, rope_table(torch.zeros(1, 4, 3), (8, 12, 12), 10_000))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, x, rtol=0, atol=0)


def test_timestep_embedding_is_cos_first_with_factor_1000():
    t = torch.tensor([0.0, 0.25, 1.0])
    emb = timestep_embedding(t, 8)
    freqs = torch.tensor([10_000 ** (-k / 4) for k in range(4)])
    args = 1000 * t[:, None] * freqs
    torch.testing.assert_close(emb, torch.cat((args.cos(), args.sin()), -1))


def test_timestep_embedding_rounds_like_the_reference_in_bf16():
    emb = timestep_embedding(torch.tensor([0.75], dtype=torch.bfloat16), 256)
    want = timestep_embedding(torch.tensor([0.752]), 256).bfloat16()  # 1000 * 0.75 is 752 in bf16
    assert emb.dtype == torch.bfloat16
    torch.testing.assert_close(emb, want, rtol=0, atol=0)
