"""Where the operator's own Chainguard API token comes from.

A :class:`TokenSource` hands the API client a bearer token and can be told to forget it after a
401. Two sources exist. :class:`StaticTokenFile` is for development: it reads a token from a file
on every call, so the file can be replaced while the operator runs. :class:`AssumedIdentity` is
for production: it exchanges the operator's projected service-account token (audience
``issuer.enforce.dev``) at the STS for an API token of the operator's own identity, and caches
that token until shortly before it expires. Concurrent callers share one exchange through an
``asyncio.Lock``, and every exchange re-reads the projected token file because the kubelet
rotates it. Tokens are never logged and never put into exception messages.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import pathlib
from collections.abc import Callable
from typing import Protocol

from .errors import ChainguardError
from .sts import STSClient
from .types import ExchangedToken

logger = logging.getLogger(__name__)

API_AUDIENCE = "https://console-api.enforce.dev"


class TokenSource(Protocol):
    async def token(self) -> str:
        """A Chainguard API bearer token."""
        ...

    def invalidate(self) -> None:
        """Forget a cached token (e.g. after a 401), so the next :meth:`token` gets a fresh one."""
        ...


async def _read_token_file(path: pathlib.Path) -> str:
    try:
        text = await asyncio.to_thread(path.read_text, encoding="utf-8")
    except OSError as exc:
        raise ChainguardError(
            f"cannot read the token file {path}: {exc.strerror or type(exc).__name__}"
        ) from None
    token = text.strip()
    if not token:
        raise ChainguardError(f"the token file {path} is empty")
    return token


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
    """The operator's own assumable identity: projected SA token → STS → API token, cached."""

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
        self.identity = identity
        self.token_path = token_path
        self.audience = audience
        self.refresh_margin = refresh_margin
        self._sts = sts
        self._clock = clock or (lambda: datetime.datetime.now(datetime.UTC))
        self._lock = asyncio.Lock()
        self._cached: ExchangedToken | None = None
        self._refresh_at: datetime.datetime | None = None

    def __repr__(self) -> str:
        return f"AssumedIdentity(identity={self.identity!r}, token_path={str(self.token_path)!r})"

    async def token(self) -> str:
        async with self._lock:
            now = self._clock()
            if self._cached is not None and self._refresh_at is not None and now < self._refresh_at:
                return self._cached.token
            subject_token = await _read_token_file(self.token_path)
            exchanged = await self._sts.exchange(
                subject_token, audience=self.audience, identity=self.identity
            )
            # A token shorter-lived than twice the margin would otherwise be refreshed on every
            # call; refresh such a token half-way through its remaining life instead.
            remaining = max(exchanged.expiry - now, datetime.timedelta(0))
            margin = min(self.refresh_margin, remaining / 2)
            self._cached = exchanged
            self._refresh_at = exchanged.expiry - margin
            logger.debug(
                "exchanged the operator's token for identity %s, valid until %s",
                self.identity,
                exchanged.expiry.isoformat(),
            )
            return exchanged.token

    def invalidate(self) -> None:
        self._cached = None
        self._refresh_at = None
