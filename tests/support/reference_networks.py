"""Reference networks with given (decoded) weights, and seeded inputs for them: what a network loaded
from a quantized file (GGUF, scaled fp8) must compute."""

from __future__ import annotations

import torch
from comfyui_flux_schnell.flux import sampling


def reference(build, config, weights: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The network with the decoded (fp32) weights: what a GGUF network must compute exactly."""
    with torch.device("meta"):
        model = build(config)
    model.load_state_dict(weights, assign=True)
    return model.requires_grad_(False).eval()


def flux_inputs(params, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(1, 16, params.in_channels, generator=g)  # a 64x64 image: 4x4 packed tokens
    txt = torch.randn(1, 8, params.context_in_dim, generator=g)
    vec = torch.randn(1, params.vec_in_dim, generator=g)
    return img, sampling.image_ids(1, 64, 64), txt, sampling.text_ids(1, 8), torch.tensor([0.7]), vec


def t5_ids(config, seed=0):
    return torch.randint(0, config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(seed))
