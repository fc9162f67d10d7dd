"""The `flux-schnell` command line: single images, resumable draft runs, exit codes, key handling."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest
import torch
from comfyui_flux_schnell.cli import main
from PIL import Image
from support import TEST_KEY
from support.fake_imageapi import Reply, error_reply, request_image


def png_text(path) -> dict[str, str]:
    with Image.open(path) as image:
        return dict(image.text)


def test_one_prompt_to_a_png_with_metadata(fake_api, tmp_path):
    out = tmp_path / "fox.png"
    code = main(
        [
            "generate",
            "--prompt",
            "a red fox",
            "--out",
            str(out),
            "--width",
            "512",
            "--height",
            "256",
            "--seed",
            "7",
        ]
    )
    assert code == 0
    with Image.open(out) as image:
        assert image.size == (512, 256)
    text = png_text(out)
    assert text["prompt"] == "a red fox"
    assert text["seed"] == "7"
    assert text["model"] == "flux-schnell"
    assert TEST_KEY.encode() not in out.read_bytes()
    assert fake_api.requests[0].json["num_inference_steps"] == 4


def test_batch_writes_one_file_per_seed(fake_api, tmp_path):
    out = tmp_path / "fox.png"
    assert (
        main(
            [
                "generate",
                "--prompt",
                "fox",
                "--out",
                str(out),
                "--batch-size",
                "3",
                "--seed",
                "5",
                "--width",
                "256",
                "--height",
                "256",
            ]
        )
        == 0
    )
    seeds = [png_text(tmp_path / f"fox-{i}.png")["seed"] for i in (1, 2, 3)]
    assert seeds == ["5", "6", "7"]


def test_prompts_file_is_resumable_and_reports_failures(fake_api, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# drafts\na cat\n\na dog\na bird\n")
    out_dir = tmp_path / "drafts"

    def refuse_dog(req, fake):
        if req.prompt == "a dog":
            return error_reply(400, "the word dog is not allowed")
        return Reply.image(request_image(req))

    fake_api.set_default(refuse_dog)
    args = [
        "generate",
        "--prompts-file",
        str(prompts),
        "--out-dir",
        str(out_dir),
        "--width",
        "256",
        "--height",
        "256",
        "--seed",
        "1",
        "--concurrency",
        "2",
    ]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "done: 2, failed: 1" in err
    assert "the word dog is not allowed" in err
    names = sorted(p.name for p in out_dir.glob("*.png"))
    assert [n.rsplit("-", 1)[0] for n in names] == ["a-bird", "a-cat"]
    assert "failed line 4" in err  # the file's own line number
    assert fake_api.generate_calls == 3

    fake_api.set_default(lambda req, fake: Reply.image(request_image(req)))
    assert main(args) == 0
    assert fake_api.generate_calls == 4  # only the dog again
    assert fake_api.requests[-1].prompt == "a dog"
    assert "2 image(s) already done" in capsys.readouterr().err
    assert not list(out_dir.glob("*.part"))


def test_usage_and_configuration_errors_exit_2_without_requests(fake_api, tmp_path, monkeypatch):
    out = str(tmp_path / "x.png")
    assert main(["generate", "--prompt", "p", "--out", out, "--steps", "9"]) == 2
    assert main(["generate", "--prompt", "p", "--out", out, "--width", "1000"]) == 2
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--prompt", "p"])  # no --out
    assert exit_info.value.code == 2
    monkeypatch.delenv("IMAGEAPI_API_KEY")
    assert main(["generate", "--prompt", "p", "--out", out]) == 2
    assert fake_api.generate_calls == 0


def test_refused_key_stops_the_run(fake_api, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(f"prompt {i}" for i in range(12)))
    fake_api.set_default(error_reply(401, "bad key"))
    code = main(
        ["generate", "--prompts-file", str(prompts), "--out-dir", str(tmp_path / "o"), "--concurrency", "1"]
    )
    assert code == 2  # a refused key is a configuration error
    assert fake_api.generate_calls < 12
    err = capsys.readouterr().err
    assert "remaining images would fail the same way" in err
    assert TEST_KEY not in err


def test_set_key_and_config_never_print_the_key(fake_api, tmp_path, monkeypatch, capsys):
    config = tmp_path / "cfg" / "config.json"
    monkeypatch.setenv("IMAGEAPI_CONFIG", str(config))
    monkeypatch.delenv("IMAGEAPI_API_KEY")
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO("sk_from_stdin_123456789\n"))
    assert main(["set-key"]) == 0
    assert json.loads(config.read_text())["api_key"] == "sk_from_stdin_123456789"
    assert stat.S_IMODE(os.stat(config).st_mode) == 0o600
    assert main(["config"]) == 0
    out = capsys.readouterr().out
    assert "sk_from_stdin" not in out
    assert str(config) in out


def test_module_entry_point_runs_in_a_subprocess(fake_api, tmp_path):
    out = tmp_path / "sub.png"
    env = {**os.environ}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "comfyui_flux_schnell",
            "generate",
            "--prompt",
            "p",
            "--out",
            str(out),
            "--width",
            "256",
            "--height",
            "256",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert out.is_file()
    assert TEST_KEY not in result.stderr + result.stdout


def test_local_backend_from_the_command_line(tmp_path):
    from support.tiny_models import write_tiny_models
    from support.tiny_tokenizers import write_flux_repo_tree

    files = write_tiny_models(tmp_path, torch.bfloat16)
    clip_tok, t5_tok = write_flux_repo_tree(tmp_path)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\na dog\n")
    code = main(
        [
            "generate",
            "--backend",
            "local",
            "--prompts-file",
            str(prompts),
            "--out-dir",
            str(tmp_path / "out"),
            "--checkpoint",
            str(files.all_in_one),
            "--t5-tokenizer",
            str(t5_tok),
            "--clip-tokenizer",
            str(clip_tok),
            "--width",
            "256",
            "--height",
            "256",
            "--steps",
            "1",
            "--seed",
            "3",
            "--batch-size",
            "2",
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    names = sorted(p.name for p in (tmp_path / "out").glob("*.png"))
    assert [n.split("-")[:2] + n.split("-")[-1:] for n in names] == [
        ["a", "cat", "1.png"],
        ["a", "cat", "2.png"],
        ["a", "dog", "1.png"],
        ["a", "dog", "2.png"],
    ]
    dog_2 = tmp_path / "out" / names[-1]
    assert png_text(dog_2)["seed"] == "4"
    assert png_text(dog_2)["backend"] == "local"


def test_editing_the_prompts_file_does_not_rename_finished_drafts(fake_api, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a fox\na cat\n")
    args = [
        "generate",
        "--prompts-file",
        str(prompts),
        "--out-dir",
        str(tmp_path / "d"),
        "--width",
        "256",
        "--height",
        "256",
        "--seed",
        "1",
    ]
    assert main(args) == 0
    prompts.write_text("# a fox is done\na cat\na new owl\n")
    assert main(args) == 0
    assert fake_api.generate_calls == 3  # only the owl is new
    changed = [*args[:-2], "--seed", "2"]
    assert main(changed) == 0  # another seed is another picture: not skipped
    assert fake_api.generate_calls == 5


def test_an_unwritable_output_folder_is_refused_before_any_request(fake_api, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    prompts = tmp_path / "p.txt"
    prompts.write_text("a\nb\n")
    code = main(["generate", "--prompts-file", str(prompts), "--out-dir", str(blocker / "out")])
    assert code == 2
    assert fake_api.generate_calls == 0


def test_a_write_failure_mid_run_stops_the_run_with_a_summary(fake_api, tmp_path, monkeypatch, capsys):
    import comfyui_flux_schnell.image_files as image_files

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(image_files, "write_atomically", disk_full)
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(f"p{i}" for i in range(8)))
    code = main(
        ["generate", "--prompts-file", str(prompts), "--out-dir", str(tmp_path / "o"), "--concurrency", "1"]
    )
    assert code == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err
    assert "done: 0, failed: 1" in err
    assert fake_api.generate_calls < 8


def test_local_files_that_fail_to_load_end_the_run_once(tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a\nb\nc\n")
    bad = tmp_path / "flux1-schnell.safetensors"
    bad.write_bytes(b"not a safetensors file at all")
    code = main(
        [
            "generate",
            "--backend",
            "local",
            "--prompts-file",
            str(prompts),
            "--out-dir",
            str(tmp_path / "o"),
            "--checkpoint",
            str(bad),
            "--t5-tokenizer",
            str(tmp_path),
            "--clip-tokenizer",
            str(tmp_path),
            "--device",
            "cpu",
        ]
    )
    assert code == 2
    assert capsys.readouterr().err.count("failed line") == 1


def test_pngs_get_the_usual_permissions(fake_api, tmp_path):
    old = os.umask(0o022)
    try:
        out = tmp_path / "perm.png"
        assert (
            main(["generate", "--prompt", "p", "--out", str(out), "--width", "256", "--height", "256"]) == 0
        )
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o644
