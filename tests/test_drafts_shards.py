"""Shards (--shard K/N): N processes share one prompts file and one folder, each line made once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

import pytest
from comfyui_flux_schnell.cli import main
from comfyui_flux_schnell.drafts.manifest import ManifestWriter, RecordStatus, read_manifest
from comfyui_flux_schnell.drafts.run import RunSettings
from comfyui_flux_schnell.generation import GenerationRequest
from support import TEST_KEY

LINES = [f"shard prompt {i}" for i in range(1, 11)] + ["shard prompt 1"]  # line 11 repeats line 1


def start_shard(prompts, out_dir, shard):
    argv = [sys.executable, "-m", "comfyui_flux_schnell", "generate", "--prompts-file", str(prompts)]
    argv += ["--out-dir", str(out_dir), "--width", "256", "--height", "256", "--seed", "5"]
    argv += ["--concurrency", "2", "--shard", shard]
    return subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ)
    )


def finish(process):
    out, err = process.communicate(timeout=120)
    assert TEST_KEY not in out + err
    assert process.returncode == 0, err
    return err


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(LINES) + "\n", encoding="utf-8")
    return path


def test_three_shards_into_one_folder_make_every_line_once(fake_api, prompts, tmp_path):
    fake_api.delay_s = 0.2  # the three overlap
    out_dir = tmp_path / "drafts"
    runs = [start_shard(prompts, out_dir, f"{k}/3") for k in (1, 2, 3)]
    for run in runs:
        finish(run)
    assert fake_api.generate_calls == 10  # ten distinct prompts; line 11 (shard 2) repeats line 1 (shard 1)
    assert sorted(r.prompt for r in fake_api.requests_to("/api/v1/generate")) == sorted(set(LINES))
    records = list(read_manifest(out_dir / "manifest.jsonl"))
    raw_lines = [x for x in (out_dir / "manifest.jsonl").read_text(encoding="utf-8").splitlines() if x]
    assert len(raw_lines) == len(records) == 11  # whole lines, none torn or interleaved
    assert Counter(r["line"] for r in records) == Counter(range(1, 12))  # every line recorded once
    assert {r["line"]: r["status"] for r in records}[11] == RecordStatus.DUPLICATE
    assert sum(r["status"] == RecordStatus.DONE for r in records) == 10
    assert len(list(out_dir.glob("*.png"))) == 10
    assert not list(out_dir.glob(".lock*"))  # each shard released its own lock
    page = (out_dir / "index.html").read_text(encoding="utf-8")
    assert all(f"shard prompt {i}" in page for i in range(1, 11))  # the gallery sees every shard's images


def test_a_shard_resumes_its_own_lines_only(fake_api, prompts, tmp_path):
    out_dir = tmp_path / "drafts"
    err = finish(start_shard(prompts, out_dir, "2/3"))
    shard_two = [line for line in range(1, 12) if line % 3 == 2]  # 2, 5, 8, 11
    records = list(read_manifest(out_dir / "manifest.jsonl"))
    assert sorted(r["line"] for r in records) == shard_two
    assert {r["line"]: r["status"] for r in records}[
        11
    ] == RecordStatus.DUPLICATE  # of line 1, shard 1's: not paid here
    assert fake_api.generate_calls == 3
    assert "shard 2/3: 4 of the 11 prompts" in err
    finish(start_shard(prompts, out_dir, "2/3"))  # again: nothing to pay
    assert fake_api.generate_calls == 3
    for k in ("1/3", "3/3"):
        finish(start_shard(prompts, out_dir, k))
    assert fake_api.generate_calls == 10


def test_a_run_of_the_whole_folder_refuses_while_a_shard_runs(fake_api, prompts, tmp_path):
    fake_api.delay_s = 0.3
    out_dir = tmp_path / "drafts"
    shard = start_shard(prompts, out_dir, "1/2")
    while fake_api.generate_calls == 0:
        assert shard.poll() is None
    code = main(["generate", "--prompts-file", str(prompts), "--out-dir", str(out_dir), "--width", "256"])
    assert code == 2
    finish(shard)


def test_in_shard_takes_line_number_modulo_n():
    settings = RunSettings("api", GenerationRequest("", 256, 256, 4, 1, 1), None, 1, shard=(3, 3))
    assert [line for line in range(1, 10) if settings.in_shard(line)] == [3, 6, 9]
    whole = RunSettings("api", GenerationRequest("", 256, 256, 4, 1, 1), None, 1)
    assert all(whole.in_shard(line) for line in range(1, 5))


@pytest.mark.parametrize("value", ["0/3", "4/3", "x", "2", "1/0", "a/b"])
def test_a_bad_shard_is_refused_naming_the_flag(value, prompts, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["generate", "--prompts-file", str(prompts), "--out-dir", str(tmp_path / "d"), "--shard", value])
    assert stop.value.code == 2
    assert "--shard" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_shard_needs_a_prompts_file(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--prompt", "p", "--out", str(tmp_path / "a.png"), "--shard", "1/2"])
    assert "--shard goes with --prompts-file" in capsys.readouterr().err


_APPENDER = """
import sys
from comfyui_flux_schnell.drafts.manifest import ManifestWriter, RecordStatus
with ManifestWriter(sys.argv[1]) as writer:
    for i in range(150):
        writer.append({"line": i, "status": "done", "prompt": sys.argv[2] * 30000})
"""


def test_records_appended_by_several_processes_never_interleave(tmp_path):
    path = tmp_path / "manifest.jsonl"
    ManifestWriter(path).close()
    writers = [
        subprocess.Popen([sys.executable, "-c", _APPENDER, str(path), letter], env=dict(os.environ))
        for letter in "abc"
    ]
    for writer in writers:
        assert writer.wait(timeout=120) == 0
    lines = [raw for raw in path.read_bytes().splitlines() if raw]  # a blank line is harmless
    assert len(lines) == 450
    for raw in lines:  # each record whole: 30,000 characters of one writer's letter
        record = json.loads(raw)
        assert len(set(record["prompt"])) == 1
