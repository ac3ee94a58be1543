"""The operator's narrow client for the Kubernetes API, and the cluster facts every resource shares.

kopf owns watching and finalizers; everything else the reconcile needs from the cluster goes through
``ClusterClient``: the issuer discovery document, the JWKS, the ConfigMaps, status patches and events.
It uses the official ``kubernetes`` package, whose calls block, so each call runs in a worker thread
(``asyncio.to_thread``) and the event loop never stalls on the API server. Every failure of a call is a
``ClusterError``: an answer keeps its HTTP status, and an API server that cannot be reached (restarting,
dropping connections, too slow) is one with no status, which the reconcile retries on its backoff.

``ClusterFactsCache`` reads the issuer and JWKS at most once per poll interval for the whole operator —
not once per resource — and tells its listeners when the JWKS fingerprint changes, which is the
cluster-wide signal that the service-account signing keys rotated. A failed read keeps the last good
key set (``facts.ClusterFacts``), and the fingerprint compared is always the last good one, so a
rotation that happens while reads fail is still noticed when they work again.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import datetime
import http.client
import json
import logging
import pathlib
import uuid
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jwt
import kubernetes.client
import kubernetes.client.rest
import kubernetes.config
import urllib3.exceptions
from kubernetes.client.exceptions import ApiException, OpenApiException

from chainguard_identity_operator.cluster_errors import ClusterError, ConfigMapConflict, SecretConflict
from chainguard_identity_operator.config import Settings
from chainguard_identity_operator.crd import GROUP, KIND, PLURAL, VERSION
from chainguard_identity_operator.facts import ClusterFacts
from chainguard_identity_operator.jwks import JWKSError, parse_jwks
from chainguard_identity_operator.redaction import redact

logger = logging.getLogger(__name__)

COMPONENT = "chainguard-identity-operator"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
API_VERSION = f"{GROUP}/{VERSION}"
DOCKER_CONFIG_TYPE = "kubernetes.io/dockerconfigjson"
DOCKER_CONFIG_KEY = ".dockerconfigjson"
KUBE_SYSTEM = "kube-system"


@dataclasses.dataclass(frozen=True)
class ObjectRef:
    namespace: str
    name: str
    uid: str

    def owner_reference(self) -> dict[str, Any]:
        return {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            "blockOwnerDeletion": False,
        }


@dataclasses.dataclass(frozen=True)
class ServiceAccountState:
    pull_secrets: tuple[str, ...]  # the names in its imagePullSecrets


@dataclasses.dataclass(frozen=True)
class SecretState:
    owned: bool  # controlled by the ObjectRef it was read for
    type: str
    annotations: Mapping[str, str]
    config: bytes  # the decoded .dockerconfigjson


@dataclasses.dataclass(frozen=True)
class ConfigMapState:
    data: Mapping[str, str]
    owned: bool  # controlled by the ObjectRef it was read for


def load_kube_configuration(settings: Settings) -> kubernetes.client.Configuration:
    """In-cluster credentials when running in a pod, else the kubeconfig (``CGID_KUBECONFIG``/``KUBECONFIG``)."""
    configuration = kubernetes.client.Configuration()
    if settings.kubeconfig is not None:
        kubernetes.config.load_kube_config(  # type: ignore[no-untyped-call]
            config_file=str(settings.kubeconfig), client_configuration=configuration
        )
        return configuration
    try:
        kubernetes.config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
    return configuration


def issuer_from_token(path: pathlib.Path) -> str | None:
    """The ``iss`` of the operator's own service-account token (discovery's fallback)."""
    try:
        token = path.read_text().strip()
    except OSError:
        return None
    try:
        # Only the issuer is read, to learn the cluster's own name for itself; nothing is trusted from it.
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        return None
    issuer = claims.get("iss")
    return issuer if isinstance(issuer, str) and issuer else None


# What a call raises when no answer came: the kubernetes client lets urllib3's errors through
# (MaxRetryError, ProtocolError, ReadTimeoutError, ...), and none of them is an OSError.
_TRANSPORT_ERRORS = (OSError, http.client.HTTPException, urllib3.exceptions.HTTPError)


def _api_error(exc: ApiException, what: str) -> ClusterError:
    if not exc.status:
        # Status 0 is the client's own wrapping of a failure before any answer (a TLS handshake).
        first = (exc.reason or "").strip().splitlines()
        return _unreachable(what, redact(first[0]) if first else "ApiException")
    reason = redact(exc.reason or "error")  # a reason phrase is the server's text: it may echo a token
    return ClusterError(f"{what}: Kubernetes API answered {exc.status} {reason}", status=exc.status)


def _unreachable(what: str, why: str) -> ClusterError:
    return ClusterError(f"{what}: no answer from the Kubernetes API ({why})")


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and what it wraps: its cause or context, and exceptions given as arguments (urllib3's
    ProtocolError carries the error it stands for that way)."""
    pending, seen = [exc], set()
    while pending:
        current = pending.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        pending += [arg for arg in current.args if isinstance(arg, BaseException)]
        pending += [e for e in (current.__cause__, current.__context__) if e is not None]


def _transport_error(exc: BaseException, what: str) -> ClusterError:
    """Name the failure by its kind and the system's words ("Connection refused"), never by urllib3's
    text: that carries URLs and object addresses, which would make the message — and so the condition
    and its event — new at every pass of an outage."""
    outer = exc.reason if isinstance(exc, urllib3.exceptions.MaxRetryError) and exc.reason else exc
    causes = list(_causes(outer))
    strerror = next((c.strerror for c in causes if isinstance(c, OSError) and c.strerror), None)
    detail = strerror or (type(causes[1]).__name__ if len(causes) > 1 else None)
    return _unreachable(what, f"{type(outer).__name__}: {detail}" if detail else type(outer).__name__)


class _TimedRESTClient(kubernetes.client.rest.RESTClientObject):
    """The generated client's transport with a timeout on every request: it sends none unless each call
    passes ``_request_timeout``, and an API server that accepts a connection and never answers (a
    half-open connection, a black-holed load balancer) would hold the call's worker thread for good —
    and with it, once the few threads of the pool are held, every cluster call of the operator."""

    def __init__(self, configuration: kubernetes.client.Configuration, timeout: float) -> None:
        super().__init__(configuration)
        self._timeout = timeout

    def request(self, *args: Any, **kwargs: Any) -> Any:
        # Keywords only, whatever the generated client's version passes (query_params, _preload_content...).
        kwargs["_request_timeout"] = kwargs.get("_request_timeout") or self._timeout
        return super().request(*args, **kwargs)  # type: ignore[no-untyped-call]


class ClusterClient:
    def __init__(self, api_client: kubernetes.client.ApiClient, *, timeout: float | None = None) -> None:
        """``timeout``: seconds for each request (connecting and reading), as CGID_REQUEST_TIMEOUT."""
        if timeout is not None:
            api_client.rest_client.pool_manager.clear()  # (``close`` is newer than some releases we allow)
            api_client.rest_client = _TimedRESTClient(api_client.configuration, timeout)
        self._api = api_client
        self._core = kubernetes.client.CoreV1Api(api_client)
        self._custom = kubernetes.client.CustomObjectsApi(api_client)
        self._well_known = kubernetes.client.WellKnownApi(api_client)
        self._openid = kubernetes.client.OpenidApi(api_client)

    def close(self) -> None:
        self._api.close()  # type: ignore[no-untyped-call]

    async def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        try:
            return await asyncio.to_thread(fn)
        except ApiException as exc:
            raise _api_error(exc, what) from None
        except _TRANSPORT_ERRORS as exc:
            raise _transport_error(exc, what) from None
        except OpenApiException as exc:
            raise ClusterError(f"{what}: {type(exc).__name__}") from None

    async def _raw(self, what: str, fn: Callable[..., Any]) -> str:
        # The generated client turns a "str" response into the repr of parsed JSON; read the bytes —
        # in the worker thread, inside _call: the body comes off the socket as it is read, and can break off.
        data = await self._call(what, lambda: fn(_preload_content=False).data)
        return data.decode() if isinstance(data, bytes) else str(data)

    async def openid_configuration(self) -> Mapping[str, Any] | None:
        what = "reading /.well-known/openid-configuration"
        try:
            raw = await self._raw(what, self._well_known.get_service_account_issuer_open_id_configuration)
        except ClusterError as exc:
            if exc.status in (404, 403):
                return None
            raise
        try:
            data = json.loads(raw)
        except ValueError:
            raise ClusterError(f"{what}: the answer is not JSON") from None
        return data if isinstance(data, Mapping) else None

    async def jwks(self) -> str:
        return await self._raw(
            "reading /openid/v1/jwks", self._openid.get_service_account_issuer_open_id_keyset
        )

    async def read_config_map(self, ref: ObjectRef, name: str) -> ConfigMapState | None:
        try:
            found = await self._call(
                f"reading ConfigMap {ref.namespace}/{name}",
                lambda: self._core.read_namespaced_config_map(name, ref.namespace),
            )
        except ClusterError as exc:
            if exc.status == 404:
                return None
            raise
        owners = found.metadata.owner_references or []
        owned = any(owner.uid == ref.uid for owner in owners)
        return ConfigMapState(data=dict(found.data or {}), owned=owned)

    async def write_config_map(
        self, ref: ObjectRef, name: str, data: Mapping[str, str], current: ConfigMapState | None
    ) -> None:
        """Create the ConfigMap, or replace the data of ours. ``current`` is what the caller read (and
        checked to be ours); a ConfigMap made meanwhile by someone else makes the create fail with 409."""
        if current is not None and not current.owned:
            raise ConfigMapConflict(
                f"ConfigMap {ref.namespace}/{name} exists and is not owned by this ChainguardIdentity; "
                "delete it or set spec.configMap.name"
            )
        body: dict[str, Any] = {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": name,
                "namespace": ref.namespace,
                "labels": {MANAGED_BY_LABEL: COMPONENT},
                "ownerReferences": [ref.owner_reference()],
            },
            "data": dict(data),
        }
        if current is None:
            await self._call(
                f"creating ConfigMap {ref.namespace}/{name}",
                lambda: self._core.create_namespaced_config_map(ref.namespace, body),  # type: ignore[arg-type]
            )
        else:
            # A merge patch; keys we do not publish (added by hand) are removed so the data is exact.
            patch = {"data": {**{key: None for key in current.data if key not in data}, **data}}
            await self._call(
                f"updating ConfigMap {ref.namespace}/{name}",
                lambda: self._core.patch_namespaced_config_map(name, ref.namespace, patch),
            )

    async def delete_config_map(self, ref: ObjectRef, name: str) -> None:
        """Delete a ConfigMap of ours that the resource no longer publishes; leave anyone else's alone."""
        current = await self.read_config_map(ref, name)
        if current is None or not current.owned:
            return
        try:
            await self._call(
                f"deleting ConfigMap {ref.namespace}/{name}",
                lambda: self._core.delete_namespaced_config_map(name, ref.namespace),
            )
        except ClusterError as exc:
            if exc.status != 404:
                raise

    async def published_identity(self, namespace: str, name: str) -> str | None:
        """The identity a ChainguardIdentity's ConfigMap names, or None (absent, or not written by us)."""
        try:
            found = await self._call(
                f"reading ConfigMap {namespace}/{name}",
                lambda: self._core.read_namespaced_config_map(name, namespace),
            )
        except ClusterError as exc:
            if exc.status == 404:
                return None
            raise
        owners = found.metadata.owner_references or []
        if not any(owner.kind == KIND and owner.api_version == API_VERSION for owner in owners):
            return None
        value = (found.data or {}).get("CHAINGUARD_IDENTITY")
        return value if isinstance(value, str) and value else None

    async def read_service_account(self, namespace: str, name: str) -> ServiceAccountState | None:
        try:
            found = await self._call(
                f"reading ServiceAccount {namespace}/{name}",
                lambda: self._core.read_namespaced_service_account(name, namespace),
            )
        except ClusterError as exc:
            if exc.status == 404:
                return None
            raise
        secrets = tuple(ref.name for ref in found.image_pull_secrets or () if ref.name)
        return ServiceAccountState(pull_secrets=secrets)

    async def set_image_pull_secret(self, namespace: str, account: str, secret: str, *, listed: bool) -> None:
        """Add ``secret`` to the service account's imagePullSecrets, or remove it — that one entry, with a
        JSON patch whose ``test`` fails if the list moved meanwhile (the next pass then looks again)."""
        what = f"{'adding' if listed else 'removing'} {secret} in ServiceAccount {namespace}/{account}"
        found = await self._call(what, lambda: self._core.read_namespaced_service_account(account, namespace))
        names = [ref.name for ref in found.image_pull_secrets or ()]
        patch: list[dict[str, Any]] = [
            {"op": "test", "path": "/metadata/resourceVersion", "value": found.metadata.resource_version}
        ]
        if listed and secret not in names:
            if found.image_pull_secrets:
                patch.append({"op": "add", "path": "/imagePullSecrets/-", "value": {"name": secret}})
            else:
                patch.append({"op": "add", "path": "/imagePullSecrets", "value": [{"name": secret}]})
        elif not listed and secret in names:
            patch.append({"op": "remove", "path": f"/imagePullSecrets/{names.index(secret)}"})
        else:
            return
        await self._call(what, lambda: self._core.patch_namespaced_service_account(account, namespace, patch))

    async def request_token(self, namespace: str, account: str, *, audience: str, seconds: int = 600) -> str:
        """A token of the service account, from the TokenRequest API. It stays in memory: it is presented
        to the STS once and dropped."""
        body = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {"audiences": [audience], "expirationSeconds": seconds},
        }
        answer = await self._call(
            f"requesting a token for ServiceAccount {namespace}/{account}",
            lambda: self._core.create_namespaced_service_account_token(account, namespace, body),  # type: ignore[arg-type]
        )
        token = answer.status.token if answer.status is not None else None
        if not isinstance(token, str) or not token:
            raise ClusterError(
                f"requesting a token for ServiceAccount {namespace}/{account}: no token in the answer"
            )
        return token

    async def read_secret(self, ref: ObjectRef, name: str) -> SecretState | None:
        try:
            found = await self._call(
                f"reading Secret {ref.namespace}/{name}",
                lambda: self._core.read_namespaced_secret(name, ref.namespace),
            )
        except ClusterError as exc:
            if exc.status == 404:
                return None
            raise
        owners = found.metadata.owner_references or []
        data = dict(found.data or {})
        return SecretState(
            owned=any(owner.uid == ref.uid for owner in owners),
            type=found.type or "",
            annotations=dict(found.metadata.annotations or {}),
            config=base64.b64decode(data.get(DOCKER_CONFIG_KEY, "")),
        )

    async def write_secret(
        self,
        ref: ObjectRef,
        name: str,
        config: bytes,
        annotations: Mapping[str, str],
        current: SecretState | None,
    ) -> None:
        """Create the pull secret, or replace the data and annotations of ours; never touch someone else's."""
        if current is not None and not current.owned:
            raise SecretConflict(
                f"Secret {ref.namespace}/{name} exists and is not owned by this ChainguardIdentity; delete it "
                "or set spec.pullSecret.name"
            )
        encoded = {DOCKER_CONFIG_KEY: base64.b64encode(config).decode()}
        if current is None:
            body: dict[str, Any] = {
                "apiVersion": "v1",
                "kind": "Secret",
                "type": DOCKER_CONFIG_TYPE,
                "metadata": {
                    "name": name,
                    "namespace": ref.namespace,
                    "labels": {MANAGED_BY_LABEL: COMPONENT},
                    "annotations": dict(annotations),
                    "ownerReferences": [ref.owner_reference()],
                },
                "data": encoded,
            }
            await self._call(
                f"creating Secret {ref.namespace}/{name}",
                lambda: self._core.create_namespaced_secret(ref.namespace, body),  # type: ignore[arg-type]
            )
            return
        patch = {"metadata": {"annotations": dict(annotations)}, "data": encoded}
        await self._call(
            f"updating Secret {ref.namespace}/{name}",
            lambda: self._core.patch_namespaced_secret(name, ref.namespace, patch),
        )

    async def delete_secret(self, ref: ObjectRef, name: str) -> None:
        current = await self.read_secret(ref, name)
        if current is None or not current.owned:
            return
        try:
            await self._call(
                f"deleting Secret {ref.namespace}/{name}",
                lambda: self._core.delete_namespaced_secret(name, ref.namespace),
            )
        except ClusterError as exc:
            if exc.status != 404:
                raise

    async def cluster_id(self) -> str:
        """The UID of the kube-system namespace: made once when the cluster is, never shared by two."""
        found = await self._call(
            f"reading Namespace {KUBE_SYSTEM}", lambda: self._core.read_namespace(KUBE_SYSTEM)
        )
        uid = found.metadata.uid
        if not isinstance(uid, str) or not uid:
            raise ClusterError(f"reading Namespace {KUBE_SYSTEM}: it has no uid")
        return uid

    async def patch_status(self, ref: ObjectRef, status: Mapping[str, Any]) -> None:
        await self._call(
            f"patching status of {ref.namespace}/{ref.name}",
            lambda: self._custom.patch_namespaced_custom_object_status(
                GROUP, VERSION, ref.namespace, PLURAL, ref.name, {"status": dict(status)}
            ),
        )

    async def post_event(self, ref: ObjectRef, *, warning: bool, reason: str, message: str) -> None:
        now = datetime.datetime.now(datetime.UTC)
        body: Any = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": f"{ref.name}.{uuid.uuid4().hex[:16]}", "namespace": ref.namespace},
            "involvedObject": {
                "apiVersion": API_VERSION,
                "kind": KIND,
                "name": ref.name,
                "namespace": ref.namespace,
                "uid": ref.uid,
            },
            "reason": reason,
            "message": message[:1024],
            "type": "Warning" if warning else "Normal",
            "source": {"component": COMPONENT},
            "reportingComponent": COMPONENT,
            "firstTimestamp": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "lastTimestamp": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "count": 1,
        }
        try:
            await self._call(
                f"posting event {reason}", lambda: self._core.create_namespaced_event(ref.namespace, body)
            )
        except ClusterError as exc:
            # Events are best effort: losing one must never fail a reconcile.
            logger.warning("could not post event %s on %s/%s: %s", reason, ref.namespace, ref.name, exc)


KeysChangedListener = Callable[[str | None, str], None]


class ClusterFactsCache:
    """Issuer and JWKS, read at most once per poll interval and shared by every resource."""

    def __init__(
        self,
        cluster: ClusterClient,
        settings: Settings,
        *,
        clock: Callable[[], datetime.datetime] | None = None,
    ) -> None:
        self._cluster = cluster
        self._settings = settings
        self._clock = clock or (lambda: datetime.datetime.now(datetime.UTC))
        self._lock = asyncio.Lock()
        self._facts: ClusterFacts | None = None
        self._read_at: datetime.datetime | None = None
        self._listeners: list[KeysChangedListener] = []

    def on_keys_changed(self, listener: KeysChangedListener) -> None:
        self._listeners.append(listener)

    @property
    def facts(self) -> ClusterFacts | None:
        return self._facts

    async def get(self) -> ClusterFacts:
        async with self._lock:
            now = self._clock()
            interval = self._settings.jwks_poll_interval
            if self._facts is not None and self._facts.keys_error is not None:
                # After a failed read, try again sooner than a whole poll interval.
                interval = min(interval, self._settings.base_backoff * 4)
            fresh = self._read_at is not None and now - self._read_at < interval
            if self._facts is not None and fresh:
                return self._facts
            return await self._refresh(now)

    async def refresh(self) -> ClusterFacts:
        async with self._lock:
            return await self._refresh(self._clock())

    async def _refresh(self, now: datetime.datetime) -> ClusterFacts:
        previous = self._facts
        issuer = self._settings.issuer
        if issuer is None:
            try:
                discovery = await self._cluster.openid_configuration()
            except ClusterError:
                if previous is None:
                    raise
                discovery = {"issuer": previous.issuer}  # keep the issuer we knew through a blip
            found = discovery.get("issuer") if discovery else None
            issuer = found if isinstance(found, str) and found else None
        if issuer is None:
            issuer = await asyncio.to_thread(issuer_from_token, self._settings.service_account_token_path)
        if issuer is None:
            raise ClusterError(
                "cannot find the cluster's OIDC issuer: /.well-known/openid-configuration is not served and the "
                "operator's own token has no iss; set CGID_ISSUER or spec.issuer"
            )
        last_good = previous.keys if previous is not None else None
        try:
            keys = parse_jwks(await self._cluster.jwks())
        except (JWKSError, ClusterError) as exc:
            error = redact(f"cannot use the cluster's JWKS from /openid/v1/jwks: {exc}")
            logger.warning("%s", error)
            facts = ClusterFacts(
                issuer=issuer,
                keys=last_good,
                keys_read_at=previous.keys_read_at if previous is not None else None,
                keys_error=error,
            )
        else:
            facts = ClusterFacts(issuer=issuer, keys=keys, keys_read_at=now)
        self._facts, self._read_at = facts, now
        if (
            facts.keys is not None
            and last_good is not None
            and facts.keys.fingerprint != last_good.fingerprint
        ):
            logger.info(
                "the cluster's signing keys changed: %s -> %s", last_good.fingerprint, facts.keys.fingerprint
            )
            for listener in self._listeners:
                listener(last_good.fingerprint, facts.keys.fingerprint)
        return facts
