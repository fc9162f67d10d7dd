"""`flux-schnell report DIR [--csv FILE]` against a hand-made manifest (issue 15, build 6)."""

from __future__ import annotations

import csv
import json

from comfyui_flux_schnell.cli import main

RECORDS = [
    # line 1: delivered at the first call
    {
        "line": 1,
        "prompt": "fox",
        "status": "done",
        "file": "fox.png",
        "paid_calls": 1,
        "free_retries": 0,
        "request_ids": ["r1"],
        "time": 1800000000.0,
    },
    # line 2: two calls that may have been billed, no image (a 500, then a lost answer)
    {
        "line": 2,
        "prompt": "owl",
        "status": "failed",
        "file": "owl.png",
        "paid_calls": 2,
        "free_retries": 3,
        "request_ids": ["r2a", "r2b"],
        "time": 1800000001.0,
    },
    # line 3 repeats line 1
    {"line": 3, "prompt": "fox", "status": "duplicate", "file": "fox.png", "duplicate_of": 1},
    # line 2 again, in a resumed run: a billed failure, then the image at the second call
    {
        "line": 2,
        "prompt": "owl",
        "status": "done",
        "file": "owl.png",
        "paid_calls": 2,
        "free_retries": 0,
        "request_ids": ["r2c", "r2d"],
        "time": 1800000100.0,
    },
    # a refused request (not billed)
    {"line": 4, "prompt": "x", "status": "failed", "file": "x.png", "paid_calls": 0, "free_retries": 0},
    # an older record without billing fields
    {"line": 5, "prompt": "elk", "status": "done", "file": "elk.png"},
]


def _folder(tmp_path):
    folder = tmp_path / "drafts"
    folder.mkdir()
    with (folder / "manifest.jsonl").open("w") as f:
        for record in RECORDS:
            f.write(json.dumps(record) + "\n")
        f.write('{"line": 9, "status": "do')  # a torn last line is skipped
    return folder


def test_the_report_adds_up_every_run_of_the_folder(tmp_path, capsys):
    assert main(["report", str(_folder(tmp_path))]) == 0
    out = capsys.readouterr().out
    assert "images delivered:                    3" in out
    assert "calls that may have been billed:     5" in out
    assert "  of those, without an image:        3" in out
    for request_id in ("r2a", "r2b", "r2c"):
        assert request_id in out
    assert "r1" not in out.split("of those")[1].split("free retries")[0]
    assert "free retries (not billed):           3" in out
    assert "duplicates (requested once):         1" in out
    assert "failures:                            2" in out
    assert "records without a billing record:    1" in out


def test_the_csv_has_one_row_per_call_that_may_have_been_billed(tmp_path, capsys):
    target = tmp_path / "claim.csv"
    assert main(["report", str(_folder(tmp_path)), "--csv", str(target)]) == 0
    rows = list(csv.DictReader(target.open(encoding="utf-8")))
    assert [r["request_id"] for r in rows] == ["r1", "r2a", "r2b", "r2c", "r2d"]
    assert [r["delivered_an_image"] for r in rows] == ["yes", "no", "no", "no", "yes"]
    assert rows[1]["time"] == "2027-01-15T08:00:01Z"
    assert f"wrote {target}" in capsys.readouterr().out


def test_a_folder_without_a_manifest_is_refused_naming_it(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "has no manifest.jsonl" in capsys.readouterr().err


def test_a_job_collected_by_a_rerun_counts_one_paid_call_that_delivered(tmp_path, capsys):
    url = "https://imageapi.example/jobs/j1"
    records = [
        # the job passed deadline_s: paid, failed, its poll URL kept
        {"line": 1, "prompt": "fox", "status": "failed", "file": "fox.png", "paid_calls": 1,
         "free_retries": 0, "request_ids": ["r1"], "poll_url": url, "time": 1800000000.0},
        # a re-run found it still running: nothing paid
        {"line": 1, "prompt": "fox", "status": "failed", "file": "fox.png", "paid_calls": 0,
         "free_retries": 0, "poll_url": url, "time": 1800000100.0},
        # the next re-run collected it
        {"line": 1, "prompt": "fox", "status": "done", "file": "fox.png", "paid_calls": 0,
         "free_retries": 0, "request_ids": ["j1"], "collected_from": url, "time": 1800000200.0},
        # another job, never collected: its paid call has no image
        {"line": 2, "prompt": "owl", "status": "failed", "file": "owl.png", "paid_calls": 1,
         "free_retries": 0, "request_ids": ["r2"], "poll_url": url + "-other", "time": 1800000001.0},
    ]  # fmt: skip
    folder = tmp_path / "drafts"
    folder.mkdir()
    (folder / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    rows_csv = tmp_path / "calls.csv"
    assert main(["report", str(folder), "--csv", str(rows_csv)]) == 0
    out = capsys.readouterr().out
    assert "images delivered:                    1" in out
    assert "of those, collected by a re-run:   1" in out
    assert "calls that may have been billed:     2" in out
    assert "of those, without an image:        1" in out
    assert "failures:                            1" in out  # owl only: the fox was delivered
    rows = list(csv.DictReader(rows_csv.open()))
    assert [(r["request_id"], r["delivered_an_image"]) for r in rows] == [("r1", "yes"), ("r2", "no")]
