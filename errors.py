"""The package's exception hierarchy.

One base class, `FluxSchnellError`, so a caller can catch everything this package raises. Errors
caused by what the user gave (an input, a file, the configuration) also subclass `ValueError`, the
way `requests.exceptions.MissingSchema` also is a `ValueError`. No message ever contains an API key.
"""

from __future__ import annotations


class FluxSchnellError(Exception):
    """Base class of every error this package raises on purpose."""


class InvalidInputError(FluxSchnellError, ValueError):
    """A generation input cannot be honoured; the message names the input and the allowed values."""


class FolderLockedError(InvalidInputError):
    """Another run holds the output folder's lock; says which (pid, host, since) and what to do."""


class ConfigurationError(FluxSchnellError, ValueError):
    """The configuration (API key, base URL, config file) is missing or wrong; says how to fix it."""


class GenerationInterrupted(FluxSchnellError):
    """The user asked to stop (ComfyUI's interrupt, Ctrl-C in the command line)."""


# --- hosted API --------------------------------------------------------------------------------


class ApiError(FluxSchnellError):
    """The hosted ImageAPI service could not produce an image.

    `status` is the HTTP status (None when no response arrived); `request_id` is the service's id
    for the call where it gave one.
    """

    def __init__(self, message: str, *, status: int | None = None, request_id: str | None = None):
        super().__init__(message)
        self.status = status
        self.request_id = request_id
        self.calls = None  # a generation.CallRecord, set by the api layer: what this image's calls were


class BadRequestError(ApiError, ValueError):
    """400/422: the service refused the request's content; the message is the service's own."""


class AuthenticationError(ApiError):
    """401/403: the API key was refused."""


class InsufficientCreditsError(ApiError):
    """402: the account has no credits left."""


class RateLimitError(ApiError):
    """429: too many requests; `retry_after` is the wait the service asked for, in seconds."""

    def __init__(self, message: str, *, retry_after: float | None = None, **kwargs):
        super().__init__(message, **kwargs)
        self.retry_after = retry_after


class ServerError(ApiError):
    """5xx: the service failed."""


class ApiTimeoutError(ApiError, TimeoutError):
    """No complete answer within the timeout or the overall deadline."""


class NetworkError(ApiError, ConnectionError):
    """The service could not be reached (DNS, proxy, TLS, refused or dropped connection)."""


class ServiceUnreachableError(NetworkError):
    """The first calls of a run all failed to connect (refused, DNS, connect timeout) and none had
    succeeded: the run stopped early. The message names the base URL and where it was set."""


class ResponseDecodeError(ApiError):
    """The service answered, but no image could be found or decoded in the answer."""


class BatchFailedError(ApiError):
    """Some images of a batch failed; `failures` maps image index to the error it ended with.

    The images that did finish are kept by the caller, so queueing the same batch again only
    requests the failed ones.
    """

    def __init__(self, message: str, *, failures: dict[int, ApiError], **kwargs):
        super().__init__(message, **kwargs)
        self.failures = failures


# --- local backend -----------------------------------------------------------------------------


class ModelLoadError(FluxSchnellError, ValueError):
    """A weight file is missing, of the wrong kind, truncated or inconsistent."""


class LocalBackendUnavailable(FluxSchnellError):
    """The local backend cannot run here (a missing package, no weights found)."""


class OutOfMemoryError(FluxSchnellError, MemoryError):
    """A stage ran out of device memory; the message names the stage and what to change."""
