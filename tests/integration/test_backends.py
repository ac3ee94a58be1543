"""The operator's scenarios on both cluster backends: the Kubernetes emulator and a real API server.

Each test runs twice, on ``backend`` = ``emulator`` and ``real`` (the run's own etcd + kube-apiserver +
kube-controller-manager with deploy/'s CRD and RBAC; skipped without its binaries, a failure under CI).
The scenario is written once against what both offer (``cgid_testkit.harness.KubeBackend``): names of
namespaces go through ``w.ns`` (a real-backend World has fresh ones of its own), tokens come from the
cluster's TokenRequest API, keys from its ``/openid/v1/jwks``, and a key rotation is the cluster's own —
on the real server a restart of the API server with a new signing key, the old public key kept.

Chainguard is the emulator in both, and the shared clock is fast-forwarded for renewals; the real
server's tokens are made long enough for that (see the harness).
"""

from __future__ import annotations

import datetime
import json
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import pytest

from cgid_testkit.controlplane import ControlPlane
from cgid_testkit.harness import OPERATOR_SERVICE_ACCOUNT, ORG_NAME, World, world
from chainguard_identity_operator import naming
from chainguard_identity_operator.chainguard.types import parse_time

CONFIG_KEYS = {
    "CHAINGUARD_IDENTITY",
    "CHAINGUARD_ISSUER",
    "CHAINGUARD_API",
    "CHAINGUARD_AUDIENCE",
    "CHAINGUARD_REGISTRY",
}
STATIC = {"mode": "Static", "static": {"validFor": "720h", "renewBefore": "240h"}}

MakeWorld = Callable[..., AbstractAsyncContextManager[World]]


@pytest.fixture
def make_world(backend: ControlPlane | None) -> MakeWorld:
    """``world(...)`` on this test's backend."""

    def make(**options: Any) -> AbstractAsyncContextManager[World]:
        return world(control_plane=backend, **options)

    return make


@pytest.fixture
async def w(make_world: MakeWorld) -> AsyncIterator[World]:
    async with make_world() as the_world:
        yield the_world


def cr(name: str, namespace: str, **spec: Any) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": namespace}, "spec": spec}


def bindings_of(w: World, identity: str) -> list[dict[str, Any]]:
    return [b for b in w.chainguard.role_bindings.values() if b["identity"]["uid"] == identity]


def patches_of(w: World, uid: str) -> int:
    return sum(
        1 for r in w.chainguard.requests if r.method == "PATCH" and r.path.endswith(uid) and r.status == 200
    )


async def exchange_ok(w: World, namespace: str, identity: str, service_account: str = "default") -> bool:
    response = await w.pod_exchange(namespace, service_account, identity)
    return response.status_code == 200


async def assert_pod_flow(w: World, namespace: str, service_account: str, identity: str) -> None:
    """The seeds' pod: its token (from the cluster) buys an API token that lists the registry; the token
    of another service account of the same namespace is refused."""
    response = await w.pod_exchange(namespace, service_account, identity)
    assert response.status_code == 200, response.text
    repos = await w.list_repos(response.json()["token"])
    assert sorted(repos) == ["curl", "nginx", "python"]
    await w.add_service_account(namespace, "intruder")
    refused = await w.pod_exchange(namespace, "intruder", identity)
    assert refused.status_code == 403, refused.text


async def status_of(w: World, namespace: str, name: str) -> dict[str, Any]:
    obj = await w.get(namespace, name)
    assert obj is not None
    status: dict[str, Any] = obj.get("status") or {}
    return status


async def wait_status(w: World, namespace: str, name: str, predicate: Any, what: str) -> dict[str, Any]:
    async def probe() -> dict[str, Any] | None:
        status = await status_of(w, namespace, name)
        return status if predicate(status) else None

    return await w.wait_for(probe, what=what)


def kids(jwks: dict[str, Any]) -> list[str]:
    return sorted(key["kid"] for key in jwks["keys"])


# -- create, in both modes ----------------------------------------------------------------------------


async def test_claim_match_identity_end_to_end(w: World) -> None:
    shop = w.ns("shop")
    await w.apply(cr("puller", shop, mode="ClaimMatch", parentName=ORG_NAME, roles=["registry.pull"]))
    status = (await w.wait_ready(shop, "puller"))["status"]

    stored = w.chainguard.identities[status["identityId"]]
    assert stored["name"] == naming.identity_name("sandbox", shop, "puller")
    assert stored["claimMatch"]["issuer"] == w.issuer
    assert stored["claimMatch"]["subject"] == f"system:serviceaccount:{shop}:default"
    assert stored["claimMatch"]["audience"] == "issuer.enforce.dev"
    assert w.owns(stored["description"], shop, "puller")
    assert [b["role"]["name"] for b in bindings_of(w, status["identityId"])] == ["registry.pull"]
    assert all(b["group"]["uid"] == w.org for b in bindings_of(w, status["identityId"]))

    assert status["mode"] == "ClaimMatch"
    assert status["subject"] == f"system:serviceaccount:{shop}:default"
    assert status["parent"] == w.org
    assert [b["role"] for b in status["roleBindings"]] == ["registry.pull"]
    assert "expiresAt" not in status
    conditions = {c["type"]: c["status"] for c in status["conditions"]}
    assert conditions == {"Ready": "True", "Reconciling": "False", "Stalled": "False"}

    data = await w.config_map(shop, "puller-chainguard-identity")
    assert data is not None
    assert set(data) == CONFIG_KEYS
    assert data["CHAINGUARD_IDENTITY"] == status["identityId"]
    assert data["CHAINGUARD_AUDIENCE"] == "issuer.enforce.dev"
    # The STS verifies the pod's token against the keys it fetches by the cluster's discovery document.
    await assert_pod_flow(w, shop, "default", data["CHAINGUARD_IDENTITY"])


async def test_static_identity_end_to_end(w: World) -> None:
    default = w.ns("default")
    await w.apply(
        cr(
            "ci-runner",
            default,
            mode="Static",
            parent=w.org,
            serviceAccountName="builder",
            roles=["registry.pull", "viewer"],
            static={"validFor": "240h", "renewBefore": "48h"},
        )
    )
    await w.add_service_account(default, "builder")
    status = (await w.wait_ready(default, "ci-runner"))["status"]
    stored = w.chainguard.identities[status["identityId"]]
    static = stored["staticKeys"]
    assert static["subject"] == f"system:serviceaccount:{default}:builder"
    assert static["issuer"] == w.issuer
    uploaded = json.loads(static["issuerKeys"])
    cluster_keys = await w.jwks()
    assert kids(uploaded) == kids(cluster_keys)
    assert not any({"d", "p", "q", "dp", "dq", "qi", "k"} & set(key) for key in uploaded["keys"])

    expires = parse_time(static["expirationTime"])
    assert expires is not None
    assert abs((expires - (w.clock() + datetime.timedelta(hours=240))).total_seconds()) < 60
    assert status["expiresAt"] == static["expirationTime"]
    assert parse_time(status["renewAt"]) == expires - datetime.timedelta(hours=48)
    assert status["keys"]["keyIds"] == kids(cluster_keys)
    assert status["keys"]["fingerprint"].startswith("sha256:")
    assert sorted(b["role"] for b in status["roleBindings"]) == ["registry.pull", "viewer"]

    data = await w.config_map(default, "ci-runner-chainguard-identity")
    assert data is not None
    # The STS verifies the pod's token against the keys the operator uploaded.
    await assert_pod_flow(w, default, "builder", data["CHAINGUARD_IDENTITY"])


async def test_auto_mode_picks_claim_match_for_a_public_issuer(w: World) -> None:
    shop = w.ns("shop")
    await w.apply(cr("auto", shop, parentName=ORG_NAME))
    status = (await w.wait_ready(shop, "auto"))["status"]
    assert status["mode"] == "ClaimMatch"
    assert "claimMatch" in w.chainguard.identities[status["identityId"]]
    assert await exchange_ok(w, shop, status["identityId"])


async def test_auto_mode_picks_static_for_an_issuer_not_known_to_be_public(make_world: MakeWorld) -> None:
    # The issuer's host is public only because the harness lists it; unlisted, it reads as a private
    # cluster's (the real server's issuer is fixed at its start, so this is how both backends get there).
    async with make_world(settings_overrides={"public_issuer_hosts": ()}) as w:
        shop = w.ns("shop")
        await w.apply(cr("auto", shop, parent=w.org))
        status = (await w.wait_ready(shop, "auto"))["status"]
        assert status["mode"] == "Static"
        assert "staticKeys" in w.chainguard.identities[status["identityId"]]
        await assert_pod_flow(w, shop, "default", status["identityId"])


# -- edits and deletion -------------------------------------------------------------------------------


async def test_spec_edits_converge(w: World) -> None:
    shop = w.ns("shop")
    await w.apply(cr("puller", shop, parent=w.org, roles=["registry.pull"]))
    uid = (await w.wait_ready(shop, "puller"))["status"]["identityId"]

    await w.apply(
        cr("puller", shop, parent=w.org, roles=["registry.pull", "viewer"], description="team shop")
    )
    obj = await w.wait_ready(shop, "puller")
    assert obj["status"]["identityId"] == uid
    assert sorted(b["role"]["name"] for b in bindings_of(w, uid)) == ["registry.pull", "viewer"]
    assert w.chainguard.identities[uid]["description"].endswith("; team shop")

    await w.apply(cr("puller", shop, parent=w.org, roles=["viewer"], description="team shop"))
    obj = await w.wait_ready(shop, "puller")
    assert [b["role"]["name"] for b in bindings_of(w, uid)] == ["viewer"]
    assert [b["role"] for b in obj["status"]["roleBindings"]] == ["viewer"]


async def test_delete_runs_the_finalizer_and_the_config_map_is_collected(
    request: pytest.FixtureRequest, backend: ControlPlane | None, w: World
) -> None:
    if backend is not None:
        request.getfixturevalue("needs_controller_manager")  # the garbage collector
    shop = w.ns("shop")
    await w.apply(cr("puller", shop, parent=w.org))
    uid = (await w.wait_ready(shop, "puller"))["status"]["identityId"]
    assert await w.config_map(shop, "puller-chainguard-identity") is not None
    await w.delete(shop, "puller")

    async def gone() -> bool:
        return await w.get(shop, "puller") is None

    await w.wait_for(gone, what="the resource to be finalized and removed")
    assert uid not in w.chainguard.identities
    assert bindings_of(w, uid) == []

    # The operator never deletes the ConfigMap itself: its ownerReference lets the garbage collector.
    async def collected() -> bool:
        return await w.config_map(shop, "puller-chainguard-identity") is None

    await w.wait_for(collected, what="the ConfigMap to be garbage-collected")


# -- identities that stay alive -----------------------------------------------------------------------


async def test_renewal_before_expiry_keeps_the_pod_working(w: World) -> None:
    shop = w.ns("shop")
    await w.apply(cr("ci", shop, parent=w.org, **STATIC))
    status = (await w.wait_ready(shop, "ci"))["status"]
    uid, expires = status["identityId"], parse_time(status["expiresAt"])
    assert expires is not None
    assert parse_time(status["renewAt"]) == expires - datetime.timedelta(hours=240)
    assert await exchange_ok(w, shop, uid)

    # Just before the renewal time nothing happens; just after it, the identity is renewed in place.
    w.advance(datetime.timedelta(hours=720 - 240) - datetime.timedelta(minutes=5))
    await w.wait_ready(shop, "ci")
    assert (await status_of(w, shop, "ci"))["expiresAt"] == status["expiresAt"]
    w.advance(datetime.timedelta(minutes=10))
    renewed = await wait_status(
        w, shop, "ci", lambda s: s.get("expiresAt") != status["expiresAt"], "the identity to be renewed"
    )
    assert renewed["identityId"] == uid  # in place: same identity, the pods' ConfigMap is unchanged
    new_expiry = parse_time(renewed["expiresAt"])
    assert new_expiry is not None
    assert abs((new_expiry - (w.clock() + datetime.timedelta(hours=720))).total_seconds()) < 120
    assert renewed["lastRotatedAt"]
    assert await exchange_ok(w, shop, uid)

    # Past the *old* expiry the pod still works, because the identity was renewed.
    w.advance(datetime.timedelta(days=11))
    assert await exchange_ok(w, shop, uid)
    assert w.runtime is not None
    assert w.runtime.metrics.value(
        "chainguard_identity_rotations_total", namespace=shop, name="ci", reason="renewal"
    )


async def test_cluster_key_rotation_reaches_every_static_identity_with_one_write_each(w: World) -> None:
    shop = w.ns("shop")
    for name in ("one", "two"):
        await w.apply(cr(name, shop, parent=w.org, **STATIC))
    uids = {name: (await w.wait_ready(shop, name))["status"]["identityId"] for name in ("one", "two")}
    before = {uid: patches_of(w, uid) for uid in uids.values()}
    old = await w.jwks()
    fingerprint = (await status_of(w, shop, "one"))["keys"]["fingerprint"]

    # The emulator makes a new key; the real server restarts with one, still accepting the old.
    await w.rotate_cluster_keys()
    new = await w.jwks()
    assert set(kids(old)) < set(kids(new))
    assert not await exchange_ok(w, shop, uids["one"])  # signed with a key Chainguard does not know
    await w.poll_cluster()  # one poll: the operator wakes every worker, spread over a few seconds

    for name, uid in uids.items():
        status = await wait_status(
            w,
            shop,
            name,
            lambda s: s.get("keys", {}).get("fingerprint") != fingerprint,
            f"{name}'s new keys",
        )
        # Old and new: tokens signed with either still verify.
        assert status["keys"]["keyIds"] == kids(new)
        assert kids(json.loads(w.chainguard.identities[uid]["staticKeys"]["issuerKeys"])) == kids(new)
        assert await exchange_ok(w, shop, uid)
        assert patches_of(w, uid) == before[uid] + 1


async def test_the_operator_keeps_its_own_adopted_identity_alive(w: World) -> None:
    own, home = w.operator_identity, w.operator_namespace
    await w.apply(
        cr(
            "operator",
            home,
            parent=w.org,
            adopt=own,
            serviceAccountName=OPERATOR_SERVICE_ACCOUNT,
            roles=["viewer"],
            deletionPolicy="Orphan",
            **STATIC,
        )
    )
    obj = await w.wait_ready(home, "operator")
    status = obj["status"]
    assert status["identityId"] == own
    assert w.owns(w.chainguard.identities[own]["description"], home, "operator")
    adopted = [e for e in await w.events(home) if e["involvedObject"]["uid"] == obj["metadata"]["uid"]]
    assert "Adopted" in {e["reason"] for e in adopted}

    # The bootstrap identity was made for 30 days; the operator renews it before then, so it can
    # still authenticate itself after the original expiry.
    w.advance(datetime.timedelta(days=21))
    await wait_status(
        w, home, "operator", lambda s: s.get("expiresAt") != status["expiresAt"], "self-renewal"
    )
    w.advance(datetime.timedelta(days=15))
    await w.apply(cr("after", w.ns("shop"), parent=w.org))
    await w.wait_ready(w.ns("shop"), "after")


# -- drift ----------------------------------------------------------------------------------------------


async def test_an_identity_deleted_outside_is_recreated(w: World) -> None:
    shop = w.ns("shop")
    await w.apply(cr("puller", shop, parent=w.org))
    old = (await w.wait_ready(shop, "puller"))["status"]["identityId"]
    del w.chainguard.identities[old]
    # Drift is read from the parent's listing, which the next resync reads afresh.
    w.advance(w.settings.resync_interval)

    async def replaced() -> str | None:
        uid = (await status_of(w, shop, "puller")).get("identityId")
        return uid if uid and uid != old else None

    new = await w.wait_for(replaced, what="a new identity")
    await w.wait_ready(shop, "puller")
    data = await w.config_map(shop, "puller-chainguard-identity")
    assert data is not None
    assert data["CHAINGUARD_IDENTITY"] == new
    assert await exchange_ok(w, shop, new)


async def test_an_edited_subject_and_a_removed_binding_are_repaired(w: World) -> None:
    shop = w.ns("shop")
    await w.apply(cr("ci", shop, parent=w.org, roles=["registry.pull", "viewer"], **STATIC))
    uid = (await w.wait_ready(shop, "ci"))["status"]["identityId"]

    # Someone edits the identity's subject and removes a role binding outside the operator.
    w.chainguard.identities[uid]["staticKeys"]["subject"] = f"system:serviceaccount:{shop}:intruder"
    binding = next(b for b in w.chainguard.role_bindings.values() if b["identity"]["uid"] == uid)
    del w.chainguard.role_bindings[binding["uid"]]
    assert not await exchange_ok(w, shop, uid)
    w.advance(w.settings.resync_interval)

    async def repaired() -> bool:
        subject = w.chainguard.identities[uid]["staticKeys"]["subject"]
        return subject == f"system:serviceaccount:{shop}:default" and len(bindings_of(w, uid)) == 2

    await w.wait_for(repaired, what="the drift to be repaired")
    assert await exchange_ok(w, shop, uid)
