"""A whole world in one process: a Kubernetes API, the Chainguard emulator and the real operator.

``World`` is what the integration tests and the sandbox run. It seeds Chainguard the way an admin would
before installing the operator: an organization with a registry, and the operator's own *static*
identity made from the cluster's JWKS (the private-cluster bootstrap), bound as ``owner``. The operator
then runs exactly as in a pod: it reads a projected service-account token (minted by the cluster with
audience ``issuer.enforce.dev``) and exchanges it at the emulated STS for its API token.

The cluster is one of two backends behind one small interface, ``KubeBackend``:

- ``EmulatedKube`` (the default): the Kubernetes emulator (``kube.KubeEmulator``) served by kmock on
  loopback. Fast, and ``w.kube`` gives tests its inside: faults, recorded requests, synchronous helpers.
- ``RealKube`` (``world(control_plane=plane)``): a real etcd + kube-apiserver + kube-controller-manager
  (``controlplane.ControlPlane``), shared by the whole test session. Each World gets its own fresh
  namespaces (``w.ns("shop")`` is the name on this backend), its own operator ServiceAccount bound by a
  copy of deploy/'s ClusterRoleBinding, and an operator that watches only those namespaces and talks to
  the API server *as that ServiceAccount*; at the end the World deletes its resources while the
  operator still runs (so finalizers complete), then its namespaces. deploy/'s CRD and ClusterRole must
  be installed first (tests/integration/conftest.py does it once per session). The real server dates its
  tokens by the wall clock while the tests fast-forward the shared ``Clock`` (which only the operator and
  the Chainguard emulator read), so ``RealKube.mint_token`` adds the clock's lead to every lifetime.

The cluster's issuer defaults to a public-looking URL that the Chainguard emulator can reach through
its ``issuer_routes`` (test DNS), so both ClaimMatch and Static identities work; tests that need a
cluster-local issuer pass ``issuer=`` (emulator only: a real server's issuer is fixed when it starts).

Several clusters can share one Chainguard organization: ``world(shared=first)`` starts a second cluster
(its own Kubernetes emulator, hence its own ``kube-system`` UID and cluster ID, its own signing keys and
its own operator) against ``first``'s running Chainguard emulator, organization and clock. Its admin
bootstraps its own operator identity from its own JWKS, as a second cluster's admin would. The clock is
one for all, so ``advance`` on either World moves time for both (but wakes only its own operator).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import pathlib
import secrets
import ssl
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol, TypeVar

import httpx
import kmock
import kopf

from cgid_testkit.chainguard import ChainguardEmulator
from cgid_testkit.controlplane import ControlPlane
from cgid_testkit.kube import KubeEmulator, write_kubeconfig
from cgid_testkit.registry import RegistryEmulator
from chainguard_identity_operator import handlers, naming
from chainguard_identity_operator.chainguard.types import format_time, parse_time
from chainguard_identity_operator.config import Settings
from chainguard_identity_operator.crd import GROUP, PLURAL, VERSION, build_crd
from chainguard_identity_operator.naming import Owner
from chainguard_identity_operator.runtime import Runtime

PUBLIC_ISSUER = "https://oidc.sandbox-cluster.example"
ORG_NAME = "my-org.example"
OPERATOR_NAMESPACE = "chainguard-system"
OPERATOR_SERVICE_ACCOUNT = "chainguard-identity-operator"
# deploy/'s ClusterRoleBinding (deploy/base/rbac.yaml): a real-backend World binds its own operator
# ServiceAccount with a copy of it, as kustomize's ``namespace:`` would rewrite its subject.
OPERATOR_BINDING = "chainguard-identity-operator"
CR_PATH = f"/apis/{GROUP}/{VERSION}/namespaces/{{namespace}}/{PLURAL}"
# The namespaces the scenarios use; on the real backend each World gets fresh ones in their place.
SCENARIO_NAMESPACES = ("default", "shop", OPERATOR_NAMESPACE)
# The operator's projected token: refreshed at every ``advance`` on the emulator. The real server's
# TokenRequest is a network call that ``advance`` (synchronous) cannot make, so there the token is made
# once, for two years of wall-clock time (the API server accepts it), and ``advance`` checks it is enough.
OPERATOR_TOKEN_SECONDS = 48 * 3600
REAL_OPERATOR_TOKEN_SECONDS = 2 * 365 * 24 * 3600

T = TypeVar("T")


class Clock:
    """A controllable clock shared by both emulators and the operator (for fast-forwarded rotation)."""

    def __init__(self) -> None:
        self.offset = datetime.timedelta(0)

    def __call__(self) -> datetime.datetime:
        return datetime.datetime.now(datetime.UTC) + self.offset

    def advance(self, delta: datetime.timedelta) -> None:
        self.offset += delta


class KubeBackend(Protocol):
    """The Kubernetes API a World runs on, as the test's own code reaches it (the operator reaches it
    only through the kubeconfig ``write_operator_kubeconfig`` makes, as in a pod)."""

    @property
    def name(self) -> str:
        """``"emulator"`` or ``"real"``: for messages and test ids."""

    @property
    def url(self) -> str: ...

    @property
    def issuer(self) -> str:
        """The service-account issuer: the ``iss`` of every token and the discovery document's."""

    @property
    def kubeconfig(self) -> pathlib.Path:
        """An admin's kubeconfig (for kubectl)."""

    @property
    def issuer_ssl(self) -> ssl.SSLContext | None:
        """What a client of the issuer's discovery document and JWKS must trust (None: plain http)."""

    def client(self) -> httpx.AsyncClient:
        """An authenticated admin client for the test's own requests (``base_url`` is the API server)."""

    async def add_namespace(self, name: str) -> None:
        """Create a namespace (if absent); return once its ``default`` ServiceAccount exists."""

    async def add_service_account(self, namespace: str, name: str) -> None:
        """Create a ServiceAccount (if absent)."""

    async def mint_token(
        self, namespace: str, service_account: str, *, audiences: Sequence[str], expiration_seconds: int
    ) -> str:
        """A token from the TokenRequest API, valid for ``expiration_seconds`` from the shared clock's now."""

    async def jwks(self) -> dict[str, Any]:
        """The public keys ``/openid/v1/jwks`` serves."""

    async def rotate_signing_key(self) -> None:
        """A new signing key for new tokens; the old public key stays published (the overlap)."""

    async def kube_system_uid(self) -> str:
        """The cluster ID the operator reads: the UID of the kube-system namespace."""

    async def write_operator_kubeconfig(
        self, path: pathlib.Path, namespace: str, service_account: str
    ) -> None:
        """A kubeconfig for the operator that authenticates as ``namespace/service_account``."""


@dataclasses.dataclass
class EmulatedKube:
    """The Kubernetes emulator on a kmock server: ``emulator`` is its inside (``World.kube``)."""

    emulator: KubeEmulator
    url: str
    kubeconfig: pathlib.Path
    name: str = "emulator"
    issuer_ssl: ssl.SSLContext | None = None

    @property
    def issuer(self) -> str:
        return self.emulator.issuer

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, timeout=10)

    async def add_namespace(self, name: str) -> None:
        self.emulator.add_namespace(name)

    async def add_service_account(self, namespace: str, name: str) -> None:
        self.emulator.add_service_account(namespace, name)

    async def mint_token(
        self, namespace: str, service_account: str, *, audiences: Sequence[str], expiration_seconds: int
    ) -> str:
        # The emulator dates its tokens by the shared clock already.
        return self.emulator.mint_token(
            namespace, service_account, audiences=audiences, expiration_seconds=expiration_seconds
        )

    async def jwks(self) -> dict[str, Any]:
        return self.emulator.jwks()

    async def rotate_signing_key(self) -> None:
        self.emulator.rotate_signing_key()

    async def kube_system_uid(self) -> str:
        kube_system = self.emulator.current("v1/namespaces", None, "kube-system")
        assert kube_system is not None
        uid: str = kube_system["metadata"]["uid"]
        return uid

    async def write_operator_kubeconfig(
        self, path: pathlib.Path, namespace: str, service_account: str
    ) -> None:
        write_kubeconfig(path, self.url)  # the emulator authenticates nobody


class RealKube:
    """A real API server (``ControlPlane``), shared with other Worlds: see the module docstring."""

    name = "real"

    def __init__(self, plane: ControlPlane, clock: Clock) -> None:
        self.plane = plane
        self._clock = clock
        self.issuer_ssl: ssl.SSLContext | None = plane.ssl_context()

    @property
    def url(self) -> str:
        return self.plane.url

    @property
    def issuer(self) -> str:
        return self.plane.issuer

    @property
    def kubeconfig(self) -> pathlib.Path:
        return self.plane.kubeconfig

    def client(self) -> httpx.AsyncClient:
        return self.plane.client(timeout=10)

    async def add_namespace(self, name: str) -> None:
        async with self.client() as client:
            await _create(client, "/api/v1/namespaces", {"metadata": {"name": name}})
            if not self.plane.has_controller_manager:
                # setup-envtest's binaries: no service-account controller, so do what it would.
                await self.add_service_account(name, "default")
                return

            # The service-account controller makes "default" a moment later; the emulator at once.
            async def has_default() -> bool:
                response = await client.get(f"/api/v1/namespaces/{name}/serviceaccounts/default")
                return response.status_code == 200

            await wait_until(has_default, what=f"the default ServiceAccount of namespace {name}")

    async def add_service_account(self, namespace: str, name: str) -> None:
        async with self.client() as client:
            await _create(
                client,
                f"/api/v1/namespaces/{namespace}/serviceaccounts",
                {"metadata": {"name": name, "namespace": namespace}},
            )

    async def mint_token(
        self, namespace: str, service_account: str, *, audiences: Sequence[str], expiration_seconds: int
    ) -> str:
        # The server counts a lifetime from the wall clock; the STS checks it against the shared clock,
        # which the tests may have moved on. Add that lead, so the token lives as long as asked, by the
        # clock everyone else reads.
        lead = max(0, int((self._clock() - datetime.datetime.now(datetime.UTC)).total_seconds()))
        return await self._token_request(
            namespace, service_account, list(audiences), expiration_seconds + lead
        )

    async def _token_request(
        self, namespace: str, service_account: str, audiences: list[str], expiration_seconds: int
    ) -> str:
        spec: dict[str, Any] = {"expirationSeconds": expiration_seconds}
        if audiences:
            spec["audiences"] = audiences  # none: the API server's own audience (a token to call it with)
        async with self.client() as client:
            response = await client.post(
                f"/api/v1/namespaces/{namespace}/serviceaccounts/{service_account}/token",
                json={"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec},
            )
            _raise_for_status(response)
            token: str = response.json()["status"]["token"]
            return token

    async def jwks(self) -> dict[str, Any]:
        async with self.client() as client:
            response = await client.get("/openid/v1/jwks")
            _raise_for_status(response)
            keys: dict[str, Any] = response.json()
            return keys

    async def rotate_signing_key(self) -> None:
        # Restarts the API server and blocks until it is ready: off the loop, where the Chainguard
        # emulator keeps serving.
        await asyncio.to_thread(self.plane.rotate_signing_key)

    async def kube_system_uid(self) -> str:
        async with self.client() as client:
            response = await client.get("/api/v1/namespaces/kube-system")
            _raise_for_status(response)
            uid: str = response.json()["metadata"]["uid"]
            return uid

    async def write_operator_kubeconfig(
        self, path: pathlib.Path, namespace: str, service_account: str
    ) -> None:
        # The API server checks this token by the wall clock: an hour outlives any test.
        token = await self._token_request(namespace, service_account, [], 3600)
        await asyncio.to_thread(self.plane.write_kubeconfig, path, token, user=service_account)

    # -- a World's own corner of the shared server ----------------------------------------------------

    async def bind_operator(self, namespace: str, service_account: str) -> str:
        """deploy/'s ClusterRoleBinding, copied for ``namespace``'s operator ServiceAccount (what
        kustomize's ``namespace:`` makes of it); returns the copy's name."""
        async with self.client() as client:
            response = await client.get(
                f"/apis/rbac.authorization.k8s.io/v1/clusterrolebindings/{OPERATOR_BINDING}"
            )
            if response.status_code == 404:
                raise RuntimeError(
                    f"ClusterRoleBinding {OPERATOR_BINDING} is not installed: apply deploy/'s RBAC and CRD "
                    "first (tests/integration/conftest.py's real_cluster fixture does)"
                )
            _raise_for_status(response)
            installed = response.json()
            name = f"{OPERATOR_BINDING}-{namespace}"
            binding = {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "ClusterRoleBinding",
                "metadata": {"name": name, "labels": installed["metadata"].get("labels") or {}},
                "roleRef": installed["roleRef"],
                "subjects": [{"kind": "ServiceAccount", "name": service_account, "namespace": namespace}],
            }
            await _create(client, "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings", binding)

            # A new binding reaches the authorizer's cache a moment later: wait until it says yes, so that
            # the operator's first calls are not refused.
            review = {
                "apiVersion": "authorization.k8s.io/v1",
                "kind": "SubjectAccessReview",
                "spec": {
                    "user": f"system:serviceaccount:{namespace}:{service_account}",
                    "groups": ["system:serviceaccounts", f"system:serviceaccounts:{namespace}"],
                    "resourceAttributes": {
                        "group": GROUP,
                        "resource": PLURAL,
                        "verb": "watch",
                        "namespace": namespace,
                    },
                },
            }

            async def allowed() -> bool:
                answer = await client.post("/apis/authorization.k8s.io/v1/subjectaccessreviews", json=review)
                _raise_for_status(answer)
                return bool((answer.json().get("status") or {}).get("allowed"))

            await wait_until(
                allowed, what=f"RBAC to grant {namespace}/{service_account} deploy/'s ClusterRole"
            )
            return name

    async def delete_resources(self, namespaces: Sequence[str], *, timeout: float) -> list[str]:
        """Delete every ChainguardIdentity in ``namespaces`` and wait for them to go (their finalizers need
        the operator running). Returns the ones still there after ``timeout``, after stripping their
        finalizers so that their namespaces can be deleted."""
        async with self.client() as client:
            for namespace in namespaces:
                response = await client.delete(CR_PATH.format(namespace=namespace))
                if response.status_code != 404:
                    _raise_for_status(response)

            async def remaining() -> list[tuple[str, str]]:
                left: list[tuple[str, str]] = []
                for namespace in namespaces:
                    response = await client.get(CR_PATH.format(namespace=namespace))
                    _raise_for_status(response)
                    left += [(namespace, item["metadata"]["name"]) for item in response.json()["items"]]
                return left

            async def all_gone() -> bool:
                return not await remaining()

            with contextlib.suppress(AssertionError):
                await wait_until(
                    all_gone, what="the test's ChainguardIdentities to be finalized", timeout=timeout
                )
            stuck = await remaining()
            for namespace, name in stuck:
                response = await client.patch(
                    f"{CR_PATH.format(namespace=namespace)}/{name}",
                    json={"metadata": {"finalizers": None}},
                    headers={"Content-Type": "application/merge-patch+json"},
                )
                if response.status_code != 404:
                    _raise_for_status(response)
            return [f"{namespace}/{name}" for namespace, name in stuck]

    async def delete_cluster_objects(self, namespaces: Sequence[str], binding: str | None) -> None:
        """Delete the namespaces (the namespace controller empties them, asynchronously) and the binding."""
        async with self.client() as client:
            paths = [f"/api/v1/namespaces/{namespace}" for namespace in namespaces]
            if binding is not None:
                paths.append(f"/apis/rbac.authorization.k8s.io/v1/clusterrolebindings/{binding}")
            for path in paths:
                response = await client.delete(path)
                if response.status_code != 404:
                    _raise_for_status(response)


async def _create(client: httpx.AsyncClient, path: str, body: Mapping[str, Any]) -> None:
    """POST, where "already exists" is fine."""
    response = await client.post(path, json=dict(body))
    if response.status_code != 409:
        _raise_for_status(response)


def _raise_for_status(response: httpx.Response) -> None:
    """``raise_for_status`` with the API server's message in the error (a Status names the problem)."""
    if response.is_error:
        raise AssertionError(
            f"{response.request.method} {response.request.url.path}: {response.status_code} {response.text[:500]}"
        )


@dataclasses.dataclass
class World:
    backend: KubeBackend
    chainguard: ChainguardEmulator
    org: str
    operator_identity: str
    settings: Settings
    kubeconfig: pathlib.Path  # the operator's
    workdir: pathlib.Path
    clock: Clock
    cluster_id: str  # the kube-system namespace's UID, which ownership markers carry
    namespaces: Mapping[str, str]  # a scenario's namespace name -> the namespace on this backend
    registry: RegistryEmulator  # cgr.dev's pull path, for pull secrets (its host is Settings.registry)
    runtime: Runtime | None = None
    _operator: OperatorThread | None = None
    _operator_token_expires: datetime.datetime | None = None  # on the real server: made once

    # -- the backend --------------------------------------------------------------------------------

    @property
    def kube(self) -> KubeEmulator:
        """The Kubernetes emulator's inside (emulator-backed Worlds only)."""
        if isinstance(self.backend, EmulatedKube):
            return self.backend.emulator
        raise TypeError(
            f"w.kube is the Kubernetes emulator; this World runs on the {self.backend.name} server"
        )

    @property
    def kube_url(self) -> str:
        return self.backend.url

    @property
    def issuer(self) -> str:
        return self.backend.issuer

    @property
    def operator_namespace(self) -> str:
        return self.settings.operator_namespace

    def ns(self, name: str) -> str:
        """The namespace that stands for the scenario's ``name`` here: the same on the emulator, a fresh
        one of this World's on the real server."""
        if name in self.namespaces:
            return self.namespaces[name]
        if isinstance(self.backend, EmulatedKube):
            return name
        raise KeyError(f"{name}: this World's namespaces are {sorted(self.namespaces)}")

    async def add_service_account(self, namespace: str, name: str) -> None:
        await self.backend.add_service_account(namespace, name)

    async def jwks(self) -> dict[str, Any]:
        return await self.backend.jwks()

    async def rotate_cluster_keys(self) -> None:
        """The cluster's signing key rotation: new tokens are signed with a key Chainguard does not know."""
        await self.backend.rotate_signing_key()

    # -- the operator -------------------------------------------------------------------------------

    async def start_operator(self) -> None:
        """Run the operator as in a pod, in its own thread (see ``OperatorThread``); like the command line,
        it watches the whole cluster unless ``settings.namespaces`` names namespaces."""
        if self._operator is not None:
            raise RuntimeError("the operator is already running")
        self.runtime = Runtime.from_settings(self.settings, clock=self.clock)
        options: dict[str, Any] = {}
        if self.settings.namespaces:
            options = {"clusterwide": False, "namespaces": list(self.settings.namespaces)}
        self._operator = OperatorThread(self.runtime, **options)
        await self._operator.up()
        assert handlers.FINALIZER  # the handlers are registered by importing the module

    async def stop_operator(self) -> None:
        if self._operator is None:
            return
        operator, self._operator = self._operator, None
        self.runtime = None
        await operator.down()

    @property
    def operator_running(self) -> bool:
        return self._operator is not None

    def refresh_operator_token(self) -> None:
        """What the kubelet does for a projected token: replace it before it expires."""
        if isinstance(self.backend, EmulatedKube):
            self.settings.identity_token_path.write_text(
                self.kube.mint_token(
                    self.ns(OPERATOR_NAMESPACE),
                    OPERATOR_SERVICE_ACCOUNT,
                    audiences=["issuer.enforce.dev"],
                    expiration_seconds=OPERATOR_TOKEN_SECONDS,
                )
            )
            return
        # The real server's token was made for years at the start (see REAL_OPERATOR_TOKEN_SECONDS).
        expires = self._operator_token_expires
        if expires is not None and self.clock() > expires - datetime.timedelta(hours=1):
            raise RuntimeError(
                f"the clock ({self.clock():%Y-%m-%d}) passed the operator's token on the real server "
                f"(expires {expires:%Y-%m-%d}): fast-forward less on this backend"
            )

    async def _write_operator_token(self) -> None:
        seconds = (
            OPERATOR_TOKEN_SECONDS if isinstance(self.backend, EmulatedKube) else REAL_OPERATOR_TOKEN_SECONDS
        )
        self._operator_token_expires = self.clock() + datetime.timedelta(seconds=seconds)
        token = await self.backend.mint_token(
            self.ns(OPERATOR_NAMESPACE),
            OPERATOR_SERVICE_ACCOUNT,
            audiences=["issuer.enforce.dev"],
            expiration_seconds=seconds,
        )
        self.settings.identity_token_path.write_text(token)

    async def poll_cluster(self) -> None:
        """What the operator's poller does every CGID_JWKS_POLL_INTERVAL, now."""
        if self.runtime is not None:
            await self.runtime.in_operator_loop(self.runtime.facts.refresh)

    def advance(self, delta: datetime.timedelta) -> None:
        """Fast-forward time for everyone, keep the operator's projected token fresh, wake every worker."""
        self.clock.advance(delta)
        self.refresh_operator_token()
        if self.runtime is not None:
            self.runtime.wake_all()

    async def restart_operator(self) -> None:
        await self.stop_operator()
        await self.start_operator()

    def owner(self, namespace: str, name: str) -> Owner:
        """The owner an identity's marker names when this cluster's resource ``namespace/name`` made it."""
        return Owner(self.settings.cluster_name, self.cluster_id, namespace, name)

    def owns(self, description: str, namespace: str, name: str) -> bool:
        """Whether an identity with ``description`` belongs to the resource ``namespace/name`` here."""
        return naming.parse_marker(description) == self.owner(namespace, name)

    # -- the cluster, as a client sees it ---------------------------------------------------------

    def client(self) -> httpx.AsyncClient:
        return self.backend.client()

    async def apply(self, manifest: Mapping[str, Any]) -> dict[str, Any]:
        """Create the object, or merge-patch its spec when it exists (like ``kubectl apply`` for our CRs)."""
        namespace = manifest["metadata"].get("namespace", "default")
        name = manifest["metadata"]["name"]
        base = CR_PATH.format(namespace=namespace)
        async with self.client() as client:
            existing = await client.get(f"{base}/{name}")
            if existing.status_code == 404:
                body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "ChainguardIdentity", **manifest}
                response = await client.post(base, json=body)
            else:
                response = await client.patch(
                    f"{base}/{name}",
                    json=_apply_patch(existing.json(), manifest),
                    headers={"Content-Type": "application/merge-patch+json"},
                )
            response.raise_for_status()
            result: dict[str, Any] = response.json()
            return result

    async def get(self, namespace: str, name: str) -> dict[str, Any] | None:
        async with self.client() as client:
            response = await client.get(f"{CR_PATH.format(namespace=namespace)}/{name}")
            if response.status_code == 404:
                return None
            response.raise_for_status()
            result: dict[str, Any] = response.json()
            return result

    async def delete(self, namespace: str, name: str) -> None:
        async with self.client() as client:
            response = await client.delete(f"{CR_PATH.format(namespace=namespace)}/{name}")
            response.raise_for_status()

    async def config_map(self, namespace: str, name: str) -> dict[str, str] | None:
        async with self.client() as client:
            response = await client.get(f"/api/v1/namespaces/{namespace}/configmaps/{name}")
            if response.status_code == 404:
                return None
            response.raise_for_status()
            data: dict[str, str] = response.json().get("data") or {}
            return data

    async def events(self, namespace: str) -> list[dict[str, Any]]:
        async with self.client() as client:
            response = await client.get(f"/api/v1/namespaces/{namespace}/events")
            response.raise_for_status()
            items: list[dict[str, Any]] = response.json().get("items") or []
            return items

    async def wait_for(
        self,
        probe: Callable[[], Awaitable[T | None]],
        *,
        timeout: float = 30.0,
        what: str = "condition",
    ) -> T:
        """Poll ``probe`` until it returns something truthy; fail with ``what`` after ``timeout``."""
        return await wait_until(probe, what=what, timeout=timeout)

    def status_patches(self) -> int:
        """How many status patches the cluster has served: one per finished reconcile pass (emulator only)."""
        # A kmock handler iterates over the requests it has served.
        return sum(1 for r in list(self.kube) if r.method == "PATCH" and str(r.url.path).endswith("/status"))

    async def wait_ready(self, namespace: str, name: str, *, timeout: float = 30.0) -> dict[str, Any]:
        async def probe() -> dict[str, Any] | None:
            obj = await self.get(namespace, name)
            if obj is None:
                return None
            status = obj.get("status") or {}
            generation = obj["metadata"].get("generation")
            ready = next((c for c in status.get("conditions", []) if c.get("type") == "Ready"), None)
            if ready and ready.get("status") == "True" and status.get("observedGeneration") == generation:
                return obj
            return None

        return await self.wait_for(probe, timeout=timeout, what=f"{namespace}/{name} to be Ready")

    async def wait_condition(
        self,
        namespace: str,
        name: str,
        kind: str,
        status: str,
        *,
        reason: str | None = None,
        timeout: float = 30.0,
    ) -> dict[str, Any]:
        async def probe() -> dict[str, Any] | None:
            obj = await self.get(namespace, name)
            conditions = ((obj or {}).get("status") or {}).get("conditions", [])
            found = next((c for c in conditions if c.get("type") == kind), None)
            if found and found.get("status") == status and (reason is None or found.get("reason") == reason):
                assert obj is not None
                return obj
            return None

        return await self.wait_for(
            probe, timeout=timeout, what=f"{namespace}/{name} {kind}={status} {reason or ''}"
        )

    # -- the seeds' pod flow ----------------------------------------------------------------------

    async def pod_exchange(
        self,
        namespace: str,
        service_account: str,
        identity: str,
        *,
        audience: str = "https://console-api.enforce.dev",
    ) -> httpx.Response:
        """What the seeds' pod does: present its projected token at the STS for the ConfigMap's identity."""
        token = await self.backend.mint_token(
            namespace, service_account, audiences=["issuer.enforce.dev"], expiration_seconds=600
        )
        async with httpx.AsyncClient(timeout=10) as client:
            return await client.post(
                f"{self.chainguard.sts_url}/sts/exchange",
                data={"aud": audience, "identity": identity},
                headers={"Authorization": f"Bearer {token}"},
            )

    async def list_repos(self, api_token: str) -> list[str]:
        async with httpx.AsyncClient(timeout=10) as client:
            response = await client.get(
                f"{self.chainguard.api_url}/registry/v1/repos",
                headers={"Authorization": f"Bearer {api_token}"},
            )
            response.raise_for_status()
            return [item["name"] for item in response.json().get("items", [])]


def _apply_patch(existing: Mapping[str, Any], manifest: Mapping[str, Any]) -> dict[str, Any]:
    """A merge patch that makes the spec equal to the manifest's (like ``kubectl apply``: fields left
    out are removed) and adds the manifest's annotations without touching anyone else's."""
    spec = dict(manifest.get("spec") or {})
    removed = {key: None for key in existing.get("spec") or {} if key not in spec}
    patch: dict[str, Any] = {"spec": {**removed, **spec}}
    annotations = manifest.get("metadata", {}).get("annotations")
    if annotations:
        patch["metadata"] = {"annotations": dict(annotations)}
    return patch


class OperatorThread(threading.Thread):
    """The real operator in its own thread and event loop, as in a pod. kopf owns every task of the loop
    it runs in (on exit it cancels tasks it did not start, a test's included), so it never shares the
    test's loop; it reaches the emulators over HTTP. ``options`` go to ``kopf.operator`` (peering, etc.)."""

    def __init__(self, runtime: Runtime, **options: Any) -> None:
        super().__init__(name="operator", daemon=True)
        self._runtime = runtime
        self._options: dict[str, Any] = {"standalone": True, "clusterwide": True, **options}
        self._stop_flag = threading.Event()
        self._ready_flag = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            asyncio.run(
                kopf.operator(
                    registry=kopf.get_default_registry(),
                    settings=kopf.OperatorSettings(),
                    stop_flag=self._stop_flag,
                    ready_flag=self._ready_flag,
                    memo=kopf.Memo(runtime=self._runtime),
                    **self._options,
                )
            )
        except BaseException as exc:  # reported to the test by wait_ready/stop
            self.error = exc

    async def up(self, timeout: float = 30.0) -> None:
        """Start, and return once kopf is ready (fail if it dies first)."""
        self.start()
        await asyncio.to_thread(self.wait_ready, timeout)

    async def down(self, timeout: float = 30.0) -> None:
        await asyncio.to_thread(self.stop, timeout)

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self._ready_flag.wait(0.05):
            if not self.is_alive():
                raise RuntimeError(f"the operator exited during start-up: {self.error!r}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the operator was not ready within {timeout}s")

    def stop(self, timeout: float) -> None:
        self._stop_flag.set()
        self.join(timeout)
        if self.is_alive():
            raise TimeoutError(f"the operator did not stop within {timeout}s")
        if self.error is not None:
            raise RuntimeError("the operator failed") from self.error


async def wait_until(
    probe: Callable[[], Awaitable[T | None]],
    *,
    what: str,
    timeout: float = 30.0,
    interval: float = 0.05,
) -> T:
    """Poll ``probe`` until it returns something truthy; fail naming ``what`` after ``timeout``."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = await probe()
        if result:
            return result
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)  # the polling interval, not synchronisation: the probe decides


@contextlib.asynccontextmanager
async def world(
    *,
    issuer: str = PUBLIC_ISSUER,
    routable: bool = True,
    workdir: pathlib.Path | None = None,
    start: bool = True,
    settings_overrides: Mapping[str, Any] | None = None,
    chainguard_options: Mapping[str, Any] | None = None,
    shared: World | None = None,
    control_plane: ControlPlane | None = None,
) -> AsyncIterator[World]:
    """Start the cluster and the Chainguard emulator, seed them as an admin would, and (by default)
    start the operator.

    With ``control_plane``, the cluster is that real API server (``RealKube``; see the module docstring)
    instead of a new emulator; its issuer is the one it was started with, and it cannot be ``shared``.

    With ``shared``, start only a new cluster and its operator, against ``shared``'s Chainguard emulator,
    organization and clock (which stay ``shared``'s: they are not stopped here, so nest this world inside
    ``shared``'s, as ``async with world() as a, world(shared=a) as b``). Each cluster needs its
    own issuer route, so two routable clusters need two issuers; two clusters on the same cluster-local
    issuer (``routable=False``, the kubeadm default) are the realistic case.
    """
    if shared is not None and chainguard_options:
        raise ValueError("chainguard_options configure a new Chainguard emulator; a shared one is running")
    if control_plane is not None:
        if shared is not None:
            raise ValueError(
                "a World on the real server brings its own Chainguard emulator; shared= is emulator-only"
            )
        if issuer != control_plane.issuer:
            raise ValueError(f"the real server's issuer is {control_plane.issuer}, fixed when it started")
    clock = shared.clock if shared is not None else Clock()
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = pathlib.Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="cgid-")))
        workdir.mkdir(parents=True, exist_ok=True)
        async with (
            _cluster(control_plane, issuer, clock, workdir) as (backend, namespaces),
            _chainguard(shared, clock, chainguard_options, backend.issuer_ssl) as chainguard,
            RegistryEmulator(chainguard) as registry,
        ):
            if routable:
                routed = chainguard.issuer_routes.get(issuer)
                if routed is not None:
                    raise ValueError(
                        f"the Chainguard emulator already routes {issuer} to another cluster ({routed}); "
                        "give this cluster its own issuer, or routable=False"
                    )
                chainguard.issuer_routes[issuer] = backend.url
                stack.callback(chainguard.issuer_routes.pop, issuer, None)

            if shared is not None:
                org = shared.org
            else:
                org = chainguard.add_group(ORG_NAME, verified=True)
                for repo in ("python", "nginx", "curl"):
                    chainguard.add_repo(org, repo)

            # The private-cluster bootstrap from the README: the operator's own static identity, made
            # once from the cluster's JWKS, bound as owner in the organization.
            operator_namespace = namespaces[OPERATOR_NAMESPACE]
            operator_identity = chainguard.add_operator_identity(
                org,
                issuer=issuer,
                subject=f"system:serviceaccount:{operator_namespace}:{OPERATOR_SERVICE_ACCOUNT}",
                jwks=await backend.jwks(),
                expires=clock() + datetime.timedelta(days=30),
            )
            token_path = workdir / "operator-oidc-token"
            kubeconfig = workdir / "kubeconfig"
            await backend.write_operator_kubeconfig(kubeconfig, operator_namespace, OPERATOR_SERVICE_ACCOUNT)

            values: dict[str, Any] = {
                "cluster_name": "sandbox",
                "api_url": chainguard.api_url,
                "issuer_url": chainguard.sts_url,
                "identity": operator_identity,
                "identity_token_path": token_path,
                "kubeconfig": kubeconfig,
                "service_account_token_path": token_path,
                "public_issuer_hosts": ("sandbox-cluster.example",),
                "resync_interval": datetime.timedelta(seconds=30),
                "jwks_poll_interval": datetime.timedelta(seconds=30),
                "base_backoff": datetime.timedelta(milliseconds=200),
                "max_backoff": datetime.timedelta(seconds=2),
                "request_timeout": datetime.timedelta(seconds=5),
                "replacement_grace": datetime.timedelta(seconds=5),
                "operator_namespace": operator_namespace,
                "identity_config_map": "operator-chainguard-identity",
                "registry": registry.host,  # what ConfigMaps name and pull secrets hold credentials for
                "metrics_port": 0,
            }
            if isinstance(backend, RealKube):
                values["namespaces"] = tuple(namespaces.values())  # a shared server: only this World's
            values.update(settings_overrides or {})
            the_world = World(
                backend=backend,
                chainguard=chainguard,
                org=org,
                operator_identity=operator_identity,
                settings=Settings(**values),
                kubeconfig=kubeconfig,
                workdir=workdir,
                clock=clock,
                cluster_id=await backend.kube_system_uid(),
                namespaces=namespaces,
                registry=registry,
            )
            await the_world._write_operator_token()
            failed = False
            try:
                if start:
                    await the_world.start_operator()
                yield the_world
            except BaseException:
                failed = True
                raise
            finally:
                try:
                    if isinstance(backend, RealKube):
                        await _release(the_world, backend, report=not failed)
                finally:
                    await the_world.stop_operator()


async def _release(w: World, backend: RealKube, *, report: bool) -> None:
    """Delete the World's resources on the shared server while its operator runs, so that their
    finalizers complete; what stays (the operator is down, or failed to finalize) is released by hand,
    and reported as a failure when the operator was running and the test had passed."""
    running = w.operator_running
    # A test that fast-forwarded past the bootstrap identity's 30 days (without the operator's own
    # ChainguardIdentity to renew it) left the operator locked out of Chainguard; the emulator's teardown
    # never needs it, this one does. Renew it as its admin would, so that the finalizers can run.
    own = w.chainguard.identities.get(w.operator_identity)
    static = (own or {}).get("staticKeys") or {}
    expires = parse_time(static.get("expirationTime"))
    if expires is not None and expires < w.clock() + datetime.timedelta(days=1):
        static["expirationTime"] = format_time(w.clock() + datetime.timedelta(days=30))
    stuck = await backend.delete_resources(list(w.namespaces.values()), timeout=30.0 if running else 0.0)
    if stuck and running and report:
        raise AssertionError(
            f"the operator did not finalize {', '.join(stuck)} within 30 s of their deletion"
        )


@contextlib.asynccontextmanager
async def _cluster(
    plane: ControlPlane | None, issuer: str, clock: Clock, workdir: pathlib.Path
) -> AsyncIterator[tuple[KubeBackend, dict[str, str]]]:
    """The cluster a World runs on, with the CRD, the scenarios' namespaces and the operator's
    ServiceAccount; and the names those namespaces have there."""
    if plane is None:
        async with KubeEmulator(issuer=issuer, clock=clock) as kube, kmock.Server(kube) as server:
            url = str(server.url).rstrip("/")
            kubeconfig = workdir / "kubeconfig"
            write_kubeconfig(kubeconfig, url)
            kube.install_crd(build_crd())
            for namespace in SCENARIO_NAMESPACES:
                kube.add_namespace(namespace)
            kube.add_service_account(OPERATOR_NAMESPACE, OPERATOR_SERVICE_ACCOUNT)
            yield EmulatedKube(kube, url, kubeconfig), {name: name for name in SCENARIO_NAMESPACES}
        return

    real = RealKube(plane, clock)
    suffix = secrets.token_hex(3)
    namespaces = {name: f"{name}-{suffix}" for name in SCENARIO_NAMESPACES}
    binding: str | None = None
    try:
        await asyncio.gather(*(real.add_namespace(namespace) for namespace in namespaces.values()))
        await real.add_service_account(namespaces[OPERATOR_NAMESPACE], OPERATOR_SERVICE_ACCOUNT)
        binding = await real.bind_operator(namespaces[OPERATOR_NAMESPACE], OPERATOR_SERVICE_ACCOUNT)
        yield real, namespaces
    finally:
        await real.delete_cluster_objects(list(namespaces.values()), binding)


@contextlib.asynccontextmanager
async def _chainguard(
    shared: World | None, clock: Clock, options: Mapping[str, Any] | None, issuer_ssl: ssl.SSLContext | None
) -> AsyncIterator[ChainguardEmulator]:
    """A new Chainguard emulator for this world, or the running one of ``shared`` (left running)."""
    if shared is not None:
        yield shared.chainguard
        return
    async with ChainguardEmulator(clock=clock, issuer_ssl=issuer_ssl, **dict(options or {})) as chainguard:
        yield chainguard
