"""Throughput of the API client against the service's own Python example, on a loopback fake.

A fake ImageAPI (tests/support/fake_imageapi.py) on 127.0.0.1 answers every generate call after an injected
delay (default 300 ms, about a hosted FLUX.1-schnell call) with one 1024x1024 PNG of photo-like
content (~2 MB), as JSON with base64 (OpenAI style `{"data": [{"b64_json": ...}]}`) or as JSON
with a URL the fake serves (`--shape url`). The fake runs in a process of its own (started with
multiprocessing's "spawn"), so that it does not hold this process's GIL while the client is
measured; on a small machine it still shares the CPU cores. Compared, each ending in a float32
tensor [1, H, W, 3]:

  (a) the service's documented Python example in a loop: `requests.post(url, headers=
      {"Authorization": f"Bearer {key}"}, json={...}, timeout=120)`, `.json()`, decode the image;
  (b) `ImageApiClient.generate_many` of the same requests at `--concurrency` (default 4), each
      result turned into a tensor in `on_result` as it arrives.

Also measured: the client's own overhead per image (wall time of sequential single `generate`
calls minus the injected delay), next to Pillow's decode of the same PNG alone. `--profile N`
adds a cProfile of the client's per-image work (the N costliest functions by own time), to find
what the client spends beyond the decode.

Run: python -m benchmarks.api_throughput [--images 16] [--concurrency 4] [--delay 0.3]
     [--shape b64|url] [--profile 25]
"""

from __future__ import annotations

import argparse
import base64
import cProfile
import io
import multiprocessing
import os
import pstats
import statistics
import threading
import time
from multiprocessing.connection import Connection

import numpy as np
import requests
import torch
from comfyui_flux_schnell.api.service import GENERATE_PATH, ImageApiClient
from comfyui_flux_schnell.api.settings import ApiSettings
from comfyui_flux_schnell.api.types import ApiImageRequest
from comfyui_flux_schnell.generation import FinishedImage
from PIL import Image

from tests.support.fake_imageapi import FakeImageAPI, Reply, photo_like_png

KEY = "sk_benchmark_not_a_real_key"
SIDE = 1024
SERVER_START_S = 60.0  # the spawned server imports this module (torch included) before it answers
SHAPE_TEXT = {
    "b64": 'JSON with base64: {"data": [{"b64_json": "<PNG>"}]}',
    "url": 'JSON with a URL: {"data": [{"url": ...}]}, then a GET of the PNG',
}


def to_tensor(image: Image.Image) -> torch.Tensor:
    """The IMAGE layout ComfyUI uses: float32 [1, H, W, 3] in 0..1."""
    array = np.array(image)  # (H, W, 3) uint8, writable (np.asarray of a PIL image is read-only)
    return torch.from_numpy(array).float().div_(255.0).unsqueeze(0)  # (1, H, W, 3)


def example_loop(base_url: str, requests_: list[ApiImageRequest], shape: str, tensor: bool = True) -> list:
    """The service's Python example, once per image, as a user would copy it."""
    tensors = []
    for req in requests_:
        response = requests.post(
            f"{base_url}{GENERATE_PATH}",
            headers={"Authorization": f"Bearer {KEY}"},
            json={
                "prompt": req.prompt,
                "model": "flux-schnell",
                "width": req.width,
                "height": req.height,
                "num_inference_steps": req.num_inference_steps,
            },
            timeout=120,
        )
        data = response.json()
        if shape == "b64":
            raw = base64.b64decode(data["data"][0]["b64_json"])
        else:
            raw = requests.get(data["data"][0]["url"], timeout=120).content
        image = Image.open(io.BytesIO(raw)).convert("RGB")
        tensors.append(to_tensor(image) if tensor else image)
    return tensors


def client_batch(
    client: ImageApiClient, requests_: list[ApiImageRequest], concurrency: int
) -> list[torch.Tensor]:
    tensors: list[torch.Tensor | None] = [None] * len(requests_)

    def on_result(index: int, result) -> None:
        if not isinstance(result, FinishedImage):
            raise result
        tensors[index] = to_tensor(result.image)

    client.generate_many(requests_, concurrency=concurrency, on_result=on_result)
    return tensors  # type: ignore[return-value]


def serve(png: bytes, shape: str, delay: float, conn: Connection) -> None:
    """The server process: answer every generate call with `png` until the parent says stop."""
    with FakeImageAPI() as fake:
        if shape == "b64":
            doc = {"created": 0, "data": [{"b64_json": base64.b64encode(png).decode()}]}
        else:
            doc = {"created": 0, "data": [{"url": fake.put_file(png, name="bench.png")}]}
        body = Reply.json(doc).body
        fake.set_default(lambda req, f: Reply(body=body, delay_s=delay))
        conn.send(fake.base_url)
        try:
            conn.recv()  # "stop"
        except EOFError:
            return  # the parent is gone without saying stop: nobody to report to
        conn.send(fake.generate_calls)


class ServerProcess:
    """The fake ImageAPI in a spawned process of its own; `.base_url` once started."""

    def __init__(self, png: bytes, shape: str, delay: float):
        ctx = multiprocessing.get_context("spawn")
        self._conn, child_conn = ctx.Pipe()
        self._process = ctx.Process(
            target=serve, args=(png, shape, delay, child_conn), name="fake-imageapi", daemon=True
        )
        self.base_url = ""
        self.generate_calls = 0

    def __enter__(self) -> ServerProcess:
        self._process.start()
        if not self._conn.poll(SERVER_START_S):
            self._process.terminate()
            raise RuntimeError(f"the fake ImageAPI process did not start in {SERVER_START_S:g} s")
        self.base_url = self._conn.recv()
        return self

    def __exit__(self, *exc_info) -> None:
        try:
            self._conn.send("stop")
            if self._conn.poll(10):
                self.generate_calls = self._conn.recv()
        finally:
            self._process.join(10)
            if self._process.is_alive():
                self._process.terminate()
                self._process.join()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--delay", type=float, default=0.3, help="server delay per call, seconds")
    parser.add_argument("--shape", choices=("b64", "url"), default="b64")
    parser.add_argument("--overhead-calls", type=int, default=10)
    parser.add_argument("--profile", type=int, default=0, metavar="N", help="print the N costliest functions")
    args = parser.parse_args(argv)

    png = photo_like_png(SIDE)
    profile = cProfile.Profile()
    with ServerProcess(png, args.shape, args.delay) as server:
        base_url = server.base_url
        reqs = [ApiImageRequest(f"benchmark prompt {i}", SIDE, SIDE, 4) for i in range(args.images)]
        settings = ApiSettings(base_url=base_url, api_key=KEY, key_source="benchmark")

        with ImageApiClient(settings) as client:
            client.generate(reqs[0])  # warm up: connection pool, PIL plugins, torch
            example_loop(base_url, reqs[:1], args.shape)

            started = time.perf_counter()
            a = example_loop(base_url, reqs, args.shape)
            time_a = time.perf_counter() - started

            started = time.perf_counter()
            b = client_batch(client, reqs, args.concurrency)
            time_b = time.perf_counter() - started
            assert len(a) == len(b) == args.images
            assert all(t.shape == (1, SIDE, SIDE, 3) and t.dtype == torch.float32 for t in a + b)
            assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))

            # Overhead: sequential single calls, wall time minus the injected delay; (a) and (b)
            # alternate so that both see the same load from other processes.
            over_a, over_b, decodes, tensors = [], [], [], []
            for req in reqs[: args.overhead_calls]:
                t0 = time.perf_counter()
                example_loop(base_url, [req], args.shape, tensor=False)
                over_a.append(time.perf_counter() - t0 - args.delay)
                t0 = time.perf_counter()
                image = client.generate(req).image
                over_b.append(time.perf_counter() - t0 - args.delay)
                t0 = time.perf_counter()
                Image.open(io.BytesIO(png)).load()
                decodes.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                to_tensor(image)
                tensors.append(time.perf_counter() - t0)

            # cProfile sees only the thread that enables it, and `generate` works in a pool
            # thread: profile the per-image work (`_attempts`) in this thread instead.
            for i, req in enumerate(reqs[: args.overhead_calls] if args.profile else []):
                profile.enable()
                client._attempts(req, i, threading.Event())
                profile.disable()
    expected_calls = 2 + 2 * args.images + 2 * args.overhead_calls
    expected_calls += args.overhead_calls if args.profile else 0
    assert server.generate_calls == expected_calls, (server.generate_calls, expected_calls)

    rate_a, rate_b = args.images / time_a, args.images / time_b

    def ms(xs: list[float]) -> str:
        return f"{1000 * statistics.median(xs):.1f} (min {1000 * min(xs):.1f})"

    rows = [
        ("how", "requests.post loop", f"generate_many, c={args.concurrency}"),
        ("wall time for all images, s", f"{time_a:.2f}", f"{time_b:.2f}"),
        ("images/s", f"{rate_a:.2f}", f"{rate_b:.2f}"),
        ("speed-up of (b) over (a)", "1.00x", f"{rate_b / rate_a:.2f}x"),
        ("overhead per image beyond the delay, ms", ms(over_a), ms(over_b)),
        ("  of which Pillow's PNG decode alone, ms", ms(decodes), ms(decodes)),
        ("tensor conversion (not in the overhead), ms", ms(tensors), ms(tensors)),
    ]
    print(f"fake ImageAPI on 127.0.0.1, server delay {args.delay * 1000:.0f} ms per call")
    print(f"answer shape: {SHAPE_TEXT[args.shape]}; PNG {SIDE}x{SIDE}, {len(png) / 1e6:.2f} MB")
    print(
        f"{args.images} images, each ending as a float32 tensor [1, {SIDE}, {SIDE}, 3]; "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end\n"
    )
    print(f"{'':44} {'(a) service example':>22} {'(b) ImageApiClient':>22}")
    for label, a_text, b_text in rows:
        print(f"{label:44} {a_text:>22} {b_text:>22}")
    print(
        f"\ntargets: speed-up >= 3.5x; client overhead < 30 ms per image. Overhead: median "
        f"(and min) of {args.overhead_calls} sequential single calls; the fake server runs in "
        "a process of its own (no shared GIL) on the same CPUs."
    )
    if args.profile:
        print(f"\ncProfile of {args.overhead_calls} calls of the client's per-image work:")
        pstats.Stats(profile).sort_stats("tottime").print_stats(args.profile)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
