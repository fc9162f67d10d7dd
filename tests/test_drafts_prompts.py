"""Tests of drafts/prompts.py: what a prompts file may hold, every refusal naming the line, and
reading it lazily (a file of any length is never held in memory)."""

from __future__ import annotations

import os

import pytest
from comfyui_flux_schnell.drafts import prompts as drafts_prompts
from comfyui_flux_schnell.drafts.prompts import check_prompts_file, read_prompts
from comfyui_flux_schnell.errors import InvalidInputError
from comfyui_flux_schnell.generation import MAX_PROMPT_CHARS


def test_prompts_comments_blank_lines_and_a_byte_order_mark(tmp_path):
    path = tmp_path / "p.txt"
    path.write_bytes("\ufeff# drafts\r\n  a cat  \r\n\r\n#not this\ndog\n   # indented comment\nowl".encode())
    assert list(read_prompts(path)) == [(2, "a cat"), (5, "dog"), (7, "owl")]
    assert check_prompts_file(path) == 3


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

    def check(line, prompt):
        if len(prompt) > MAX_PROMPT_CHARS:
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
