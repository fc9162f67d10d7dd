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


# --- the spend guard and the dry run (issue 15, build 5) ------------------------------------------


def _prompts(tmp_path, text="fox\nowl\nfox\ncat\n"):
    prompts = tmp_path / "p.txt"
    prompts.write_text(text, encoding="utf-8")
    return prompts


def test_a_dry_run_prints_the_plan_and_sends_nothing(fake_api, tmp_path, capsys):
    config = tmp_path / "flux_schnell_config.json"
    config.write_text('{"price_per_image": 0.003}')
    config.chmod(0o600)
    out_dir = tmp_path / "d"
    args = ["generate", "--prompts-file", str(_prompts(tmp_path)), "--out-dir", str(out_dir)]
    assert main([*args, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "images planned:      4" in out
    assert "repeats (sent once): 1" in out
    assert "already done:        0" in out
    assert "to request:          3" in out
    assert "estimated cost:      0.009" in out
    assert fake_api.generate_calls == 0
    assert not out_dir.exists()
    # After a run, the same dry run finds the images done.
    assert main(args) == 0
    paid = fake_api.generate_calls
    capsys.readouterr()
    assert main([*args, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "already done:        3" in out
    assert "to request:          0" in out
    assert fake_api.generate_calls == paid


def test_max_images_refuses_a_larger_plan_before_any_request(fake_api, tmp_path, capsys):
    out_dir = tmp_path / "d"
    args = ["generate", "--prompts-file", str(_prompts(tmp_path)), "--out-dir", str(out_dir)]
    assert main([*args, "--max-images", "2"]) == 2
    err = capsys.readouterr().err
    assert "would send 3 paid request(s)" in err
    assert "--max-images" in err
    assert fake_api.generate_calls == 0
    assert not out_dir.exists()
    assert main([*args, "--max-images", "3"]) == 0  # repeats are not counted: 3 requests fit
    assert fake_api.generate_calls == 3


def test_max_images_per_run_in_the_config_guards_too(fake_api, tmp_path, capsys):
    config = tmp_path / "flux_schnell_config.json"
    config.write_text('{"max_images_per_run": 1}')
    config.chmod(0o600)
    args = ["generate", "--prompts-file", str(_prompts(tmp_path)), "--out-dir", str(tmp_path / "d")]
    assert main(args) == 2
    assert "max_images_per_run in the config file allows (1)" in capsys.readouterr().err
    assert fake_api.generate_calls == 0


@pytest.mark.parametrize(
    ("text", "field"),
    [('{"max_images_per_run": 0}', "max_images_per_run"), ('{"price_per_image": -1}', "price_per_image")],
)
def test_bad_spend_fields_in_the_config_are_named(fake_api, tmp_path, capsys, text, field):
    config = tmp_path / "flux_schnell_config.json"
    config.write_text(text)
    config.chmod(0o600)
    assert main(["generate", "--prompt", "a fox", "--out", str(tmp_path / "x.png")]) == 2
    assert field in capsys.readouterr().err
    assert fake_api.generate_calls == 0


# --- the command line a newcomer meets (issue 14, item 5) ------------------------------------------


@pytest.mark.parametrize(
    ("argv", "named", "usage_of"),
    [
        (["generate", "--promt", "a fox", "--out", "x.png"], "--promt; did you mean --prompt?", "generate"),
        (["generate", "--prompt", "a fox", "--widht", "512"], "--widht; did you mean --width?", "generate"),
        (["generate", "--prompt=a fox", "--out-dri", "d"], "--out-dri; did you mean --out-dir?", "generate"),
        (["gallery", "d", "--verbsoe"], "--verbsoe; did you mean --verbose?", "gallery"),
        (["--verbsoe", "config"], "--verbsoe; did you mean --verbose?", "config"),
        (["generate", "--prompt", "a fox", "--zzzzzz"], "unrecognized argument --zzzzzz\n", "generate"),
    ],
)
def test_an_unknown_flag_is_named_with_the_closest_match_and_a_short_usage(capsys, argv, named, usage_of):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert named in err
    assert f"flux-schnell {usage_of}: error:" in err
    assert len(err.splitlines()) == 2  # not the 17-line usage
    assert "is required" not in err


def test_an_abbreviated_flag_is_still_argparses_to_resolve(fake_api, tmp_path):
    out = tmp_path / "x.png"
    assert main(["generate", "--prompt", "a fox", "--out", str(out), "--widt", "512"]) == 0
    assert out.exists()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--steps", "9"], "--steps must be between 1 and 8"),
        (["--batch-size", "17"], "--batch-size must be between 1 and 16"),
        (["--width", "100"], "--width must be between 256 and 2048"),
        (["--height", "1000"], "--height must be a multiple of 16"),
    ],
)
def test_errors_name_the_flag_typed_not_the_services_field(fake_api, tmp_path, capsys, flags, message):
    assert main(["generate", "--prompt", "a fox", "--out", str(tmp_path / "x.png"), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "num_inference_steps" not in err
    assert "batch_size" not in err
    assert fake_api.generate_calls == 0


def test_a_jsonl_lines_own_field_keeps_its_name(fake_api, tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "owl", "num_inference_steps": 9}\n')
    assert main(["generate", "--prompts-file", str(prompts), "--out-dir", str(tmp_path / "d")]) == 2
    assert "line 1: num_inference_steps must be between 1 and 8" in capsys.readouterr().err


# --- the seed rule (issue 15, item 14): never record a seed that was not sent ----------------------


def test_without_send_seed_no_file_manifest_or_gallery_claims_a_seed(fake_api, tmp_path, caplog):
    import json

    from PIL import Image

    out = tmp_path / "fox.png"
    assert main(["generate", "--prompt", "fox", "--out", str(out), "--batch-size", "3", "--seed", "5"]) == 0
    assert all("seed" not in r.json for r in fake_api.requests)
    for i in (1, 2, 3):  # three identical requests: no file claims S, S+1, S+2
        with Image.open(tmp_path / f"fox-{i}.png") as image:
            assert "seed" not in image.text
    assert "the service chooses each image's seed" in caplog.text
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\nan owl\n")
    drafts = tmp_path / "d"
    assert main(["generate", "--prompts-file", str(prompts), "--out-dir", str(drafts), "--seed", "9"]) == 0
    records = [json.loads(line) for line in (drafts / "manifest.jsonl").open()]
    assert records
    assert all("seed" not in r and r["seed_sent"] is False for r in records)
    assert "seed" not in (drafts / "index.html").read_text()


def test_with_send_seed_the_seed_sent_is_the_seed_recorded(fake_api, send_seed, tmp_path):
    from PIL import Image

    out = tmp_path / "fox.png"
    assert main(["generate", "--prompt", "fox", "--out", str(out), "--seed", "5"]) == 0
    assert fake_api.requests[0].json["seed"] == 5
    with Image.open(out) as image:
        assert image.text["seed"] == "5"


# --- the manifest stays a plain file of the folder (issue 15, item 24) -----------------------------


def test_a_manifest_symlinked_out_of_the_folder_is_refused_before_anything_is_paid(
    fake_api, tmp_path, capsys
):
    outside = tmp_path / "elsewhere.txt"
    outside.write_text("keep me\n")
    drafts = tmp_path / "d"
    drafts.mkdir()
    (drafts / "manifest.jsonl").symlink_to(outside)
    prompts = tmp_path / "p.txt"
    prompts.write_text("fox\n")
    assert main(["generate", "--prompts-file", str(prompts), "--out-dir", str(drafts)]) == 2
    assert "is a symbolic link" in capsys.readouterr().err
    assert fake_api.generate_calls == 0
    assert outside.read_text() == "keep me\n"


def test_a_manifest_that_is_a_folder_is_refused_not_a_traceback(fake_api, tmp_path, capsys):
    drafts = tmp_path / "d"
    (drafts / "manifest.jsonl").mkdir(parents=True)
    prompts = tmp_path / "p.txt"
    prompts.write_text("fox\n")
    assert main(["generate", "--prompts-file", str(prompts), "--out-dir", str(drafts)]) == 2
    assert "is not a file" in capsys.readouterr().err
    assert fake_api.generate_calls == 0


def test_the_manifest_writer_never_follows_a_symlink(tmp_path):
    from comfyui_flux_schnell.drafts.manifest import ManifestWriter

    outside = tmp_path / "elsewhere.txt"
    outside.write_text("")
    (tmp_path / "manifest.jsonl").symlink_to(outside)
    with pytest.raises(OSError, match="symbolic link"), ManifestWriter(tmp_path / "manifest.jsonl") as writer:
        writer.append({"status": "done"})
    assert outside.read_text() == ""


# --- one exit code per class of failure, the same in the code, --help and the README (issue 14) -----


def test_each_commands_help_lists_its_own_exit_codes_and_the_readme_the_same_meanings(capsys):
    import re

    from comfyui_flux_schnell.drafts.command import COMMAND_EXIT_CODES, EXIT_MEANINGS
    from support import REPO

    for command, codes in COMMAND_EXIT_CODES.items():
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = capsys.readouterr().out
        listed = re.findall(r"^  (\d+) +(.+)$", text.split("exit codes:")[1], flags=re.M)
        assert [int(code) for code, _ in listed] == list(codes), command
        for code, meaning in listed:
            assert " ".join(meaning.split()) in " ".join(EXIT_MEANINGS[int(code)].split())
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    table = dict(re.findall(r"^\| (\d+) \| (.+) \|$", readme, flags=re.M))
    assert {int(code): meaning for code, meaning in table.items()} == EXIT_MEANINGS


def test_a_refused_key_and_no_credits_exit_3_and_say_it_once(fake_api, tmp_path, capsys):
    from support.fake_imageapi import error_reply

    prompts = tmp_path / "p.txt"
    prompts.write_text("a\nb\nc\n")
    for status in (401, 402):
        fake_api.set_default(lambda req, fake, status=status: error_reply(status, "nope"))
        out_dir = tmp_path / f"d{status}"
        assert main(["generate", "--prompts-file", str(prompts), "--out-dir", str(out_dir)]) == 3
        err = capsys.readouterr().err
        assert err.count("nope") == 1, err


# --- the billing record of each manifest line (issue 15, item 15 and build 6) -----------------------


def test_each_manifest_line_records_its_paid_calls_free_retries_and_request_ids(fake_api, tmp_path):
    import json

    from support.fake_imageapi import error_reply

    prompts = tmp_path / "p.txt"
    prompts.write_text("fox\nrefused\n")

    def answer(req, fake):
        if req.prompt == "refused":
            return error_reply(400, "moderation")
        return Reply.image(request_image(req))

    fake_api.set_default(answer)
    out = tmp_path / "d"
    assert main(["generate", "--prompts-file", str(prompts), "--out-dir", str(out)]) == 1
    records = {r["prompt"]: r for r in map(json.loads, (out / "manifest.jsonl").open())}
    done, failed = records["fox"], records["refused"]
    assert done["status"] == "done"
    assert done["paid_calls"] == 1  # the call that delivered was paid
    assert done["free_retries"] == 0
    assert done.get("request_ids", [done.get("request_id")]) == [done.get("request_id")]
    assert "billed_attempts" not in done
    assert failed["status"] == "failed"
    assert failed["paid_calls"] == 0  # refused before any work: recorded as not billed
    assert failed["request_ids"] == ["req-err-1"]


def test_an_unreachable_service_stops_the_run_within_seconds_naming_the_base_url(
    tmp_path, monkeypatch, capsys
):
    import socket
    import time

    from support import TEST_KEY

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("IMAGEAPI_BASE_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("IMAGEAPI_API_KEY", TEST_KEY)
    monkeypatch.setenv("IMAGEAPI_CONFIG", str(tmp_path / "none.json"))
    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(f"line {i}\n" for i in range(57)))
    started = time.monotonic()
    code = main(["generate", "--prompts-file", str(prompts), "--out-dir", str(tmp_path / "d")])
    assert code == 1
    assert time.monotonic() - started < 30
    err = capsys.readouterr().err
    assert f"127.0.0.1:{port}" in err
    assert "IMAGEAPI_BASE_URL" in err
    assert err.count("retry") < 20  # not a warning per image


def test_an_image_of_another_size_than_asked_is_said_and_recorded_not_silent(fake_api, tmp_path, capsys):
    import json

    from PIL import Image
    from support.fake_imageapi import solid_image

    fake_api.set_default(lambda req, fake: Reply.image(solid_image(512, 512, (1, 2, 3))))
    prompts = tmp_path / "p.txt"
    prompts.write_text("fox\n")
    out = tmp_path / "d"
    args = ["generate", "--prompts-file", str(prompts), "--out-dir", str(out), "--width", "256"]
    assert main([*args, "--height", "256"]) == 0
    assert "the service sent 512x512, not the 256x256 asked for" in capsys.readouterr().err
    (record,) = [json.loads(line) for line in (out / "manifest.jsonl").open()]
    assert record["size_sent"] == [512, 512]
    with Image.open(out / record["file"]) as image:
        assert image.size == (512, 512)  # kept as sent: it was paid for


def test_an_out_batch_re_run_requests_only_the_missing_images_and_overwrites_none(fake_api, tmp_path):
    from support.fake_imageapi import error_reply

    out = tmp_path / "fox.png"
    calls = []

    def second_fails(req, fake):
        calls.append(req)
        if len(calls) == 2:
            return error_reply(400, "refused once")
        return Reply.image(request_image(req))

    fake_api.set_default(second_fails)
    args = ["generate", "--prompt", "fox", "--out", str(out), "--batch-size", "3", "--concurrency", "1"]
    assert main(args) == 1
    written = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("fox-*.png")}
    assert len(written) == 2
    fake_api.set_default(lambda req, fake: Reply.image(request_image(req)))
    before = fake_api.generate_calls
    assert main(args) == 0
    assert fake_api.generate_calls - before == 1  # only the missing image
    for name, stamp in written.items():
        assert (tmp_path / name).stat().st_mtime_ns == stamp  # not overwritten
    assert len(list(tmp_path.glob("fox-*.png"))) == 3
    # Another prompt into the same file names is made again, not skipped.
    assert main(["generate", "--prompt", "owl", "--out", str(out), "--batch-size", "3"]) == 0
    assert fake_api.generate_calls - before == 4
