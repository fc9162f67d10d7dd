"""Saved ComfyUI workflows: schema checks, the UI-to-API conversion, and a small graph executor.

Based on what ComfyUI 0.3.64 with frontend 1.27.10 does (read from their source and observed on a
real server, see tests/data/comfyui_core_nodes.json and scripts/comfyui_check.py):

- UI format (what the frontend saves): `nodes[].inputs` lists only the socket inputs (and widgets
  converted to sockets); a link's target slot indexes that list. `widgets_values` holds the widget
  inputs in the node's input order, and an INT widget with `control_after_generate` takes two
  slots, `[value, "randomize"]`. UI-only nodes (Note, MarkdownNote) never reach the API format.
- API format (what `POST /prompt` takes and "Export (API)" writes): `{id: {"inputs", "class_type",
  "_meta": {"title"}}}`, links as `[from_id, from_slot]`.
- The executor runs an API-format graph in dependency order, the way ComfyUI's executor calls a
  V1 node (`getattr(node, FUNCTION)(**inputs)`, hidden `UNIQUE_ID` = the node id; an `async def`
  function is awaited as a task, so independent ones overlap), with small stand-ins for the core
  nodes our workflows use. The stand-ins are test doubles written here,
  not ComfyUI's code.
"""

from __future__ import annotations

import asyncio
import importlib.util
import inspect
import json
import sys
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import DATA_DIR, REPO

# ComfyUI's template browser lists custom_nodes/<package>/example_workflows/*.json (not subfolders)
# and serves that folder at /api/workflow_templates/<package>/; the frontend shows each file name as
# the title and asks for <name>.jpg beside it as the thumbnail.
WORKFLOW_DIR = REPO / "example_workflows"
API_DIR = WORKFLOW_DIR / "api"  # the API-format twins: served, but not listed
THUMBNAIL_SUFFIX = ".jpg"
TEXT_TO_IMAGE = WORKFLOW_DIR / "FLUX Schnell text to image (API).json"
LOCAL = WORKFLOW_DIR / "FLUX Schnell text to image (local).json"
LOCAL_LORA = WORKFLOW_DIR / "FLUX Schnell text to image with LoRAs (local).json"
LOCAL_WORKFLOWS = (LOCAL, LOCAL_LORA)  # need weight files (tiny ones in the tests)
UPSCALE = WORKFLOW_DIR / "FLUX Schnell generate and upscale.json"
DRAFT_BOARD = WORKFLOW_DIR / "FLUX Schnell draft board (four prompts).json"
DRAFTS = WORKFLOW_DIR / "FLUX Schnell drafts (prompt list).json"
CORE_NODES_FILE = DATA_DIR / "comfyui_core_nodes.json"

WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
CONTROL_VALUES = ("fixed", "increment", "decrement", "randomize")
ANY_TYPE = "*"


def load_like_comfyui(path: Path = REPO, name: str | None = None) -> types.ModuleType:
    """Import `path/__init__.py` as ComfyUI does: under a module name made from the path."""
    name = name or str(path).replace(".", "_x_")
    spec = importlib.util.spec_from_file_location(
        name, path / "__init__.py", submodule_search_locations=[str(path)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# --- node schemas ------------------------------------------------------------------------------


@dataclass(frozen=True)
class InputSpec:
    """One input of a node: its socket type ("COMBO" for a choice list) and its options."""

    name: str
    type: str
    options: Mapping[str, Any]
    choices: tuple | None = None
    required: bool = True

    @property
    def is_widget(self) -> bool:
        return self.type in WIDGET_TYPES and not self.options.get("forceInput", False)

    @property
    def has_control(self) -> bool:
        """An INT/FLOAT widget the frontend follows with a control_after_generate slot."""
        return self.is_widget and bool(self.options.get("control_after_generate", False))


@dataclass(frozen=True)
class NodeSpec:
    """What /object_info says about a node, reduced to what a saved workflow must agree with."""

    name: str
    display_name: str
    inputs: tuple[InputSpec, ...]
    output_types: tuple[str, ...]
    output_names: tuple[str, ...]
    output_node: bool = False
    frontend_widgets: Mapping[str, Any] = field(default_factory=dict)

    def input(self, name: str) -> InputSpec | None:
        return next((i for i in self.inputs if i.name == name), None)

    @property
    def widgets(self) -> tuple[InputSpec, ...]:
        return tuple(i for i in self.inputs if i.is_widget)

    @property
    def sockets(self) -> tuple[InputSpec, ...]:
        return tuple(i for i in self.inputs if not i.is_widget)


def _input_spec(name: str, entry, required: bool) -> InputSpec:
    kind = entry[0]
    options = entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else {}
    if isinstance(kind, (list, tuple)):
        return InputSpec(name, "COMBO", options, tuple(kind), required)
    return InputSpec(name, str(kind), options, None, required)


def spec_from_input_types(
    name: str, cls: type, display_name: str | None = None, frontend_widgets=None
) -> NodeSpec:
    """A V1 node class's schema, as ComfyUI's /object_info derives it from INPUT_TYPES."""
    types = cls.INPUT_TYPES()
    inputs = [
        _input_spec(n, e, section == "required")
        for section in ("required", "optional")
        for n, e in types.get(section, {}).items()
    ]
    outputs = tuple(cls.RETURN_TYPES)
    names = tuple(getattr(cls, "RETURN_NAMES", None) or outputs)
    return NodeSpec(
        name,
        display_name or name,
        tuple(inputs),
        outputs,
        names,
        bool(getattr(cls, "OUTPUT_NODE", False)),
        dict(frontend_widgets or {}),
    )


def spec_from_object_info(entry: Mapping[str, Any], frontend_widgets=None) -> NodeSpec:
    """A node's schema from its /object_info entry (input order from `input_order`)."""
    inputs = []
    for section in ("required", "optional"):
        declared = entry["input"].get(section, {})
        for n in entry.get("input_order", {}).get(section, list(declared)):
            inputs.append(_input_spec(n, declared[n], section == "required"))
    return NodeSpec(
        entry["name"],
        entry.get("display_name") or entry["name"],
        tuple(inputs),
        tuple(entry["output"]),
        tuple(entry["output_name"]),
        bool(entry.get("output_node", False)),
        dict(frontend_widgets or {}),
    )


def load_core_record(path: Path = CORE_NODES_FILE) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def core_specs(record: Mapping[str, Any] | None = None) -> dict[str, NodeSpec]:
    record = record if record is not None else load_core_record()
    extra = record.get("frontend_only_widgets", {})
    return {name: spec_from_object_info(entry, extra.get(name)) for name, entry in record["nodes"].items()}


def ui_only_types(record: Mapping[str, Any] | None = None) -> frozenset[str]:
    record = record if record is not None else load_core_record()
    return frozenset(record["ui_only_nodes"])


def package_specs(node_class_mappings, display_names) -> dict[str, NodeSpec]:
    return {
        name: spec_from_input_types(name, cls, display_names.get(name))
        for name, cls in node_class_mappings.items()
    }


# --- workflow files ----------------------------------------------------------------------------


def ui_workflow_paths() -> list[Path]:
    return sorted(WORKFLOW_DIR.glob("*.json"))


def api_twin_path(ui_path: Path) -> Path:
    return API_DIR / ui_path.name


def thumbnail_path(ui_path: Path) -> Path:
    return ui_path.with_suffix(THUMBNAIL_SUFFIX)


def load_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def split_widget_values(spec: NodeSpec, values: list) -> tuple[dict[str, Any], dict[str, Any]]:
    """`widgets_values` to ({input: value}, {input: control_after_generate value})."""
    named, controls = {}, {}
    pos = 0
    for widget in spec.widgets:
        if pos >= len(values):
            raise ValueError(
                f"{spec.name}: widgets_values has {len(values)} entries, too few for the widget "
                f"{widget.name!r}"
            )
        named[widget.name] = values[pos]
        pos += 1
        if widget.has_control:
            if pos >= len(values):
                raise ValueError(f"{spec.name}: {widget.name!r} lacks its control slot")
            controls[widget.name] = values[pos]
            pos += 1
    if pos != len(values):
        raise ValueError(f"{spec.name}: widgets_values has {len(values)} entries, the widgets need {pos}")
    return named, controls


def check_widget_value(spec: NodeSpec, widget: InputSpec, value: Any) -> str | None:
    """Why `value` is not acceptable for `widget` (None when it is)."""
    where = f"{spec.name}.{widget.name}"
    o = widget.options
    if widget.type == "INT":
        if isinstance(value, bool) or not isinstance(value, int):
            return f"{where}: {value!r} is not an integer"
    elif widget.type == "FLOAT":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"{where}: {value!r} is not a number"
    elif widget.type == "STRING":
        if not isinstance(value, str):
            return f"{where}: {value!r} is not a string"
    elif widget.type == "BOOLEAN":
        if not isinstance(value, bool):
            return f"{where}: {value!r} is not a boolean"
    elif widget.type == "COMBO":
        # An empty recorded list is a model-file list (it depends on the server's models/ folder).
        if widget.choices and value not in widget.choices:
            return f"{where}: {value!r} is not one of {list(widget.choices)}"
        if not isinstance(value, str):
            return f"{where}: {value!r} is not a string"
    if widget.type in ("INT", "FLOAT"):
        if "min" in o and value < o["min"]:
            return f"{where}: {value} is below the minimum {o['min']}"
        if "max" in o and value > o["max"]:
            return f"{where}: {value} is above the maximum {o['max']}"
    return None


def check_ui_workflow(
    wf: Mapping[str, Any], specs: Mapping[str, NodeSpec], ui_only: frozenset[str]
) -> list[str]:
    """Every inconsistency between a UI-format workflow, its links and the node schemas."""
    problems: list[str] = []
    nodes = wf.get("nodes", [])
    ids = [n["id"] for n in nodes]
    if len(set(ids)) != len(ids):
        problems.append(f"node ids are not unique: {sorted(ids)}")
    by_id = {n["id"]: n for n in nodes}
    if ids and wf.get("last_node_id", 0) < max(ids):
        problems.append(f"last_node_id {wf.get('last_node_id')} < the largest node id {max(ids)}")
    links = wf.get("links", [])
    link_ids = [link[0] for link in links]
    if len(set(link_ids)) != len(link_ids):
        problems.append(f"link ids are not unique: {sorted(link_ids)}")
    if link_ids and wf.get("last_link_id", 0) < max(link_ids):
        problems.append(f"last_link_id {wf.get('last_link_id')} < the largest link id")
    if wf.get("version") != 0.4:
        problems.append(f"version is {wf.get('version')!r}, the frontend saves 0.4")

    for n in nodes:
        kind = n["type"]
        if kind in ui_only:
            continue
        spec = specs.get(kind)
        if spec is None:
            problems.append(f"node {n['id']}: unknown node type {kind!r}")
            continue
        if n.get("mode", 0) != 0:
            problems.append(f"node {n['id']} ({kind}) is muted or bypassed (mode {n['mode']})")
        try:
            named, controls = split_widget_values(spec, n.get("widgets_values", []))
        except ValueError as e:
            problems.append(f"node {n['id']}: {e}")
            named, controls = {}, {}
        for name, value in named.items():
            problem = check_widget_value(spec, spec.input(name), value)
            if problem:
                problems.append(f"node {n['id']}: {problem}")
        for name, value in controls.items():
            if value not in CONTROL_VALUES:
                problems.append(f"node {n['id']}: control of {name} is {value!r}")
        problems += _check_slots(n, spec)

    for link in links:
        problems += _check_link(link, by_id, specs, ui_only)
    linked_in = {(link[3], link[4]): link[0] for link in links}
    for n in nodes:
        for slot, inp in enumerate(n.get("inputs", [])):
            if inp.get("link") is not None and linked_in.get((n["id"], slot)) != inp["link"]:
                problems.append(
                    f"node {n['id']} input {inp['name']!r} names link {inp['link']}, which does not end there"
                )
        for slot, out in enumerate(n.get("outputs", [])):
            for link_id in out.get("links") or []:
                link = next((link for link in links if link[0] == link_id), None)
                if link is None or (link[1], link[2]) != (n["id"], slot):
                    problems.append(
                        f"node {n['id']} output {out['name']!r} names link {link_id}, which "
                        "does not start there"
                    )
    return problems


def _check_slots(n: Mapping[str, Any], spec: NodeSpec) -> list[str]:
    problems = []
    expected = [i.name for i in spec.sockets]
    sockets = [i["name"] for i in n.get("inputs", []) if "widget" not in i]
    if sockets != expected:
        problems.append(f"node {n['id']} ({spec.name}): socket inputs {sockets} != {expected}")
    for inp in n.get("inputs", []):
        declared = spec.input(inp["name"])
        if declared is None:
            problems.append(f"node {n['id']}: {spec.name} has no input {inp['name']!r}")
        elif "widget" in inp and inp.get("link") is None:
            problems.append(f"node {n['id']}: unlinked widget input {inp['name']!r} is saved")
        elif "widget" not in inp and inp.get("type") != declared.type:
            problems.append(
                f"node {n['id']}: input {inp['name']!r} has type {inp.get('type')!r}, "
                f"{spec.name} declares {declared.type!r}"
            )
    outputs = [(o["name"], o["type"]) for o in n.get("outputs", [])]
    expected_out = list(zip(spec.output_names, spec.output_types, strict=True))
    if outputs != expected_out:
        problems.append(f"node {n['id']} ({spec.name}): outputs {outputs} != {expected_out}")
    return problems


def _check_link(link, by_id, specs, ui_only) -> list[str]:
    link_id, src, src_slot, dst, dst_slot, kind = link
    where = f"link {link_id}"
    if src not in by_id or dst not in by_id:
        return [f"{where}: joins a missing node ({src} -> {dst})"]
    a, b = by_id[src], by_id[dst]
    if a["type"] in ui_only or b["type"] in ui_only:
        return [f"{where}: touches a UI-only node"]
    problems = []
    outs, ins = a.get("outputs", []), b.get("inputs", [])
    if not 0 <= src_slot < len(outs):
        return [f"{where}: node {src} has no output slot {src_slot}"]
    if not 0 <= dst_slot < len(ins):
        return [f"{where}: node {dst} has no input slot {dst_slot}"]
    out_type = specs[a["type"]].output_types[src_slot] if a["type"] in specs else None
    inp = ins[dst_slot]
    declared = specs[b["type"]].input(inp["name"]) if b["type"] in specs else None
    if kind != out_type:
        problems.append(f"{where}: type {kind!r} but {a['type']} output {src_slot} is {out_type!r}")
    if declared is not None and declared.type not in (ANY_TYPE, kind):
        problems.append(f"{where}: {kind} into {b['type']}.{inp['name']} ({declared.type})")
    return problems


# --- what a graph means (the same across frontend releases) -------------------------------------


def ui_meaning(
    wf: Mapping[str, Any], specs: Mapping[str, NodeSpec], ui_only: frozenset[str]
) -> dict[str, Any]:
    """A UI-format graph reduced to what it means, leaving out what frontends write differently.

    Nodes: type, title and widget values by input name (with each control_after_generate
    setting); a UI-only node (a note) keeps its values as they are. Links: (from node, output
    slot, to node, input *name*, type), since frontends order a node's `inputs` list differently
    (newer ones list widget inputs there too). Left out: positions, sizes, order, a missing versus
    empty `widgets_values`, and the values of frontend-only widgets (PreviewAny's `preview`).
    """
    nodes: dict[int, Any] = {}
    for n in wf["nodes"]:
        values = list(n.get("widgets_values") or [])
        spec = specs.get(n["type"])
        if n["type"] in ui_only or spec is None:
            nodes[n["id"]] = (n["type"], n.get("title"), json.dumps(values, sort_keys=True))
            continue
        slots = len(spec.widgets) + sum(w.has_control for w in spec.widgets)
        if spec.frontend_widgets and len(values) > slots:
            values = values[:slots]  # what a frontend-only widget shows is no input of the node
        named, controls = split_widget_values(spec, values)
        nodes[n["id"]] = (n["type"], n.get("title"), named, controls)
    input_names = {
        (n["id"], slot): inp["name"] for n in wf["nodes"] for slot, inp in enumerate(n.get("inputs") or [])
    }
    links = sorted(
        (src, src_slot, dst, input_names.get((dst, dst_slot), f"slot {dst_slot}"), kind)
        for _link_id, src, src_slot, dst, dst_slot, kind in wf.get("links", [])
    )
    return {"nodes": nodes, "links": links}


def api_meaning(api: Mapping[str, Mapping[str, Any]], specs: Mapping[str, NodeSpec]) -> dict[str, Any]:
    """An API-format graph reduced to what runs: each node's class and the inputs it declares.

    Left out: `_meta` (titles) and inputs the node does not declare (a frontend-only widget such as
    PreviewAny's `preview`, which frontend 1.27 sends and 1.58 does not; ComfyUI drops it anyway).
    """
    meaning = {}
    for node_id, node in api.items():
        spec = specs.get(node["class_type"])
        declared = {i.name for i in spec.inputs} if spec is not None else set(node["inputs"])
        inputs = {k: v for k, v in node["inputs"].items() if k in declared}
        meaning[node_id] = (node["class_type"], inputs)
    return meaning


def meaning_differences(got: Mapping[str, Any], want: Mapping[str, Any], what: str = "") -> list[str]:
    """Readable differences between two meanings (of `ui_meaning` or `api_meaning`)."""
    problems = []
    if "nodes" in want and "links" in want:
        problems += meaning_differences(got.get("nodes", {}), want["nodes"], "node ")
        missing = [x for x in want["links"] if x not in got.get("links", [])]
        extra = [x for x in got.get("links", []) if x not in want["links"]]
        problems += [f"link {x} missing" for x in missing] + [f"link {x} added" for x in extra]
        return problems
    for key in sorted(set(got) | set(want), key=str):
        if key not in got:
            problems.append(f"{what}{key} missing")
        elif key not in want:
            problems.append(f"{what}{key} added")
        elif got[key] != want[key]:
            problems.append(f"{what}{key}: {got[key]} != {want[key]}")
    return problems


# --- UI format to API format -------------------------------------------------------------------


def ui_to_api(
    wf: Mapping[str, Any], specs: Mapping[str, NodeSpec], ui_only: frozenset[str]
) -> dict[str, dict[str, Any]]:
    """The API-format prompt the frontend's graphToPrompt makes of a UI workflow."""
    links = {link[0]: link for link in wf.get("links", [])}
    api: dict[str, dict[str, Any]] = {}
    for n in wf["nodes"]:
        if n["type"] in ui_only:
            continue
        spec = specs[n["type"]]
        named, _controls = split_widget_values(spec, n.get("widgets_values", []))
        inputs: dict[str, Any] = dict(named)
        inputs.update(spec.frontend_widgets)
        for inp in n.get("inputs", []):
            if inp.get("link") is None:
                continue
            link = links[inp["link"]]
            inputs[inp["name"]] = [str(link[1]), link[2]]
        api[str(n["id"])] = {
            "inputs": inputs,
            "class_type": n["type"],
            "_meta": {"title": n.get("title") or spec.display_name},
        }
    return api


# --- running an API-format graph ---------------------------------------------------------------


def execution_order(api: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Node ids so that every node comes after the nodes it takes inputs from."""
    order: list[str] = []
    state: dict[str, int] = {}

    def visit(node_id: str, path: tuple[str, ...]) -> None:
        if state.get(node_id) == 2:
            return
        if state.get(node_id) == 1:
            raise ValueError(f"the graph has a cycle through {' -> '.join((*path, node_id))}")
        if node_id not in api:
            raise ValueError(f"node {path[-1] if path else '?'} links to missing node {node_id}")
        state[node_id] = 1
        for value in api[node_id]["inputs"].values():
            if _is_link(value):
                visit(value[0], (*path, node_id))
        state[node_id] = 2
        order.append(node_id)

    for node_id in sorted(api, key=lambda k: (len(k), k)):
        visit(node_id, ())
    return order


def _is_link(value: Any) -> bool:
    return (
        isinstance(value, list)
        and len(value) == 2
        and isinstance(value[0], str)
        and isinstance(value[1], int)
    )


@dataclass
class RunResult:
    outputs: dict[str, tuple]  # node id -> the tuple its FUNCTION returned (or the "result" part)
    ui: dict[str, dict]  # node id -> the "ui" dict of an output node


def run_api_graph(
    api: Mapping[str, Mapping[str, Any]],
    node_classes: Mapping[str, type],
    hidden: Callable[[str, str], Any] | None = None,
) -> RunResult:
    """Run every node of `api` once, as ComfyUI's executor calls V1 nodes (see `run_api_graph_async`)."""
    return asyncio.run(run_api_graph_async(api, node_classes, hidden))


async def run_api_graph_async(
    api: Mapping[str, Mapping[str, Any]],
    node_classes: Mapping[str, type],
    hidden: Callable[[str, str], Any] | None = None,
) -> RunResult:
    """Run every node of `api` once, the way ComfyUI's executor (0.3.45 and later) does.

    A node runs once the nodes it takes inputs from are done, as `getattr(node, FUNCTION)(**inputs)`
    with the hidden `UNIQUE_ID` set to its id. An `async def` function becomes a task that is
    given one turn of the loop; if it is not finished then, it stays pending while the nodes that
    are ready run, so independent async nodes overlap. The first failure raises (the rest are
    cancelled, as when ComfyUI ends a prompt).
    """
    results: dict[str, tuple] = {}
    ui: dict[str, dict] = {}
    pending: dict[asyncio.Task, str] = {}
    order = execution_order(api)

    def ready(node_id: str) -> bool:
        links = [v for v in api[node_id]["inputs"].values() if _is_link(v)]
        return all(value[0] in results for value in links)

    def finish(node_id: str, out) -> None:
        if isinstance(out, dict):
            ui[node_id] = out.get("ui", {})
            out = out.get("result", ())
        results[node_id] = tuple(out)

    try:
        while len(results) < len(order):
            waiting = set(pending.values())
            startable = [n for n in order if n not in results and n not in waiting and ready(n)]
            for node_id in startable:
                out = _call_node(api, node_classes, node_id, results, hidden)
                if inspect.iscoroutine(out):
                    task = asyncio.ensure_future(out)
                    await asyncio.sleep(0)  # one turn, as ComfyUI gives it
                    if not task.done():
                        pending[task] = node_id
                        continue
                    out = task.result()
                finish(node_id, out)
            if startable:
                continue  # what finished may have made other nodes ready
            if not pending:
                raise RuntimeError("no node can run (a bug in the graph runner)")
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                finish(pending.pop(task), task.result())
    finally:
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
    return RunResult(results, ui)


def _call_node(api, node_classes, node_id: str, results, hidden):
    entry = api[node_id]
    cls = node_classes.get(entry["class_type"])
    if cls is None:
        raise KeyError(f"no node class for {entry['class_type']!r} (node {node_id})")
    kwargs = {
        name: results[value[0]][value[1]] if _is_link(value) else value
        for name, value in entry["inputs"].items()
    }
    declared = cls.INPUT_TYPES()
    kwargs = {
        k: v
        for k, v in kwargs.items()
        if k in declared.get("required", {}) or k in declared.get("optional", {})
    }  # frontend-only widgets (PreviewAny's "preview") are not function arguments
    for arg, kind in declared.get("hidden", {}).items():
        kwargs[arg] = node_id if kind == "UNIQUE_ID" else (hidden(kind, node_id) if hidden else None)
    return getattr(cls(), cls.FUNCTION)(**kwargs)


# --- stand-ins for ComfyUI core nodes ---------------------------------------------------------


def core_stand_ins(output_dir: Path, prompt: Mapping[str, Any] | None = None) -> dict[str, type]:
    """Test doubles for the core nodes our workflows use, writing PNGs under `output_dir`."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    counter: dict[str, int] = {}

    class _Saver:
        FUNCTION = "save"
        OUTPUT_NODE = True
        RETURN_TYPES = ()
        kind = "output"

        def save(self, images, filename_prefix="ComfyUI"):
            folder = output_dir / self.kind
            saved = []
            for image in images:  # (H, W, C) in 0..1
                n = counter[filename_prefix] = counter.get(filename_prefix, 0) + 1
                path = folder / f"{filename_prefix}_{n:05}_.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                info = PngInfo()
                if prompt is not None:
                    info.add_text("prompt", json.dumps(prompt))
                pixels = np.clip(255.0 * image.cpu().numpy(), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(path, pnginfo=info, compress_level=1)
                saved.append({"filename": path.name, "subfolder": str(path.parent), "path": path})
            return {"ui": {"images": saved}}

    class SaveImage(_Saver):
        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"images": ("IMAGE",), "filename_prefix": ("STRING", {})}}

    class PreviewImage(_Saver):
        kind = "temp"

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"images": ("IMAGE",)}}

        def save(self, images):
            return super().save(images, "preview")

    class PreviewAny:
        FUNCTION = "show"
        OUTPUT_NODE = True
        RETURN_TYPES = ()

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"source": ("*", {})}}

        def show(self, source):
            return {"ui": {"text": [source if isinstance(source, str) else json.dumps(source)]}}

    modes = {"nearest-exact": "nearest-exact", "bilinear": "bilinear", "area": "area"}

    class ImageScaleBy:
        FUNCTION = "upscale"
        RETURN_TYPES = ("IMAGE",)

        @classmethod
        def INPUT_TYPES(cls):
            return {
                "required": {
                    "image": ("IMAGE",),
                    "upscale_method": (["nearest-exact", "bilinear", "area", "bicubic", "lanczos"],),
                    "scale_by": ("FLOAT", {}),
                }
            }

        def upscale(self, image, upscale_method, scale_by):
            h, w = round(image.shape[1] * scale_by), round(image.shape[2] * scale_by)
            mode = modes.get(upscale_method, "bicubic")  # lanczos: bicubic is close enough here
            chw = image.movedim(-1, 1)  # (B, C, H, W)
            out = F.interpolate(chw, size=(h, w), mode=mode)
            return (out.movedim(1, -1).clamp(0, 1),)  # (B, H, W, C)

    class UpscaleModelLoader:
        FUNCTION = "load"
        RETURN_TYPES = ("UPSCALE_MODEL",)

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"model_name": ([],)}}

        def load(self, model_name):
            return ({"name": model_name, "scale": 4},)

    class ImageUpscaleWithModel:
        FUNCTION = "upscale"
        RETURN_TYPES = ("IMAGE",)

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"upscale_model": ("UPSCALE_MODEL",), "image": ("IMAGE",)}}

        def upscale(self, upscale_model, image):
            s = upscale_model["scale"]
            out = image.repeat_interleave(s, dim=1).repeat_interleave(s, dim=2)  # (B, sH, sW, C)
            return (out.to(torch.float32),)

    return {
        "SaveImage": SaveImage,
        "PreviewImage": PreviewImage,
        "PreviewAny": PreviewAny,
        "ImageScaleBy": ImageScaleBy,
        "UpscaleModelLoader": UpscaleModelLoader,
        "ImageUpscaleWithModel": ImageUpscaleWithModel,
    }


def expected_images(api: Mapping[str, Mapping[str, Any]]) -> dict[str, tuple[int, int, int]]:
    """For each image-writing node: (count, width, height) the graph should produce.

    Follows IMAGE links back to a FluxSchnellGenerate node through the resizing nodes our
    workflows use; the upscale model is assumed to be 4x (as its file name says).
    """

    def image_of(ref) -> tuple[int, int, int]:
        node = api[ref[0]]
        kind, inputs = node["class_type"], node["inputs"]
        if kind == "FluxSchnellGenerate":
            return inputs["batch_size"], inputs["width"], inputs["height"]
        if kind == "ImageScaleBy":
            n, w, h = image_of(inputs["image"])
            return n, round(w * inputs["scale_by"]), round(h * inputs["scale_by"])
        if kind == "ImageUpscaleWithModel":
            n, w, h = image_of(inputs["image"])
            return n, 4 * w, 4 * h
        raise ValueError(f"cannot tell the image size made by {kind}")

    return {
        node_id: image_of(node["inputs"]["images"])
        for node_id, node in api.items()
        if node["class_type"] in ("SaveImage", "PreviewImage")
    }
