"""The GPU check's CPU rehearsal (issue 17, item 1): both parts of `benchmarks/gpu_check.sh` run
on the CPU with tiny models, print their tables, pass, and leave no temporary folder behind."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from support import REPO


def _rehearse(part: str, tmp_path: Path) -> subprocess.CompletedProcess:
    temp = tmp_path / "tmp"
    temp.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "FLUX_SCHNELL_GPU_CHECK_TINY": "1", "PYTHON": sys.executable}
    env |= {"TMPDIR": str(temp), "OUT": str(out)}
    done = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_check.sh"), part],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert not list(temp.iterdir()), "the trap left temporary files"
    assert list(out.iterdir()), "no log was written to $OUT"
    return done


@pytest.mark.slow
def test_part_1_rehearsal_prints_every_table(tmp_path):
    text = _rehearse("1", tmp_path).stdout
    assert "| diffusers FluxPipeline |" in text or "skipped: no diffusers" in text
    for step in ("environment", "attention_probe", "headline", "gpu_tests", "gpu_paths"):
        assert f"=== {step}: exit 0" in text
    assert "every step passed" in text


@pytest.mark.slow
def test_part_2_rehearsal_compiles_per_block_and_whole(tmp_path):
    text = _rehearse("2", tmp_path).stdout
    assert "| per-block compile | " in text
    assert "| whole-model compile | " in text
    assert "every step passed" in text
