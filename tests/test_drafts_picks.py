"""The gallery's pick-and-promote in a real headless Chromium: tick two cards (one with the mouse's
click, one with the keyboard), export picks.jsonl as a download, read the file, and render it with
the command line. Skipped where no Chromium is installed."""

from __future__ import annotations

import json
import time

import pytest
from comfyui_flux_schnell.cli import main
from comfyui_flux_schnell.drafts.gallery import PROMOTE_COMMAND
from comfyui_flux_schnell.drafts.prompts import PromptLine, read_prompt_lines
from support.chromium import Chromium, chromium_path

pytestmark = pytest.mark.skipif(chromium_path() is None, reason="no Chromium installed")


def test_tick_two_export_picks_and_render_them(fake_api, tmp_path):
    config = tmp_path / "flux_schnell_config.json"
    config.write_text('{"send_seed": true}')
    config.chmod(0o600)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red fox\nan owl\n# not a prompt\na cat\n")
    drafts = tmp_path / "drafts"
    assert main(["generate", "--prompts-file", str(prompts), "--out-dir", str(drafts), "--seed", "9"]) == 0
    seeds = {r.prompt: r.json["seed"] for r in fake_api.requests}
    downloads = tmp_path / "downloads"
    downloads.mkdir()

    with Chromium(tmp_path / "profile") as browser:
        browser.call(
            "Browser.setDownloadBehavior", session=False, behavior="allow", downloadPath=str(downloads)
        )
        browser.open((drafts / "index.html").as_uri())
        assert browser.evaluate("document.getElementById('pick-count').textContent") == "0 of 3 picked"
        assert browser.evaluate("document.getElementById('pick-export').disabled") is True
        browser.evaluate("document.querySelectorAll('input.pick')[0].click()")  # line 1: a red fox
        browser.evaluate("document.querySelectorAll('input.pick')[2].focus()")  # line 4: a cat
        browser.press(" ", "Space", " ")
        assert browser.evaluate("document.getElementById('pick-count').textContent") == "2 of 3 picked"
        assert PROMOTE_COMMAND in browser.evaluate("document.body.innerText")
        browser.press("a", "KeyA", "a")
        assert browser.evaluate("document.getElementById('pick-count').textContent") == "3 of 3 picked"
        browser.press("n", "KeyN", "n")
        assert browser.evaluate("document.getElementById('pick-count').textContent") == "0 of 3 picked"
        browser.evaluate("document.querySelectorAll('input.pick')[0].click()")
        browser.evaluate("document.querySelectorAll('input.pick')[2].click()")
        browser.evaluate("document.getElementById('pick-export').click()")
        picks = downloads / "picks.jsonl"
        deadline = time.monotonic() + 20
        while not picks.exists() and time.monotonic() < deadline:
            time.sleep(0.1)

    assert [json.loads(line) for line in picks.read_text().splitlines()] == [
        {"prompt": "a red fox", "seed": seeds["a red fox"]},
        {"prompt": "a cat", "seed": seeds["a cat"]},
    ]
    assert list(read_prompt_lines(picks)) == [
        PromptLine(1, "a red fox", seed=seeds["a red fox"]),
        PromptLine(2, "a cat", seed=seeds["a cat"]),
    ]
    fake_api.requests.clear()
    finals = tmp_path / "finals"
    assert main(["generate", "--prompts-file", str(picks), "--steps", "8", "--out-dir", str(finals)]) == 0
    assert {(r.prompt, r.json["seed"], r.json["num_inference_steps"]) for r in fake_api.requests} == {
        ("a red fox", seeds["a red fox"], 8),
        ("a cat", seeds["a cat"], 8),
    }
