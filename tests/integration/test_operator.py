"""The real operator (kopf) against the Kubernetes and Chainguard emulators.

The proof that an identity works is always the seeds' pod flow: a token the cluster emulator mints for
the pod's service account, with audience ``issuer.enforce.dev``, exchanged at the emulated STS for the
identity named in the ConfigMap — and refused for any other service account.
"""

from __future__ import annotations

import datetime
import json
import logging
import re
from typing import Any

import pytest

from cgid_testkit.harness import ORG_NAME, World, world
from chainguard_identity_operator import naming
from chainguard_identity_operator.chainguard.types import parse_time

CONFIG_KEYS = {
    "CHAINGUARD_IDENTITY",
    "CHAINGUARD_ISSUER",
    "CHAINGUARD_API",
    "CHAINGUARD_AUDIENCE",
    "CHAINGUARD_REGISTRY",
}
JWT = re.compile(r"eyJ[\w-]+\.[\w-]+\.[\w-]+")


def cr(name: str, namespace: str = "shop", **spec: Any) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": namespace}, "spec": spec}


def identities_named(w: World, name: str) -> list[dict[str, Any]]:
    return [i for i in w.chainguard.identities.values() if i["name"] == name]


def bindings_of(w: World, identity: str) -> list[dict[str, Any]]:
    return [b for b in w.chainguard.role_bindings.values() if b["identity"]["uid"] == identity]


async def assert_pod_flow(w: World, namespace: str, service_account: str, identity: str) -> None:
    response = await w.pod_exchange(namespace, service_account, identity)
    assert response.status_code == 200, response.text
    repos = await w.list_repos(response.json()["token"])
    assert sorted(repos) == ["curl", "nginx", "python"]
    w.kube.add_service_account(namespace, "intruder")
    refused = await w.pod_exchange(namespace, "intruder", identity)
    assert refused.status_code == 403, refused.text


async def test_claim_match_identity_end_to_end(sandbox: World) -> None:
    w = sandbox
    await w.apply(cr("puller", mode="ClaimMatch", parentName=ORG_NAME, roles=["registry.pull"]))
    obj = await w.wait_ready("shop", "puller")
    status = obj["status"]

    stored = w.chainguard.identities[status["identityId"]]
    assert stored["name"] == naming.identity_name("sandbox", "shop", "puller")
    assert stored["claimMatch"]["issuer"] == w.kube.issuer
    assert stored["claimMatch"]["subject"] == "system:serviceaccount:shop:default"
    assert stored["claimMatch"]["audience"] == "issuer.enforce.dev"
    assert w.owns(stored["description"], "shop", "puller")
    assert [b["role"]["name"] for b in bindings_of(w, status["identityId"])] == ["registry.pull"]
    assert all(b["group"]["uid"] == w.org for b in bindings_of(w, status["identityId"]))

    assert status["mode"] == "ClaimMatch"
    assert status["subject"] == "system:serviceaccount:shop:default"
    assert status["parent"] == w.org
    assert [b["role"] for b in status["roleBindings"]] == ["registry.pull"]
    assert "expiresAt" not in status
    conditions = {c["type"]: c["status"] for c in status["conditions"]}
    assert conditions == {"Ready": "True", "Reconciling": "False", "Stalled": "False"}

    data = await w.config_map("shop", "puller-chainguard-identity")
    assert data is not None
    assert set(data) == CONFIG_KEYS
    assert data["CHAINGUARD_IDENTITY"] == status["identityId"]
    assert data["CHAINGUARD_AUDIENCE"] == "issuer.enforce.dev"
    await assert_pod_flow(w, "shop", "default", data["CHAINGUARD_IDENTITY"])


async def test_static_identity_end_to_end(sandbox: World) -> None:
    w = sandbox
    await w.apply(
        cr(
            "ci-runner",
            namespace="default",
            mode="Static",
            parent=w.org,
            serviceAccountName="builder",
            roles=["registry.pull", "viewer"],
            static={"validFor": "240h", "renewBefore": "48h"},
        )
    )
    w.kube.add_service_account("default", "builder")
    obj = await w.wait_ready("default", "ci-runner")
    status = obj["status"]
    stored = w.chainguard.identities[status["identityId"]]
    static = stored["staticKeys"]
    assert static["subject"] == "system:serviceaccount:default:builder"
    assert static["issuer"] == w.kube.issuer
    uploaded = json.loads(static["issuerKeys"])
    assert {k["kid"] for k in uploaded["keys"]} == {k["kid"] for k in w.kube.jwks()["keys"]}
    assert not any({"d", "p", "q", "dp", "dq", "qi", "k"} & set(key) for key in uploaded["keys"])

    expires = parse_time(static["expirationTime"])
    assert expires is not None
    expected = w.clock() + datetime.timedelta(hours=240)
    assert abs((expires - expected).total_seconds()) < 60
    assert status["expiresAt"] == static["expirationTime"]
    renew_at = parse_time(status["renewAt"])
    assert renew_at == expires - datetime.timedelta(hours=48)
    assert status["keys"]["keyIds"] == sorted(k["kid"] for k in w.kube.jwks()["keys"])
    assert status["keys"]["fingerprint"].startswith("sha256:")
    assert sorted(b["role"] for b in status["roleBindings"]) == ["registry.pull", "viewer"]

    data = await w.config_map("default", "ci-runner-chainguard-identity")
    assert data is not None
    await assert_pod_flow(w, "default", "builder", data["CHAINGUARD_IDENTITY"])


async def test_auto_mode_picks_static_for_a_cluster_local_issuer() -> None:
    async with world(issuer="https://kubernetes.default.svc.cluster.local", routable=False) as w:
        await w.apply(cr("auto", parent=w.org))
        obj = await w.wait_ready("shop", "auto")
        assert obj["status"]["mode"] == "Static"
        assert "staticKeys" in w.chainguard.identities[obj["status"]["identityId"]]
        await assert_pod_flow(w, "shop", "default", obj["status"]["identityId"])


async def test_auto_mode_picks_claim_match_for_a_public_issuer(sandbox: World) -> None:
    await sandbox.apply(cr("auto", parentName=ORG_NAME))
    obj = await sandbox.wait_ready("shop", "auto")
    assert obj["status"]["mode"] == "ClaimMatch"


async def test_spec_edits_converge(sandbox: World) -> None:
    w = sandbox
    await w.apply(cr("puller", parent=w.org, roles=["registry.pull"]))
    first = await w.wait_ready("shop", "puller")
    uid = first["status"]["identityId"]

    await w.apply(cr("puller", parent=w.org, roles=["registry.pull", "viewer"], description="team shop"))
    obj = await w.wait_ready("shop", "puller")
    assert obj["status"]["identityId"] == uid
    assert sorted(b["role"]["name"] for b in bindings_of(w, uid)) == ["registry.pull", "viewer"]
    assert w.chainguard.identities[uid]["description"].endswith("; team shop")

    await w.apply(cr("puller", parent=w.org, roles=["viewer"], description="team shop"))
    obj = await w.wait_ready("shop", "puller")
    assert [b["role"]["name"] for b in bindings_of(w, uid)] == ["viewer"]
    assert [b["role"] for b in obj["status"]["roleBindings"]] == ["viewer"]


async def test_delete_removes_the_identity_and_its_bindings(sandbox: World) -> None:
    w = sandbox
    await w.apply(cr("puller", parent=w.org))
    uid = (await w.wait_ready("shop", "puller"))["status"]["identityId"]
    await w.delete("shop", "puller")

    async def gone() -> bool:
        return await w.get("shop", "puller") is None

    await w.wait_for(gone, what="the resource to be finalized and removed")
    assert uid not in w.chainguard.identities
    assert bindings_of(w, uid) == []


async def test_orphan_policy_keeps_the_identity(sandbox: World) -> None:
    w = sandbox
    await w.apply(cr("keeper", parent=w.org, deletionPolicy="Orphan"))
    uid = (await w.wait_ready("shop", "keeper"))["status"]["identityId"]
    await w.delete("shop", "keeper")

    async def gone() -> bool:
        return await w.get("shop", "keeper") is None

    await w.wait_for(gone, what="the resource to be removed")
    assert uid in w.chainguard.identities
    assert len(bindings_of(w, uid)) == 1


async def test_a_restart_that_lost_the_status_adopts_instead_of_duplicating(sandbox: World) -> None:
    """A crash between creating the identity and writing status leaves an identity no status names."""
    w = sandbox
    await w.apply(cr("puller", parent=w.org))
    uid = (await w.wait_ready("shop", "puller"))["status"]["identityId"]
    await w.stop_operator()
    async with w.client() as client:
        response = await client.patch(
            "/apis/iam.chainguard.dev/v1alpha1/namespaces/shop/chainguardidentities/puller/status",
            json={"status": None},
            headers={"Content-Type": "application/merge-patch+json"},
        )
        response.raise_for_status()
    assert not (await w.get("shop", "puller") or {}).get("status")
    created_before = sum(
        1 for r in w.chainguard.requests if r.method == "POST" and "/iam/v2/identities/" in r.path
    )

    await w.start_operator()
    obj = await w.wait_ready("shop", "puller")
    assert obj["status"]["identityId"] == uid
    assert len(identities_named(w, naming.identity_name("sandbox", "shop", "puller"))) == 1
    created_after = sum(
        1 for r in w.chainguard.requests if r.method == "POST" and "/iam/v2/identities/" in r.path
    )
    assert created_after == created_before
    reasons = {e["reason"] for e in await w.events("shop")}
    assert "Adopted" in reasons


async def test_invalid_specs_stall_with_a_reason_and_recover_when_fixed(sandbox: World) -> None:
    w = sandbox
    await w.apply(cr("greedy", parent=w.org, roles=["owner"]))
    obj = await w.wait_condition("shop", "greedy", "Stalled", "True", reason="RoleNotAllowed")
    ready = next(c for c in obj["status"]["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "False"
    assert "spec.roles[0]" in ready["message"]

    await w.apply(cr("lost", parentName="no-such-org.example"))
    obj = await w.wait_condition("shop", "lost", "Stalled", "True", reason="ParentNotFound")
    assert (
        "spec.parentName" in next(c for c in obj["status"]["conditions"] if c["type"] == "Ready")["message"]
    )
    assert not identities_named(w, naming.identity_name("sandbox", "shop", "greedy"))

    warnings = [e for e in await w.events("shop") if e["type"] == "Warning"]
    assert {"RoleNotAllowed", "ParentNotFound"} <= {e["reason"] for e in warnings}

    await w.apply(cr("greedy", parent=w.org, roles=["viewer"]))
    obj = await w.wait_ready("shop", "greedy")
    assert {c["type"]: c["status"] for c in obj["status"]["conditions"]}["Stalled"] == "False"


async def test_transient_chainguard_failures_are_retried(sandbox: World) -> None:
    w = sandbox
    w.chainguard.faults.add("POST", r"^/iam/v2/identities/", status=503, times=7)
    await w.apply(cr("flaky", parent=w.org))
    await w.wait_ready("shop", "flaky", timeout=60)
    failed = [r for r in w.chainguard.requests if r.method == "POST" and r.status == 503]
    assert len(failed) == 7
    assert len(identities_named(w, naming.identity_name("sandbox", "shop", "flaky"))) == 1


async def test_rate_limits_are_honoured(sandbox: World) -> None:
    w = sandbox
    w.chainguard.faults.add("GET", r"^/iam/v2/roles", status=429, times=2, retry_after=0.2)
    await w.apply(cr("limited", parent=w.org))
    await w.wait_ready("shop", "limited")
    assert sum(1 for r in w.chainguard.requests if r.status == 429) == 2


async def test_an_identity_deleted_outside_is_recreated(sandbox: World) -> None:
    w = sandbox
    await w.apply(cr("puller", parent=w.org))
    old = (await w.wait_ready("shop", "puller"))["status"]["identityId"]
    del w.chainguard.identities[old]
    # Drift is read from the parent's listing, which the next resync reads afresh.
    w.advance(w.settings.resync_interval)

    async def replaced() -> str | None:
        obj = await w.get("shop", "puller")
        uid = (obj or {}).get("status", {}).get("identityId")
        return uid if uid and uid != old else None

    new = await w.wait_for(replaced, what="a new identity")
    await w.wait_ready("shop", "puller")
    data = await w.config_map("shop", "puller-chainguard-identity")
    assert data is not None
    assert data["CHAINGUARD_IDENTITY"] == new


async def test_no_token_reaches_logs_status_or_events(
    sandbox: World, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    w = sandbox
    w.chainguard.faults.add("POST", r"^/iam/v2/roleBindings/", status=503, times=2)
    await w.apply(cr("quiet", parent=w.org, mode="Static"))
    await w.apply(cr("bad", parent=w.org, roles=["owner"]))
    obj = await w.wait_ready("shop", "quiet")
    await w.wait_condition("shop", "bad", "Stalled", "True")
    assert not JWT.search(json.dumps(obj))
    assert not JWT.search(json.dumps(await w.events("shop")))
    assert not JWT.search(caplog.text)
