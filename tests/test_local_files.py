"""Which files the local backend picks, and what it says when it cannot find them."""

from __future__ import annotations

from pathlib import Path

import pytest
from comfyui_flux_schnell.errors import InvalidInputError, LocalBackendUnavailable
from comfyui_flux_schnell.local.files import LocalModelSpec
from support.tiny_tokenizers import write_comfyui_tree, write_flux_repo_tree


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


@pytest.fixture
def comfy_with_tokenizers(comfy, tmp_path):
    write_comfyui_tree(tmp_path / "pkg")
    comfy.comfy.__path__ = [str(tmp_path / "pkg" / "comfy")]
    return comfy


def test_finds_the_usual_names_in_comfyui_folders(comfy_with_tokenizers):
    models = comfy_with_tokenizers.models_dir
    transformer = _touch(models / "diffusion_models" / "flux1-schnell.safetensors")
    t5 = _touch(models / "text_encoders" / "t5xxl_fp16.safetensors")
    _touch(models / "text_encoders" / "t5xxl_fp8_e4m3fn.safetensors")
    clip = _touch(models / "text_encoders" / "clip_l.safetensors")
    ae = _touch(models / "vae" / "ae.safetensors")
    files = LocalModelSpec().resolve()
    assert (files.transformer, files.t5, files.clip, files.ae) == (
        transformer.resolve(),
        t5.resolve(),
        clip.resolve(),
        ae.resolve(),
    )
    assert files.clip_tokenizer.name == "sd1_tokenizer"
    assert files.t5_tokenizer.name == "t5_tokenizer"
    fp8 = LocalModelSpec(weight_dtype="fp8_e4m3fn").resolve()
    assert fp8.t5.name == "t5xxl_fp8_e4m3fn.safetensors"  # already fp8: no cast at load


def test_falls_back_to_an_all_in_one_checkpoint(comfy_with_tokenizers):
    models = comfy_with_tokenizers.models_dir
    checkpoint = _touch(models / "checkpoints" / "flux1-schnell-fp8.safetensors")
    clip = _touch(models / "text_encoders" / "clip_l.safetensors")
    files = LocalModelSpec().resolve()
    assert files.clip == clip.resolve()
    assert files.transformer == files.t5 == files.ae == checkpoint.resolve()


def test_missing_files_are_listed_with_where_they_were_looked_for(comfy_with_tokenizers):
    with pytest.raises(LocalBackendUnavailable) as info:
        LocalModelSpec().resolve()
    message = str(info.value)
    for expected in (
        "transformer (--transformer)",
        "flux1-schnell.safetensors",
        "t5xxl",
        "clip_l",
        "ae.safetensors",
        "diffusion_models",
        "checkpoints",
        "backend 'api'",
    ):
        assert expected in message


def test_outside_comfyui_the_flags_are_named(tmp_path):
    with pytest.raises(LocalBackendUnavailable, match="name the file with --t5") as info:
        LocalModelSpec(transformer=_touch(tmp_path / "f.safetensors")).resolve()
    message = str(info.value)
    # The command line's words: its flags and where the files come from, not ComfyUI's folders.
    for expected in (
        "--ae ae.safetensors",
        "black-forest-labs/FLUX.1-schnell",
        "flux_text_encoders",
        "--backend api",
    ):
        assert expected in message
    for comfy_words in ("models/diffusion_models", "backend 'api'", "comfy/sd1_tokenizer"):
        assert comfy_words not in message


def test_tokenizers_beside_the_transformer_as_in_the_flux_repository(tmp_path):
    write_flux_repo_tree(tmp_path / "FLUX.1-schnell")
    spec = LocalModelSpec(
        transformer=_touch(tmp_path / "FLUX.1-schnell" / "flux1-schnell.safetensors"),
        t5=_touch(tmp_path / "t5.safetensors"),
        clip=_touch(tmp_path / "clip.safetensors"),
        ae=_touch(tmp_path / "FLUX.1-schnell" / "ae.safetensors"),
    )
    files = spec.resolve()
    assert files.t5_tokenizer.name == "tokenizer_2"
    assert files.clip_tokenizer.name == "tokenizer"


def test_missing_tokenizers_and_paths_are_reported(tmp_path):
    spec = LocalModelSpec(
        transformer=_touch(tmp_path / "a.safetensors"),
        t5=tmp_path / "nope.safetensors",
        clip=_touch(tmp_path / "c.safetensors"),
        ae=_touch(tmp_path / "d.safetensors"),
    )
    with pytest.raises(LocalBackendUnavailable) as info:
        spec.resolve()
    assert "nope.safetensors does not exist" in str(info.value)
    assert "--t5-tokenizer" in str(info.value)


def test_node_names_resolve_through_comfyui(comfy):
    path = _touch(comfy.models_dir / "vae" / "ae.safetensors")
    spec = LocalModelSpec.from_node_inputs(
        checkpoint=None,
        transformer=None,
        t5=None,
        clip=None,
        vae="ae.safetensors",
        weight_dtype="bf16",
        memory="offload to CPU",
    )
    assert spec.ae == path
    with pytest.raises(InvalidInputError, match=r"'gone\.safetensors' is not in ComfyUI's vae"):
        LocalModelSpec.from_node_inputs(
            checkpoint=None,
            transformer=None,
            t5=None,
            clip=None,
            vae="gone.safetensors",
            weight_dtype="bf16",
            memory="auto",
        )


@pytest.mark.parametrize(("field", "value"), [("weight_dtype", "fp4"), ("memory", "lots")])
def test_bad_choices_are_refused(field, value):
    with pytest.raises(InvalidInputError, match=field):
        LocalModelSpec(**{field: value})
