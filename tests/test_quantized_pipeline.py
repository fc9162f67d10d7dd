"""The local pipeline end to end on quantized files: GGUF (alone and mixed with safetensors) and
ComfyUI's scaled fp8 make exactly the images of the fp32 pipeline on the dequantized weights."""

from __future__ import annotations

import pytest
import torch
from support import tiny_models as tm
from support.tiny_scaled_fp8 import scaled_fp8
from support.tiny_tokenizers import write_flux_repo_tree
from test_local_backend import run, spec_for
from test_scaled_fp8 import write

try:  # the GGUF cases need the gguf package (its writer); the scaled fp8 one does not
    from support import tiny_gguf as tg
except ImportError:
    tg = None
needs_gguf = pytest.mark.skipif(tg is None, reason="needs the gguf package")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_flux_quantized")
    write_flux_repo_tree(folder)  # tokenizer/ and tokenizer_2/ beside the weights
    return folder


pytestmark = pytest.mark.usefixtures("fresh_local_cache")


def fp32_set(folder, transformer, t5, clip, ae):
    """A safetensors set in fp32 of these weights: the reference pipeline."""
    return tm.TinyModelFiles(
        folder=folder,
        dtype=torch.float32,
        transformer=tm.save(folder / "ref_transformer.safetensors", transformer),
        t5=tm.save(folder / "ref_t5.safetensors", t5),
        clip=tm.save(folder / "ref_clip.safetensors", clip),
        ae=tm.save(folder / "ref_ae.safetensors", ae),
        all_in_one=folder / "unused",
    )


@needs_gguf
def test_gguf_transformer_and_t5_with_safetensors_clip_and_ae(model_dir, tmp_path):
    clip, ae = tm.clip_weights(), tm.autoencoder_weights()
    flux_ref = tg.write_flux_gguf(tmp_path / "flux1-schnell-Q4_K_S.gguf", tm.transformer_weights(), "Q4_K")
    t5_ref = tg.write_t5_gguf(tmp_path / "t5-v1_1-xxl-encoder-Q8_0.gguf", tm.t5_weights(), "Q8_0")
    mixed = tm.TinyModelFiles(
        folder=tmp_path,
        dtype=torch.float32,
        transformer=tmp_path / "flux1-schnell-Q4_K_S.gguf",
        t5=tmp_path / "t5-v1_1-xxl-encoder-Q8_0.gguf",
        clip=tm.save(tmp_path / "clip_l.safetensors", clip),
        ae=tm.save(tmp_path / "ae.safetensors", ae),
        all_in_one=tmp_path / "unused",
    )
    images, info = run(spec_for(mixed, model_dir), seed=5, batch=2)
    expected, _ = run(spec_for(fp32_set(tmp_path, flux_ref, t5_ref, clip, ae), model_dir), seed=5, batch=2)
    assert images.std() > 0
    assert torch.equal(images, expected)
    assert "float32" in info.device


def test_scaled_fp8_transformer_and_t5(model_dir, tmp_path):
    clip, ae = tm.clip_weights(), tm.autoencoder_weights()
    flux, _, flux_ref = scaled_fp8(tm.transformer_weights())
    t5, metadata, t5_ref = scaled_fp8(tm.t5_weights(), form="metadata", seed=1)
    scaled = tm.TinyModelFiles(
        folder=tmp_path,
        dtype=torch.float8_e4m3fn,
        transformer=write(tmp_path / "flux1-schnell-fp8_scaled.safetensors", flux),
        t5=write(tmp_path / "t5xxl_fp8_e4m3fn_scaled.safetensors", t5, metadata),
        clip=tm.save(tmp_path / "clip_l.safetensors", clip),
        ae=tm.save(tmp_path / "ae.safetensors", ae),
        all_in_one=tmp_path / "unused",
    )
    images, _ = run(spec_for(scaled, model_dir), seed=7)
    expected, _ = run(spec_for(fp32_set(tmp_path, flux_ref, t5_ref, clip, ae), model_dir), seed=7)
    assert images.std() > 0
    assert torch.equal(images, expected)


@needs_gguf
def test_gguf_files_from_the_command_line(tmp_path):
    from comfyui_flux_schnell.cli import main

    files = tm.write_tiny_models(tmp_path)
    clip_tok, t5_tok = write_flux_repo_tree(tmp_path)
    tg.write_flux_gguf(tmp_path / "flux1-schnell-Q4_K_S.gguf", tm.transformer_weights(), "Q4_K")
    tg.write_t5_gguf(tmp_path / "t5-v1_1-xxl-encoder-Q5_0.gguf", tm.t5_weights(), "Q5_0")
    out = tmp_path / "fox.png"
    args = ["generate", "--backend", "local", "--prompt", "a fox", "--out", str(out), "--device", "cpu"]
    args += ["--transformer", str(tmp_path / "flux1-schnell-Q4_K_S.gguf")]
    args += ["--t5", str(tmp_path / "t5-v1_1-xxl-encoder-Q5_0.gguf"), "--clip", str(files.clip)]
    args += ["--ae", str(files.ae), "--t5-tokenizer", str(t5_tok), "--clip-tokenizer", str(clip_tok)]
    args += ["--width", "256", "--height", "256", "--steps", "1"]
    assert main(args) == 0
    assert out.stat().st_size > 0
