"""The cluster side of the operator in memory, for tests that run hundreds of schedules in seconds.

``MemoryCluster`` stands in for ``cluster.ClusterClient`` — the operator's one client of the Kubernetes
API — with the same methods and the same answers: ConfigMaps with owner references, merge-patched
status, events, service accounts, the kube-system UID, the OIDC discovery document and the JWKS. The
signing keys, tokens and service accounts are a ``KubeEmulator``'s (not served; its methods are plain
calls), so tokens it mints verify against the JWKS this cluster reports. ``Driver`` runs the real
operator ``Runtime`` against it, one pass at a time, with no kopf and no threads: a randomized test
can kill the operator after any request, restart it, and check the invariants at the end.

What it leaves out on purpose — watches, resourceVersion conflicts, admission — is covered by the
tests against the Kubernetes emulator and the real API server; the faults this tier is for are the
Chainguard API's.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import functools
import json
import pathlib
import ssl
import uuid
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any

import httpx
import kubernetes.client
from aiohttp import web

from cgid_testkit.kube import KubeEmulator
from chainguard_identity_operator.chainguard.auth import AssumedIdentity
from chainguard_identity_operator.chainguard.client import ChainguardClient, RetryPolicy
from chainguard_identity_operator.chainguard.sts import STSClient
from chainguard_identity_operator.cluster import (
    API_VERSION,
    KUBE_SYSTEM,
    ClusterClient,
    ConfigMapState,
    ObjectRef,
    ServiceAccountState,
)
from chainguard_identity_operator.cluster_errors import ClusterError, ConfigMapConflict
from chainguard_identity_operator.config import Settings
from chainguard_identity_operator.crd import KIND
from chainguard_identity_operator.reconcile import DeletionBlocked, Outcome
from chainguard_identity_operator.runtime import Runtime

__all__ = ["Crash", "Driver", "IssuerServer", "MemoryCluster", "ssl_context"]


@functools.cache
def ssl_context() -> ssl.SSLContext:
    """One TLS context for every client a test makes: building one reads the CA bundle (~30 ms)."""
    return ssl.create_default_context()


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386, as the API server applies a merge patch."""
    if not isinstance(patch, Mapping):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, Mapping) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


@dataclasses.dataclass
class StoredEvent:
    namespace: str
    name: str
    reason: str
    message: str
    warning: bool


class MemoryCluster(ClusterClient):
    """``ClusterClient``'s methods over dictionaries; see the module docstring."""

    def __init__(self, kube: KubeEmulator) -> None:  # no API client: nothing is sent anywhere
        self.kube = kube
        self.resources: dict[tuple[str, str], dict[str, Any]] = {}  # the ChainguardIdentity objects
        self.config_maps: dict[tuple[str, str], dict[str, Any]] = {}
        self.events: list[StoredEvent] = []
        self.status_patches = 0
        self.jwks_failing = False

    def close(self) -> None:
        pass

    # -- what tests do as a user would ----------------------------------------------------------------

    def apply(
        self, namespace: str, name: str, spec: Mapping[str, Any], annotations: Mapping[str, str] = {}
    ) -> None:
        current = self.resources.get((namespace, name))
        if current is None:
            self.resources[(namespace, name)] = {
                "metadata": {
                    "namespace": namespace,
                    "name": name,
                    "uid": str(uuid.uuid4()),
                    "generation": 1,
                    "annotations": dict(annotations or {}),
                },
                "spec": copy.deepcopy(dict(spec)),
                "status": {},
            }
            return
        if current["spec"] != spec:
            current["spec"] = copy.deepcopy(dict(spec))
            current["metadata"]["generation"] += 1
        current["metadata"]["annotations"].update(annotations or {})

    def body(self, namespace: str, name: str) -> dict[str, Any]:
        return copy.deepcopy(self.resources[(namespace, name)])

    def remove(self, namespace: str, name: str) -> None:
        """The finalizer finished: the object and what it owns (its ConfigMaps) are gone."""
        obj = self.resources.pop((namespace, name))
        uid = obj["metadata"]["uid"]
        for key, config_map in list(self.config_maps.items()):
            if any(owner["uid"] == uid for owner in config_map["metadata"].get("ownerReferences", [])):
                del self.config_maps[key]

    # -- ClusterClient ----------------------------------------------------------------------------------

    async def openid_configuration(self) -> Mapping[str, Any] | None:
        return self.kube.openid_configuration()

    async def jwks(self) -> str:
        if self.jwks_failing:
            raise ClusterError(
                "reading /openid/v1/jwks: Kubernetes API answered 503 Service Unavailable", status=503
            )
        return json.dumps(self.kube.jwks())

    async def read_config_map(self, ref: ObjectRef, name: str) -> ConfigMapState | None:
        found = self.config_maps.get((ref.namespace, name))
        if found is None:
            return None
        owned = any(owner["uid"] == ref.uid for owner in found["metadata"].get("ownerReferences", []))
        return ConfigMapState(data=dict(found["data"]), owned=owned)

    async def write_config_map(
        self, ref: ObjectRef, name: str, data: Mapping[str, str], current: ConfigMapState | None
    ) -> None:
        existing = self.config_maps.get((ref.namespace, name))
        if current is None and existing is not None:
            raise ClusterError(
                f"creating ConfigMap {ref.namespace}/{name}: Kubernetes API answered 409", status=409
            )
        if current is not None and not current.owned:
            raise ConfigMapConflict(f"ConfigMap {ref.namespace}/{name} exists and is not owned")
        self.config_maps[(ref.namespace, name)] = {
            "metadata": {
                "name": name,
                "namespace": ref.namespace,
                "ownerReferences": [ref.owner_reference()],
            },
            "data": dict(data),
        }

    async def delete_config_map(self, ref: ObjectRef, name: str) -> None:
        current = await self.read_config_map(ref, name)
        if current is not None and current.owned:
            del self.config_maps[(ref.namespace, name)]

    async def published_identity(self, namespace: str, name: str) -> str | None:
        found = self.config_maps.get((namespace, name))
        if found is None:
            return None
        owners = found["metadata"].get("ownerReferences", [])
        if not any(o["kind"] == KIND and o["apiVersion"] == API_VERSION for o in owners):
            return None
        value = found["data"].get("CHAINGUARD_IDENTITY")
        return value if isinstance(value, str) and value else None

    async def read_service_account(self, namespace: str, name: str) -> ServiceAccountState | None:
        found = self.kube.current("v1/serviceaccounts", namespace, name)
        if found is None:
            return None
        names = tuple(ref.get("name", "") for ref in found.get("imagePullSecrets") or ())
        return ServiceAccountState(pull_secrets=names)

    async def set_image_pull_secret(self, namespace: str, account: str, secret: str, *, listed: bool) -> None:
        raise ClusterError("the in-memory cluster keeps no imagePullSecrets", status=501)

    async def request_token(self, namespace: str, account: str, *, audience: str, seconds: int = 600) -> str:
        return self.kube.mint_token(namespace, account, audiences=[audience], expiration_seconds=seconds)

    async def cluster_id(self) -> str:
        found = self.kube.current("v1/namespaces", None, KUBE_SYSTEM)
        assert found is not None
        uid: str = found["metadata"]["uid"]
        return uid

    async def patch_status(self, ref: ObjectRef, status: Mapping[str, Any]) -> None:
        obj = self.resources.get((ref.namespace, ref.name))
        if obj is None or obj["metadata"]["uid"] != ref.uid:
            raise ClusterError(f"patching status of {ref.namespace}/{ref.name}: 404 Not Found", status=404)
        obj["status"] = merge_patch(obj.get("status") or {}, status)
        self.status_patches += 1

    async def post_event(self, ref: ObjectRef, *, warning: bool, reason: str, message: str) -> None:
        self.events.append(StoredEvent(ref.namespace, ref.name, reason, message, warning))


class IssuerServer:
    """The cluster's OIDC discovery document and JWKS over HTTP on loopback, from a ``KubeEmulator``'s
    keys: what Chainguard's STS fetches for a ClaimMatch identity (the in-memory cluster serves nothing)."""

    def __init__(self, kube: KubeEmulator) -> None:
        self.kube = kube
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def __aenter__(self) -> IssuerServer:
        app = web.Application()
        app.router.add_get("/.well-known/openid-configuration", self._discovery)
        app.router.add_get("/openid/v1/jwks", self._jwks)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _discovery(self, _request: web.Request) -> web.Response:
        return web.json_response(self.kube.openid_configuration())

    async def _jwks(self, _request: web.Request) -> web.Response:
        return web.json_response(self.kube.jwks())


TOKEN_LIFETIME = datetime.timedelta(hours=1)  # of the operator's projected token, as deploy/ asks


class Crash(BaseException):
    """The operator process died. A BaseException, so that no ``except Exception`` in the operator can
    swallow it — as nothing in a process survives a SIGKILL."""


class _CrashingTransport(httpx.AsyncBaseTransport):
    """Counts requests; the ``crash_after``-th one is answered (and so committed) and then the process
    dies before anything reads the answer."""

    def __init__(self) -> None:
        self._inner = httpx.AsyncHTTPTransport(verify=ssl_context())
        self.sent = 0
        self.crash_after: int | None = None

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self._inner.handle_async_request(request)
        await response.aread()
        self.sent += 1
        if self.crash_after is not None and self.sent >= self.crash_after:
            self.crash_after = None
            raise Crash(f"killed after request {self.sent} ({request.method} {request.url.path})")
        return response

    async def aclose(self) -> None:
        await self._inner.aclose()


async def _no_sleep(_seconds: float) -> None:
    """Retries in the client wait for nothing: time is the test's clock, not the wall's."""


class Driver:
    """The real ``Runtime`` against a ``MemoryCluster`` and a Chainguard emulator, one pass at a time.

    ``crash_after(n)`` kills the operator after its n-th Chainguard request from now (the n-th write
    commits; its answer is never read); ``restart()`` starts a fresh process with nothing in memory.
    """

    def __init__(
        self,
        settings: Settings,
        cluster: MemoryCluster,
        *,
        clock: Callable[[], datetime.datetime],
        token_path: pathlib.Path,
        operator_namespace: str,
        operator_service_account: str,
    ) -> None:
        self.settings = settings
        self.cluster = cluster
        self.clock = clock
        self.token_path = token_path
        self.operator_namespace = operator_namespace
        self.operator_service_account = operator_service_account
        self.runtime: Runtime | None = None
        self.transport = _CrashingTransport()
        self.crashes = 0
        self._minted_at: datetime.datetime | None = None

    def refresh_token(self, *, force: bool = False) -> None:
        """What the kubelet does for the operator's projected token: a new one once the old one is 80 %
        through its life (so a token signed before a key rotation is still used for a while after it)."""
        now = self.clock()
        if not force and self._minted_at is not None and now - self._minted_at < TOKEN_LIFETIME * 0.8:
            return
        self.token_path.write_text(
            self.cluster.kube.mint_token(
                self.operator_namespace,
                self.operator_service_account,
                audiences=["issuer.enforce.dev"],
                expiration_seconds=int(TOKEN_LIFETIME.total_seconds()),
            )
        )
        self._minted_at = now

    async def start(self) -> Runtime:
        self.transport = _CrashingTransport()
        timeout = self.settings.request_timeout.total_seconds()
        assert self.settings.identity is not None
        sts = STSClient(self.settings.issuer_url, timeout=timeout, transport=self.transport)
        tokens = AssumedIdentity(
            sts, identity=self.settings.identity, token_path=self.token_path, clock=self.clock
        )
        chainguard = ChainguardClient(
            self.settings.api_url,
            tokens,
            timeout=timeout,
            transport=self.transport,
            retry=RetryPolicy(attempts=3),
            sleep=_no_sleep,
        )
        self.refresh_token()
        runtime = Runtime(
            self.settings,
            kube_configuration=kubernetes.client.Configuration(),
            chainguard=chainguard,
            clock=self.clock,
            sts=sts,
            own_identity=tokens,
            cluster=self.cluster,
        )
        await runtime.start()
        self.runtime = runtime
        return runtime

    async def stop(self) -> None:
        if self.runtime is not None:
            runtime, self.runtime = self.runtime, None
            await runtime.aclose()

    async def restart(self) -> None:
        await self.stop()
        await self.start()

    def crash_after(self, requests: int) -> None:
        self.transport.crash_after = self.transport.sent + requests

    async def crash_in_next_pass(self, requests: int) -> None:
        """``crash_after`` for the process the next call runs in: started now if the last one died."""
        await self._running()
        self.crash_after(requests)

    async def _running(self) -> Runtime:
        if self.runtime is None:
            await self.start()
        assert self.runtime is not None
        return self.runtime

    async def reconcile(self, namespace: str, name: str) -> Outcome | None:
        """One pass, as the worker runs it; ``None`` when the process died in it (then restarted)."""
        runtime = await self._running()
        self.refresh_token()
        try:
            outcome, _delay = await runtime.run_once(self.cluster.body(namespace, name))
        except Crash:
            await self._died()
            return None
        return outcome

    async def finalize(self, namespace: str, name: str) -> bool:
        """One try of the finalizer; True when it finished (the object is then removed)."""
        runtime = await self._running()
        self.refresh_token()
        try:
            await runtime.finalize(self.cluster.body(namespace, name))
        except DeletionBlocked:
            return False
        except Crash:
            await self._died()
            return False
        self.cluster.remove(namespace, name)
        return True

    async def _died(self) -> None:
        self.crashes += 1
        await self.stop()
