"""The operator on a real API server: RBAC from deploy/ suffices and is least-privilege, the shipped
examples become Ready (as ``kubectl wait`` sees it), the seeds' pod flow works with a token from the
cluster's own TokenRequest API, edits converge, invalid specs stall, and deletion runs the finalizer and
lets the garbage collector remove the ConfigMap. See conftest.py for what runs where.

    kind create cluster --name cgid-e2e
    .venv/bin/pytest --kubeconfig ~/.kube/config -m e2e tests/e2e
"""

from __future__ import annotations

import copy
import pathlib
from typing import Any

import httpx
import pytest
import yaml
from e2e_support import OPERATOR_SUBJECT, ROOT, Cluster, Operator, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

EXAMPLES = ROOT / "examples"


def example(file: str, namespace: str, **spec: Any) -> dict[str, Any]:
    """A shipped example, moved into the test's namespace, with ``spec`` fields replaced."""
    manifest: dict[str, Any] = yaml.safe_load((EXAMPLES / file).read_text())
    manifest = copy.deepcopy(manifest)
    manifest["metadata"]["namespace"] = namespace
    manifest["spec"].update(spec)
    return manifest


async def exchange(op: Operator, namespace: str, account: str, identity: str) -> httpx.Response:
    """The seeds' pod: a projected-style token (audience issuer.enforce.dev) exchanged at the STS."""
    token = await op.cluster.token(namespace, account, audience="issuer.enforce.dev")
    async with httpx.AsyncClient(timeout=10) as client:
        return await client.post(
            f"{op.chainguard.sts_url}/sts/exchange",
            data={"aud": op.settings.api_url, "identity": identity},
            headers={"Authorization": f"Bearer {token}"},
        )


async def test_the_rbac_is_least_privilege_on_the_api_server(
    kubeconfig: pathlib.Path, installed: list[dict[str, Any]], namespace: str
) -> None:
    cluster = Cluster(kubeconfig)

    async def can(verb: str, what: str, *, namespaced: bool = True) -> bool:
        """``kubectl auth can-i`` as the operator; ``what`` is a resource (``x/sub`` for a subresource)
        or a non-resource URL."""
        resource, _, subresource = what.partition("/") if not what.startswith("/") else (what, "", "")
        flags = [f"--subresource={subresource}"] if subresource else []
        flags += ["-n", namespace] if namespaced else []
        out = await cluster.kubectl(
            "auth", "can-i", verb, resource, f"--as={OPERATOR_SUBJECT}", *flags, check=False
        )
        return out.strip() == "yes"

    granted = [
        ("list", "chainguardidentities.iam.chainguard.dev"),
        ("watch", "chainguardidentities.iam.chainguard.dev"),
        ("patch", "chainguardidentities.iam.chainguard.dev"),
        ("patch", "chainguardidentities.iam.chainguard.dev/status"),
        ("get", "configmaps"),
        ("create", "configmaps"),
        ("patch", "configmaps"),
        ("delete", "configmaps"),  # only a ConfigMap left under an old spec.configMap.name
        ("get", "serviceaccounts"),
        ("create", "events"),
    ]
    for verb, what in granted:
        assert await can(verb, what), f"the operator cannot {verb} {what}"
    # The cluster ID: the kube-system namespace, and no other.
    out = await cluster.kubectl(
        "auth", "can-i", "get", "namespaces/kube-system", f"--as={OPERATOR_SUBJECT}", check=False
    )
    assert out.strip() == "yes", "the operator cannot read the kube-system namespace (its cluster ID)"
    out = await cluster.kubectl(
        "auth", "can-i", "get", "namespaces/default", f"--as={OPERATOR_SUBJECT}", check=False
    )
    assert out.strip() == "no", "the operator may read other namespaces"
    for url in ("/openid/v1/jwks", "/.well-known/openid-configuration"):
        assert await can("get", url, namespaced=False), f"the operator cannot get {url}"
    refused = [
        ("get", "secrets"),
        ("update", "configmaps"),
        ("patch", "serviceaccounts"),
        ("get", "chainguardidentities.iam.chainguard.dev"),
        ("create", "chainguardidentities.iam.chainguard.dev"),
        ("delete", "chainguardidentities.iam.chainguard.dev"),
        ("update", "chainguardidentities.iam.chainguard.dev/status"),
        ("create", "serviceaccounts/token"),
        ("list", "pods"),
    ]
    for verb, what in refused:
        assert not await can(verb, what), f"the operator may {verb} {what}, which it never needs"


async def test_the_examples_become_ready_and_a_pod_can_assume_the_identity(operator: Operator) -> None:
    op, ns = operator, operator.namespace
    await op.cluster.apply(example("static.yaml", ns, parent=op.org))
    await op.cluster.apply(example("auto.yaml", ns))

    static = await op.wait_for_condition("ci-runner", "Ready")
    auto = await op.wait_for_condition("registry", "Ready")
    assert static["status"]["mode"] == "Static"
    assert static["status"]["observedGeneration"] == static["metadata"]["generation"]
    assert static["status"]["subject"] == f"system:serviceaccount:{ns}:default"
    assert static["status"]["issuer"] == op.issuer
    stored = op.chainguard.identities[static["status"]["identityId"]]
    assert stored["staticKeys"]["issuer"] == op.issuer
    assert sorted(b["role"] for b in static["status"]["roleBindings"]) == ["registry.pull", "viewer"]
    assert auto["status"]["identityId"] in op.chainguard.identities

    config_map = await op.cluster.get("configmap", ns, "ci-runner-chainguard-identity")
    assert config_map is not None
    assert config_map["data"]["CHAINGUARD_IDENTITY"] == static["status"]["identityId"]
    assert config_map["metadata"]["ownerReferences"][0]["uid"] == static["metadata"]["uid"]

    # The seeds' pod flow with a token from this cluster's TokenRequest API.
    async def default_account() -> dict[str, Any] | None:
        return await op.cluster.get("serviceaccount", ns, "default")

    await wait_until(default_account, what="the namespace's default service account")
    response = await exchange(op, ns, "default", config_map["data"]["CHAINGUARD_IDENTITY"])
    assert response.status_code == 200, response.text
    await op.cluster.kubectl("create", "serviceaccount", "intruder", "-n", ns)
    refused = await exchange(op, ns, "intruder", config_map["data"]["CHAINGUARD_IDENTITY"])
    assert refused.status_code == 403, refused.text

    table = await op.cluster.kubectl("get", "cgid", "-n", ns)
    assert "ci-runner" in table
    assert "True" in table


async def test_edits_converge_bad_specs_stall_and_delete_runs_the_finalizer(operator: Operator) -> None:
    op, ns = operator, operator.namespace
    await op.cluster.apply(example("static.yaml", ns, parent=op.org))
    first = await op.wait_for_condition("ci-runner", "Ready")
    uid = first["status"]["identityId"]

    await op.cluster.apply(example("static.yaml", ns, parent=op.org, roles=["registry.pull"]))

    async def converged() -> dict[str, Any] | None:
        obj = await op.cluster.get("chainguardidentity", ns, "ci-runner")
        if obj is None or obj["status"].get("observedGeneration") != obj["metadata"]["generation"]:
            return None
        ready = next(c for c in obj["status"]["conditions"] if c["type"] == "Ready")
        return obj if ready["status"] == "True" else None

    edited = await wait_until(converged, what="the edit to be reconciled")
    assert edited["status"]["identityId"] == uid
    assert [b["role"] for b in edited["status"]["roleBindings"]] == ["registry.pull"]
    assert [
        b["role"]["name"] for b in op.chainguard.role_bindings.values() if b["identity"]["uid"] == uid
    ] == ["registry.pull"]

    await op.cluster.apply(example("auto.yaml", ns, roles=["owner"]))
    stalled = await op.wait_for_condition("registry", "Stalled")
    condition = next(c for c in stalled["status"]["conditions"] if c["type"] == "Stalled")
    assert condition["reason"] == "RoleNotAllowed"

    # `kubectl delete` waits for the finalizer: the identity goes first, then the object.
    await op.cluster.kubectl("delete", "chainguardidentity", "ci-runner", "-n", ns, "--timeout=120s")
    assert uid not in op.chainguard.identities
    assert not [b for b in op.chainguard.role_bindings.values() if b["identity"]["uid"] == uid]

    async def config_map_collected() -> bool:
        return await op.cluster.get("configmap", ns, "ci-runner-chainguard-identity") is None

    await wait_until(config_map_collected, what="the garbage collector to remove the owned ConfigMap")
