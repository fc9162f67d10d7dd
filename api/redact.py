"""Keeping secrets out of text: URLs without their query or user info, and urllib3's log lines.

Signed download URLs carry tokens in their query (`?token=...`, `X-Amz-Signature=...`) and a base
URL may carry a user name and password; none of that may reach a message, a log record at any level
or an exception chain that ComfyUI prints with a traceback. Here: `safe_url` (one URL made safe),
`redact_urls` (every URL in a free text made safe), `safe_cause` (a library's exception replaced by
a plain one holding its type and redacted text, so that `__cause__` carries no URL), and a logging
filter for urllib3's loggers, which log each request line (with its query) at DEBUG. Based on
urllib3's public logging calls (https://github.com/urllib3/urllib3, `connectionpool.py`,
`poolmanager.py`, `util/retry.py`).
"""

from __future__ import annotations

import logging
import re
from urllib.parse import urlsplit

# A URL (scheme://...) or an absolute path (/...), up to whitespace, a quote or an angle bracket.
_URLISH = re.compile(r"""(?:[A-Za-z][A-Za-z0-9+.\-]*://|(?<![\w.])/)[^\s"'<>]*""")
# The loggers of urllib3 that log URLs (a logger's filters only see its own records).
URLLIB3_LOGGERS = (
    "urllib3",
    "urllib3.connectionpool",
    "urllib3.connection",
    "urllib3.poolmanager",
    "urllib3.response",
    "urllib3.util.retry",
)


def safe_url(url: str) -> str:
    """A URL without its user info, query and fragment."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        netloc = f"{host}:{parts.port}" if parts.port else host
    except ValueError:  # a malformed port: cut by hand
        return _cut_url(url)
    if ":" in host:  # IPv6
        netloc = f"[{host}]:{parts.port}" if parts.port else f"[{host}]"
    return f"{parts.scheme}://{netloc}{parts.path}" if parts.scheme else parts.path


def _cut_url(text: str) -> str:
    """`text` (one URL or path) cut before its query or fragment, its user info removed."""
    text = re.split(r"[?#]", text, maxsplit=1)[0]
    scheme, sep, rest = text.partition("://")
    if sep and "@" in rest.split("/", 1)[0]:
        netloc, slash, path = rest.partition("/")
        text = f"{scheme}://{netloc.rpartition('@')[2]}{slash}{path}"
    return text


def redact_urls(text: str) -> str:
    """`text` with every URL or path in it cut before its query or fragment, without user info."""
    return _URLISH.sub(lambda m: _cut_url(m.group(0)), text)


class TransportCause(Exception):
    """Stands in for a library's exception in a chain: its type and redacted message only."""


def safe_cause(error: BaseException, scrub=None) -> TransportCause:
    """A plain exception naming `error`'s type, with its text redacted (and passed through `scrub`,
    which replaces the API key). Used as `__cause__` instead of `error`, which may hold a URL."""
    text = redact_urls(str(error))
    if scrub is not None:
        text = scrub(text)
    name = f"{type(error).__module__}.{type(error).__qualname__}"
    return TransportCause(f"{name}: {text}" if text else name)


class RedactUrls(logging.Filter):
    """Rewrites a record's message with its URLs made safe (the arguments merged in first)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except (TypeError, ValueError):  # a malformed record: leave it to the handler's error path
            return True
        safe = redact_urls(message)
        if safe != message:
            record.msg, record.args = safe, None
        return True


_FILTER = RedactUrls()


def install_urllib3_redaction() -> None:
    """Put the filter on urllib3's loggers (once; more calls change nothing)."""
    for name in URLLIB3_LOGGERS:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
