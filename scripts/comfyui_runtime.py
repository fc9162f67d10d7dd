"""How the package behaves inside a running ComfyUI: part of the real-server proof
(scripts/comfyui_check.py runs these after the saved workflows).

- the draft board's four generate nodes wait for the service at the same time (timed against a
  loopback fake that answers after 1 s: about one round trip, not four);
- a waiting node shows the seconds and the images done (ComfyUI's progress text, read from the
  WebSocket as the browser gets it) and never the key;
- Cancel stops all four waiting nodes of the draft board at once;
- the Drafts node drafts 12 prompts at concurrency 4 against the 1 s service in under 3 times one
  image's time (a one-prompt Drafts run), with 12 PNGs, manifest.jsonl and index.html in its folder;
- with --local: ComfyUI's model management lists our models after a local run, POST /free
  {"unload_models": true} releases them, and the next run works without reading the weight
  files again.
"""

from __future__ import annotations

import ast
import copy
import json
import time

from scripts.comfyui_server import ComfyServer, Report, WebSocketTap, loaded_models, messages
from tests.support import REPO
from tests.support import workflow_tools as wt
from tests.support.fake_imageapi import FakeImageAPI

SERVICE_DELAY_S = 1.0  # the fake's answer time in the concurrency check
TEXT_DELAY_S = 2.5  # long enough for the node's text to tick twice
SLOW_SERVICE_S = 20.0


def _cancel_grace_s() -> float:
    """api_client.CANCEL_GRACE_S, read from its source (the package's modules import relatively, so
    they cannot be imported from here without ComfyUI's loader)."""
    tree = ast.parse((REPO / "api_client.py").read_text(encoding="utf-8"))
    for node in tree.body:
        names = [getattr(t, "id", "") for t in getattr(node, "targets", [])]
        if isinstance(node, ast.Assign) and "CANCEL_GRACE_S" in names:
            return float(ast.literal_eval(node.value))
    raise LookupError("api_client.py defines no CANCEL_GRACE_S")


# Cancel waits up to CANCEL_GRACE_S for answers already in flight (paid for), then abandons them:
# a Cancel against a 20 s service ends within that grace and a few seconds more.
INTERRUPT_LIMIT_S = _cancel_grace_s() + 3.0
OWN_PATCHER_PREFIX = "FluxSchnell"  # comfy_bridge's ModelPatcher subclass: FluxSchnellModelPatcher
LOADING_LOG_LINE = "loading FLUX.1-schnell"  # local_backend logs it each time it reads the files
_runs = iter(range(1, 10_000))


def fresh(ui_path, **inputs) -> dict:
    """The API twin of `ui_path` with new seeds (so ComfyUI's cache serves none of it) and the
    generate nodes' inputs changed as given."""
    api = copy.deepcopy(wt.load_json(wt.api_twin_path(ui_path)))
    offset = 100_000 * next(_runs)
    for node in api.values():
        if node["class_type"] == "FluxSchnellGenerate":
            node["inputs"]["seed"] += offset
            node["inputs"].update(inputs)
    return api


def generate_ids(api: dict) -> list[str]:
    return [k for k, n in api.items() if n["class_type"] == "FluxSchnellGenerate"]


def timed_run(server: ComfyServer, api: dict, client_id: str | None = None) -> tuple[dict, float]:
    started = time.monotonic()
    entry = server.wait(server.queue(api, client_id=client_id), poll_s=0.05)
    return entry, time.monotonic() - started


def check_concurrency(report: Report, server: ComfyServer, fake: FakeImageAPI) -> None:
    one = fresh(wt.TEXT_TO_IMAGE, width=512, height=512)  # the draft board's size, one node
    board = fresh(wt.DRAFT_BOARD)
    fake.delay_s = SERVICE_DELAY_S
    try:
        entry_one, t_one = timed_run(server, one)
        before = len(fake.requests_to("/api/v1/generate"))
        entry_board, t_board = timed_run(server, board)
        sent = fake.requests_to("/api/v1/generate")[before:]
    finally:
        fake.delay_s = 0.0
    ok = all(e["status"]["status_str"] == "success" for e in (entry_one, entry_board))
    # Each request is answered 1 s after it arrived: all four open at once iff they arrived
    # within 1 s of each other.
    spread = max(r.time for r in sent) - min(r.time for r in sent) if sent else float("inf")
    report.add(
        "INFO",
        "draft board timing",
        f"service answers after {SERVICE_DELAY_S:.1f} s: one generate node {t_one:.2f} s, the draft "
        f"board's four generate nodes {t_board:.2f} s (x{t_board / t_one:.2f}; one after another "
        f"would take about {t_one + 3 * SERVICE_DELAY_S:.1f} s); its {len(sent)} requests arrived "
        f"within {spread:.2f} s",
    )
    report.check(
        ok and len(sent) == 4 and spread < SERVICE_DELAY_S and t_board < t_one + SERVICE_DELAY_S,
        "the draft board's four generate nodes wait at the same time (about one round trip)",
        f"{t_board:.2f} s vs {t_one:.2f} s for one node",
    )


DRAFTS_PROMPTS = 12
DRAFTS_CONCURRENCY = 4
DRAFTS_LIMIT = 3.0  # times one image's time (12 at concurrency 4: three round trips, not twelve)


def drafts_api(folder: str, prompts: list[str]) -> dict:
    """The drafts template's API twin drafting `prompts` into `folder`."""
    api = copy.deepcopy(wt.load_json(wt.api_twin_path(wt.DRAFTS)))
    (node_id,) = [k for k, n in api.items() if n["class_type"] == "FluxSchnellDrafts"]
    api[node_id]["inputs"].update(
        prompts="# timed by the real-server check\n" + "\n".join(prompts),
        concurrency=DRAFTS_CONCURRENCY,
        folder=folder,
        seed=next(_runs),
    )
    return api


def check_drafts_concurrency(report: Report, server: ComfyServer, fake: FakeImageAPI) -> None:
    run = next(_runs)
    prompts = [f"draft {i} of run {run}: a lighthouse in a storm" for i in range(1, DRAFTS_PROMPTS + 1)]
    fake.delay_s = SERVICE_DELAY_S
    try:
        entry_one, t_one = timed_run(server, drafts_api(f"timing_one_{run}", [f"one image of run {run}"]))
        before = len(fake.requests_to("/api/v1/generate"))
        entry_many, t_many = timed_run(server, drafts_api(f"timing_drafts_{run}", prompts))
        sent = fake.requests_to("/api/v1/generate")[before:]
    finally:
        fake.delay_s = 0.0
    ok = all(e["status"]["status_str"] == "success" for e in (entry_one, entry_many))
    folder = server.base / "output" / f"timing_drafts_{run}"
    pngs = sorted(folder.glob("*.png"))
    extras = [f for f in ("manifest.jsonl", "index.html") if (folder / f).is_file()]
    report.add(
        "INFO",
        "Drafts node timing",
        f"service answers after {SERVICE_DELAY_S:.1f} s: one prompt {t_one:.2f} s, {DRAFTS_PROMPTS} "
        f"prompts at concurrency {DRAFTS_CONCURRENCY} {t_many:.2f} s (x{t_many / t_one:.2f}; one after "
        f"another would take about {DRAFTS_PROMPTS * t_one:.1f} s); {len(sent)} requests",
    )
    report.check(
        ok and len(sent) == DRAFTS_PROMPTS and t_many < DRAFTS_LIMIT * t_one,
        f"the Drafts node drafts {DRAFTS_PROMPTS} prompts at concurrency {DRAFTS_CONCURRENCY} in under "
        f"{DRAFTS_LIMIT:.0f} times one image's time",
        f"{t_many:.2f} s vs {t_one:.2f} s for one" if ok else "a run failed",
    )
    report.check(
        len(pngs) == DRAFTS_PROMPTS and len(extras) == 2,
        "the Drafts node's folder holds its PNGs, manifest.jsonl and index.html",
        f"{len(pngs)} PNGs, {', '.join(extras) or 'neither manifest nor gallery'}",
    )


def check_progress_text(report: Report, server: ComfyServer, fake: FakeImageAPI, key: str) -> None:
    api = fresh(wt.TEXT_TO_IMAGE, width=512, height=512, batch_size=2)
    (node_id,) = generate_ids(api)
    tap = WebSocketTap(server)
    fake.delay_s = TEXT_DELAY_S
    try:
        entry, seconds = timed_run(server, api, client_id=tap.client_id)
        time.sleep(0.5)  # the last messages are on their way
    finally:
        fake.delay_s = 0.0
        tap.close()
    texts = [text for node, text, _ in tap.texts if node == node_id]
    bar = [
        (d["value"], d["max"]) for kind, d, _ in tap.events if kind == "progress" and d.get("node") == node_id
    ]
    report.add("INFO", "text on the waiting node", " | ".join(t.replace("\n", " / ") for t in texts)[:1200])
    waited = [t for t in texts if t.startswith("waiting for the service: ")]
    ticked = {t.split(":")[1].split("s")[0].strip() for t in waited}
    report.check(
        entry["status"]["status_str"] == "success"
        and bool(waited)
        and waited[0].endswith("\n0 of 2 images done")
        and len(ticked) >= 2
        and texts[-1].startswith("2 of 2 images done in "),
        "a waiting node shows the seconds and the images done",
        f"{len(texts)} texts over {seconds:.1f} s; seconds shown: {sorted(ticked, key=int)}; "
        f"last: {texts[-1] if texts else None!r}",
    )
    report.check(
        bar and bar[-1] == (2, 2), "the progress bar advances per finished image", f"progress events {bar}"
    )
    report.check(
        all(key not in t for t in texts) and not any(key in json.dumps(d) for _, d, _ in tap.events),
        "no key in the WebSocket messages",
        f"{len(tap.texts)} texts, {len(tap.events)} JSON messages read",
    )


def check_board_interrupt(report: Report, server: ComfyServer, fake: FakeImageAPI) -> None:
    board = fresh(wt.DRAFT_BOARD)
    tap = WebSocketTap(server)
    fake.delay_s = SLOW_SERVICE_S
    try:
        before = fake.generate_calls
        prompt_id = server.queue(board, client_id=tap.client_id)
        deadline = time.monotonic() + 60
        while fake.generate_calls < before + 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        if not report.check(fake.generate_calls == before + 4, "the four draft requests reached the service"):
            return
        time.sleep(0.5)
        started = time.monotonic()
        server.post("/interrupt", {})
        entry = server.wait(prompt_id, timeout=SLOW_SERVICE_S + 30, poll_s=0.05)
        seconds = time.monotonic() - started
        time.sleep(1.0)
        sent_after = fake.generate_calls - before - 4
    finally:
        fake.delay_s = 0.0
        tap.close()
    interrupted = "execution_interrupted" in messages(entry)
    last = {}
    for node, text, _ in tap.texts:
        last[node] = text
    cancelled = sorted(n for n in generate_ids(board) if last.get(n, "").startswith("cancelled after"))
    report.check(
        interrupted and seconds < INTERRUPT_LIMIT_S and sent_after == 0,
        "Cancel stops the draft board's four waiting nodes",
        f"prompt ended {seconds:.2f} s after POST /interrupt (service would answer after "
        f"{SLOW_SERVICE_S:.0f} s), interrupted: {interrupted}; requests sent after: {sent_after}; "
        f"nodes showing 'cancelled': {cancelled}",
    )


def _ours(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r["patcher"].startswith(OWN_PATCHER_PREFIX)]


def _rows_text(rows: list[dict]) -> str:
    return ", ".join(f"{r['model']} {r['bytes'] / 2**20:.1f} MiB on {r['device']}" for r in rows)


def check_model_management(report: Report, server: ComfyServer) -> None:
    """After the local workflow ran: ComfyUI holds our models, unloads them, and the next run
    needs no file read."""
    rows = loaded_models(server)
    report.check(
        len(_ours(rows)) == 4,
        "ComfyUI's current_loaded_models lists our four models after a local run",
        _rows_text(rows),
    )
    reads_before = server.log().count(LOADING_LOG_LINE)
    status, _ = server.post("/free", {"unload_models": True})
    started = time.monotonic()
    while _ours(rows) and time.monotonic() - started < 15:
        time.sleep(0.1)
        rows = loaded_models(server)
    report.check(
        status == 200 and not _ours(rows),
        'POST /free {"unload_models": true} releases them',
        f"none of ours listed {time.monotonic() - started:.1f} s later; ComfyUI holds {len(rows)} model(s)",
    )
    api = fresh(wt.LOCAL)
    (gen,) = generate_ids(api)
    api["99"] = {"inputs": {"source": [gen, 1]}, "class_type": "PreviewAny", "_meta": {"title": "info"}}
    entry, seconds = timed_run(server, api)
    ok = entry["status"]["status_str"] == "success"
    info = json.loads(entry["outputs"]["99"]["text"][0]) if ok else {}
    reads_after = server.log().count(LOADING_LOG_LINE)
    rows = loaded_models(server)
    report.check(
        ok
        and "loading" not in info.get("timings", {})
        and reads_after == reads_before
        and len(_ours(rows)) == 4,
        "the next local run works without reading the weight files again",
        f"{seconds:.1f} s; stage timings {json.dumps(info.get('timings'))}; "
        f"'{LOADING_LOG_LINE}' log lines {reads_before} -> {reads_after}; listed again: "
        f"{_rows_text(_ours(rows))}",
    )
