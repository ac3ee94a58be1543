"""The client of Chainguard's STS (``https://issuer.enforce.dev/sts/exchange``).

The STS trades a presented OIDC token (here: a Kubernetes service-account token) for a short-lived
Chainguard token for one identity and one or more audiences. The exchange is a form-encoded POST
(a JSON body is ignored by the STS) with repeated ``aud`` keys and the presented token as bearer.
The client does not retry: an exchange is cheap for callers to repeat, and the callers know
whether a 403 means "not yet" (right after an identity was created) or "never". Errors map onto
the tree in :mod:`.errors` as the STS's own answers (a refusal is ``PermissionDenied``); when the
exchange is the operator's own, :class:`~.auth.AssumedIdentity` turns every one of them into a
``CredentialsError``, so the API client never mistakes it for an answer of the API. Neither the
presented nor the minted token ever appears in a message.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from typing import Any

import httpx
import jwt

from .errors import ChainguardError, TransportError, error_from_response, redact
from .types import ExchangedToken, parse_time

EXCHANGE_PATH = "/sts/exchange"


class STSClient:
    """Exchanges OIDC tokens for Chainguard tokens. Use as ``async with`` or call :meth:`aclose`."""

    def __init__(
        self,
        issuer_url: str = "https://issuer.enforce.dev",
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        timeout: float = 10.0,
    ) -> None:
        self.issuer_url = issuer_url.rstrip("/")
        self._http = httpx.AsyncClient(
            base_url=self.issuer_url,
            transport=transport,
            timeout=httpx.Timeout(timeout),
            follow_redirects=False,
        )

    def __repr__(self) -> str:
        return f"STSClient({self.issuer_url!r})"

    async def __aenter__(self) -> STSClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def exchange(
        self, subject_token: str, *, audience: str | Sequence[str], identity: str
    ) -> ExchangedToken:
        """Exchange ``subject_token`` for a token of ``identity`` valid for ``audience``."""
        audiences = [audience] if isinstance(audience, str) else list(audience)
        if not audiences:
            raise ValueError("at least one audience is required")
        request = f"POST {EXCHANGE_PATH}"
        try:
            response = await self._http.post(
                EXCHANGE_PATH,
                data={"aud": audiences, "identity": identity},
                headers={"Authorization": f"Bearer {subject_token}", "Accept": "application/json"},
            )
        except httpx.RequestError as exc:
            # httpx's exception carries the request and its Authorization header: keep only its kind.
            raise TransportError(f"{request}: {type(exc).__name__}") from None
        if not response.is_success:
            raise error_from_response(
                response.status_code,
                response.content,
                request=request,
                retry_after=response.headers.get("Retry-After"),
                secrets=(subject_token,),
            )
        return _parse_exchange(response, request)


def _parse_exchange(response: httpx.Response, request: str) -> ExchangedToken:
    try:
        body: Any = response.json()
    except ValueError:
        raise ChainguardError(
            f"{request}: the STS answered HTTP {response.status_code} without JSON"
        ) from None
    token = body.get("token") if isinstance(body, dict) else None
    if not isinstance(token, str) or not token:
        raise ChainguardError(f"{request}: the STS answer holds no token")
    expiry = parse_time(body.get("expiry"))
    if expiry is None:
        expiry = _jwt_expiry(token, request)
    return ExchangedToken(token=token, expiry=expiry)


def _jwt_expiry(token: str, request: str) -> datetime.datetime:
    # Reading `exp` without verifying the signature is sound here: the token comes straight from
    # the STS over TLS, and we only use it to know when to ask for a new one, never to trust it.
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError as exc:
        detail = redact(str(exc), token)
        raise ChainguardError(f"{request}: the STS token is not a readable JWT ({detail})") from None
    exp = claims.get("exp")
    if not isinstance(exp, int | float) or isinstance(exp, bool):
        raise ChainguardError(f"{request}: the STS token has neither `expiry` nor `exp`")
    return datetime.datetime.fromtimestamp(exp, datetime.UTC)
