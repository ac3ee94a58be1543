"""The exceptions raised by the Chainguard API and STS clients.

Our exception tree::

    ChainguardError                      base; never includes a token in its message
    ├── TransportError                   network error or timeout (transient)
    ├── OutcomeUnknown(status)           a write got no answer or an ambiguous one (transient)
    ├── CredentialsError(status, message) the operator's own token could not be had
    └── APIError(status, code, message)  an error answer from the API or STS (grpc code + HTTP status)
        ├── InvalidArgument              400 (InvalidArgument/FailedPrecondition/OutOfRange)
        ├── Unauthenticated              401
        ├── PermissionDenied             403
        ├── NotFound                     404
        ├── AlreadyExists                409
        ├── RateLimited                  429 (retry_after: float | None)
        └── ServerError                  5xx (500/502/503/504)

Every error has ``transient`` (worth retrying later as is: TransportError, OutcomeUnknown,
RateLimited, ServerError, and a CredentialsError caused by an STS 5xx/429 or a network error) and
``retry_after`` (the server's hint in seconds, or ``None``). The class of an answer is chosen from
the HTTP status, as the grpc-gateway maps codes to statuses one way only; the grpc ``code`` and
``message`` come from the ``{"code", "message", "details"}`` body when there is one, else from the
status.

Two classes exist because an answer is not always what it looks like. :class:`OutcomeUnknown` says
that a mutation timed out, lost its connection or got a 500/502/504: it may have been applied, so
the caller must look the object up before writing again, and must never treat it as "not done".
:class:`CredentialsError` says the operator could not get its *own* API token (the STS refused or
failed the exchange, or the token file is unreadable). It is deliberately not an :class:`APIError`:
a 403 from our STS exchange is not the API's 403 on a fresh create, and must never be retried as
permissions propagating.

Messages are built from the method, the URL path and the server's message, and :func:`redact`
scrubs anything shaped like a JWT — whole tokens and fragments of one — from the server's message,
so a token can reach neither a log line nor a Kubernetes event through an exception. The error
body's ``details`` are kept on :attr:`APIError.details` for code that wants them, but never put in
a message, ``str`` or ``repr``: servers put debugging data there.
"""

from __future__ import annotations

import datetime
import email.utils
import json
from collections.abc import Mapping
from typing import Any

from chainguard_identity_operator.redaction import redact as redact  # re-exported: part of this tree's API

# gRPC status codes by name; the API reports the number in the error body.
GRPC_CODE_NAMES: Mapping[int, str] = {
    0: "OK",
    1: "Canceled",
    2: "Unknown",
    3: "InvalidArgument",
    4: "DeadlineExceeded",
    5: "NotFound",
    6: "AlreadyExists",
    7: "PermissionDenied",
    8: "ResourceExhausted",
    9: "FailedPrecondition",
    10: "Aborted",
    11: "OutOfRange",
    12: "Unimplemented",
    13: "Internal",
    14: "Unavailable",
    15: "DataLoss",
    16: "Unauthenticated",
}

# The code to report when an error answer has no grpc body (a proxy, a load balancer).
_CODE_FOR_STATUS: Mapping[int, int] = {
    400: 3,
    401: 16,
    403: 7,
    404: 5,
    409: 6,
    429: 8,
    500: 13,
    501: 12,
    502: 14,
    503: 14,
    504: 4,
}

_MAX_MESSAGE = 500


def _shorten(message: str) -> str:
    return message[:_MAX_MESSAGE] + "…" if len(message) > _MAX_MESSAGE else message


class ChainguardError(Exception):
    """Base of every error raised by the Chainguard clients. Its message never holds a token."""

    transient: bool = False

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class TransportError(ChainguardError):
    """The request got no answer: connection refused or reset, DNS failure, timeout."""

    transient = True


class OutcomeUnknown(ChainguardError):
    """A mutation (POST, PATCH, DELETE) may or may not have been applied.

    Raised at once, without re-sending, when a write timed out or lost its connection after it was
    sent, or was answered 500, 502 or 504: the server may have committed it before the answer was
    lost. ``status`` is the HTTP status of the ambiguous answer, ``None`` when there was none. It is
    transient — the caller's next step is to look the object up (by name, or for a role binding with
    :meth:`ChainguardClient.find_role_binding`) and adopt it, or write again only if it is absent.
    """

    transient = True

    def __init__(self, request: str, cause: str, *, status: int | None = None) -> None:
        self.request = request
        self.cause = cause
        self.status = status
        super().__init__(f"{request}: outcome unknown ({cause})")

    def __repr__(self) -> str:
        return f"OutcomeUnknown(request={self.request!r}, cause={self.cause!r}, status={self.status})"


class CredentialsError(ChainguardError):
    """The operator's own Chainguard API token could not be had.

    The token source failed: the STS refused or failed to exchange the operator's projected token,
    or the token file could not be read. ``status`` is the STS's HTTP status (``None`` for a network
    error or a file), ``message`` the STS's message (redacted) or what went wrong, ``context`` where.
    ``transient`` is true for an STS 5xx or 429 and for network errors, false otherwise: a refused
    exchange (403) means the operator's identity or its token is wrong, which waiting does not fix.
    Not an :class:`APIError`, so nothing mistakes it for the API's own answer to a request.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        transient: bool = False,
        context: str = "",
        retry_after: float | None = None,
    ) -> None:
        self.message = _shorten(redact(message))
        self.status = status
        self.transient = transient
        self.context = context
        detail = f"{context}: {self.message}" if context else self.message
        super().__init__(f"cannot get the operator's Chainguard API token: {detail}", retry_after=retry_after)

    def __repr__(self) -> str:
        return f"CredentialsError(status={self.status}, transient={self.transient}, message={self.message!r})"


class APIError(ChainguardError):
    """An error answer from the API or the STS.

    ``status`` is the HTTP status, ``code`` the grpc code number, ``message`` the server's message
    (redacted, shortened). ``str()`` adds the request's method and path for context.
    """

    def __init__(
        self,
        status: int,
        code: int,
        message: str,
        *,
        request: str = "",
        details: tuple[Any, ...] = (),
        retry_after: float | None = None,
    ) -> None:
        self.status = status
        self.code = code
        self.message = message
        self.request = request
        self.details = details
        prefix = f"{request}: " if request else ""
        super().__init__(f"{prefix}HTTP {status} {self.code_name}: {message}", retry_after=retry_after)

    @property
    def code_name(self) -> str:
        return GRPC_CODE_NAMES.get(self.code, str(self.code))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(status={self.status}, code={self.code_name}, message={self.message!r})"


class InvalidArgument(APIError):
    """400: the request is wrong (InvalidArgument, FailedPrecondition, OutOfRange)."""


class Unauthenticated(APIError):
    """401: the bearer token is missing, expired or not accepted."""


class PermissionDenied(APIError):
    """403: the caller may not do this (or, right after a create, not yet)."""


class NotFound(APIError):
    """404: no such object."""


class AlreadyExists(APIError):
    """409: the object exists already (AlreadyExists) or a concurrent change won (Aborted)."""


class RateLimited(APIError):
    """429: too many requests; ``retry_after`` holds the server's ``Retry-After`` if it sent one."""

    transient = True


class ServerError(APIError):
    """5xx: the server failed or is unavailable."""

    transient = True


_CLASS_FOR_STATUS: Mapping[int, type[APIError]] = {
    400: InvalidArgument,
    401: Unauthenticated,
    403: PermissionDenied,
    404: NotFound,
    409: AlreadyExists,
    429: RateLimited,
}


def parse_retry_after(value: str | None, *, now: datetime.datetime | None = None) -> float | None:
    """Read a ``Retry-After`` header: delta seconds or an HTTP date. ``None`` if absent or unreadable."""
    if not value:
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=datetime.UTC)
        seconds = (when - (now or datetime.datetime.now(datetime.UTC))).total_seconds()
    if seconds != seconds:  # NaN
        return None
    return max(0.0, seconds)


def error_from_response(
    status: int,
    body: bytes,
    *,
    request: str = "",
    retry_after: str | None = None,
    secrets: tuple[str, ...] = (),
) -> APIError:
    """Build the :class:`APIError` subclass for an error answer.

    ``request`` is ``"METHOD /path"`` (never the query or headers); ``secrets`` are strings to
    scrub from the server's message in case it echoes them (e.g. the presented token).
    """
    code = _CODE_FOR_STATUS.get(status, 13 if status >= 500 else 2)
    message = ""
    details: tuple[Any, ...] = ()
    try:
        parsed = json.loads(body) if body else None
    except ValueError:  # not JSON: a proxy's HTML page, say
        parsed = None
    if isinstance(parsed, Mapping):
        if isinstance(parsed.get("code"), int) and not isinstance(parsed.get("code"), bool):
            code = parsed["code"]
        if isinstance(parsed.get("message"), str):
            message = parsed["message"]
        if isinstance(parsed.get("details"), list):
            details = tuple(parsed["details"])
    if not message:
        message = GRPC_CODE_NAMES.get(code, f"HTTP {status}")
    message = _shorten(redact(message, *secrets))
    cls = _CLASS_FOR_STATUS.get(status, ServerError if status >= 500 else APIError)
    return cls(
        status,
        code,
        message,
        request=request,
        details=details,
        retry_after=parse_retry_after(retry_after),
    )


def as_credentials_error(error: ChainguardError, context: str) -> CredentialsError:
    """The :class:`CredentialsError` for a failure of a token source (e.g. an STS answer)."""
    if isinstance(error, CredentialsError):
        return error
    if isinstance(error, APIError):
        return CredentialsError(
            error.message,
            status=error.status,
            transient=error.status == 429 or error.status >= 500,
            context=f"{context} ({error.request or 'the STS'}: HTTP {error.status} {error.code_name})",
            retry_after=error.retry_after,
        )
    return CredentialsError(str(error), transient=error.transient, context=context)
