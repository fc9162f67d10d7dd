"""Inputs the command line refuses before anything is paid for (issue 15, items 6, 7, 8 and 13)."""

from __future__ import annotations

import os
import threading

import pytest
from comfyui_flux_schnell.cli import main
from comfyui_flux_schnell.errors import InvalidInputError
from comfyui_flux_schnell.generation import GenerationRequest, visible_text
from support.fake_imageapi import Reply, request_image

INVISIBLE = ["\ufeff", "\u200b", "\u2800", " \u200b\ufeff\u2060 ", "\u3164", "\u00a0\u2003"]


@pytest.mark.parametrize("prompt", INVISIBLE)
def test_a_prompt_of_invisible_characters_is_empty(prompt):
    assert not visible_text(prompt)
    with pytest.raises(InvalidInputError, match="prompt is empty"):
        GenerationRequest(prompt, 256, 256, 4, 1).validate("api")


@pytest.mark.parametrize("prompt", ["a", "\u200bfox", "狐", "🦊", "\u2800x"])
def test_a_prompt_with_one_visible_character_passes(prompt):
    assert visible_text(prompt)
    GenerationRequest(prompt, 256, 256, 4, 1).validate("api")


@pytest.mark.parametrize("prompt", ["\u200b", "\u2800"])
def test_an_invisible_prompt_on_the_command_line_is_not_paid_for(fake_api, tmp_path, capsys, prompt):
    out = tmp_path / "x.png"
    assert main(["generate", "--prompt", prompt, "--out", str(out)]) == 2
    assert "prompt is empty" in capsys.readouterr().err
    assert fake_api.generate_calls == 0
    assert not out.exists()


def test_a_prompts_file_line_of_only_a_zero_width_space_is_refused_naming_the_line(
    fake_api, tmp_path, capsys
):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a fox\n\u200b\nan owl\n", encoding="utf-8")
    assert main(["generate", "--prompts-file", str(prompts), "--out-dir", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert "line 2" in err
    assert "prompt is empty" in err
    assert fake_api.generate_calls == 0
    assert not (tmp_path / "d").exists()


def test_a_prompt_that_is_not_utf8_in_argv_is_refused_before_it_is_paid_for(fake_api, tmp_path, capsys):
    typed = os.fsdecode(b"caf\xe9 \xff\xfe")  # Latin-1 bytes, as Python decodes argv (surrogateescape)
    out = tmp_path / "x.png"
    assert main(["generate", "--prompt", typed, "--out", str(out)]) == 2
    assert "not valid UTF-8" in capsys.readouterr().err
    assert fake_api.generate_calls == 0
    assert not out.exists()


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--checkpoint", "flux.safetensors"], "--checkpoint"),
        (["--transformer", "t.safetensors"], "--transformer"),
        (["--t5", "t5.safetensors"], "--t5"),
        (["--clip", "clip.safetensors"], "--clip"),
        (["--ae", "ae.safetensors"], "--ae"),
        (["--t5-tokenizer", "tok"], "--t5-tokenizer"),
        (["--clip-tokenizer", "tok"], "--clip-tokenizer"),
        (["--device", "cpu"], "--device"),
        (["--dtype", "bf16"], "--dtype"),
        (["--compile"], "--compile"),
        (["--device", "cpu", "--compile"], "--device --compile"),
    ],
)
def test_local_only_flags_on_the_api_backend_exit_2_naming_them(fake_api, tmp_path, capsys, flags, named):
    out = tmp_path / "x.png"
    with pytest.raises(SystemExit) as info:
        main(["generate", "--prompt", "a fox", "--out", str(out), *flags])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"{named} appl" in err
    assert "--backend local" in err
    assert fake_api.generate_calls == 0
    assert not out.exists()


def test_lines_appended_to_the_prompts_file_during_the_run_are_not_sent(fake_api, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("one\ntwo\nthree\n", encoding="utf-8")
    appended = threading.Event()

    def answer(req, fake):
        if not appended.is_set():  # the run has checked the file and is paying: a line is added
            with open(prompts, "a", encoding="utf-8") as f:
                f.write("x" * 3000 + "\nfour\n")
            appended.set()
        return Reply.image(request_image(req))

    fake_api.set_default(answer)
    code = main(
        ["generate", "--prompts-file", str(prompts), "--out-dir", str(tmp_path / "d"), "--concurrency", "1"]
    )
    assert appended.is_set()
    assert code == 0
    assert sorted(r.prompt for r in fake_api.requests) == ["one", "three", "two"]
    assert "not run: -" not in capsys.readouterr().err
