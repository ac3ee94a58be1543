"""A whole world in one process: the Kubernetes emulator, the Chainguard emulator and the real operator.

``World`` is what the integration tests and the sandbox run. It seeds Chainguard the way an admin would
before installing the operator: an organization with a registry, and the operator's own *static*
identity made from the cluster's JWKS (the private-cluster bootstrap), bound as ``owner``. The operator
then runs exactly as in a pod: it reads a projected service-account token (minted by the cluster
emulator with audience ``issuer.enforce.dev``) and exchanges it at the emulated STS for its API token.

The cluster's issuer defaults to a public-looking URL that the Chainguard emulator can reach through
its ``issuer_routes`` (test DNS), so both ClaimMatch and Static identities work; tests that need a
cluster-local issuer pass ``issuer=``.

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
import json
import pathlib
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, TypeVar

import httpx
import kmock
import kopf

from cgid_testkit.chainguard import ChainguardEmulator
from cgid_testkit.kube import KubeEmulator, write_kubeconfig
from chainguard_identity_operator import handlers, naming
from chainguard_identity_operator.config import Settings
from chainguard_identity_operator.crd import GROUP, PLURAL, VERSION, build_crd
from chainguard_identity_operator.naming import Owner
from chainguard_identity_operator.runtime import Runtime

PUBLIC_ISSUER = "https://oidc.sandbox-cluster.example"
ORG_NAME = "my-org.example"
OPERATOR_NAMESPACE = "chainguard-system"
OPERATOR_SERVICE_ACCOUNT = "chainguard-identity-operator"
CR_PATH = f"/apis/{GROUP}/{VERSION}/namespaces/{{namespace}}/{PLURAL}"

T = TypeVar("T")


class Clock:
    """A controllable clock shared by both emulators and the operator (for fast-forwarded rotation)."""

    def __init__(self) -> None:
        self.offset = datetime.timedelta(0)

    def __call__(self) -> datetime.datetime:
        return datetime.datetime.now(datetime.UTC) + self.offset

    def advance(self, delta: datetime.timedelta) -> None:
        self.offset += delta


@dataclasses.dataclass
class World:
    kube: KubeEmulator
    kube_url: str
    chainguard: ChainguardEmulator
    org: str
    operator_identity: str
    settings: Settings
    kubeconfig: pathlib.Path
    workdir: pathlib.Path
    clock: Clock
    runtime: Runtime | None = None
    _operator: OperatorThread | None = None

    # -- the operator -------------------------------------------------------------------------------

    async def start_operator(self) -> None:
        """Run the operator as in a pod, in its own thread (see ``OperatorThread``)."""
        if self._operator is not None:
            raise RuntimeError("the operator is already running")
        self.runtime = Runtime.from_settings(self.settings, clock=self.clock)
        self._operator = OperatorThread(self.runtime)
        await self._operator.up()
        assert handlers.FINALIZER  # the handlers are registered by importing the module

    async def stop_operator(self) -> None:
        if self._operator is None:
            return
        operator, self._operator = self._operator, None
        self.runtime = None
        await operator.down()

    def refresh_operator_token(self) -> None:
        """What the kubelet does for a projected token: replace it before it expires."""
        self.settings.identity_token_path.write_text(
            self.kube.mint_token(
                OPERATOR_NAMESPACE,
                OPERATOR_SERVICE_ACCOUNT,
                audiences=["issuer.enforce.dev"],
                expiration_seconds=48 * 3600,
            )
        )

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
        kube_system = self.kube.current("v1/namespaces", None, "kube-system")
        assert kube_system is not None
        return Owner(self.settings.cluster_name, kube_system["metadata"]["uid"], namespace, name)

    def owns(self, description: str, namespace: str, name: str) -> bool:
        """Whether an identity with ``description`` belongs to the resource ``namespace/name`` here."""
        return naming.parse_marker(description) == self.owner(namespace, name)

    # -- the cluster, as a client sees it ---------------------------------------------------------

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.kube_url, timeout=10)

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
        """How many status patches the cluster has served: one per finished reconcile pass."""
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
        token = self.kube.mint_token(
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
) -> AsyncIterator[World]:
    """Start both emulators, seed them as an admin would, and (by default) start the operator.

    With ``shared``, start only a new cluster and its operator, against ``shared``'s Chainguard emulator,
    organization and clock (which stay ``shared``'s: they are not stopped here, so nest this world inside
    ``shared``'s, as ``async with world() as a, world(shared=a) as b``). Each cluster needs its
    own issuer route, so two routable clusters need two issuers; two clusters on the same cluster-local
    issuer (``routable=False``, the kubeadm default) are the realistic case.
    """
    if shared is not None and chainguard_options:
        raise ValueError("chainguard_options configure a new Chainguard emulator; a shared one is running")
    clock = shared.clock if shared is not None else Clock()
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = pathlib.Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="cgid-")))
        workdir.mkdir(parents=True, exist_ok=True)
        async with (
            KubeEmulator(issuer=issuer, clock=clock) as kube,
            kmock.Server(kube) as server,
            _chainguard(shared, clock, chainguard_options) as chainguard,
        ):
            kube_url = str(server.url).rstrip("/")
            if routable:
                routed = chainguard.issuer_routes.get(issuer)
                if routed is not None:
                    raise ValueError(
                        f"the Chainguard emulator already routes {issuer} to another cluster ({routed}); "
                        "give this cluster its own issuer, or routable=False"
                    )
                chainguard.issuer_routes[issuer] = kube_url
                stack.callback(chainguard.issuer_routes.pop, issuer, None)
            kube.install_crd(build_crd())
            for namespace in ("default", "shop", OPERATOR_NAMESPACE):
                kube.add_namespace(namespace)
            kube.add_service_account(OPERATOR_NAMESPACE, OPERATOR_SERVICE_ACCOUNT)

            if shared is not None:
                org = shared.org
            else:
                org = chainguard.add_group(ORG_NAME, verified=True)
                for repo in ("python", "nginx", "curl"):
                    chainguard.add_repo(org, repo)

            # The private-cluster bootstrap from the README: the operator's own static identity, made
            # once from the cluster's JWKS, bound as owner in the organization.
            operator_identity = chainguard.add_identity(
                org,
                {
                    "name": "chainguard-identity-operator",
                    "description": "the operator's own identity (bootstrap)",
                    "staticKeys": {
                        "issuer": issuer,
                        "subject": f"system:serviceaccount:{OPERATOR_NAMESPACE}:{OPERATOR_SERVICE_ACCOUNT}",
                        "issuerKeys": json.dumps(kube.jwks()),
                        "expirationTime": (clock() + datetime.timedelta(days=30)).strftime(
                            "%Y-%m-%dT%H:%M:%SZ"
                        ),
                    },
                },
            )
            chainguard.bind(operator_identity, org, "owner")
            token_path = workdir / "operator-oidc-token"
            kubeconfig = workdir / "kubeconfig"
            write_kubeconfig(kubeconfig, kube_url)

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
                "operator_namespace": OPERATOR_NAMESPACE,
                "identity_config_map": "operator-chainguard-identity",
                "metrics_port": 0,
            }
            values.update(settings_overrides or {})
            the_world = World(
                kube=kube,
                kube_url=kube_url,
                chainguard=chainguard,
                org=org,
                operator_identity=operator_identity,
                settings=Settings(**values),
                kubeconfig=kubeconfig,
                workdir=workdir,
                clock=clock,
            )
            the_world.refresh_operator_token()
            try:
                if start:
                    await the_world.start_operator()
                yield the_world
            finally:
                await the_world.stop_operator()


@contextlib.asynccontextmanager
async def _chainguard(
    shared: World | None, clock: Clock, options: Mapping[str, Any] | None
) -> AsyncIterator[ChainguardEmulator]:
    """A new Chainguard emulator for this world, or the running one of ``shared`` (left running)."""
    if shared is not None:
        yield shared.chainguard
        return
    async with ChainguardEmulator(clock=clock, **dict(options or {})) as chainguard:
        yield chainguard
