"""A long draft run against a faulty loopback service: nothing lost, never paid twice, flat memory.

A fake ImageAPI (tests/support/fake_imageapi.py) runs in a process of its own and answers each
generate call after `--delay` seconds with a 1024x1024 photo-like PNG (about 2 MB) as JSON with
base64 (`{"data": [{"b64_json": ...}]}`). For the soak it injects faults, chosen per call from a
hash of the prompt and the attempt (so a rerun sees the same faults): 429 with Retry-After, 503,
500, 502, a connection dropped mid-body, a slow (trickling) answer and a hung one (answered after
the client's timeout). `flux-schnell generate --prompts-file` runs as a subprocess, as a user would
run it, with `--concurrency 8`; its RSS is read from /proc while it works.

Printed:
  (1) fault-free: the command line at --concurrency against the service's own Python example in
      a loop (requests.post, .json(), base64-decode, write the PNG), images per second;
  (2) the soak: done / failed / duplicates / lost, requests per image, billed retries above the
      limit (each call answered with a billable fault and asked again counts as a billed retry),
      peak RSS and RSS growth from image 100 to the end, throughput against the ideal
      (concurrency / server delay).

Run: python -m benchmarks.drafts_soak [--prompts 10000] [--concurrency 8] [--delay 0.3]
     [--compare-images 400] [--example-images 30] [--side 1024] [--keep DIR]
(`--compare-images 0` skips part 1; `--prompts 100000 --side 256` shows the bookkeeping of a very
long prompts file without 200 GB of images.)
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from multiprocessing.connection import Connection
from pathlib import Path

import requests

from tests.support.fake_imageapi import FakeImageAPI, Reply, photo_like_png

KEY = "sk_benchmark_not_a_real_key"
SIDE = 1024
GENERATE_PATH = "/api/v1/generate"
SERVER_START_S = 60.0
VARIANTS = 4  # different PNGs the fake cycles through
MAX_BILLED_RETRIES = 1
SETTINGS = {  # the run's config file: short enough that hung calls time out quickly
    "request_timeout_s": 4,
    "deadline_s": 120,
    "min_call_s": 4,
    "max_billed_retries": MAX_BILLED_RETRIES,
}
# fault: (share of soak calls, billable?) -- billable faults may have cost an image
FAULTS = {
    "429 Retry-After 1": (0.04, False),
    "503": (0.03, False),
    "500": (0.015, True),
    "502": (0.015, True),
    "dropped mid-body": (0.01, True),
    "slow answer (1.5 s trickle)": (0.02, False),
    "hung (answers after 10 s)": (0.005, True),
}
SOAK_PREFIX = "soak "  # only these prompts get faults


def pick_fault(prompt: str, attempt: int) -> str | None:
    if not prompt.startswith(SOAK_PREFIX):
        return None
    digest = hashlib.sha256(f"{prompt}\0{attempt}".encode()).digest()
    x = int.from_bytes(digest[:8], "big") / 2**64
    for name, (share, _) in FAULTS.items():
        if x < share:
            return name
        x -= share
    return None


def serve(delay: float, side: int, conn: Connection) -> None:
    """The server process: answer (or fail) every generate call until the parent says stop."""
    bodies = [
        Reply.json(
            {"created": 0, "data": [{"b64_json": base64.b64encode(photo_like_png(side, i)).decode()}]}
        ).body
        for i in range(VARIANTS)
    ]
    lock = threading.Lock()
    calls: dict[str, list[str]] = defaultdict(list)  # prompt -> what each call got

    def answer(req, fake) -> Reply:
        prompt = req.prompt
        with lock:
            attempt = len(calls[prompt])
            fault = pick_fault(prompt, attempt)
            calls[prompt].append(fault or "ok")
        body = bodies[int(hashlib.sha256(prompt.encode()).hexdigest(), 16) % VARIANTS]
        if fault is None:
            return Reply(body=body, delay_s=delay)
        if fault.startswith("429"):
            return Reply.json({"error": "rate limited"}, 429, headers={"Retry-After": "1"}, delay_s=0.02)
        if fault in ("503", "500", "502"):
            return Reply.json({"error": f"fault {fault}"}, int(fault), delay_s=delay / 2)
        if fault == "dropped mid-body":
            return Reply(body=body, drop_after=len(body) // 2, delay_s=delay)
        if fault.startswith("slow"):
            return Reply(body=body, delay_s=delay, body_delay_s=1.5)
        return Reply(body=body, delay_s=10.0)  # hung: the client times out first

    with FakeImageAPI() as fake:
        fake.set_default(answer)
        conn.send(fake.base_url)
        try:
            while conn.recv() == "stats":
                with lock:
                    conn.send({p: list(c) for p, c in calls.items()})
        except EOFError:
            return


class ServerProcess:
    def __init__(self, delay: float, side: int = SIDE):
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._process = ctx.Process(
            target=serve, args=(delay, side, child), name="fake-imageapi", daemon=True
        )
        self.base_url = ""

    def __enter__(self) -> ServerProcess:
        self._process.start()
        if not self._conn.poll(SERVER_START_S):
            self._process.terminate()
            raise RuntimeError("the fake ImageAPI process did not start")
        self.base_url = self._conn.recv()
        return self

    def calls(self) -> dict[str, list[str]]:
        self._conn.send("stats")
        return self._conn.recv()

    def __exit__(self, *exc_info) -> None:
        self._conn.send("stop")
        self._process.join(10)
        if self._process.is_alive():
            self._process.terminate()
            self._process.join()


# --- the command line, watched ----------------------------------------------------------------------


def rss_mib(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a process in MiB."""
    values = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                name, kb = line.split()[:2]
                values[name] = int(kb) / 1024
    return values.get("VmRSS:", 0.0), values.get("VmHWM:", 0.0)


def run_cli(
    base_url: str, prompts: Path, out: Path, concurrency: int, workdir: Path, side: int = SIDE
) -> dict:
    config = workdir / "config.json"
    config.write_text(json.dumps(SETTINGS))
    env = {
        **os.environ,
        "IMAGEAPI_API_KEY": KEY,
        "IMAGEAPI_BASE_URL": base_url,
        "IMAGEAPI_CONFIG": str(config),
    }
    args = [
        sys.executable,
        "-m",
        "comfyui_flux_schnell",
        "generate",
        "--prompts-file",
        str(prompts),
        "--out-dir",
        str(out),
        "--width",
        str(side),
        "--height",
        str(side),
        "--seed",
        "1",
        "--concurrency",
        str(concurrency),
    ]
    log = workdir / f"{out.name}.log"
    started = time.perf_counter()
    with open(log, "w") as stderr:
        process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=stderr, env=env)
        manifest = out / "manifest.jsonl"
        lines = 0
        offset = 0
        rss_at_100 = None
        last_rss = peak = 0.0
        trajectory: list[float] = []
        with open(prompts) as f:
            step = max(1, sum(1 for _ in f) // 10)
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid != 0:  # ended: its exit status and the CPU time it used
                break
            try:
                with open(manifest, "rb") as f:
                    f.seek(offset)
                    chunk = f.read()
                    offset += len(chunk)
                    lines += chunk.count(b"\n")
            except FileNotFoundError:
                pass
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):  # ending: reaped above
                last_rss, peak = rss_mib(process.pid)
            if rss_at_100 is None and lines >= 100:
                rss_at_100 = last_rss
            if lines >= (len(trajectory) + 1) * step:  # RSS at each tenth of the run
                trajectory.append(last_rss)
            time.sleep(0.2)
        code = process.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - started
    return {
        "code": code,
        "seconds": seconds,
        "rss_at_100": rss_at_100,
        "rss_end": last_rss,
        "rss_peak": peak,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "trajectory": trajectory,
        "log": log,
    }


def example_loop(base_url: str, n: int, out: Path, side: int = SIDE) -> float:
    """The service's documented Python example, once per image, saving each PNG; images/s."""
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    for i in range(n):
        response = requests.post(
            f"{base_url}{GENERATE_PATH}",
            headers={"Authorization": f"Bearer {KEY}"},
            json={
                "prompt": f"example {i}",
                "model": "flux-schnell",
                "width": side,
                "height": side,
                "num_inference_steps": 4,
            },
            timeout=120,
        )
        data = response.json()
        (out / f"example-{i}.png").write_bytes(base64.b64decode(data["data"][0]["b64_json"]))
    return n / (time.perf_counter() - started)


# --- checking the result ----------------------------------------------------------------------------


def png_is_whole(path: Path) -> bool:
    """Structure check without decoding: signature, every chunk inside the file, IEND last."""
    from comfyui_flux_schnell.drafts.png_files import PNG_SIGNATURE, _chunks

    data = path.read_bytes()
    if not data.startswith(PNG_SIGNATURE):
        return False
    try:
        kinds = [kind for kind, _ in _chunks(data)]
    except ValueError:
        return False
    return kinds[-1] == b"IEND" and b"IDAT" in kinds


def billed_retries_above_limit(calls: dict[str, list[str]]) -> tuple[int, int]:
    """(billed retries made, how many of them went above the limit), from the server's log."""
    billable = {name for name, (_, billed) in FAULTS.items() if billed}
    made = above = 0
    for outcomes in calls.values():
        billed = sum(1 for o in outcomes[:-1] if o in billable)  # a billable fault asked again
        made += billed
        above += max(0, billed - MAX_BILLED_RETRIES)
    return made, above


def write_prompts(path: Path, n: int) -> int:
    """n lines of soak prompts; every 100th line repeats an earlier one. Returns distinct prompts."""
    distinct = 0
    with open(path, "w") as f:
        for i in range(n):
            if i % 100 == 99:
                f.write(f"{SOAK_PREFIX}drawing {i - 50}\n")
            else:
                f.write(f"{SOAK_PREFIX}drawing {i}\n")
                distinct += 1
    return distinct


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=10_000, help="prompts-file lines in the soak")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--delay", type=float, default=0.3, help="server delay per call, seconds")
    parser.add_argument("--compare-images", type=int, default=400, help="fault-free images of the CLI")
    parser.add_argument("--example-images", type=int, default=30, help="images of the example loop")
    parser.add_argument("--side", type=int, default=SIDE, help="image width and height, pixels")
    parser.add_argument("--keep", type=Path, help="keep the draft folders here (default: deleted)")
    args = parser.parse_args(argv)

    workdir = Path(tempfile.mkdtemp(prefix="drafts-soak-"))
    try:
        with ServerProcess(args.delay, args.side) as server:
            # (1) fault-free: example loop vs the command line
            requests.post(server.base_url + GENERATE_PATH, json={"prompt": "warm up"}, timeout=60)
            example_rate = cli_rate = float("nan")
            fast = {"cpu_s": float("nan")}
            if args.compare_images and args.example_images:
                example_rate = example_loop(
                    server.base_url, args.example_images, workdir / "example", args.side
                )
                clean = workdir / "clean.txt"
                clean.write_text("".join(f"clean drawing {i}\n" for i in range(args.compare_images)))
                fast = run_cli(
                    server.base_url, clean, workdir / "clean", args.concurrency, workdir, args.side
                )
                cli_rate = args.compare_images / fast["seconds"]

            # (2) the soak
            prompts = workdir / "soak.txt"
            distinct = write_prompts(prompts, args.prompts)
            soak = run_cli(server.base_url, prompts, workdir / "soak", args.concurrency, workdir, args.side)
            calls = {p: c for p, c in server.calls().items() if p.startswith(SOAK_PREFIX)}
        load = os.getloadavg()
        png_mb = len(photo_like_png(args.side, 0)) / 1e6

        from comfyui_flux_schnell.drafts.manifest import read_manifest

        status: dict[int, str] = {}
        for record in read_manifest(workdir / "soak" / "manifest.jsonl"):
            status[record["line"]] = record["status"]
        done = sum(1 for s in status.values() if s == "done")
        failed = sum(1 for s in status.values() if s == "failed")
        duplicates = sum(1 for s in status.values() if s == "duplicate")
        lost = args.prompts - len(status)
        pngs = list((workdir / "soak").glob("*.png"))
        broken = sum(1 for p in pngs if not png_is_whole(p))
        requests_made = sum(len(c) for c in calls.values())
        billed_made, billed_above = billed_retries_above_limit(calls)
        faults = defaultdict(int)
        for outcomes in calls.values():
            for o in outcomes:
                faults[o] += 1
        ideal = args.concurrency / args.delay
        soak_rate = done / soak["seconds"]
        growth_end = soak["rss_end"] - soak["rss_at_100"] if soak["rss_at_100"] is not None else float("nan")
        growth_peak = (
            soak["rss_peak"] - soak["rss_at_100"] if soak["rss_at_100"] is not None else float("nan")
        )

        print(
            f"fake ImageAPI on 127.0.0.1 (own process), {args.delay * 1000:.0f} ms per call, "
            f"{args.side}x{args.side} photo-like PNG ({png_mb:.2f} MB) as base64 JSON; "
            f"{os.cpu_count()} CPUs, load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} "
            "(1/5/15 min) at the end\n"
        )
        print("(1) fault-free, images per second")
        print(f"  {'service example loop (requests.post, .json(), b64decode, write)':64} {example_rate:8.2f}")
        ours = f"flux-schnell generate --prompts-file, --concurrency {args.concurrency}"
        print(f"  {ours:64} {cli_rate:8.2f}")
        print(f"  {'ratio (target >= 7x)':64} {cli_rate / example_rate:7.2f}x")
        cpu_ms = 1000 * fast["cpu_s"] / max(args.compare_images, 1)
        print(f"  {'CPU time of the command line per image, ms (user + system)':64} {cpu_ms:8.1f}")
        print(
            f"  ({args.example_images} images for the loop, {args.compare_images} for the command line, "
            "its start-up included)\n"
        )
        print(f"(2) soak: {args.prompts:,} prompts-file lines ({distinct:,} distinct), ", end="")
        print(f"--concurrency {args.concurrency}")
        rows = [
            ("exit code", f"{soak['code']}"),
            ("done / failed / duplicates / lost", f"{done:,} / {failed:,} / {duplicates:,} / {lost:,}"),
            ("PNG files on disk / not whole", f"{len(pngs):,} / {broken}"),
            ("generate requests / per distinct image", f"{requests_made:,} / {requests_made / distinct:.3f}"),
            (
                "billed retries / above the limit of 1 per image (must be 0)",
                f"{billed_made:,} / {billed_above}",
            ),
            ("peak RSS, MiB", f"{soak['rss_peak']:.0f}"),
            (
                "RSS at image 100 -> at the end, MiB",
                f"{soak['rss_at_100'] or 0:.0f} -> {soak['rss_end']:.0f}",
            ),
            (
                "RSS growth from image 100: to the end / to the peak, MiB (target < 100)",
                f"{growth_end:.0f} / {growth_peak:.0f}",
            ),
            ("RSS at each tenth of the run, MiB", " ".join(f"{r:.0f}" for r in soak["trajectory"])),
            (
                "wall time, s / CPU time of the command line per image, ms",
                f"{soak['seconds']:.0f} / {1000 * soak['cpu_s'] / max(done, 1):.1f}",
            ),
            (
                "throughput, images/s / ideal (concurrency / delay)",
                f"{soak_rate:.2f} / {ideal:.2f} = {soak_rate / ideal:.0%}",
            ),
        ]
        for label, value in rows:
            print(f"  {label:72} {value}")
        print("  faults served: " + ", ".join(f"{k}: {v:,}" for k, v in sorted(faults.items()) if k != "ok"))
        if soak["code"] not in (0, 1):
            print(f"  the run ended with exit code {soak['code']}; its log: {soak['log']}")
        if args.keep:
            args.keep.mkdir(parents=True, exist_ok=True)
            for name in ("soak", "clean"):
                if (workdir / name).exists():
                    shutil.move(str(workdir / name), str(args.keep / name))
            shutil.copy(soak["log"], args.keep / "soak.log")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
