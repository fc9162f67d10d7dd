"""HTTP for the ImageAPI client: one exchange, and the never-billed GETs (job polls, downloads).

Used by api/service.py and api/answers.py, which decide what to send and what to retry. An exchange
sends one request on a pooled `requests` session and reads the whole answer as it arrives, capped in
size, within the call's timeout and the image's deadline, checking the stop event per read; what
went wrong becomes a `Failure` (api/failures.py). GETs follow their own redirects, only to http(s)
URLs, plain http only on this machine, and send the API key only to the service's own origin
(scheme, host, port), so a download URL on a CDN never receives it. urllib3's log lines are
redacted (api/redact.py). Based on the service's public documentation (https://imageapi.org) and
the behaviour of requests/urllib3 1.x and 2.x.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
from collections.abc import Iterator
from urllib.parse import urljoin, urlsplit

import requests
import urllib3
from requests.adapters import HTTPAdapter

from .._version import __version__
from ..errors import ApiTimeoutError, GenerationInterrupted, ResponseDecodeError
from .answer_shapes import Reply, request_id_of
from .failures import FETCH, Failure, attempt, status_failure, transport_failure, url_port
from .redact import cut_url, holds_key, install_urllib3_redaction, scrub
from .retry import SYSTEM_CLOCK, Clock
from .settings import ApiSettings, is_loopback_host

USER_AGENT = f"comfyui-flux-schnell/{__version__} python-requests/{requests.__version__}"
POOL_SIZE = 16  # connections kept per host; >= any concurrency the node uses (MAX_BATCH)
CHUNK_BYTES = 2**20  # most a body read returns at once; the deadline and stop are checked per read
MAX_REDIRECTS = 5  # for GETs; the generate call itself never follows redirects
# Given as `proxies` for requests to this machine: every scheme's proxy from the environment
# (HTTP_PROXY, HTTPS_PROXY, ALL_PROXY) is overridden, and requests drops the None entries.
NO_PROXY = {"http": None, "https": None, "all": None}

_URLLIB3_MAJOR = int(urllib3.__version__.split(".", 1)[0])


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

    def __init__(
        self,
        settings: ApiSettings,
        session: requests.Session | None,
        logger: logging.Logger,
        clock: Clock = SYSTEM_CLOCK,
    ):
        self.settings = settings
        self.log = logger
        self.clock = clock
        self._own_session = session is None
        if session is None:
            session = requests.Session()
            adapter = HTTPAdapter(pool_connections=4, pool_maxsize=POOL_SIZE, max_retries=0)
            session.mount("https://", adapter)
            session.mount("http://", adapter)
        self._session = session
        self.origin = origin(settings.base_url)
        self._base_is_local = is_loopback_host(self.origin[1])
        self._with_key = _Bearer(settings.api_key)
        self._without_key = _Bearer(None)
        install_urllib3_redaction(settings.api_key)

    def close(self) -> None:
        if self._own_session:
            self._session.close()

    def scrub(self, text: str) -> str:
        """`text` (which may come from the server) with the API key replaced by ***."""
        return scrub(text, self.settings.api_key)

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
        extra_headers: dict[str, str] | None = None,
    ) -> Reply:
        """Send one request and read its whole answer (streamed, capped, within the deadline).
        Nothing is sent once `stop` is set: checked right before the request goes out.
        `extra_headers` (the POST's `Idempotency-Key`) are added to the request's own."""
        if stop.is_set():
            raise GenerationInterrupted("stopped")
        left = deadline - self.clock.monotonic()
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
        headers.update(extra_headers or {})
        same_origin = origin(url) == self.origin
        # Plain http is only allowed to this machine, and nothing to this machine goes through a
        # proxy from the environment: the proxy would see the key (plain http) or the local files.
        proxies = NO_PROXY if is_loopback_host(urlsplit(url).hostname or "") else None
        call_end = self.clock.monotonic() + read_timeout  # a trickling body is cut off here too
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
                proxies=proxies,
            )
        except requests.exceptions.RequestException as e:
            failure = self._transport_failure(e, url, read_timeout, may_bill, sent=False)
            raise failure from failure.__cause__  # a redacted stand-in for e
        with response:
            length = response.headers.get("Content-Length", "")
            if length.isdigit() and int(length) > cap:
                raise self._too_big(url, int(length), cap, response.status_code)
            # One buffer, filled in place when the length is known: no second copy of the body.
            expected = int(length) if length.isdigit() else 0
            content = bytearray(expected)
            size = 0
            try:
                for chunk in _body_chunks(response):
                    end = size + len(chunk)
                    if end > cap:
                        raise self._too_big(url, end, cap, response.status_code)
                    if end <= expected:
                        content[size:end] = chunk
                    else:  # longer than announced, or no length given: grow
                        content[size:] = chunk
                    size = end
                    if stop.is_set():
                        raise GenerationInterrupted("stopped")
                    if self.clock.monotonic() > call_end:
                        raise requests.exceptions.ReadTimeout("answer too slow")
            except (
                requests.exceptions.RequestException,
                urllib3.exceptions.HTTPError,
                OSError,
            ) as e:
                failure = self._transport_failure(e, url, read_timeout, may_bill, sent=True)
                raise failure from failure.__cause__
        del content[size:]  # a body shorter than announced (urllib3 normally raises for it)
        return Reply(response.status_code, response.reason or "", response.headers, content, response.url)

    def _transport_failure(self, e: Exception, url: str, timeout_s: float, may_bill: bool, sent: bool):
        return transport_failure(
            e,
            url,
            timeout_s=timeout_s,
            connect_timeout_s=self.settings.connect_timeout_s,
            may_bill=may_bill,
            sent=sent,
            key=self.settings.api_key,
        )

    def _too_big(self, url: str, size: int, cap: int, status: int) -> Failure:
        return Failure(
            ResponseDecodeError,
            f"the answer from {cut_url(url)} is over {cap:,} bytes ({size:,} so far), more than "
            f"an image of at most max_download_bytes={self.settings.max_download_bytes:,} needs",
            reason="answer too large",
            status=status,
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
            hint = ""
            if reply.status in (401, 403) and origin(url) != self.origin:
                hint = (
                    " (the API key is only sent to the service's own address, never to "
                    f"{urlsplit(url).hostname})"
                )
            request_id = request_id_of(reply, self.scrub)
            raise status_failure(reply, FETCH, request_id=request_id, scrub=self.scrub, url=url, hint=hint)
        raise Failure(
            ResponseDecodeError,
            f"more than {MAX_REDIRECTS} redirects fetching {self.scrub(cut_url(url))}",
            reason="too many redirects",
        )

    def _check_fetch_url(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise Failure(
                ResponseDecodeError,
                f"the answer names an image at {self.scrub(cut_url(url))!r}, which is not an http(s) URL",
                reason="bad URL",
            )
        if parts.scheme == "http" and not is_loopback_host(parts.hostname):
            raise Failure(
                ResponseDecodeError,
                f"the answer names an image at {self.scrub(cut_url(url))} over plain http; "
                "only https downloads are allowed from other machines",
                reason="plain http URL",
            )
        other_host = origin(url) != self.origin
        if other_host and holds_key(url, self.settings.api_key):
            raise Failure(
                ResponseDecodeError,
                f"the answer names a URL on {parts.hostname} that holds the API key; the key is "
                "never sent to a host other than the base URL's, so it is not fetched",
                reason="API key in a URL for another host",
            )
        if (
            other_host
            and not self._base_is_local
            and parts.hostname.lower() != self.origin[1]
            and is_local_address(parts.hostname)
        ):
            raise Failure(
                ResponseDecodeError,
                f"the answer names a URL on {parts.hostname}, an address of this machine or a "
                "private network (loopback, private or link-local), which a hosted service has no "
                "business sending a client to; not fetched",
                reason="download from a private address",
            )

    def download(self, url: str, deadline: float, stop: threading.Event, request_id: str | None) -> bytes:
        """The bytes at an image URL; a transient failure is retried once (downloads are free)."""
        settings = self.settings
        for tries in (1, 2):
            reply, failure = attempt(
                self.get, url, deadline, stop, settings.download_timeout_s, settings.max_download_bytes
            )
            if failure is None:
                return reply.content
            left = deadline - self.clock.monotonic()
            wait = min(settings.backoff_base_s, settings.backoff_max_s)
            if tries == 1 and failure.retry is not None and wait < left:
                self.log.warning(
                    "ImageAPI image download from %s failed (%s); retrying once in %.2f s "
                    "(downloads are not billed)",
                    self.scrub(cut_url(url)),
                    self.scrub(failure.reason),
                    wait,
                )
                self.clock.sleep(wait, stop)
                continue
            failure.request_id = failure.request_id or request_id
            raise failure.error(f" [download attempt {tries}]", self.scrub) from failure.__cause__
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
    return parts.scheme.lower(), (parts.hostname or "").lower(), url_port(parts)


def is_local_address(host: str) -> bool:
    """Whether `host` (a name or an address literal) is this machine or a private network:
    loopback, private (10/8, 172.16/12, 192.168/16, fc00::/7), link-local (169.254/16, the cloud
    metadata address among them; fe80::/10), unspecified or reserved. A name is resolved; one that
    does not resolve is not local (its request fails on its own)."""
    if is_loopback_host(host):
        return True
    try:
        addresses = [ipaddress.ip_address(host.strip("[]"))]
    except ValueError:
        try:
            infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
        except (OSError, UnicodeError):
            return False
        addresses = [ipaddress.ip_address(info[4][0].split("%", 1)[0]) for info in infos]
    return any(
        a.is_loopback or a.is_private or a.is_link_local or a.is_unspecified or a.is_reserved
        for a in addresses
    )
