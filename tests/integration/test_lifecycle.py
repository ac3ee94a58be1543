"""Identities that stay alive: renewal, cluster key rotation, replacement, crashes, forced rotation,
adoption and the metrics that watch over them — the real operator against both emulators, with the
shared clock fast-forwarded instead of waiting days.
"""

from __future__ import annotations

import datetime
from typing import Any

from cgid_testkit.harness import (
    OPERATOR_NAMESPACE,
    OPERATOR_SERVICE_ACCOUNT,
    World,
    world,
)
from chainguard_identity_operator import naming
from chainguard_identity_operator.chainguard.types import parse_time

STATIC = {"mode": "Static", "static": {"validFor": "720h", "renewBefore": "240h"}}


def cr(
    name: str, namespace: str = "shop", annotations: dict[str, str] | None = None, **spec: Any
) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name, "namespace": namespace}
    if annotations:
        metadata["annotations"] = annotations
    return {"metadata": metadata, "spec": spec}


async def exchange_ok(w: World, namespace: str, identity: str, service_account: str = "default") -> bool:
    response = await w.pod_exchange(namespace, service_account, identity)
    return response.status_code == 200


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


def patches_of(w: World, uid: str) -> int:
    return sum(
        1 for r in w.chainguard.requests if r.method == "PATCH" and r.path.endswith(uid) and r.status == 200
    )


async def test_renewal_before_expiry_keeps_the_pod_working(sandbox: World) -> None:
    w = sandbox
    await w.apply(cr("ci", parent=w.org, **STATIC))
    status = (await w.wait_ready("shop", "ci"))["status"]
    uid, expires = status["identityId"], parse_time(status["expiresAt"])
    assert expires is not None
    assert parse_time(status["renewAt"]) == expires - datetime.timedelta(hours=240)
    assert await exchange_ok(w, "shop", uid)

    # Just before the renewal time nothing happens; just after it, the identity is renewed in place.
    w.advance(datetime.timedelta(hours=720 - 240) - datetime.timedelta(minutes=5))
    await w.wait_ready("shop", "ci")
    assert (await status_of(w, "shop", "ci"))["expiresAt"] == status["expiresAt"]
    w.advance(datetime.timedelta(minutes=10))
    renewed = await wait_status(
        w, "shop", "ci", lambda s: s.get("expiresAt") != status["expiresAt"], "the identity to be renewed"
    )
    assert renewed["identityId"] == uid  # in place: same identity, the pods' ConfigMap is unchanged
    new_expiry = parse_time(renewed["expiresAt"])
    assert new_expiry is not None
    assert abs((new_expiry - (w.clock() + datetime.timedelta(hours=720))).total_seconds()) < 120
    assert renewed["lastRotatedAt"]
    assert await exchange_ok(w, "shop", uid)

    # Past the *old* expiry the pod still works, because the identity was renewed.
    w.advance(datetime.timedelta(days=11))
    assert await exchange_ok(w, "shop", uid)
    assert w.runtime is not None
    assert w.runtime.metrics.value(
        "chainguard_identity_rotations_total", namespace="shop", name="ci", reason="renewal"
    )


async def test_cluster_key_rotation_reaches_every_static_identity_with_one_write_each(sandbox: World) -> None:
    w = sandbox
    for name in ("one", "two"):
        await w.apply(cr(name, parent=w.org, **STATIC))
    uids = {name: (await w.wait_ready("shop", name))["status"]["identityId"] for name in ("one", "two")}
    before = {uid: patches_of(w, uid) for uid in uids.values()}
    fingerprint = (await status_of(w, "shop", "one"))["keys"]["fingerprint"]

    w.kube.rotate_signing_key()  # new tokens are signed with a key Chainguard does not know yet
    assert not await exchange_ok(w, "shop", uids["one"])
    await w.poll_cluster()

    for name, uid in uids.items():
        status = await wait_status(
            w,
            "shop",
            name,
            lambda s: s.get("keys", {}).get("fingerprint") != fingerprint,
            f"{name}'s new keys",
        )
        assert len(status["keys"]["keyIds"]) == 2  # old and new: tokens signed with either still verify
        assert await exchange_ok(w, "shop", uid)
        assert patches_of(w, uid) == before[uid] + 1


async def test_rotation_by_replacement_when_the_api_refuses_in_place() -> None:
    options = {"max_static_lifetime": datetime.timedelta(days=30), "max_lifetime_from_creation": True}
    async with world(chainguard_options=options) as w:
        await w.apply(cr("ci", parent=w.org, roles=["registry.pull", "viewer"], **STATIC))
        old = (await w.wait_ready("shop", "ci"))["status"]["identityId"]

        w.advance(datetime.timedelta(days=21))
        status = await wait_status(
            w, "shop", "ci", lambda s: s.get("identityId") != old, "a replacement identity"
        )
        new = status["identityId"]
        await w.wait_ready("shop", "ci")
        data = await w.config_map("shop", "ci-chainguard-identity")
        assert data is not None
        assert data["CHAINGUARD_IDENTITY"] == new
        assert sorted(
            b["role"]["name"] for b in w.chainguard.role_bindings.values() if b["identity"]["uid"] == new
        ) == [
            "registry.pull",
            "viewer",
        ]
        # The old identity lives on through the grace period, so pods still holding it keep working.
        assert old in w.chainguard.identities
        assert [r["identityId"] for r in (await status_of(w, "shop", "ci"))["retiring"]] == [old]
        assert await exchange_ok(w, "shop", new)

        w.advance(w.settings.replacement_grace + datetime.timedelta(seconds=1))
        await wait_status(w, "shop", "ci", lambda s: not s.get("retiring"), "the old identity to be retired")
        assert old not in w.chainguard.identities
        assert not [b for b in w.chainguard.role_bindings.values() if b["identity"]["uid"] == old]
        name = naming.identity_name("sandbox", "shop", "ci")
        assert [i["uid"] for i in w.chainguard.identities.values() if i["name"] == name] == [new]


async def test_a_crash_in_the_middle_of_a_replacement_leaves_no_duplicate_and_no_orphan() -> None:
    options = {"max_static_lifetime": datetime.timedelta(days=30), "max_lifetime_from_creation": True}
    async with world(chainguard_options=options) as w:
        await w.apply(cr("ci", parent=w.org, **STATIC))
        old = (await w.wait_ready("shop", "ci"))["status"]["identityId"]
        name = naming.identity_name("sandbox", "shop", "ci")

        # The new identity gets created, then binding its role hangs: the operator dies right there,
        # before the ConfigMap or the status names the new identity.
        w.chainguard.faults.add("POST", r"^/iam/v2/roleBindings/", status=200, delay=60, times=1)
        w.advance(datetime.timedelta(days=21))

        async def created() -> bool:
            return len([i for i in w.chainguard.identities.values() if i["name"] == name]) == 2

        await w.wait_for(created, what="the replacement identity to be created")
        await w.stop_operator()
        assert (await status_of(w, "shop", "ci"))["identityId"] == old
        data = await w.config_map("shop", "ci-chainguard-identity")
        assert data is not None
        assert data["CHAINGUARD_IDENTITY"] == old  # pods still hold a working identity

        w.chainguard.faults.clear()
        await w.start_operator()
        status = await wait_status(w, "shop", "ci", lambda s: s.get("identityId") != old, "the replacement")
        await w.wait_ready("shop", "ci")
        survivors = [i["uid"] for i in w.chainguard.identities.values() if i["name"] == name]
        assert status["identityId"] in survivors
        assert len(survivors) == 2  # the new one, and the old one in its grace period: no third
        w.advance(w.settings.replacement_grace + datetime.timedelta(seconds=1))
        await wait_status(w, "shop", "ci", lambda s: not s.get("retiring"), "the old identity to be retired")
        assert [i["uid"] for i in w.chainguard.identities.values() if i["name"] == name] == [
            status["identityId"]
        ]


async def test_the_rotate_annotation_renews_once_per_value(sandbox: World) -> None:
    w = sandbox
    await w.apply(cr("ci", parent=w.org, **STATIC))
    status = (await w.wait_ready("shop", "ci"))["status"]
    uid = status["identityId"]
    writes = patches_of(w, uid)
    w.advance(datetime.timedelta(hours=1))  # so that a renewal visibly moves expiresAt

    spec = {"parent": w.org, **STATIC}
    await w.apply(cr("ci", annotations={"iam.chainguard.dev/rotate": "2026-11-23"}, **spec))
    rotated = await wait_status(
        w, "shop", "ci", lambda s: s.get("rotationRequest") == "2026-11-23", "the forced rotation"
    )
    assert rotated["expiresAt"] != status["expiresAt"]
    assert patches_of(w, uid) == writes + 1

    # The same value again (a resync, a restart, a re-apply) does not rotate again.
    await w.restart_operator()
    await w.wait_ready("shop", "ci")
    assert patches_of(w, uid) == writes + 1


async def test_the_operator_keeps_its_own_adopted_identity_alive(sandbox: World) -> None:
    w = sandbox
    own = w.operator_identity
    await w.apply(
        cr(
            "operator",
            namespace=OPERATOR_NAMESPACE,
            parent=w.org,
            adopt=own,
            serviceAccountName=OPERATOR_SERVICE_ACCOUNT,
            roles=["viewer"],
            deletionPolicy="Orphan",
            **STATIC,
        )
    )
    status = (await w.wait_ready(OPERATOR_NAMESPACE, "operator"))["status"]
    assert status["identityId"] == own
    assert w.owns(w.chainguard.identities[own]["description"], OPERATOR_NAMESPACE, "operator")
    reasons = {e["reason"] for e in await w.events(OPERATOR_NAMESPACE)}
    assert "Adopted" in reasons

    # The bootstrap identity was made for 30 days; the operator renews it before then, so it can
    # still authenticate itself after the original expiry.
    w.advance(datetime.timedelta(days=21))
    await wait_status(
        w, OPERATOR_NAMESPACE, "operator", lambda s: s.get("expiresAt") != status["expiresAt"], "self-renewal"
    )
    w.advance(datetime.timedelta(days=15))
    await w.apply(cr("after", parent=w.org))
    await w.wait_ready("shop", "after")


async def test_failing_renewal_is_an_emergency_with_the_time_left(sandbox: World) -> None:
    w = sandbox
    await w.apply(cr("ci", parent=w.org, **STATIC))
    uid = (await w.wait_ready("shop", "ci"))["status"]["identityId"]
    w.chainguard.faults.add("PATCH", r"^/iam/v2/identities/", status=503, times=1000)
    w.advance(datetime.timedelta(days=25))
    obj = await w.wait_condition("shop", "ci", "Ready", "False", reason="RenewalFailing")
    ready = next(c for c in obj["status"]["conditions"] if c["type"] == "Ready")
    assert "expires in 4d" in ready["message"]
    warnings = [
        e for e in await w.events("shop") if e["type"] == "Warning" and e["reason"] == "RenewalFailing"
    ]
    assert warnings
    assert w.runtime is not None
    assert w.runtime.metrics.value("chainguard_identity_ready", namespace="shop", name="ci") == 0.0
    expiry = parse_time(obj["status"]["expiresAt"])
    assert expiry is not None
    assert (
        w.runtime.metrics.value(
            "chainguard_identity_expiration_timestamp_seconds", namespace="shop", name="ci"
        )
        == expiry.timestamp()
    )
    rendered = w.runtime.metrics.render()
    assert 'chainguard_api_requests_total{code="503",method="PATCH"' in rendered

    w.chainguard.faults.clear()
    w.runtime.wake_all()
    await w.wait_ready("shop", "ci")
    assert w.runtime.metrics.value("chainguard_identity_ready", namespace="shop", name="ci") == 1.0
    assert uid in w.chainguard.identities


async def test_drift_is_repaired(sandbox: World) -> None:
    w = sandbox
    await w.apply(cr("ci", parent=w.org, roles=["registry.pull", "viewer"], **STATIC))
    uid = (await w.wait_ready("shop", "ci"))["status"]["identityId"]

    # Someone edits the identity's subject and removes a role binding outside the operator.
    stored = w.chainguard.identities[uid]
    stored["staticKeys"]["subject"] = "system:serviceaccount:shop:intruder"
    binding = next(b for b in w.chainguard.role_bindings.values() if b["identity"]["uid"] == uid)
    del w.chainguard.role_bindings[binding["uid"]]
    # Drift is read from the parent's listing, which the next resync reads afresh.
    w.advance(w.settings.resync_interval)

    async def repaired() -> bool:
        subject = w.chainguard.identities[uid]["staticKeys"]["subject"]
        bound = [b for b in w.chainguard.role_bindings.values() if b["identity"]["uid"] == uid]
        return subject == "system:serviceaccount:shop:default" and len(bound) == 2

    await w.wait_for(repaired, what="the drift to be repaired")
    assert await exchange_ok(w, "shop", uid)


async def test_a_resync_reads_each_parent_in_bulk(sandbox: World) -> None:
    w = sandbox
    names = [f"app{i}" for i in range(5)]
    for name in names:
        await w.apply(cr(name, parent=w.org, **STATIC))
    for name in names:
        await w.wait_ready("shop", name)
    mark = len(w.chainguard.requests)
    patches = w.status_patches()
    assert w.runtime is not None
    passes = w.runtime.metrics.total("chainguard_identity_reconciles_total")

    w.advance(w.settings.resync_interval)  # every listing is stale; every worker resyncs
    await w.wait_for(
        lambda: _count_passes(w, passes + len(names)),
        what="every resource to finish its resync pass",
    )
    seen = [r for r in w.chainguard.requests[mark:]]
    gets = [r for r in seen if r.method == "GET" and r.path.startswith("/iam/v2/identities/")]
    identity_lists = [r for r in seen if r.method == "GET" and r.path == "/iam/v2/identities"]
    binding_lists = [r for r in seen if r.method == "GET" and r.path == "/iam/v2/roleBindings"]
    writes = [r for r in seen if r.method != "GET"]
    assert gets == []
    assert len(identity_lists) == 1
    assert len(binding_lists) == 1
    assert writes == []
    assert w.status_patches() == patches  # nothing changed, so nothing is written to the cluster either


async def _count_passes(w: World, at_least: int) -> bool:
    assert w.runtime is not None
    return w.runtime.metrics.total("chainguard_identity_reconciles_total") >= at_least


async def test_after_a_restart_renewal_still_happens_on_time(sandbox: World) -> None:
    w = sandbox
    await w.apply(cr("ci", parent=w.org, **STATIC))
    status = (await w.wait_ready("shop", "ci"))["status"]
    await w.stop_operator()
    w.advance(datetime.timedelta(hours=720 - 240, minutes=1))  # past renewAt while the operator is down
    await w.start_operator()
    renewed = await wait_status(
        w, "shop", "ci", lambda s: s.get("expiresAt") != status["expiresAt"], "the renewal after the restart"
    )
    assert renewed["identityId"] == status["identityId"]
