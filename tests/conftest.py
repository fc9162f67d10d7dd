"""Shared fixtures: ComfyUI stand-ins, loading the package the way ComfyUI does, an API env."""

from __future__ import annotations

import sys

import pytest
from support import TEST_KEY
from support.comfy_stand_in import ComfyStandIn
from support.workflow_tools import load_like_comfyui


@pytest.fixture
def comfy(tmp_path, monkeypatch) -> ComfyStandIn:
    """ComfyUI's modules replaced by stand-ins for the duration of a test."""
    stand_in = ComfyStandIn(tmp_path)
    for name, module in stand_in.modules().items():
        monkeypatch.setitem(sys.modules, name, module)
    return stand_in


@pytest.fixture
def comfy_package(comfy):
    """The repository loaded the ComfyUI way, with ComfyUI stand-ins present."""
    module = load_like_comfyui()
    yield module
    for key in [k for k in sys.modules if k == module.__name__ or k.startswith(module.__name__ + ".")]:
        del sys.modules[key]


@pytest.fixture
def fake_api(tmp_path, monkeypatch):
    """A loopback fake ImageAPI, with the environment pointing the package at it."""
    from support.fake_imageapi import FakeImageAPI

    server = FakeImageAPI()
    server.start()
    monkeypatch.setenv("IMAGEAPI_BASE_URL", server.base_url)
    monkeypatch.setenv("IMAGEAPI_API_KEY", TEST_KEY)
    monkeypatch.delenv("IMAGEAPI_KEY", raising=False)
    monkeypatch.setenv("IMAGEAPI_CONFIG", str(tmp_path / "flux_schnell_config.json"))
    yield server
    server.stop()
