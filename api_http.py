"""HTTP for the ImageAPI client: one exchange, what went wrong with it, and never-billed GETs.

Used by api_client.py, which decides what to send and what to retry. An exchange sends one
request on a pooled `requests` session and reads the whole answer as it arrives, capped in size,
within the call's timeout and the image's deadline, checking the stop event per read. A failure is
a `Failure`: the error to raise and which retry it allows, `FREE` (the call certainly did no work:
refused connection, connect timeout) or `BILLED` (it may have: read timeout, dropped answer), named
by its likely cause (proxy, TLS, DNS, refused, timeout) and the fix. GETs (job polls, image
downloads) follow their own redirects, only to http(s) URLs, plain http only on this machine, and
send the API key only to the service's own origin (scheme, host, port), so a download URL on a CDN
never receives it. Based on the service's public documentation (https://imageapi.org) and the
behaviour of requests/urllib3 1.x and 2.x.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from urllib.parse import urljoin, urlsplit

import requests
import urllib3
from requests.adapters import HTTPAdapter

from ._version import __version__
from .api_responses import (
    Reply,
    request_id_of,
    retry_after_seconds,
    server_message,
    status_tag,
)
from .errors import (
    ApiError,
    ApiTimeoutError,
    GenerationInterrupted,
    NetworkError,
    RateLimitError,
    ResponseDecodeError,
    ServerError,
)
from .settings import ENV_BASE_URL, ApiSettings, is_loopback_host

USER_AGENT = f"comfyui-flux-schnell/{__version__} python-requests/{requests.__version__}"
POOL_SIZE = 16  # connections kept per host; >= any concurrency the node uses (MAX_BATCH)
CHUNK_BYTES = 2**20  # most a body read returns at once; the deadline and stop are checked per read
SLEEP_SLICE_S = 0.05  # waits (backoff, Retry-After, polling) wake this often to check the stop
MAX_REDIRECTS = 5  # for GETs; the generate call itself never follows redirects
FREE, BILLED = "free", "billed"  # the two kinds of retry

_URLLIB3_MAJOR = int(urllib3.__version__.split(".", 1)[0])


class Failure(Exception):
    """A failed exchange: the error to raise if it is not retried, and which retry it allows."""

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
    ):
        super().__init__(reason)
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


def sleep_unless_stopped(seconds: float, stop: threading.Event) -> None:
    """Wait in short slices; raise `GenerationInterrupted` as soon as `stop` is set."""
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        if stop.wait(min(SLEEP_SLICE_S, left)):
            raise GenerationInterrupted("stopped")
    if stop.is_set():
        raise GenerationInterrupted("stopped")


class _Bearer(requests.auth.AuthBase):
    """Sets the key on requests to the service's own origin (also stops ~/.netrc lookups)."""

    def __init__(self, api_key: str | None):
        self._key = api_key

    def __call__(self, r):
        if self._key is not None:
            r.headers["Authorization"] = f"Bearer {self._key}"
        return r

    def __repr__(self) -> str:
        return f"_Bearer({'set' if self._key else 'none'})"


class HttpTransport:
    """A pooled session that sends one request at a time per caller; thread-safe."""

    def __init__(self, settings: ApiSettings, session: requests.Session | None, logger: logging.Logger):
        self.settings = settings
        self.log = logger
        self._own_session = session is None
        if session is None:
            session = requests.Session()
            adapter = HTTPAdapter(pool_connections=4, pool_maxsize=POOL_SIZE, max_retries=0)
            session.mount("https://", adapter)
            session.mount("http://", adapter)
        self._session = session
        self.origin = origin(settings.base_url)
        self._with_key = _Bearer(settings.api_key)
        self._without_key = _Bearer(None)

    def close(self) -> None:
        if self._own_session:
            self._session.close()

    def safe(self, text: str) -> str:
        """`text` (which may come from the server) with the API key replaced by ***."""
        key = self.settings.api_key
        return text.replace(key, "***") if key and key in text else text

    def body_cap(self) -> int:
        """Most bytes a JSON answer may have: the image as base64 (4/3 of it) plus some text."""
        return self.settings.max_download_bytes * 4 // 3 + 2**20

    # --- one exchange ---------------------------------------------------------------------------

    def exchange(
        self,
        method: str,
        url: str,
        *,
        body: bytes | None,
        timeout_s: float,
        deadline: float,
        stop: threading.Event,
        cap: int,
        may_bill: bool,
    ) -> Reply:
        """Send one request and read its whole answer (streamed, capped, within the deadline).
        Nothing is sent once `stop` is set: checked right before the request goes out."""
        if stop.is_set():
            raise GenerationInterrupted("stopped")
        left = deadline - time.monotonic()
        if left <= 0:
            raise Failure(
                ApiTimeoutError,
                f"no image within the deadline of {self.settings.deadline_s:g} s per image (deadline_s)",
                reason="deadline reached",
            )
        read_timeout = min(timeout_s, left)
        connect_timeout = min(self.settings.connect_timeout_s, read_timeout)
        headers = {"User-Agent": USER_AGENT, "Accept": "application/json, image/*"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        same_origin = origin(url) == self.origin
        call_end = time.monotonic() + read_timeout  # a trickling body is cut off here too
        try:
            response = self._session.request(
                method,
                url,
                data=body,
                headers=headers,
                stream=True,
                allow_redirects=False,
                timeout=(connect_timeout, read_timeout),
                auth=self._with_key if same_origin else self._without_key,
            )
        except requests.exceptions.RequestException as e:
            raise self._transport_failure(e, url, read_timeout, may_bill, sent=False) from e
        with response:
            length = response.headers.get("Content-Length", "")
            if length.isdigit() and int(length) > cap:
                raise self._too_big(url, int(length), cap, response.status_code)
            chunks: list[bytes] = []
            size = 0
            try:
                for chunk in _body_chunks(response):
                    size += len(chunk)
                    if size > cap:
                        raise self._too_big(url, size, cap, response.status_code)
                    chunks.append(chunk)
                    if stop.is_set():
                        raise GenerationInterrupted("stopped")
                    if time.monotonic() > call_end:
                        raise requests.exceptions.ReadTimeout("answer too slow")
            except (
                requests.exceptions.RequestException,
                urllib3.exceptions.HTTPError,
                OSError,
            ) as e:
                raise self._transport_failure(e, url, read_timeout, may_bill, sent=True) from e
        content = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        return Reply(response.status_code, response.reason or "", response.headers, content, response.url)

    def _too_big(self, url: str, size: int, cap: int, status: int) -> Failure:
        return Failure(
            ResponseDecodeError,
            f"the answer from {safe_url(url)} is over {cap:,} bytes ({size:,} so far), more than "
            f"an image of at most max_download_bytes={self.settings.max_download_bytes:,} needs",
            reason="answer too large",
            status=status,
        )

    def _transport_failure(
        self, e: Exception, url: str, timeout_s: float, may_bill: bool, sent: bool
    ) -> Failure:
        """Name the likely cause of a network failure and whether a retry is safe."""
        host = urlsplit(url).hostname or "?"
        where = f"{host}:{origin(url)[2]}"
        chain = _exception_chain(e)
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
                f"no connection to {where} within "
                f"{min(self.settings.connect_timeout_s, timeout_s):g} s: the service or the "
                "network is slow or down",
                reason="connect timeout",
                retry=FREE,
            )
        if has(urllib3.exceptions.NameResolutionError, socket.gaierror):
            return Failure(
                NetworkError,
                f"the host name {host!r} could not be resolved (DNS): check the base URL "
                f"({ENV_BASE_URL} or base_url in the config file) and the network connection",
                reason="host name not resolved",
            )
        if not sent and has(ConnectionRefusedError, urllib3.exceptions.NewConnectionError):
            return Failure(
                NetworkError,
                f"the connection to {where} was refused: the service is down or the base URL "
                "has the wrong port",
                reason="connection refused",
                retry=FREE,
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

    # --- never-billed GETs ----------------------------------------------------------------------

    def get(self, url: str, deadline: float, stop: threading.Event, timeout_s: float, cap: int) -> Reply:
        """A GET that is never billed: its own redirects followed, the key only to the service."""
        for _ in range(MAX_REDIRECTS + 1):
            self._check_fetch_url(url)
            reply = self.exchange(
                "GET",
                url,
                body=None,
                timeout_s=timeout_s,
                deadline=deadline,
                stop=stop,
                cap=cap,
                may_bill=False,
            )
            location = reply.headers.get("Location")
            if reply.status in (301, 302, 303, 307, 308) and location:
                url = urljoin(url, location)
                continue
            if 200 <= reply.status < 300:
                return reply
            request_id = request_id_of(reply, self.safe)
            tag = status_tag(reply.status, reply.reason, request_id)
            transient = reply.status in (408, 429, 500, 502, 503, 504)
            cls = ServerError if reply.status >= 500 else ResponseDecodeError
            hint = ""
            if reply.status in (401, 403) and origin(url) != self.origin:
                hint = (
                    " (the API key is only sent to the service's own address, never to "
                    f"{urlsplit(url).hostname})"
                )
            raise Failure(
                cls,
                f"fetching {self.safe(safe_url(url))} failed ({tag}){hint}: "
                f"{self.safe(server_message(reply))}",
                reason=f"HTTP {reply.status}",
                retry=FREE if transient else None,
                status=reply.status,
                request_id=request_id,
                retry_after=retry_after_seconds(reply) if reply.status in (429, 503) else None,
            )
        raise Failure(
            ResponseDecodeError,
            f"more than {MAX_REDIRECTS} redirects fetching {self.safe(safe_url(url))}",
            reason="too many redirects",
        )

    def _check_fetch_url(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise Failure(
                ResponseDecodeError,
                f"the answer names an image at {self.safe(safe_url(url))!r}, which is not an http(s) URL",
                reason="bad URL",
            )
        if parts.scheme == "http" and not is_loopback_host(parts.hostname):
            raise Failure(
                ResponseDecodeError,
                f"the answer names an image at {self.safe(safe_url(url))} over plain http; "
                "only https downloads are allowed from other machines",
                reason="plain http URL",
            )

    def download(self, url: str, deadline: float, stop: threading.Event, request_id: str | None) -> bytes:
        """The bytes at an image URL; a transient failure is retried once (downloads are free)."""
        s = self.settings
        for tries in (1, 2):
            reply, failure = attempt(
                self.get, url, deadline, stop, s.download_timeout_s, s.max_download_bytes
            )
            if failure is None:
                return reply.content
            left = deadline - time.monotonic()
            wait = min(s.backoff_base_s, s.backoff_max_s)
            if tries == 1 and failure.retry is not None and wait < left:
                self.log.warning(
                    "ImageAPI image download from %s failed (%s); retrying once in %.2f s "
                    "(downloads are not billed)",
                    self.safe(safe_url(url)),
                    self.safe(failure.reason),
                    wait,
                )
                sleep_unless_stopped(wait, stop)
                continue
            failure.request_id = failure.request_id or request_id
            raise failure.error(f" [download attempt {tries}]", self.safe) from failure.__cause__
        raise AssertionError("unreachable")


# --- helpers without state ------------------------------------------------------------------------


def _body_chunks(response: requests.Response) -> Iterator[bytes]:
    """The body as it arrives. urllib3 2's `read1` returns what one receive got, so a trickling
    answer is checked against the deadline per piece; `iter_content` would wait for full chunks."""
    raw = response.raw
    if _URLLIB3_MAJOR >= 2 and hasattr(raw, "read1"):
        while chunk := raw.read1(CHUNK_BYTES, decode_content=True):
            yield chunk
    else:
        yield from response.iter_content(CHUNK_BYTES)


def origin(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of `url`, lower-case, the port filled in from the scheme."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port
    except ValueError:
        port = None
    return scheme, (parts.hostname or "").lower(), port or (443 if scheme == "https" else 80)


def safe_url(url: str) -> str:
    """A URL without its query and fragment (signed download URLs carry tokens there)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return f"{parts.scheme}://{netloc}{parts.path}" if parts.scheme else parts.path


def _exception_chain(e: BaseException) -> list[BaseException]:
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
