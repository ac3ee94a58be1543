"""The operator on a real API server: RBAC from deploy/ suffices and is least-privilege, the shipped
examples become Ready (as ``kubectl wait`` sees it), the seeds' pod flow works with a token from the
cluster's own TokenRequest API, edits converge, invalid specs stall, and deletion runs the finalizer and
lets the garbage collector remove the ConfigMap. See conftest.py for what runs where.

    kind create cluster --name cgid-e2e
    .venv/bin/pytest --kubeconfig ~/.kube/config -m e2e tests/e2e
"""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import os
import pathlib
from typing import Any

import httpx
import jwt
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


def manifests(file: str, namespace: str) -> list[dict[str, Any]]:
    """Every document of a shipped example, moved into the test's namespace."""
    docs = [doc for doc in yaml.safe_load_all((EXAMPLES / file).read_text()) if doc]
    for doc in docs:
        doc["metadata"]["namespace"] = namespace
    return docs


def condition(obj: dict[str, Any], kind: str) -> dict[str, Any]:
    found: dict[str, Any] = next(c for c in obj["status"]["conditions"] if c["type"] == kind)
    return found


async def test_a_tenant_grants_the_role_and_gets_a_pull_secret_and_a_checked_exchange(
    operator: Operator,
) -> None:
    """Without the tenant's Role the operator can mint no token of the tenant's service account (the
    real RBAC says no) and says which Role it needs; with examples/pull-secret-role.yaml applied, the
    Secret holds a registry token of the identity, the service account lists it once, the exchange is
    checked — and the operator still cannot mint a token of any other service account there."""
    op, ns = operator, operator.namespace
    await op.cluster.kubectl("create", "serviceaccount", "builder", "-n", ns)
    await op.cluster.kubectl("create", "serviceaccount", "bystander", "-n", ns)
    (resource,) = manifests("pull-secret.yaml", ns)
    resource["spec"].pop("parentName")
    resource["spec"]["parent"] = op.org
    resource["spec"]["mode"] = "Static"  # the emulator cannot reach this cluster's issuer
    await op.cluster.apply(resource)

    stalled = await op.wait_for_condition("builder", "Stalled")
    refusal = condition(stalled, "Stalled")
    assert refusal["reason"] == "AccessNotGranted", refusal
    assert "forbidden" in refusal["message"].lower()  # the API server's own answer, quoted
    asked = json.loads(refusal["message"].split("kubectl apply -f -): ", 1)[1])
    shipped = manifests("pull-secret-role.yaml", ns)
    assert asked["items"] == shipped, "the Role the condition asks for is not the one examples/ ship"
    assert await op.cluster.get("secret", ns, "builder-pull") is None

    # What the namespace's admin does, exactly as docs/ADMIN.md says.
    pipeline = (
        f"kubectl get cgid builder -n {ns} -o jsonpath='{{.status.conditions[?(@.type==\"Stalled\")].message}}' "
        "| sed 's/.*kubectl apply -f -): //' | kubectl apply -f -"
    )
    shell = await asyncio.create_subprocess_shell(
        pipeline,
        env={**os.environ, "KUBECONFIG": str(op.cluster.kubeconfig)},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(shell.communicate(), timeout=60)
    assert shell.returncode == 0, out.decode()
    assert "role.rbac.authorization.k8s.io/chainguard-identity-operator-builder created" in out.decode()
    await op.wait_for_condition("builder", "PullSecretReady")
    ready = await op.wait_for_condition("builder", "Ready")
    verified = await op.wait_for_condition("builder", "ExchangeVerified")
    identity = ready["status"]["identityId"]
    assert identity in condition(verified, "ExchangeVerified")["message"]
    assert verified["status"]["exchange"]["result"] == "Verified"

    secret = await op.cluster.get("secret", ns, "builder-pull")
    assert secret is not None
    assert secret["type"] == "kubernetes.io/dockerconfigjson"
    assert secret["metadata"]["ownerReferences"][0]["uid"] == ready["metadata"]["uid"]
    config = json.loads(base64.b64decode(secret["data"][".dockerconfigjson"]))
    ((registry, entry),) = config["auths"].items()
    assert registry == op.settings.registry
    user, _, token = base64.b64decode(entry["auth"]).decode().partition(":")
    assert user == "_token"
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["sub"] == identity  # the identity's own token, minted by the STS
    assert claims["aud"] == registry
    assert claims["act"]["sub"] == f"system:serviceaccount:{ns}:builder"  # exchanged for builder's token
    account = await op.cluster.get("serviceaccount", ns, "builder")
    assert account is not None
    assert account["imagePullSecrets"] == [{"name": "builder-pull"}]

    async def operator_may(verb: str, what: str, name: str) -> bool:
        resource, _, subresource = what.partition("/")
        flags = [f"--subresource={subresource}"] if subresource else []
        out = await op.cluster.kubectl(
            "auth",
            "can-i",
            verb,
            f"{resource}/{name}",
            f"--as={OPERATOR_SUBJECT}",
            "-n",
            ns,
            *flags,
            check=False,
        )
        return out.strip() == "yes"

    assert await operator_may("create", "serviceaccounts/token", "builder")
    assert not await operator_may("create", "serviceaccounts/token", "bystander")
    assert not await operator_may("get", "secrets", "bystander-token")

    # Turning attachToServiceAccount off takes exactly that entry out again.
    resource["spec"]["pullSecret"]["attachToServiceAccount"] = False
    await op.cluster.apply(resource)

    async def detached() -> dict[str, Any] | None:
        found = await op.cluster.get("serviceaccount", ns, "builder")
        return found if found is not None and not found.get("imagePullSecrets") else None

    await wait_until(detached, what="builder-pull to leave the service account's imagePullSecrets")
