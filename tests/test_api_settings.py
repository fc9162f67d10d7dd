"""Tests of api/settings.py: where the key, base URL and limits come from; how bad ones are refused."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from comfyui_flux_schnell import comfy_bridge
from comfyui_flux_schnell.api import settings as settings_mod
from comfyui_flux_schnell.api.settings import (
    DEFAULT_BASE_URL,
    ApiSettings,
    config_search_paths,
    default_config_path,
    load_settings,
    save_api_key,
    shell_config_path,
)
from comfyui_flux_schnell.errors import ConfigurationError

KEY = "sk_settings_TEST123"


@pytest.fixture
def cfg(tmp_path) -> Path:
    return tmp_path / "conf" / "config.json"


def write(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")
    return path


# --- where the key comes from ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "config", "expected_key", "source_part"),
    [
        ({"IMAGEAPI_API_KEY": "sk_env1"}, {"api_key": "sk_file"}, "sk_env1", "IMAGEAPI_API_KEY"),
        ({"IMAGEAPI_KEY": "sk_env2"}, {"api_key": "sk_file"}, "sk_env2", "IMAGEAPI_KEY"),
        ({"IMAGEAPI_API_KEY": "sk_a", "IMAGEAPI_KEY": "sk_b"}, None, "sk_a", "IMAGEAPI_API_KEY"),
        ({}, {"api_key": "sk_file"}, "sk_file", "config file"),
    ],
)
def test_key_precedence(cfg, env, config, expected_key, source_part):
    if config is not None:
        write(cfg, config)
    s = load_settings(cfg, environ=env)
    assert s.api_key == expected_key
    assert source_part in s.key_source
    assert s.base_url == DEFAULT_BASE_URL
    assert expected_key not in repr(s)
    assert expected_key not in str(s)


def test_missing_key_explains_every_way_to_set_one(cfg):
    with pytest.raises(ConfigurationError) as info:
        load_settings(cfg, environ={})
    msg = str(info.value)
    for part in ("IMAGEAPI_API_KEY", "IMAGEAPI_KEY", str(cfg), "flux-schnell set-key", "Dashboard"):
        assert part in msg
    assert isinstance(info.value, ValueError)
    assert "ComfyUI" not in msg  # outside ComfyUI (no user directory): a shell's words
    assert "in the shell that runs flux-schnell" in msg


@pytest.mark.parametrize(
    "bad_key", ["", "   ", "sk_abc def", "sk_abc\n", "\tsk_abc", "sk_a\x00b", "sk_é", "sk_\u200b"]
)
@pytest.mark.parametrize("where", ["env", "file"])
def test_bad_keys_refused_without_echo(cfg, bad_key, where):
    env = {"IMAGEAPI_API_KEY": bad_key} if where == "env" else {}
    if where == "file":
        write(cfg, {"api_key": bad_key})
    with pytest.raises(ConfigurationError) as info:
        load_settings(cfg, environ=env)
    msg = str(info.value)
    assert ("IMAGEAPI_API_KEY" if where == "env" else str(cfg)) in msg
    if bad_key.strip():
        assert bad_key.strip() not in msg


def test_key_of_wrong_type_in_file(cfg):
    write(cfg, {"api_key": 12345})
    with pytest.raises(ConfigurationError, match="must be a string"):
        load_settings(cfg, environ={})


# --- config file -----------------------------------------------------------------------------


def test_config_options_are_read(cfg):
    write(
        cfg,
        {
            "api_key": KEY,
            "base_url": "https://eu.example.com/",
            "send_seed": True,
            "max_billed_retries": 0,
            "request_timeout_s": 30,
            "deadline_s": 90.5,
            "min_call_s": 12,
        },
    )
    s = load_settings(cfg, environ={})
    assert (s.base_url, s.send_seed, s.max_billed_retries) == ("https://eu.example.com", True, 0)
    assert (s.request_timeout_s, s.deadline_s, s.min_call_s) == (30, 90.5, 12)


def test_unknown_config_keys_are_named(cfg):
    write(cfg, {"api_key": KEY, "apikey": "x", "timeout": 3})
    with pytest.raises(ConfigurationError) as info:
        load_settings(cfg, environ={})
    assert "'apikey'" in str(info.value)
    assert "'timeout'" in str(info.value)


def test_bad_json_names_file_and_line_not_content(cfg):
    write(cfg, '{\n  "api_key": "sk_secret_in_broken_file",\n  "send_seed": tru\n}\n')
    with pytest.raises(ConfigurationError) as info:
        load_settings(cfg, environ={"IMAGEAPI_API_KEY": KEY})
    msg = str(info.value)
    assert str(cfg) in msg
    assert "line 3" in msg
    assert "sk_secret_in_broken_file" not in msg
    assert info.value.__cause__ is None
    assert info.value.__context__ is None  # the JSONDecodeError holds the whole text


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ("[1, 2]", "JSON object"),
        ({"api_key": KEY, "send_seed": "yes"}, "send_seed"),
        ({"api_key": KEY, "max_billed_retries": 1.5}, "max_billed_retries"),
        ({"api_key": KEY, "max_billed_retries": -1}, "max_billed_retries"),
        ({"api_key": KEY, "deadline_s": 0}, "deadline_s"),
        ({"api_key": KEY, "min_call_s": -3}, "min_call_s"),
        ({"api_key": KEY, "request_timeout_s": True}, "request_timeout_s"),
        ({"api_key": KEY, "base_url": 5}, "base_url"),
    ],
)
def test_bad_config_values(cfg, data, match):
    write(cfg, data)
    with pytest.raises(ConfigurationError, match=match) as info:
        load_settings(cfg, environ={})
    assert str(cfg) in str(info.value)
    assert KEY not in str(info.value)


def test_unreadable_config_is_reported(tmp_path):
    folder = tmp_path / "config.json"
    folder.mkdir()  # a directory where the file should be: reading it fails
    with pytest.raises(ConfigurationError, match="cannot read the config file"):
        load_settings(folder, environ={"IMAGEAPI_API_KEY": KEY})


def test_world_readable_config_warns(cfg, caplog):
    write(cfg, {"api_key": KEY})
    cfg.chmod(0o644)
    with caplog.at_level("WARNING", logger="flux_schnell.settings"):
        load_settings(cfg, environ={})
    assert any("chmod 600" in r.getMessage() for r in caplog.records)
    assert all(KEY not in r.getMessage() for r in caplog.records)


# --- base URL -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://imageapi.org/", "https://imageapi.org"),
        ("https://proxy.example.com/imageapi//", "https://proxy.example.com/imageapi"),
        ("http://127.0.0.1:8787", "http://127.0.0.1:8787"),
        ("http://127.5.6.7:1/", "http://127.5.6.7:1"),
        ("http://localhost:9000", "http://localhost:9000"),
        ("http://[::1]:8080", "http://[::1]:8080"),
    ],
)
def test_base_url_accepted(cfg, url, expected):
    s = load_settings(cfg, environ={"IMAGEAPI_API_KEY": KEY, "IMAGEAPI_BASE_URL": url})
    assert s.base_url == expected


@pytest.mark.parametrize(
    ("url", "match"),
    [
        ("http://imageapi.org", "plain http"),
        ("http://10.0.0.1:80", "plain http"),
        ("http://128.0.0.1", "plain http"),
        ("ftp://imageapi.org", "https://"),
        ("imageapi.org", "https://"),
        ("https://", "https://"),
        ("https://user:pw@imageapi.org", "user name or password"),
        ("https://imageapi.org/?x=1", "query"),
        ("https://imageapi.org:99999", "malformed"),
    ],
)
def test_base_url_refused(cfg, url, match):
    with pytest.raises(ConfigurationError, match=match) as info:
        load_settings(cfg, environ={"IMAGEAPI_API_KEY": KEY, "IMAGEAPI_BASE_URL": url})
    assert "IMAGEAPI_BASE_URL" in str(info.value)


@pytest.mark.parametrize(
    ("url", "shown", "match"),
    [
        ("ftp://me:PASSWD@imageapi.org/p?tok=QSECRET#FRAG", "ftp://imageapi.org/p", "https://"),
        ("me:PASSWD@imageapi.org?tok=QSECRET", "imageapi.org", "https://"),
        ("https://me:PASSWD@imageapi.org:99999/p?tok=QSECRET", "https://imageapi.org:99999/p", "malformed"),
        ("https://me:PASSWD@[::1/p?tok=QSECRET", "https://[::1/p", "malformed"),
        ("https://me:PASS\uff20WD@imageapi.org/p", "https://imageapi.org/p", "malformed"),
        ("https://imageapi.org/v1?tok=QSECRET#FRAG", "https://imageapi.org/v1", "query"),
    ],
)
def test_base_url_errors_never_echo_userinfo_or_query(cfg, url, shown, match):
    with pytest.raises(ConfigurationError, match=match) as info:
        load_settings(cfg, environ={"IMAGEAPI_API_KEY": KEY, "IMAGEAPI_BASE_URL": url})
    msg = str(info.value)
    assert shown in msg
    for secret in ("PASS", "QSECRET", "FRAG", "me:"):
        assert secret not in msg


@pytest.mark.parametrize(
    "url",
    [
        "sk_live_PASTEDKEY123456",  # the key pasted into IMAGEAPI_BASE_URL by mistake
        "http://example.com/sk-PASTEDKEY123456",
        "ftp://imageapi.org/a1b2c3d4e5f6a7b8c9d0a1b2c3d4e5f6a7b8c9d0PASTEDKEY",
    ],
)
def test_base_url_errors_never_echo_what_looks_like_a_key(cfg, url):
    with pytest.raises(ConfigurationError) as info:
        load_settings(cfg, environ={"IMAGEAPI_API_KEY": KEY, "IMAGEAPI_BASE_URL": url})
    assert "PASTEDKEY" not in str(info.value)
    assert "***" in str(info.value)


def test_missing_key_message_masks_a_key_pasted_into_imageapi_config(tmp_path):
    environ = {"IMAGEAPI_CONFIG": str(tmp_path / "sk_live_PASTEDKEY123456")}
    with pytest.raises(ConfigurationError) as info:
        load_settings(environ=environ)
    assert "PASTEDKEY" not in str(info.value)


def test_env_base_url_overrides_config(cfg):
    write(cfg, {"api_key": KEY, "base_url": "https://from-file.example.com"})
    env = {"IMAGEAPI_BASE_URL": "https://from-env.example.com"}
    assert load_settings(cfg, environ=env).base_url == "https://from-env.example.com"
    assert load_settings(cfg, environ={}).base_url == "https://from-file.example.com"


# --- ApiSettings itself -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("request_timeout_s", 0),
        ("deadline_s", -1),
        ("deadline_s", float("nan")),
        ("min_call_s", 0),
        ("max_free_retries", -1),
        ("max_download_bytes", 0),
        ("max_image_pixels", 1.5),
        ("backoff_base_s", -0.1),
        ("send_seed", 1),
    ],
)
def test_api_settings_validates(field, value):
    with pytest.raises(ConfigurationError, match=field):
        ApiSettings(base_url=DEFAULT_BASE_URL, api_key=KEY, key_source="test", **{field: value})


def test_api_settings_repr_hides_key():
    s = ApiSettings(base_url="https://x.example.com/", api_key=KEY, key_source="test")
    assert KEY not in repr(s)
    assert KEY not in str(s)
    assert s.base_url == "https://x.example.com"


# --- config path --------------------------------------------------------------------------------


def test_default_path_env_override(tmp_path):
    assert default_config_path({"IMAGEAPI_CONFIG": str(tmp_path / "c.json")}) == tmp_path / "c.json"


def test_default_path_xdg(tmp_path, monkeypatch):
    monkeypatch.setattr(comfy_bridge, "user_directory", lambda: None)
    path = default_config_path({"XDG_CONFIG_HOME": str(tmp_path)})
    assert path == tmp_path / "comfyui-flux-schnell" / "config.json"
    home = default_config_path({})
    assert home == Path.home() / ".config" / "comfyui-flux-schnell" / "config.json"


def test_default_path_inside_comfyui(tmp_path, monkeypatch):
    monkeypatch.setattr(comfy_bridge, "user_directory", lambda: str(tmp_path / "user"))
    path = default_config_path({"XDG_CONFIG_HOME": str(tmp_path / "xdg")})
    assert path == tmp_path / "user" / "flux_schnell" / "config.json"


@pytest.fixture
def inside_comfyui(tmp_path, monkeypatch):
    """ComfyUI's user directory present; returns (its config file, the XDG config file, env)."""
    monkeypatch.setattr(comfy_bridge, "user_directory", lambda: str(tmp_path / "user"))
    env = {"XDG_CONFIG_HOME": str(tmp_path / "xdg")}
    comfy_file = tmp_path / "user" / "flux_schnell" / "config.json"
    xdg_file = tmp_path / "xdg" / "comfyui-flux-schnell" / "config.json"
    return comfy_file, xdg_file, env


def test_key_set_from_a_shell_is_found_inside_comfyui(tmp_path, monkeypatch):
    # `flux-schnell set-key` in a shell (no ComfyUI) writes the XDG file ...
    monkeypatch.setattr(comfy_bridge, "user_directory", lambda: None)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("IMAGEAPI_CONFIG", raising=False)
    for name in ("IMAGEAPI_API_KEY", "IMAGEAPI_KEY", "IMAGEAPI_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    written = save_api_key(KEY)
    assert written == tmp_path / "xdg" / "comfyui-flux-schnell" / "config.json"
    # ... and the node inside ComfyUI reads it when its own user-directory file does not exist.
    monkeypatch.setattr(comfy_bridge, "user_directory", lambda: str(tmp_path / "user"))
    s = load_settings()
    assert s.api_key == KEY
    assert s.key_source == f"config file {written}"


def test_comfyui_file_comes_first_and_alone(inside_comfyui):
    comfy_file, xdg_file, env = inside_comfyui
    write(xdg_file, {"api_key": "sk_from_xdg", "send_seed": True})
    write(comfy_file, {"api_key": "sk_from_comfy"})
    s = load_settings(environ=env)
    assert (s.api_key, s.send_seed) == ("sk_from_comfy", False)  # nothing taken from the XDG file
    assert str(comfy_file) in s.key_source


def test_explicit_config_is_the_only_one_read(inside_comfyui, tmp_path):
    comfy_file, xdg_file, env = inside_comfyui
    write(xdg_file, {"api_key": "sk_from_xdg"})
    write(comfy_file, {"api_key": "sk_from_comfy"})
    named = tmp_path / "named.json"
    with pytest.raises(ConfigurationError) as info:
        load_settings(environ={**env, "IMAGEAPI_CONFIG": str(named)})
    msg = str(info.value)
    assert f"{named} (named by IMAGEAPI_CONFIG; no other file is looked at): does not exist" in msg
    assert str(comfy_file) not in msg
    assert str(xdg_file) not in msg
    assert f"in a shell with the same IMAGEAPI_CONFIG: it stores it in {named}" in msg


def test_missing_key_inside_comfyui_names_every_file_and_set_key_target(inside_comfyui):
    comfy_file, xdg_file, env = inside_comfyui
    with pytest.raises(ConfigurationError) as info:
        load_settings(environ=env)
    msg = str(info.value)
    assert f"{comfy_file} (ComfyUI's user directory): does not exist" in msg
    assert f"{xdg_file}: does not exist" in msg
    assert f"run `flux-schnell set-key` in a shell: it stores it in {xdg_file}" in msg
    assert "IMAGEAPI_API_KEY" in msg
    assert "before starting ComfyUI" in msg
    assert "No restart is needed" in msg


def test_missing_key_when_an_earlier_file_hides_the_key(inside_comfyui):
    comfy_file, xdg_file, env = inside_comfyui
    write(comfy_file, {"send_seed": True})
    write(xdg_file, {"api_key": "sk_from_xdg"})
    with pytest.raises(ConfigurationError) as info:
        load_settings(environ=env)
    msg = str(info.value)
    assert f"{comfy_file} (ComfyUI's user directory): read, has no api_key" in msg
    assert f"{xdg_file}: not read (only the first file that exists is used)" in msg
    # set-key from a shell would write the XDG file, which is not read: say how to reach this one.
    assert f"set IMAGEAPI_CONFIG={comfy_file} and run `flux-schnell set-key`" in msg
    assert "sk_from_xdg" not in msg


def test_config_search_paths(inside_comfyui, tmp_path, monkeypatch):
    comfy_file, xdg_file, env = inside_comfyui
    assert config_search_paths(env) == [comfy_file, xdg_file]
    assert config_search_paths({**env, "IMAGEAPI_CONFIG": str(tmp_path / "c.json")}) == [tmp_path / "c.json"]
    monkeypatch.setattr(comfy_bridge, "user_directory", lambda: None)
    assert config_search_paths(env) == [xdg_file]
    assert shell_config_path(env) == xdg_file


def test_config_inside_package_folder_refused():
    inside = Path(settings_mod.__file__).parent / "config.json"
    with pytest.raises(ConfigurationError, match="inside the package folder"):
        default_config_path({"IMAGEAPI_CONFIG": str(inside)})


# --- save_api_key ---------------------------------------------------------------------------------


def test_save_key_creates_private_file_and_keeps_fields(cfg):
    write(cfg, {"api_key": "sk_old", "send_seed": True})
    cfg.chmod(0o644)
    assert save_api_key(KEY, cfg) == cfg
    assert stat.S_IMODE(cfg.stat().st_mode) == 0o600
    assert json.loads(cfg.read_text()) == {"api_key": KEY, "send_seed": True}
    assert [p.name for p in cfg.parent.iterdir()] == ["config.json"]  # no temp file left
    s = load_settings(cfg, environ={})
    assert (s.api_key, s.send_seed) == (KEY, True)


def test_save_key_new_file_and_folder(tmp_path):
    path = tmp_path / "a" / "b" / "config.json"
    save_api_key(KEY, path)
    assert json.loads(path.read_text()) == {"api_key": KEY}
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    if os.name == "posix":
        assert stat.S_IMODE(path.parent.stat().st_mode) & 0o077 == 0


def test_save_key_replaces_atomically(cfg, monkeypatch):
    write(cfg, {"api_key": "sk_old"})
    seen = []
    real_replace = os.replace

    def spy(src, dst):
        seen.append((Path(src).parent, Path(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(settings_mod.os, "replace", spy)
    save_api_key(KEY, cfg)
    assert seen == [(cfg.parent, cfg)]


@pytest.mark.parametrize("bad_key", ["", "sk a", "sk\n"])
def test_save_key_refuses_bad_key_and_keeps_file(cfg, bad_key):
    write(cfg, {"api_key": "sk_old"})
    with pytest.raises(ConfigurationError):
        save_api_key(bad_key, cfg)
    assert json.loads(cfg.read_text()) == {"api_key": "sk_old"}


def test_save_key_does_not_overwrite_broken_file(cfg):
    write(cfg, "{not json")
    with pytest.raises(ConfigurationError, match="not valid JSON"):
        save_api_key(KEY, cfg)
    assert cfg.read_text() == "{not json"


def test_settings_are_reread_each_time(cfg):
    save_api_key("sk_first", cfg)
    assert load_settings(cfg, environ={}).api_key == "sk_first"
    save_api_key("sk_second", cfg)
    assert load_settings(cfg, environ={}).api_key == "sk_second"


# --- issue 15: bounds (9), billed retries off by default (10), key in the URL (20), config mode (21) --


@pytest.mark.parametrize("field", ["request_timeout_s", "deadline_s", "min_call_s"])
def test_time_limits_past_their_bound_are_refused_naming_the_field_and_file(cfg, field):
    write(cfg, {"api_key": KEY, field: 1e10})
    os.chmod(cfg, 0o600)
    with pytest.raises(ConfigurationError) as info:
        load_settings(cfg, environ={})
    assert field in str(info.value)
    assert str(cfg) in str(info.value)


def test_billed_retries_are_off_unless_opted_in(cfg):
    write(cfg, {"api_key": KEY})
    os.chmod(cfg, 0o600)
    assert load_settings(cfg, environ={}).max_billed_retries == 0


@pytest.mark.parametrize("where", ["path", "fragment of it"])
def test_a_base_url_holding_the_key_is_refused_without_echoing_it(cfg, where):
    key = "sk_live_Q7vX2mN9pR4tW8yB3cF6hJ1kL5zD0a"
    part = key if where == "path" else key[3:20]
    with pytest.raises(ConfigurationError) as info:
        load_settings(
            cfg, environ={"IMAGEAPI_API_KEY": key, "IMAGEAPI_BASE_URL": f"https://gw.example.com/{part}"}
        )
    assert "IMAGEAPI_BASE_URL" in str(info.value)
    assert key[3:15] not in str(info.value)


@pytest.mark.skipif(os.name != "posix", reason="file modes")
@pytest.mark.parametrize("mode", [0o666, 0o620, 0o602])
def test_a_config_file_others_can_change_is_refused_naming_the_file_and_the_chmod(cfg, mode):
    write(cfg, {"base_url": "https://elsewhere.example.com"})
    os.chmod(cfg, mode)
    with pytest.raises(ConfigurationError) as info:
        load_settings(cfg, environ={"IMAGEAPI_API_KEY": KEY})
    assert str(cfg) in str(info.value)
    assert f"chmod go-w {cfg}" in str(info.value)
    os.chmod(cfg, 0o644)
    assert load_settings(cfg, environ={"IMAGEAPI_API_KEY": KEY}).base_url == "https://elsewhere.example.com"


@pytest.mark.parametrize(
    ("env", "config", "expected_source"),
    [
        (
            {"IMAGEAPI_BASE_URL": "http://127.0.0.1:9"},
            {"base_url": "https://a.example.com"},
            "IMAGEAPI_BASE_URL",
        ),
        ({}, {"base_url": "https://a.example.com"}, "base_url in the config file"),
        ({}, {}, "the default base URL"),
    ],
)
def test_settings_record_where_the_base_url_was_set(cfg, env, config, expected_source):
    write(cfg, {"api_key": KEY, **config})
    os.chmod(cfg, 0o600)
    settings = load_settings(cfg, environ=env)
    assert expected_source in settings.base_url_source
    if config:
        assert expected_source.startswith("IMAGEAPI") or str(cfg) in settings.base_url_source


def test_describe_settings_lists_every_setting_with_its_source_with_or_without_a_key(cfg):
    from comfyui_flux_schnell.api.settings import describe_settings

    write(cfg, {"deadline_s": 50, "max_billed_retries": 1})
    os.chmod(cfg, 0o600)
    lines = {
        line.name: line
        for line in describe_settings(cfg, environ={"IMAGEAPI_BASE_URL": "https://b.example.com"})
    }
    assert set(lines) >= {
        "api_key",
        "base_url",
        "request_timeout_s",
        "deadline_s",
        "max_billed_retries",
        "min_call_s",
    }
    assert lines["api_key"].value == "not set"
    assert (lines["base_url"].value, lines["base_url"].source) == (
        "https://b.example.com",
        "environment variable IMAGEAPI_BASE_URL",
    )
    assert (lines["deadline_s"].value, lines["deadline_s"].source) == ("50", f"config file {cfg}")
    assert (lines["request_timeout_s"].value, lines["request_timeout_s"].source) == ("120.0", "the default")
    secret = "sk_live_Q7vX2mN9pR4tW8yB3cF6hJ1kL5zD0a"
    lines = {line.name: line for line in describe_settings(cfg, environ={"IMAGEAPI_API_KEY": secret})}
    assert lines["api_key"].value == "set"
    assert lines["api_key"].source == "environment variable IMAGEAPI_API_KEY"
    assert all(secret not in f"{x.value} {x.source}" for x in lines.values())
