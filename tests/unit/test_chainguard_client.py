"""The Chainguard API client against ``httpx.MockTransport``: paths, bodies, paging, error mapping
and the retry policy. Sleeping is injected, so retries are checked through the recorded delays."""

from __future__ import annotations

import dataclasses
import datetime
import json
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest

from chainguard_identity_operator.chainguard import (
    AlreadyExists,
    APIError,
    ChainguardClient,
    ChainguardError,
    ClaimMatch,
    CredentialsError,
    Identity,
    InvalidArgument,
    NotFound,
    OutcomeUnknown,
    PermissionDenied,
    RateLimited,
    RetryPolicy,
    ServerError,
    StaticKeys,
    TransportError,
    Unauthenticated,
)
from chainguard_identity_operator.chainguard.errors import error_from_response, parse_retry_after, redact

API = "https://console-api.test"
ORG = "c95870ebffa72a258df087ea727ee92daf177e29"
IDENTITY = f"{ORG}/f067a9080d45a098"
ROLE = "2d8dc5b1e4b8a7f2b4c3d2e1f0a9b8c7d6e5f4a3"
BINDING = f"{ORG}/0123456789abcdef"
EXPIRES = datetime.datetime(2026, 12, 23, 10, 0, tzinfo=datetime.UTC)

Router = Callable[[httpx.Request], httpx.Response]


class FakeTokens:
    """A token source whose token changes each time it is invalidated."""

    def __init__(self) -> None:
        self.generation = 1
        self.invalidations = 0

    async def token(self) -> str:
        return f"eyJsecret.token-{self.generation}.sig"

    def invalidate(self) -> None:
        self.generation += 1
        self.invalidations += 1


class Harness:
    """A client wired to a router, recording every request, sleep and hook call."""

    def __init__(self, router: Router, retry: RetryPolicy | None = None) -> None:
        self.requests: list[httpx.Request] = []
        self.sleeps: list[float] = []
        self.hooks: list[tuple[str, str, int | None]] = []
        self.tokens = FakeTokens()

        def record(request: httpx.Request) -> httpx.Response:
            self.requests.append(request)
            return router(request)

        async def sleep(delay: float) -> None:
            self.sleeps.append(delay)

        self.client = ChainguardClient(
            API,
            self.tokens,
            transport=httpx.MockTransport(record),
            retry=retry or RetryPolicy(),
            on_request=lambda method, route, status: self.hooks.append((method, route, status)),
            sleep=sleep,
        )

    async def __aenter__(self) -> Harness:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.client.aclose()

    def body(self, index: int = -1) -> Any:
        return json.loads(self.requests[index].content)


def ok(payload: Any) -> httpx.Response:
    return httpx.Response(200, json=payload)


def fail(status: int, code: int, message: str, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.Response(status, json={"code": code, "message": message, "details": []}, headers=headers)


def sequence(*responses: httpx.Response) -> Router:
    """A router answering with ``responses`` in turn; a request beyond them fails the test."""
    pending = list(responses)

    def route(request: httpx.Request) -> httpx.Response:
        assert pending, f"unexpected request {request.method} {request.url}"
        return pending.pop(0)

    return route


IDENTITY_WIRE = {
    "uid": IDENTITY,
    "name": "dev.shop.puller",
    "description": "managed by chainguard-identity-operator",
    "claimMatch": {"issuer": "https://issuer.test", "subject": "system:serviceaccount:shop:default"},
    "createTime": "2026-11-23T10:00:00.123456789Z",
    "updateTime": "2026-11-23T10:00:00Z",
}


def static_identity() -> Identity:
    return Identity(
        uid=IDENTITY,
        name="dev.shop.puller",
        description="rotated",
        static_keys=StaticKeys(
            issuer="https://kubernetes.default.svc",
            subject="system:serviceaccount:shop:default",
            issuer_keys='{"keys": []}',
            expiration_time=EXPIRES,
        ),
    )


# --- paths, bodies and queries -------------------------------------------------------------------


async def test_get_identity_sends_bearer_and_parses_the_answer() -> None:
    async with Harness(sequence(ok(IDENTITY_WIRE))) as h:
        identity = await h.client.get_identity(IDENTITY)

    request = h.requests[0]
    assert request.method == "GET"
    assert request.url.raw_path.decode() == f"/iam/v2/identities/{ORG}/f067a9080d45a098"
    assert request.headers["Authorization"] == "Bearer eyJsecret.token-1.sig"
    assert identity is not None
    assert identity.uid == IDENTITY
    assert identity.claim_match == ClaimMatch(
        issuer="https://issuer.test", subject="system:serviceaccount:shop:default"
    )
    assert identity.create_time == datetime.datetime(2026, 11, 23, 10, 0, 0, 123456, tzinfo=datetime.UTC)
    assert h.hooks == [("GET", "/iam/v2/identities/{uid}", 200)]


async def test_get_identity_accepts_snake_case_and_missing_fields() -> None:
    wire = {
        "uid": IDENTITY,
        "name": "x.y.z",
        "static_keys": {"issuer": "https://k", "subject": "s", "issuer_keys": "{}", "expiration_time": None},
    }
    async with Harness(sequence(ok(wire))) as h:
        identity = await h.client.get_identity(IDENTITY)

    assert identity is not None
    assert identity.description == ""
    assert identity.static_keys is not None
    assert identity.static_keys.issuer_keys == "{}"
    assert identity.static_keys.expiration_time is None
    assert identity.create_time is None


async def test_get_identity_answers_none_when_absent() -> None:
    async with Harness(sequence(fail(404, 5, "identity not found"))) as h:
        assert await h.client.get_identity(IDENTITY) is None
    assert len(h.requests) == 1


async def test_list_identities_follows_pages_until_the_token_is_empty() -> None:
    second = {**IDENTITY_WIRE, "uid": f"{ORG}/1111111111111111", "name": "b"}
    pages = sequence(
        ok({"identities": [IDENTITY_WIRE], "nextPageToken": "page-2", "totalCount": "2"}),
        ok({"identities": [second], "nextPageToken": "", "totalCount": "2"}),
    )
    async with Harness(pages) as h:
        identities = await h.client.list_identities(ORG, name="dev.shop.puller")

    assert [i.uid for i in identities] == [IDENTITY, f"{ORG}/1111111111111111"]
    first, last = (r.url.params for r in h.requests)
    assert h.requests[0].url.path == "/iam/v2/identities"
    assert dict(first) == {"uidp.childrenOf": ORG, "name": "dev.shop.puller", "pageSize": "200"}
    assert last["pageToken"] == "page-2"
    assert last["uidp.childrenOf"] == ORG


async def test_list_identities_tolerates_an_empty_answer_and_snake_case_paging() -> None:
    pages = sequence(
        ok({"identities": [IDENTITY_WIRE], "next_page_token": "p2"}),
        ok({}),  # no keys at all: no identities, no next page
    )
    async with Harness(pages) as h:
        identities = await h.client.list_identities(ORG)
    assert [i.uid for i in identities] == [IDENTITY]
    assert "name" not in h.requests[0].url.params
    assert h.requests[1].url.params["pageToken"] == "p2"


async def test_list_stops_when_the_server_repeats_a_page_token() -> None:
    def loop(request: httpx.Request) -> httpx.Response:
        return ok({"identities": [], "nextPageToken": "same"})

    async with Harness(loop) as h:
        with pytest.raises(ChainguardError, match="repeated a page token"):
            await h.client.list_identities(ORG)
    assert len(h.requests) == 2


async def test_create_identity_posts_the_wire_form_under_the_parent() -> None:
    identity = Identity(
        uid="",
        name="dev.shop.puller",
        description="d",
        claim_match=ClaimMatch(issuer="https://issuer.test", subject="system:serviceaccount:shop:default"),
    )
    async with Harness(sequence(ok(IDENTITY_WIRE))) as h:
        created = await h.client.create_identity(ORG, identity)

    request = h.requests[0]
    assert (request.method, request.url.path) == ("POST", f"/iam/v2/identities/{ORG}")
    assert request.headers["Content-Type"] == "application/json"
    assert h.body() == identity.to_wire()
    assert created.uid == IDENTITY


@pytest.mark.parametrize(
    ("mask", "expected"),
    [
        (
            ["static_keys.issuer_keys", "static_keys.expiration_time"],
            {"staticKeys": {"issuerKeys": '{"keys": []}', "expirationTime": "2026-12-23T10:00:00Z"}},
        ),
        (["description"], {"description": "rotated"}),
        (
            ["claim_match"],
            {"claimMatch": {"issuer": "https://i", "subject": "s", "audience": "issuer.enforce.dev"}},
        ),
    ],
)
async def test_update_identity_sends_only_the_masked_fields(
    mask: list[str], expected: dict[str, Any]
) -> None:
    identity = static_identity()
    if mask == ["claim_match"]:
        identity = Identity(uid=IDENTITY, name="n", claim_match=ClaimMatch(issuer="https://i", subject="s"))
    async with Harness(sequence(ok(IDENTITY_WIRE))) as h:
        await h.client.update_identity(IDENTITY, identity, mask)

    request = h.requests[0]
    assert (request.method, request.url.path) == ("PATCH", f"/iam/v2/identities/{IDENTITY}")
    assert request.url.params["updateMask"] == ",".join(mask)
    assert h.body() == expected


async def test_update_identity_leaves_a_cleared_masked_field_out_of_the_body() -> None:
    identity = dataclass_replace_expiry(static_identity(), None)
    async with Harness(sequence(ok(IDENTITY_WIRE))) as h:
        await h.client.update_identity(IDENTITY, identity, ["static_keys.expiration_time"])
    assert h.requests[0].url.params["updateMask"] == "static_keys.expiration_time"
    assert h.body() == {}


def dataclass_replace_expiry(identity: Identity, expiry: datetime.datetime | None) -> Identity:
    assert identity.static_keys is not None
    keys = dataclasses.replace(identity.static_keys, expiration_time=expiry)
    return dataclasses.replace(identity, static_keys=keys)


@pytest.mark.parametrize("mask", [[], ["staticKeys.issuerKeys"], ["description,name"]])
async def test_update_identity_refuses_a_bad_mask_without_calling(mask: list[str]) -> None:
    async with Harness(sequence()) as h:
        with pytest.raises(ValueError, match=r"mask|field path"):
            await h.client.update_identity(IDENTITY, static_identity(), mask)
    assert h.requests == []


@pytest.mark.parametrize("answer", [ok({}), httpx.Response(200), fail(404, 5, "gone")])
async def test_delete_identity_succeeds_on_empty_answers_and_404(answer: httpx.Response) -> None:
    async with Harness(sequence(answer)) as h:
        await h.client.delete_identity(IDENTITY)
    assert (h.requests[0].method, h.requests[0].url.path) == ("DELETE", f"/iam/v2/identities/{IDENTITY}")


async def test_delete_identity_raises_other_errors() -> None:
    async with Harness(sequence(fail(403, 7, "denied"))) as h:
        with pytest.raises(PermissionDenied):
            await h.client.delete_identity(IDENTITY)


async def test_find_roles_and_groups_query_by_name() -> None:
    roles = {"roles": [{"uid": ROLE, "name": "registry.pull", "description": "", "capabilities": []}]}
    groups = {"groups": [{"uid": ORG, "name": "my-org.example", "verified": True}]}
    async with Harness(sequence(ok(roles), ok(groups))) as h:
        found_roles = await h.client.find_roles("registry.pull")
        found_groups = await h.client.find_groups("my-org.example")

    assert [(r.uid, r.builtin) for r in found_roles] == [(ROLE, True)]
    assert [(g.uid, g.verified) for g in found_groups] == [(ORG, True)]
    assert h.requests[0].url.path == "/iam/v2/roles"
    assert dict(h.requests[0].url.params) == {"name": "registry.pull"}
    assert h.requests[1].url.path == "/iam/v2/groups"
    assert dict(h.requests[1].url.params) == {"name": "my-org.example"}


async def test_role_bindings_list_create_delete() -> None:
    nested = {
        "uid": BINDING,
        "identity": {"uid": IDENTITY, "name": "x"},
        "group": {"uid": ORG},
        "role": {"uid": ROLE, "name": "registry.pull"},
        "createTime": "2026-11-23T10:00:00Z",
    }
    router = sequence(
        ok({"roleBindings": [nested], "nextPageToken": "2"}),
        ok({"role_bindings": [{"uid": f"{ORG}/fedcba9876543210", "identityUid": IDENTITY, "roleUid": ROLE}]}),
        ok(nested),
        fail(404, 5, "no such binding"),
    )
    async with Harness(router) as h:
        bindings = await h.client.list_role_bindings(identity=IDENTITY)
        created = await h.client.create_role_binding(ORG, identity=IDENTITY, role=ROLE)
        await h.client.delete_role_binding(BINDING)

    assert [(b.uid, b.identity_uid, b.role_uid) for b in bindings] == [
        (BINDING, IDENTITY, ROLE),
        (f"{ORG}/fedcba9876543210", IDENTITY, ROLE),
    ]
    assert dict(h.requests[0].url.params) == {"identity": IDENTITY, "pageSize": "200"}
    assert h.requests[1].url.params["pageToken"] == "2"
    assert (h.requests[2].method, h.requests[2].url.path) == ("POST", f"/iam/v2/roleBindings/{ORG}")
    assert h.body(2) == {"identityUid": IDENTITY, "roleUid": ROLE}
    assert (created.uid, created.group_uid) == (BINDING, ORG)
    assert (h.requests[3].method, h.requests[3].url.path) == ("DELETE", f"/iam/v2/roleBindings/{BINDING}")


async def test_list_repos_returns_names() -> None:
    async with Harness(sequence(ok({"items": [{"name": "nginx"}, {"name": "python"}, {"id": "x"}]}))) as h:
        assert await h.client.list_repos() == ["nginx", "python"]
    assert h.requests[0].url.path == "/registry/v1/repos"


@pytest.mark.parametrize("bad", ["../../admin", f"{ORG}?x=1", f"{ORG}//x", "", f"{ORG}/%2e"])
async def test_path_parameters_must_be_uidps(bad: str) -> None:
    async with Harness(sequence()) as h:
        with pytest.raises(ValueError, match="not a UIDP"):
            await h.client.get_identity(bad)
        with pytest.raises(ValueError, match="not a UIDP"):
            await h.client.list_identities(bad)
    assert h.requests == []


# --- error mapping -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "code", "cls", "transient"),
    [
        (400, 3, InvalidArgument, False),
        (400, 9, InvalidArgument, False),
        (400, 11, InvalidArgument, False),
        (401, 16, Unauthenticated, False),
        (403, 7, PermissionDenied, False),
        (404, 5, NotFound, False),
        (409, 6, AlreadyExists, False),
        (409, 10, AlreadyExists, False),
        (429, 8, RateLimited, True),
        (500, 13, ServerError, True),
        (500, 2, ServerError, True),
        (502, 14, ServerError, True),
        (503, 14, ServerError, True),
        (504, 4, ServerError, True),
    ],
)
def test_error_mapping_follows_the_contract_table(
    status: int, code: int, cls: type[APIError], transient: bool
) -> None:
    body = json.dumps({"code": code, "message": "what went wrong", "details": [{"@type": "x"}]}).encode()
    error = error_from_response(status, body, request="GET /iam/v2/identities/x")
    assert type(error) is cls
    assert (error.status, error.code, error.message) == (status, code, "what went wrong")
    assert error.transient is transient
    assert error.details == ({"@type": "x"},)
    assert str(error).startswith("GET /iam/v2/identities/x: HTTP ")


@pytest.mark.parametrize(
    ("status", "cls", "code"),
    [(400, InvalidArgument, 3), (404, NotFound, 5), (503, ServerError, 14), (418, APIError, 2)],
)
@pytest.mark.parametrize("body", [b"", b"<html>Bad Gateway</html>", b'["not", "an", "object"]'])
def test_error_mapping_falls_back_to_the_status(
    status: int, cls: type[APIError], code: int, body: bytes
) -> None:
    error = error_from_response(status, body)
    assert type(error) is cls
    assert error.code == code
    assert error.message  # a readable fallback such as "NotFound"


def test_retry_after_accepts_seconds_and_http_dates() -> None:
    now = datetime.datetime(2026, 11, 23, 10, 0, tzinfo=datetime.UTC)
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after("Mon, 23 Nov 2026 10:00:30 GMT", now=now) == 30.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None
    error = error_from_response(429, b"", retry_after="2.5")
    assert isinstance(error, RateLimited)
    assert error.retry_after == 2.5


# --- retries: reads ------------------------------------------------------------------------------


async def test_503_is_retried_with_jittered_exponential_backoff() -> None:
    router = sequence(fail(503, 14, "unavailable"), fail(503, 14, "unavailable"), ok(IDENTITY_WIRE))
    async with Harness(router) as h:
        identity = await h.client.get_identity(IDENTITY)

    assert identity is not None
    assert len(h.requests) == 3
    # base 0.5 s doubling, each jittered within [half, full]
    assert 0.25 <= h.sleeps[0] <= 0.5
    assert 0.5 <= h.sleeps[1] <= 1.0
    assert [status for _, _, status in h.hooks] == [503, 503, 200]


async def test_429_honours_retry_after_capped_at_max_delay() -> None:
    router = sequence(
        fail(429, 8, "slow down", headers={"Retry-After": "3"}),
        fail(429, 8, "slow down", headers={"Retry-After": "3600"}),
        ok({"roles": []}),
    )
    async with Harness(router, RetryPolicy(max_delay=10.0)) as h:
        assert await h.client.find_roles("viewer") == []
    assert h.sleeps == [3.0, 10.0]


async def test_transient_errors_give_up_after_the_attempts_with_the_last_error() -> None:
    router = sequence(*[fail(503, 14, "unavailable")] * 4, fail(504, 4, "deadline"))
    async with Harness(router, RetryPolicy(attempts=5, base_delay=1.0, max_delay=4.0)) as h:
        with pytest.raises(ServerError) as caught:
            await h.client.list_repos()
    assert len(h.requests) == 5
    assert len(h.sleeps) == 4
    assert all(d <= 4.0 for d in h.sleeps)
    assert caught.value.status == 504
    assert caught.value.transient


@pytest.mark.parametrize("status", [500, 502, 503, 504])
async def test_reads_are_retried_on_every_transient_status(status: int) -> None:
    async with Harness(sequence(fail(status, 13, "oops"), ok(IDENTITY_WIRE))) as h:
        assert await h.client.get_identity(IDENTITY) is not None
    assert [r.method for r in h.requests] == ["GET", "GET"]
    assert len(h.sleeps) == 1


async def test_a_read_answered_501_is_not_retried() -> None:
    async with Harness(sequence(fail(501, 12, "unimplemented"))) as h:
        with pytest.raises(ServerError):
            await h.client.get_identity(IDENTITY)
    assert len(h.requests) == 1


async def test_transport_errors_are_retried_for_reads_and_wrapped() -> None:
    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    async with Harness(down, RetryPolicy(attempts=3)) as h:
        with pytest.raises(TransportError) as caught:
            await h.client.get_identity(IDENTITY)
    assert len(h.requests) == 3
    assert len(h.sleeps) == 2
    assert str(caught.value) == f"GET /iam/v2/identities/{IDENTITY}: ReadTimeout"
    assert caught.value.transient
    assert caught.value.__cause__ is None
    assert h.hooks[-1] == ("GET", "/iam/v2/identities/{uid}", None)


# --- retries: writes are not reads ---------------------------------------------------------------

Mutation = Callable[[ChainguardClient], Awaitable[object]]

MUTATIONS: dict[str, tuple[str, str, Mutation]] = {
    "create identity": (
        "POST",
        f"/iam/v2/identities/{ORG}",
        lambda c: c.create_identity(ORG, static_identity()),
    ),
    "update identity": (
        "PATCH",
        f"/iam/v2/identities/{IDENTITY}",
        lambda c: c.update_identity(IDENTITY, static_identity(), ["description"]),
    ),
    "delete identity": ("DELETE", f"/iam/v2/identities/{IDENTITY}", lambda c: c.delete_identity(IDENTITY)),
    "create binding": (
        "POST",
        f"/iam/v2/roleBindings/{ORG}",
        lambda c: c.create_role_binding(ORG, identity=IDENTITY, role=ROLE),
    ),
    "delete binding": ("DELETE", f"/iam/v2/roleBindings/{BINDING}", lambda c: c.delete_role_binding(BINDING)),
}
WRITE_ANSWER = {**IDENTITY_WIRE, "identityUid": IDENTITY, "roleUid": ROLE}


@pytest.mark.parametrize("mutation", list(MUTATIONS))
@pytest.mark.parametrize("status", [500, 502, 504])
async def test_an_ambiguous_status_to_a_write_is_outcome_unknown_at_once(mutation: str, status: int) -> None:
    method, path, call = MUTATIONS[mutation]
    async with Harness(sequence(fail(status, 13, "boom"))) as h:
        with pytest.raises(OutcomeUnknown) as caught:
            await call(h.client)
    assert len(h.requests) == 1  # never re-sent: the first one may have been applied
    assert h.sleeps == []
    assert str(caught.value) == f"{method} {path}: outcome unknown (HTTP {status})"
    assert caught.value.status == status
    assert caught.value.transient
    assert isinstance(caught.value, ChainguardError)
    assert not isinstance(caught.value, APIError)  # callers must not take it for an answer


@pytest.mark.parametrize("mutation", list(MUTATIONS))
@pytest.mark.parametrize(
    "error",
    [httpx.ReadTimeout, httpx.WriteTimeout, httpx.RemoteProtocolError, httpx.ReadError],
    ids=lambda cls: cls.__name__,
)
async def test_a_lost_answer_to_a_write_is_outcome_unknown_at_once(
    mutation: str, error: type[httpx.TransportError]
) -> None:
    method, path, call = MUTATIONS[mutation]

    def lost(request: httpx.Request) -> httpx.Response:
        raise error("no answer", request=request)

    async with Harness(lost) as h:
        with pytest.raises(OutcomeUnknown) as caught:
            await call(h.client)
    assert len(h.requests) == 1
    assert str(caught.value) == f"{method} {path}: outcome unknown ({error.__name__})"
    assert caught.value.status is None
    assert caught.value.__cause__ is None  # httpx's exception holds the request and its headers
    assert h.hooks == [(method, h.hooks[0][1], None)]


@pytest.mark.parametrize("mutation", list(MUTATIONS))
@pytest.mark.parametrize("error", [httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout])
async def test_a_write_that_never_left_is_retried(mutation: str, error: type[httpx.TransportError]) -> None:
    # No connection was made, so no byte of the request reached the server: nothing can have happened.
    _, _, call = MUTATIONS[mutation]
    answers: list[httpx.Response] = [ok(WRITE_ANSWER)]

    def refused_once(request: httpx.Request) -> httpx.Response:
        if len(h.requests) == 1:
            raise error("refused", request=request)
        return answers.pop(0)

    async with Harness(refused_once) as h:
        await call(h.client)
    assert len(h.requests) == 2
    assert len(h.sleeps) == 1


@pytest.mark.parametrize("mutation", list(MUTATIONS))
async def test_writes_are_resent_on_503_and_429_honouring_retry_after(mutation: str) -> None:
    method, path, call = MUTATIONS[mutation]
    router = sequence(
        fail(503, 14, "unavailable"),
        fail(429, 8, "slow down", headers={"Retry-After": "7"}),
        ok(WRITE_ANSWER),
    )
    async with Harness(router) as h:
        await call(h.client)
    assert [(r.method, r.url.path) for r in h.requests] == [(method, path)] * 3
    assert 0.25 <= h.sleeps[0] <= 0.5
    assert h.sleeps[1] == 7.0


async def test_writes_resent_on_503_give_up_after_the_attempts() -> None:
    async with Harness(sequence(*[fail(503, 14, "unavailable")] * 3), RetryPolicy(attempts=3)) as h:
        with pytest.raises(ServerError) as caught:
            await h.client.create_identity(ORG, static_identity())
    assert len(h.requests) == 3
    assert caught.value.status == 503


async def test_a_503_then_an_ambiguous_answer_stops_at_the_ambiguous_one() -> None:
    async with Harness(sequence(fail(503, 14, "unavailable"), fail(504, 4, "deadline"))) as h:
        with pytest.raises(OutcomeUnknown, match=r"HTTP 504"):
            await h.client.create_identity(ORG, static_identity())
    assert len(h.requests) == 2


async def test_a_create_answered_501_is_not_retried_and_not_ambiguous() -> None:
    async with Harness(sequence(fail(501, 12, "unimplemented"))) as h:
        with pytest.raises(ServerError) as caught:
            await h.client.create_identity(ORG, static_identity())
    assert len(h.requests) == 1
    assert caught.value.status == 501


async def test_a_write_answered_200_without_json_is_outcome_unknown() -> None:
    async with Harness(sequence(httpx.Response(200, text="<html>proxy</html>"))) as h:
        with pytest.raises(
            OutcomeUnknown, match=r"outcome unknown \(HTTP 200 without a JSON body\)"
        ) as caught:
            await h.client.create_identity(ORG, static_identity())
    assert caught.value.status == 200


async def test_a_read_answered_200_without_json_is_an_error() -> None:
    async with Harness(sequence(httpx.Response(200, text="<html>proxy</html>"))) as h:
        with pytest.raises(ChainguardError, match="without a JSON body") as caught:
            await h.client.get_identity(IDENTITY)
    assert not isinstance(caught.value, OutcomeUnknown)


async def test_already_exists_is_its_own_permanent_error() -> None:
    async with Harness(sequence(fail(409, 6, "role binding exists"))) as h:
        with pytest.raises(AlreadyExists) as caught:
            await h.client.create_role_binding(ORG, identity=IDENTITY, role=ROLE)
    assert len(h.requests) == 1
    assert not caught.value.transient


# --- 403 right after a create --------------------------------------------------------------------

CREATES: dict[str, Mutation] = {
    "identity": lambda c: c.create_identity(ORG, static_identity()),
    "binding": lambda c: c.create_role_binding(ORG, identity=IDENTITY, role=ROLE),
}


@pytest.mark.parametrize("create", list(CREATES))
async def test_403_on_create_is_retried_like_terraform(create: str) -> None:
    router = sequence(fail(403, 7, "not yet"), fail(403, 7, "not yet"), ok(WRITE_ANSWER))
    async with Harness(router) as h:
        await CREATES[create](h.client)
    assert len(h.requests) == 3
    assert h.sleeps == [2.0, 4.0]


@pytest.mark.parametrize("create", list(CREATES))
async def test_403_on_create_gives_up_after_five_attempts_in_all(create: str) -> None:
    router = sequence(*[fail(403, 7, "permission denied")] * 5)
    async with Harness(router) as h:
        with pytest.raises(PermissionDenied):
            await CREATES[create](h.client)
    assert len(h.requests) == 5
    assert h.sleeps == [2.0, 4.0, 8.0, 16.0]  # no jitter, as the provider


async def test_the_forbidden_policy_is_configurable() -> None:
    policy = RetryPolicy(forbidden_attempts=3, forbidden_base_delay=1.0, forbidden_max_delay=1.5)
    async with Harness(sequence(*[fail(403, 7, "no")] * 3), policy) as h:
        with pytest.raises(PermissionDenied):
            await h.client.create_identity(ORG, static_identity())
    assert h.sleeps == [1.0, 1.5]


@pytest.mark.parametrize(
    "call",
    [
        lambda c: c.update_identity(IDENTITY, static_identity(), ["description"]),
        lambda c: c.delete_identity(IDENTITY),
        lambda c: c.list_identities(ORG),
    ],
    ids=["update", "delete", "list"],
)
async def test_403_elsewhere_is_not_retried(call: Mutation) -> None:
    async with Harness(sequence(fail(403, 7, "no"))) as h:
        with pytest.raises(PermissionDenied):
            await call(h.client)
    assert len(h.requests) == 1


class FailingTokens:
    """A token source that fails the way the STS does, ``fails`` times, then hands out a token."""

    def __init__(self, error: Exception, fails: int = 100) -> None:
        self.error = error
        self.fails = fails
        self.calls = 0

    async def token(self) -> str:
        self.calls += 1
        if self.calls <= self.fails:
            raise self.error
        return "eyJfine.token.sig"

    def invalidate(self) -> None:
        pass


def client_with(tokens: Any, router: Router, sleeps: list[float]) -> ChainguardClient:
    async def sleep(delay: float) -> None:
        sleeps.append(delay)

    return ChainguardClient(API, tokens, transport=httpx.MockTransport(router), sleep=sleep)


@pytest.mark.parametrize("create", list(CREATES))
async def test_a_403_from_our_own_sts_exchange_is_not_a_propagation_delay(create: str) -> None:
    tokens = FailingTokens(CredentialsError("verifying token: oidc: token is expired", status=403))
    sleeps: list[float] = []
    async with client_with(tokens, sequence(), sleeps) as client:
        with pytest.raises(CredentialsError) as caught:
            await CREATES[create](client)
    assert tokens.calls == 1
    assert sleeps == []
    assert caught.value.status == 403
    assert not isinstance(caught.value, PermissionDenied)


async def test_a_token_source_raising_an_api_error_surfaces_as_credentials_error() -> None:
    # A token source of another make that lets the STS's PermissionDenied through must not
    # be mistaken for the API's 403 either (the bug this guards against retried it 5 times).
    denied = PermissionDenied(403, 7, "verifying token: no", request="POST /sts/exchange")
    tokens = FailingTokens(denied)
    sleeps: list[float] = []
    async with client_with(tokens, sequence(), sleeps) as client:
        with pytest.raises(CredentialsError) as caught:
            await client.create_role_binding(ORG, identity=IDENTITY, role=ROLE)
    assert tokens.calls == 1
    assert (caught.value.status, caught.value.message) == (403, "verifying token: no")
    assert not caught.value.transient


async def test_a_transient_credentials_error_is_retried_before_anything_is_sent() -> None:
    tokens = FailingTokens(CredentialsError("unavailable", status=503, transient=True), fails=2)
    sleeps: list[float] = []
    async with client_with(tokens, sequence(ok(IDENTITY_WIRE)), sleeps) as client:
        created = await client.create_identity(ORG, static_identity())
    assert created.uid == IDENTITY
    assert tokens.calls == 3
    assert len(sleeps) == 2


# --- 401 -----------------------------------------------------------------------------------------


async def test_401_invalidates_the_token_and_retries_once() -> None:
    async with Harness(sequence(fail(401, 16, "token expired"), ok(IDENTITY_WIRE))) as h:
        assert await h.client.get_identity(IDENTITY) is not None
    assert h.tokens.invalidations == 1
    assert [r.headers["Authorization"] for r in h.requests] == [
        "Bearer eyJsecret.token-1.sig",
        "Bearer eyJsecret.token-2.sig",
    ]
    assert h.sleeps == []


async def test_a_second_401_is_raised() -> None:
    async with Harness(sequence(fail(401, 16, "no"), fail(401, 16, "still no"))) as h:
        with pytest.raises(Unauthenticated, match="still no"):
            await h.client.get_identity(IDENTITY)
    assert len(h.requests) == 2
    assert h.tokens.invalidations == 1


# --- adopting a binding a lost answer created ----------------------------------------------------


def binding_wire(uid: str, group: str, role: str, identity: str = IDENTITY) -> dict[str, Any]:
    return {
        "uid": uid,
        "identityUid": identity,
        "roleUid": role,
        "identity": {"uid": identity},
        "group": {"uid": group},
        "role": {"uid": role},
    }


async def test_find_role_binding_filters_by_group_and_role() -> None:
    other_org = "0" * 40
    other_role = "1" * 40
    listed = {
        "roleBindings": [
            binding_wire(f"{other_org}/0000000000000001", other_org, ROLE),
            binding_wire(f"{ORG}/0000000000000002", ORG, other_role),
            binding_wire(f"{ORG}/0000000000000003", ORG, ROLE),
        ],
        "nextPageToken": "",
    }
    async with Harness(sequence(ok(listed), ok(listed))) as h:
        found = await h.client.find_role_binding(ORG, identity=IDENTITY, role=ROLE)
        missing = await h.client.find_role_binding(other_org, identity=IDENTITY, role=other_role)
    assert found is not None
    assert found.uid == f"{ORG}/0000000000000003"
    assert missing is None
    assert dict(h.requests[0].url.params) == {"identity": IDENTITY, "pageSize": "200"}


# --- secrets -------------------------------------------------------------------------------------


async def test_tokens_never_appear_in_errors_or_repr() -> None:
    echo = "bad token eyJsecret.token-1.sig and eyJhbGciOi.eyJzdWIiOi.c2ln rejected"
    async with Harness(sequence(fail(400, 3, echo))) as h:
        with pytest.raises(InvalidArgument) as caught:
            await h.client.get_identity(IDENTITY)
        client_repr = repr(h.client)
    for text in (str(caught.value), repr(caught.value), caught.value.message, client_repr):
        assert "eyJsecret" not in text
        assert "eyJhbGciOi" not in text
    assert "[REDACTED]" in caught.value.message
    assert client_repr == f"ChainguardClient({API!r})"


HEADER = "eyJhbGciOiJSUzI1NiIsImtpZCI6IjEyMyJ9"  # {"alg":"RS256","kid":"123"}
PAYLOAD = "eyJzdWIiOiJzeXN0ZW06c2VydmljZWFjY291bnQifQ"  # {"sub":"system:serviceaccount"}


@pytest.mark.parametrize(
    "fragment",
    [
        f"{HEADER}.{PAYLOAD}.c2lnbmF0dXJl",  # a whole token
        f"{HEADER}.{PAYLOAD}",  # header and payload, as a server may echo them
        f"{HEADER}.{PAYLOAD}.",  # an unsigned token
        PAYLOAD,  # a payload alone
        HEADER,  # a header alone
        "eyJsecret.token-1.sig",  # short segments, three of them
    ],
    ids=["three parts", "two parts", "unsigned", "payload", "header", "short three parts"],
)
def test_redact_scrubs_every_jwt_shaped_fragment(fragment: str) -> None:
    text = redact(f"verifying token ({fragment}): oidc: token is expired")
    assert text == "verifying token ([REDACTED]): oidc: token is expired"


def test_redact_scrubs_the_given_secrets_and_keeps_ordinary_text() -> None:
    assert redact("key s3cr3t-value leaked", "s3cr3t-value", "") == "key [REDACTED] leaked"
    ordinary = "identity c95870ebffa72a258df087ea727ee92daf177e29/f067a9080d45a098 not found (eyJ)"
    assert redact(ordinary) == ordinary


def test_error_details_never_reach_a_message() -> None:
    marker = "DETAIL-MARKER"
    body = json.dumps(
        {
            "code": 13,
            "message": "internal",
            "details": [{"@type": "debug", "detail": f"{marker} {HEADER}.{PAYLOAD}", "stack": [marker]}],
        }
    ).encode()
    error = error_from_response(500, body, request="POST /iam/v2/identities/x")
    assert error.details  # kept for code that wants it ...
    unknown = OutcomeUnknown("POST /iam/v2/identities/x", "HTTP 500", status=500)
    credentials = CredentialsError(error.message, status=error.status)
    for text in (str(error), repr(error), error.message, str(unknown), repr(unknown), str(credentials)):
        assert marker not in text  # ... but never shown
        assert HEADER not in text
