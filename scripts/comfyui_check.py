"""Proof on a real ComfyUI server that this package and its saved workflows work (run by hand).

Starts a fake ImageAPI (tests/support/fake_imageapi.py) in this process and a real ComfyUI on
127.0.0.1 (`--cpu`, a temporary base directory holding custom_nodes/ with a link to this repository
and a test-only probe, models/, output/, user/; see scripts/comfyui_server.py), then checks:

1. the package imported with no error or warning in ComfyUI's start-up log;
2. /object_info shows both nodes as INPUT_TYPES declares them;
3. each API-format workflow in example_workflows/api/ POSTed to /prompt finishes and writes PNGs of
   the expected count and size (local workflows only with --local: tiny random-weight models from
   tests/support/tiny_models.py are put into models/; the upscale model is a tiny random ESRGAN);
4. an identical re-post is served from ComfyUI's cache, with no second request to the service;
5. POST /interrupt stops a generation waiting on a slow service within the node's Cancel grace
   (api_client.CANCEL_GRACE_S, the wait for answers already paid for) and a few seconds;
5b. scripts/comfyui_runtime.py: the draft board's four generate nodes wait at the same time (timed
   against a 1 s service), a waiting node shows the seconds and the images done (progress text,
   read from the WebSocket), Cancel stops all four at once, the Drafts node drafts 12 prompts at
   concurrency 4 against a 1 s service in under 3 times one image's time, and with --local ComfyUI's model
   management lists our models, POST /free unloads them and the next run reads no weight file;
6. no saved PNG text chunk, history entry or log line contains the API key;
7. with --browser (needs the `playwright` package and a Chromium): each UI workflow loads in the
   real frontend (ComfyUI's own, or --front-end-root), and the frontend's own UI-to-API conversion
   means what the API twin on disk means (node types, links, widget values: frontend releases
   write the same graph differently);
   --screenshot saves a picture of the upscale workflow; --record rewrites
   tests/data/comfyui_core_nodes.json from this server and frontend.

Usage (the Python must have ComfyUI's requirements; playwright only for --browser):
    python -m scripts.comfyui_check --comfyui ~/ComfyUI [--python PY] [--local]
        [--browser /usr/bin/chromium] [--front-end-root .../comfyui_frontend_package/static]
        [--screenshot docs/workflow_upscale.png] [--record]
Exit status 0 when every check passed or was skipped with a reason, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

from scripts import comfyui_runtime as runtime
from scripts.comfyui_runtime import INTERRUPT_LIMIT_S
from scripts.comfyui_server import ComfyServer, Report, free_port, install_probe, messages
from tests.support import REPO
from tests.support import workflow_tools as wt
from tests.support.fake_imageapi import FakeImageAPI

PACKAGE_FOLDER = "comfyui-flux-schnell"
OWN_NODES = ("FluxSchnellGenerate", "FluxSchnellLocalModel", "FluxSchnellLoRA", "FluxSchnellDrafts")
UPSCALE_MODEL = "RealESRGAN_x4plus.safetensors"
T5_VOCAB, CLIP_VOCAB = 32128, 49408  # the sizes of ComfyUI's bundled tokenizers' models
SLOW_SERVICE_S = 20.0
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]


# --- files put into the temporary ComfyUI ----------------------------------------------------------


def tiny_esrgan(path: Path, nf: int = 8, gc: int = 32, blocks: int = 1, seed: int = 0) -> Path:
    """A random-weight 4x ESRGAN (RRDBNet, new-arch key names) that spandrel loads: 0.9 MB."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    sd = {}

    def conv(name: str, cout: int, cin: int) -> None:
        sd[f"{name}.weight"] = torch.randn(cout, cin, 3, 3, generator=g) * 0.05
        sd[f"{name}.bias"] = torch.zeros(cout)

    conv("conv_first", nf, 3)
    for b in range(blocks):
        for r in (1, 2, 3):
            for i in range(1, 6):
                conv(f"body.{b}.rdb{r}.conv{i}", nf if i == 5 else gc, nf + (i - 1) * gc)
    for name in ("conv_body", "conv_up1", "conv_up2", "conv_hr"):
        conv(name, nf, nf)
    conv("conv_last", 3, nf)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path))
    return path


def tiny_local_models(models: Path) -> list[Path]:
    """Tiny random-weight FLUX files (tests/support/tiny_models.py) under the names `auto` looks for.

    On a real server the text encoders get ComfyUI's own tokenizers, so their embedding tables
    have the real vocabulary sizes (T5 32128, CLIP 49408); everything else is tiny.
    """
    from dataclasses import replace

    try:
        import comfyui_flux_schnell  # noqa: F401  (pip-installed)
    except ImportError:  # ComfyUI's Python: the repository under its installed name
        sys.modules["comfyui_flux_schnell"] = wt.load_like_comfyui(REPO, "comfyui_flux_schnell")
    from tests.support import tiny_models as tm

    parts = {
        models / "diffusion_models" / "flux1-schnell.safetensors": tm.transformer_weights(),
        models / "text_encoders" / "t5xxl_fp16.safetensors": tm.t5_weights(
            replace(tm.TINY_T5, vocab_size=T5_VOCAB)
        ),
        models / "text_encoders" / "clip_l.safetensors": tm.clip_weights(
            replace(tm.TINY_CLIP, vocab_size=CLIP_VOCAB)
        ),
        models / "vae" / "ae.safetensors": tm.autoencoder_weights(),
    }
    from tests.support.thumbnails import install_tiny_loras

    loras = install_tiny_loras(models / "loras")  # under the names the saved workflows pick
    return [tm.save(path, weights) for path, weights in parts.items()] + loras


def make_base(base: Path, local: bool) -> None:
    (base / "custom_nodes").mkdir(parents=True)
    (base / "custom_nodes" / PACKAGE_FOLDER).symlink_to(REPO, target_is_directory=True)
    for sub in ("output", "input", "temp", "user", "models"):
        (base / sub).mkdir(exist_ok=True)
    tiny_esrgan(base / "models" / "upscale_models" / UPSCALE_MODEL)
    install_probe(base)
    if local:
        tiny_local_models(base / "models")


# --- the checks --------------------------------------------------------------------------------


def check_import(report: Report, log: str) -> None:
    lines = log.splitlines()
    timing = [ln for ln in lines if "seconds" in ln and ln.rstrip().endswith(PACKAGE_FOLDER)]
    report.check(
        bool(timing) and "IMPORT FAILED" not in timing[0],
        "package imported",
        timing[0].strip() if timing else "no import-time line for the package in the log",
    )
    ours = [ln for ln in lines if (PACKAGE_FOLDER in ln or "flux_schnell" in ln) and ln not in timing]
    report.check(not ours, "no error or warning from the package at start-up", " | ".join(ours)[:800])


def check_run_log(report: Report, log: str) -> None:
    """Anything the package printed while the workflows ran: warnings, tracebacks."""
    start = log.find("Starting server")
    ours = [
        ln.strip()
        for ln in log[start:].splitlines()
        if PACKAGE_FOLDER in ln and ("Warning" in ln or "Error" in ln or "Traceback" in ln)
    ]
    report.check(not ours, "no warning from the package while running", " | ".join(ours)[:800])


def expected_specs() -> dict[str, wt.NodeSpec]:
    module = wt.load_like_comfyui(REPO)
    return wt.package_specs(module.NODE_CLASS_MAPPINGS, module.NODE_DISPLAY_NAME_MAPPINGS)


def check_object_info(report: Report, info: dict, local_files: list[Path]) -> None:
    expected = expected_specs()
    for name in OWN_NODES:
        if not report.check(name in info, f"/object_info lists {name}"):
            continue
        live = wt.spec_from_object_info(info[name])
        want = expected[name]
        problems = []
        if live.display_name != want.display_name:
            problems.append(f"display name {live.display_name!r} != {want.display_name!r}")
        if [i.name for i in live.inputs] != [i.name for i in want.inputs]:
            problems.append(f"inputs {[i.name for i in live.inputs]} != {[i.name for i in want.inputs]}")
        for a, b in zip(live.inputs, want.inputs, strict=False):
            if (a.type, a.required, dict(a.options)) != (b.type, b.required, dict(b.options)):
                problems.append(f"{a.name}: {a.type} {dict(a.options)} != {b.type} {dict(b.options)}")
            if a.choices != b.choices and not _file_choices(a, b, local_files):
                problems.append(f"{a.name}: choices {a.choices} != {b.choices}")
        if (live.output_types, live.output_names) != (want.output_types, want.output_names):
            problems.append(f"outputs {live.output_names} != {want.output_names}")
        report.check(not problems, f"/object_info {name} as declared", "; ".join(problems))


def _file_choices(live: wt.InputSpec, want: wt.InputSpec, local_files: list[Path]) -> bool:
    """A model-file dropdown: the same first entry ('none'/'auto') if it has one (the LoRA list has
    none), plus the files ComfyUI found."""
    if not live.choices or (want.choices and live.choices[0] != want.choices[0]):
        return False
    extra = set(live.choices) - set(want.choices)
    return extra <= {p.name for p in local_files}


def is_local(api: dict) -> bool:
    return any(
        n["class_type"] == "FluxSchnellLocalModel"
        or (n["class_type"] == "FluxSchnellGenerate" and n["inputs"].get("backend") == "local")
        for n in api.values()
    )


def api_images(api: dict, cached: frozenset[str] = frozenset()) -> int:
    """Images the graph asks the service for, leaving out nodes ComfyUI served from its cache (a
    generate node with the same inputs as in an earlier graph); a Drafts node asks for one a
    prompt line (into an empty folder)."""
    return sum(
        n["inputs"]["batch_size"] if n["class_type"] == "FluxSchnellGenerate" else len(draft_lines(n))
        for node_id, n in api.items()
        if n["class_type"] in ("FluxSchnellGenerate", "FluxSchnellDrafts")
        and n["inputs"].get("backend") == "api"
        and node_id not in cached
    )


def draft_lines(node: dict) -> list[str]:
    """A Drafts node's prompts: its lines but blank ones and # comments."""
    lines = node["inputs"]["prompts"].splitlines()
    return [line for line in lines if line.strip() and not line.lstrip().startswith("#")]


def drafts_ids(api: dict) -> list[str]:
    return [k for k, n in api.items() if n["class_type"] == "FluxSchnellDrafts"]


def sized_images(api: dict) -> dict[str, tuple[int, int, int]]:
    """workflow_tools.expected_images, leaving out the previews of a Drafts node's contact sheet
    (its size depends on how many drafts there are)."""
    drafts = set(drafts_ids(api))
    fed = {k for k, n in api.items() if isinstance(n["inputs"].get("images"), list)}
    sized = {k: n for k, n in api.items() if not (k in fed and n["inputs"]["images"][0] in drafts)}
    return wt.expected_images(sized)


def check_draft_folder(report: Report, server: ComfyServer, api: dict, node_id: str, name: str) -> None:
    """A Drafts node's folder holds one PNG a prompt line, manifest.jsonl and index.html."""
    folder = server.base / "output" / api[node_id]["inputs"]["folder"]
    pngs = sorted(folder.glob("*.png"))
    want = len(draft_lines(api[node_id]))
    extras = [f for f in ("manifest.jsonl", "index.html") if (folder / f).is_file()]
    report.check(
        len(pngs) == want and len(extras) == 2,
        f"workflow {name} draft folder",
        f"{folder.name}/: {len(pngs)} PNGs (want {want}), {', '.join(extras) or 'no manifest or gallery'}",
    )


def saved_files(server: ComfyServer, entry: dict) -> dict[str, list[Path]]:
    files = {}
    for node_id, out in entry.get("outputs", {}).items():
        paths = []
        for image in out.get("images", []):
            folder = server.base / ("temp" if image.get("type") == "temp" else "output")
            paths.append(folder / image.get("subfolder", "") / image["filename"])
        if paths:
            files[node_id] = paths
    return files


def check_workflow(report, server, fake, ui_path: Path, local: bool) -> list[Path]:
    from PIL import Image

    api = wt.load_json(wt.api_twin_path(ui_path))
    ui = wt.load_json(ui_path)
    name = ui_path.stem
    if is_local(api) and not local:
        report.add("SKIP", f"workflow {name}", "local backend: run with --local")
        return []
    before = fake.generate_calls
    started = time.monotonic()
    entry = server.wait(server.queue(api, ui))
    seconds = time.monotonic() - started
    if not report.check(
        entry["status"]["status_str"] == "success",
        f"workflow {name} finished",
        f"{seconds:.1f} s" if entry["status"]["status_str"] == "success" else _error_text(entry),
    ):
        return []
    files = saved_files(server, entry)
    problems = []
    for node_id, (count, width, height) in sized_images(api).items():
        paths = files.get(node_id, [])
        sizes = [Image.open(p).size for p in paths]
        if sizes != [(width, height)] * count:
            problems.append(f"node {node_id}: {sizes} instead of {count} x {width}x{height}")
    report.check(
        not problems,
        f"workflow {name} images",
        "; ".join(problems) or ", ".join(f"{k}: {len(v)} PNG" for k, v in files.items()),
    )
    for node_id in drafts_ids(api):
        check_draft_folder(report, server, api, node_id, name)
    calls = fake.generate_calls - before
    cached = frozenset(n for d in messages(entry).get("execution_cached", []) for n in d["nodes"])
    report.check(
        calls == api_images(api, cached),
        f"workflow {name} service requests",
        f"{calls} (expected {api_images(api, cached)}"
        + (f"; cached nodes {sorted(cached)})" if cached else ")"),
    )
    return [p for paths in files.values() for p in paths]


def _error_text(entry: dict) -> str:
    errors = messages(entry).get("execution_error", [])
    if not errors:
        return json.dumps(entry.get("status"))[:1000]
    e = errors[0]
    return f"{e.get('node_type')}: {e.get('exception_type')}: {e.get('exception_message')}"[:1500]


def check_cache(report, server, fake, ui_path: Path) -> None:
    """Re-queue exactly what the frontend sends again (same graph, same workflow metadata)."""
    api, ui = wt.load_json(wt.api_twin_path(ui_path)), wt.load_json(ui_path)
    before = fake.generate_calls
    entry = server.wait(server.queue(api, ui))
    report.add(
        "INFO",
        "re-post after the workflow run",
        f"{fake.generate_calls - before} service request(s), cached nodes "
        f"{sorted(n for d in messages(entry).get('execution_cached', []) for n in d['nodes'])}",
    )
    before = fake.generate_calls
    entry = server.wait(server.queue(api, ui))
    cached = [n for data in messages(entry).get("execution_cached", []) for n in data["nodes"]]
    report.check(
        entry["status"]["status_str"] == "success"
        and fake.generate_calls == before
        and sorted(cached) == sorted(api),
        "identical re-post served from cache",
        f"{fake.generate_calls - before} new service request(s); cached nodes {sorted(cached)}",
    )


def check_interrupt(report, server, fake, ui_path: Path) -> None:
    api = wt.load_json(wt.api_twin_path(ui_path))
    for node in api.values():
        if node["class_type"] == "FluxSchnellGenerate":
            node["inputs"]["seed"] += 7777  # not cached
    fake.delay_s = SLOW_SERVICE_S
    try:
        before = fake.generate_calls
        prompt_id = server.queue(api)
        deadline = time.monotonic() + 60
        while fake.generate_calls == before and time.monotonic() < deadline:
            time.sleep(0.05)
        if not report.check(fake.generate_calls > before, "slow request reached the service"):
            return
        time.sleep(0.5)
        started = time.monotonic()
        server.post("/interrupt", {})
        entry = server.wait(prompt_id, timeout=SLOW_SERVICE_S + 30)
        seconds = time.monotonic() - started
        interrupted = "execution_interrupted" in messages(entry)
        report.check(
            interrupted and seconds < INTERRUPT_LIMIT_S,
            "interrupt stops a slow generation",
            f"stopped after {seconds:.2f} s (service would answer after {SLOW_SERVICE_S:.0f} s); "
            f"status {entry['status']['status_str']}, interrupted message: {interrupted}",
        )
    finally:
        fake.delay_s = 0.0


def check_no_key(report, server, key: str, pngs: list[Path]) -> None:
    from PIL import Image

    leaks, with_prompt = [], 0
    for path in pngs:
        with Image.open(path) as im:
            text = dict(getattr(im, "text", {}) or {})
        with_prompt += "prompt" in text
        if any(key in v for v in text.values()):
            leaks.append(str(path))
    report.check(
        not leaks and with_prompt == len(pngs) > 0,
        "no key in saved PNG metadata",
        f"{len(pngs)} PNGs read, {with_prompt} carry the prompt chunk"
        + (f"; LEAK in {leaks}" if leaks else ""),
    )
    history = json.dumps(server.get("/history"))
    report.check(key not in history, "no key in /history")
    report.check(key not in server.log(), "no key in ComfyUI's log")


# --- the frontend --------------------------------------------------------------------------------


def run_browser(chromium: str, url: str, task: Callable) -> None:
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory(prefix="chromium-") as profile, sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(
            profile,
            executable_path=chromium,
            args=CHROMIUM_FLAGS,
            headless=True,
            viewport={"width": 1600, "height": 1000},
        )
        try:
            page = ctx.new_page()
            page.goto(url, wait_until="networkidle")
            page.wait_for_function("window.app && window.app.graph", timeout=120_000)
            task(page)
        finally:
            ctx.close()


LOAD_AND_CONVERT = """async (data) => {
  await app.loadGraphData(data, true, true, 'check');
  const p = await app.graphToPrompt();
  return JSON.stringify({workflow: p.workflow, output: p.output});
}"""


def live_specs(info: dict) -> dict[str, wt.NodeSpec]:
    """Node schemas from this server's /object_info (frontend-only widgets from the record)."""
    extra = wt.load_core_record().get("frontend_only_widgets", {})
    return {name: wt.spec_from_object_info(entry, extra.get(name)) for name, entry in info.items()}


def check_frontend(report: Report, page, info: dict) -> None:
    """The frontend loads each UI graph, converts it to what its API twin means and re-saves it
    meaning the same: compared as node types, links and widget values (workflow_tools.ui_meaning,
    api_meaning), not as JSON text, which frontend releases write differently."""
    version = page.evaluate("window.__COMFYUI_FRONTEND_VERSION__ || null")
    report.add("INFO", "frontend", f"version {version}")
    specs, ui_only = live_specs(info), wt.ui_only_types()
    for ui_path in wt.ui_workflow_paths():
        ui = wt.load_json(ui_path)
        got = json.loads(page.evaluate(LOAD_AND_CONVERT, ui))
        twin = wt.load_json(wt.api_twin_path(ui_path))
        problems = wt.meaning_differences(wt.api_meaning(got["output"], specs), wt.api_meaning(twin, specs))
        exact = "identical JSON" if got["output"] == twin else "same meaning, JSON differs"
        report.check(
            not problems,
            f"frontend converts {ui_path.name} to its API twin",
            "; ".join(problems)[:1500] if problems else exact,
        )
        try:
            problems = wt.meaning_differences(
                wt.ui_meaning(got["workflow"], specs, ui_only), wt.ui_meaning(ui, specs, ui_only)
            )
        except ValueError as e:
            problems = [str(e)]
        report.check(
            not problems,
            f"frontend re-saves {ui_path.name} meaning the same (node types, links, widget values)",
            "; ".join(problems)[:1500],
        )


SCREENSHOT_SETTINGS = {
    "Comfy.TutorialCompleted": True,  # no "Get Started with a Template" dialog
    "Comfy.Minimap.Visible": False,
}


def screenshot(page, ui_path: Path, target: Path) -> None:
    """The workflow as the frontend draws it, as an optimised PNG (128 colours)."""
    from PIL import Image

    page.evaluate(
        "async (d) => { await app.loadGraphData(d, true, true, 'upscale'); }",
        wt.load_json(ui_path),
    )
    page.keyboard.press("Escape")
    page.wait_for_timeout(1500)
    raw = target.with_suffix(".raw.png")
    page.screenshot(path=str(raw))
    with Image.open(raw) as im:
        im.convert("RGB").quantize(colors=128).save(target, optimize=True)
    raw.unlink()


def check_templates(report: Report, server: ComfyServer) -> None:
    """ComfyUI's template browser lists the UI workflows (none of the API twins), and serves each
    one's JSON and its thumbnail where the frontend asks for them."""
    listed = sorted(server.get("/api/workflow_templates").get(PACKAGE_FOLDER, []))
    want = sorted(p.stem for p in wt.ui_workflow_paths())
    report.check(listed == want, "template browser lists the UI workflows only", str(listed))
    for ui_path in wt.ui_workflow_paths():
        thumb = wt.thumbnail_path(ui_path)
        for path, kind in ((ui_path, "workflow"), (thumb, "thumbnail")):
            url = f"/api/workflow_templates/{PACKAGE_FOLDER}/{urllib.parse.quote(path.name)}"
            try:
                status, content_type, body = server.get_bytes(url)
            except urllib.error.HTTPError as e:
                status, content_type, body = e.code, "", b""
            same = path.is_file() and body == path.read_bytes()
            report.check(
                status == 200 and same,
                f"template {kind} served: {path.name}",
                f"GET {url}: {status} {content_type}, {len(body)} bytes"
                + ("" if same else " (not the file's bytes)"),
            )


CREATE_AND_CONVERT = """async (types) => {
  app.graph.clear();
  const LG = window.LiteGraph || window.comfyAPI.litegraph.LiteGraph;
  for (const t of types) app.graph.add(LG.createNode(t));
  const p = await app.graphToPrompt();
  const out = {};
  for (const k in p.output) out[p.output[k].class_type] = p.output[k].inputs;
  return JSON.stringify(out);
}"""


def record(page, server: ComfyServer, info: dict, comfyui: Path, commit: str | None) -> Path:
    """Rewrite tests/data/comfyui_core_nodes.json from this server and its frontend."""
    used = sorted({n["type"] for p in wt.ui_workflow_paths() for n in wt.load_json(p)["nodes"]})
    candidates = sorted({"Note", "MarkdownNote", *used} - set(OWN_NODES))
    converted = json.loads(page.evaluate(CREATE_AND_CONVERT, candidates))
    ui_only = [t for t in candidates if t not in converted]  # the frontend never sends them
    core = [t for t in candidates if t in converted]
    missing = [t for t in core if t not in info]
    if missing:
        raise RuntimeError(f"core nodes missing from /object_info: {missing}")
    frontend_only = {t: converted[t] for t in core}
    extra = {}
    for t, inputs in frontend_only.items():
        declared = set(info[t]["input"].get("required", {})) | set(info[t]["input"].get("optional", {}))
        added = {k: v for k, v in inputs.items() if k not in declared}
        if added:
            extra[t] = added
    stats = server.get("/system_stats")["system"]
    doc = {
        "about": "Input specs of the ComfyUI core nodes our workflows use, copied from a real "
        "server's /object_info by scripts/comfyui_check.py --record. model_name lists are files "
        "in that server's models/ folder. ui_only_nodes: frontend-only node types (never in the "
        "API format); frontend_only_widgets: inputs the frontend adds to the API format.",
        "comfyui": {
            "version": stats["comfyui_version"],
            "commit": commit,
            "frontend": page.evaluate("window.__COMFYUI_FRONTEND_VERSION__ || null"),
            "pytorch": stats["pytorch_version"],
            "python": stats["python_version"].split()[0],
        },
        "ui_only_nodes": sorted(ui_only),
        "frontend_only_widgets": extra,
        "nodes": {t: info[t] for t in core},
        "own_nodes_as_served": {t: info[t] for t in OWN_NODES},
    }
    target = wt.CORE_NODES_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(doc, indent=1, sort_keys=False) + "\n", encoding="utf-8")
    return target


# --- main --------------------------------------------------------------------------------------


def comfyui_commit(comfyui: Path) -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(comfyui), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--comfyui", type=Path, required=True, help="ComfyUI folder (has main.py)")
    parser.add_argument("--python", default=sys.executable, help="Python that runs ComfyUI")
    parser.add_argument("--port", type=int, default=0, help="ComfyUI port (default: a free one)")
    parser.add_argument("--local", action="store_true", help="also run the local workflows")
    parser.add_argument("--browser", help="Chromium executable for the frontend checks")
    parser.add_argument(
        "--front-end-root",
        type=Path,
        help="serve this frontend build (comfyui_frontend_package/static) instead of ComfyUI's own",
    )
    parser.add_argument("--screenshot", type=Path, help="save the upscale workflow's picture here")
    parser.add_argument("--record", action="store_true", help="rewrite the core-node record")
    parser.add_argument("--commit", help="ComfyUI commit to note in the report and the record")
    parser.add_argument("--keep", action="store_true", help="keep the temporary base directory")
    args = parser.parse_args(argv)
    if (args.screenshot or args.record) and not args.browser:
        parser.error("--screenshot and --record need --browser")
    comfyui = args.comfyui.expanduser().resolve()
    if not (comfyui / "main.py").is_file():
        parser.error(f"{comfyui} has no main.py: pass the ComfyUI folder")
    front_end_root = args.front_end_root.expanduser().resolve() if args.front_end_root else None
    if front_end_root is not None and not (front_end_root / "index.html").is_file():
        parser.error(f"{front_end_root} has no index.html: pass .../comfyui_frontend_package/static")

    report = Report()
    key = "sk_check_" + secrets.token_hex(16)
    base = Path(tempfile.mkdtemp(prefix="comfyui-check-"))
    make_base(base, args.local)
    local_files = sorted((base / "models").glob("*/*.safetensors"))
    local_files = [p for p in local_files if p.parent.name != "upscale_models"]
    fake = FakeImageAPI().start()
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEAPI_")}
    env.update(
        IMAGEAPI_API_KEY=key,
        IMAGEAPI_BASE_URL=fake.base_url,
        IMAGEAPI_CONFIG=str(base / "flux_schnell_config.json"),
    )
    server = ComfyServer(comfyui, args.python, base, args.port or free_port(), env, front_end_root)
    print(f"ComfyUI {comfyui} with {args.python}; base directory {base}; fake API {fake.base_url}")
    try:
        server.start()
        stats = server.get("/system_stats")["system"]
        commit = args.commit or comfyui_commit(comfyui) or "commit unknown"
        report.add(
            "INFO",
            "server",
            f"ComfyUI {stats['comfyui_version']} ({commit}), frontend "
            f"{front_end_root or 'its own'} (it requires {stats.get('required_frontend_version')}), "
            f"torch {stats['pytorch_version']}, python {stats['python_version'].split()[0]}",
        )
        check_import(report, server.log())
        check_templates(report, server)
        info = server.get("/object_info")
        check_object_info(report, info, local_files)
        pngs: list[Path] = []
        for ui_path in wt.ui_workflow_paths():
            pngs += check_workflow(report, server, fake, ui_path, args.local)
        first = wt.TEXT_TO_IMAGE
        check_cache(report, server, fake, first)
        check_interrupt(report, server, fake, first)
        runtime.check_concurrency(report, server, fake)
        runtime.check_progress_text(report, server, fake, key)
        runtime.check_board_interrupt(report, server, fake)
        runtime.check_drafts_concurrency(report, server, fake)
        if args.local:
            runtime.check_model_management(report, server)
        else:
            report.add("SKIP", "ComfyUI's model management of the local models", "run with --local")
        check_no_key(report, server, key, [p for p in pngs if p.is_file()])
        check_run_log(report, server.log())
        if args.browser:

            def in_browser(page) -> None:
                check_frontend(report, page, info)
                if args.record:
                    path = record(page, server, info, comfyui, args.commit or comfyui_commit(comfyui))
                    report.add("INFO", "recorded", str(path))

            run_browser(args.browser, server.url, in_browser)
            if args.screenshot:
                server.post("/settings", SCREENSHOT_SETTINGS)
                upscale = wt.UPSCALE
                run_browser(
                    args.browser,
                    server.url,
                    lambda page: screenshot(page, upscale, args.screenshot),
                )
                size = args.screenshot.stat().st_size
                report.add("INFO", "screenshot", f"{args.screenshot} ({size} bytes)")
        else:
            report.add("SKIP", "frontend checks", "run with --browser /usr/bin/chromium")
    except Exception as e:
        report.add("FAIL", "check run aborted", f"{type(e).__name__}: {e}")
        raise
    finally:
        server.stop()
        fake.stop()
        print(f"\nComfyUI log: {server.log_path}" if args.keep else "")
        if not args.keep:
            import shutil

            shutil.rmtree(base, ignore_errors=True)
        print(report.summary())
    return 1 if report.failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
