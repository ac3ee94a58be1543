"""One Deployment per set of namespaces: the shard overlays ``examples/shards/a`` and ``b``, rendered by the
real ``kubectl kustomize`` and run side by side on one cluster (docs/ADMIN.md, "Sizing and sharding").

- **Rendered**: each shard is a whole install that validates against the Kubernetes schemas; what both
  render under one (kind, namespace, name) — the CRD, and only the CRD — is identical; the names of
  everything else, the Deployments' and Services' selectors, and each ClusterRoleBinding's subject are the
  shard's own; the ``CGID_NAMESPACES`` lists are disjoint and each holds its shard's namespace; the settings
  name the shard's ServiceAccount and are accepted by the operator.
- **At run time, on the run's real control plane**: both shards' Namespace, CRD, ServiceAccount and RBAC
  are applied as rendered (server-side, one field manager per shard, as two ``kubectl apply -k`` or two
  Argo CD applications would: a field of the CRD that both set, to different values, would conflict).
  Both operators then run at once in this process, each with its shard's rendered settings and *as its
  shard's ServiceAccount*, against one Chainguard emulator in which each shard has its own bootstrapped
  identity. Each adopts its own identity
  from its namespace and makes the identities of its tenants' namespaces; neither reports, creates, names
  or deletes anything of the other's (its metrics and every Chainguard call it makes, told apart by the
  identity it authenticates as); a resource in a namespace no shard lists stays untouched.
- **HA inside a shard** (on the Kubernetes emulator): the KopfPeering recipe as docs/ADMIN.md prints it,
  two replicas of shard a with ``--peering``: both announce themselves in every watched namespace's
  KopfPeering, exactly one serves, the other takes over when it stops, and kopf uses only the verbs the
  recipe's ClusterRole grants.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import functools
import pathlib
import re
import secrets
import shutil
import subprocess
from collections.abc import Mapping
from typing import Any

import httpx
import kubernetes_validate
import pytest
import yaml

from cgid_testkit.chainguard import ChainguardEmulator, RecordedRequest
from cgid_testkit.controlplane import ControlPlane, wait_established
from cgid_testkit.harness import CR_PATH, ORG_NAME, Clock, OperatorThread, RealKube, wait_until, world
from cgid_testkit.tools import kubectl
from chainguard_identity_operator import crd, handlers
from chainguard_identity_operator.config import PREFIX, Settings
from chainguard_identity_operator.runtime import Runtime

ROOT = pathlib.Path(__file__).resolve().parents[2]
SHARDS = ("a", "b")
ADMIN = ROOT / "docs" / "ADMIN.md"
# What the runtime test installs from each rendered shard: the operators run in this process, not in pods.
INSTALLED_KINDS = (
    "Namespace",
    "CustomResourceDefinition",
    "ServiceAccount",
    "ClusterRole",
    "ClusterRoleBinding",
)
# kopf's bookkeeping on a resource it has handled (handlers.configure_kopf).
KOPF_ANNOTATIONS = f"{handlers.KOPF_PREFIX}/"
IDENTITY_PATH = "/iam/v2/identities/"
# kopf's namespaced peering resource (kopf._cogs.structs.references.NAMESPACED_PEERINGS_K).
PEERING_GROUP, PEERING_PLURAL = "kopf.dev", "kopfpeerings"

Manifest = dict[str, Any]

pytestmark = pytest.mark.timeout(60)


# -- rendering ----------------------------------------------------------------------------------------


@functools.cache
def render_directory(directory: str) -> tuple[Manifest, ...]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl renders the overlays (it ships with these machines' image)"
    result = subprocess.run(
        [kubectl, "kustomize", str(ROOT / directory)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def render(shard: str) -> tuple[Manifest, ...]:
    return render_directory(f"examples/shards/{shard}")


def key(obj: Manifest) -> tuple[str, str | None, str]:
    return obj["kind"], obj["metadata"].get("namespace"), obj["metadata"]["name"]


def one(objects: tuple[Manifest, ...], kind: str) -> Manifest:
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def pod_labels(objects: tuple[Manifest, ...]) -> dict[str, str]:
    labels: dict[str, str] = one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    return labels


def environment(objects: tuple[Manifest, ...]) -> dict[str, str]:
    """The CGID_ variables the shard's container starts with: its ConfigMap, then its own env, with the
    downward API's namespace resolved to the Deployment's."""
    deployment = one(objects, "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        (config_map,) = [
            o
            for o in objects
            if o["kind"] == "ConfigMap" and o["metadata"]["name"] == source["configMapRef"]["name"]
        ]
        env.update(config_map.get("data") or {})
    for item in container.get("env", []):
        field = (item.get("valueFrom") or {}).get("fieldRef", {}).get("fieldPath")
        if "value" in item:
            env[item["name"]] = item["value"]
        elif field == "metadata.namespace":
            env[item["name"]] = deployment["metadata"]["namespace"]
    return {name: value for name, value in env.items() if name.startswith(PREFIX)}


def watched(objects: tuple[Manifest, ...]) -> list[str]:
    return [name.strip() for name in environment(objects)[f"{PREFIX}NAMESPACES"].split(",") if name.strip()]


# -- what the overlays render -------------------------------------------------------------------------


@pytest.mark.parametrize("shard", SHARDS)
def test_each_shard_is_a_whole_install_that_validates(shard: str) -> None:
    objects = render(shard)
    assert sorted(o["kind"] for o in objects) == sorted(
        [*INSTALLED_KINDS, "ConfigMap", "Deployment", "Service"]
    )
    for obj in objects:
        if obj["kind"] == "CustomResourceDefinition":
            continue  # the generated CRD: tests/unit/test_crd.py holds it to the schema
        try:
            kubernetes_validate.validate(obj, kubernetes_validate.latest_version(), strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"shard {shard}: {obj['kind']}/{obj['metadata']['name']}: {exc.message}")
    namespace = one(objects, "Namespace")["metadata"]["name"]
    namespaced = [o for o in objects if o["kind"] in ("ServiceAccount", "ConfigMap", "Deployment", "Service")]
    assert {o["metadata"]["namespace"] for o in namespaced} == {namespace}


def test_what_the_shards_share_is_identical_and_is_only_the_crd() -> None:
    by_key = {shard: {key(o): o for o in render(shard)} for shard in SHARDS}
    assert all(len(index) == len(render(shard)) for shard, index in by_key.items()), "duplicate objects"
    shared = by_key["a"].keys() & by_key["b"].keys()
    the_crd = ("CustomResourceDefinition", None, crd.NAME)
    assert shared == {the_crd}, "kustomize renamed the CRD, or the shards clash on another object"
    assert by_key["a"][the_crd] == by_key["b"][the_crd], "the shards disagree on the CRD"
    # ... and it is the very CRD deploy/ installs: a shard beside it, or after it, changes nothing.
    assert by_key["a"][the_crd] == one(render_directory("deploy"), "CustomResourceDefinition")


def test_each_shard_selects_binds_and_names_only_its_own() -> None:
    a, b = render("a"), render("b")
    for kind in ("ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Deployment", "Service", "Namespace"):
        assert key(one(a, kind)) != key(one(b, kind)), f"both shards render the same {kind}"
    for own, other in ((a, b), (b, a)):
        labels, other_labels = pod_labels(own), pod_labels(other)
        deployment = one(own, "Deployment")
        for selector in (
            deployment["spec"]["selector"]["matchLabels"],
            one(own, "Service")["spec"]["selector"],
        ):
            assert selector.items() <= labels.items(), "a selector that misses its own pods"
            assert not selector.items() <= other_labels.items(), (
                "a selector that picks the other shard's pods"
            )
        account = one(own, "ServiceAccount")["metadata"]
        assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == account["name"]
        assert (
            account["namespace"]
            == deployment["metadata"]["namespace"]
            == one(own, "Namespace")["metadata"]["name"]
        )
        binding = one(own, "ClusterRoleBinding")
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": account["name"], "namespace": account["namespace"]}
        ]
        assert binding["roleRef"]["name"] == one(own, "ClusterRole")["metadata"]["name"]


def test_each_shard_watches_its_own_namespaces_as_its_own_service_account() -> None:
    lists = {shard: watched(render(shard)) for shard in SHARDS}
    assert not set(lists["a"]) & set(lists["b"]), (
        f"two shards would both reconcile {set(lists['a']) & set(lists['b'])}"
    )
    for shard in SHARDS:
        objects = render(shard)
        env = environment(objects)
        namespace = one(objects, "Namespace")["metadata"]["name"]
        assert len(lists[shard]) == len(set(lists[shard])) > 1, lists[shard]
        # The shard's own ChainguardIdentity (keeping its operator identity alive) lives in its namespace.
        assert namespace in lists[shard]
        assert env[f"{PREFIX}OPERATOR_NAMESPACE"] == namespace
        assert env[f"{PREFIX}OPERATOR_SERVICE_ACCOUNT"] == one(objects, "ServiceAccount")["metadata"]["name"]
        assert env[f"{PREFIX}IDENTITY_CONFIG_MAP"], "the base's own-identity ConfigMap setting was lost"
        # The operator accepts the rendered settings (an unknown CGID_ name would stop it at start).
        settings = Settings.from_env({**env, f"{PREFIX}IDENTITY": f"{'0' * 40}/{'1' * 16}"})
        assert settings.namespaces == tuple(lists[shard])
        assert settings.operator_service_account == one(objects, "ServiceAccount")["metadata"]["name"]


# -- two shards on one real cluster -------------------------------------------------------------------


@dataclasses.dataclass
class RunningShard:
    name: str
    namespace: str
    service_account: str
    watched: list[str]
    identity: str  # the shard's own Chainguard identity, bootstrapped for its ServiceAccount
    runtime: Runtime
    operator: OperatorThread

    @property
    def tenants(self) -> list[str]:
        return [namespace for namespace in self.watched if namespace != self.namespace]


def reported(runtime: Runtime) -> set[tuple[str, str]]:
    """The (namespace, name)s the operator's /metrics report a readiness for: what it has reconciled."""
    pattern = re.compile(r'^chainguard_identity_ready\{name="([^"]+)",namespace="([^"]+)"\}', re.MULTILINE)
    return {(namespace, name) for name, namespace in pattern.findall(runtime.metrics.render())}


async def wait_reported(runtime: Runtime, expected: set[tuple[str, str]], *, who: str) -> None:
    """Until the operator's metrics report at least ``expected`` (a pass records its outcome there just
    after it patched the status), then: exactly ``expected``."""

    async def caught_up() -> bool:
        return reported(runtime) >= expected

    await wait_until(caught_up, what=f"{who}'s metrics to report {sorted(expected)}")
    assert reported(runtime) == expected, f"{who} reconciled {sorted(reported(runtime) - expected)} too"


async def get(client: httpx.AsyncClient, namespace: str, name: str) -> Manifest | None:
    response = await client.get(f"{CR_PATH.format(namespace=namespace)}/{name}")
    if response.status_code == 404:
        return None
    response.raise_for_status()
    found: Manifest = response.json()
    return found


async def wait_ready(client: httpx.AsyncClient, namespace: str, name: str) -> Manifest:
    async def probe() -> Manifest | None:
        obj = await get(client, namespace, name)
        status = (obj or {}).get("status") or {}
        ready = [c for c in status.get("conditions", []) if c.get("type") == "Ready"]
        if obj and ready and ready[0]["status"] == "True":
            return obj if status.get("observedGeneration") == obj["metadata"]["generation"] else None
        return None

    return await wait_until(probe, what=f"{namespace}/{name} to be Ready")


async def service_account_may_watch(client: httpx.AsyncClient, shard: RunningShard) -> bool:
    """A new ClusterRoleBinding reaches the authorizer a moment after it is stored."""
    review = {
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SubjectAccessReview",
        "spec": {
            "user": f"system:serviceaccount:{shard.namespace}:{shard.service_account}",
            "groups": ["system:serviceaccounts", f"system:serviceaccounts:{shard.namespace}"],
            "resourceAttributes": {
                "group": crd.GROUP,
                "resource": crd.PLURAL,
                "verb": "watch",
                "namespace": shard.tenants[0],
            },
        },
    }
    answer = await client.post("/apis/authorization.k8s.io/v1/subjectaccessreviews", json=review)
    answer.raise_for_status()
    return bool((answer.json().get("status") or {}).get("allowed"))


async def start_shard(
    name: str,
    kube: RealKube,
    chainguard: ChainguardEmulator,
    org: str,
    clock: Clock,
    workdir: pathlib.Path,
) -> RunningShard:
    """Bootstrap the shard's own identity (the private-cluster recipe, for *its* ServiceAccount) and make
    its operator (the caller starts it): the rendered settings, and the API server's answers to that
    ServiceAccount."""
    objects = render(name)
    deployment = one(objects, "Deployment")
    namespace = deployment["metadata"]["namespace"]
    account = deployment["spec"]["template"]["spec"]["serviceAccountName"]
    identity = chainguard.add_operator_identity(
        org,
        issuer=kube.issuer,
        subject=f"system:serviceaccount:{namespace}:{account}",
        jwks=await kube.jwks(),
        expires=clock() + datetime.timedelta(days=30),
        name=f"chainguard-identity-operator-{name}",
        description=f"shard {name}'s own identity (bootstrap)",
    )
    token = workdir / f"oidc-token-{name}"
    token.write_text(
        await kube.mint_token(namespace, account, audiences=["issuer.enforce.dev"], expiration_seconds=3600)
    )
    kubeconfig = workdir / f"kubeconfig-{name}"
    await kube.write_operator_kubeconfig(kubeconfig, namespace, account)
    # The pod's settings as rendered; only what differs outside a pod is replaced.
    settings = Settings.from_env(
        {
            **environment(objects),
            f"{PREFIX}IDENTITY": identity,
            f"{PREFIX}API_URL": chainguard.api_url,
            f"{PREFIX}ISSUER_URL": chainguard.sts_url,
            f"{PREFIX}IDENTITY_TOKEN_PATH": str(token),
            f"{PREFIX}SERVICE_ACCOUNT_TOKEN_PATH": str(token),
            f"{PREFIX}KUBECONFIG": str(kubeconfig),
            f"{PREFIX}METRICS_PORT": "0",  # the two operators share this process's ports
            f"{PREFIX}LIVENESS_PORT": "0",
            f"{PREFIX}BASE_BACKOFF": "200ms",
            f"{PREFIX}MAX_BACKOFF": "2s",
        }
    )
    runtime = Runtime.from_settings(settings, clock=clock)
    # As the run command starts it: namespaced, standalone (deploy/ has no peering).
    operator = OperatorThread(runtime, clusterwide=False, namespaces=list(settings.namespaces))
    return RunningShard(name, namespace, account, list(settings.namespaces), identity, runtime, operator)


def own_identity_resource(shard: RunningShard, org: str) -> Manifest:
    """examples/operator-identity.yaml, as the shard's admin adapts it: the shard's namespace and account."""
    manifest: Manifest = yaml.safe_load(
        (ROOT / "examples" / "operator-identity.yaml").read_text(encoding="utf-8")
    )
    manifest["metadata"]["namespace"] = shard.namespace
    manifest["spec"].update(parent=org, adopt=shard.identity, serviceAccountName=shard.service_account)
    return manifest


def puller(namespace: str, org: str) -> Manifest:
    return {
        "apiVersion": f"{crd.GROUP}/{crd.VERSION}",
        "kind": crd.KIND,
        "metadata": {"name": "puller", "namespace": namespace},
        "spec": {"parent": org, "mode": "Static", "roles": ["registry.pull"]},
    }


async def create(client: httpx.AsyncClient, manifest: Manifest) -> None:
    response = await client.post(CR_PATH.format(namespace=manifest["metadata"]["namespace"]), json=manifest)
    response.raise_for_status()


def calls_by(chainguard: ChainguardEmulator, identity: str) -> list[RecordedRequest]:
    return [r for r in chainguard.requests if r.subject == identity]


def names_any(request: RecordedRequest, uids: set[str]) -> bool:
    text = " ".join([request.path, *(value for values in request.query.values() for value in values)])
    return any(uid in text for uid in uids)


async def test_two_shards_on_one_cluster_each_serve_only_their_own_namespaces(
    control_plane: ControlPlane, tmp_path: pathlib.Path
) -> None:
    plane = control_plane
    clock = Clock()
    kube = RealKube(plane, clock)
    for name in SHARDS:
        # One field manager per shard, no --force-conflicts: a CRD field the shards set apart would conflict.
        installed = [o for o in render(name) if o["kind"] in INSTALLED_KINDS]
        await kubectl(
            plane.kubeconfig,
            "apply",
            "--server-side",
            f"--field-manager=cgid-shard-{name}",
            "-f",
            "-",
            stdin=yaml.safe_dump_all(installed),
        )
    unsharded = f"unsharded-{secrets.token_hex(3)}"
    tenant_namespaces = [
        n for s in SHARDS for n in watched(render(s)) if n != one(render(s), "Namespace")["metadata"]["name"]
    ]
    async with kube.client() as client:
        await wait_established(client, crd.NAME)
        await asyncio.gather(*(kube.add_namespace(n) for n in [*tenant_namespaces, unsharded]))

    shards: list[RunningShard] = []
    resources: list[Manifest] = []
    async with (
        ChainguardEmulator(clock=clock, issuer_ssl=kube.issuer_ssl) as chainguard,
        kube.client() as client,
    ):
        org = chainguard.add_group(ORG_NAME, verified=True)
        stray = puller(unsharded, org)
        try:
            for name in SHARDS:
                shards.append(await start_shard(name, kube, chainguard, org, clock, tmp_path))
            for shard in shards:
                await wait_until(
                    functools.partial(service_account_may_watch, client, shard),
                    what=f"RBAC to grant shard {shard.name}'s ServiceAccount its ClusterRole",
                )
            # A resource in a namespace no shard lists, before anything else: a shard watching more than
            # its list would have handled it by the time the others are Ready.
            await create(client, stray)
            await asyncio.gather(*(shard.operator.up(timeout=30) for shard in shards))

            for shard in shards:
                resources.append(own_identity_resource(shard, org))
                resources += [puller(namespace, org) for namespace in shard.tenants]
            for manifest in resources:
                await create(client, manifest)
            ready = {
                (obj["metadata"]["namespace"], obj["metadata"]["name"]): obj
                for obj in await asyncio.gather(
                    *(
                        wait_ready(client, m["metadata"]["namespace"], m["metadata"]["name"])
                        for m in resources
                    )
                )
            }

            # Each operator reconciled exactly its own namespaces' resources.
            for shard in shards:
                mine = {
                    (namespace, resource) for (namespace, resource) in ready if namespace in shard.watched
                }
                assert len(mine) == len(shard.watched)
                await wait_reported(shard.runtime, mine, who=f"shard {shard.name}")

            # Nothing touched the resource no shard watches.
            left = await get(client, unsharded, "puller")
            assert left is not None
            assert not left["metadata"].get("finalizers"), left["metadata"]
            assert "status" not in left, left["status"]
            assert not any(k.startswith(KOPF_ANNOTATIONS) for k in left["metadata"].get("annotations") or {})

            # Each shard authenticates as its own identity, adopted from its own namespace, and follows it
            # through its own ConfigMap there.
            identities = {
                shard.name: {shard.identity}
                | {ready[(n, "puller")]["status"]["identityId"] for n in shard.tenants}
                for shard in shards
            }
            for shard in shards:
                own = ready[(shard.namespace, "operator")]["status"]
                assert own["identityId"] == shard.identity
                config_map = (
                    await client.get(
                        f"/api/v1/namespaces/{shard.namespace}/configmaps/"
                        f"{shard.runtime.settings.identity_config_map}"
                    )
                ).json()
                assert config_map["data"]["CHAINGUARD_IDENTITY"] == shard.identity

            # ... and never names, let alone creates or changes, an identity of the other shard's.
            for shard, other in zip(shards, shards[::-1], strict=True):
                calls = calls_by(chainguard, shard.identity)
                creates = [r for r in calls if r.method == "POST" and r.path.startswith(IDENTITY_PATH)]
                assert len(creates) == len(shard.tenants), (
                    f"shard {shard.name} created {len(creates)} identities"
                )
                foreign = [f"{r.method} {r.path}" for r in calls if names_any(r, identities[other.name])]
                assert not foreign, f"shard {shard.name} addressed shard {other.name}'s identities: {foreign}"

            # Deleting a tenant's resource: its own shard's finalizer deletes its identity.
            pullers = [m for m in resources if m["metadata"]["name"] == "puller"]
            for manifest in [*pullers, stray]:
                meta = manifest["metadata"]
                (
                    await client.delete(f"{CR_PATH.format(namespace=meta['namespace'])}/{meta['name']}")
                ).raise_for_status()

            async def all_gone() -> bool:
                found = [await get(client, m["metadata"]["namespace"], "puller") for m in [*pullers, stray]]
                return not any(found)

            await wait_until(all_gone, what="the pullers to be finalized")
            for shard in shards:
                deleted = {
                    r.path.removeprefix(IDENTITY_PATH)
                    for r in calls_by(chainguard, shard.identity)
                    if r.method == "DELETE" and r.path.startswith(IDENTITY_PATH)
                }
                assert deleted == identities[shard.name] - {shard.identity}

            # The shards' own resources say deletionPolicy: Orphan: their finalizers leave the identities.
            for shard in shards:
                path = f"{CR_PATH.format(namespace=shard.namespace)}/operator"
                (await client.delete(path)).raise_for_status()

            async def own_gone() -> bool:
                return not any([await get(client, shard.namespace, "operator") for shard in shards])

            await wait_until(own_gone, what="the shards' own resources to be finalized")
            assert all(shard.identity in chainguard.identities for shard in shards)
        finally:
            await release(client, shards, [*resources, stray], [*tenant_namespaces, unsharded])


async def release(
    client: httpx.AsyncClient, shards: list[RunningShard], resources: list[Manifest], namespaces: list[str]
) -> None:
    """After the test, passed or not: delete what is left while the operators run (so that their
    finalizers complete), strip what they did not finalize, stop them, then delete the namespaces and the
    shards' cluster-scoped objects. The CRD stays: the session shares it."""
    running = [shard for shard in shards if shard.operator.is_alive()]
    for manifest in resources:
        meta = manifest["metadata"]
        await client.delete(f"{CR_PATH.format(namespace=meta['namespace'])}/{meta['name']}")

    async def finalized() -> bool:
        return not any(
            [await get(client, m["metadata"]["namespace"], m["metadata"]["name"]) for m in resources]
        )

    try:
        if running:
            with contextlib.suppress(AssertionError):  # the test has checked finalizers already
                await wait_until(finalized, what="the shards' resources to be finalized", timeout=15)
    finally:
        for manifest in resources:  # what a stopped operator left
            meta = manifest["metadata"]
            await client.patch(
                f"{CR_PATH.format(namespace=meta['namespace'])}/{meta['name']}",
                json={"metadata": {"finalizers": None}},
                headers={"Content-Type": "application/merge-patch+json"},
            )
        await asyncio.gather(*(shard.operator.down() for shard in running))
        cluster_scoped = [
            o for s in SHARDS for o in render(s) if o["kind"] in ("ClusterRole", "ClusterRoleBinding")
        ]
        paths = [f"/api/v1/namespaces/{n}" for n in namespaces]
        paths += [f"/api/v1/namespaces/{one(render(s), 'Namespace')['metadata']['name']}" for s in SHARDS]
        paths += [
            f"/apis/rbac.authorization.k8s.io/v1/{o['kind'].lower()}s/{o['metadata']['name']}"
            for o in cluster_scoped
        ]
        for path in paths:
            await client.delete(path)


# -- HA inside a shard: namespaced kopf peering ---------------------------------------------------------


def peering_recipe() -> tuple[Manifest, ...]:
    """The YAML block of docs/ADMIN.md that defines the KopfPeering objects: what an admin copies."""
    blocks = re.findall(r"^```yaml\n(.*?)^```", ADMIN.read_text(encoding="utf-8"), re.MULTILINE | re.DOTALL)
    (block,) = [b for b in blocks if "kind: KopfPeering\n" in b]
    return tuple(doc for doc in yaml.safe_load_all(block) if doc)


def peering_verb(method: str, path: str, params: Mapping[str, str]) -> str:
    """The RBAC verb of a request on KopfPeerings (Kubernetes' URL rules, as in test_rbac)."""
    named = path.rstrip("/").rpartition("/")[2] != PEERING_PLURAL
    if method == "GET":
        return "watch" if params.get("watch") in ("true", "1") else ("get" if named else "list")
    return {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}[method]


async def test_two_replicas_of_a_shard_peer_in_each_watched_namespace() -> None:
    recipe = peering_recipe()
    shard = render("a")
    definition = one(recipe, "CustomResourceDefinition")
    assert (definition["spec"]["group"], definition["spec"]["names"]["plural"]) == (
        PEERING_GROUP,
        PEERING_PLURAL,
    )
    assert definition["spec"]["scope"] == "Namespaced"
    peerings = [o for o in recipe if o["kind"] == "KopfPeering"]
    (peering,) = {o["metadata"]["name"] for o in peerings}
    # One KopfPeering in every namespace the shard watches, and the RBAC for the shard's ServiceAccount.
    assert sorted(o["metadata"]["namespace"] for o in peerings) == sorted(watched(shard))
    account = one(shard, "ServiceAccount")["metadata"]
    binding = one(recipe, "ClusterRoleBinding")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account["name"], "namespace": account["namespace"]}
    ]
    role = one(recipe, "ClusterRole")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    (rule,) = role["rules"]
    assert (rule["apiGroups"], rule["resources"]) == ([PEERING_GROUP], [PEERING_PLURAL])

    async with world(start=False) as w:
        w.kube.install_crd(definition)
        for obj in peerings:
            w.kube.add_namespace(obj["metadata"]["namespace"])
            async with w.client() as client:
                url = f"/apis/{obj['apiVersion']}/namespaces/{obj['metadata']['namespace']}/{PEERING_PLURAL}"
                (await client.post(url, json=obj)).raise_for_status()
        settings = dataclasses.replace(w.settings, namespaces=tuple(watched(shard)))
        tenant = next(n for n in watched(shard) if n != account["namespace"])

        def replica(name: str, priority: int) -> tuple[OperatorThread, Runtime]:
            # The run command with --peering and CGID_NAMESPACES. Priorities are given (the command
            # draws random ones, test_rbac's subject) so that the order of events here is known.
            runtime = Runtime.from_settings(settings, clock=w.clock)
            thread = OperatorThread(
                runtime,
                standalone=False,
                peering_name=peering,
                clusterwide=False,
                namespaces=list(settings.namespaces),
                identity=name,
                priority=priority,
            )
            return thread, runtime

        (leader, leading), (standby, standing) = replica("replica-high", 200), replica("replica-low", 100)
        await leader.up()
        try:
            await w.apply({"metadata": {"name": "first", "namespace": tenant}, "spec": {"parent": w.org}})
            await w.wait_ready(tenant, "first")
            await standby.up()

            async def both_announced() -> bool:
                async with w.client() as client:
                    for obj in peerings:
                        url = f"/apis/{obj['apiVersion']}/namespaces/{obj['metadata']['namespace']}/{PEERING_PLURAL}"
                        status = (await client.get(f"{url}/{peering}")).json().get("status") or {}
                        if set(status) != {"replica-high", "replica-low"}:
                            return False
                return True

            await w.wait_for(both_announced, what="both replicas' keep-alives in every watched namespace")
            await w.apply({"metadata": {"name": "second", "namespace": tenant}, "spec": {"parent": w.org}})
            await w.wait_ready(tenant, "second")
            await wait_reported(leading, {(tenant, "first"), (tenant, "second")}, who="the leader")
            assert reported(standing) == set(), "the standby reconciled too"

            # The leader stops (and withdraws its keep-alives): the standby takes over at once.
            await leader.down()

            await wait_reported(standing, {(tenant, "first"), (tenant, "second")}, who="the standby")
        finally:
            for thread in (leader, standby):
                if thread.is_alive():
                    await thread.down()

    # API discovery of kopf.dev (which every user may read) aside: the requests on the objects.
    used = {
        peering_verb(str(r.method.value), r.url.path, dict(r.params or {}))
        for r in list(w.kube)
        if f"/{PEERING_PLURAL}" in r.url.path and r.headers.get("User-Agent", "").startswith("kopf/")
    }
    assert used == set(rule["verbs"]), f"kopf used {sorted(used)}; the recipe grants {rule['verbs']}"
