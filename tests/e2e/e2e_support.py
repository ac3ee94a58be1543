"""Helpers of the real-cluster suite (fixtures are in conftest.py): kubectl as an admin, waiting on
conditions, the operator's own kubeconfig."""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import yaml

from cgid_testkit import harness
from cgid_testkit.chainguard import ChainguardEmulator
from cgid_testkit.tools import kubectl, kubectl_sync
from chainguard_identity_operator.config import Settings

ROOT = pathlib.Path(__file__).resolve().parents[2]
OPERATOR_NAMESPACE = "chainguard-system"
OPERATOR_ACCOUNT = "chainguard-identity-operator"
OPERATOR_SUBJECT = f"system:serviceaccount:{OPERATOR_NAMESPACE}:{OPERATOR_ACCOUNT}"
ORG_NAME = "my-org.example"  # what examples/auto.yaml names as parentName
TIMEOUT = 120.0

T = TypeVar("T")


@dataclasses.dataclass
class Cluster:
    """The real cluster, driven as an admin with kubectl (asynchronously, beside the running operator)."""

    kubeconfig: pathlib.Path

    async def kubectl(self, *args: str, stdin: str | None = None, check: bool = True) -> str:
        return await kubectl(self.kubeconfig, *args, stdin=stdin, check=check, timeout=TIMEOUT)

    async def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        out = await self.kubectl("get", kind, name, "-n", namespace, "-o", "json", "--ignore-not-found")
        return json.loads(out) if out.strip() else None

    async def apply(self, manifest: dict[str, Any]) -> None:
        await self.kubectl("apply", "-f", "-", stdin=json.dumps(manifest))

    async def token(self, namespace: str, account: str, *, audience: str | None = None) -> str:
        """A token from the TokenRequest API, as the kubelet would project it (default audience: the
        API server's own, i.e. a token to call the API with)."""
        audience_flag = [f"--audience={audience}"] if audience else []
        out = await self.kubectl("create", "token", account, "-n", namespace, "--duration=1h", *audience_flag)
        return out.strip()


async def wait_until(probe: Callable[[], Awaitable[T | None]], *, what: str, timeout: float = TIMEOUT) -> T:
    """Poll ``probe`` until it returns something truthy, or fail naming ``what`` (a real cluster is slow:
    poll every half second)."""
    return await harness.wait_until(probe, what=what, timeout=timeout, interval=0.5)


def operator_kubeconfig(admin: pathlib.Path, token: str, path: pathlib.Path) -> None:
    """A kubeconfig for the same API server that authenticates as the operator's ServiceAccount."""
    view = json.loads(kubectl_sync(admin, "config", "view", "--raw", "--minify", "--flatten", "-o", "json"))
    (cluster,) = view["clusters"]
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "e2e", "cluster": cluster["cluster"]}],
        "users": [{"name": OPERATOR_ACCOUNT, "user": {"token": token}}],
        "contexts": [{"name": "e2e", "context": {"cluster": "e2e", "user": OPERATOR_ACCOUNT}}],
        "current-context": "e2e",
    }
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)


@dataclasses.dataclass
class Operator:
    cluster: Cluster
    chainguard: ChainguardEmulator
    org: str
    identity: str  # the operator's own Chainguard identity
    issuer: str  # the cluster's OIDC issuer, as the operator discovers it
    namespace: str
    settings: Settings

    async def wait_for_condition(self, name: str, condition: str) -> dict[str, Any]:
        """``kubectl wait --for=condition=...`` — the GitOps check an admin would run."""
        await self.cluster.kubectl(
            "wait",
            f"--for=condition={condition}",
            f"chainguardidentity/{name}",
            "-n",
            self.namespace,
            f"--timeout={int(TIMEOUT)}s",
        )
        found = await self.cluster.get("chainguardidentity", self.namespace, name)
        assert found is not None
        return found
