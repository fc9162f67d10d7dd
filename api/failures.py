"""What went wrong with one call to the ImageAPI, in words, and which retry it allows.

A failed call becomes a `Failure`: the error class and message to raise if it is not retried, and
its retry kind, `FREE` (the call certainly did no work: connection refused, connect timeout, 429,
503) or `BILLED` (it may have been billed: read timeout, dropped answer, 408, 500/502/504). Two
sources: an HTTP error status, read from one table (`STATUS_MEANINGS`) that says what each status
means for the paid generate call and for the never-billed GETs (job polls, downloads); and a network
failure, named by its likely cause (proxy, TLS, DNS, refused, timeout) with the fix. Based on the
service's public documentation (https://imageapi.org: Bearer keys, credits, the 8-step cap) and the
exceptions of requests/urllib3 1.x and 2.x.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import SplitResult, urljoin, urlsplit

import requests
import urllib3

from ..errors import (
    ApiError,
    ApiTimeoutError,
    AuthenticationError,
    BadRequestError,
    InsufficientCreditsError,
    NetworkError,
    RateLimitError,
    ResponseDecodeError,
    ServerError,
)
from .answer_shapes import Reply, retry_after_seconds, server_message, status_tag
from .redact import cut_url, safe_cause
from .settings import ENV_BASE_URL, KEY_HELP, SET_KEY_COMMAND

FREE, BILLED = "free", "billed"  # the two kinds of retry
GENERATE, FETCH = "generate", "fetch"  # the paid POST, and a GET (job poll, download)
RATE_LIMIT_STATUS = 429


class Failure(Exception):
    """A failed exchange: the error to raise if it is not retried, and which retry it allows.
    Its `__cause__`, when set, is a `TransportCause` (no URL), never the library's exception."""

    def __init__(
        self,
        cls: type[ApiError],
        message: str,
        *,
        reason: str,
        retry: str | None = None,
        status: int | None = None,
        request_id: str | None = None,
        retry_after: float | None = None,
        unreachable: bool = False,
    ):
        super().__init__(reason)
        self.unreachable = unreachable  # no connection was made at all (refused, DNS, connect timeout)
        self.cls, self.message, self.reason, self.retry = cls, message, reason, retry
        self.status, self.request_id, self.retry_after = status, request_id, retry_after

    def error(self, note: str, scrub: Callable[[str], str]) -> ApiError:
        """The error to raise, passed through `scrub` (which removes the key)."""
        kwargs = {"status": self.status, "request_id": self.request_id}
        if kwargs["request_id"] is not None:
            kwargs["request_id"] = scrub(kwargs["request_id"])
        if issubclass(self.cls, RateLimitError):
            kwargs["retry_after"] = self.retry_after
        return self.cls(scrub(self.message + note), **kwargs)


def attempt(call: Callable[..., Reply], *args, **kwargs) -> tuple[Reply, None] | tuple[None, Failure]:
    """Run one exchange; a failure is returned, so that the error raised for it later does not
    carry it (and the server text it holds) as its `__context__`."""
    try:
        return call(*args, **kwargs), None
    except Failure as failure:
        return None, failure


# --- HTTP error statuses --------------------------------------------------------------------------


@dataclass(frozen=True)
class StatusMeaning:
    """What one HTTP error status means.

    For the generate call: `error` and `text` (a template: {tag} is "HTTP 503 ..., request id x",
    {said} the service's own message; {target}, {key_source}, {url}, {wait} where used) and the
    retry it allows. For a GET (never billed): the retry it allows; its error is a `ServerError` for
    5xx, else a `ResponseDecodeError` (the image could not be fetched), with the GET's own text.
    """

    error: type[ApiError]
    text: str
    generate_retry: str | None = None
    fetch_retry: str | None = None
    honours_retry_after: bool = False


_FAILED = "the service failed ({tag}): {said}"
STATUS_MEANINGS: dict[int, StatusMeaning] = {
    400: StatusMeaning(BadRequestError, "the service refused the request ({tag}): {said}"),
    401: StatusMeaning(
        AuthenticationError,
        "the service refused the API key from {key_source} ({tag}): {said}. Check the key at "
        f"{KEY_HELP}, then set it again (`{SET_KEY_COMMAND}` or the environment variable)",
    ),
    402: StatusMeaning(
        InsufficientCreditsError,
        "the ImageAPI account has no credits left ({tag}): {said}. Top up or change the plan at "
        "imageapi.org → Dashboard",
    ),
    404: StatusMeaning(
        ApiError,
        f"{{url}} does not exist ({{tag}}): check the base URL ({ENV_BASE_URL} or base_url in the "
        "config file); the service's own is https://imageapi.org",
    ),
    # The service or a proxy before it gave up: the work may have been done.
    408: StatusMeaning(
        ApiTimeoutError,
        "the service (or a proxy in front of it) timed out on the request ({tag}): {said}",
        generate_retry=BILLED,
        fetch_retry=FREE,
    ),
    RATE_LIMIT_STATUS: StatusMeaning(
        RateLimitError,
        "the service's rate limit was hit ({tag}{wait}): {said}",
        generate_retry=FREE,
        fetch_retry=FREE,
        honours_retry_after=True,
    ),
    500: StatusMeaning(ServerError, _FAILED, generate_retry=BILLED, fetch_retry=FREE),
    502: StatusMeaning(ServerError, _FAILED, generate_retry=BILLED, fetch_retry=FREE),
    503: StatusMeaning(
        ServerError,
        "the service is unavailable ({tag}): {said}",
        generate_retry=FREE,
        fetch_retry=FREE,
        honours_retry_after=True,
    ),
    504: StatusMeaning(ServerError, _FAILED, generate_retry=BILLED, fetch_retry=FREE),
}
STATUS_MEANINGS[403] = STATUS_MEANINGS[401]
STATUS_MEANINGS[422] = STATUS_MEANINGS[400]
REDIRECT = StatusMeaning(
    ApiError,
    "the service redirected the request to {target} ({tag}): set "
    f"{ENV_BASE_URL} (or base_url in the config file) to the right address",
)
OTHER_SERVER_ERROR = StatusMeaning(ServerError, _FAILED)
OTHER = StatusMeaning(ApiError, "unexpected answer from the service ({tag}): {said}")


def meaning_of(status: int) -> StatusMeaning:
    if status in STATUS_MEANINGS:
        return STATUS_MEANINGS[status]
    if 300 <= status < 400:
        return REDIRECT
    return OTHER_SERVER_ERROR if status >= 500 else OTHER


def status_failure(
    reply: Reply,
    call: str,
    *,
    request_id: str | None,
    scrub: Callable[[str], str],
    key_source: str = "",
    url: str = "",
    hint: str = "",
) -> Failure:
    """An HTTP error status as a `Failure`. `call` is GENERATE (the paid POST to `url`) or FETCH (a
    GET of `url`; `hint` is added to its message). `scrub` removes the key from server text
    (before any cut)."""
    status = reply.status
    meaning = meaning_of(status)
    tag = status_tag(status, reply.reason, request_id)
    said = server_message(reply, scrub)
    wait = retry_after_seconds(reply) if meaning.honours_retry_after else None
    common = {"status": status, "request_id": request_id, "reason": f"HTTP {status}", "retry_after": wait}
    if call == FETCH:
        return Failure(
            ServerError if status >= 500 else ResponseDecodeError,
            f"fetching {scrub(cut_url(url))} failed ({tag}){hint}: {said}",
            retry=meaning.fetch_retry,
            **common,
        )
    target = scrub(cut_url(urljoin(reply.url, reply.headers.get("Location", ""))))
    text = meaning.text.format(
        tag=tag,
        said=said,
        target=target,
        key_source=key_source,
        url=url,
        wait=f", asked to wait {wait:g} s" if wait is not None else "",
    )
    return Failure(meaning.error, text, retry=meaning.generate_retry, **common)


# --- network failures -----------------------------------------------------------------------------


def transport_failure(
    e: Exception,
    url: str,
    *,
    timeout_s: float,
    connect_timeout_s: float,
    may_bill: bool,
    sent: bool,
    key: str | None,
) -> Failure:
    """Name the likely cause of a network failure and whether a retry is safe. The failure's
    `__cause__` is a redacted stand-in for `e` (whose text holds the URL with its query)."""
    failure = _transport_failure(e, url, timeout_s, connect_timeout_s, may_bill, sent)
    failure.__cause__ = safe_cause(e, key)
    return failure


def _transport_failure(
    e: Exception, url: str, timeout_s: float, connect_timeout_s: float, may_bill: bool, sent: bool
) -> Failure:
    parts = urlsplit(url)
    host = parts.hostname or "?"
    where = f"{host}:{url_port(parts)}"
    chain = exception_chain(e)
    billed_kind = BILLED if may_bill else FREE

    def has(*types: type) -> bool:
        return any(isinstance(c, types) for c in chain)

    if isinstance(e, requests.exceptions.ProxyError) or has(urllib3.exceptions.ProxyError):
        return Failure(
            NetworkError,
            f"could not reach {where} through the configured proxy: check the HTTPS_PROXY / "
            "HTTP_PROXY (and NO_PROXY) environment variables",
            reason="proxy error",
        )
    if has(ssl.SSLCertVerificationError):
        return Failure(
            NetworkError,
            f"TLS certificate verification with {host} failed: if a company proxy or "
            "antivirus inspects HTTPS, point REQUESTS_CA_BUNDLE at its CA certificate; also "
            "check that the system clock is right",
            reason="TLS certificate not trusted",
        )
    if isinstance(e, requests.exceptions.SSLError) or has(ssl.SSLError):
        return Failure(
            NetworkError,
            f"the TLS (https) handshake with {where} failed: check that the base URL's port "
            "speaks https, and whether a proxy (HTTPS_PROXY) or REQUESTS_CA_BUNDLE setting "
            "interferes",
            reason="TLS error",
        )
    if isinstance(e, requests.exceptions.ConnectTimeout):
        return Failure(
            ApiTimeoutError,
            f"no connection to {where} within {min(connect_timeout_s, timeout_s):g} s: the "
            "service or the network is slow or down",
            reason="connect timeout",
            retry=FREE,
            unreachable=True,
        )
    if has(urllib3.exceptions.NameResolutionError, socket.gaierror):
        return Failure(
            NetworkError,
            f"the host name {host!r} could not be resolved (DNS): check the base URL "
            f"({ENV_BASE_URL} or base_url in the config file) and the network connection",
            reason="host name not resolved",
            unreachable=True,
        )
    if not sent and has(ConnectionRefusedError, urllib3.exceptions.NewConnectionError):
        return Failure(
            NetworkError,
            f"the connection to {where} was refused: the service is down or the base URL has the wrong port",
            reason="connection refused",
            retry=FREE,
            unreachable=True,
        )
    if isinstance(e, requests.exceptions.ReadTimeout) or has(
        urllib3.exceptions.ReadTimeoutError, TimeoutError
    ):
        return Failure(
            ApiTimeoutError,
            f"no complete answer from {where} within {timeout_s:g} s "
            "(request_timeout_s, or what was left of deadline_s)",
            reason=f"read timeout after {timeout_s:g} s",
            retry=billed_kind,
        )
    dropped = (
        requests.exceptions.ConnectionError,
        requests.exceptions.ChunkedEncodingError,
        urllib3.exceptions.ProtocolError,
        OSError,
    )
    if isinstance(e, dropped):
        return Failure(
            NetworkError,
            f"the connection to {where} was dropped before the answer was complete",
            reason="connection dropped mid-answer",
            retry=billed_kind,
        )
    return Failure(
        NetworkError,
        f"the request to {where} failed ({type(e).__name__})",
        reason=type(e).__name__,
    )


def default_port(scheme: str) -> int:
    """The port a URL of `scheme` (http or https) uses when it names none."""
    return 443 if scheme.lower() == "https" else 80


def url_port(parts: SplitResult) -> int:
    """The port of a split URL: its own, else its scheme's default (also for a malformed one)."""
    try:
        port = parts.port
    except ValueError:
        port = None
    return port or default_port(parts.scheme)


def exception_chain(e: BaseException) -> list[BaseException]:
    """`e` and every exception it wraps (args, `reason`, cause, context)."""
    seen: list[BaseException] = []
    todo: list[object] = [e]
    while todo and len(seen) < 32:
        item = todo.pop()
        if not isinstance(item, BaseException) or any(item is s for s in seen):
            continue
        seen.append(item)
        todo.extend(item.args)
        todo.extend([getattr(item, "reason", None), item.__cause__, item.__context__])
    return seen
