"""Tenant isolation, proven the way a hostile tenant would attack it (issue 7).

A tenant who may create a ``ChainguardIdentity`` in its own namespace tries every path to an identity it
did not make: adopting the operator's own identity or another resource's, fighting another resource over
one identity, adopting an identity that holds ``owner``, forging its own status or ConfigMap to name a
victim's identity, and sharing a cluster name and an organization with another cluster. Each test checks
the attack got nothing — the stored identity and its bindings are exactly what they were, compared as the
Chainguard emulator stores them — and that the victim's pod exchange still works.

"Nothing happened" is never a sleep: ``resync`` drives every resource through a known number of passes
(fast-forward one resync interval, which wakes every worker, and wait for the pass counter to grow) and
the test asserts after that.
"""

from __future__ import annotations

import asyncio
import copy
from typing import Any

import pytest

from cgid_testkit.harness import OPERATOR_NAMESPACE, OPERATOR_SERVICE_ACCOUNT, World, world
from chainguard_identity_operator import naming
from chainguard_identity_operator.status import IdentityStatus

pytestmark = pytest.mark.timeout(60)

CR_PATH = "/apis/iam.chainguard.dev/v1alpha1/namespaces/{namespace}/chainguardidentities/{name}"
LOCAL_ISSUER = "https://kubernetes.default.svc.cluster.local"
LONG_AGO = "2000-01-01T00:00:00Z"


def cr(name: str, namespace: str = "shop", **spec: Any) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": namespace}, "spec": spec}


def bindings_of(w: World, identity: str) -> list[dict[str, Any]]:
    found = [b for b in w.chainguard.role_bindings.values() if b["identity"]["uid"] == identity]
    return sorted(copy.deepcopy(found), key=lambda b: b["uid"])


def stored(w: World, identity: str) -> dict[str, Any]:
    """The identity and its role bindings as Chainguard stores them (a copy to compare later), but for
    ``lastSeenTime``, which the STS stamps on every exchange: using an identity is not editing it."""
    body = copy.deepcopy(w.chainguard.identities[identity])
    body.pop("lastSeenTime", None)
    return {"identity": body, "bindings": bindings_of(w, identity)}


def writes_to(w: World, identity: str) -> list[str]:
    """Every write the API served on the identity itself (PATCH, DELETE), as ``METHOD status``."""
    return [
        f"{r.method} {r.status}"
        for r in w.chainguard.requests
        if r.method in ("PATCH", "DELETE") and r.path == f"/iam/v2/identities/{identity}"
    ]


def subject_of(w: World, identity: str) -> str:
    body = w.chainguard.identities[identity]
    subject: str = (body.get("claimMatch") or body.get("staticKeys") or {})["subject"]
    return subject


def condition(obj: dict[str, Any], kind: str) -> dict[str, Any]:
    found: dict[str, Any] = next(c for c in obj["status"]["conditions"] if c["type"] == kind)
    return found


async def exchange(w: World, namespace: str, service_account: str, identity: str) -> int:
    """The seeds' pod flow: the HTTP status of an STS exchange with the service account's token."""
    w.kube.add_service_account(namespace, service_account)
    return (await w.pod_exchange(namespace, service_account, identity)).status_code


async def events_on(w: World, namespace: str, name: str) -> list[dict[str, Any]]:
    return [e for e in await w.events(namespace) if e["involvedObject"]["name"] == name]


async def resync(w: World, resources: int, *, rounds: int = 2) -> None:
    """Drive the operator through ``rounds`` resyncs of ``resources`` live resources, each to its end."""
    assert w.runtime is not None
    metrics = w.runtime.metrics
    for _ in range(rounds):
        before = metrics.total("chainguard_identity_reconciles_total")
        w.advance(w.settings.resync_interval)

        async def passed(at_least: float = before + resources) -> bool:
            return metrics.total("chainguard_identity_reconciles_total") >= at_least

        await w.wait_for(passed, what=f"{resources} reconcile passes")


async def forge_status(w: World, namespace: str, name: str, status: dict[str, Any]) -> IdentityStatus:
    """What a tenant with ``chainguardidentities/status`` rights can do: merge-patch the status. Returns
    the status as the operator will read it back, so a test can check the forgery survived the schema."""
    async with w.client() as client:
        response = await client.patch(
            CR_PATH.format(namespace=namespace, name=name) + "/status",
            json={"status": status},
            headers={"Content-Type": "application/merge-patch+json"},
        )
        response.raise_for_status()
    obj = await w.get(namespace, name)
    assert obj is not None
    return IdentityStatus.from_dict(obj.get("status") or {})


async def gone(w: World, namespace: str, name: str) -> None:
    async def deleted() -> bool:
        return await w.get(namespace, name) is None

    await w.wait_for(deleted, what=f"{namespace}/{name} to be finalized and removed")


def hand_made(w: World, name: str, subject: str, roles: tuple[str, ...]) -> str:
    """An identity an admin made by hand (no marker of the operator), bound to ``roles`` in the org."""
    uid = w.chainguard.add_identity(
        w.org,
        {
            "name": name,
            "description": "made by hand for the deploy job",
            "claimMatch": {"issuer": w.kube.issuer, "subject": subject, "audience": "issuer.enforce.dev"},
        },
    )
    for role in roles:
        w.chainguard.bind(uid, w.org, role)
    return uid


# -- 1. the operator's own identity -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("adoption_namespaces", "why"),
    [
        ((), "adoption is not allowed in namespace shop"),
        (("*",), "is the operator's own; only a resource in chainguard-system may adopt it"),
    ],
    ids=["default-settings", "adoption-allowed-everywhere"],
)
async def test_a_tenant_cannot_adopt_the_operators_own_identity(
    adoption_namespaces: tuple[str, ...], why: str
) -> None:
    async with world(settings_overrides={"adoption_namespaces": adoption_namespaces}) as w:
        own = w.operator_identity
        before = stored(w, own)
        assert [b["role"]["name"] for b in before["bindings"]] == ["owner"]

        await w.apply(cr("hijack", parent=w.org, adopt=own))
        obj = await w.wait_condition("shop", "hijack", "Stalled", "True", reason="AdoptionRefused")
        stalled = condition(obj, "Stalled")
        assert stalled["message"].startswith("spec.adopt: ")
        assert why in stalled["message"]
        assert condition(obj, "Ready")["status"] == "False"
        assert "identityId" not in obj["status"]

        await resync(w, resources=1)
        assert stored(w, own) == before  # description, subject, keys and the owner binding
        assert writes_to(w, own) == []
        name = naming.identity_name("sandbox", "shop", "hijack")
        assert not [i for i in w.chainguard.identities.values() if i["name"] == name]

        assert await exchange(w, "shop", "default", own) == 403  # the tenant's token gets nothing
        assert await exchange(w, OPERATOR_NAMESPACE, OPERATOR_SERVICE_ACCOUNT, own) == 200
        await w.apply(cr("after", parent=w.org))  # the operator still authenticates and works
        after = await w.wait_ready("shop", "after")
        assert await exchange(w, "shop", "default", after["status"]["identityId"]) == 200


# -- 2. another resource's identity ---------------------------------------------------------------------


@pytest.mark.parametrize("attacker_namespace", ["default", "shop"])
async def test_a_tenant_cannot_adopt_another_resources_identity(attacker_namespace: str) -> None:
    async with world(settings_overrides={"adoption_namespaces": ("*",)}) as w:
        await w.apply(cr("victim", parent=w.org))
        victim = (await w.wait_ready("shop", "victim"))["status"]["identityId"]
        before = stored(w, victim)

        await w.apply(
            cr("attacker", namespace=attacker_namespace, parent=w.org, adopt=victim, roles=["viewer"])
        )
        obj = await w.wait_condition(
            attacker_namespace, "attacker", "Stalled", "True", reason="AdoptionRefused"
        )
        message = condition(obj, "Stalled")["message"]
        assert f"identity {victim} is managed by ChainguardIdentity shop/victim" in message

        await resync(w, resources=2)
        assert stored(w, victim) == before
        assert writes_to(w, victim) == []
        if attacker_namespace != "shop":
            assert await exchange(w, attacker_namespace, "default", victim) == 403

        await w.delete(attacker_namespace, "attacker")
        await gone(w, attacker_namespace, "attacker")
        await resync(w, resources=1)
        assert stored(w, victim) == before
        assert writes_to(w, victim) == []
        assert await exchange(w, "shop", "default", victim) == 200


# -- 3. two resources, one identity ---------------------------------------------------------------------


async def test_two_resources_adopting_one_identity_leave_one_winner_and_no_tug_of_war(sandbox: World) -> None:
    w = sandbox
    uid = hand_made(w, "deploy", f"system:serviceaccount:{OPERATOR_NAMESPACE}:deployer", ("registry.pull",))
    for service_account in ("one", "two"):
        w.kube.add_service_account(OPERATOR_NAMESPACE, service_account)

    await w.apply(
        cr("first", namespace=OPERATOR_NAMESPACE, parent=w.org, adopt=uid, serviceAccountName="one")
    )
    first = await w.wait_ready(OPERATOR_NAMESPACE, "first")
    assert first["status"]["identityId"] == uid
    adopted_writes = writes_to(w, uid)  # the adoption: the marker first, then the subject
    assert adopted_writes
    assert set(adopted_writes) == {"PATCH 200"}

    await w.apply(
        cr("second", namespace=OPERATOR_NAMESPACE, parent=w.org, adopt=uid, serviceAccountName="two")
    )
    obj = await w.wait_condition(OPERATOR_NAMESPACE, "second", "Stalled", "True", reason="AdoptionRefused")
    assert f"managed by ChainguardIdentity {OPERATOR_NAMESPACE}/first" in condition(obj, "Stalled")["message"]

    await resync(w, resources=2, rounds=3)
    assert subject_of(w, uid) == f"system:serviceaccount:{OPERATOR_NAMESPACE}:one"
    assert w.owns(w.chainguard.identities[uid]["description"], OPERATOR_NAMESPACE, "first")
    assert writes_to(w, uid) == adopted_writes  # no back and forth
    loser = await w.get(OPERATOR_NAMESPACE, "second")
    assert loser is not None
    assert condition(loser, "Stalled")["status"] == "True"
    assert "identityId" not in loser["status"]
    events = await events_on(w, OPERATOR_NAMESPACE, "second")
    assert events
    assert {e["type"] for e in events} == {"Warning"}
    assert await exchange(w, OPERATOR_NAMESPACE, "one", uid) == 200
    assert await exchange(w, OPERATOR_NAMESPACE, "two", uid) == 403


async def test_two_resources_adopting_one_identity_at_once_leave_one_winner(sandbox: World) -> None:
    w = sandbox
    uid = hand_made(w, "deploy", f"system:serviceaccount:{OPERATOR_NAMESPACE}:deployer", ("registry.pull",))
    for service_account in ("one", "two"):
        w.kube.add_service_account(OPERATOR_NAMESPACE, service_account)
    # Both applied together, as two tenants racing would. The race shows without help; holding the first
    # adoption write for a moment (a busy API) makes it certain, so this test fails every time.
    w.chainguard.faults.add("PATCH", rf"^/iam/v2/identities/{uid}$", status=200, delay=1.5)
    await asyncio.gather(
        *(
            w.apply(
                cr(name, namespace=OPERATOR_NAMESPACE, parent=w.org, adopt=uid, serviceAccountName=account)
            )
            for name, account in (("first", "one"), ("second", "two"))
        )
    )

    async def settled() -> dict[str, str] | None:
        phases: dict[str, str] = {}
        for name in ("first", "second"):
            obj = await w.get(OPERATOR_NAMESPACE, name)
            conditions = {c["type"]: c for c in ((obj or {}).get("status") or {}).get("conditions", [])}
            if conditions.get("Ready", {}).get("status") == "True":
                phases[name] = "Ready"
            elif conditions.get("Stalled", {}).get("status") == "True":
                phases[name] = "Stalled"
        return phases if len(phases) == 2 else None

    await w.wait_for(settled, what="both resources to be Ready or Stalled")
    adopted_writes = writes_to(w, uid)
    await resync(w, resources=2, rounds=3)
    phases = await settled()
    assert phases is not None
    assert sorted(phases.values()) == ["Ready", "Stalled"], phases
    winner, account = next((n, a) for n, a in (("first", "one"), ("second", "two")) if phases[n] == "Ready")
    assert w.owns(w.chainguard.identities[uid]["description"], OPERATOR_NAMESPACE, winner)
    assert subject_of(w, uid) == f"system:serviceaccount:{OPERATOR_NAMESPACE}:{account}"
    assert writes_to(w, uid) == adopted_writes  # no back and forth
    assert w.chainguard.writes().get("identity.create", 0) == 0  # nor a fresh identity for the loser


# -- 4. an identity holding owner -----------------------------------------------------------------------


@pytest.mark.parametrize("privileged", [False, True], ids=["refused", "privileged-allowed"])
async def test_adopting_an_identity_holding_owner_needs_the_admins_consent(privileged: bool) -> None:
    async with world(settings_overrides={"adoption_privileged": privileged}) as w:
        subject = f"system:serviceaccount:{OPERATOR_NAMESPACE}:deployer"
        uid = hand_made(w, "deploy", subject, ("owner",))
        before = stored(w, uid)
        w.kube.add_service_account(OPERATOR_NAMESPACE, "deployer")
        await w.apply(
            cr(
                "deployer",
                namespace=OPERATOR_NAMESPACE,
                parent=w.org,
                adopt=uid,
                serviceAccountName="deployer",
            )
        )
        if not privileged:
            obj = await w.wait_condition(
                OPERATOR_NAMESPACE, "deployer", "Stalled", "True", reason="AdoptionRefused"
            )
            message = condition(obj, "Stalled")["message"]
            owner_role = w.chainguard.builtin_role_uid("owner")
            assert f"holds roles outside the allow-list ({owner_role})" in message
            assert "CGID_ADOPTION_PRIVILEGED=true" in message
            await resync(w, resources=1)
            assert stored(w, uid) == before
            assert writes_to(w, uid) == []
        else:
            status = (await w.wait_ready(OPERATOR_NAMESPACE, "deployer"))["status"]
            assert status["identityId"] == uid
            assert w.owns(w.chainguard.identities[uid]["description"], OPERATOR_NAMESPACE, "deployer")
            roles = sorted(b["role"]["name"] for b in bindings_of(w, uid))
            assert roles == ["owner", "registry.pull"]  # owner is kept: the admin allowed it
            assert subject_of(w, uid) == subject
            reasons = {e["reason"] for e in await events_on(w, OPERATOR_NAMESPACE, "deployer")}
            assert "Adopted" in reasons
        assert await exchange(w, OPERATOR_NAMESPACE, "deployer", uid) == 200


# -- 5. a forged status ---------------------------------------------------------------------------------


async def test_a_forged_status_gets_the_tenant_nothing(sandbox: World) -> None:
    w = sandbox
    await w.apply(cr("victim", parent=w.org))
    victim = (await w.wait_ready("shop", "victim"))["status"]["identityId"]
    before = stored(w, victim)
    forged = {
        "identityId": victim,
        "retiring": [{"identityId": victim, "deleteAfter": LONG_AGO}],
        "parent": w.org,
    }

    # Racing the operator: the resource is created and its status forged before any pass sees it.
    await w.stop_operator()
    await w.apply(cr("attacker", namespace="default", parent=w.org))
    read_back = await forge_status(w, "default", "attacker", forged)
    assert read_back.identity_id == victim  # the forgery is well formed: the operator reads it
    assert [(r.identity_id, r.delete_after < w.clock()) for r in read_back.retiring] == [(victim, True)]
    await w.start_operator()
    status = (await w.wait_ready("default", "attacker"))["status"]
    own = status["identityId"]
    assert own != victim
    assert w.owns(w.chainguard.identities[own]["description"], "default", "attacker")
    assert not status.get("retiring")
    left_alone = [e for e in await events_on(w, "default", "attacker") if e["reason"] == "LeftAlone"]
    assert left_alone
    assert {e["type"] for e in left_alone} == {"Warning"}
    assert victim in left_alone[0]["message"]
    await resync(w, resources=2)
    assert stored(w, victim) == before
    assert writes_to(w, victim) == []
    assert (await w.config_map("default", "attacker-chainguard-identity") or {})["CHAINGUARD_IDENTITY"] == own

    # Forged again, and the resource deleted while the operator is down: the finalizer reads the forgery.
    await w.stop_operator()
    assert (await forge_status(w, "default", "attacker", forged)).identity_id == victim
    await w.delete("default", "attacker")
    await w.start_operator()
    await gone(w, "default", "attacker")
    await resync(w, resources=1)
    assert stored(w, victim) == before
    assert writes_to(w, victim) == []
    assert own not in w.chainguard.identities  # its own identity went, and only that
    assert await exchange(w, "shop", "default", victim) == 200


async def test_a_forged_adopted_record_does_not_skip_the_adoption_refusal() -> None:
    async with world(settings_overrides={"adoption_namespaces": ("*",)}) as w:
        await w.apply(cr("victim", parent=w.org))
        victim = (await w.wait_ready("shop", "victim"))["status"]["identityId"]
        before = stored(w, victim)

        await w.stop_operator()
        await w.apply(cr("attacker", namespace="default", parent=w.org, adopt=victim))
        assert (await forge_status(w, "default", "attacker", {"adopted": victim})).adopted == victim
        await w.start_operator()

        async def settled() -> dict[str, Any] | None:
            obj = await w.get("default", "attacker")
            conditions = ((obj or {}).get("status") or {}).get("conditions", [])
            done = any(c["type"] in ("Ready", "Stalled") and c["status"] == "True" for c in conditions)
            return obj if done else None

        await w.wait_for(settled, what="default/attacker to be Ready or Stalled")
        await resync(w, resources=2)
        assert stored(w, victim) == before  # holds today: the victim is never touched
        assert writes_to(w, victim) == []
        assert await exchange(w, "shop", "default", victim) == 200
        obj = await w.get("default", "attacker")
        assert obj is not None
        stalled = condition(obj, "Stalled")
        assert (stalled["status"], stalled["reason"]) == ("True", "AdoptionRefused"), condition(obj, "Ready")
        assert "managed by ChainguardIdentity shop/victim" in stalled["message"]
        assert obj["status"].get("adopted") != victim  # the audit record never claims the victim's


# -- 6. a forged ConfigMap ------------------------------------------------------------------------------


async def test_a_forged_config_map_is_rewritten_to_the_tenants_own_identity(sandbox: World) -> None:
    w = sandbox
    await w.apply(cr("victim", parent=w.org))
    victim = (await w.wait_ready("shop", "victim"))["status"]["identityId"]
    await w.apply(cr("attacker", namespace="default", parent=w.org))
    own = (await w.wait_ready("default", "attacker"))["status"]["identityId"]
    before = stored(w, victim)

    async with w.client() as client:
        response = await client.patch(
            "/api/v1/namespaces/default/configmaps/attacker-chainguard-identity",
            json={"data": {"CHAINGUARD_IDENTITY": victim}},
            headers={"Content-Type": "application/merge-patch+json"},
        )
        response.raise_for_status()
    assert (await w.config_map("default", "attacker-chainguard-identity") or {})[
        "CHAINGUARD_IDENTITY"
    ] == victim

    await resync(w, resources=2)
    data = await w.config_map("default", "attacker-chainguard-identity")
    assert data is not None
    assert data["CHAINGUARD_IDENTITY"] == own
    status = (await w.wait_ready("default", "attacker"))["status"]
    assert status["identityId"] == own
    assert not status.get("retiring")
    assert stored(w, victim) == before
    assert writes_to(w, victim) == []
    assert await exchange(w, "default", "default", victim) == 403
    assert await exchange(w, "shop", "default", victim) == 200


# -- 7. two clusters, one organization ------------------------------------------------------------------


async def test_two_clusters_sharing_an_organization_and_a_name_never_touch_each_others_identities() -> None:
    # Both clusters as kubeadm makes them: cluster name "kubernetes", the cluster-local issuer. Only the
    # cluster ID (kube-system's UID) and the signing keys tell them apart.
    same = {"cluster_name": "kubernetes"}
    async with (
        world(issuer=LOCAL_ISSUER, routable=False, settings_overrides=same) as a,
        world(issuer=LOCAL_ISSUER, routable=False, settings_overrides=same, shared=a) as b,
    ):
        assert b.chainguard is a.chainguard
        assert b.org == a.org
        assert a.owner("shop", "puller").cluster_id != b.owner("shop", "puller").cluster_id

        await a.apply(cr("puller", parent=a.org))
        in_a = (await a.wait_ready("shop", "puller"))["status"]["identityId"]
        await b.apply(cr("puller", parent=b.org))
        in_b = (await b.wait_ready("shop", "puller"))["status"]["identityId"]
        assert in_a != in_b
        name = naming.identity_name("kubernetes", "shop", "puller")
        assert a.chainguard.identities[in_a]["name"] == a.chainguard.identities[in_b]["name"] == name
        assert a.owns(a.chainguard.identities[in_a]["description"], "shop", "puller")
        assert b.owns(b.chainguard.identities[in_b]["description"], "shop", "puller")
        assert not a.owns(a.chainguard.identities[in_b]["description"], "shop", "puller")
        assert subject_of(a, in_a) == subject_of(a, in_b)  # same issuer, same subject: only keys differ

        assert await exchange(a, "shop", "default", in_a) == 200
        assert await exchange(a, "shop", "default", in_b) == 403
        assert await exchange(b, "shop", "default", in_b) == 200
        assert await exchange(b, "shop", "default", in_a) == 403

        before = stored(b, in_b)
        await resync(a, resources=1)
        await resync(b, resources=1)
        assert stored(b, in_b) == before

        await a.delete("shop", "puller")
        await gone(a, "shop", "puller")
        assert in_a not in a.chainguard.identities
        await resync(b, resources=1)
        assert stored(b, in_b) == before
        assert writes_to(b, in_b) == []
        assert await exchange(b, "shop", "default", in_b) == 200


# -- 8. legacy markers ----------------------------------------------------------------------------------


def legacy_identity(w: World, namespace: str, name: str) -> str:
    """An identity as an operator before cluster IDs made it: a marker naming only the cluster name."""
    uid = w.chainguard.add_identity(
        w.org,
        {
            "name": naming.identity_name("sandbox", namespace, name),
            "description": f"managed-by=chainguard-identity-operator cluster=sandbox object={namespace}/{name}",
            "claimMatch": {
                "issuer": w.kube.issuer,
                "subject": f"system:serviceaccount:{namespace}:default",
                "audience": "issuer.enforce.dev",
            },
        },
    )
    w.chainguard.bind(uid, w.org, "registry.pull")
    return uid


async def test_a_legacy_identity_its_status_records_is_migrated_in_place_and_no_other() -> None:
    async with world(start=False) as w:
        recorded = legacy_identity(w, "shop", "puller")
        stray = legacy_identity(w, "shop", "puller")  # same marker, same name: status does not record it
        stray_before = stored(w, stray)
        await w.apply(cr("puller", parent=w.org, mode="ClaimMatch"))
        assert (await forge_status(w, "shop", "puller", {"identityId": recorded})).identity_id == recorded
        await w.start_operator()

        status = (await w.wait_ready("shop", "puller"))["status"]
        assert status["identityId"] == recorded  # same UIDP
        assert w.owns(w.chainguard.identities[recorded]["description"], "shop", "puller")
        assert "identity.create" not in w.chainguard.writes()
        assert "role_binding.create" not in w.chainguard.writes()  # its registry.pull binding is kept
        reasons = {e["reason"] for e in await events_on(w, "shop", "puller")}
        assert "Migrated" in reasons

        await resync(w, resources=1)
        assert stored(w, stray) == stray_before  # not adopted, not migrated, not deleted
        assert writes_to(w, stray) == []
        assert not status.get("retiring")
        assert "identity.create" not in w.chainguard.writes()
        assert await exchange(w, "shop", "default", recorded) == 200


async def test_a_legacy_identity_found_only_by_name_is_not_adopted() -> None:
    """Another cluster named "sandbox" may have made it: a legacy marker proves nothing by itself."""
    async with world() as w:
        stray = legacy_identity(w, "shop", "newcomer")
        before = stored(w, stray)
        await w.apply(cr("newcomer", parent=w.org, mode="ClaimMatch"))
        own = (await w.wait_ready("shop", "newcomer"))["status"]["identityId"]
        assert own != stray
        assert w.owns(w.chainguard.identities[own]["description"], "shop", "newcomer")

        await resync(w, resources=1)
        assert stored(w, stray) == before
        assert writes_to(w, stray) == []
        await w.delete("shop", "newcomer")
        await gone(w, "shop", "newcomer")
        assert stored(w, stray) == before
        assert own not in w.chainguard.identities
        assert await exchange(w, "shop", "default", stray) == 200


async def test_an_identity_adopted_before_the_upgrade_stays_adopted_with_the_roles_it_had() -> None:
    """The operator's own identity, adopted by an operator from before cluster IDs: its status has
    identityId and the roleBindings that operator made (viewer) — no `adopted`, no `inheritedRoles` —
    and the identity carries a legacy marker. After the upgrade it is migrated in place, never refused,
    and it keeps the owner binding it had before the adoption."""
    async with world(start=False) as w:
        own = w.operator_identity
        legacy = (
            f"managed-by=chainguard-identity-operator cluster=sandbox object={OPERATOR_NAMESPACE}/operator"
        )
        w.chainguard.identities[own]["description"] = legacy
        viewer = w.chainguard.bind(own, w.org, "viewer")  # what the old operator bound for spec.roles
        owner_role = w.chainguard.builtin_role_uid("owner")
        viewer_role = w.chainguard.builtin_role_uid("viewer")
        await w.apply(
            cr(
                "operator",
                namespace=OPERATOR_NAMESPACE,
                parent=w.org,
                adopt=own,
                mode="Static",
                serviceAccountName=OPERATOR_SERVICE_ACCOUNT,
                roles=["viewer"],
                deletionPolicy="Orphan",
            )
        )
        old_status = {
            "identityId": own,
            "roleBindings": [{"role": "viewer", "roleId": viewer_role, "bindingId": viewer}],
        }
        assert (await forge_status(w, OPERATOR_NAMESPACE, "operator", old_status)).identity_id == own
        await w.start_operator()

        status = (await w.wait_ready(OPERATOR_NAMESPACE, "operator"))["status"]
        assert status["identityId"] == own
        assert status["adopted"] == own
        assert status["inheritedRoles"] == [owner_role]
        assert w.owns(w.chainguard.identities[own]["description"], OPERATOR_NAMESPACE, "operator")
        roles = {b["role"]["uid"] for b in bindings_of(w, own)}
        assert roles == {owner_role, viewer_role}
        assert "identity.create" not in w.chainguard.writes()
        await resync(w, resources=1)
        assert {b["role"]["uid"] for b in bindings_of(w, own)} == {owner_role, viewer_role}
        assert await exchange(w, OPERATOR_NAMESPACE, OPERATOR_SERVICE_ACCOUNT, own) == 200


@pytest.mark.parametrize("adopts_itself", [False, True])
async def test_a_forged_inherited_role_is_never_bound(adopts_itself: bool) -> None:
    """status.inheritedRoles is a record, not a source: a tenant writing `owner` there gets nothing —
    also when it claims to have adopted its own identity (an adoption the admin allowed everywhere)."""
    async with world(settings_overrides={"adoption_namespaces": ("*",)}) as w:
        await w.apply(cr("greedy", namespace="default", parent=w.org))
        own = (await w.wait_ready("default", "greedy"))["status"]["identityId"]
        owner_role = w.chainguard.builtin_role_uid("owner")
        await w.stop_operator()
        forged: dict[str, Any] = {"inheritedRoles": [owner_role]}
        if adopts_itself:
            await w.apply(cr("greedy", namespace="default", parent=w.org, adopt=own))
            forged["adopted"] = own
        assert (await forge_status(w, "default", "greedy", forged)).inherited_roles == (owner_role,)
        await w.start_operator()
        await resync(w, resources=1)
        await w.wait_ready("default", "greedy")
        roles = {b["role"]["uid"] for b in bindings_of(w, own)}
        assert owner_role not in roles
        assert roles == {w.chainguard.builtin_role_uid("registry.pull")}
        status = (await w.get("default", "greedy") or {})["status"]
        assert owner_role not in status.get("inheritedRoles", [])  # the record is corrected, too
