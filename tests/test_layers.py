"""Tests of flux/layers.py beyond the whole-model parity of test_flux_model.py."""

from __future__ import annotations

import pytest
import torch
from comfyui_flux_schnell.flux import layers


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_fallback_for_old_torch_matches_the_fused_norm(dtype, monkeypatch):
    x = torch.randn(2, 5, 3, 32, generator=torch.Generator().manual_seed(8)).to(dtype) * 3
    fused = layers.rms_normalize(x)
    monkeypatch.delattr(layers.F, "rms_norm")
    fallback = layers.rms_normalize(x)
    assert fallback.dtype == dtype
    want = x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(fallback, fused, rtol=0, atol=1e-6 if dtype == torch.float32 else 2e-2)
    torch.testing.assert_close(
        fallback.double(), want, rtol=1e-2 if dtype == torch.bfloat16 else 1e-6, atol=0
    )
