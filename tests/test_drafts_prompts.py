"""Tests of drafts/prompts.py: what a prompts file may hold, every refusal naming the line, and
reading it lazily (a file of any length is never held in memory)."""

from __future__ import annotations

import json
import os

import pytest
from comfyui_flux_schnell.drafts import prompts as drafts_prompts
from comfyui_flux_schnell.drafts.prompts import (
    PromptLine,
    check_prompts_file,
    read_prompt_lines,
    read_prompts,
)
from comfyui_flux_schnell.errors import InvalidInputError
from comfyui_flux_schnell.generation import MAX_PROMPT_CHARS


def test_prompts_comments_blank_lines_and_a_byte_order_mark(tmp_path):
    path = tmp_path / "p.txt"
    path.write_bytes("\ufeff# drafts\r\n  a cat  \r\n\r\n#not this\ndog\n   # indented comment\nowl".encode())
    assert list(read_prompts(path)) == [(2, "a cat"), (5, "dog"), (7, "owl")]
    assert check_prompts_file(path).count == 3


def test_not_utf8_names_the_line(tmp_path):
    path = tmp_path / "p.txt"
    path.write_bytes("a cat\nun café\n".encode() + "une théière\n".encode("latin-1"))
    with pytest.raises(InvalidInputError, match=r"line 3: not UTF-8 text \(byte 7 of the line is 0xe9\)"):
        check_prompts_file(path)


@pytest.mark.parametrize(
    ("make", "kind"),
    [
        (lambda tmp: "/dev/zero", "a character device"),
        (lambda tmp: str(tmp), "a folder"),
        (lambda tmp: (os.mkfifo(tmp / "fifo"), tmp / "fifo")[1], "a named pipe"),
    ],
    ids=["dev_zero", "folder", "fifo"],
)
def test_files_that_are_no_text_files_are_refused_before_reading(tmp_path, make, kind):
    with pytest.raises(InvalidInputError, match=kind):
        check_prompts_file(make(tmp_path))


def test_too_large_a_file_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(drafts_prompts, "MAX_PROMPTS_FILE_BYTES", 1000)
    path = tmp_path / "p.txt"
    path.write_text("a prompt\n" * 200)
    with pytest.raises(InvalidInputError, match="split it into several files"):
        check_prompts_file(path)


def test_a_line_too_long_is_refused_without_reading_it_whole(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("ok\n" + "x" * (10 * drafts_prompts.MAX_LINE_BYTES))
    with pytest.raises(
        InvalidInputError, match=f"line 2: longer than {drafts_prompts.MAX_LINE_BYTES:,} bytes"
    ):
        check_prompts_file(path)


def test_a_prompt_the_check_refuses_names_its_line(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("short\n" + "y" * (MAX_PROMPT_CHARS + 1) + "\n")

    def check(entry):
        if len(entry.prompt) > MAX_PROMPT_CHARS:
            raise InvalidInputError("too long")

    with pytest.raises(InvalidInputError, match=r"p\.txt, line 2: too long"):
        check_prompts_file(path, check)


def test_no_prompts_at_all(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("# only comments\n\n")
    with pytest.raises(InvalidInputError, match="has no prompts"):
        check_prompts_file(path)


def test_a_100000_line_file_is_read_lazily(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("".join(f"prompt number {i}\n" for i in range(100_000)))
    lines = read_prompts(path)
    assert next(lines) == (1, "prompt number 0")
    frame = lines.gi_frame  # the generator's own file: only the first buffer has been read
    assert frame.f_locals["f"].tell() <= 64 * 1024 < path.stat().st_size
    assert sum(1 for _ in lines) == 99_999


# --- JSONL prompts files ----------------------------------------------------------------------------


def test_jsonl_lines_with_their_overrides(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(
        '{"prompt": " a fox "}\n\n# a comment\n'
        '{"prompt": "owl", "seed": 7, "width": 512, "height": 256, "num_inference_steps": 8}\n'
    )
    assert list(read_prompt_lines(path)) == [
        PromptLine(1, "a fox"),
        PromptLine(4, "owl", seed=7, width=512, height=256, steps=8),
    ]
    assert check_prompts_file(path).count == 2


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"prompt": "fox", "negative_prompt": "x"}', r"line 2: unknown field 'negative_prompt'"),
        ('{"seed": 3}', r"line 2: no 'prompt'"),
        ('{"prompt": 5}', r"line 2: 'prompt' is a int"),
        ('{"prompt": "fox", "seed": "3"}', r"line 2: 'seed' must be a whole number; got \"3\""),
        ('{"prompt": "fox", "width": 512.5}', r"line 2: 'width' must be a whole number"),
        ('{"prompt": "fox", "seed": true}', r"line 2: 'seed' must be a whole number; got true"),
        ('["fox"]', r"line 2: a JSON list, not an object"),
        ("fox", r"line 2: not a JSON object"),
    ],
)
def test_jsonl_refusals_name_the_line_and_the_field(tmp_path, line, message):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "ok"}\n' + line + "\n")
    with pytest.raises(InvalidInputError, match=message):
        check_prompts_file(path)


def test_a_text_file_is_not_read_as_json(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text('{"prompt": "fox"}\n')
    assert list(read_prompt_lines(path)) == [PromptLine(1, '{"prompt": "fox"}')]


def test_a_manifest_gives_its_done_lines_with_their_seeds(tmp_path):
    path = tmp_path / "manifest.jsonl"
    records = [
        {"line": 1, "prompt": "fox", "seed": 11, "status": "done", "backend": "local", "steps": 4},
        {"line": 2, "prompt": "owl", "seed": 12, "status": "failed", "backend": "local", "error": "x"},
        {"line": 3, "prompt": "fox", "seed": 11, "status": "duplicate", "duplicate_of": 1},
        {"line": 4, "prompt": "cat", "seed": 14, "status": "done", "backend": "api", "seed_sent": True},
        {"line": 5, "prompt": "elk", "seed": 15, "status": "done", "backend": "api", "seed_sent": False},
        {"line": 6, "prompt": "emu", "seed": 16, "status": "done", "backend": "api"},  # older manifests
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"line": 7, "prom')  # torn by a kill
    assert list(read_prompt_lines(path)) == [
        PromptLine(1, "fox", seed=11),  # steps and size come from the command line
        PromptLine(4, "cat", seed=14),
        PromptLine(5, "elk", seed_sent=False),
        PromptLine(6, "emu", seed_sent=False),
    ]
    found = check_prompts_file(path)
    assert (found.count, found.unsent_seeds) == (4, 2)
