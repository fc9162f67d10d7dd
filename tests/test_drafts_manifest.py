"""Tests of drafts/manifest.py: appended records, a torn last line ignored and kept apart."""

from __future__ import annotations

import json

from comfyui_flux_schnell.drafts.manifest import ManifestWriter, latest_by_file, read_manifest


def test_records_are_appended_and_read_back(tmp_path):
    path = tmp_path / "manifest.jsonl"
    with ManifestWriter(path) as writer:
        writer.append({"line": 1, "status": "done", "file": "a.png", "prompt": "ä"})
        assert path.read_text(encoding="utf-8").count("\n") == 1  # flushed at once
        writer.append({"line": 2, "status": "failed", "file": "b.png", "error": "HTTP 400"})
    records = list(read_manifest(path))
    assert [r["line"] for r in records] == [1, 2]
    assert records[0]["prompt"] == "ä"
    assert all(isinstance(r["time"], float) for r in records)


def test_a_torn_last_line_is_ignored_and_the_next_run_starts_a_new_line(tmp_path):
    path = tmp_path / "manifest.jsonl"
    good = json.dumps({"line": 1, "status": "done", "file": "a.png"})
    path.write_text(good + "\n" + '{"line": 2, "status": "do')  # a kill -9 mid-write
    assert [r["line"] for r in read_manifest(path)] == [1]
    with ManifestWriter(path) as writer:
        writer.append({"line": 2, "status": "done", "file": "b.png"})
    assert [r["line"] for r in read_manifest(path)] == [1, 2]


def test_garbage_lines_are_skipped(tmp_path):
    path = tmp_path / "manifest.jsonl"
    path.write_bytes(b'\xff\xfe\n[1, 2]\n{"no": "status"}\n{"status": "done", "file": "x.png"}\n')
    assert list(read_manifest(path)) == [{"status": "done", "file": "x.png"}]
    assert list(read_manifest(tmp_path / "missing.jsonl")) == []


def test_the_last_record_of_a_file_holds(tmp_path):
    path = tmp_path / "manifest.jsonl"
    with ManifestWriter(path) as writer:
        writer.append({"line": 3, "status": "failed", "file": "a.png", "error": "HTTP 503"})
        writer.append({"line": 4, "status": "duplicate", "file": "a.png", "duplicate_of": 3})
        writer.append({"line": 3, "status": "done", "file": "a.png"})  # the re-run
    latest = latest_by_file(path)
    assert latest["a.png"]["status"] == "done"
