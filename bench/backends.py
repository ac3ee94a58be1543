"""The cluster the bench runs on, and the Chainguard emulator beside it, seeded as an admin would.

``real`` (the default): a real etcd + kube-apiserver + kube-controller-manager
(``cgid_testkit.controlplane.ControlPlane``, started here or handed in, e.g. the test session's), with
deploy/'s CRD and RBAC installed by ``kubectl apply --server-side`` as tests/e2e/conftest.py does. The
operator runs as deploy/'s ServiceAccount (``chainguard-system/chainguard-identity-operator``) with a
kubeconfig holding a TokenRequest token, and its own Chainguard identity is the private-cluster
bootstrap: a static identity made from the cluster's JWKS, bound ``owner`` in the organization. Kubernetes
requests are counted from the API server's own ``apiserver_request_total`` (it counts a status patch
that changes nothing in etcd too); the counters restart with the API server.

``emulator``: the test kit's in-process Kubernetes emulator (``cgid_testkit.harness.world`` without its
operator thread), for a quick look without the control plane's binaries. kmock serves it in the bench's
own process and matches every request against every one it recorded, so its timings at scale measure
kmock; the request counts come from kmock's record.

Either way the Chainguard emulator runs in the bench's event loop on loopback, and every API call is
held ``latency`` seconds before it is served: a ``faults.policy`` answering a slow-but-served
``Fault(status=200, delay=latency)`` (a status below 400 means "serve it normally, only later"; a
``status`` of 0 is refused by ``Fault`` for a fault before the handler). The STS exchange is slowed too,
as the real one is remote as well.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import datetime
import json
import os
import pathlib
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

import httpx
from observe import children, parse_prometheus

from cgid_testkit.chainguard import ChainguardEmulator, Fault
from cgid_testkit.controlplane import ControlPlane, build, find_binaries
from cgid_testkit.tools import install_deploy as install_deploy_manifests

ISSUER = "https://oidc.sandbox-cluster.example"  # public-looking: Auto and ClaimMatch are allowed
ORG_NAME = "my-org.example"
OPERATOR_NAMESPACE = "chainguard-system"
OPERATOR_ACCOUNT = "chainguard-identity-operator"
TOKEN_SECONDS = 24 * 3600  # the bench stops long before

KubeCounts = collections.Counter[tuple[str, str]]  # (verb, resource[/subresource]) -> requests


@dataclasses.dataclass
class Backend:
    name: str
    version: str
    issuer: str
    chainguard: ChainguardEmulator
    org: str
    operator_identity: str
    operator_env: dict[str, str]  # CGID_* the operator needs to reach both
    client: Callable[[], httpx.AsyncClient]  # an admin client of the Kubernetes API
    add_namespace: Callable[[str], Any]  # async
    rotate_signing_key: Callable[[], Any]  # async
    kube_requests: Callable[[], Any]  # async -> KubeCounts, cumulative since the API server started
    cluster_pids: Callable[[], dict[str, int]]
    delete_namespaces: Callable[[Sequence[str]], Any]  # async
    arrivals: Arrivals  # when each Chainguard call arrived (the latency policy notes it)


Arrivals = list[tuple[float, str, str]]  # (monotonic time, method, path) of every call, as it arrived


def slow_policy(latency: float, arrivals: Arrivals) -> Callable[[str, str], Fault | None]:
    """Every call held ``latency`` seconds, then served; and noted with the time it arrived."""
    slow = Fault(status=200, delay=latency) if latency > 0 else None

    def policy(method: str, path: str) -> Fault | None:
        arrivals.append((time.monotonic(), method, path))
        return slow

    return policy


def _bootstrap(chainguard: ChainguardEmulator, issuer: str, jwks: str, subject: str) -> tuple[str, str]:
    """The organization, and the operator's own static identity from the cluster's JWKS (owner)."""
    org = chainguard.add_group(ORG_NAME, verified=True)
    chainguard.add_repo(org, "python")
    identity = chainguard.add_operator_identity(
        org,
        issuer=issuer,
        subject=subject,
        jwks=jwks,
        expires=datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=30),
        description="the operator's own identity (bench bootstrap)",
    )
    return org, identity


# -- the real control plane -----------------------------------------------------------------------------


def install_deploy(plane: ControlPlane) -> None:
    """deploy/'s CRD and RBAC, as an admin applies them (server-side apply: idempotent)."""
    install_deploy_manifests(plane.kubeconfig, field_manager="cgid-bench", established_within=60.0)
    # The garbage collector learns of a CRD installed after it started only at its next resync (~30 s).
    plane.restart_controller_manager()


async def _wait_authorized(client: httpx.AsyncClient, user: str, timeout: float = 60.0) -> None:
    """Until the authorizer lets ``user`` watch the resources and read the JWKS: a binding just made
    reaches its cache a moment later, and so does everything after an API server restart."""
    reviews = [
        {
            "resourceAttributes": {
                "group": "iam.chainguard.dev",
                "resource": "chainguardidentities",
                "verb": "watch",
            }
        },
        {"nonResourceAttributes": {"path": "/openid/v1/jwks", "verb": "get"}},
    ]
    deadline = asyncio.get_running_loop().time() + timeout
    for review in reviews:
        body = {
            "apiVersion": "authorization.k8s.io/v1",
            "kind": "SubjectAccessReview",
            "spec": {"user": user, "groups": ["system:serviceaccounts", "system:authenticated"], **review},
        }
        while True:
            response = await client.post("/apis/authorization.k8s.io/v1/subjectaccessreviews", json=body)
            response.raise_for_status()
            if (response.json().get("status") or {}).get("allowed"):
                break
            if asyncio.get_running_loop().time() > deadline:
                raise RuntimeError(f"RBAC does not let {user} {review} within {timeout}s")
            await asyncio.sleep(0.2)


async def _token(
    client: httpx.AsyncClient, namespace: str, account: str, audiences: Sequence[str], seconds: int
) -> str:
    spec: dict[str, Any] = {"expirationSeconds": seconds}
    if audiences:
        spec["audiences"] = list(audiences)
    response = await client.post(
        f"/api/v1/namespaces/{namespace}/serviceaccounts/{account}/token",
        json={"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec},
    )
    response.raise_for_status()
    token: str = response.json()["status"]["token"]
    return token


async def _real_kube_requests(plane: ControlPlane) -> KubeCounts:
    async with plane.client() as client:
        response = await client.get("/metrics")
    response.raise_for_status()
    found: KubeCounts = collections.Counter()
    for (_, labels), value in parse_prometheus(response.text, ["apiserver_request_total"]).items():
        label = dict(labels)
        resource = label.get("resource", "")
        if label.get("subresource"):
            resource = f"{resource}/{label['subresource']}" if resource else label["subresource"]
        found[(label.get("verb", ""), resource)] += int(value)
    return found


@contextlib.asynccontextmanager
async def real(
    workdir: pathlib.Path, *, latency: float, plane: ControlPlane | None = None
) -> AsyncIterator[Backend]:
    own = plane is None
    if plane is None:
        binaries = find_binaries()
        if binaries is None:
            binaries = await asyncio.to_thread(build)
        plane = ControlPlane(binaries, issuer=ISSUER, workdir=workdir / "controlplane")
        await asyncio.to_thread(plane.start)
    the_plane = plane
    created: list[str] = []
    try:
        await asyncio.to_thread(install_deploy, the_plane)
        subject = f"system:serviceaccount:{OPERATOR_NAMESPACE}:{OPERATOR_ACCOUNT}"
        async with the_plane.client() as admin:
            await _wait_authorized(admin, subject)
            api_token = await _token(admin, OPERATOR_NAMESPACE, OPERATOR_ACCOUNT, [], TOKEN_SECONDS)
            oidc_token = await _token(
                admin, OPERATOR_NAMESPACE, OPERATOR_ACCOUNT, ["issuer.enforce.dev"], TOKEN_SECONDS
            )
            jwks = (await admin.get("/openid/v1/jwks")).text
        kubeconfig = the_plane.write_kubeconfig(
            workdir / "operator.kubeconfig", api_token, user=OPERATOR_ACCOUNT
        )
        token_path = workdir / "operator-oidc-token"
        token_path.write_text(oidc_token)
        async with ChainguardEmulator() as chainguard:
            arrivals: Arrivals = []
            chainguard.faults.policy = slow_policy(latency, arrivals)
            org, identity = _bootstrap(chainguard, the_plane.issuer, jwks, subject)

            async def add_namespace(name: str) -> None:
                async with the_plane.client() as client:
                    response = await client.post("/api/v1/namespaces", json={"metadata": {"name": name}})
                    if response.status_code != 409:
                        response.raise_for_status()
                    created.append(name)
                    # The service-account controller makes "default" a moment later; the resources use it.
                    for _ in range(300):
                        found = await client.get(f"/api/v1/namespaces/{name}/serviceaccounts/default")
                        if found.status_code == 200:
                            return
                        await asyncio.sleep(0.1)
                    raise RuntimeError(f"namespace {name} got no default ServiceAccount")

            async def rotate() -> None:
                await asyncio.to_thread(the_plane.rotate_signing_key)

            async def delete_namespaces(names: Sequence[str]) -> None:
                async with the_plane.client() as client:
                    for name in names:
                        await client.delete(f"/api/v1/namespaces/{name}")

            def cluster_pids() -> dict[str, int]:
                # The plane's processes are the bench's children; a command name is cut at 15 characters.
                return {
                    name: pid
                    for name, pid in children(os.getpid()).items()
                    if name in ("etcd", "kube-apiserver", "kube-controller")
                }

            yield Backend(
                name="real",
                version=f"kube-apiserver {the_plane.version}",
                issuer=the_plane.issuer,
                chainguard=chainguard,
                org=org,
                operator_identity=identity,
                operator_env={
                    "CGID_KUBECONFIG": str(kubeconfig),
                    "CGID_API_URL": chainguard.api_url,
                    "CGID_ISSUER_URL": chainguard.sts_url,
                    "CGID_IDENTITY": identity,
                    "CGID_IDENTITY_TOKEN_PATH": str(token_path),
                    "CGID_SERVICE_ACCOUNT_TOKEN_PATH": str(token_path),
                    "CGID_OPERATOR_NAMESPACE": OPERATOR_NAMESPACE,
                },
                client=lambda: the_plane.client(timeout=60),
                add_namespace=add_namespace,
                rotate_signing_key=rotate,
                kube_requests=lambda: _real_kube_requests(the_plane),
                cluster_pids=cluster_pids,
                delete_namespaces=delete_namespaces,
                arrivals=arrivals,
            )
    finally:
        if own:
            await asyncio.to_thread(the_plane.stop)


# -- the Kubernetes emulator ----------------------------------------------------------------------------


def _classify(method: str, path: str, query: str) -> tuple[str, str]:
    """(verb, resource[/subresource]) of a Kubernetes API request, as apiserver_request_total names them."""
    parts = [part for part in path.split("/") if part]
    if parts[:1] == ["api"]:
        rest = parts[2:]
    elif parts[:1] == ["apis"]:
        rest = parts[3:]
    else:
        return method, path
    if rest[:1] == ["namespaces"] and len(rest) >= 3:
        rest = rest[2:]
    resource = rest[0] if rest else ""
    if len(rest) >= 3:
        resource = f"{resource}/{rest[2]}"
    verb = {"POST": "POST", "PUT": "PUT", "PATCH": "PATCH", "DELETE": "DELETE"}.get(method, method)
    if method == "GET":
        verb = "WATCH" if "watch=" in query else ("GET" if len(rest) >= 2 else "LIST")
    return verb, resource


@contextlib.asynccontextmanager
async def emulated(workdir: pathlib.Path, *, latency: float) -> AsyncIterator[Backend]:
    from cgid_testkit.harness import world

    async with world(start=False, workdir=workdir / "world") as w:
        arrivals: Arrivals = []
        w.chainguard.faults.policy = slow_policy(latency, arrivals)
        kube = w.kube
        settings = w.settings

        async def add_namespace(name: str) -> None:
            kube.add_namespace(name)

        async def rotate() -> None:
            kube.rotate_signing_key()

        async def kube_requests() -> KubeCounts:
            found: KubeCounts = collections.Counter()
            for request in list(kube):  # kmock iterates over the requests it served
                found[_classify(request.method, str(request.url.path), str(request.url.query))] += 1
            return found

        async def delete_namespaces(_names: Sequence[str]) -> None:
            return None  # the emulator goes with the bench

        yield Backend(
            name="emulator",
            version="cgid_testkit KubeEmulator (kmock)",
            issuer=kube.issuer,
            chainguard=w.chainguard,
            org=w.org,
            operator_identity=w.operator_identity,
            operator_env={
                "CGID_KUBECONFIG": str(settings.kubeconfig),
                "CGID_API_URL": settings.api_url,
                "CGID_ISSUER_URL": settings.issuer_url,
                "CGID_IDENTITY": str(settings.identity),
                "CGID_IDENTITY_TOKEN_PATH": str(settings.identity_token_path),
                "CGID_SERVICE_ACCOUNT_TOKEN_PATH": str(settings.service_account_token_path),
                "CGID_OPERATOR_NAMESPACE": settings.operator_namespace,
            },
            client=w.client,
            add_namespace=add_namespace,
            rotate_signing_key=rotate,
            kube_requests=kube_requests,
            cluster_pids=dict,
            delete_namespaces=delete_namespaces,
            arrivals=arrivals,
        )


def describe_counts(found: Mapping[tuple[str, str], int]) -> dict[str, int]:
    return {f"{verb} {resource}": count for (verb, resource), count in sorted(found.items()) if count}


def dump(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True, default=str)
