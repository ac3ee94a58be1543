"""Where the operator's own Chainguard API token comes from.

A :class:`TokenSource` hands the API client a bearer token and can be told to forget it after a
401. Two sources exist. :class:`StaticTokenFile` is for development: it reads a token from a file
on every call, so the file can be replaced while the operator runs. :class:`AssumedIdentity` is
for production: it exchanges the operator's projected service-account token (audience
``issuer.enforce.dev``) at the STS for an API token of the operator's own identity, and caches
that token until shortly before it expires. Concurrent callers share one exchange through an
``asyncio.Lock``, and every exchange re-reads the projected token file because the kubelet
rotates it. Tokens are never logged and never put into exception messages.

Every failure of a token source is a :class:`~.errors.CredentialsError`, never the STS's own
``PermissionDenied`` or ``ServerError``: the API client retries a 403 on a fresh create as
permissions propagating, and a 403 from *our* exchange is not that (it is our identity or its token
being refused), so it must not look like an API answer. ``transient`` tells whether waiting helps
(an STS 5xx/429 or a network error) or not (a refusal, an unreadable token file).
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import pathlib
from collections.abc import Callable
from typing import Protocol

import jwt

from .errors import ChainguardError, CredentialsError, as_credentials_error
from .sts import STSClient
from .types import ExchangedToken

logger = logging.getLogger(__name__)

API_AUDIENCE = "https://console-api.enforce.dev"


class TokenSource(Protocol):
    async def token(self) -> str:
        """A Chainguard API bearer token; :class:`~.errors.CredentialsError` when none can be had."""
        ...

    def invalidate(self) -> None:
        """Forget a cached token (e.g. after a 401), so the next :meth:`token` gets a fresh one."""
        ...


async def _read_token_file(path: pathlib.Path) -> str:
    try:
        text = await asyncio.to_thread(path.read_text, encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise CredentialsError(f"cannot read the token file {path}: {reason}") from None
    token = text.strip()
    if not token:
        raise CredentialsError(f"the token file {path} is empty")
    return token


def _unexpired(token: str, now: datetime.datetime) -> bool:
    """Whether a JWT's ``exp`` is still ahead (read without verifying: only to skip a dead token)."""
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        return False
    exp = claims.get("exp")
    return isinstance(exp, int | float) and not isinstance(exp, bool) and now.timestamp() < exp


class StaticTokenFile:
    """A file holding a Chainguard API token (development). Re-read on every call: cheap, and a
    rotated file takes effect at once."""

    def __init__(self, path: pathlib.Path) -> None:
        self.path = path

    def __repr__(self) -> str:
        return f"StaticTokenFile({str(self.path)!r})"

    async def token(self) -> str:
        return await _read_token_file(self.path)

    def invalidate(self) -> None:
        # Nothing is cached: the next call reads the file again anyway.
        pass


class AssumedIdentity:
    """The operator's own assumable identity: projected SA token → STS → API token, cached.

    The identity is the configured one (``CGID_IDENTITY``) until the operator is told to ``follow``
    another: when the operator's own ``ChainguardIdentity`` replaces the identity it logs in as (a static
    identity past its maximum lifetime), it publishes the successor, and the next exchange is made for
    that one. If the successor cannot be exchanged for, the configured identity is tried, so a bad
    hand-off never locks the operator out while the old identity still exists. ``identity`` is the one
    the current token belongs to: the reconcile never deletes it.
    """

    def __init__(
        self,
        sts: STSClient,
        *,
        identity: str,
        token_path: pathlib.Path,
        audience: str = API_AUDIENCE,
        refresh_margin: datetime.timedelta = datetime.timedelta(minutes=5),
        clock: Callable[[], datetime.datetime] | None = None,
    ) -> None:
        self.configured = identity
        self.identity = identity
        self.token_path = token_path
        self.audience = audience
        self.refresh_margin = refresh_margin
        self._followed: str | None = None
        self._last_subject: str | None = None  # never logged, never leaves this object
        self._sts = sts
        self._clock = clock or (lambda: datetime.datetime.now(datetime.UTC))
        self._lock = asyncio.Lock()
        self._cached: ExchangedToken | None = None
        self._refresh_at: datetime.datetime | None = None

    def __repr__(self) -> str:
        return f"AssumedIdentity(identity={self.identity!r}, token_path={str(self.token_path)!r})"

    def follow(self, identity: str) -> None:
        """Exchange for ``identity`` from the next token on (the operator's own identity was replaced)."""
        if identity == self._followed:
            return
        logger.info("the operator's own identity is now %s (was %s)", identity, self.identity)
        self._followed = identity
        self.invalidate()

    def identities(self) -> frozenset[str]:
        """The identities the operator authenticates as, or may fall back to."""
        return frozenset({self.identity})

    async def token(self) -> str:
        async with self._lock:
            now = self._clock()
            if self._cached is not None and self._refresh_at is not None and now < self._refresh_at:
                return self._cached.token
            current = await _read_token_file(self.token_path)
            # The projected token the last exchange used, while it lives: right after the cluster rotates
            # its signing keys, the kubelet's new token may be signed by a key the operator has not yet
            # registered with its own static identity — and only an exchange can register it.
            previous = self._last_subject if self._last_subject not in (None, current) else None
            if previous is not None and not _unexpired(previous, now):
                previous = None
            subjects = [token for token in (current, previous) if token is not None]
            identities = list(dict.fromkeys(uid for uid in (self._followed, self.configured) if uid))
            first_error: CredentialsError | None = None
            for candidate in identities:
                for subject_token in subjects:
                    try:
                        exchanged = await self._sts.exchange(
                            subject_token, audience=self.audience, identity=candidate
                        )
                    except ChainguardError as error:
                        # Not the STS's PermissionDenied as such: see the module docstring.
                        failure = as_credentials_error(
                            error, f"exchanging the projected token for identity {candidate}"
                        )
                        if failure.transient:
                            raise failure from None  # the STS is down: trying others would not help
                        if candidate == self._followed and candidate != self.configured:
                            logger.warning(
                                "the operator cannot authenticate as the identity it follows, %s (%s); "
                                "trying CGID_IDENTITY %s",
                                candidate,
                                failure.message,
                                self.configured,
                            )
                        first_error = first_error or failure
                        continue
                    return self._keep(candidate, subject_token, exchanged, now)
            assert first_error is not None
            raise first_error

    def _keep(
        self, identity: str, subject_token: str, exchanged: ExchangedToken, now: datetime.datetime
    ) -> str:
        if identity != self.identity:
            logger.info("the operator now authenticates as identity %s", identity)
        if identity != self.configured:
            # If the ConfigMap it follows were lost, a restart would fall back to CGID_IDENTITY, which is
            # deleted once replaced: the admin should point the setting at the successor.
            logger.warning(
                "the operator's own identity was replaced: it authenticates as %s, but CGID_IDENTITY is %s; "
                "set CGID_IDENTITY=%s",
                identity,
                self.configured,
                identity,
            )
        self.identity = identity
        self._last_subject = subject_token
        # A token shorter-lived than twice the margin would otherwise be refreshed on every call;
        # refresh such a token half-way through its remaining life instead.
        remaining = max(exchanged.expiry - now, datetime.timedelta(0))
        margin = min(self.refresh_margin, remaining / 2)
        self._cached = exchanged
        self._refresh_at = exchanged.expiry - margin
        logger.debug(
            "exchanged the operator's token for identity %s, valid until %s",
            identity,
            exchanged.expiry.isoformat(),
        )
        return exchanged.token

    def invalidate(self) -> None:
        self._cached = None
        self._refresh_at = None
