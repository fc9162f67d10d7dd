"""The package as ComfyUI sees it: import, mappings, the whole input schema, validation."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest
from comfyui_flux_schnell.errors import InvalidInputError
from comfyui_flux_schnell.generation import GenerationInfo, GenerationRequest
from support import REPO
from support.workflow_tools import load_like_comfyui


def test_import_is_light_and_needs_no_comfyui():
    """Importing the package loads neither torch, requests, PIL nor ComfyUI."""
    code = (
        "import sys, comfyui_flux_schnell as p;"
        "heavy = [m for m in ('torch', 'requests', 'PIL', 'numpy', 'comfy', 'transformers') "
        "if m in sys.modules];"
        "print(sorted(p.NODE_CLASS_MAPPINGS), heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert (
        out.stdout.strip()
        == "['FluxSchnellDrafts', 'FluxSchnellGenerate', 'FluxSchnellLoRA', 'FluxSchnellLocalModel'] []"
    )


def test_loads_under_a_path_derived_module_name(comfy):
    module = load_like_comfyui(REPO)
    try:
        assert module.__name__ == str(REPO).replace(".", "_x_")
        assert set(module.NODE_CLASS_MAPPINGS) == {
            "FluxSchnellGenerate",
            "FluxSchnellLocalModel",
            "FluxSchnellDrafts",
            "FluxSchnellLoRA",
        }
        assert module.NODE_DISPLAY_NAME_MAPPINGS["FluxSchnellGenerate"] == "FLUX Schnell Generate"
        assert module.NODE_DISPLAY_NAME_MAPPINGS["FluxSchnellLocalModel"] == "FLUX Schnell Local Model"
        assert module.NODE_DISPLAY_NAME_MAPPINGS["FluxSchnellLoRA"] == "FLUX Schnell LoRA"
    finally:
        for key in [k for k in sys.modules if k.startswith(module.__name__)]:
            del sys.modules[key]


def _all_inputs(node_cls):
    spec = node_cls.INPUT_TYPES()
    for section in ("required", "optional"):
        yield from ((section, name, value) for name, value in spec.get(section, {}).items())


@pytest.mark.parametrize("node_name", ["FluxSchnellGenerate", "FluxSchnellLocalModel"])
def test_schema_is_complete_and_consistent(comfy_package, node_name):
    node = comfy_package.NODE_CLASS_MAPPINGS[node_name]
    assert node.DESCRIPTION
    assert node.CATEGORY.startswith("image/generation")
    assert callable(getattr(node(), node.FUNCTION))
    assert len(node.RETURN_TYPES) == len(node.RETURN_NAMES) == len(node.OUTPUT_TOOLTIPS)
    assert all(node.OUTPUT_TOOLTIPS)
    for section, name, (kind, options) in _all_inputs(node):
        assert options.get("tooltip"), f"{name} has no tooltip"
        if isinstance(kind, list):
            assert kind, f"{name}: empty choices"
            assert options["default"] in kind, f"{name}: default not among the choices"
        elif kind == "INT":
            assert options["min"] <= options["default"] <= options["max"], name
            assert options["step"] if name != "seed" else True
        elif section == "required":
            assert kind == "STRING", f"{name}: unexpected type {kind}"


def test_generate_inputs_mirror_the_api(comfy_package):
    node = comfy_package.NODE_CLASS_MAPPINGS["FluxSchnellGenerate"]
    spec = node.INPUT_TYPES()
    required = spec["required"]
    assert list(required) == [
        "prompt",
        "backend",
        "width",
        "height",
        "num_inference_steps",
        "seed",
        "batch_size",
    ]
    assert required["prompt"] == ("STRING", required["prompt"][1])
    assert required["prompt"][1]["multiline"] is True
    assert required["backend"][0] == ["api", "local"]
    for side in ("width", "height"):
        assert {k: required[side][1][k] for k in ("default", "min", "max", "step")} == {
            "default": 1024,
            "min": 256,
            "max": 2048,
            "step": 16,
        }
    steps = required["num_inference_steps"][1]
    assert (steps["default"], steps["min"], steps["max"]) == (4, 1, 8)
    seed = required["seed"][1]
    assert seed["control_after_generate"] is True
    assert (seed["min"], seed["max"]) == (0, 0xFFFFFFFFFFFFFFFF)
    batch = required["batch_size"][1]
    assert (batch["min"], batch["max"], batch["default"]) == (1, 16, 1)
    assert spec["optional"]["local_model"][0] == "FLUX_SCHNELL_MODEL"
    assert node.RETURN_TYPES == ("IMAGE", "STRING")
    no_key_input = [n for _, n, _ in _all_inputs(node) if "key" in n.lower()]
    assert no_key_input == [], "an API key must never be a widget"


def test_local_model_lists_comfyui_files(comfy, comfy_package):
    (comfy.models_dir / "diffusion_models" / "gguf").mkdir(parents=True)
    (comfy.models_dir / "diffusion_models" / "flux1-schnell.safetensors").write_bytes(b"")
    (comfy.models_dir / "diffusion_models" / "gguf" / "flux1-schnell-Q4_K_S.gguf").write_bytes(b"")
    (comfy.models_dir / "text_encoders").mkdir(parents=True)
    (comfy.models_dir / "text_encoders" / "t5-v1_1-xxl-encoder-Q8_0.gguf").write_bytes(b"")
    (comfy.models_dir / "text_encoders" / "clip_l.safetensors").write_bytes(b"")
    node = comfy_package.NODE_CLASS_MAPPINGS["FluxSchnellLocalModel"]
    required = node.INPUT_TYPES()["required"]
    # ComfyUI's own lists skip .gguf files; the node adds those of the folders ComfyUI-GGUF uses
    assert required["transformer"][0] == [
        "auto",
        "flux1-schnell.safetensors",
        "gguf/flux1-schnell-Q4_K_S.gguf",
    ]
    assert required["t5"][0] == ["auto", "clip_l.safetensors", "t5-v1_1-xxl-encoder-Q8_0.gguf"]
    assert required["vae"][0] == ["auto"]
    (spec,) = node().select(
        "none",
        "gguf/flux1-schnell-Q4_K_S.gguf",
        "t5-v1_1-xxl-encoder-Q8_0.gguf",
        "auto",
        "auto",
        "as stored",
        "auto",
    )
    assert spec.transformer == comfy.models_dir / "diffusion_models" / "gguf" / "flux1-schnell-Q4_K_S.gguf"
    assert spec.t5 == comfy.models_dir / "text_encoders" / "t5-v1_1-xxl-encoder-Q8_0.gguf"
    assert required["checkpoint"][0] == ["none"]
    assert node.RETURN_TYPES == ("FLUX_SCHNELL_MODEL",)


def test_lora_node_lists_comfyui_loras_and_chains(comfy, comfy_package):
    loras = comfy.models_dir / "loras"
    loras.mkdir(parents=True)
    (loras / "fox.safetensors").write_bytes(b"")
    (loras / "notes.txt").write_text("not a model")
    node = comfy_package.NODE_CLASS_MAPPINGS["FluxSchnellLoRA"]
    assert node.DESCRIPTION
    assert node.CATEGORY == comfy_package.nodes.CATEGORY
    assert (node.RETURN_TYPES, node.RETURN_NAMES) == (("FLUX_SCHNELL_MODEL",), ("local_model",))
    assert all(node.OUTPUT_TOOLTIPS)
    required = node.INPUT_TYPES()["required"]
    assert list(required) == ["local_model", "lora_name", "strength"]
    assert required["local_model"][0] == "FLUX_SCHNELL_MODEL"
    assert required["lora_name"][0] == ["fox.safetensors"]  # ComfyUI lists model files only
    strength = required["strength"]
    assert strength[0] == "FLOAT"
    assert {k: strength[1][k] for k in ("default", "min", "max", "step")} == {
        "default": 1.0,
        "min": -10.0,
        "max": 10.0,
        "step": 0.01,
    }
    assert all(options.get("tooltip") for _, options in required.values())

    spec_cls = comfy_package.local.files.LocalModelSpec
    base = spec_cls(weight_dtype="bf16")
    (one,) = node().apply(base, "fox.safetensors", 0.8)
    (two,) = node().apply(one, "fox.safetensors", -1.5)
    assert base.loras == ()  # the input is not changed
    assert [(c.path, c.strength) for c in two.loras] == [
        (loras / "fox.safetensors", 0.8),
        (loras / "fox.safetensors", -1.5),
    ]
    assert two.weight_dtype == "bf16"
    refused = comfy_package.errors.InvalidInputError
    with pytest.raises(refused, match=r"lora_name: 'gone.safetensors' is not in ComfyUI's loras"):
        node().apply(base, "gone.safetensors", 1.0)


def test_generate_refuses_loras_on_the_api_backend(comfy, comfy_package, tmp_path):
    lora = tmp_path / "fox.safetensors"
    lora.write_bytes(b"")
    spec = comfy_package.local.files.LocalModelSpec().with_lora(comfy_package.local.lora.LoraChoice(lora))
    node = comfy_package.NODE_CLASS_MAPPINGS["FluxSchnellGenerate"]
    with pytest.raises(comfy_package.errors.InvalidInputError, match="LoRAs run on the local backend only"):
        asyncio.run(node().generate("a fox", "api", 512, 512, 4, 1, 1, local_model=spec))


@pytest.mark.parametrize(("env", "compiled"), [(None, False), ("1", True), ("yes", True), ("0", False)])
def test_local_model_node_reads_the_compile_switch_from_the_environment(
    comfy, comfy_package, monkeypatch, env, compiled
):
    if env is None:
        monkeypatch.delenv("FLUX_SCHNELL_COMPILE", raising=False)
    else:
        monkeypatch.setenv("FLUX_SCHNELL_COMPILE", env)
    node = comfy_package.NODE_CLASS_MAPPINGS["FluxSchnellLocalModel"]()
    (spec,) = node.select("none", "auto", "auto", "auto", "auto", "as stored", "auto")
    assert spec.compile is compiled


GOOD = {"prompt": "a fox", "width": 1024, "height": 768, "steps": 4, "seed": 7, "batch_size": 2}


@pytest.mark.parametrize(
    ("change", "names"),
    [
        ({"prompt": "   "}, "prompt"),
        ({"width": 1000}, "width must be a multiple of 16"),
        ({"height": 128}, "height must be between 256 and 2048"),
        ({"width": 4096}, "width must be between"),
        ({"steps": 9}, "num_inference_steps must be between 1 and 8"),
        ({"steps": 0}, "num_inference_steps"),
        ({"seed": -1}, "seed must be between"),
        ({"batch_size": 17}, "batch_size must be between 1 and 16"),
        ({"width": 512.0}, "width must be a whole number"),
        ({"batch_size": True}, "batch_size must be a whole number"),
    ],
)
def test_validation_names_the_input_and_the_allowed_values(change, names):
    with pytest.raises(InvalidInputError, match=names):
        GenerationRequest(**{**GOOD, **change}).validate("api")


def test_validation_refuses_unknown_backend_and_accepts_good_input():
    with pytest.raises(InvalidInputError, match="backend must be one of api, local"):
        GenerationRequest(**GOOD).validate("cloud")
    assert GenerationRequest(**GOOD).validate("local").seeds == [7, 8]
    assert GenerationRequest("x", seed=2**64 - 1, batch_size=2).seeds == [2**64 - 1, 0]


def test_info_is_json_without_empty_fields():
    info = GenerationInfo("api", "flux-schnell", "p", 512, 512, 4, [1, 2], 1.23456, ["a", None])
    data = json.loads(info.to_json())
    assert data["seeds"] == [1, 2]
    assert data["seconds"] == 1.235
    assert data["request_ids"] == ["a", None]
    assert "device" not in data


def test_every_node_has_search_aliases(comfy_package):
    for name, node in comfy_package.NODE_CLASS_MAPPINGS.items():
        aliases = node.__dict__.get("SEARCH_ALIASES")  # on the class itself, as ComfyUI reads it
        assert isinstance(aliases, list), name
        assert aliases, name
        assert all(isinstance(a, str) and a == a.strip() and a for a in aliases), name
        assert len(set(aliases)) == len(aliases), name
        assert {"flux", "schnell"} <= set(aliases), name
