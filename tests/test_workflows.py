"""The saved workflows in workflows/: consistent, convertible, runnable, and free of secrets.

What CI can check without ComfyUI: each UI-format workflow agrees with the node schemas (ours from
INPUT_TYPES, ComfyUI's from tests/data/comfyui_core_nodes.json, recorded on a real server), its API
twin in workflows/api/ is exactly its conversion, and the API graph runs end to end in-process with
our nodes (loaded the ComfyUI way) against the loopback fake ImageAPI. The real-server proof is
scripts/comfyui_check.py; the `comfyui` test at the end runs it when COMFYUI_DIR is set.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys

import pytest
from support import TEST_KEY
from support import workflow_tools as wt

EXPECTED = {
    "flux_schnell_api",
    "flux_schnell_local",
    "flux_schnell_upscale",
    "flux_schnell_draft_board",
}
UI_PATHS = wt.ui_workflow_paths()
KEY_PATTERN = re.compile(r"sk_[A-Za-z0-9]{6,}")


@pytest.fixture(scope="module")
def record():
    return wt.load_core_record()


@pytest.fixture
def specs(comfy_package, record):
    own = wt.package_specs(comfy_package.NODE_CLASS_MAPPINGS, comfy_package.NODE_DISPLAY_NAME_MAPPINGS)
    return {**wt.core_specs(record), **own}


@pytest.fixture(scope="module")
def ui_only(record):
    return wt.ui_only_types(record)


def _ids(paths):
    return [p.stem for p in paths]


def test_every_workflow_is_there_with_its_api_twin():
    assert {p.stem for p in UI_PATHS} == EXPECTED
    twins = {p.name for p in wt.API_DIR.glob("*.json")}
    assert twins == {p.name for p in UI_PATHS}, "every UI workflow needs workflows/api/<same name>"


@pytest.mark.parametrize("path", UI_PATHS, ids=_ids(UI_PATHS))
def test_ui_workflow_agrees_with_node_schemas(path, specs, ui_only):
    assert wt.check_ui_workflow(wt.load_json(path), specs, ui_only) == []


@pytest.mark.parametrize("path", UI_PATHS, ids=_ids(UI_PATHS))
def test_core_nodes_and_inputs_exist_in_the_record(path, record, ui_only):
    own = {"FluxSchnellGenerate", "FluxSchnellLocalModel"}
    core = wt.core_specs(record)
    for node in wt.load_json(path)["nodes"]:
        if node["type"] in own or node["type"] in ui_only:
            continue
        assert node["type"] in core, f"{node['type']} is not a recorded ComfyUI core node"
        spec = core[node["type"]]
        for inp in node.get("inputs", []):
            declared = spec.input(inp["name"])
            assert declared is not None, f"{node['type']} has no input {inp['name']}"
            assert declared.type in (inp["type"], wt.ANY_TYPE)
        assert len(wt.split_widget_values(spec, node["widgets_values"])[0]) == len(spec.widgets)


@pytest.mark.parametrize("path", UI_PATHS, ids=_ids(UI_PATHS))
def test_api_twin_is_the_conversion_of_the_ui_graph(path, specs, ui_only):
    converted = wt.ui_to_api(wt.load_json(path), specs, ui_only)
    assert converted == wt.load_json(wt.api_twin_path(path))


@pytest.mark.parametrize("path", UI_PATHS, ids=_ids(UI_PATHS))
def test_notes_tell_how_to_set_the_key_and_hold_none(path):
    text = path.read_text(encoding="utf-8") + wt.api_twin_path(path).read_text(encoding="utf-8")
    assert not KEY_PATTERN.search(text), "a key-like string is in a workflow file"
    notes = [n for n in wt.load_json(path)["nodes"] if n["type"] in ("Note", "MarkdownNote")]
    assert notes, "each workflow explains itself in a note"
    assert all(n.get("title") for n in notes)
    api = wt.load_json(wt.api_twin_path(path))
    if any(n["inputs"].get("backend") == "api" for n in api.values()):
        assert "IMAGEAPI_API_KEY" in notes[0]["widgets_values"][0]


def test_draft_board_is_the_fast_preset_with_a_reusable_seed():
    ui = wt.load_json(wt.WORKFLOW_DIR / "flux_schnell_draft_board.json")
    gen = next(n for n in ui["nodes"] if n["type"] == "FluxSchnellGenerate")
    _prompt, _backend, width, height, steps, seed, control, batch = gen["widgets_values"]
    assert (width, height, steps, batch) == (512, 512, 4, 4)
    assert control == "randomize"
    assert isinstance(seed, int)
    note = next(n for n in ui["nodes"] if n["type"] == "MarkdownNote")["widgets_values"][0]
    for word in ("fixed", "batch_size", "info", "send_seed"):
        assert word in note
    kinds = {n["type"] for n in ui["nodes"]}
    assert {"PreviewImage", "PreviewAny"} <= kinds
    assert "SaveImage" not in kinds


# --- the checker and converter catch what they should -----------------------------------------


def _mutations():
    def widget(index, value):
        def apply(wf):
            node = next(n for n in wf["nodes"] if n["type"] == "FluxSchnellGenerate")
            node["widgets_values"][index] = value

        return apply

    def drop_control(wf):
        node = next(n for n in wf["nodes"] if n["type"] == "FluxSchnellGenerate")
        del node["widgets_values"][6]

    def link_type(wf):
        wf["links"][0][5] = "LATENT"

    def link_slot(wf):
        wf["links"][0][2] = 1  # the info output (STRING), not images

    def dangling(wf):
        next(n for n in wf["nodes"] if n["type"] == "SaveImage")["inputs"][0]["link"] = 99

    def unknown(wf):
        wf["nodes"][-1]["type"] = "KSamplerAdvancedTurbo"

    def duplicate_id(wf):
        wf["nodes"][-1]["id"] = wf["nodes"][-2]["id"]

    def combo(wf):
        node = next(n for n in wf["nodes"] if n["type"] == "FluxSchnellGenerate")
        node["widgets_values"][1] = "cloud"

    return {
        "width over max": (widget(2, 4096), "above the maximum"),
        "height not int": (widget(3, "1024"), "not an integer"),
        "steps under min": (widget(4, 0), "below the minimum"),
        "bad control": (widget(6, "sometimes"), "control of seed"),
        "missing control slot": (drop_control, "widgets_values"),
        "backend not a choice": (combo, "not one of"),
        "link type": (link_type, "type 'LATENT'"),
        "link from wrong slot": (link_slot, "output 1 is 'STRING'"),
        "dangling link": (dangling, "names link 99"),
        "unknown node": (unknown, "unknown node type"),
        "duplicate id": (duplicate_id, "not unique"),
    }


@pytest.mark.parametrize("case", list(_mutations()))
def test_checker_reports_a_broken_workflow(case, specs, ui_only):
    mutate, expected = _mutations()[case]
    wf = copy.deepcopy(wt.load_json(wt.WORKFLOW_DIR / "flux_schnell_api.json"))
    assert wt.check_ui_workflow(wf, specs, ui_only) == []
    mutate(wf)
    problems = wt.check_ui_workflow(wf, specs, ui_only)
    assert any(expected in p for p in problems), problems


def test_conversion_skips_the_control_slot_and_notes(specs, ui_only):
    wf = wt.load_json(wt.WORKFLOW_DIR / "flux_schnell_upscale.json")
    api = wt.ui_to_api(wf, specs, ui_only)
    assert all(n["class_type"] != "MarkdownNote" for n in api.values())
    gen = next(n for n in api.values() if n["class_type"] == "FluxSchnellGenerate")
    assert gen["inputs"]["seed"] == 42
    assert "control_after_generate" not in gen["inputs"]
    assert api["6"]["inputs"] == {"upscale_model": ["5", 0], "image": ["2", 0]}


def test_execution_order_refuses_a_cycle():
    api = {
        "1": {"class_type": "A", "inputs": {"x": ["2", 0]}},
        "2": {"class_type": "B", "inputs": {"y": ["1", 0]}},
    }
    with pytest.raises(ValueError, match="cycle"):
        wt.execution_order(api)


# --- running the API graphs in-process ---------------------------------------------------------

API_RUNS = [p for p in UI_PATHS if p.stem != "flux_schnell_local"]


def _classes(comfy_package, tmp_path, api):
    return {**comfy_package.NODE_CLASS_MAPPINGS, **wt.core_stand_ins(tmp_path / "out", api)}


def _check_images(result, api):
    for node_id, (count, width, height) in wt.expected_images(api).items():
        images = result.ui[node_id]["images"]
        assert len(images) == count, node_id
        from PIL import Image

        for saved in images:
            with Image.open(saved["path"]) as im:
                assert im.size == (width, height), (node_id, saved["path"])


@pytest.mark.parametrize("path", API_RUNS, ids=_ids(API_RUNS))
def test_api_workflow_runs_end_to_end(path, comfy_package, fake_api, tmp_path):
    api = wt.load_json(wt.api_twin_path(path))
    result = wt.run_api_graph(api, _classes(comfy_package, tmp_path, api))
    _check_images(result, api)
    gens = [n for n in api.values() if n["class_type"] == "FluxSchnellGenerate"]
    assert fake_api.generate_calls == sum(n["inputs"]["batch_size"] for n in gens)
    sent = [r.json for r in fake_api.requests_to("/api/v1/generate")]
    assert {(r["width"], r["height"]) for r in sent} == {
        (n["inputs"]["width"], n["inputs"]["height"]) for n in gens
    }
    assert all(r["prompt"] == gens[0]["inputs"]["prompt"] for r in sent)
    infos = [out[1] for nid, out in result.outputs.items() if api[nid]["class_type"] == gens[0]["class_type"]]
    assert TEST_KEY not in json.dumps(infos)


def test_draft_board_info_lists_the_seed_of_each_draft(comfy_package, fake_api, tmp_path):
    api = wt.load_json(wt.API_DIR / "flux_schnell_draft_board.json")
    result = wt.run_api_graph(api, _classes(comfy_package, tmp_path, api))
    shown = json.loads(result.ui["4"]["text"][0])
    seed = api["2"]["inputs"]["seed"]
    assert shown["seeds"] == [seed, seed + 1, seed + 2, seed + 3]
    assert (shown["width"], shown["height"], shown["steps"]) == (512, 512, 4)


def test_local_workflow_runs_end_to_end(comfy_package, comfy, tmp_path, monkeypatch):
    from support import tiny_models
    from support.tiny_tokenizers import write_comfyui_tree

    write_comfyui_tree(tmp_path / "pkg")  # ComfyUI's bundled tokenizer folders, tiny vocabularies
    if not hasattr(comfy.mm, "get_torch_device"):  # ComfyUI started with --cpu
        monkeypatch.setattr(comfy.mm, "get_torch_device", lambda: "cpu", raising=False)
    comfy.comfy.__path__ = [str(tmp_path / "pkg" / "comfy")]
    files = tiny_models.write_tiny_models(tmp_path / "tiny")
    models = comfy.models_dir
    for source, folder, name in (
        (files.transformer, "diffusion_models", "flux1-schnell.safetensors"),
        (files.t5, "text_encoders", "t5xxl_fp16.safetensors"),
        (files.clip, "text_encoders", "clip_l.safetensors"),
        (files.ae, "vae", "ae.safetensors"),
    ):
        (models / folder).mkdir(parents=True, exist_ok=True)
        source.replace(models / folder / name)
    api = copy.deepcopy(wt.load_json(wt.API_DIR / "flux_schnell_local.json"))
    gen = next(n for n in api.values() if n["class_type"] == "FluxSchnellGenerate")
    gen["inputs"].update(width=256, height=256)  # the saved 1024 x 1024 is slow for a CPU test
    result = wt.run_api_graph(api, _classes(comfy_package, tmp_path, api))
    _check_images(result, api)


# --- the real server ---------------------------------------------------------------------------


@pytest.mark.comfyui
@pytest.mark.slow
def test_real_comfyui_server(tmp_path):
    comfyui = os.environ.get("COMFYUI_DIR")
    if not comfyui:
        pytest.skip("set COMFYUI_DIR (and COMFYUI_PYTHON) to run the real-server proof")
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    done = subprocess.run(
        [python, "-m", "scripts.comfyui_check", "--comfyui", comfyui, "--python", python],
        cwd=wt.REPO,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
