"""The ClusterRole in ``deploy/`` covers every Kubernetes API call the operator makes, and grants nothing else.

Two derivations, neither from a hand-copied list of calls:

- **Observed**: the real operator (kopf + the client layer) runs through the harness against the
  Kubernetes emulator — a ClaimMatch and a Static resource become Ready, one is Stalled, one is edited
  into a replacement (so its ConfigMap is patched), one is deleted through the finalizer. Every request the
  emulator recorded from the operator (told apart by User-Agent: kopf's own, and the ``kubernetes``
  client's) is mapped to what RBAC authorizes — (apiGroup, resource[/subresource], verb), or
  (nonResourceURL, get) — and checked against the rendered rules. Then every verb the rules grant must
  have been used, except for a short, commented allow-list of calls a short run does not reach.
- **Static**: every Kubernetes API method that ``cluster.py`` calls (found in its AST) is invoked on a
  recording ``ApiClient``, which yields its real HTTP method and path; those map into the rules the same way.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import dataclasses
import inspect
import pathlib
import shutil
import subprocess
import urllib.parse
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import httpx
import kubernetes.client
import pytest
import yaml

from cgid_testkit.harness import OperatorThread, World, world
from chainguard_identity_operator import access, cluster, crd
from chainguard_identity_operator.model import PullSecretSpec
from chainguard_identity_operator.runtime import Runtime

ROOT = pathlib.Path(__file__).resolve().parents[2]
ROLE = "chainguard-identity-operator"
SERVICE_ACCOUNT = "chainguard-identity-operator"
TEST_USER_AGENT = "rbac-test-harness"
# Who is who in the emulator's request log.
OPERATOR_AGENTS = ("kopf/", "OpenAPI-Generator/")  # kopf's aiohttp session; the `kubernetes` client
STS_EMULATOR_AGENT = "Python/"  # aiohttp's default: the Chainguard emulator fetching the issuer's keys
# API discovery, which every authenticated user may read (the built-in system:discovery ClusterRole).
DISCOVERY_PATHS = ("/api", "/apis", "/version")

# Granted (apiGroup, resource, verb)s that a short run does not exercise, each with the reason the operator
# still needs it. Empty today: the run below uses every verb deploy/ grants. (kopf's namespace listing for
# CGID_NAMESPACES is deliberately not granted: kopf then takes the configured names as given.)
NOT_EXERCISED: Mapping[tuple[str, str, str], str] = {}

pytestmark = pytest.mark.timeout(60)


@dataclasses.dataclass(frozen=True)
class Permission:
    """What one request needs from RBAC: a resource verb, or ``get`` on a non-resource URL."""

    group: str | None
    resource: str | None
    verb: str
    url: str | None = None
    # The object's name, for rules limited by resourceNames; not part of what a permission *is*.
    name: str | None = dataclasses.field(default=None, compare=False)

    def __str__(self) -> str:
        if self.url is not None:
            return f"{self.verb} {self.url}"
        return f"{self.verb} {self.resource} ({self.group or 'core'})"


def permission(method: str, path: str, params: Mapping[str, str]) -> Permission | None:
    """Map a request to the permission the API server checks, by Kubernetes' URL rules.
    ``None`` for API discovery, which RBAC grants to everyone."""
    parts = [part for part in path.split("/") if part]
    if parts and parts[0] == "api" and len(parts) >= 2:
        group, rest = "", parts[2:]
    elif parts and parts[0] == "apis" and len(parts) >= 3:
        group, rest = parts[1], parts[3:]
    else:
        rest = []
    if not rest:
        if path.rstrip("/") in DISCOVERY_PATHS or parts[:1] in (["api"], ["apis"]):
            return None
        return Permission(None, None, method.lower(), url=path)
    if (
        len(rest) >= 3
        and rest[0] == "namespaces"
        and not (len(rest) == 3 and rest[2] in ("status", "finalize"))
    ):
        rest = rest[2:]
    resource = "/".join([rest[0], *rest[2:]])  # plural, then /subresource
    named = len(rest) >= 2
    name = rest[1] if named else None
    if method == "GET":
        verb = "watch" if params.get("watch") in ("true", "1") else ("get" if named else "list")
    else:
        verb = {
            "POST": "create",
            "PUT": "update",
            "PATCH": "patch",
            "DELETE": "delete" if named else "deletecollection",
        }[method]
    return Permission(group, resource, verb, name=name)


@dataclasses.dataclass(frozen=True)
class Rules:
    rules: tuple[Mapping[str, Any], ...]

    def allows(self, wanted: Permission) -> bool:
        for rule in self.rules:
            if wanted.verb not in rule["verbs"]:
                continue
            if wanted.url is not None and wanted.url in rule.get("nonResourceURLs", []):
                return True
            names = rule.get("resourceNames")
            if (
                wanted.url is None
                and wanted.group in rule.get("apiGroups", [])
                and wanted.resource in rule.get("resources", [])
                and (names is None or wanted.name in names)
            ):
                return True
        return False

    def granted(self) -> set[Permission]:
        return {
            Permission(group, resource, verb)
            for rule in self.rules
            for group in rule.get("apiGroups", [])
            for resource in rule.get("resources", [])
            for verb in rule["verbs"]
        } | {
            Permission(None, None, verb, url=url)
            for rule in self.rules
            for url in rule.get("nonResourceURLs", [])
            for verb in rule["verbs"]
        }


def rendered(directory: str) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is needed to render deploy/ (it ships with these machines' image)"
    result = subprocess.run(
        [kubectl, "kustomize", str(ROOT / directory)], capture_output=True, text=True, timeout=60, check=True
    )
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def operator_rules(objects: list[dict[str, Any]]) -> Rules:
    """The rules of every ClusterRole bound to the operator's ServiceAccount."""
    bound = {
        binding["roleRef"]["name"]
        for binding in objects
        if binding["kind"] == "ClusterRoleBinding"
        and any(subject["name"] == SERVICE_ACCOUNT for subject in binding["subjects"])
    }
    roles = [o for o in objects if o["kind"] == "ClusterRole" and o["metadata"]["name"] in bound]
    assert ROLE in {role["metadata"]["name"] for role in roles}
    rules = [rule for role in roles for rule in role["rules"]]
    for rule in rules:
        # Least privilege starts with naming things: no wildcards anywhere.
        for key in ("apiGroups", "resources", "verbs", "nonResourceURLs"):
            assert "*" not in rule.get(key, []), rule
    return Rules(tuple(rules))


@pytest.fixture(scope="module")
def rules() -> Rules:
    return operator_rules(rendered("deploy"))


def describe(permissions: Iterable[Permission]) -> str:
    return ", ".join(sorted(str(p) for p in permissions)) or "nothing"


# -- observed: the operator's own requests ------------------------------------------------------------


def cr(name: str, namespace: str, **spec: Any) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": namespace}, "spec": spec}


async def exercise(w: World) -> None:
    """A short life of three resources: create, become Ready or Stalled, edit, delete through the finalizer."""
    w.kube.add_service_account("default", "builder")
    await w.apply(cr("puller", "shop", mode="ClaimMatch", parent=w.org))
    await w.apply(cr("builder", "default", mode="Static", parent=w.org, serviceAccountName="builder"))
    await w.apply(cr("greedy", "shop", parent=w.org, roles=["owner"]))
    first = (await w.wait_ready("shop", "puller"))["status"]["identityId"]
    await w.wait_ready("default", "builder")
    await w.wait_condition("shop", "greedy", "Stalled", "True", reason="RoleNotAllowed")

    # An edit that replaces the identity, so the existing ConfigMap is patched with the new ID.
    await w.apply(cr("puller", "shop", mode="Static", parent=w.org))

    async def replaced() -> dict[str, str] | None:
        data = await w.config_map("shop", "puller-chainguard-identity")
        return data if data and data["CHAINGUARD_IDENTITY"] != first else None

    await w.wait_for(replaced, what="the ConfigMap to name the replacement identity")
    await w.wait_ready("shop", "puller")

    # A rename of the ConfigMap: the new one is written, then the old one is deleted.
    await w.apply(cr("puller", "shop", mode="Static", parent=w.org, configMap={"name": "puller-renamed"}))

    async def renamed() -> bool:
        return await w.config_map("shop", "puller-chainguard-identity") is None

    await w.wait_for(renamed, what="the old ConfigMap to be deleted")
    assert await w.config_map("shop", "puller-renamed") is not None

    await w.delete("default", "builder")

    async def gone() -> bool:
        return await w.get("default", "builder") is None

    await w.wait_for(gone, what="the finalizer to release default/builder")


Observed = list[tuple[str, str, str, dict[str, str]]]


@contextlib.contextmanager
def tagged_test_requests() -> Iterator[None]:
    """The test's own requests (apply, get, delete through ``World.client``) carry their own User-Agent."""
    original = World.client

    def tagged_client(self: World) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.kube_url, timeout=10, headers={"User-Agent": TEST_USER_AGENT})

    World.client = tagged_client  # type: ignore[method-assign]
    try:
        yield
    finally:
        World.client = original  # type: ignore[method-assign]


async def run_and_record() -> list[Any]:
    async with world() as w:
        await exercise(w)
        return list(w.kube)  # a kmock handler iterates over the requests it has served


@pytest.fixture(scope="module")
def observed() -> Observed:
    """(user agent, method, path, query) of every request the emulator served during ``exercise``.
    One run for the module (a sync fixture with its own event loop), shared by the tests below."""
    with tagged_test_requests():
        return requests_of(asyncio.run(run_and_record()))


def operator_permissions(observed: Observed) -> set[Permission | None]:
    return {
        permission(method, path, params)
        for agent, method, path, params in observed
        if agent.startswith(OPERATOR_AGENTS)
    }


def requests_of(served: list[Any]) -> Observed:
    return [
        (r.headers.get("User-Agent", ""), str(r.method.value), r.url.path, dict(r.params or {}))
        for r in served
    ]


def test_every_request_is_attributed(observed: Observed) -> None:
    """No request escapes the check by coming from an unknown client."""
    for agent, method, path, _params in observed:
        if agent.startswith(OPERATOR_AGENTS) or agent == TEST_USER_AGENT:
            continue
        assert agent.startswith(STS_EMULATOR_AGENT), f"{method} {path} from unknown client {agent!r}"
        assert path in ("/.well-known/openid-configuration", "/openid/v1/jwks"), path
    assert any(agent.startswith("kopf/") for agent, *_ in observed)
    assert any(agent.startswith("OpenAPI-Generator/") for agent, *_ in observed)


def test_the_role_allows_every_request_the_operator_made(observed: Observed, rules: Rules) -> None:
    used = {p for p in operator_permissions(observed) if p is not None}
    missing = {p for p in used if not rules.allows(p)}
    assert not missing, f"deploy/ does not grant: {describe(missing)}"


def test_the_role_grants_nothing_the_operator_does_not_use(observed: Observed, rules: Rules) -> None:
    used = {p for p in operator_permissions(observed) if p is not None}
    unused = {
        p for p in rules.granted() if p not in used and (p.group, p.resource, p.verb) not in NOT_EXERCISED
    }
    assert not unused, f"deploy/ grants what the operator never used: {describe(unused)}"
    stale = {key for key in NOT_EXERCISED if Permission(*key) in used}
    assert not stale, f"remove from NOT_EXERCISED, the run uses them: {stale}"


# -- the HA overlay: kopf peering -----------------------------------------------------------------------


async def run_peered(
    peering: str, peering_manifests: list[dict[str, Any]]
) -> tuple[list[Any], dict[str, Any]]:
    """The operator as one replica of deploy/ha runs it: ``run --peering NAME`` against the peering CRD and
    object from the overlay. Returns the served requests and the peering object's status at the end."""
    async with world(start=False) as w:
        for manifest in peering_manifests:
            if manifest["kind"] == "CustomResourceDefinition":
                w.kube.install_crd(manifest)
        (peering_object,) = [m for m in peering_manifests if m["kind"] == "ClusterKopfPeering"]
        assert peering_object["metadata"]["name"] == peering
        url = f"/apis/{peering_object['apiVersion']}/clusterkopfpeerings"
        async with w.client() as client:
            (await client.post(url, json=peering_object)).raise_for_status()

        operator = OperatorThread(
            Runtime.from_settings(w.settings, clock=w.clock), standalone=False, peering_name=peering
        )
        await operator.up()
        try:
            # A lone replica is active: it reconciles.
            await w.apply(cr("puller", "shop", parent=w.org))
            await w.wait_ready("shop", "puller")

            async def keepalive() -> dict[str, Any] | None:
                async with w.client() as client:
                    found = (await client.get(f"{url}/{peering}")).json()
                status: dict[str, Any] | None = found.get("status")
                return status

            status = await w.wait_for(keepalive, what="the replica's keep-alive in the peering object")
        finally:
            await operator.down()
        return list(w.kube), status


def test_the_ha_overlay_grants_what_kopf_peering_uses_and_no_more() -> None:
    objects = rendered("deploy/ha")
    rules = operator_rules(objects)
    (deployment,) = [o for o in objects if o["kind"] == "Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    peering = container["args"][container["args"].index("--peering") + 1]
    manifests = [
        o for o in objects if o["metadata"]["name"] == peering or o["kind"] == "CustomResourceDefinition"
    ]
    manifests = [
        m for m in manifests if m["kind"] != "CustomResourceDefinition" or m["spec"]["group"] == "kopf.dev"
    ]

    with tagged_test_requests():
        served, status = asyncio.run(run_peered(peering, manifests))
    assert len(status) == 1, "one replica, one keep-alive entry"

    used = {p for p in operator_permissions(requests_of(served)) if p is not None}
    missing = {p for p in used if not rules.allows(p)}
    assert not missing, f"deploy/ha does not grant: {describe(missing)}"
    peering_granted = {p for p in rules.granted() if p.group == "kopf.dev"}
    assert peering_granted, "deploy/ha grants nothing on kopf's peering resources"
    assert peering_granted <= used, f"deploy/ha grants unused: {describe(peering_granted - used)}"


def test_two_replicas_of_the_ha_overlay_keep_one_active() -> None:
    """Two operators as deploy/ha runs them (peering on, settings as the ``run`` command leaves them):
    one must serve while the other stands by."""
    objects = rendered("deploy/ha")
    peering_manifests = [
        o
        for o in objects
        if o["kind"] == "ClusterKopfPeering"
        or (o["kind"] == "CustomResourceDefinition" and o["spec"]["group"] == "kopf.dev")
    ]

    async def two_replicas() -> None:
        async with world(start=False) as w:
            for manifest in peering_manifests:
                if manifest["kind"] == "CustomResourceDefinition":
                    w.kube.install_crd(manifest)
            (peering_object,) = [m for m in peering_manifests if m["kind"] == "ClusterKopfPeering"]
            async with w.client() as client:
                url = f"/apis/{peering_object['apiVersion']}/clusterkopfpeerings"
                (await client.post(url, json=peering_object)).raise_for_status()
            replicas = [
                OperatorThread(
                    Runtime.from_settings(w.settings, clock=w.clock),
                    standalone=False,
                    peering_name=peering_object["metadata"]["name"],
                    identity=f"replica-{index}",
                )
                for index in range(2)
            ]
            for replica in replicas:
                await replica.up()
            try:
                await w.apply(cr("puller", "shop", parent=w.org))
                await w.wait_ready("shop", "puller", timeout=10)
            finally:
                for replica in replicas:
                    await replica.down()

    asyncio.run(two_replicas())


# -- static: the client layer's calls -----------------------------------------------------------------


class Recorded(Exception):
    """Raised instead of sending: the request has been recorded."""


class RecordingApiClient(kubernetes.client.ApiClient):  # type: ignore[misc]
    """Records (method, path, query) of a request instead of sending it."""

    def __init__(self) -> None:
        super().__init__(kubernetes.client.Configuration())
        self.calls: list[tuple[str, str, dict[str, str]]] = []

    def call_api(self, method: str, url: str, *args: Any, **kwargs: Any) -> Any:
        parts = urllib.parse.urlsplit(url)
        self.calls.append((method, parts.path, dict(urllib.parse.parse_qsl(parts.query))))
        raise Recorded


def api_calls_in_cluster_py() -> list[tuple[str, str, list[ast.expr]]]:
    """(API class name, method name, positional args) of every ``self._x.method(...)`` in cluster.py, with
    the class taken from the ``self._x = kubernetes.client.SomeApi(...)`` assignment."""
    tree = ast.parse(inspect.getsource(cluster))
    apis: dict[str, str] = {}
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Assign)
            and isinstance(node.value, ast.Call)
            and isinstance(node.value.func, ast.Attribute)
            and node.value.func.attr.endswith("Api")
        ):
            for target in node.targets:
                if isinstance(target, ast.Attribute):
                    apis[target.attr] = node.value.func.attr

    def api_method(node: ast.AST) -> tuple[str, str] | None:
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Attribute)
            and node.value.attr in apis
            and isinstance(node.value.value, ast.Name)
            and node.value.value.id == "self"
        ):
            return apis[node.value.attr], node.attr
        return None

    calls: dict[tuple[str, str], list[ast.expr]] = {}
    for node in ast.walk(tree):
        # A method passed along uncalled (``self._openid.get_...``) counts too, with no arguments known.
        found = api_method(node)
        if found is not None:
            calls.setdefault(found, [])
        if isinstance(node, ast.Call) and (found := api_method(node.func)) is not None:
            calls[found] = list(node.args)
    return [(api, method, args) for (api, method), args in calls.items()]


def argument_value(node: ast.expr | None, name: str) -> Any:
    """A constant of cluster.py (GROUP, PLURAL, ...) where the call names one, else a stand-in."""
    if isinstance(node, ast.Name) and isinstance(getattr(cluster, node.id, None), str):
        return getattr(cluster, node.id)
    if isinstance(node, ast.Constant):
        return node.value
    return {} if name == "body" else f"some-{name.replace('_', '-')}"


def test_the_client_layer_s_calls_are_all_granted(rules: Rules) -> None:
    calls = api_calls_in_cluster_py()
    assert calls, "cluster.py makes no Kubernetes API calls? The AST walk is broken."
    needed: set[Permission] = set()
    for api_name, method_name, args in calls:
        recorder = RecordingApiClient()
        api = getattr(kubernetes.client, api_name)(recorder)
        # The generated method without its pydantic argument validation: stand-in bodies are enough here.
        method = getattr(type(api), method_name).raw_function
        parameters = [
            p
            for p in inspect.signature(method).parameters.values()
            if p.kind is p.POSITIONAL_OR_KEYWORD and p.default is p.empty and p.name != "self"
        ]
        values = [
            argument_value(args[i] if i < len(args) else None, p.name) for i, p in enumerate(parameters)
        ]
        with pytest.raises(Recorded):
            method(api, *values)
        ((http_method, path, query),) = recorder.calls
        wanted = permission(http_method, path, query)
        assert wanted is not None, f"{api_name}.{method_name} is API discovery?"
        needed.add(wanted)
    # What the pull secret and the exchange check need is granted per namespace by the tenant, with the
    # Role access.required_role renders (the operator's ClusterRole has none of it); stand-in names.
    tenant = Rules(
        tuple(
            {**rule, "resourceNames": ["some-name"]} if "resourceNames" in rule else rule
            for rule in access.required_role(
                namespace="some-namespace",
                service_account="some-name",
                pull_secret=PullSecretSpec(name="some-name", attach_to_service_account=True),
                operator_namespace="chainguard-system",
                operator_service_account=SERVICE_ACCOUNT,
                resource="some-name",
            )[0]["rules"]
        )
    )
    missing = {p for p in needed if not rules.allows(p) and not tenant.allows(p)}
    assert not missing, (
        f"cluster.py calls what neither deploy/ nor the tenant's Role grants: {describe(missing)}"
    )
    assert not any(
        rules.allows(p)
        for p in needed
        if tenant.allows(p) and p.resource in ("secrets", "serviceaccounts/token")
    ), "deploy/ grants the operator Secrets or service-account tokens cluster-wide"
    # The client layer's calls are the operator's own; kopf adds watching and its finalizer patches.
    assert Permission(crd.GROUP, f"{crd.PLURAL}/status", "patch") in needed
    assert Permission("", "configmaps", "create") in needed
    assert Permission(None, None, "get", url="/openid/v1/jwks") in needed


def test_the_request_mapping_follows_kubernetes_url_rules() -> None:
    """The mapper the two checks above rely on, on the URL shapes the operator and kopf use."""
    ns = "/api/v1/namespaces/shop"
    cgids = f"/apis/{crd.GROUP}/{crd.VERSION}"
    assert permission("GET", f"{ns}/configmaps/x", {}) == Permission("", "configmaps", "get")
    assert permission("PATCH", f"{ns}/configmaps/x", {}) == Permission("", "configmaps", "patch")
    assert permission("POST", f"{ns}/events", {}) == Permission("", "events", "create")
    assert permission("GET", f"{cgids}/{crd.PLURAL}", {}) == Permission(crd.GROUP, crd.PLURAL, "list")
    assert permission("GET", f"{cgids}/{crd.PLURAL}", {"watch": "true"}) == Permission(
        crd.GROUP, crd.PLURAL, "watch"
    )
    status = f"{cgids}/namespaces/shop/{crd.PLURAL}/x/status"
    assert permission("PATCH", status, {}) == Permission(crd.GROUP, f"{crd.PLURAL}/status", "patch")
    assert permission("DELETE", f"{ns}/configmaps", {}) == Permission("", "configmaps", "deletecollection")
    assert permission("PUT", "/api/v1/namespaces/shop", {}) == Permission("", "namespaces", "update")
    assert permission("PUT", "/api/v1/namespaces/shop/finalize", {}) == Permission(
        "", "namespaces/finalize", "update"
    )
    assert permission("GET", "/openid/v1/jwks", {}) == Permission(None, None, "get", url="/openid/v1/jwks")
    for discovery in ("/api", "/api/v1", "/apis", f"/apis/{crd.GROUP}", cgids, "/version"):
        assert permission("GET", discovery, {}) is None, discovery
