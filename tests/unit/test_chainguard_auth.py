"""The STS client and the operator's token sources, against ``httpx.MockTransport``."""

from __future__ import annotations

import asyncio
import datetime
import pathlib
import urllib.parse
from collections.abc import Awaitable, Callable

import httpx
import jwt
import pytest

from chainguard_identity_operator.chainguard import (
    AssumedIdentity,
    ChainguardClient,
    ChainguardError,
    CredentialsError,
    PermissionDenied,
    ServerError,
    StaticTokenFile,
    STSClient,
    TransportError,
)

ISSUER = "https://issuer.test"
IDENTITY = "c95870ebffa72a258df087ea727ee92daf177e29/f067a9080d45a098"
API_AUDIENCE = "https://console-api.enforce.dev"
T0 = datetime.datetime(2026, 11, 23, 10, 0, tzinfo=datetime.UTC)
SUBJECT = "eyJrubernetes.service-account.token"


def mint(exp: datetime.datetime, sub: str = IDENTITY) -> str:
    """A JWT like the STS's (signed with a throwaway HMAC key: only its claims matter here)."""
    return jwt.encode(
        {"iss": ISSUER, "sub": sub, "aud": API_AUDIENCE, "exp": int(exp.timestamp())},
        "test-signing-key-of-at-least-32-bytes!",
        algorithm="HS256",
    )


def form(request: httpx.Request) -> dict[str, list[str]]:
    return urllib.parse.parse_qs(request.content.decode())


# --- STSClient -----------------------------------------------------------------------------------


async def test_exchange_posts_a_form_with_repeated_audiences() -> None:
    seen: list[httpx.Request] = []
    expiry = T0 + datetime.timedelta(hours=1)

    def sts(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(
            200, json={"token": mint(expiry), "refreshToken": "r", "expiry": "2026-11-23T11:00:00Z"}
        )

    async with STSClient(ISSUER, transport=httpx.MockTransport(sts)) as client:
        exchanged = await client.exchange(SUBJECT, audience=[API_AUDIENCE, "cgr.dev"], identity=IDENTITY)

    request = seen[0]
    assert (request.method, str(request.url)) == ("POST", f"{ISSUER}/sts/exchange")
    assert request.headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert request.headers["Authorization"] == f"Bearer {SUBJECT}"
    assert form(request) == {"aud": [API_AUDIENCE, "cgr.dev"], "identity": [IDENTITY]}
    assert exchanged.expiry == expiry
    assert jwt.decode(exchanged.token, options={"verify_signature": False})["sub"] == IDENTITY
    assert exchanged.token not in repr(exchanged)


@pytest.mark.parametrize("body_expiry", [{"expiry": None}, {}, {"expiry": ""}])
async def test_exchange_reads_exp_from_the_jwt_when_expiry_is_missing(body_expiry: dict[str, None]) -> None:
    # An already expired `exp` must still be read: the client does not validate the token.
    exp = datetime.datetime(2020, 1, 1, 12, 30, tzinfo=datetime.UTC)

    def sts(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"token": mint(exp), **body_expiry})

    async with STSClient(ISSUER, transport=httpx.MockTransport(sts)) as client:
        exchanged = await client.exchange(SUBJECT, audience="cgr.dev", identity=IDENTITY)
    assert exchanged.expiry == exp


@pytest.mark.parametrize(
    ("token", "match"),
    [("not-a-jwt", "not a readable JWT"), (jwt.encode({"sub": "x"}, "k" * 32, algorithm="HS256"), "`exp`")],
)
async def test_exchange_without_any_expiry_is_an_error(token: str, match: str) -> None:
    def sts(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"token": token, "expiry": None})

    async with STSClient(ISSUER, transport=httpx.MockTransport(sts)) as client:
        with pytest.raises(ChainguardError, match=match) as caught:
            await client.exchange(SUBJECT, audience="cgr.dev", identity=IDENTITY)
    assert token not in str(caught.value)


async def test_exchange_maps_403_without_leaking_the_token() -> None:
    def sts(request: httpx.Request) -> httpx.Response:
        # A server that echoes what it got must not make us leak it.
        message = f"verifying token: oidc: token is expired ({SUBJECT})"
        return httpx.Response(403, json={"code": 7, "message": message, "details": []})

    async with STSClient(ISSUER, transport=httpx.MockTransport(sts)) as client:
        with pytest.raises(PermissionDenied) as caught:
            await client.exchange(SUBJECT, audience=API_AUDIENCE, identity=IDENTITY)

    error = caught.value
    assert error.status == 403
    assert error.code == 7
    assert not error.transient
    assert "verifying token: oidc: token is expired" in str(error)
    assert SUBJECT not in str(error)
    assert SUBJECT not in repr(error)


async def test_exchange_maps_5xx_and_transport_errors() -> None:
    answers: list[Callable[[httpx.Request], httpx.Response]] = [
        lambda request: httpx.Response(503, text="upstream unavailable"),
    ]

    def sts(request: httpx.Request) -> httpx.Response:
        if answers:
            return answers.pop(0)(request)
        raise httpx.ReadTimeout("read timed out", request=request)

    async with STSClient(ISSUER, transport=httpx.MockTransport(sts)) as client:
        with pytest.raises(ServerError) as server_error:
            await client.exchange(SUBJECT, audience=API_AUDIENCE, identity=IDENTITY)
        with pytest.raises(TransportError) as transport_error:
            await client.exchange(SUBJECT, audience=API_AUDIENCE, identity=IDENTITY)
    assert server_error.value.transient
    assert str(transport_error.value) == "POST /sts/exchange: ReadTimeout"


# --- StaticTokenFile -----------------------------------------------------------------------------


async def test_static_token_file_is_read_on_every_call(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "token"
    path.write_text("first-token\n")
    source = StaticTokenFile(path)
    assert await source.token() == "first-token"
    path.write_text("second-token")
    source.invalidate()  # a no-op, but part of the protocol
    assert await source.token() == "second-token"
    assert "second-token" not in repr(source)


@pytest.mark.parametrize("content", [None, "  \n"])
async def test_static_token_file_missing_or_empty(tmp_path: pathlib.Path, content: str | None) -> None:
    path = tmp_path / "token"
    if content is not None:
        path.write_text(content)
    with pytest.raises(CredentialsError, match=str(path)) as caught:
        await StaticTokenFile(path).token()
    assert caught.value.status is None
    assert not caught.value.transient


# --- AssumedIdentity -----------------------------------------------------------------------------


class FakeSTS:
    """An STS router minting tokens valid for ``lifetime`` from the test clock."""

    def __init__(self, clock: Callable[[], datetime.datetime], lifetime: datetime.timedelta) -> None:
        self.clock = clock
        self.lifetime = lifetime
        self.presented: list[str] = []
        self.audiences: list[list[str]] = []
        self.gate: asyncio.Event | None = None
        self.entered = asyncio.Event()

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.presented.append(request.headers["Authorization"].removeprefix("Bearer "))
        self.audiences.append(form(request)["aud"])
        self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        expiry = self.clock() + self.lifetime
        token = mint(expiry, sub=f"{IDENTITY}#{len(self.presented)}")
        return httpx.Response(200, json={"token": token, "expiry": expiry.isoformat().replace("+00:00", "Z")})


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime.datetime:
        return self.now


def sub_of(token: str) -> str:
    subject: str = jwt.decode(token, options={"verify_signature": False})["sub"]
    return subject


async def assumed(
    tmp_path: pathlib.Path, lifetime: datetime.timedelta = datetime.timedelta(hours=1)
) -> tuple[AssumedIdentity, FakeSTS, Clock, pathlib.Path, Callable[[], Awaitable[None]]]:
    clock = Clock()
    fake = FakeSTS(clock, lifetime)
    token_path = tmp_path / "sa-token"
    token_path.write_text("sa-token-1")
    sts = STSClient(ISSUER, transport=httpx.MockTransport(fake))
    source = AssumedIdentity(sts, identity=IDENTITY, token_path=token_path, clock=clock)
    return source, fake, clock, token_path, sts.aclose


async def test_assumed_identity_caches_until_the_refresh_margin(tmp_path: pathlib.Path) -> None:
    source, fake, clock, _, close = await assumed(tmp_path)
    try:
        first = await source.token()
        clock.now = T0 + datetime.timedelta(minutes=54, seconds=59)  # expiry 11:00, margin 5 min
        assert await source.token() == first
        assert len(fake.presented) == 1
        clock.now = T0 + datetime.timedelta(minutes=55)
        second = await source.token()
    finally:
        await close()
    assert len(fake.presented) == 2
    assert (sub_of(first), sub_of(second)) == (f"{IDENTITY}#1", f"{IDENTITY}#2")
    assert fake.audiences == [[API_AUDIENCE], [API_AUDIENCE]]


async def test_assumed_identity_rereads_the_projected_token_and_honours_invalidate(
    tmp_path: pathlib.Path,
) -> None:
    source, fake, _, token_path, close = await assumed(tmp_path)
    try:
        await source.token()
        token_path.write_text("sa-token-2\n")  # the kubelet rotated it
        await source.token()  # still cached: no exchange, so no read needed
        source.invalidate()
        await source.token()
    finally:
        await close()
    assert fake.presented == ["sa-token-1", "sa-token-2"]


async def test_assumed_identity_shares_one_exchange_between_concurrent_callers(
    tmp_path: pathlib.Path,
) -> None:
    source, fake, _, _, close = await assumed(tmp_path)
    fake.gate = asyncio.Event()
    try:
        callers = asyncio.gather(*(source.token() for _ in range(10)))
        await asyncio.wait_for(fake.entered.wait(), timeout=5)
        fake.gate.set()  # everyone has queued up behind the first exchange by now
        tokens = await asyncio.wait_for(callers, timeout=5)
    finally:
        await close()
    assert len(fake.presented) == 1
    assert len(set(tokens)) == 1


async def test_assumed_identity_refreshes_short_tokens_half_way(tmp_path: pathlib.Path) -> None:
    source, fake, clock, _, close = await assumed(tmp_path, lifetime=datetime.timedelta(minutes=4))
    try:
        await source.token()
        clock.now = T0 + datetime.timedelta(minutes=1, seconds=59)
        await source.token()
        assert len(fake.presented) == 1
        clock.now = T0 + datetime.timedelta(minutes=2)
        await source.token()
    finally:
        await close()
    assert len(fake.presented) == 2


async def test_assumed_identity_repr_and_errors_hold_no_token(tmp_path: pathlib.Path) -> None:
    source, _, _, token_path, close = await assumed(tmp_path)
    try:
        token = await source.token()
        assert token not in repr(source)
        token_path.unlink()
        source.invalidate()
        with pytest.raises(CredentialsError, match="cannot read the token file") as caught:
            await source.token()
    finally:
        await close()
    assert "sa-token-1" not in str(caught.value)
    assert not caught.value.transient


async def test_client_with_assumed_identity_reexchanges_after_a_401(tmp_path: pathlib.Path) -> None:
    source, fake, _, _, close = await assumed(tmp_path)
    presented: list[str] = []

    def api(request: httpx.Request) -> httpx.Response:
        presented.append(request.headers["Authorization"].removeprefix("Bearer "))
        if len(presented) == 1:
            return httpx.Response(401, json={"code": 16, "message": "revoked"})
        return httpx.Response(200, json={"items": [{"name": "nginx"}]})

    try:
        async with ChainguardClient("https://api.test", source, transport=httpx.MockTransport(api)) as client:
            assert await client.list_repos() == ["nginx"]
    finally:
        await close()
    assert len(fake.presented) == 2
    assert [sub_of(token) for token in presented] == [f"{IDENTITY}#1", f"{IDENTITY}#2"]


# --- AssumedIdentity: every STS failure is a CredentialsError ------------------------------------


async def assumed_with(
    tmp_path: pathlib.Path, sts_router: Callable[[httpx.Request], httpx.Response]
) -> tuple[AssumedIdentity, Callable[[], Awaitable[None]]]:
    token_path = tmp_path / "sa-token"
    token_path.write_text(SUBJECT)
    sts = STSClient(ISSUER, transport=httpx.MockTransport(sts_router))
    return AssumedIdentity(sts, identity=IDENTITY, token_path=token_path, clock=Clock()), sts.aclose


def sts_error(
    status: int, code: int, message: str, **headers: str
) -> Callable[[httpx.Request], httpx.Response]:
    return lambda request: httpx.Response(
        status, json={"code": code, "message": message, "details": [{"echo": SUBJECT}]}, headers=headers
    )


@pytest.mark.parametrize(
    ("router", "status", "transient", "message"),
    [
        (sts_error(403, 7, f"verifying token: oidc: token is expired ({SUBJECT})"), 403, False, None),
        (sts_error(401, 16, "unauthenticated"), 401, False, "unauthenticated"),
        (sts_error(400, 3, "audience must be specified"), 400, False, "audience must be specified"),
        (sts_error(503, 14, "unavailable"), 503, True, "unavailable"),
        (sts_error(500, 13, "internal"), 500, True, "internal"),
        (sts_error(429, 8, "slow down", **{"Retry-After": "4"}), 429, True, "slow down"),
        (lambda request: httpx.Response(200, json={"nothing": "here"}), None, False, None),
    ],
    ids=["403", "401", "400", "503", "500", "429", "no token"],
)
async def test_assumed_identity_raises_credentials_error_for_any_sts_failure(
    tmp_path: pathlib.Path,
    router: Callable[[httpx.Request], httpx.Response],
    status: int | None,
    transient: bool,
    message: str | None,
) -> None:
    source, close = await assumed_with(tmp_path, router)
    try:
        with pytest.raises(CredentialsError) as caught:
            await source.token()
    finally:
        await close()
    error = caught.value
    assert error.status == status
    assert error.transient is transient
    assert not isinstance(error, PermissionDenied)  # the API client would retry that as propagation
    if message is not None:
        assert error.message == message
    if status == 403:
        assert error.message == "verifying token: oidc: token is expired ([REDACTED])"
    if status == 429:
        assert error.retry_after == 4.0
    for text in (str(error), repr(error), error.message):
        assert SUBJECT not in text
    assert IDENTITY in str(error)  # says whose token could not be had


@pytest.mark.parametrize("failure", [httpx.ConnectError, httpx.ReadTimeout])
async def test_assumed_identity_sts_transport_errors_are_transient_credentials_errors(
    tmp_path: pathlib.Path, failure: type[httpx.TransportError]
) -> None:
    def down(request: httpx.Request) -> httpx.Response:
        raise failure("down", request=request)

    source, close = await assumed_with(tmp_path, down)
    try:
        with pytest.raises(CredentialsError) as caught:
            await source.token()
    finally:
        await close()
    assert caught.value.status is None
    assert caught.value.transient
    assert failure.__name__ in str(caught.value)
    assert caught.value.__cause__ is None


async def test_an_sts_403_on_a_create_is_raised_at_once_not_retried_as_propagation(
    tmp_path: pathlib.Path,
) -> None:
    exchanges: list[httpx.Request] = []
    api_calls: list[httpx.Request] = []
    sleeps: list[float] = []

    def sts(request: httpx.Request) -> httpx.Response:
        exchanges.append(request)
        return httpx.Response(403, json={"code": 7, "message": "verifying token: identity keys expired"})

    def api(request: httpx.Request) -> httpx.Response:
        api_calls.append(request)
        return httpx.Response(200, json={})

    async def sleep(delay: float) -> None:
        sleeps.append(delay)

    source, close = await assumed_with(tmp_path, sts)
    try:
        async with ChainguardClient(
            "https://api.test", source, transport=httpx.MockTransport(api), sleep=sleep
        ) as client:
            with pytest.raises(CredentialsError, match="identity keys expired"):
                await client.create_role_binding(IDENTITY.split("/")[0], identity=IDENTITY, role="a" * 40)
    finally:
        await close()
    assert len(exchanges) == 1
    assert api_calls == []
    assert sleeps == []
