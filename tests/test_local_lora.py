"""LoRAs in the local backend and on the command line (local/lora.py, local_backend.py, cli.py).

- `--lora FILE[:STRENGTH]`: the strength is read from the last colon only when it is a number, so
  Windows paths and names with colons work; the strength range and the api backend are refused;
- runs with LoRAs on the tiny models: a LoRA changes the image, strength 0 and removal give the
  base image exactly, changing LoRAs or strengths reads no base weight file and copies no weight,
  a LoRA that does not fit fails before sampling and the next run works;
- adapters follow their model when the memory policy moves it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy
import pytest
import torch
from comfyui_flux_schnell import local_backend
from comfyui_flux_schnell.cli import main
from comfyui_flux_schnell.comfy_bridge import Progress
from comfyui_flux_schnell.errors import InvalidInputError, LocalBackendUnavailable, ModelLoadError
from comfyui_flux_schnell.flux.clip import CLIPTextEncoder
from comfyui_flux_schnell.flux.model import Flux
from comfyui_flux_schnell.generation import GenerationRequest
from comfyui_flux_schnell.local import models as local_models
from comfyui_flux_schnell.local.files import LocalModelSpec
from comfyui_flux_schnell.local.lora import LoraChoice, parse_lora_option
from PIL import Image
from support.tiny_loras import kohya_tensors, linear_shapes, random_lora, save_lora
from support.tiny_models import TINY_CLIP, TINY_FLUX, write_tiny_models
from support.tiny_tokenizers import write_flux_repo_tree

SIZE = 256


# --- the command-line option -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "path", "strength"),
    [
        ("style.safetensors", "style.safetensors", 1.0),
        ("style.safetensors:0.5", "style.safetensors", 0.5),
        ("style.safetensors:-1.25", "style.safetensors", -1.25),
        ("style.safetensors:+2", "style.safetensors", 2.0),
        ("style.safetensors:.5e1", "style.safetensors", 5.0),
        ("C:\\loras\\style.safetensors", "C:\\loras\\style.safetensors", 1.0),
        ("C:\\loras\\style.safetensors:0.7", "C:\\loras\\style.safetensors", 0.7),
        ("D:/loras/v2:final.safetensors", "D:/loras/v2:final.safetensors", 1.0),
        ("lora:v1.safetensors:-0.3", "lora:v1.safetensors", -0.3),
        ("weird:nan", "weird:nan", 1.0),  # not a plain number: part of the name
    ],
)
def test_lora_option_reads_the_strength_from_the_last_colon_only_when_numeric(text, path, strength):
    choice = parse_lora_option(text)
    assert (choice.path, choice.strength) == (Path(path), strength)


def test_an_existing_file_named_like_a_strength_is_taken_whole(tmp_path):
    odd = tmp_path / "take:2"
    odd.write_bytes(b"")
    assert parse_lora_option(str(odd)) == LoraChoice(odd, 1.0)


@pytest.mark.parametrize(
    ("strength", "message"), [(10.5, "lie in"), (float("inf"), "a number"), (True, "number")]
)
def test_strengths_outside_the_range_are_refused(strength, message):
    with pytest.raises(InvalidInputError, match=message):
        LoraChoice(Path("a.safetensors"), strength)


def test_lora_option_errors_exit_2_with_the_reason(tmp_path, capsys):
    base = ["generate", "--prompt", "x", "--out", str(tmp_path / "x.png")]
    with pytest.raises(SystemExit) as caught:
        main([*base, "--backend", "local", "--lora", "a.safetensors:11"])
    assert caught.value.code == 2
    assert "LoRA strength must lie in [-10, 10], got 11" in capsys.readouterr().err
    with pytest.raises(SystemExit) as caught:
        main([*base, "--backend", "api", "--lora", "a.safetensors"])
    assert caught.value.code == 2
    assert "--lora needs --backend local" in capsys.readouterr().err


# --- runs ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_lora")
    write_flux_repo_tree(folder)
    files = write_tiny_models(folder, torch.bfloat16)
    transformer = random_lora(linear_shapes(Flux(TINY_FLUX)), rank=4, seed=21, alpha=2.0)
    clip = random_lora(linear_shapes(CLIPTextEncoder(TINY_CLIP)), rank=2, seed=22)
    loras = {
        "style": save_lora(
            folder / "style.safetensors", kohya_tensors(transformer, clip), dtype=torch.bfloat16
        ),
        "blocks": save_lora(
            folder / "blocks.safetensors",
            kohya_tensors(
                random_lora(linear_shapes(Flux(TINY_FLUX), skip=("single", "final")), rank=8, seed=23)
            ),
        ),
    }
    wide = random_lora({"double_blocks.0.img_attn.qkv": (768, 3072)}, rank=2, seed=24)  # 3072 wide, not 256
    loras["wide"] = save_lora(folder / "wide.safetensors", kohya_tensors(wide))
    return folder, files, loras


pytestmark = pytest.mark.usefixtures("fresh_local_cache")


def spec_for(tiny, *loras: tuple[str, float]) -> LocalModelSpec:
    folder, files, paths = tiny
    return files.spec(folder, loras=tuple(LoraChoice(paths[name], strength) for name, strength in loras))


def run(spec, seed=3):
    request = GenerationRequest("a red fox", SIZE, SIZE, 1, seed, 1)
    return local_backend.generate_local(request, spec, Progress(1))


def test_loras_change_the_image_and_strength_zero_or_none_restore_it(tiny, monkeypatch):
    from comfyui_flux_schnell.flux import checkpoint, loading

    base_files = {str(p) for p in (tiny[1].transformer, tiny[1].t5, tiny[1].clip, tiny[1].ae)}
    base_reads: list[str] = []
    original_read_header = checkpoint.read_header

    def counting(path, *args, **kwargs):
        if str(path) in base_files:
            base_reads.append(str(path))
        return original_read_header(path, *args, **kwargs)

    loads = []
    for name in ("load_transformer", "load_t5", "load_clip", "load_autoencoder"):
        original = getattr(loading, name)
        monkeypatch.setattr(
            loading, name, lambda *a, _o=original, _n=name, **k: loads.append(_n) or _o(*a, **k)
        )
    monkeypatch.setattr(checkpoint, "read_header", counting)

    plain, _ = run(spec_for(tiny))
    assert sorted(loads) == ["load_autoencoder", "load_clip", "load_t5", "load_transformer"]
    reads_after_load = len(base_reads)
    assert reads_after_load >= 4
    weights = dict(local_models.MODEL_CACHE.loaded.transformer.cpu_tensors)

    styled, info = run(spec_for(tiny, ("style", 1.0)))
    stacked, _ = run(spec_for(tiny, ("style", 0.4), ("blocks", -0.8)))
    off, _ = run(spec_for(tiny, ("style", 0.0)))
    none_again, _ = run(spec_for(tiny))

    assert len(loads) == 4, "a LoRA change loaded a model again"
    assert len(base_reads) == reads_after_load, "a LoRA change read a base weight file"
    placed = local_models.MODEL_CACHE.loaded.transformer
    assert all(placed.cpu_tensors[k] is t for k, t in weights.items())  # no weight was copied
    assert json.loads(info.to_json())["loras"] == ["style.safetensors:1"]
    for a, b in ((plain, styled), (styled, stacked), (plain, stacked)):
        assert (a - b).abs().max() > 1 / 255
    assert torch.equal(off, plain)
    assert torch.equal(none_again, plain)


def test_a_lora_that_does_not_fit_fails_before_sampling_and_the_next_run_works(tiny):
    progress = Progress(2)
    request = GenerationRequest("a red fox", SIZE, SIZE, 2, 3, 1)
    with pytest.raises(ModelLoadError, match=r"wide\.safetensors.*do not fit"):
        local_backend.generate_local(request, spec_for(tiny, ("wide", 1.0)), progress)
    assert progress.done == 0
    images, info = run(spec_for(tiny, ("style", 1.0)))
    assert images.shape == (1, SIZE, SIZE, 3)
    assert json.loads(info.to_json())["loras"] == ["style.safetensors:1"]


def test_a_missing_lora_file_is_named_with_the_other_files(tiny, tmp_path):
    spec = spec_for(tiny)
    spec = spec.with_lora(LoraChoice(tmp_path / "gone.safetensors", 1.0))
    with pytest.raises(LocalBackendUnavailable, match=r"lora: .*gone\.safetensors does not exist"):
        run(spec)


def test_adapters_follow_their_model_between_devices(tiny, monkeypatch):
    from comfyui_flux_schnell.flux.lora import adapters

    spec = spec_for(tiny, ("style", 1.0))
    models, _ = local_models.MODEL_CACHE.load(spec.resolve(), spec.weight_dtype)
    local_models.set_loras(models, spec.loras, torch.float32)
    placed = models.transformer
    found = list(adapters(placed.module))
    assert found
    home = [(a.down, a.groups) for a in found]
    nbytes_without = local_models.module_bytes(placed.module)
    assert placed.nbytes == nbytes_without + sum(a.nbytes for a in found)
    monkeypatch.setattr(placed, "_tensors", lambda: iter(()))  # weights cannot go to "meta"; adapters can
    placed.to(torch.device("meta"))
    assert all(a.down.device.type == "meta" and a.groups[0].up.device.type == "meta" for a in found)
    placed.home()
    assert [(a.down, a.groups) for a in found] == home  # back to the same CPU tensors, no copy


def test_command_line_applies_loras_and_records_them(tiny, tmp_path):
    folder, files, loras = tiny
    args = [
        "generate",
        "--backend",
        "local",
        "--transformer",
        str(files.transformer),
        "--t5",
        str(files.t5),
        "--clip",
        str(files.clip),
        "--ae",
        str(files.ae),
        "--t5-tokenizer",
        str(folder / "tokenizer_2"),
        "--clip-tokenizer",
        str(folder / "tokenizer"),
        "--width",
        str(SIZE),
        "--height",
        str(SIZE),
        "--steps",
        "1",
        "--seed",
        "3",
        "--device",
        "cpu",
        "--prompt",
        "a red fox",
    ]
    lora_args = ["--lora", f"{loras['style']}:0.4", "--lora", str(loras["blocks"]) + ":-0.8"]
    assert main([*args, "--out", str(tmp_path / "lora.png"), *lora_args]) == 0
    with Image.open(tmp_path / "lora.png") as image:
        assert image.text["loras"] == "style.safetensors:0.4, blocks.safetensors:-0.8"
        with_lora = torch.from_numpy(numpy.array(image.convert("RGB"))).to(torch.int64)
    same, _ = run(spec_for(tiny, ("style", 0.4), ("blocks", -0.8)))
    assert torch.equal(with_lora.view(SIZE, SIZE, 3), (same[0] * 255).round().to(torch.int64))
