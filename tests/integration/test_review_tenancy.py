"""Review findings (issue 7 change): tenant attacks that still work. Each test FAILS while the hole is open."""

from __future__ import annotations

from typing import Any

import pytest
from test_tenancy import bindings_of, cr, forge_status, resync

from cgid_testkit.harness import World, world

pytestmark = pytest.mark.timeout(60)


async def test_review_a_forged_inherited_roles_record_never_binds_owner(sandbox: World) -> None:
    """A tenant who may patch its own resource's status writes status.inheritedRoles = [owner]. The
    reconcile reads inherited roles straight from status (reconcile._observe: ``inherited =
    previous.inherited_roles``) and decide binds every one of them: the tenant's identity becomes owner."""
    w = sandbox
    await w.apply(cr("attacker", namespace="default", parent=w.org))
    own = (await w.wait_ready("default", "attacker"))["status"]["identityId"]
    owner_role = w.chainguard.builtin_role_uid("owner")

    read_back = await forge_status(w, "default", "attacker", {"inheritedRoles": [owner_role]})
    assert read_back.inherited_roles == (owner_role,)  # the schema lets it through; the operator reads it
    await resync(w, resources=1)

    roles = {b["role"]["uid"] for b in bindings_of(w, own)}
    # The attacker's pod can now exchange its token for an API token of an org owner.
    response = await w.pod_exchange("default", "default", own)
    token: dict[str, Any] = response.json()
    assert owner_role not in roles, (
        f"tenant default/attacker got its identity {own} bound to owner by forging status.inheritedRoles; "
        f"exchange answered {response.status_code} with a token: {'token' in token}"
    )


# -- legacy markers: "recorded in status" is the only proof, and status is the tenant's to write ---------

OTHER_CLUSTER_ISSUER = "https://cluster-b.example"


def other_clusters_legacy_identity(w: World, namespace: str, name: str, roles: tuple[str, ...]) -> str:
    """What another cluster's operator from before cluster IDs made, on the same (default) cluster name:
    a legacy marker naming only the cluster name. Exactly the population issue 7's item 2 is about."""
    from chainguard_identity_operator import naming

    uid = w.chainguard.add_identity(
        w.org,
        {
            "name": naming.identity_name(w.settings.cluster_name, namespace, name),
            "description": (
                f"managed-by=chainguard-identity-operator cluster={w.settings.cluster_name} "
                f"object={namespace}/{name}"
            ),
            "claimMatch": {
                "issuer": OTHER_CLUSTER_ISSUER,
                "subject": f"system:serviceaccount:{namespace}:default",
                "audience": "issuer.enforce.dev",
            },
        },
    )
    for role in roles:
        w.chainguard.bind(uid, w.org, role)
    return uid


async def test_review_a_forged_identity_id_never_takes_over_another_clusters_legacy_identity() -> None:
    """A tenant of cluster A sees (with the allow-listed `viewer` role) cluster B's legacy identity
    `sandbox.shop.puller`, creates shop/puller in A and forges status.identityId to its UIDP. policy.select
    accepts a LEGACY claim when ``identity.uid in recorded_ids`` — and recorded_ids come from status."""
    from test_tenancy import stored, writes_to

    async with world(start=False) as w:
        theirs = other_clusters_legacy_identity(w, "shop", "puller", ("registry.pull",))
        before = stored(w, theirs)
        await w.apply(cr("puller", parent=w.org, mode="ClaimMatch"))
        assert (await forge_status(w, "shop", "puller", {"identityId": theirs})).identity_id == theirs
        await w.start_operator()
        status = (await w.wait_ready("shop", "puller"))["status"]
        await resync(w, resources=1)
        assert writes_to(w, theirs) == [], (
            f"cluster B's identity was rewritten for tenant shop/puller of cluster A "
            f"(status.identityId={status['identityId']}): {w.chainguard.identities[theirs]}"
        )
        assert stored(w, theirs) == before


async def test_review_a_forged_identity_id_never_lets_the_finalizer_delete_another_clusters_identity() -> (
    None
):
    from test_tenancy import gone, stored

    async with world(start=False) as w:
        theirs = other_clusters_legacy_identity(w, "shop", "puller", ("registry.pull",))
        before = stored(w, theirs)
        await w.apply(cr("puller", parent=w.org, mode="ClaimMatch", deletionPolicy="Delete"))
        await w.start_operator()
        await w.wait_ready("shop", "puller")
        await w.stop_operator()
        await forge_status(
            w, "shop", "puller", {"retiring": [{"identityId": theirs, "deleteAfter": "2000-01-01T00:00:00Z"}]}
        )
        await w.delete("shop", "puller")
        await w.start_operator()
        await gone(w, "shop", "puller")
        assert theirs in w.chainguard.identities, "the finalizer deleted cluster B's identity"
        assert stored(w, theirs) == before


async def test_review_adopt_plus_forged_identity_id_skips_the_adoption_gate_and_inherits_roles() -> None:
    """spec.adopt in a namespace where adoption is NOT allowed (default: only the operator's), plus a
    forged status.identityId: reconcile's ``adopted_before`` branch sets recorded_adoption=True without
    calling adoption_refusal, and every role the identity holds beyond the spec is inherited."""
    from test_tenancy import stored

    async with world(start=False) as w:
        theirs = other_clusters_legacy_identity(w, "shop", "puller", ("registry.pull", "registry.push"))
        before = stored(w, theirs)
        await w.apply(cr("puller", parent=w.org, mode="ClaimMatch", adopt=theirs))
        assert (await forge_status(w, "shop", "puller", {"identityId": theirs})).identity_id == theirs
        await w.start_operator()
        await resync(w, resources=1)
        obj = await w.get("shop", "puller")
        assert obj is not None
        conditions = {c["type"]: (c["status"], c["reason"]) for c in obj["status"].get("conditions", [])}
        push = w.chainguard.builtin_role_uid("registry.push")
        assert stored(w, theirs) == before, (
            f"adoption gate skipped: conditions={conditions} inheritedRoles={obj['status'].get('inheritedRoles')} "
            f"push inherited={push in obj['status'].get('inheritedRoles', [])} "
            f"identity now={w.chainguard.identities[theirs]['description']}"
        )
        assert conditions.get("Stalled") == ("True", "AdoptionRefused")
