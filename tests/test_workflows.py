"""The saved workflows in example_workflows/: consistent, convertible, runnable, free of secrets.

What CI can check without ComfyUI: each UI-format workflow agrees with the node schemas (ours from
INPUT_TYPES, ComfyUI's from tests/data/comfyui_core_nodes.json, recorded on a real server), its API
twin in example_workflows/api/ is exactly its conversion, its thumbnail is a JPEG screenshot of its graph,
and the API graph runs end to end in-process with our nodes (loaded the ComfyUI way) against the
loopback fake ImageAPI. The real-server proof is scripts/comfyui_check.py; the `comfyui` test at the
end runs it when COMFYUI_DIR is set.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys

import pytest
from support import TEST_KEY, thumbnails
from support import workflow_tools as wt
from support.thumbnails import install_tiny_local_models

EXPECTED = {
    "FLUX Schnell text to image (API)",
    "FLUX Schnell text to image (local)",
    "FLUX Schnell text to image with LoRAs (local)",
    "FLUX Schnell generate and upscale",
    "FLUX Schnell draft board (four prompts)",
    "FLUX Schnell drafts (prompt list)",
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
    assert twins == {p.name for p in UI_PATHS}, "every UI workflow needs example_workflows/api/<same name>"


@pytest.mark.parametrize("path", UI_PATHS, ids=_ids(UI_PATHS))
def test_ui_workflow_agrees_with_node_schemas(path, specs, ui_only):
    assert wt.check_ui_workflow(wt.load_json(path), specs, ui_only) == []


@pytest.mark.parametrize("path", UI_PATHS, ids=_ids(UI_PATHS))
def test_core_nodes_and_inputs_exist_in_the_record(path, record, ui_only):
    own = {"FluxSchnellGenerate", "FluxSchnellLocalModel", "FluxSchnellLoRA", "FluxSchnellDrafts"}
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


def test_draft_board_is_four_generate_nodes_at_the_fast_preset():
    ui = wt.load_json(wt.DRAFT_BOARD)
    gens = [n for n in ui["nodes"] if n["type"] == "FluxSchnellGenerate"]
    assert len(gens) == 4, "four independent nodes, so ComfyUI runs them at the same time"
    prompts = set()
    for gen in gens:
        prompt, _backend, width, height, steps, seed, control, batch = gen["widgets_values"]
        assert (width, height, steps, batch) == (512, 512, 4, 1)
        assert control == "randomize"
        assert isinstance(seed, int)
        prompts.add(prompt)
    assert len(prompts) == 4
    note = next(n for n in ui["nodes"] if n["type"] == "MarkdownNote")["widgets_values"][0]
    for word in ("fixed", "info", "send_seed", "same time"):
        assert word in note
    links = {(link[1], link[3]) for link in ui["links"]}
    by_type = {}
    for n in ui["nodes"]:
        by_type.setdefault(n["type"], []).append(n["id"])
    for gen in gens:  # each draft has its own preview and its own info box
        fed = {dst for src, dst in links if src == gen["id"]}
        assert len(fed & set(by_type["PreviewImage"])) == 1
        assert len(fed & set(by_type["PreviewAny"])) == 1
    assert "SaveImage" not in by_type


def test_drafts_workflow_drafts_a_prompt_list_into_a_contact_sheet(specs, ui_only):
    ui = wt.load_json(wt.DRAFTS)
    (drafts,) = [n for n in ui["nodes"] if n["type"] == "FluxSchnellDrafts"]
    named, controls = wt.split_widget_values(specs["FluxSchnellDrafts"], drafts["widgets_values"])
    assert (named["backend"], named["concurrency"], named["folder"]) == ("api", 4, "flux_drafts")
    assert controls == {"seed": "fixed"}, "a fixed seed, so queueing it again finishes the same drafts"
    lines = named["prompts"].splitlines()
    assert any(line.startswith("#") for line in lines), "shows the comment rule"
    assert len([line for line in lines if line.strip() and not line.startswith("#")]) >= 4
    by_id = {n["id"]: n["type"] for n in ui["nodes"]}
    fed = {(link[2], by_id[link[3]]) for link in ui["links"] if link[1] == drafts["id"]}
    assert fed == {(0, "PreviewImage"), (1, "PreviewAny")}  # the contact sheet and the folder's path


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
    wf = copy.deepcopy(wt.load_json(wt.TEXT_TO_IMAGE))
    assert wt.check_ui_workflow(wf, specs, ui_only) == []
    mutate(wf)
    problems = wt.check_ui_workflow(wf, specs, ui_only)
    assert any(expected in p for p in problems), problems


def test_conversion_skips_the_control_slot_and_notes(specs, ui_only):
    wf = wt.load_json(wt.UPSCALE)
    api = wt.ui_to_api(wf, specs, ui_only)
    assert all(n["class_type"] != "MarkdownNote" for n in api.values())
    gen = next(n for n in api.values() if n["class_type"] == "FluxSchnellGenerate")
    assert gen["inputs"]["seed"] == 42
    assert "control_after_generate" not in gen["inputs"]
    assert api["6"]["inputs"] == {"upscale_model": ["5", 0], "image": ["2", 0]}


# --- comparing graphs across frontend releases -------------------------------------------------


def _as_newer_frontend(wf):
    """Rewritten the ways newer frontends save the same graph: no widgets_values on nodes without
    widgets (1.58), and widget inputs listed in `inputs` ahead of the sockets, shifting link slots."""
    wf = copy.deepcopy(wf)
    shift = {}
    for n in wf["nodes"]:
        if n.get("widgets_values") == []:
            del n["widgets_values"]
        if n["type"] == "FluxSchnellGenerate":
            widgets = [
                {"name": w, "type": "INT", "widget": {"name": w}, "link": None} for w in ("width", "seed")
            ]
            n["inputs"] = widgets + n["inputs"]
            shift[n["id"]] = len(widgets)
    for link in wf["links"]:
        link[4] += shift.get(link[3], 0)
    return wf


@pytest.mark.parametrize("path", UI_PATHS, ids=_ids(UI_PATHS))
def test_meaning_ignores_how_a_frontend_writes_a_graph(path, specs, ui_only):
    ui = wt.load_json(path)
    newer = _as_newer_frontend(ui)
    assert newer != ui
    want = wt.ui_meaning(ui, specs, ui_only)
    assert wt.meaning_differences(wt.ui_meaning(newer, specs, ui_only), want) == []
    api = wt.load_json(wt.api_twin_path(path))
    without_preview = copy.deepcopy(api)  # frontend 1.58 sends no PreviewAny "preview" value
    for node in without_preview.values():
        node["inputs"].pop("preview", None)
        node["_meta"]["title"] = "renamed"
    assert wt.api_meaning(without_preview, specs) == wt.api_meaning(api, specs)


def test_meaning_keeps_what_a_graph_does(specs, ui_only):
    ui = wt.load_json(wt.UPSCALE)
    want = wt.ui_meaning(ui, specs, ui_only)

    def gen(wf):
        return next(n for n in wf["nodes"] if n["type"] == "FluxSchnellGenerate")

    def seed(wf):
        gen(wf)["widgets_values"][5] += 1

    def control(wf):
        gen(wf)["widgets_values"][6] = "fixed"

    def other_output(wf):
        link = next(link for link in wf["links"] if link[5] == "IMAGE" and link[1] == gen(wf)["id"])
        link[2] = 1

    def other_input(wf):
        link = next(link for link in wf["links"] if link[5] == "UPSCALE_MODEL")
        link[4] = 1  # into the image input

    def node_type(wf):
        next(n for n in wf["nodes"] if n["type"] == "SaveImage")["type"] = "PreviewImage"

    for change, words in (
        (seed, "seed"),
        (control, "fixed"),
        (other_output, "link"),
        (other_input, "link"),
        (node_type, "PreviewImage"),
    ):
        wf = copy.deepcopy(ui)
        change(wf)
        try:
            got = wt.ui_meaning(wf, specs, ui_only)
        except ValueError as e:  # widget values that no longer fit the node type
            got = {"nodes": {}, "links": [], "error": str(e)}
        problems = wt.meaning_differences(got, want)
        assert problems, change.__name__
        assert any(words in p for p in problems) or "error" in got, (change.__name__, problems)

    api = wt.load_json(wt.api_twin_path(wt.UPSCALE))
    for mutate in (
        lambda a: a["2"]["inputs"].update(seed=1),
        lambda a: a["6"]["inputs"].update(image=["5", 0]),
        lambda a: a["3"].update(class_type="PreviewImage"),
    ):
        changed = copy.deepcopy(api)
        mutate(changed)
        assert wt.meaning_differences(wt.api_meaning(changed, specs), wt.api_meaning(api, specs))


def test_execution_order_refuses_a_cycle():
    api = {
        "1": {"class_type": "A", "inputs": {"x": ["2", 0]}},
        "2": {"class_type": "B", "inputs": {"y": ["1", 0]}},
    }
    with pytest.raises(ValueError, match="cycle"):
        wt.execution_order(api)


# --- running the API graphs in-process ---------------------------------------------------------

API_RUNS = [p for p in UI_PATHS if p not in (*wt.LOCAL_WORKFLOWS, wt.DRAFTS)]  # local: weight files


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
    assert sorted(r["prompt"] for r in sent) == sorted(
        n["inputs"]["prompt"] for n in gens for _ in range(n["inputs"]["batch_size"])
    )
    infos = [out[1] for nid, out in result.outputs.items() if api[nid]["class_type"] == gens[0]["class_type"]]
    assert TEST_KEY not in json.dumps(infos)


def test_draft_board_runs_its_four_nodes_at_once(comfy_package, fake_api, tmp_path):
    api = wt.load_json(wt.api_twin_path(wt.DRAFT_BOARD))
    fake_api.delay_s = 0.3
    result = wt.run_api_graph(api, _classes(comfy_package, tmp_path, api))
    assert fake_api.max_in_flight == 4  # run one after another, one request would be open at a time
    shown = {}
    for node_id, node in api.items():
        if node["class_type"] == "PreviewAny":
            gen_id = node["inputs"]["source"][0]
            shown[gen_id] = json.loads(result.ui[node_id]["text"][0])
    assert len(shown) == 4
    for gen_id, info in shown.items():
        assert info["seeds"] == [api[gen_id]["inputs"]["seed"]]
        assert info["prompt"] == api[gen_id]["inputs"]["prompt"]
        assert (info["width"], info["height"], info["steps"]) == (512, 512, 4)


def test_drafts_workflow_runs_end_to_end(comfy_package, fake_api, tmp_path):
    from pathlib import Path

    from PIL import Image

    api = wt.load_json(wt.api_twin_path(wt.DRAFTS))
    fake_api.delay_s = 0.2
    result = wt.run_api_graph(api, _classes(comfy_package, tmp_path, api))
    text = api["2"]["inputs"]["prompts"]
    lines = [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
    sent = sorted(r.json["prompt"] for r in fake_api.requests_to("/api/v1/generate"))
    assert sent == sorted(lines)
    assert fake_api.max_in_flight == api["2"]["inputs"]["concurrency"]
    sheet, folder = result.outputs["2"]
    assert sheet.shape[0] == 1  # one contact sheet, not the drafts themselves
    folder = Path(folder)
    assert folder.name == "flux_drafts"
    pngs = sorted(folder.glob("*.png"))
    assert len(pngs) == len(lines)
    with Image.open(pngs[0]) as im:
        assert im.size == (512, 512)
    assert (folder / "manifest.jsonl").is_file()
    assert (folder / "index.html").is_file()
    assert result.ui["4"]["text"] == [str(folder)]


@pytest.mark.parametrize("workflow", wt.LOCAL_WORKFLOWS, ids=lambda p: p.stem)
def test_local_workflow_runs_end_to_end(workflow, comfy_package, comfy, tmp_path):
    install_tiny_local_models(comfy, tmp_path)  # tiny models and LoRAs under the names the graphs pick
    api = thumbnails.runnable_api(workflow)  # at 256 x 256: the saved 1024 x 1024 is slow on a CPU
    result = wt.run_api_graph(api, _classes(comfy_package, tmp_path, api))
    _check_images(result, api)


# --- template browser --------------------------------------------------------------------------

MAX_THUMBNAIL_BYTES = 150_000


def screenshot_traits(picture) -> dict[str, float]:
    """What tells a screenshot of ComfyUI's canvas from a flat colour or noise: mostly grey and
    dark (the canvas and node bodies), mostly smooth (flat regions side by side), yet with sharp
    edges (text, widgets, node borders) and several distinct grey levels."""
    import numpy as np

    rgb = np.asarray(picture.convert("RGB")).astype(np.int16)
    lum = np.asarray(picture.convert("L")).astype(np.int16)
    step = np.abs(np.diff(lum, axis=1))
    levels = np.histogram(lum, bins=16, range=(0, 256))[0] / lum.size
    return {
        "grey": float(((rgb.max(2) - rgb.min(2)) < 24).mean()),
        "dark": float((lum < 90).mean()),
        "smooth": float((step <= 4).mean()),
        "edges": float((step > 40).mean()),
        "levels": int((levels > 0.02).sum()),
    }


def looks_like_the_canvas(traits: dict[str, float]) -> bool:
    return (
        traits["grey"] > 0.8
        and traits["dark"] > 0.7
        and traits["smooth"] > 0.6
        and 0.001 < traits["edges"] < 0.2
        and traits["levels"] >= 3
    )


@pytest.mark.parametrize("path", UI_PATHS, ids=_ids(UI_PATHS))
def test_thumbnail_is_a_picture_of_the_graph(path):
    from PIL import Image

    thumb = wt.thumbnail_path(path)
    assert thumb.is_file(), f"{thumb.name} is missing: run python -m scripts.make_thumbnails"
    assert thumb.stat().st_size < MAX_THUMBNAIL_BYTES
    with Image.open(thumb) as im:
        assert im.format == "JPEG"
        width, height = im.size
        traits = screenshot_traits(im)
    assert 256 <= max(width, height) <= 1024
    assert 1 / 4 <= width / height <= 4
    assert looks_like_the_canvas(traits), f"{thumb.name} is not a screenshot of a graph: {traits}"


def test_canvas_check_refuses_flat_colour_and_noise():
    """The pictures the thumbnails used to be (a service's solid colour, a tiny model's noise)."""
    import numpy as np
    from PIL import Image

    flat = Image.new("RGB", (384, 384), (40, 90, 200))
    dark_flat = Image.new("RGB", (384, 384), (34, 34, 34))
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8))
    grey_noise = noise.convert("L").point(lambda v: v // 3).convert("RGB")
    for picture in (flat, dark_flat, noise, grey_noise):
        assert not looks_like_the_canvas(screenshot_traits(picture))


def test_template_browser_lists_the_ui_graphs_only():
    """ComfyUI lists <package>/example_workflows/*.json (no subfolders) and loads each as a UI graph."""
    listed = sorted(wt.WORKFLOW_DIR.glob("*.json"))
    assert listed == UI_PATHS
    assert all("nodes" in wt.load_json(p) for p in listed)
    assert all("nodes" not in wt.load_json(p) for p in wt.API_DIR.glob("*.json"))
    for p in listed:  # the frontend shows the file name as the title, its description with - and _ as spaces
        assert not set(p.stem) & set("_-#?%&"), f"{p.name}: not a title-like file name"
    assert not (wt.REPO / "workflows").exists(), "ComfyUI would list workflows/ too (and serve it twice)"


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
