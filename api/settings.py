"""Configuration of the hosted-API backend: where the API key, base URL and retry limits come from.

Read again on every run (`load_settings()`), so a key set while ComfyUI runs takes effect without a
restart. Sources, first match wins: the environment (`IMAGEAPI_API_KEY`, then `IMAGEAPI_KEY`, the
name the service's own docs use; `IMAGEAPI_BASE_URL`), then one JSON config file outside the
package folder: the first that exists of `$IMAGEAPI_CONFIG` (the only one looked at when set),
ComfyUI's user directory (inside ComfyUI) and the XDG config directory, where `flux-schnell
set-key` run from a shell writes. Based on the service's public docs
(https://imageapi.org); the key is never printed, logged or put in an error message.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import math
import os
import stat
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from urllib.parse import urlsplit

from ..errors import ConfigurationError
from .redact import cut_url, hidden_parts, holds_key, scrub

ENV_KEY_NAMES = (
    "IMAGEAPI_API_KEY",
    "IMAGEAPI_KEY",
)  # the second is the name the service's docs use
ENV_BASE_URL = "IMAGEAPI_BASE_URL"
ENV_CONFIG = "IMAGEAPI_CONFIG"
DEFAULT_BASE_URL = "https://imageapi.org"
KEY_HELP = "imageapi.org → Dashboard → API Keys"
SET_KEY_COMMAND = "flux-schnell set-key"
SET_KEY_SOURCE = "set-key's input (stdin or the hidden prompt)"
COMFY_SUBDIR = "flux_schnell"
XDG_SUBDIR = "comfyui-flux-schnell"
CONFIG_NAME = "config.json"

# Config-file fields other than the key, and the type each must have.
_CONFIG_FIELDS: dict[str, type | tuple[type, ...]] = {
    "base_url": str,
    "send_seed": bool,
    "max_billed_retries": int,
    "request_timeout_s": (int, float),
    "deadline_s": (int, float),
    "min_call_s": (int, float),
    "max_images_per_run": int,
    "price_per_image": (int, float),
}
_ALLOWED_KEYS = ("api_key", *_CONFIG_FIELDS)
# Upper bounds of the time limits: past them a socket timeout overflows (1e10 s) after the paid
# POST went out; nobody waits an hour for one call or a day for one image.
MAX_REQUEST_TIMEOUT_S = 3600.0
MAX_DEADLINE_S = 86400.0
DEFAULT_SOURCE = "the default"
_PACKAGE_DIR = Path(__file__).resolve().parent

log = logging.getLogger("flux_schnell.settings")


@dataclass(frozen=True)
class ApiSettings:
    """Everything the API client needs for one run. `api_key` is left out of repr/str."""

    base_url: str
    api_key: str = field(repr=False)
    key_source: str  # where the key was read from, for messages: never the key itself
    send_seed: bool = False  # `seed` is not a documented field: opt-in
    request_timeout_s: float = 120.0  # one HTTP call (the service's examples wait 120 s)
    deadline_s: float = 300.0  # one image, retries and waits included
    min_call_s: float = 30.0  # a call is only retried with this long left (capped by the timeout)
    max_billed_retries: int = 0  # retries of calls that may already be billed: only when opted in
    max_free_retries: int = 4  # retries of calls that certainly did no work
    max_images_per_run: int | None = None  # spend guard: a run planning more paid images is refused
    price_per_image: float | None = None  # for estimates in --dry-run, the summary and `info`
    max_download_bytes: int = 64 * 2**20
    max_image_pixels: int = 4096 * 4096
    # Finer knobs (not in the config file); tests shrink them.
    connect_timeout_s: float = 10.0
    download_timeout_s: float = 60.0
    backoff_base_s: float = 1.0  # first wait of the exponential backoff
    backoff_max_s: float = 20.0
    poll_interval_s: float = 1.0  # asynchronous jobs: wait between status polls
    # Where the base URL was set, for messages: "environment variable IMAGEAPI_BASE_URL",
    # "base_url in the config file PATH" or "the default base URL".
    base_url_source: str = "the settings given in code"

    def __post_init__(self) -> None:
        object.__setattr__(self, "base_url", check_base_url(self.base_url, self.base_url_source))
        check_api_key(self.api_key, self.key_source)
        if holds_key(self.base_url, self.api_key):  # a gateway-style URL would log and send it
            raise ConfigurationError(
                f"the base URL from {self.base_url_source} holds the API key (or part of it); "
                f"the key is sent in a header, never in the URL: set the base URL to the service's "
                f"address only (like {DEFAULT_BASE_URL}) and the key separately ({ENV_KEY_NAMES[0]})."
            )
        for name in (
            "request_timeout_s",
            "deadline_s",
            "min_call_s",
            "connect_timeout_s",
            "download_timeout_s",
            "backoff_max_s",
            "poll_interval_s",
        ):
            _check_number(name, getattr(self, name), minimum=0.0, strict=True)
        for name, most in (
            ("request_timeout_s", MAX_REQUEST_TIMEOUT_S),
            ("min_call_s", MAX_REQUEST_TIMEOUT_S),
            ("deadline_s", MAX_DEADLINE_S),
        ):
            if getattr(self, name) > most:
                raise ConfigurationError(
                    f"{name} must be a number greater than 0 and at most {most:g} seconds; got "
                    f"{getattr(self, name)!r}."
                )
        _check_number("backoff_base_s", self.backoff_base_s, minimum=0.0, strict=False)
        for name in ("max_billed_retries", "max_free_retries"):
            _check_int(name, getattr(self, name), minimum=0)
        for name in ("max_download_bytes", "max_image_pixels"):
            _check_int(name, getattr(self, name), minimum=1)
        if self.max_images_per_run is not None:
            _check_int("max_images_per_run", self.max_images_per_run, minimum=1)
        if self.price_per_image is not None:
            _check_number("price_per_image", self.price_per_image, minimum=0.0, strict=False)
        if not isinstance(self.send_seed, bool):
            raise ConfigurationError(f"send_seed must be true or false; got {self.send_seed!r}.")


def default_config_path(environ: Mapping[str, str] | None = None) -> Path:
    """Where `save_api_key` writes: `$IMAGEAPI_CONFIG`, else ComfyUI's user directory (inside
    ComfyUI), else the XDG config directory."""
    environ = os.environ if environ is None else environ
    return _explicit_config(environ) or _comfy_config() or _xdg_config(environ)


def shell_config_path(environ: Mapping[str, str] | None = None) -> Path:
    """Where `flux-schnell set-key` run from a shell (outside ComfyUI) writes: `$IMAGEAPI_CONFIG`,
    else the XDG config file."""
    environ = os.environ if environ is None else environ
    return _explicit_config(environ) or _xdg_config(environ)


def config_search_paths(environ: Mapping[str, str] | None = None) -> list[Path]:
    """The config files `load_settings` looks at, in order; the first that exists is read, alone.
    `$IMAGEAPI_CONFIG` only, when set; else ComfyUI's user-directory file (inside ComfyUI), then
    the XDG file (where `flux-schnell set-key` from a shell writes)."""
    environ = os.environ if environ is None else environ
    explicit = _explicit_config(environ)
    if explicit is not None:
        return [explicit]
    comfy = _comfy_config()
    return [comfy, _xdg_config(environ)] if comfy is not None else [_xdg_config(environ)]


@dataclass(frozen=True)
class _Found:
    """What the environment and the config file say, before any check of the key."""

    looked: list[Path]  # the config files looked at, in order
    path: Path | None  # the one read (the first that exists), if any
    config: dict
    api_key: object
    key_source: str | None
    base_url: str
    base_url_source: str


def _gather(config_path: Path | None, environ: Mapping[str, str]) -> _Found:
    looked = [Path(config_path)] if config_path is not None else config_search_paths(environ)
    path, config = None, {}
    for candidate in looked:
        found = _read_config_if_any(candidate)
        if found is not None:
            path, config = candidate, found
            break
    api_key, key_source = None, None
    for name in ENV_KEY_NAMES:
        if name in environ:
            api_key, key_source = environ[name], f"environment variable {name}"
            break
    if api_key is None and "api_key" in config:
        api_key, key_source = config["api_key"], f"config file {path}"
    base_url, base_source = DEFAULT_BASE_URL, "the default base URL"
    if environ.get(ENV_BASE_URL, "").strip():
        base_url, base_source = environ[ENV_BASE_URL].strip(), f"environment variable {ENV_BASE_URL}"
    elif "base_url" in config:
        base_url, base_source = config["base_url"], f"base_url in the config file {path}"
    return _Found(looked, path, config, api_key, key_source, base_url, base_source)


def load_settings(config_path: Path | None = None, environ: Mapping[str, str] | None = None) -> ApiSettings:
    """Read the key, base URL and limits from the environment and the config file: `config_path`
    when given, else the first that exists of `config_search_paths()`."""
    environ = os.environ if environ is None else environ
    found = _gather(config_path, environ)
    path, api_key, key_source = found.path, found.api_key, found.key_source
    if api_key is not None and key_source is not None and key_source.startswith("config file"):
        if not isinstance(api_key, str):
            raise ConfigurationError(
                f'api_key in the config file {path} must be a string ("sk_..."); got a '
                f"{type(api_key).__name__}."
            )
        _warn_if_readable_by_others(path)
    if api_key is None or key_source is None:
        raise ConfigurationError(missing_key_message(found.looked, path, environ))
    base_url = check_base_url(found.base_url, found.base_url_source)
    check_api_key(api_key, key_source)
    config = found.config
    options = {name: config[name] for name in _CONFIG_FIELDS if name in config and name != "base_url"}
    try:
        return ApiSettings(
            base_url=base_url,
            api_key=api_key,
            key_source=key_source,
            base_url_source=found.base_url_source,
            **options,
        )
    except ConfigurationError as e:  # key and base URL are checked: the file's options are wrong
        if path is None or not options:
            raise
        raise ConfigurationError(f"{e} Fix it in the config file {path}.") from e


@dataclass(frozen=True)
class SettingLine:
    """One setting as `flux-schnell config` shows it: its name, its value (the key only as "set"
    or "not set"), and where it came from (an environment variable, a config file, the default)."""

    name: str
    value: str
    source: str


def describe_settings(
    config_path: Path | None = None, environ: Mapping[str, str] | None = None
) -> list[SettingLine]:
    """Every setting with its value and its source, whether a key is set or not. Values from the
    environment or a file pass through `scrub(..., key_like=True)`; the key itself is never shown."""
    environ = os.environ if environ is None else environ
    found = _gather(config_path, environ)
    file_source = f"config file {found.path}"
    key = "set" if isinstance(found.api_key, str) and found.api_key.strip() else "not set"
    lines = [
        SettingLine("api_key", key, found.key_source or "none of the places below"),
        SettingLine("base_url", str(found.base_url).rstrip("/"), found.base_url_source),
    ]
    defaults = {f.name: f.default for f in fields(ApiSettings)}
    for name in _CONFIG_FIELDS:
        if name == "base_url":
            continue
        if name in found.config:
            lines.append(SettingLine(name, json.dumps(found.config[name]), file_source))
        else:
            lines.append(SettingLine(name, json.dumps(defaults[name]), DEFAULT_SOURCE))
    return [SettingLine(x.name, scrub(x.value, key_like=True), scrub(x.source, key_like=True)) for x in lines]


def missing_key_message(
    looked: Sequence[Path], read: Path | None, environ: Mapping[str, str] | None = None
) -> str:
    """What was looked at (`looked`, of which `read` was the file read, if any) and every way to set
    a key, with where `flux-schnell set-key` from a shell would store it."""
    environ = os.environ if environ is None else environ
    names = " or ".join(ENV_KEY_NAMES)
    explicit = _explicit_config(environ)
    comfy = _comfy_config()
    lines = [
        "No ImageAPI key is set, so backend 'api' cannot run. Looked for it in:",
        f"  - the environment variables {', '.join(ENV_KEY_NAMES)}: not set.",
    ]
    seen_read = False
    for path in looked:
        if path == explicit:
            label = f"{path} (named by {ENV_CONFIG}; no other file is looked at)"
        elif path == comfy:
            label = f"{path} (ComfyUI's user directory)"
        else:
            label = str(path)
        if path == read:
            state, seen_read = "read, has no api_key", True
        elif seen_read:
            state = "not read (only the first file that exists is used)"
        else:
            state = "does not exist"
        lines.append(f"  - the config file {label}: {state}.")
    shell_target = shell_config_path(environ)
    # The file a key must go into to be read here: the one read, else where set-key writes (when
    # that is looked at), else the first looked at.
    target = read or (shell_target if shell_target in looked else looked[0])
    stores = f"it stores it in {target}, readable by you only"
    if target == shell_target:
        same = f" with the same {ENV_CONFIG}" if explicit is not None else ""
        set_key = f"run `{SET_KEY_COMMAND}` in a shell{same}: {stores};"
    else:
        set_key = (
            f"set {ENV_CONFIG}={target} and run `{SET_KEY_COMMAND}` in a shell: {stores} "
            f"(without {ENV_CONFIG} it would write {shell_target}, which is not read here);"
        )
    in_comfyui = _comfy_config() is not None  # ComfyUI's user directory is known
    lines += [
        "Set one in any of these ways:",
        f"  - the environment variable {names} (for example `export {ENV_KEY_NAMES[0]}=sk_...` "
        + ("before starting ComfyUI);" if in_comfyui else "in the shell that runs flux-schnell);"),
        f"  - {set_key}",
        f'  - write {{"api_key": "sk_..."}} into {target} yourself.',
        f"Get a key at {KEY_HELP}. "
        + (
            "No restart is needed: the key is read on every run."
            if in_comfyui
            else "It is read on every run."
        ),
    ]
    return scrub("\n".join(lines), key_like=True)  # the paths come from the environment


def save_api_key(api_key: str, config_path: Path | None = None) -> Path:
    """Store the key in the config file (mode 0600, atomic replace, other fields kept)."""
    path = Path(config_path) if config_path is not None else default_config_path()
    check_api_key(api_key, SET_KEY_SOURCE)
    config = _read_config(path)
    config["api_key"] = api_key
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=".config-", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise ConfigurationError(
            f"cannot create the config file in {path.parent}: {e.strerror}; set {ENV_CONFIG} to "
            "a writable path."
        ) from e
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except OSError as e:
        Path(tmp_name).unlink(missing_ok=True)
        raise ConfigurationError(f"cannot write the config file {path}: {e.strerror}.") from e
    return path


def check_api_key(api_key: object, source: str) -> None:
    """Refuse an empty key or one with spaces or control characters, without echoing it."""
    if not isinstance(api_key, str) or not api_key.strip():
        raise ConfigurationError(
            f"the API key from {source} is empty. Get a key at {KEY_HELP}"
            + ("." if source == SET_KEY_SOURCE else f" and set it (for example with `{SET_KEY_COMMAND}`).")
        )
    if any(ch.isspace() or not ch.isprintable() or ord(ch) > 126 for ch in api_key):
        raise ConfigurationError(
            f"the API key from {source} contains a space, line break, control or non-ASCII "
            "character, which no key has (a copy-and-paste accident?). Copy it again from "
            f"{KEY_HELP}."
        )


def check_base_url(url: object, source: str) -> str:
    """An http(s) URL with a host; plain http only to this machine. Returned without a final /."""
    if not isinstance(url, str) or not url.strip():
        raise ConfigurationError(f"the base URL from {source} is empty; the default is {DEFAULT_BASE_URL}.")
    url = url.strip().rstrip("/")
    # What an error may echo: no user name, password, query, fragment, or anything like a key.
    shown = scrub(cut_url(url), key_like=True)
    try:
        parts = urlsplit(url)
        host = parts.hostname
        _ = parts.port  # raises ValueError for a bad port
    except ValueError as e:
        raise ConfigurationError(
            f"the base URL {shown!r} from {source} is malformed: "
            f"{scrub(_safe_reason(e, url), key_like=True)}."
        ) from None  # the ValueError may quote the whole URL
    if parts.scheme not in ("http", "https") or not host:
        raise ConfigurationError(
            f"the base URL {shown!r} from {source} must start with https:// and name a host, like "
            f"{DEFAULT_BASE_URL}."
        )
    if parts.username is not None or parts.password is not None:
        raise ConfigurationError(
            f"the base URL from {source} must not contain a user name or password; the API key is "
            f"set separately ({ENV_KEY_NAMES[0]})."
        )
    if parts.query or parts.fragment:
        raise ConfigurationError(
            f"the base URL {shown} from {source} must not have a query (?...) or fragment (#...)."
        )
    if parts.scheme == "http" and not is_loopback_host(host):
        raise ConfigurationError(
            f"the base URL {shown!r} from {source} uses plain http:// to another machine, which "
            "would send the API key unencrypted; use https:// (plain http is allowed only for "
            "localhost)."
        )
    return url


def _safe_reason(error: ValueError, url: str) -> str:
    """The ValueError's reason, or a plain one when it quotes a part of `url` not to be shown."""
    reason = str(error)
    userinfo, query, fragment = hidden_parts(url)
    hidden = [userinfo, *userinfo.split(":"), query, fragment]
    if any(piece and piece in reason for piece in hidden):
        return "the host or the port cannot be read"
    return reason


def is_loopback_host(host: str) -> bool:
    """True for localhost, 127.0.0.0/8 and ::1."""
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _explicit_config(environ: Mapping[str, str]) -> Path | None:
    explicit = environ.get(ENV_CONFIG, "").strip()
    return _outside_package(Path(explicit).expanduser()) if explicit else None


def _comfy_config() -> Path | None:
    from .. import comfy_bridge

    user_dir = comfy_bridge.user_directory()
    return _outside_package(Path(user_dir) / COMFY_SUBDIR / CONFIG_NAME) if user_dir else None


def _xdg_config(environ: Mapping[str, str]) -> Path:
    xdg = environ.get("XDG_CONFIG_HOME", "").strip()
    base = Path(xdg).expanduser() if xdg else Path.home() / ".config"
    return _outside_package(base / XDG_SUBDIR / CONFIG_NAME)


def _outside_package(path: Path) -> Path:
    """`path` made absolute; refused when inside the package folder."""
    path = path.absolute()
    if _is_inside(path, _PACKAGE_DIR):
        raise ConfigurationError(
            f"the config file {path} would be inside the package folder {_PACKAGE_DIR}, where an "
            "update or a copy of the folder would lose or publish the API key; point "
            f"{ENV_CONFIG} at a file outside it."
        )
    return path


def _read_config(path: Path) -> dict:
    """The config file's JSON object, {} when the file does not exist."""
    config = _read_config_if_any(path)
    return {} if config is None else config


def _read_config_if_any(path: Path) -> dict | None:
    """The config file's JSON object, None when the file does not exist."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) else "not UTF-8 text"
        raise ConfigurationError(f"cannot read the config file {path}: {reason}.") from e
    _refuse_if_writable_by_others(path)
    try:
        config = json.loads(text)
    except json.JSONDecodeError as e:
        # e.msg names the problem ("Expecting ','"), never the file's content.
        problem = f"{e.msg} at line {e.lineno}, column {e.colno}"
    else:
        problem = None
    if problem is not None:  # raised outside the except: the JSONDecodeError holds the key
        raise ConfigurationError(
            f"the config file {path} is not valid JSON: {problem}. Fix it or delete it and run "
            f"`{SET_KEY_COMMAND}`."
        )
    if not isinstance(config, dict):
        raise ConfigurationError(
            f'the config file {path} must hold a JSON object like {{"api_key": "sk_..."}}; '
            f"found a {type(config).__name__}."
        )
    unknown = sorted(k for k in config if k not in _ALLOWED_KEYS)
    if unknown:
        raise ConfigurationError(
            f"the config file {path} has unknown field(s) {', '.join(map(repr, unknown))}; "
            f"allowed: {', '.join(_ALLOWED_KEYS)}."
        )
    for name, kind in _CONFIG_FIELDS.items():
        value = config.get(name)
        if name in config and ((isinstance(value, bool) and kind is not bool) or not isinstance(value, kind)):
            raise ConfigurationError(
                f"{name} in the config file {path} must be a {_kind_name(kind)}; got {value!r}."
            )
    return config


def _warn_if_readable_by_others(path: Path) -> None:
    mode = _mode(path)
    if mode is not None and mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning(
            "The config file %s holding the API key can be read by other users (mode %o); "
            "run `chmod 600 %s`.",
            path,
            mode,
            path,
        )


def _refuse_if_writable_by_others(path: Path) -> None:
    """A config file that others can change decides where the key is sent (`base_url`): refused,
    as ssh refuses such a config."""
    mode = _mode(path)
    if mode is not None and mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ConfigurationError(
            f"the config file {path} can be changed by other users (mode {mode:o}), so they could "
            f"choose where the API key is sent; run `chmod go-w {path}` (or `chmod 600 {path}`)."
        )


def _mode(path: Path) -> int | None:
    if os.name != "posix":
        return None
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return None


def _is_inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder)
    except ValueError:
        return False
    return True


def _kind_name(kind: type | tuple[type, ...]) -> str:
    if kind is bool:
        return "true or false"
    if kind is int:
        return "whole number"
    if kind is str:
        return "string"
    return "number"


def _check_number(name: str, value: object, *, minimum: float, strict: bool) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < minimum or (strict and value <= minimum):
        relation = "greater than" if strict else "at least"
        raise ConfigurationError(f"{name} must be a number {relation} {minimum:g}; got {value!r}.")


def _check_int(name: str, value: object, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigurationError(f"{name} must be a whole number of at least {minimum}; got {value!r}.")
