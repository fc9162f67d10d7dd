"""Tests of flux/sampling.py: noise, schedule, packing, ids, the Euler loop and decoding.

Expected values are re-derived here from the reference's formulas (flux-architecture.md §3-5, §7),
not taken from the code under test.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from comfyui_flux_schnell.errors import InvalidInputError
from comfyui_flux_schnell.flux import sampling
from comfyui_flux_schnell.flux.autoencoder import AutoEncoder
from comfyui_flux_schnell.flux.model import Flux
from support.tiny_models import TINY_AE, TINY_FLUX, autoencoder_weights, transformer_weights


def reference_noise(num, height, width, seed, dtype):
    """BFL's get_noise: one CPU generator for the whole batch, sizes rounded up to 16."""
    return torch.randn(
        num,
        16,
        2 * math.ceil(height / 16),
        2 * math.ceil(width / 16),
        dtype=dtype,
        generator=torch.Generator("cpu").manual_seed(seed),
    )


# --- noise ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("height", "width"), [(64, 64), (48, 80), (1000, 1000), (17, 33), (1360, 768)])
def test_noise_matches_reference_formula(height, width, dtype):
    noise = sampling.get_noise(1, height, width, seed=1234, dtype=dtype)
    expected = reference_noise(1, height, width, 1234, dtype)
    assert noise.shape == (1, 16, 2 * math.ceil(height / 16), 2 * math.ceil(width / 16))
    assert noise.dtype == dtype
    assert torch.equal(noise, expected)


def test_batch_noise_is_single_noise_of_seed_plus_i():
    batch = sampling.get_noise(3, 32, 48, seed=7)
    assert batch.shape == (3, 16, 4, 6)
    for i in range(3):
        assert torch.equal(batch[i : i + 1], reference_noise(1, 32, 48, 7 + i, torch.float32))
    assert not torch.equal(batch[0], batch[1])


def test_noise_seed_wraps_at_2_64_and_goes_to_device():
    last = 2**64 - 1
    batch = sampling.get_noise(2, 16, 16, seed=last, device=torch.device("cpu"))
    assert torch.equal(batch[1:], sampling.get_noise(1, 16, 16, seed=0))
    assert batch.device.type == "cpu"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"seed": -1}, "seed"),
        ({"seed": 2**64}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"seed": True}, "seed"),
        ({"num": 0}, "number of images"),
        ({"height": 0}, "height"),
        ({"width": "64"}, "width"),
    ],
)
def test_noise_refuses_bad_arguments(kwargs, message):
    args = {"num": 1, "height": 64, "width": 64, "seed": 0, **kwargs}
    with pytest.raises(InvalidInputError, match=message):
        sampling.get_noise(args["num"], args["height"], args["width"], args["seed"])


@pytest.mark.parametrize(
    ("height", "width", "message"),
    [
        (1000, 1024, "height 1000 is not a multiple of 16.*992 or 1008"),
        (1024, 1023, "width 1023 is not a multiple of 16.*1008 or 1024"),
        (8, 64, "height must be an integer of at least 16"),
        (64.0, 64, "height must be an integer"),
    ],
)
def test_check_image_size_names_size_and_nearest_multiples(height, width, message):
    with pytest.raises(InvalidInputError, match=message):
        sampling.check_image_size(height, width)


def test_check_image_size_accepts_multiples_of_16():
    sampling.check_image_size(1024, 16)
    sampling.check_image_size(1360, 768)


# --- schedule ------------------------------------------------------------------------------------


def test_schedule_values():
    assert sampling.get_schedule(4) == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert sampling.get_schedule(1) == [1.0, 0.0]
    eight = sampling.get_schedule(8)
    assert len(eight) == 9
    assert eight == pytest.approx([1 - i / 8 for i in range(9)], abs=1e-7)


@pytest.mark.parametrize("steps", [0, -2, 2.0, None])
def test_schedule_refuses_bad_steps(steps):
    with pytest.raises(InvalidInputError, match="steps"):
        sampling.get_schedule(steps)


# --- packing and ids -----------------------------------------------------------------------------


def test_pack_index_layout():
    b, c, h, w = 2, 16, 6, 8  # a 48x64 image
    latent = torch.randn(b, c, h, w, generator=torch.Generator().manual_seed(0))
    packed = sampling.pack(latent)
    assert packed.shape == (b, (h // 2) * (w // 2), c * 4)
    for i in range(h // 2):
        for j in range(w // 2):
            token = i * (w // 2) + j
            for ch in range(c):
                for ph in range(2):
                    for pw in range(2):
                        feature = ch * 4 + ph * 2 + pw
                        assert torch.equal(packed[:, token, feature], latent[:, ch, 2 * i + ph, 2 * j + pw])


def test_unpack_inverts_pack():
    latent = torch.randn(3, 16, 10, 4, generator=torch.Generator().manual_seed(1))  # 80x32 image
    assert torch.equal(sampling.unpack(sampling.pack(latent), height=80, width=32), latent)


def test_unpack_rounds_size_up_like_reference():
    packed = torch.randn(1, 2 * 3, 64)  # ceil(20/16)=2 rows, ceil(40/16)=3 cols
    assert sampling.unpack(packed, height=20, width=40).shape == (1, 16, 4, 6)


def test_unpack_refuses_wrong_token_count():
    with pytest.raises(InvalidInputError, match=r"\(batch, 12, 4\*channels\)"):
        sampling.unpack(torch.zeros(1, 10, 64), height=48, width=64)


def test_image_ids_are_zero_row_col():
    ids = sampling.image_ids(2, height=48, width=80)  # 3 x 5 tokens
    assert ids.shape == (2, 15, 3)
    assert ids.dtype == torch.float32
    for i in range(3):
        for j in range(5):
            assert ids[:, i * 5 + j].tolist() == [[0.0, i, j]] * 2


def test_text_ids_are_zeros():
    ids = sampling.text_ids(2, 7)
    assert ids.shape == (2, 7, 3)
    assert not ids.any()


# --- the Euler loop ------------------------------------------------------------------------------


def tiny_flux() -> Flux:
    model = Flux(TINY_FLUX)
    model.load_state_dict(transformer_weights(seed=11))
    return model.eval()


def conditioning(batch=2, height=32, width=48, text_len=5):
    g = torch.Generator().manual_seed(3)
    img = sampling.pack(sampling.get_noise(batch, height, width, seed=5))
    txt = torch.randn(batch, text_len, TINY_FLUX.context_in_dim, generator=g)
    vec = torch.randn(batch, TINY_FLUX.vec_in_dim, generator=g)
    return {
        "img": img,
        "img_ids": sampling.image_ids(batch, height, width),
        "txt": txt,
        "txt_ids": sampling.text_ids(batch, text_len),
        "vec": vec,
    }


def test_denoise_matches_hand_written_euler_loop():
    model, c = tiny_flux(), conditioning()
    timesteps = sampling.get_schedule(4)
    calls = []

    def on_step(done, total, img):
        calls.append((done, total, img.clone()))

    result = sampling.denoise(model, **c, timesteps=timesteps, on_step=on_step)

    x = c["img"]
    expected_steps = []
    with torch.no_grad():
        for t_curr, t_prev in itertools.pairwise(timesteps):
            t = torch.full((x.shape[0],), t_curr)
            v = model(x, c["img_ids"], c["txt"], c["txt_ids"], t, c["vec"])
            x = x + (t_prev - t_curr) * v
            expected_steps.append(x)
    torch.testing.assert_close(result, x, atol=1e-5, rtol=1e-5)
    assert [(d, t) for d, t, _ in calls] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    for (_, _, seen), want in zip(calls, expected_steps, strict=True):
        torch.testing.assert_close(seen, want, atol=1e-5, rtol=1e-5)
    assert not torch.equal(result, c["img"])


@pytest.mark.parametrize(("txt_batch", "img_batch"), [(1, 2), (2, 1), (1, 1)])
def test_denoise_accepts_position_ids_shared_by_the_batch(txt_batch, img_batch):
    model, c = tiny_flux(), conditioning()
    timesteps = sampling.get_schedule(2)
    expected = sampling.denoise(model, **c, timesteps=timesteps)
    c["txt_ids"], c["img_ids"] = c["txt_ids"][:txt_batch], c["img_ids"][:img_batch]  # (1|2, L, 3)
    result = sampling.denoise(model, **c, timesteps=timesteps)
    torch.testing.assert_close(result, expected, atol=1e-6, rtol=1e-6)


class ConstantVelocity(torch.nn.Module):
    """A stand-in transformer that records its times and predicts velocity 1 everywhere."""

    def __init__(self):
        super().__init__()
        self.times = []

    def rope(self, ids):
        return None

    def forward(self, img, img_ids, txt, txt_ids, timesteps, y, pe=None):
        self.times.append((timesteps.dtype, timesteps.tolist()))
        return torch.ones_like(img)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_denoise_euler_arithmetic_and_time_dtype(dtype):
    model, c = ConstantVelocity(), conditioning(batch=3)
    img = c.pop("img").to(dtype)
    result = sampling.denoise(model, img, **c, timesteps=sampling.get_schedule(4))
    assert model.times == [(dtype, [t] * 3) for t in (1.0, 0.75, 0.5, 0.25)]
    torch.testing.assert_close(result, img - 1)  # the steps' dt sum to -1
    assert result.dtype == dtype


def test_on_step_may_stop_the_loop():
    model, c = ConstantVelocity(), conditioning(batch=1)

    class Stop(Exception):
        pass

    def stop_after_two(done, total, img):
        if done == 2:
            raise Stop

    with pytest.raises(Stop):
        sampling.denoise(model, **c, timesteps=sampling.get_schedule(4), on_step=stop_after_two)
    assert len(model.times) == 2


# --- decoding ------------------------------------------------------------------------------------


def test_decode_to_images_layout_range_and_values():
    ae = AutoEncoder(TINY_AE)
    ae.load_state_dict(autoencoder_weights(seed=4))
    ae.eval()
    g = torch.Generator().manual_seed(8)
    x = 3 * torch.randn(2, 2 * 3, 64, generator=g)  # a 32x48 image; large so some pixels clip

    images = sampling.decode_to_images(ae, x, height=32, width=48)

    assert images.shape == (2, 32, 48, 3)
    assert images.dtype == torch.float32
    assert images.device.type == "cpu"
    with torch.no_grad():
        z = x.reshape(2, 2, 3, 16, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(2, 16, 4, 6)
        pixels = ae.decode(z)
    expected = ((pixels.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1)
    torch.testing.assert_close(images, expected)
    assert images.min() >= 0
    assert images.max() <= 1
    assert (pixels.abs() > 1).any(), "the test should exercise the clamp"


def test_decode_in_bfloat16():
    ae = AutoEncoder(TINY_AE)
    ae.load_state_dict(autoencoder_weights(seed=4))
    x = torch.randn(1, 4, 64, generator=torch.Generator().manual_seed(2))
    images = sampling.decode_to_images(ae.eval(), x, 32, 32, dtype=torch.bfloat16)
    reference = sampling.decode_to_images(ae, x, 32, 32)
    assert images.dtype == torch.float32
    torch.testing.assert_close(images, reference, atol=0.05, rtol=0)
