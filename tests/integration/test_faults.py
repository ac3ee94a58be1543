"""Issue 7, "nothing lost, nothing duplicated": the real operator against emulators that fail on purpose.

Every test injects one failure the Chainguard API contract allows — an answer lost after the write
committed, a refused or clamped renewal, an identity edited outside, a cluster whose JWKS cannot be read,
a permission error in the finalizer — and proves what must hold afterwards: one identity per resource,
one binding per role, one write per change, a pod that can still exchange its token, and no token text
anywhere a person can read it.

"Nothing more happened" is never proven by waiting a while: a test drives a known number of passes
(``drive_passes``: fast-forward the resync interval and wait for the reconcile counter) and then counts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web

# kmock 0.8 (pinned) exports Response without listing it in __all__ (as cgid_testkit.kube notes).
from kmock._internal.rendering import Response

from cgid_testkit.chainguard import Fault, Lose, RecordedRequest
from cgid_testkit.harness import World, world
from chainguard_identity_operator import naming
from chainguard_identity_operator.chainguard.types import parse_time

DAY = datetime.timedelta(days=1)
STATIC: dict[str, Any] = {"mode": "Static", "static": {"validFor": "720h", "renewBefore": "240h"}}
VALID_FOR = datetime.timedelta(hours=720)
ROTATE = "iam.chainguard.dev/rotate"
IDENTITY_PATH = re.compile(r"^/iam/v2/identities/[0-9a-f]{40}/[0-9a-f]{16}$")
JWT_SHAPED = re.compile(r"eyJ[\w-]{7,}")


# ---------------------------------------------------------------------------------------------------
# Helpers


def cr(
    name: str, namespace: str = "shop", annotations: dict[str, str] | None = None, **spec: Any
) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name, "namespace": namespace}
    if annotations:
        metadata["annotations"] = annotations
    return {"metadata": metadata, "spec": spec}


def name_of(resource: str, namespace: str = "shop") -> str:
    return naming.identity_name("sandbox", namespace, resource)


def identities_named(w: World, name: str) -> list[str]:
    return [uid for uid, identity in w.chainguard.identities.items() if identity["name"] == name]


def bindings_of(w: World, uid: str) -> list[dict[str, Any]]:
    return [b for b in w.chainguard.role_bindings.values() if b["identityUid"] == uid]


def roles_of(w: World, uid: str) -> list[str]:
    return sorted(b["role"]["name"] for b in bindings_of(w, uid))


def requests(w: World, method: str, path: str | re.Pattern[str]) -> list[RecordedRequest]:
    """The requests the Chainguard emulator answered with this method on this path (or pattern)."""
    match = (lambda p: p == path) if isinstance(path, str) else (lambda p: path.search(p) is not None)
    return [r for r in w.chainguard.requests if r.method == method and match(r.path)]


def patches_of(w: World, uid: str, status: int | None = None) -> list[RecordedRequest]:
    return [
        r for r in requests(w, "PATCH", f"/iam/v2/identities/{uid}") if status is None or r.status == status
    ]


def mask_of(request: RecordedRequest) -> tuple[str, ...]:
    return tuple(path for value in request.query.get("updateMask", ()) for path in value.split(","))


async def status_of(w: World, namespace: str, name: str) -> dict[str, Any]:
    obj = await w.get(namespace, name)
    assert obj is not None
    status: dict[str, Any] = obj.get("status") or {}
    return status


def condition(status: dict[str, Any], kind: str) -> dict[str, Any]:
    found: dict[str, Any] | None = next(
        (c for c in status.get("conditions", []) if c.get("type") == kind), None
    )
    assert found is not None, f"no {kind} condition in {status}"
    return found


async def wait_status(
    w: World,
    namespace: str,
    name: str,
    predicate: Callable[[dict[str, Any]], Any],
    what: str,
    timeout: float = 30.0,
) -> dict[str, Any]:
    async def probe() -> dict[str, Any] | None:
        status = await status_of(w, namespace, name)
        return status if predicate(status) else None

    return await w.wait_for(probe, what=what, timeout=timeout)


async def wait_gone(w: World, namespace: str, name: str, timeout: float = 30.0) -> None:
    async def gone() -> bool:
        return await w.get(namespace, name) is None

    await w.wait_for(gone, what=f"{namespace}/{name} to be finalized and removed", timeout=timeout)


def passes(w: World) -> float:
    assert w.runtime is not None
    return w.runtime.metrics.total("chainguard_identity_reconciles_total")


async def drive_passes(w: World, resources: int = 1) -> None:
    """At least one full resync pass for each of ``resources`` resources, begun after this call.

    Fast-forwarding the resync interval makes every listing stale and wakes every worker; the reconcile
    counter then grows by one per resource. A pass still finishing when this is called would be counted
    too, so the first resync only settles the operator and the second one is the one driven.
    """
    for _ in range(2):
        before = passes(w)
        w.advance(w.settings.resync_interval)

        async def done(before: float = before) -> bool:
            return passes(w) >= before + resources

        await w.wait_for(done, what=f"{resources} reconcile pass(es)", timeout=15)


async def exchange_status(w: World, namespace: str, service_account: str, identity: str) -> int:
    return (await w.pod_exchange(namespace, service_account, identity)).status_code


async def events(w: World, namespace: str, reason: str) -> list[dict[str, Any]]:
    return [e for e in await w.events(namespace) if e.get("reason") == reason]


def keep_operator_credentials(w: World) -> None:
    """Make the operator's own bootstrap identity outlive the test and trust the cluster's current keys.

    Nothing in these tests manages it (no resource adopts it), so a test that fast-forwards past its
    30 days or rotates the cluster's signing key would otherwise lock the operator out of the API.
    """
    keys = w.chainguard.identities[w.operator_identity]["staticKeys"]
    keys["issuerKeys"] = json.dumps(w.kube.jwks())
    keys["expirationTime"] = (w.clock() + 3 * 365 * DAY).strftime("%Y-%m-%dT%H:%M:%SZ")


class Outage:
    """Make one request of the Kubernetes emulator fail until ``end()``: a kmock reaction that answers
    ``response`` while the outage lasts and steps aside afterwards (kmock disables a reaction that
    declines a request, so an ended outage never answers again; start a new one to fail again)."""

    def __init__(self, w: World, criterion: str, response: Callable[[], Response]) -> None:
        self.active = True
        self.hits = 0

        def react() -> Any:
            if not self.active:
                return NotImplemented  # fall through to the emulator's own answer
            self.hits += 1
            return response()

        w.kube[criterion] << react

    def end(self) -> None:
        self.active = False


def jwks_outage(w: World) -> Outage:
    return Outage(w, "get /openid/v1/jwks", lambda: Response(status=500))


class EchoingProxy:
    """A reverse proxy in front of the Chainguard emulator that answers the first request matching each
    rule itself, with an error body whose message is any text — what the emulator's faults cannot do
    (their message is fixed). Everything else is passed through unchanged."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.rules: list[dict[str, Any]] = []
        self.url = ""
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    def answer(self, method: str, path_regex: str, *, status: int, code: int, message: str) -> None:
        rule = {"method": method, "path": re.compile(path_regex), "status": status, "code": code}
        self.rules.append({**rule, "message": message, "hits": 0})

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        for rule in self.rules:
            if rule["method"] == request.method and rule["path"].search(request.path) and not rule["hits"]:
                rule["hits"] += 1
                body = {"code": rule["code"], "message": rule["message"], "details": []}
                return web.json_response(body, status=rule["status"])
        assert self._session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() in ("authorization", "content-type")}
        async with self._session.request(
            request.method, self.upstream + request.path_qs, headers=headers, data=await request.read()
        ) as upstream:
            body_bytes = await upstream.read()
            kept = {k: v for k, v in upstream.headers.items() if k.lower() in ("content-type", "retry-after")}
            return web.Response(status=upstream.status, body=body_bytes, headers=kept)

    async def __aenter__(self) -> EchoingProxy:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        self._session = aiohttp.ClientSession()
        return self

    async def __aexit__(self, *_: object) -> None:
        if self._session is not None:
            await self._session.close()
        if self._runner is not None:
            await self._runner.cleanup()


@contextlib.asynccontextmanager
async def proxied_world(**options: Any) -> AsyncIterator[tuple[World, EchoingProxy]]:
    """A world whose operator reaches the Chainguard API through an ``EchoingProxy``."""
    async with world(start=False, **options) as w, EchoingProxy(w.chainguard.api_url) as proxy:
        w.settings = dataclasses.replace(w.settings, api_url=proxy.url)
        await w.start_operator()
        try:
            yield w, proxy
        finally:
            await w.stop_operator()


def token_fragment(w: World) -> str:
    """The first two segments (header.payload) of a real projected token: what a server echoes of a
    token it could not parse."""
    token = w.kube.mint_token("shop", "default", audiences=["issuer.enforce.dev"], expiration_seconds=600)
    header, payload, _signature = token.split(".")
    return f"{header}.{payload}"


async def readable_texts(w: World, namespace: str) -> list[tuple[str, str]]:
    """Everything a person can read about resources in ``namespace``: every status and event body the
    operator sent to the cluster, and the events stored there."""
    sent = [
        (f"{str.upper(r.method)} {r.url.path}", r.text)
        for r in list(w.kube)
        if r.method in ("PATCH", "POST", "PUT") and f"/namespaces/{namespace}/" in str(r.url.path)
    ]
    return [*sent, ("events", json.dumps(await w.events(namespace)))]


def assert_no_fragment(texts: list[tuple[str, str]], fragment: str) -> None:
    """No text holds the fragment, either of its segments, or anything JWT-shaped; the failure lists
    every place a piece reached."""
    assert texts, "nothing to check"
    pieces = [re.compile(re.escape(piece)) for piece in fragment.split(".")] + [JWT_SHAPED]
    leaks: list[str] = []
    for where, text in texts:
        for pattern in pieces:
            for found in pattern.finditer(text):
                leaks.append(f"{where}: ...{text[max(0, found.start() - 100) : found.start() + 16]}...")
    assert not leaks, "token text reached:\n" + "\n".join(dict.fromkeys(leaks))


# ---------------------------------------------------------------------------------------------------
# 1. A create whose answer is lost


@pytest.mark.parametrize("lose", ["status", "drop", "hold"])
async def test_a_create_whose_answer_is_lost_leaves_exactly_one_identity(lose: Lose) -> None:
    # The harness sets a 5 s request timeout; a held answer must outlast the operator's timeout.
    async with world(settings_overrides={"request_timeout": datetime.timedelta(seconds=1)}) as w:
        fault = w.chainguard.faults.add(
            "POST",
            r"^/iam/v2/identities/",
            after_commit=True,
            lose=lose,
            status=504 if lose == "status" else None,
            delay=4.0 if lose == "hold" else None,
        )
        await w.apply(cr("ci", parent=w.org))
        status = (await w.wait_ready("shop", "ci", timeout=15))["status"]
        uid = status["identityId"]
        assert fault.hits == 1
        assert [f.kind for f in w.chainguard.faults.injected] == [lose]

        # Held too: the create committed before its answer was held, so the next pass finds it by
        # listing and has no reason to create another (a looser "duplicates are removed again" would
        # let a client that re-sends writes, or a pass that does not look first, pass).
        assert w.chainguard.writes().get("identity.create", 0) == 1, "the create was sent again"
        assert roles_of(w, uid) == ["registry.pull"]
        data = await w.config_map("shop", "ci-chainguard-identity")
        assert data is not None
        assert data["CHAINGUARD_IDENTITY"] == uid
        assert await exchange_status(w, "shop", "default", uid) == 200

        # After the grace period no extra identity is left, and none was ever made and removed.
        w.advance(w.settings.replacement_grace + datetime.timedelta(seconds=1))
        await drive_passes(w)
        assert identities_named(w, name_of("ci")) == [uid]
        assert not (await status_of(w, "shop", "ci")).get("retiring")
        writes = w.chainguard.writes()
        assert writes.get("identity.create", 0) == 1
        assert writes.get("identity.delete", 0) == 0


# ---------------------------------------------------------------------------------------------------
# 2. A role binding whose answer is lost; a binding that exists already


async def test_a_role_binding_whose_answer_is_lost_is_bound_once(sandbox: World) -> None:
    w = sandbox
    fault = w.chainguard.faults.add("POST", r"^/iam/v2/roleBindings/", status=504, after_commit=True)
    await w.apply(cr("ci", parent=w.org, roles=["registry.pull", "viewer"]))
    # Within a few seconds: the retry comes with the failure backoff, not at the next resync (30 s).
    uid = (await w.wait_ready("shop", "ci", timeout=5))["status"]["identityId"]
    assert fault.hits == 1
    assert roles_of(w, uid) == ["registry.pull", "viewer"]
    assert w.chainguard.writes().get("role_binding.create", 0) == 2
    posts = len(requests(w, "POST", re.compile(r"^/iam/v2/roleBindings/")))
    assert posts <= 3  # one per role, and at most one retry (answered 409) of the lost one

    # No POST is repeated on later passes.
    await drive_passes(w)
    await drive_passes(w)
    assert len(requests(w, "POST", re.compile(r"^/iam/v2/roleBindings/"))) == posts
    assert roles_of(w, uid) == ["registry.pull", "viewer"]
    assert await exchange_status(w, "shop", "default", uid) == 200


async def test_a_role_binding_answered_already_exists_counts_as_bound(sandbox: World) -> None:
    w = sandbox
    await w.apply(cr("ci", parent=w.org))
    uid = (await w.wait_ready("shop", "ci"))["status"]["identityId"]
    mark = len(w.chainguard.requests)

    # The binding appears after the operator read the parent's listing (another writer, or an earlier
    # attempt whose answer was lost): the operator's create is answered 409 AlreadyExists.
    w.chainguard.bind(uid, w.org, "viewer")
    await w.apply(cr("ci", parent=w.org, roles=["registry.pull", "viewer"]))

    async def both_recorded() -> bool:
        status = await status_of(w, "shop", "ci")
        return sorted(b["role"] for b in status.get("roleBindings", [])) == ["registry.pull", "viewer"]

    await w.wait_for(both_recorded, what="the viewer binding in status", timeout=5)
    await w.wait_ready("shop", "ci", timeout=5)
    posts = [r for r in w.chainguard.requests[mark:] if r.method == "POST" and "/roleBindings/" in r.path]
    assert [r.status for r in posts] == [409]
    assert roles_of(w, uid) == ["registry.pull", "viewer"]

    await drive_passes(w)
    assert [r for r in w.chainguard.requests[mark:] if r.method == "POST"] == posts
    assert roles_of(w, uid) == ["registry.pull", "viewer"]


# ---------------------------------------------------------------------------------------------------
# 3. Deletion in the middle of a replacement


async def test_deleting_during_a_replacement_deletes_the_new_and_the_retiring_identity() -> None:
    options = {"max_static_lifetime": 30 * DAY, "max_lifetime_from_creation": True}
    # A long grace period: the retiring identity must still exist when the resource is deleted.
    overrides = {"replacement_grace": datetime.timedelta(minutes=10)}
    async with world(chainguard_options=options, settings_overrides=overrides) as w:
        await w.apply(cr("ci", parent=w.org, roles=["registry.pull", "viewer"], **STATIC))
        old = (await w.wait_ready("shop", "ci"))["status"]["identityId"]

        w.advance(21 * DAY)  # the renewal is refused in place, so the identity is replaced
        status = await wait_status(
            w, "shop", "ci", lambda s: s.get("retiring"), "the old identity to be retiring"
        )
        new = status["identityId"]
        assert new != old
        assert [r["identityId"] for r in status["retiring"]] == [old]
        assert roles_of(w, old) == roles_of(w, new) == ["registry.pull", "viewer"]

        await w.delete("shop", "ci")
        await wait_gone(w, "shop", "ci")
        assert old not in w.chainguard.identities
        assert new not in w.chainguard.identities
        assert bindings_of(w, old) == []
        assert bindings_of(w, new) == []
        assert identities_named(w, name_of("ci")) == []


# ---------------------------------------------------------------------------------------------------
# 4. The cluster's JWKS cannot be read


async def test_a_jwks_outage_keeps_static_identities_ready_and_a_rotation_during_it_is_caught_up() -> None:
    overrides = {"jwks_max_staleness": datetime.timedelta(minutes=2)}
    async with world(settings_overrides=overrides) as w:
        names = ("one", "two")
        for name in names:
            await w.apply(cr(name, parent=w.org, **STATIC))
        uids = {name: (await w.wait_ready("shop", name))["status"]["identityId"] for name in names}
        fingerprint = (await status_of(w, "shop", "one"))["keys"]["fingerprint"]
        assert w.runtime is not None

        # One failed read (and a resync on top of it) changes nothing: the last good keys are used.
        outage = jwks_outage(w)
        await w.poll_cluster()
        facts = w.runtime.facts.facts
        assert facts is not None
        assert facts.keys_error is not None
        await drive_passes(w, len(names))
        for name in names:
            ready = condition(await status_of(w, "shop", name), "Ready")
            assert ready["status"] == "True", ready
        assert outage.hits >= 1

        # The cluster rotates its signing key while reads fail; once they work again the new keys are
        # uploaded after one poll, without waiting for a resync.
        w.kube.rotate_signing_key(keep_previous=False)
        keep_operator_credentials(w)
        before = {uid: len(patches_of(w, uid)) for uid in uids.values()}
        assert await exchange_status(w, "shop", "default", uids["one"]) == 403  # new-key tokens fail
        outage.end()
        await w.poll_cluster()
        for name, uid in uids.items():
            status = await wait_status(
                w,
                "shop",
                name,
                lambda s: s.get("keys", {}).get("fingerprint") != fingerprint,
                f"{name}'s new keys",
                timeout=5,
            )
            assert status["identityId"] == uid
            assert await exchange_status(w, "shop", "default", uid) == 200
        for uid in uids.values():
            new_patches = patches_of(w, uid)[before[uid] :]
            assert [(r.status, mask_of(r)) for r in new_patches] == [(200, ("static_keys.issuer_keys",))]

        # Past the staleness bound, with reads failing again, the keys are not trusted any more.
        second = jwks_outage(w)
        await w.poll_cluster()
        w.advance(datetime.timedelta(minutes=3))
        for name in names:
            obj = await w.wait_condition("shop", name, "Ready", "False", reason="ClusterKeysUnavailable")
            assert "/openid/v1/jwks" in condition(obj["status"], "Ready")["message"]
        assert second.hits >= 1
        second.end()


# ---------------------------------------------------------------------------------------------------
# 5. Renewal refused or clamped


async def test_a_clamped_renewal_is_noticed_and_the_identity_replaced() -> None:
    options = {
        "max_static_lifetime": 30 * DAY,
        "max_lifetime_from_creation": True,
        "expiry_overrun": "clamp",  # the API stores its limit instead of refusing, and answers 200
    }
    async with world(chainguard_options=options) as w:
        await w.apply(cr("ci", parent=w.org, roles=["registry.pull"], **STATIC))
        old = (await w.wait_ready("shop", "ci"))["status"]["identityId"]
        created = parse_time(w.chainguard.identities[old]["createTime"])
        assert created is not None

        w.advance(21 * DAY)
        status = await wait_status(w, "shop", "ci", lambda s: s.get("identityId") != old, "a replacement")
        new = status["identityId"]
        await w.wait_ready("shop", "ci")

        renewals = patches_of(w, old, 200)
        assert [mask_of(r) for r in renewals] == [("static_keys.expiration_time",)]
        clamped = parse_time(w.chainguard.identities[old]["staticKeys"]["expirationTime"])
        assert clamped == created + 30 * DAY  # what the API did instead of what was asked
        expires = parse_time((await status_of(w, "shop", "ci"))["expiresAt"])
        assert expires is not None
        assert abs((expires - (w.clock() + VALID_FOR)).total_seconds()) < 120
        assert [r["identityId"] for r in (await status_of(w, "shop", "ci"))["retiring"]] == [old]
        assert roles_of(w, new) == ["registry.pull"]
        assert await exchange_status(w, "shop", "default", new) == 200

        w.advance(w.settings.replacement_grace + datetime.timedelta(seconds=1))
        await wait_status(w, "shop", "ci", lambda s: not s.get("retiring"), "the old identity to go")
        assert identities_named(w, name_of("ci")) == [new]
        assert patches_of(w, new) == []  # the replacement did not need renewing


def expiry_moved_on_from(previous: str) -> Callable[[dict[str, Any]], bool]:
    return lambda status: status.get("expiresAt") != previous


async def test_renewals_up_to_the_lifetime_limit_then_a_replacement_without_a_refused_patch() -> None:
    async with world() as w:  # the strict default: at most 365 days after creation
        keep_operator_credentials(w)
        await w.apply(cr("ci", parent=w.org, **STATIC))
        status = (await w.wait_ready("shop", "ci"))["status"]
        uid = status["identityId"]
        created = parse_time(w.chainguard.identities[uid]["createTime"])
        assert created is not None
        limit = created + 365 * DAY

        renewals = 0
        while True:
            renew_at = parse_time(status["renewAt"])
            assert renew_at is not None
            due = renew_at + datetime.timedelta(minutes=1)
            if due + VALID_FOR > limit:
                break  # the next renewal would pass creation + 365 days
            w.advance(due - w.clock())
            status = await wait_status(
                w, "shop", "ci", expiry_moved_on_from(status["expiresAt"]), f"renewal {renewals + 1}"
            )
            assert status["identityId"] == uid
            renewals += 1
        assert renewals >= 15
        assert [mask_of(r) for r in patches_of(w, uid)] == [("static_keys.expiration_time",)] * renewals

        # Its expiry cannot be extended any more; a cluster key rotation still reaches it, alone.
        fingerprint = status["keys"]["fingerprint"]
        w.kube.rotate_signing_key()
        keep_operator_credentials(w)
        await w.poll_cluster()
        status = await wait_status(
            w, "shop", "ci", lambda s: s["keys"]["fingerprint"] != fingerprint, "the new keys", timeout=5
        )
        assert status["identityId"] == uid
        key_upload = patches_of(w, uid)[renewals:]
        assert [(r.status, mask_of(r)) for r in key_upload] == [(200, ("static_keys.issuer_keys",))]
        assert await exchange_status(w, "shop", "default", uid) == 200

        # The next renewal is a replacement, made without asking the API for what it would refuse.
        renew_at = parse_time(status["renewAt"])
        assert renew_at is not None
        w.advance(renew_at + datetime.timedelta(minutes=1) - w.clock())
        status = await wait_status(w, "shop", "ci", lambda s: s.get("identityId") != uid, "the replacement")
        new = status["identityId"]
        await w.wait_ready("shop", "ci")
        assert len(patches_of(w, uid)) == renewals + 1
        assert [r for r in requests(w, "PATCH", IDENTITY_PATH) if r.status == 400] == []
        assert await exchange_status(w, "shop", "default", new) == 200
        new_expiry = parse_time(w.chainguard.identities[new]["staticKeys"]["expirationTime"])
        assert new_expiry is not None
        assert abs((new_expiry - (w.clock() + VALID_FOR)).total_seconds()) < 120


async def test_a_key_rotation_is_uploaded_on_its_own_when_the_renewal_beside_it_is_refused() -> None:
    # The API limits the lifetime more than the operator was told (30 days, not 365): the renewal is
    # refused. The key upload due in the same pass must not go down with it — pods still holding the
    # old identity during the grace period present tokens signed with the new key.
    options = {"max_static_lifetime": 30 * DAY, "max_lifetime_from_creation": True}
    async with world(chainguard_options=options) as w:
        await w.apply(cr("ci", parent=w.org, **STATIC))
        old = (await w.wait_ready("shop", "ci"))["status"]["identityId"]

        w.kube.rotate_signing_key()
        keep_operator_credentials(w)
        w.advance(21 * DAY)
        status = await wait_status(w, "shop", "ci", lambda s: s.get("identityId") != old, "a replacement")
        new = status["identityId"]
        await w.wait_ready("shop", "ci")
        assert [(r.status, mask_of(r)) for r in patches_of(w, old)] == [
            (200, ("static_keys.issuer_keys",)),
            (400, ("static_keys.expiration_time",)),
        ]
        # Both the old identity (in its grace period) and the new one accept a new-key token.
        assert await exchange_status(w, "shop", "default", old) == 200
        assert await exchange_status(w, "shop", "default", new) == 200


# ---------------------------------------------------------------------------------------------------
# 6. Claim-match drift


def widen_subject(claim_match: dict[str, Any]) -> None:
    del claim_match["subject"]
    claim_match["subjectPattern"] = ".*"


def add_claims(claim_match: dict[str, Any]) -> None:
    claim_match["claims"] = {"team": "payments"}


@pytest.mark.parametrize("edit", [widen_subject, add_claims], ids=["subject-pattern", "extra-claims"])
async def test_claim_match_drift_is_corrected_within_one_resync(
    sandbox: World, edit: Callable[[dict[str, Any]], None]
) -> None:
    w = sandbox
    w.kube.add_service_account("shop", "intruder")
    await w.apply(cr("ci", parent=w.org, mode="ClaimMatch"))
    uid = (await w.wait_ready("shop", "ci"))["status"]["identityId"]
    wanted = dict(w.chainguard.identities[uid]["claimMatch"])
    assert wanted["subject"] == "system:serviceaccount:shop:default"

    edit(w.chainguard.identities[uid]["claimMatch"])
    if edit is widen_subject:
        assert await exchange_status(w, "shop", "intruder", uid) == 200  # the drift trusts every pod
    else:
        assert await exchange_status(w, "shop", "default", uid) == 403  # the drift locks the pod out

    w.advance(w.settings.resync_interval)

    async def corrected() -> bool:
        return bool(w.chainguard.identities[uid]["claimMatch"] == wanted)

    await w.wait_for(corrected, what="the claim match to be corrected", timeout=5)
    assert w.chainguard.identities[uid]["claimMatch"].get("subjectPattern") is None
    assert [mask_of(r) for r in patches_of(w, uid)] == [("claim_match",)]
    assert await exchange_status(w, "shop", "intruder", uid) == 403
    assert await exchange_status(w, "shop", "default", uid) == 200


# ---------------------------------------------------------------------------------------------------
# 7. A service account that does not exist yet


async def test_a_missing_service_account_is_reported_and_picked_up_when_it_appears(sandbox: World) -> None:
    w = sandbox
    await w.apply(cr("ci", parent=w.org, serviceAccountName="not-yet"))
    obj = await w.wait_condition("shop", "ci", "Ready", "False", reason="ServiceAccountNotFound")
    message = condition(obj["status"], "Ready")["message"]
    assert "shop/not-yet" in message
    assert "does not exist" in message

    async def warned() -> list[dict[str, Any]]:
        return [e for e in await events(w, "shop", "ServiceAccountNotFound") if e["type"] == "Warning"]

    warning = (await w.wait_for(warned, what="a ServiceAccountNotFound warning"))[0]
    assert "shop/not-yet" in warning["message"]
    generation = obj["metadata"]["generation"]

    w.kube.add_service_account("shop", "not-yet")
    obj = await w.wait_ready("shop", "ci", timeout=10)
    assert obj["metadata"]["generation"] == generation  # no spec change was needed
    assert await exchange_status(w, "shop", "not-yet", obj["status"]["identityId"]) == 200


# ---------------------------------------------------------------------------------------------------
# 8. The rotate annotation on a ClaimMatch resource


async def test_the_rotate_annotation_on_a_claim_match_resource_is_ignored_once(sandbox: World) -> None:
    w = sandbox
    spec: dict[str, Any] = {"parent": w.org, "mode": "ClaimMatch"}
    await w.apply(cr("ci", **spec))
    uid = (await w.wait_ready("shop", "ci"))["status"]["identityId"]

    await w.apply(cr("ci", annotations={ROTATE: "2026-11-23"}, **spec))
    await wait_status(w, "shop", "ci", lambda s: s.get("rotationRequest") == "2026-11-23", "rotationRequest")
    await drive_passes(w)
    await drive_passes(w)

    ignored = await events(w, "shop", "RotationIgnored")
    assert len(ignored) == 1, ignored
    assert ignored[0]["type"] == "Normal"
    assert "2026-11-23" in ignored[0]["message"]
    assert patches_of(w, uid) == []
    status = await status_of(w, "shop", "ci")
    assert status["rotationRequest"] == "2026-11-23"
    assert condition(status, "Ready")["status"] == "True"


# ---------------------------------------------------------------------------------------------------
# 9. A forced rotation whose answer never arrives, and the operator stops


async def test_a_forced_rotation_is_written_once_across_a_crash_right_after_the_write() -> None:
    # A short request timeout, so that the operator stops promptly while the answer is still held.
    async with world(settings_overrides={"request_timeout": datetime.timedelta(seconds=1)}) as w:
        spec: dict[str, Any] = {"parent": w.org, **STATIC}
        await w.apply(cr("ci", **spec))
        uid = (await w.wait_ready("shop", "ci"))["status"]["identityId"]
        updates = w.chainguard.writes().get("identity.update", 0)
        w.advance(datetime.timedelta(hours=1))  # so that the forced renewal visibly moves the expiry
        expires = w.chainguard.identities[uid]["staticKeys"]["expirationTime"]

        fault = w.chainguard.faults.add(
            "PATCH", f"^/iam/v2/identities/{uid}$", after_commit=True, lose="hold", delay=30
        )
        await w.apply(cr("ci", annotations={ROTATE: "now-1"}, **spec))

        async def written() -> bool:
            return w.chainguard.writes().get("identity.update", 0) > updates

        await w.wait_for(written, what="the forced rotation to be committed", timeout=10)
        assert fault.hits == 1
        await w.stop_operator()  # while the answer is held
        assert w.chainguard.identities[uid]["staticKeys"]["expirationTime"] != expires
        assert (await status_of(w, "shop", "ci")).get("rotationRequest") != "now-1"

        await w.start_operator()
        status = await wait_status(
            w, "shop", "ci", lambda s: s.get("rotationRequest") == "now-1", "the rotation to be recorded"
        )
        await w.wait_ready("shop", "ci")
        await drive_passes(w)
        assert w.chainguard.writes().get("identity.update", 0) == updates + 1
        assert status["identityId"] == uid
        assert not (await status_of(w, "shop", "ci")).get("rotationPending")
        assert await exchange_status(w, "shop", "default", uid) == 200


# ---------------------------------------------------------------------------------------------------
# 10. The finalizer cannot delete


async def test_a_deletion_the_api_forbids_is_blocked_with_backoff_then_completes() -> None:
    # A 1 s cap on the backoff keeps the test short and makes the cap visible in the spacing.
    async with world(settings_overrides={"max_backoff": datetime.timedelta(seconds=1)}) as w:
        await w.apply(cr("ci", parent=w.org))
        uid = (await w.wait_ready("shop", "ci"))["status"]["identityId"]

        attempts: list[float] = []

        def forbid_deleting_it(method: str, path: str) -> Fault | None:
            if method == "DELETE" and path == f"/iam/v2/identities/{uid}":
                attempts.append(time.monotonic())
                return Fault(status=403)
            return None

        w.chainguard.faults.policy = forbid_deleting_it
        await w.delete("shop", "ci")
        obj = await w.wait_condition("shop", "ci", "Stalled", "True", reason="DeletionBlocked")
        message = condition(obj["status"], "Stalled")["message"]
        assert "grant its identity a role" in message
        assert "deletionPolicy: Orphan" in message

        async def four_attempts() -> bool:
            return len(attempts) >= 4

        await w.wait_for(four_attempts, what="four deletion attempts", timeout=20)
        # Spaced by the settings' backoff (base 0.2 s doubling up to the cap, jittered by ±20 %). kopf waits
        # in real time, so the spacing is measured; the upper bound allows for kopf's own round trip.
        base, cap = w.settings.base_backoff.total_seconds(), w.settings.max_backoff.total_seconds()

        def spaced(retry: int) -> None:
            gap = attempts[retry + 1] - attempts[retry]
            delay = min(base * 2**retry, cap)
            assert 0.8 * delay * 0.95 <= gap <= 1.2 * delay + 1.0, (retry, gap, attempts)

        for retry in range(3):
            spaced(retry)
        # A fast-forwarded minute brings no burst of attempts: the next one still waits its backoff.
        seen = len(attempts)
        w.advance(datetime.timedelta(minutes=1))

        async def one_more() -> bool:
            return len(attempts) > seen

        await w.wait_for(one_more, what="the next attempt", timeout=10)
        spaced(seen - 1)
        warnings = [e for e in await events(w, "shop", "DeletionBlocked") if e["type"] == "Warning"]
        assert len(warnings) == 1, warnings  # said once, not on every retry
        assert uid in w.chainguard.identities

        w.chainguard.faults.policy = None
        await wait_gone(w, "shop", "ci", timeout=10)
        assert uid not in w.chainguard.identities
        assert bindings_of(w, uid) == []


# ---------------------------------------------------------------------------------------------------
# 11. No token fragments


async def test_an_api_error_echoing_a_token_fragment_reaches_no_status_event_or_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    async with proxied_world() as (w, proxy):
        fragment = token_fragment(w)
        # The emulator's faults carry a fixed message; the proxy answers the first create with an error
        # whose message echoes the token, as a server that could not parse it might.
        proxy.answer(
            "POST",
            r"^/iam/v2/identities/",
            status=400,
            code=9,
            message=f"static_keys: cannot verify the presented token {fragment}",
        )
        await w.apply(cr("ci", parent=w.org, **STATIC))
        obj = await w.wait_condition("shop", "ci", "Stalled", "True", reason="ChainguardRejected")
        message = condition(obj["status"], "Ready")["message"]
        assert "cannot verify the presented token [REDACTED]" in message  # the rest of the message is kept

        async def warned() -> list[dict[str, Any]]:
            return await events(w, "shop", "ChainguardRejected")

        await w.wait_for(warned, what="the ChainguardRejected warning")
        await drive_passes(w)  # the next resync creates it
        await w.wait_ready("shop", "ci")
        assert proxy.rules[0]["hits"] == 1
        texts = await readable_texts(w, "shop")
        assert any(where.endswith("/ci/status") for where, _ in texts)  # the check sees status patches
        assert_no_fragment([*texts, ("logs", caplog.text)], fragment)


@pytest.mark.parametrize("where", ["reason", "body"])
async def test_a_cluster_error_echoing_a_token_fragment_reaches_no_status_event_or_log(
    caplog: pytest.LogCaptureFixture, where: str
) -> None:
    caplog.set_level(logging.DEBUG)
    overrides = {"jwks_max_staleness": datetime.timedelta(minutes=2)}
    async with world(settings_overrides=overrides) as w:
        fragment = token_fragment(w)
        await w.apply(cr("ci", parent=w.org, **STATIC))
        await w.wait_ready("shop", "ci")

        # The JWKS read fails with text that echoes a token: in the HTTP reason phrase, or in a key
        # set whose key type is the token (the parser names what it cannot use).
        def failing() -> Response:
            if where == "reason":
                return Response(status=500, reason=f"bad token {fragment}")
            body = json.dumps({"keys": [{"kty": fragment, "kid": "k"}]}).encode()
            return Response(status=200, payload=body, headers={"Content-Type": "application/json"})

        outage = Outage(w, "get /openid/v1/jwks", failing)
        await w.poll_cluster()
        w.advance(datetime.timedelta(minutes=3))  # past the staleness bound: the error reaches status
        await w.wait_condition("shop", "ci", "Ready", "False", reason="ClusterKeysUnavailable")

        async def warned() -> list[dict[str, Any]]:
            return await events(w, "shop", "ClusterKeysUnavailable")

        await w.wait_for(warned, what="the ClusterKeysUnavailable warning")
        outage.end()
        assert outage.hits >= 1
        texts = await readable_texts(w, "shop")
        assert any(where.endswith("/ci/status") for where, _ in texts)  # the check sees status patches
        assert_no_fragment([*texts, ("logs", caplog.text)], fragment)
