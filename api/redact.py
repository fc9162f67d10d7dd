"""Keeping secrets out of text: the API key, URLs' queries and user info, and urllib3's log lines.

One verb for taking the key out of text: `scrub(text, key)` replaces the key, and every run of
`MIN_KEY_FRAGMENT` or more consecutive characters of it, by ***; with `key_like=True` it also
replaces anything that looks like a key (for values from the environment or a config file, where
the key is not known). Scrub first, then cut: callers that shorten text (server messages, ids, key
names) scrub the whole text before cutting it, so no piece of a key a cut would split survives.

Signed download URLs carry tokens in their query (`?token=...`, `X-Amz-Signature=...`) and a base
URL may carry a user name and password; none of that may reach a message, a log record at any level
or an exception chain that ComfyUI prints with a traceback. Here: `cut_url` (one URL without user
info, query and fragment, by plain string cuts so that it works on URLs `urlsplit` refuses; the only
place a URL is cut), `cut_urls` (every URL in a free text), `hidden_parts` (what `cut_url` drops),
`safe_cause` (a library's exception replaced by a plain one holding its type and scrubbed text, so
that `__cause__` carries no URL), and a logging filter for urllib3's loggers, which log each request
line (with its path and query) at DEBUG. Based on urllib3's public logging calls
(https://github.com/urllib3/urllib3, `connectionpool.py`, `poolmanager.py`, `util/retry.py`).
"""

from __future__ import annotations

import logging
import re
import threading

MIN_KEY_FRAGMENT = 12  # a run of this many characters of the key is taken out of text like the key
MASK = "***"

# A URL (scheme://...) or an absolute path (/...), up to whitespace, a quote or an angle bracket.
_URLISH = re.compile(r"""(?:[A-Za-z][A-Za-z0-9+.\-]*://|(?<![\w.])/)[^\s"'<>]*""")
# What an API key looks like when pasted where it does not belong (a base URL, a path): "sk_..." and
# the like, or a run of 40 or more letters and digits mixed (a random token; folder names have
# separators).
_KEY_LIKE = re.compile(
    r"\b(?:sk|pk|rk)[_-][A-Za-z0-9_\-]{6,}"
    r"|(?<![A-Za-z0-9])(?=[A-Za-z0-9]*\d)(?=[A-Za-z0-9]*[A-Za-z])[A-Za-z0-9]{40,}"
)
# The loggers of urllib3 that log URLs (a logger's filters only see its own records).
URLLIB3_LOGGERS = (
    "urllib3",
    "urllib3.connectionpool",
    "urllib3.connection",
    "urllib3.poolmanager",
    "urllib3.response",
    "urllib3.util.retry",
)


def scrub(text: str, key: str | None = None, *, key_like: bool = False) -> str:
    """`text` with `key` and every run of `MIN_KEY_FRAGMENT`+ of its characters replaced by ***;
    with `key_like`, also anything that looks like an API key."""
    if key:
        text = _without_key(text, key)
    if key_like:
        text = _KEY_LIKE.sub(MASK, text)
    return text


def holds_key(text: str, key: str | None) -> bool:
    """Whether `text` holds `key` or a run of `MIN_KEY_FRAGMENT`+ of its characters."""
    return bool(key) and scrub(text, key) != text


def _without_key(text: str, key: str) -> str:
    if key in text:
        text = text.replace(key, MASK)
    n = MIN_KEY_FRAGMENT
    if len(key) <= n:
        return text
    spans: list[tuple[int, int]] = []
    for piece in {key[i : i + n] for i in range(len(key) - n + 1)}:
        start = text.find(piece)
        while start != -1:
            spans.append((start, start + n))
            start = text.find(piece, start + 1)
    if not spans:
        return text
    spans.sort()
    out, at = [], 0
    merged_start, merged_end = spans[0]
    for start, end in [*spans[1:], (len(text) + 1, len(text) + 1)]:
        if start <= merged_end:  # overlapping or touching runs make one masked span
            merged_end = max(merged_end, end)
            continue
        out += [text[at:merged_start], MASK]
        at = merged_end
        merged_start, merged_end = start, end
    out.append(text[at:])
    return "".join(out)


def hidden_parts(url: str) -> tuple[str, str, str]:
    """(user info, query, fragment) of `url`, by plain string cuts: what `cut_url` drops."""
    rest, _, fragment = url.partition("#")
    head, _, query = rest.partition("?")
    after_scheme = head.partition("://")[2] if "://" in head else head
    userinfo = after_scheme.partition("/")[0].rpartition("@")[0]
    return userinfo, query, fragment


def cut_url(url: str) -> str:
    """`url` (one URL or path, with or without a scheme) without its user info, query and fragment."""
    head = re.split(r"[?#]", url, maxsplit=1)[0]
    scheme, sep, rest = head.partition("://")
    if not sep:
        scheme, rest = "", head
    netloc, slash, path = rest.partition("/")
    return f"{scheme}{sep}{netloc.rpartition('@')[2]}{slash}{path}"


def cut_urls(text: str) -> str:
    """`text` with every URL or path in it cut by `cut_url`."""
    return _URLISH.sub(lambda m: cut_url(m.group(0)), text)


class TransportCause(Exception):
    """Stands in for a library's exception in a chain: its type and redacted message only."""


def safe_cause(error: BaseException, key: str | None = None) -> TransportCause:
    """A plain exception naming `error`'s type, with its URLs cut and `key` scrubbed. Used as
    `__cause__` instead of `error`, which may hold a URL."""
    text = scrub(cut_urls(str(error)), key)
    name = f"{type(error).__module__}.{type(error).__qualname__}"
    return TransportCause(f"{name}: {text}" if text else name)


class RedactUrls(logging.Filter):
    """Rewrites a record's message with its URLs cut and the known keys scrubbed (the arguments
    merged in first). urllib3 logs a request's path, where a gateway-style URL may hold the key."""

    def __init__(self) -> None:
        super().__init__()
        self._keys: set[str] = set()
        self._lock = threading.Lock()

    def add_key(self, key: str) -> None:
        with self._lock:
            self._keys.add(key)

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except (TypeError, ValueError):  # a malformed record: leave it to the handler's error path
            return True
        clean = cut_urls(message)
        with self._lock:
            keys = list(self._keys)
        for key in keys:
            clean = scrub(clean, key)
        if clean != message:
            record.msg, record.args = clean, None
        return True


_FILTER = RedactUrls()


def install_urllib3_redaction(key: str | None = None) -> None:
    """Put the filter on urllib3's loggers (once; more calls change nothing), and have it scrub
    `key` too."""
    if key:
        _FILTER.add_key(key)
    for name in URLLIB3_LOGGERS:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
