"""The real-cluster suite: on the run's own control plane (kube-apiserver and etcd started by the tests),
or on any cluster with ``pytest --kubeconfig=PATH -m e2e tests/e2e``.

What runs where:

- **The cluster** (kind, or any test cluster you can throw away): the CRD and the RBAC from ``deploy/``
  are applied with ``kubectl apply``; each test gets its own namespace, deleted afterwards. The CRD and
  the ClusterRole stay installed (deleting a CRD deletes every resource of it in the whole cluster).
- **The operator** runs in this process — kopf plus ``Runtime.from_settings``, configured from ``CGID_*``
  variables exactly as in the pod — but it talks to the API server **as the operator's ServiceAccount**,
  through a kubeconfig holding a token from the TokenRequest API. So the test proves that deploy/'s
  RBAC suffices on a real API server, not just that an admin can do everything.
- **Chainguard** is the emulator, on 127.0.0.1. A real cluster's issuer is usually not reachable from
  the emulator (nor the emulator from the cluster), so identities are Static: the emulator verifies
  presented tokens against the JWKS the operator uploads. The operator's own identity is bootstrapped
  the way docs/ADMIN.md describes for private clusters: a static identity made from the cluster's JWKS.

``kubectl`` must be on PATH. While the operator runs, every kubectl call is awaited as a subprocess so
the event loop the operator shares with the test never blocks.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import pathlib
import secrets
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from e2e_support import (
    OPERATOR_ACCOUNT,
    OPERATOR_NAMESPACE,
    OPERATOR_SUBJECT,
    ORG_NAME,
    TIMEOUT,
    Cluster,
    Operator,
    kubectl_sync,
    operator_kubeconfig,
)

from cgid_testkit.chainguard import ChainguardEmulator
from cgid_testkit.controlplane import ControlPlane
from cgid_testkit.harness import OperatorThread
from cgid_testkit.tools import install_deploy
from chainguard_identity_operator import handlers
from chainguard_identity_operator.config import Settings
from chainguard_identity_operator.runtime import Runtime


@pytest.fixture(scope="session")
def kubeconfig(request: pytest.FixtureRequest) -> pathlib.Path:
    """``--kubeconfig`` when given; otherwise the run's own control plane (tests/conftest.py)."""
    value = request.config.getoption("--kubeconfig")
    if not value:
        plane: ControlPlane = request.getfixturevalue("control_plane")
        return plane.kubeconfig
    path = pathlib.Path(value).expanduser()
    assert path.is_file(), f"--kubeconfig={value}: no such file"
    return path


@pytest.fixture(scope="session")
def installed(request: pytest.FixtureRequest, kubeconfig: pathlib.Path) -> list[dict[str, Any]]:
    """The CRD and RBAC from deploy/, applied to the cluster (server-side apply is idempotent)."""
    rendered = install_deploy(
        kubeconfig, field_manager="cgid-e2e", timeout=TIMEOUT, established_within=TIMEOUT
    )
    if not request.config.getoption("--kubeconfig"):
        # Our own control plane: its garbage collector learns of the new CRD at once, not in 30 s.
        plane: ControlPlane = request.getfixturevalue("control_plane")
        plane.restart_controller_manager()
    return rendered


@pytest.fixture
def namespace(kubeconfig: pathlib.Path, installed: list[dict[str, Any]]) -> Iterator[str]:
    """A fresh namespace per test; deleting it also removes what a failed test left behind."""
    name = f"cgid-e2e-{secrets.token_hex(3)}"
    kubectl_sync(kubeconfig, "create", "namespace", name)
    try:
        yield name
    finally:
        kubectl_sync(kubeconfig, "delete", "namespace", name, "--wait=false", "--ignore-not-found")


@pytest.fixture
async def operator(
    kubeconfig: pathlib.Path, namespace: str, tmp_path: pathlib.Path
) -> AsyncIterator[Operator]:
    """Chainguard emulator + the operator in this process, watching the test's namespace only."""
    cluster = Cluster(kubeconfig)
    discovery = json.loads(await cluster.kubectl("get", "--raw", "/.well-known/openid-configuration"))
    jwks = await cluster.kubectl("get", "--raw", "/openid/v1/jwks")
    api_token = await cluster.token(OPERATOR_NAMESPACE, OPERATOR_ACCOUNT)
    oidc_token = await cluster.token(OPERATOR_NAMESPACE, OPERATOR_ACCOUNT, audience="issuer.enforce.dev")
    token_path = tmp_path / "oidc-token"
    token_path.write_text(oidc_token)
    await asyncio.to_thread(operator_kubeconfig, kubeconfig, api_token, tmp_path / "kubeconfig")

    async with ChainguardEmulator() as chainguard:
        org = chainguard.add_group(ORG_NAME, verified=True)
        chainguard.add_repo(org, "python")
        # The private-cluster bootstrap: the operator's own static identity, from the cluster's JWKS.
        identity = chainguard.add_operator_identity(
            org,
            issuer=discovery["issuer"],
            subject=OPERATOR_SUBJECT,
            jwks=jwks,
            expires=datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=1),
            description="the operator's own identity (e2e bootstrap)",
        )
        # Exactly what the Deployment would set, plus what differs outside a pod.
        settings = Settings.from_env(
            {
                "CGID_CLUSTER_NAME": f"e2e-{secrets.token_hex(3)}",
                "CGID_API_URL": chainguard.api_url,
                "CGID_ISSUER_URL": chainguard.sts_url,
                "CGID_IDENTITY": identity,
                "CGID_IDENTITY_TOKEN_PATH": str(token_path),
                "CGID_KUBECONFIG": str(tmp_path / "kubeconfig"),
                "CGID_SERVICE_ACCOUNT_TOKEN_PATH": str(token_path),
                "CGID_NAMESPACES": namespace,
                "CGID_RESYNC_INTERVAL": "30s",
                "CGID_BASE_BACKOFF": "500ms",
                "CGID_MAX_BACKOFF": "5s",
                "CGID_REPLACEMENT_GRACE": "5s",
                "CGID_METRICS_PORT": "0",
            }
        )
        operator = OperatorThread(
            Runtime.from_settings(settings), clusterwide=False, namespaces=settings.namespaces
        )
        assert handlers.FINALIZER  # importing handlers registered them with kopf
        await operator.up(timeout=60)
        try:
            yield Operator(
                cluster=cluster,
                chainguard=chainguard,
                org=org,
                identity=identity,
                issuer=discovery["issuer"],
                namespace=namespace,
                settings=settings,
            )
        finally:
            # Let the finalizers run while the operator still can: a resource left with its finalizer
            # would keep the test namespace terminating forever.
            await cluster.kubectl(
                "delete",
                "chainguardidentities",
                "--all",
                "-n",
                namespace,
                f"--timeout={int(TIMEOUT)}s",
                check=False,
            )
            await operator.down(timeout=60)
