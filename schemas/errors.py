"""The engine's one error hierarchy; every error carries a wire code of the contract.

    EngineError (code, retryable)
     ├── UndecodableError            UNDECODABLE           bytes that are no event at all
     ├── InvalidRequestError         INVALID_REQUEST       decoded, but a field is wrong (.field)
     ├── UnknownLoraError            UNKNOWN_LORA
     ├── UpstreamUnavailableError    UPSTREAM_UNAVAILABLE  retryable: 429, 5xx, connection errors
     ├── UpstreamRejectedError       UPSTREAM_REJECTED     400/401/422 from an upstream
     ├── QuotaExceededError          QUOTA_EXCEEDED
     ├── OutOfMemoryError            OUT_OF_MEMORY         retryable
     ├── GenerationTimeoutError      TIMEOUT               retryable
     ├── RequestCancelledError       CANCELLED             withdrawn by generation.control / DELETE
     ├── RequestExpiredError         EXPIRED               not started by its deadline
     └── InternalError               INTERNAL

The codes are part of the wire contract (``GenerationFailed.error_code``), which is why the
hierarchy lives in ``schemas``, the bottom layer. Foreign errors are translated where they
enter (``raise UpstreamUnavailableError(...) from exc``); messages never carry secrets.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = [
    "INTERNAL_MESSAGE",
    "EngineError",
    "ErrorCode",
    "GenerationTimeoutError",
    "InternalError",
    "InvalidRequestError",
    "OutOfMemoryError",
    "QuotaExceededError",
    "RequestCancelledError",
    "RequestExpiredError",
    "UndecodableError",
    "UnknownLoraError",
    "UpstreamRejectedError",
    "UpstreamUnavailableError",
]


INTERNAL_MESSAGE = "the engine failed on this request; its log has the details"


class ErrorCode(StrEnum):
    UNDECODABLE = "UNDECODABLE"
    INVALID_REQUEST = "INVALID_REQUEST"
    UNKNOWN_LORA = "UNKNOWN_LORA"
    UPSTREAM_UNAVAILABLE = "UPSTREAM_UNAVAILABLE"
    UPSTREAM_REJECTED = "UPSTREAM_REJECTED"
    QUOTA_EXCEEDED = "QUOTA_EXCEEDED"
    OUT_OF_MEMORY = "OUT_OF_MEMORY"
    TIMEOUT = "TIMEOUT"
    INTERNAL = "INTERNAL"
    CANCELLED = "CANCELLED"
    EXPIRED = "EXPIRED"


class EngineError(Exception):
    """Root of the engine's errors: ``code`` is the wire code, ``retryable`` says whether
    the same request may succeed later (transient), which drives retries and the failed
    event's ``retryable`` field."""

    code: ErrorCode = ErrorCode.INTERNAL
    retryable: bool = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    @property
    def public_message(self) -> str:
        """What a caller is told (an HTTP answer, a failed event): the message, which
        describes the request's problem, except for INTERNAL, whose message describes the
        engine's insides (an exception, a path, a library's words) and is for the log."""
        return INTERNAL_MESSAGE if self.code is ErrorCode.INTERNAL else self.message


class UndecodableError(EngineError):
    """Bytes that are no event. The message, which a caller is told, says what is wrong
    in the caller's terms; ``detail`` (a decoder's own words, for the log) is added by
    ``str()`` only."""

    code = ErrorCode.UNDECODABLE

    def __init__(self, message: str, detail: str | None = None) -> None:
        super().__init__(message)
        self.detail = detail

    def __str__(self) -> str:
        return self.message if self.detail is None else f"{self.message} ({self.detail})"


class InvalidRequestError(EngineError):
    """A request that decoded but is not valid; ``field`` names the offending field
    (dotted path for nested ones), ``errors`` lists every field error found."""

    code = ErrorCode.INVALID_REQUEST

    def __init__(
        self, message: str, field: str | None = None, errors: list[dict[str, str]] | None = None
    ) -> None:
        super().__init__(message)
        self.field = field
        self.errors = errors if errors is not None else (
            [{"field": field, "message": message}] if field else []
        )


class UnknownLoraError(EngineError):
    code = ErrorCode.UNKNOWN_LORA


class UpstreamUnavailableError(EngineError):
    code = ErrorCode.UPSTREAM_UNAVAILABLE
    retryable = True

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class UpstreamRejectedError(EngineError):
    code = ErrorCode.UPSTREAM_REJECTED


class QuotaExceededError(EngineError):
    code = ErrorCode.QUOTA_EXCEEDED


class OutOfMemoryError(EngineError):
    code = ErrorCode.OUT_OF_MEMORY
    retryable = True


class GenerationTimeoutError(EngineError):
    code = ErrorCode.TIMEOUT
    retryable = True


class RequestCancelledError(EngineError):
    """The request was withdrawn (``generation.control`` cancel, ``DELETE /requests/{id}``
    or an HTTP client that went away) before it finished; never retried."""

    code = ErrorCode.CANCELLED


class RequestExpiredError(EngineError):
    """The request had not started by its ``deadline``; no work was done for it."""

    code = ErrorCode.EXPIRED


class InternalError(EngineError):
    """A failure of the engine itself: its message (an exception, a path, a library's
    words) is for the log; callers are told only that it failed."""

    code = ErrorCode.INTERNAL
