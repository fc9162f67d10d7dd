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
from support.cli_args import SMALL_SIZE, generate_args
from support.fake_imageapi import Reply, error_reply, request_image


def png_text(path) -> dict[str, str]:
    with Image.open(path) as image:
        return dict(image.text)


def test_one_prompt_to_a_png_with_metadata(fake_api, send_seed, tmp_path):
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


def test_batch_writes_one_file_per_seed(fake_api, send_seed, tmp_path):
    out = tmp_path / "fox.png"
    assert main(generate_args("--prompt", "fox", "--out", str(out), "--batch-size", "3", "--seed", "5")) == 0
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
    args = generate_args(
        "--prompts-file", str(prompts), "--out-dir", str(out_dir), "--seed", "1", "--concurrency", "2"
    )
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
    assert code == 3  # the account's class of failure (issue 14: one exit code per class)
    assert fake_api.generate_calls < 12
    err = capsys.readouterr().err
    assert "remaining images would fail the same way" in err
    assert TEST_KEY not in err


def test_set_key_with_an_empty_key_says_where_to_get_one_not_to_run_itself(tmp_path, monkeypatch, capsys):
    config = tmp_path / "cfg" / "config.json"
    monkeypatch.setenv("IMAGEAPI_CONFIG", str(config))
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO("\n"))
    assert main(["set-key"]) == 2
    err = capsys.readouterr().err
    assert "set-key's input (stdin or the hidden prompt) is empty" in err
    assert "Dashboard" in err
    assert "run `flux-schnell set-key`" not in err  # the user just ran it
    assert not config.exists()


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
            *generate_args("--prompt", "p", "--out", str(out)),
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
        generate_args(
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
            "--steps",
            "1",
            "--seed",
            "3",
            "--batch-size",
            "2",
            "--device",
            "cpu",
        )
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
    args = generate_args("--prompts-file", str(prompts), "--out-dir", str(tmp_path / "d"), "--seed", "1")
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
    import comfyui_flux_schnell.drafts.png_files as image_files

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
    err = capsys.readouterr().err
    assert err.count("cannot be loaded") == 1, err  # said once, not again in the summary


def test_pngs_get_the_usual_permissions(fake_api, tmp_path):
    old = os.umask(0o022)
    try:
        out = tmp_path / "perm.png"
        assert main(generate_args("--prompt", "p", "--out", str(out))) == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o644


# --- every bad input is refused with exit 2 before anything is paid for or created ------------------


def bad_prompts_file(tmp_path, kind: str) -> str:
    path = tmp_path / "p.txt"
    if kind == "not_utf8":
        path.write_bytes(b"a cat\n\xff\xfe a dog\n")
    elif kind == "too_long_prompt":
        path.write_text("ok\n" + "y" * 2001 + "\n")
    elif kind == "device":
        return "/dev/zero"
    elif kind == "folder":
        return str(tmp_path)
    elif kind == "empty":
        path.write_text("# nothing\n")
    return str(path)


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("not_utf8", "line 2: not UTF-8"),
        ("too_long_prompt", "line 2: prompt is 2,001 characters long; at most 2,000"),
        ("device", "is a character device, not a text file"),
        ("folder", "is a folder, not a text file"),
        ("empty", "has no prompts"),
    ],
)
def test_bad_prompts_files_are_refused_before_anything_happens(fake_api, tmp_path, capsys, kind, message):
    out_dir = tmp_path / "new" / "drafts"
    code = main(["generate", "--prompts-file", bad_prompts_file(tmp_path, kind), "--out-dir", str(out_dir)])
    assert code == 2
    assert message in capsys.readouterr().err
    assert fake_api.generate_calls == 0
    assert not (tmp_path / "new").exists()  # no folder made


def test_too_large_a_prompts_file_is_refused(fake_api, tmp_path, capsys, monkeypatch):
    from comfyui_flux_schnell.drafts import prompts as drafts_prompts

    monkeypatch.setattr(drafts_prompts, "MAX_PROMPTS_FILE_BYTES", 100)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a prompt\n" * 50)
    assert main(["generate", "--prompts-file", str(prompts), "--out-dir", str(tmp_path / "new")]) == 2
    assert "split it into several files" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize(
    ("out", "message"),
    [
        ("x.jpg", "only PNG files are written"),
        ("x.webp", "name the file x.png"),
        ("folder", "is a folder"),
        ("blocker/x.png", "is not a folder"),
    ],
)
def test_bad_out_paths_are_refused_before_anything_happens(fake_api, tmp_path, capsys, out, message):
    (tmp_path / "folder").mkdir()
    (tmp_path / "blocker").write_text("a file, not a folder")
    code = main(generate_args("--prompt", "p", "--out", str(tmp_path / out)))
    assert code == 2
    assert message in capsys.readouterr().err
    assert fake_api.generate_calls == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker", "folder"]


def test_a_long_prompt_is_refused(fake_api, tmp_path, capsys):
    assert main(["generate", "--prompt", "z" * 2001, "--out", str(tmp_path / "new" / "x.png")]) == 2
    assert "at most 2,000" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
    assert fake_api.generate_calls == 0


def test_no_folder_is_made_before_the_key_is_checked(fake_api, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("IMAGEAPI_API_KEY")
    prompts = tmp_path / "p.txt"
    prompts.write_text("a\n")
    assert main(["generate", "--prompts-file", str(prompts), "--out-dir", str(tmp_path / "new" / "d")]) == 2
    assert "No ImageAPI key is set" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_out_dir_that_is_a_file_is_refused(fake_api, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a\n")
    assert main(["generate", "--prompts-file", str(prompts), "--out-dir", str(prompts)]) == 2
    assert "exists and is not a folder" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["generate", "--prompt", "p", "--out-dir", "d"],
        ["generate", "--prompts-file", "p.txt", "--out", "x.png"],
        ["generate", "--prompt", "p", "--out", "x.png", "--concurrency", "17"],
    ],
)
def test_mismatched_options_are_usage_errors(argv):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2


# --- the terminal ---------------------------------------------------------------------------------


def test_a_finished_run_says_where_its_files_are(fake_api, tmp_path, capsys):
    out = tmp_path / "fox.png"
    assert main(generate_args("--prompt", "fox", "--out", str(out))) == 0
    said = capsys.readouterr()
    assert f"wrote {out}" in said.out  # the result, on stdout (issue 14): a script captures it
    assert "wrote" not in said.err
    prompts = tmp_path / "p.txt"
    prompts.write_text("a\n")
    assert main(generate_args("--prompts-file", str(prompts), "--out-dir", str(tmp_path / "d"))) == 0
    said = capsys.readouterr()
    assert f"images in {tmp_path / 'd'}" in said.out
    assert str(tmp_path / "d" / "manifest.jsonl") in said.out
    assert str(tmp_path / "d" / "index.html") in said.out
    assert "images in" not in said.err


@pytest.mark.parametrize("where", ["before", "after"])
def test_verbose_is_accepted_anywhere(fake_api, tmp_path, where, capsys):
    args = generate_args("--prompt", "p", "--out", str(tmp_path / "x.png"))
    argv = ["-v", *args] if where == "before" else [*args, "-v"]
    assert main(argv) == 0
    assert "POST" in capsys.readouterr().err  # the request, logged at DEBUG
    assert main(["config", "-v"]) == 0


@pytest.mark.parametrize("command", ["generate", "gallery", "set-key", "config", None])
def test_help_shows_defaults_environment_variables_and_exit_codes(capsys, command):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"] if command else ["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for name in ("IMAGEAPI_API_KEY", "IMAGEAPI_KEY", "IMAGEAPI_BASE_URL", "IMAGEAPI_CONFIG", "HTTPS_PROXY"):
        assert name in text
    assert "exit codes:" in text
    assert "2    bad input, a usage or configuration error" in text
    if command == "generate":
        assert "(default: 1024)" in text
        assert "(default: 4)" in text
        assert "(default: api)" in text
        assert "(default: None)" not in text
        assert "(default: [])" not in text  # --lora
        assert text.count("pixels, 256..2048, a multiple of 16 (default: 1024)") == 2  # width, height
        assert "MEMORY_CHOICES" not in text  # no names of the code in help texts


def test_config_without_a_key_says_not_set_and_exits_0(fake_api, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("IMAGEAPI_API_KEY")
    assert main(["config"]) == 0
    out = capsys.readouterr().out
    assert "API key:         not set" in out
    assert "flux_schnell_config.json" in out  # where it would be read from
    assert "IMAGEAPI_API_KEY" in out


def test_config_masks_a_key_pasted_into_the_environment(fake_api, monkeypatch, capsys):
    monkeypatch.setenv("IMAGEAPI_BASE_URL", "https://imageapi.org/sk_live_pasted_by_mistake_123")
    assert main(["config"]) == 0
    out = capsys.readouterr().out
    assert "sk_live_pasted" not in out
    assert "https://imageapi.org/***" in out


# --- the torch-free install -----------------------------------------------------------------------

# Runs the command line in a Python where `import torch` fails, then checks torch was never loaded.
WITHOUT_TORCH = """
import importlib.abc, sys

class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, NoTorch())
from comfyui_flux_schnell.cli import main
code = main(sys.argv[1:])
assert not [m for m in sys.modules if m == "torch" or m.startswith("torch.")], "torch was imported"
print("torch never imported")
sys.exit(code)
"""


def run_without_torch(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", WITHOUT_TORCH, *argv], capture_output=True, text=True, timeout=120
    )


def test_the_api_path_runs_without_torch(fake_api, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a\nb\na\n")
    out = tmp_path / "d"
    result = run_without_torch(*generate_args("--prompts-file", str(prompts), "--out-dir", str(out)))
    assert result.returncode == 0, result.stderr
    assert "torch never imported" in result.stdout
    assert len(list(out.glob("*.png"))) == 2
    assert (out / "index.html").is_file()
    for argv in (["config"], ["gallery", str(out)]):
        result = run_without_torch(*argv)
        assert result.returncode == 0, result.stderr
        assert "torch never imported" in result.stdout


def test_local_backend_without_its_extra_exits_2_naming_the_package_and_the_command(tmp_path):
    result = run_without_torch(
        "generate", "--backend", "local", "--prompt", "p", "--out", str(tmp_path / "new" / "x.png")
    )
    assert result.returncode == 2
    assert "'torch'" in result.stderr
    assert 'pip install "comfyui-flux-schnell[local]"' in result.stderr
    assert "ComfyUI" not in result.stderr  # no ComfyUI wording outside ComfyUI
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "new").exists()


def test_config_lists_every_setting_with_its_source_even_without_a_key(
    fake_api, tmp_path, monkeypatch, capsys
):
    config = tmp_path / "flux_schnell_config.json"
    config.write_text(json.dumps({"deadline_s": 42, "max_billed_retries": 1}))
    os.chmod(config, 0o600)
    monkeypatch.delenv("IMAGEAPI_API_KEY")
    assert main(["config"]) == 0
    out = capsys.readouterr().out
    assert f"base_url:        {fake_api.base_url}  (from environment variable IMAGEAPI_BASE_URL)" in out
    assert f"deadline_s:      42  (from config file {config})" in out
    assert f"max_billed_retries: 1  (from config file {config})" in out
    assert "request_timeout_s: 120.0  (from the default)" in out
    assert "min_call_s:      30.0  (from the default)" in out


# --- JSONL prompts files: per-line overrides, a draft folder's manifest rendered again ---------------


def test_jsonl_lines_override_the_command_line(fake_api, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(
        '{"prompt": "fox"}\n{"prompt": "owl", "width": 512, "height": 256, "num_inference_steps": 8}\n'
    )
    args = ["generate", "--prompts-file", str(prompts), "--out-dir", str(tmp_path / "d")]
    assert main([*args, *SMALL_SIZE, "--seed", "3"]) == 0
    sent = {r.prompt: r.json for r in fake_api.requests}
    assert (sent["fox"]["width"], sent["fox"]["height"], sent["fox"]["num_inference_steps"]) == (256, 256, 4)
    assert (sent["owl"]["width"], sent["owl"]["height"], sent["owl"]["num_inference_steps"]) == (512, 256, 8)
    records = {r["prompt"]: r for r in map(json.loads, (tmp_path / "d" / "manifest.jsonl").open())}
    assert (records["owl"]["width"], records["owl"]["steps"]) == (512, 8)
    assert records["owl"]["seed_sent"] is False  # the default config sends no seed


def test_a_bad_jsonl_field_is_refused_before_anything_is_paid(fake_api, tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(
        '{"prompt": "fox"}\n{"prompt": "owl", "num_inference_steps": 9}\n{"prompt": "x", "cfg": 1}\n'
    )
    assert main(["generate", "--prompts-file", str(prompts), "--out-dir", str(tmp_path / "d")]) == 2
    assert "line 2: num_inference_steps must be between 1 and 8" in capsys.readouterr().err
    assert fake_api.generate_calls == 0
    assert not (tmp_path / "d").exists()


def test_a_manifest_renders_its_drafts_again_with_their_seeds(fake_api, tmp_path, capsys):
    config = tmp_path / "flux_schnell_config.json"
    config.write_text('{"send_seed": true}')
    config.chmod(0o600)
    prompts = tmp_path / "p.txt"
    prompts.write_text("fox\nowl\nfox\n")
    drafts, finals = tmp_path / "drafts", tmp_path / "finals"
    assert main(["generate", "--prompts-file", str(prompts), "--out-dir", str(drafts), "--seed", "40"]) == 0
    draft_seeds = {r.prompt: r.json["seed"] for r in fake_api.requests}
    fake_api.requests.clear()
    manifest = drafts / "manifest.jsonl"
    assert main(["generate", "--prompts-file", str(manifest), "--steps", "8", "--out-dir", str(finals)]) == 0
    assert "not sent" not in capsys.readouterr().err
    final = {r.prompt: r.json for r in fake_api.requests}
    assert {p: j["seed"] for p, j in final.items()} == draft_seeds  # the duplicate line is not drafted
    assert {j["num_inference_steps"] for j in final.values()} == {8}
    assert len(list(finals.glob("*.png"))) == 2


def test_drafts_whose_seeds_were_not_sent_are_named_before_anything_is_paid(fake_api, tmp_path, caplog):
    prompts = tmp_path / "p.txt"
    prompts.write_text("fox\nowl\n")
    drafts = tmp_path / "drafts"
    assert main(["generate", "--prompts-file", str(prompts), "--out-dir", str(drafts)]) == 0
    warned_when_paid = []

    def answer(req, fake):
        warned_when_paid.append(any("were not sent" in r.getMessage() for r in caplog.records))
        return Reply.image(request_image(req))

    fake_api.set_default(answer)
    assert (
        main(["generate", "--prompts-file", str(drafts / "manifest.jsonl"), "--out-dir", str(tmp_path / "f")])
        == 0
    )
    assert warned_when_paid == [True, True]
    assert "the seeds of 2 draft(s) were not sent to the service" in caplog.text
