"""Tests of benchmarks/gpu_paths.py, the device-path check `benchmarks/gpu_check.sh` runs on a GPU.

No GPU has run it yet, so its CPU rehearsal runs here on tiny models: every case it lists must pass
through `generate_local` on the files it writes (random weights in the real layouts, GGUF Q4_K
files, a LoRA), and its table must name each case.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from support import REPO

REHEARSAL = ("--config", "tiny", "--device", "cpu", "--no-compile")


@pytest.mark.slow
def test_the_cpu_rehearsal_runs_every_case(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_paths", *REHEARSAL, "--folder", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    table = done.stdout[done.stdout.index("Local backend device paths") :]
    rows = table.splitlines()[2:-1]
    cases = [
        "as stored (bf16), auto",
        "as stored, keep on GPU",
        "as stored, offload to CPU",
        "as stored, free after run",
        "fp8_e4m3fn, offload to CPU",
        "LoRA r16 on bf16, auto",
        "GGUF Q4_K, offload to CPU",
        "LoRA r16 on GGUF Q4_K, auto",
    ]
    for case in cases:
        (row,) = [r for r in rows if r.startswith(case)]
        assert row.split()[len(case.split())] == "ok", row
    assert any(r.startswith("out of memory") and "skipped" in r for r in rows)
    assert {p.name for p in tmp_path.iterdir()} >= {
        "transformer-Q4_K.gguf",
        "t5-Q4_K.gguf",
        "lora_r16.safetensors",
    }
