"""Operator-wide settings: one typed object read from ``CGID_*`` environment variables at start.

Everything is validated once, up front, and a bad value fails the start with a message that names the
variable — an operator that starts with a typo and fails on the first reconcile wastes an admin's
afternoon. Nothing reads the environment at import time; tests and the sandbox build ``Settings``
directly.
"""

from __future__ import annotations

import dataclasses
import datetime
import pathlib
import re
from collections.abc import Mapping

from chainguard_identity_operator.durations import parse_duration
from chainguard_identity_operator.urls import ISSUER_URL, ISSUER_URL_RULE

PREFIX = "CGID_"

DEFAULT_ALLOWED_ROLES = ("registry.pull", "apk.pull", "viewer")

# Issuer hosts of managed Kubernetes offerings whose discovery documents are reachable from the internet,
# so Chainguard's STS can fetch their keys itself (ClaimMatch). Full match on the host, narrow on purpose:
# an ordinary EC2 or Azure host name must not count as a public issuer.
PUBLIC_ISSUER_HOSTS = (
    re.compile(r"container\.googleapis\.com"),  # GKE
    re.compile(r"oidc\.eks\.[a-z0-9-]+\.amazonaws\.com(\.cn)?"),  # EKS
    re.compile(r"[a-z0-9-]+\.oic\.prod-aks\.azure\.com"),  # AKS
    re.compile(r"storage\.googleapis\.com"),  # self-hosted issuer discovery in a GCS bucket
    re.compile(r"[a-z0-9-]+\.blob\.core\.windows\.net"),  # ... or in Azure blob storage
    re.compile(r"[a-z0-9.-]+\.s3(\.[a-z0-9-]+)?\.amazonaws\.com"),  # ... or in S3
)

_CLUSTER_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?$")
_CLUSTER_ID = re.compile(r"^[A-Za-z0-9-]{1,64}$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_GROUP_UIDP = re.compile(r"^[0-9a-f]{40}(/[0-9a-f]{16})*$")
_IDENTITY_UIDP = re.compile(r"^[0-9a-f]{40}(/[0-9a-f]{16})+$")  # an identity is always a child


class ConfigurationError(Exception):
    """A setting is missing or invalid; the message names the environment variable."""


@dataclasses.dataclass(frozen=True)
class Settings:
    # Who we are: names identities ``<cluster>.<namespace>.<name>`` for humans. Ownership is proven by the
    # cluster ID (by default the UID of the kube-system namespace, read at start), never by the name.
    cluster_name: str = "kubernetes"
    cluster_id: str | None = None
    operator_namespace: str = "chainguard-system"
    operator_service_account: str = "chainguard-identity-operator"  # what tenants grant their Role to

    # Chainguard endpoints, and what pods are told in their ConfigMap.
    api_url: str = "https://console-api.enforce.dev"
    issuer_url: str = "https://issuer.enforce.dev"
    registry: str = "cgr.dev"

    # The operator's own credentials: its assumable identity (production) or a token file (development).
    identity: str | None = None
    identity_token_path: pathlib.Path = pathlib.Path("/var/run/chainguard/oidc/oidc-token")
    token_file: pathlib.Path | None = None

    # The cluster: how to reach it and what its issuer is.
    kubeconfig: pathlib.Path | None = None
    service_account_token_path: pathlib.Path = pathlib.Path(
        "/var/run/secrets/kubernetes.io/serviceaccount/token"
    )
    issuer: str | None = None  # override for discovery
    issuer_public: bool | None = None  # None: decide from the issuer host
    public_issuer_hosts: tuple[str, ...] = ()

    # The ConfigMap (in the operator's namespace) that the operator's own ChainguardIdentity writes: when
    # it names another identity (its own identity was replaced), the operator authenticates as that one.
    identity_config_map: str | None = None

    # Access checks: whether every resource verifies its exchange unless it says otherwise, and how often.
    verify_exchange: bool = False
    verify_interval: datetime.timedelta = datetime.timedelta(hours=1)

    # Policy.
    allowed_roles: tuple[str, ...] = DEFAULT_ALLOWED_ROLES
    # Groups (UIDPs) a resource may make identities in, with their folders; empty: any group the
    # operator's own identity may write to.
    allowed_parents: tuple[str, ...] = ()
    namespaces: tuple[str, ...] = ()  # empty: the whole cluster
    # Where spec.adopt is honoured: empty means the operator's own namespace only; "*" every namespace.
    adoption_namespaces: tuple[str, ...] = ()
    # Whether an identity holding roles outside allowed_roles may be adopted (the operator's own may,
    # from the operator's namespace, always).
    adoption_privileged: bool = False

    # Timing.
    jwks_poll_interval: datetime.timedelta = datetime.timedelta(minutes=5)
    resync_interval: datetime.timedelta = datetime.timedelta(minutes=10)
    request_timeout: datetime.timedelta = datetime.timedelta(seconds=10)
    # Chainguard API calls in flight at once, across every resource (and as many pooled connections).
    max_in_flight: int = 20
    max_backoff: datetime.timedelta = datetime.timedelta(minutes=5)
    base_backoff: datetime.timedelta = datetime.timedelta(seconds=2)
    # How long a replaced identity lives on after the ConfigMap names its successor: long enough for
    # the kubelet to refresh ConfigMaps mounted as volumes (about a minute) and for running exchanges.
    replacement_grace: datetime.timedelta = datetime.timedelta(minutes=10)
    # The longest a static identity may live, counted from its creation (the v2 API's maximum): a renewal
    # that would pass it replaces the identity instead of asking the API to extend it.
    max_static_lifetime: datetime.timedelta = datetime.timedelta(days=365)
    # How long the last good JWKS is trusted while reading it fails.
    jwks_max_staleness: datetime.timedelta = datetime.timedelta(hours=1)

    # Observability.
    liveness_port: int = 8080
    metrics_port: int = 9090  # 0 disables the Prometheus endpoint
    log_level: str = "INFO"

    def __post_init__(self) -> None:
        validate(self)

    @property
    def uses_identity(self) -> bool:
        return self.identity is not None

    def adoption_allowed_in(self, namespace: str) -> bool:
        namespaces = self.adoption_namespaces or (self.operator_namespace,)
        return "*" in namespaces or namespace in namespaces

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        """Read ``CGID_*`` variables; unknown ``CGID_`` names are an error (typos must not pass)."""
        known = {f"{PREFIX}{field.name.upper()}": field for field in dataclasses.fields(cls)}
        unknown = sorted(key for key in env if key.startswith(PREFIX) and key not in known)
        if unknown:
            raise ConfigurationError(
                f"{', '.join(unknown)}: unknown setting (known: {', '.join(sorted(known))})"
            )
        values: dict[str, object] = {}
        for var, field in known.items():
            raw = env.get(var)
            if raw is None or raw == "":
                continue
            values[field.name] = _convert(var, field.name, raw)
        try:
            return cls(**values)  # type: ignore[arg-type]
        except ConfigurationError:
            raise
        except (TypeError, ValueError) as exc:  # pragma: no cover - _convert catches the known shapes
            raise ConfigurationError(str(exc)) from None


_DURATIONS = {
    "jwks_poll_interval",
    "resync_interval",
    "request_timeout",
    "max_backoff",
    "base_backoff",
    "replacement_grace",
    "max_static_lifetime",
    "jwks_max_staleness",
    "verify_interval",
}
_PATHS = {"identity_token_path", "token_file", "kubeconfig", "service_account_token_path"}
_LISTS = {"allowed_roles", "namespaces", "public_issuer_hosts", "adoption_namespaces", "allowed_parents"}
_BOOLS = {"issuer_public", "adoption_privileged", "verify_exchange"}


def _convert(var: str, name: str, raw: str) -> object:
    try:
        if name in _DURATIONS:
            return parse_duration(raw)
        if name in _PATHS:
            return pathlib.Path(raw)
        if name in _LISTS:
            return tuple(item.strip() for item in raw.split(",") if item.strip())
        if name in _BOOLS:
            lowered = raw.strip().lower()
            if lowered in ("true", "1", "yes"):
                return True
            if lowered in ("false", "0", "no"):
                return False
            raise ValueError("must be true or false")
        if name in ("liveness_port", "metrics_port", "max_in_flight"):
            return int(raw)
    except ValueError as exc:
        raise ConfigurationError(f"{var}: {exc}") from None
    return raw.strip()


def validate(settings: Settings) -> None:
    def fail(name: str, message: str) -> None:
        raise ConfigurationError(f"{PREFIX}{name.upper()}: {message}")

    if settings.cluster_id is not None and not _CLUSTER_ID.fullmatch(settings.cluster_id):
        fail("cluster_id", "must be 1-64 letters, digits or '-' (the kube-system namespace UID by default)")
    if not _DNS_LABEL.fullmatch(settings.operator_namespace):
        fail("operator_namespace", "must be a namespace name")
    if not _DNS_SUBDOMAIN.fullmatch(settings.operator_service_account):
        fail("operator_service_account", "must be a service account name")
    if settings.identity_config_map is not None and not _DNS_SUBDOMAIN.fullmatch(
        settings.identity_config_map
    ):
        fail("identity_config_map", "must be a ConfigMap name")
    for group in settings.allowed_parents:
        if not _GROUP_UIDP.fullmatch(group):
            fail("allowed_parents", f"{group!r} is not a group UIDP")
    for namespace in settings.adoption_namespaces:
        if namespace != "*" and not _DNS_LABEL.fullmatch(namespace):
            fail("adoption_namespaces", f"{namespace!r} is not a namespace name (or *)")
    if not _CLUSTER_NAME.fullmatch(settings.cluster_name):
        fail(
            "cluster_name", "must be 1-32 lowercase letters, digits or '-', starting and ending alphanumeric"
        )
    for name in ("api_url", "issuer_url"):
        value = getattr(settings, name)
        if not value.startswith(("https://", "http://")):
            fail(name, "must be an http(s) URL")
    if settings.identity is not None and settings.token_file is not None:
        fail("identity", f"set either {PREFIX}IDENTITY or {PREFIX}TOKEN_FILE, not both")
    if settings.identity is None and settings.token_file is None:
        fail("identity", f"set {PREFIX}IDENTITY (the operator's assumable identity) or {PREFIX}TOKEN_FILE")
    if settings.identity is not None and not _IDENTITY_UIDP.fullmatch(settings.identity):
        fail("identity", "must be an identity UIDP like <40 hex>/<16 hex>")
    if settings.issuer is not None and not ISSUER_URL.fullmatch(settings.issuer):
        fail("issuer", f"must be {ISSUER_URL_RULE}")
    if not settings.allowed_roles:
        fail("allowed_roles", "must name at least one role")
    for name in _DURATIONS:
        if getattr(settings, name) <= datetime.timedelta(0):
            fail(name, "must be positive")
    for name in ("liveness_port", "metrics_port"):
        if not 0 <= getattr(settings, name) <= 65535:
            fail(name, "must be a port number")
    if not 1 <= settings.max_in_flight <= 1000:
        fail("max_in_flight", "must be between 1 and 1000")
