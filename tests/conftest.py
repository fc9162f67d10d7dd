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
def node(comfy_package):
    """A "FLUX Schnell Generate" node of the package as ComfyUI loaded it."""
    return comfy_package.NODE_CLASS_MAPPINGS["FluxSchnellGenerate"]()


@pytest.fixture
def fresh_local_cache():
    """No local models cached before or after the test (each test loads its own files)."""
    from comfyui_flux_schnell import local_backend

    local_backend.release_models()
    yield
    local_backend.release_models()


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


# --- the hosted-API client against loopback fakes (tests/test_api_*.py) -----------------------------


@pytest.fixture
def fake():
    """A loopback fake ImageAPI (the service's own origin for the client under test)."""
    from support.fake_imageapi import FakeImageAPI

    with FakeImageAPI() as server:
        yield server


@pytest.fixture
def other_host():
    """A second fake: "another host" for downloads (another port = another origin)."""
    from support.fake_imageapi import FakeImageAPI

    with FakeImageAPI() as server:
        yield server


@pytest.fixture
def make_client(fake):
    """Builds `ImageApiClient`s on `fake` with fast test settings; closes them afterwards."""
    from comfyui_flux_schnell.api.service import ImageApiClient
    from support.api_testing import KEY, make_settings

    clients = []

    def build(key: str = KEY, base_url: str | None = None, clock=None, **overrides):
        kwargs = {"clock": clock} if clock is not None else {}
        client = ImageApiClient(make_settings(base_url or fake.base_url, key, **overrides), **kwargs)
        clients.append(client)
        return client

    yield build
    for client in clients:
        client.close()


@pytest.fixture
def client(make_client):
    return make_client()


@pytest.fixture
def send_seed(tmp_path, fake_api):
    """The config file of `fake_api` with `send_seed` on: the service receives each image's seed,
    so files, manifest and gallery record it (without it no seed is ever recorded)."""
    config = tmp_path / "flux_schnell_config.json"
    config.write_text('{"send_seed": true}')
    config.chmod(0o600)
    return config
