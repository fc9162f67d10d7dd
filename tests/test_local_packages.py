"""Tests of local/packages.py: a missing package of the local backend is one clear error naming it
and the pip command, from the command line (see test_cli.py) and from both nodes."""

from __future__ import annotations

import asyncio
import importlib

import pytest
from comfyui_flux_schnell.local.packages import INSTALL_COMMAND, missing_local_packages


def test_nothing_is_missing_here():
    assert missing_local_packages() == []  # the test environment has the local extra


@pytest.fixture
def without_tokenizers(comfy_package, monkeypatch):
    """The package as ComfyUI loads it, in a Python where 'tokenizers' is not installed."""
    module = importlib.import_module(comfy_package.__name__ + ".local.packages")
    monkeypatch.setattr(module, "LOCAL_PACKAGES", ("torch", "no_such_package_flux_schnell_tokenizers"))
    return comfy_package


def test_generate_node_names_the_missing_package_and_the_command(without_tokenizers):
    node = without_tokenizers.NODE_CLASS_MAPPINGS["FluxSchnellGenerate"]()
    with pytest.raises(without_tokenizers.errors.LocalBackendUnavailable) as info:
        asyncio.run(node.generate("a fox", "local", 256, 256, 1, 0, 1))  # ComfyUI awaits it
    message = str(info.value)
    assert "'no_such_package_flux_schnell_tokenizers'" in message
    assert INSTALL_COMMAND in message
    assert "'torch'" not in message  # only what is missing


def test_local_model_node_says_the_same(without_tokenizers):
    node = without_tokenizers.NODE_CLASS_MAPPINGS["FluxSchnellLocalModel"]()
    with pytest.raises(
        without_tokenizers.errors.LocalBackendUnavailable, match="comfyui-flux-schnell\\[local\\]"
    ):
        node.select("none", "auto", "auto", "auto", "auto", "as stored", "auto")


def test_the_base_install_is_torch_free_and_the_extra_has_what_the_check_looks_for():
    import re

    import tomllib
    from support import REPO

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]

    def names(requirements):
        return {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower() for r in requirements}

    assert names(project["dependencies"]) == {"requests", "pillow", "numpy"}
    from comfyui_flux_schnell.local.packages import LOCAL_PACKAGES

    assert names(project["optional-dependencies"]["local"]) == set(LOCAL_PACKAGES)
