"""The install manifests: ``kubectl kustomize`` renders ``deploy/`` and ``deploy/ha``, every object validates
against the Kubernetes schemas, and the objects agree with each other and with the operator's code.

The rendering is kubectl's own kustomize (kubectl is part of these machines); validation is
``kubernetes-validate`` with the schemas it ships offline, for the kubectl version here (1.32) and the
newest it knows. Custom objects (the kopf peering object) have no published schema: they must belong to
a CRD rendered alongside them. The cross-checks read the operator's own defaults (``Settings``) and its
command line, so a renamed setting, port or flag breaks this test instead of a pod.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
import shutil
import subprocess
from typing import Any

import kubernetes_validate
import pytest
import yaml

from chainguard_identity_operator import cli, crd
from chainguard_identity_operator.config import PREFIX, Settings

ROOT = pathlib.Path(__file__).resolve().parents[2]
NAMESPACE = "chainguard-system"
NAME = "chainguard-identity-operator"
IDENTITY = "c95870ebffa72a258df087ea727ee92daf177e29/f067a9080d45a098"
KUBERNETES_VERSIONS = ("1.32.0", kubernetes_validate.latest_version())
# kopf's peering resource for cluster-wide operators (kopf._cogs.structs.references.CLUSTER_PEERINGS_K).
PEERING_GROUP, PEERING_PLURAL = "kopf.dev", "clusterkopfpeerings"

Manifest = dict[str, Any]


@functools.cache
def render(directory: str) -> tuple[Manifest, ...]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is needed to render deploy/ (it ships with these machines' image)"
    result = subprocess.run(
        [kubectl, "kustomize", str(ROOT / directory)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def find(objects: tuple[Manifest, ...], kind: str, name: str | None = None) -> Manifest:
    found = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def container(objects: tuple[Manifest, ...]) -> Manifest:
    pod = find(objects, "Deployment", NAME)["spec"]["template"]["spec"]
    (only,) = pod["containers"]
    result: Manifest = only
    return result


def default(field: str) -> Any:
    """The operator's built-in default for a setting (what applies when the variable is unset)."""
    return next(f.default for f in dataclasses.fields(Settings) if f.name == field)


def container_env(objects: tuple[Manifest, ...]) -> dict[str, str]:
    """The environment the container starts with: the ConfigMap it loads, then its literal env."""
    spec = container(objects)
    env: dict[str, str] = {}
    for source in spec.get("envFrom", []):
        config_map = find(objects, "ConfigMap", source["configMapRef"]["name"])
        env.update(config_map.get("data") or {})
    env.update({item["name"]: item["value"] for item in spec.get("env", []) if "value" in item})
    return env


@pytest.fixture(params=["deploy", "deploy/ha"])
def rendered(request: pytest.FixtureRequest) -> tuple[Manifest, ...]:
    return render(request.param)


def test_the_base_renders_what_an_install_needs() -> None:
    kinds = sorted((o["kind"], o["metadata"]["name"]) for o in render("deploy"))
    config_map = next(name for kind, name in kinds if kind == "ConfigMap")
    assert kinds == sorted(
        [
            ("Namespace", NAMESPACE),
            ("CustomResourceDefinition", crd.NAME),
            ("ServiceAccount", NAME),
            ("ClusterRole", NAME),
            ("ClusterRoleBinding", NAME),
            ("ConfigMap", config_map),
            ("Deployment", NAME),
            ("Service", f"{NAME}-metrics"),
        ]
    )
    # The generated ConfigMap's name carries a hash of its data, so a changed setting rolls the pod.
    assert config_map.startswith(f"{NAME}-")
    assert config_map != NAME


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_rendered_object_validates_against_the_kubernetes_schemas(
    rendered: tuple[Manifest, ...], version: str
) -> None:
    crds = {
        (o["spec"]["group"], o["spec"]["names"]["kind"]): o
        for o in rendered
        if o["kind"] == "CustomResourceDefinition"
    }
    for obj in rendered:
        group = obj["apiVersion"].rpartition("/")[0]
        definition = crds.get((group, obj["kind"]))
        if definition is not None:
            # Our own kinds: no published schema, but the CRD rendered alongside must serve them as written.
            served = {v["name"] for v in definition["spec"]["versions"] if v["served"]}
            assert obj["apiVersion"].rpartition("/")[2] in served
            cluster_scoped = definition["spec"]["scope"] == "Cluster"
            assert ("namespace" in obj["metadata"]) is not cluster_scoped, obj["metadata"]
            continue
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} (Kubernetes {version}): {exc.message}")


def test_namespaced_objects_land_in_the_operator_namespace(rendered: tuple[Manifest, ...]) -> None:
    cluster_kinds = {
        "Namespace",
        "CustomResourceDefinition",
        "ClusterRole",
        "ClusterRoleBinding",
        "ClusterKopfPeering",
    }
    for obj in rendered:
        if obj["kind"] not in cluster_kinds:
            assert obj["metadata"].get("namespace") == NAMESPACE, obj["metadata"]
    namespace = find(rendered, "Namespace", NAMESPACE)
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_the_crd_is_the_generated_one(rendered: tuple[Manifest, ...]) -> None:
    installed = find(rendered, "CustomResourceDefinition", crd.NAME)
    assert installed["spec"] == crd.build_crd()["spec"]


def test_the_deployment_runs_one_operator_under_pod_security_restricted() -> None:
    objects = render("deploy")
    deployment = find(objects, "Deployment", NAME)
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert not any(pod.get(host) for host in ("hostNetwork", "hostPID", "hostIPC"))
    security = container(objects)["securityContext"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security["runAsNonRoot"] is True
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert not security.get("privileged")
    # Restricted allows only these volume types; the read-only root needs a writable /tmp.
    assert {next(k for k in v if k != "name") for v in pod["volumes"]} <= {"projected", "emptyDir"}
    assert any(m["mountPath"] == "/tmp" for m in container(objects)["volumeMounts"])


def test_resources_and_probes_are_set() -> None:
    spec = container(render("deploy"))
    for bound in ("requests", "limits"):
        assert set(spec["resources"][bound]) == {"cpu", "memory"}
    ports = {port["name"]: port["containerPort"] for port in spec["ports"]}
    env = container_env(render("deploy"))
    liveness_port = int(env.get(f"{PREFIX}LIVENESS_PORT", default("liveness_port")))
    assert ports["health"] == liveness_port
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        # kopf serves /healthz on the liveness endpoint the CLI builds from CGID_LIVENESS_PORT.
        assert spec[probe]["httpGet"] == {"path": "/healthz", "port": "health"}, probe


def test_the_projected_token_is_where_the_operator_reads_it() -> None:
    objects = render("deploy")
    pod = find(objects, "Deployment", NAME)["spec"]["template"]["spec"]
    env = container_env(objects)
    token_path = pathlib.PurePosixPath(
        env.get(f"{PREFIX}IDENTITY_TOKEN_PATH", str(default("identity_token_path")))
    )
    projected = {v["name"]: v["projected"] for v in pod["volumes"] if "projected" in v}
    mounts = [m for m in container(objects)["volumeMounts"] if m["name"] in projected]
    (mount,) = mounts
    assert mount["readOnly"] is True
    (source,) = projected[mount["name"]]["sources"]
    token = source["serviceAccountToken"]
    assert token["audience"] == "issuer.enforce.dev"
    assert pathlib.PurePosixPath(mount["mountPath"]) / token["path"] == token_path
    # The kubelet refreshes it at 80 % of its lifetime; the operator re-reads it for every exchange.
    assert token["expirationSeconds"] >= 600


def test_metrics_are_exposed_on_the_operator_metrics_port() -> None:
    objects = render("deploy")
    spec = container(objects)
    env = container_env(objects)
    metrics_port = int(env.get(f"{PREFIX}METRICS_PORT", default("metrics_port")))
    assert {p["name"]: p["containerPort"] for p in spec["ports"]}["metrics"] == metrics_port
    annotations = find(objects, "Deployment", NAME)["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(metrics_port)
    assert annotations["prometheus.io/path"] == "/metrics"
    service = find(objects, "Service", f"{NAME}-metrics")
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] == "metrics"
    labels = find(objects, "Deployment", NAME)["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()


def test_the_settings_in_the_manifests_are_ones_the_operator_accepts() -> None:
    objects = render("deploy")
    env = container_env(objects)
    assert env[f"{PREFIX}IDENTITY"] == "", "the base must not ship someone's identity"
    # Unknown CGID_ names fail the start, so this catches a misspelt variable in the manifests.
    settings = Settings.from_env({**env, f"{PREFIX}IDENTITY": IDENTITY})
    assert settings.identity == IDENTITY
    assert str(settings.identity_token_path) == env[f"{PREFIX}IDENTITY_TOKEN_PATH"]
    # POD_ID names this replica in kopf's peering instead of user@host, which needs a passwd entry.
    pod_id = next(e for e in container(objects)["env"] if e["name"] == "POD_ID")
    assert pod_id["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"


def test_the_service_account_is_the_one_bound_to_the_role(rendered: tuple[Manifest, ...]) -> None:
    pod = find(rendered, "Deployment", NAME)["spec"]["template"]["spec"]
    account = find(rendered, "ServiceAccount", pod["serviceAccountName"])
    for binding in (o for o in rendered if o["kind"] == "ClusterRoleBinding"):
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": account["metadata"]["name"], "namespace": NAMESPACE}
        ]
        find(rendered, "ClusterRole", binding["roleRef"]["name"])


def parsed_command(args: list[str], monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Run the real command line parser on the container's args; return what ``run`` would be given."""
    seen: list[Any] = []
    monkeypatch.setattr(cli, "_run", lambda namespace: seen.append(namespace) or 0)
    assert cli.main(args) == 0
    return seen


def test_the_container_args_are_the_operator_run_command(monkeypatch: pytest.MonkeyPatch) -> None:
    (parsed,) = parsed_command(container(render("deploy"))["args"], monkeypatch)
    assert parsed.command == "run"
    assert not parsed.peering


def test_the_ha_overlay_runs_two_peered_replicas(monkeypatch: pytest.MonkeyPatch) -> None:
    objects = render("deploy/ha")
    deployment = find(objects, "Deployment", NAME)
    assert deployment["spec"]["replicas"] == 2
    (parsed,) = parsed_command(container(objects)["args"], monkeypatch)
    assert parsed.command == "run"
    assert parsed.peering

    # The peering object kopf looks for, under the name the operator is given, and its CRD.
    peering = find(objects, "ClusterKopfPeering", parsed.peering)
    assert peering["apiVersion"] == f"{PEERING_GROUP}/v1"
    definition = find(objects, "CustomResourceDefinition", f"{PEERING_PLURAL}.{PEERING_GROUP}")
    assert definition["spec"]["scope"] == "Cluster"
    status = definition["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
    assert status["x-kubernetes-preserve-unknown-fields"] is True  # kopf keeps one key per replica

    # kopf watches the peering object and patches its keep-alive into it; nothing more.
    rules = [rule for o in objects if o["kind"] == "ClusterRole" for rule in o["rules"]]
    peering_rules = [r for r in rules if PEERING_PLURAL in r.get("resources", [])]
    assert peering_rules == [
        {"apiGroups": [PEERING_GROUP], "resources": [PEERING_PLURAL], "verbs": ["list", "watch", "patch"]}
    ]
    # A drain keeps one replica, and the replicas prefer different nodes.
    budget = find(objects, "PodDisruptionBudget", NAME)
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert budget["spec"]["minAvailable"] == 1
    anti = deployment["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
    assert anti["preferredDuringSchedulingIgnoredDuringExecution"]


def test_the_base_without_peering_is_standalone_and_ha_adds_only_peering() -> None:
    base = {(o["kind"], o["metadata"]["name"]) for o in render("deploy")}
    ha = {(o["kind"], o["metadata"]["name"]) for o in render("deploy/ha")}
    assert base < ha
    assert {kind for kind, _ in ha - base} == {
        "CustomResourceDefinition",
        "ClusterKopfPeering",
        "ClusterRole",
        "ClusterRoleBinding",
        "PodDisruptionBudget",
    }
    base_role = find(render("deploy"), "ClusterRole", NAME)
    assert find(render("deploy/ha"), "ClusterRole", NAME)["rules"] == base_role["rules"]


def test_the_flux_examples_point_at_the_deploy_directory() -> None:
    documents = [
        doc
        for path in sorted((ROOT / "examples" / "flux").glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
        if doc
    ]
    kustomizations = {d["metadata"]["name"]: d for d in documents if d["kind"] == "Kustomization"}
    operator = kustomizations[NAME]
    assert operator["spec"]["wait"] is True
    assert (ROOT / operator["spec"]["path"] / "kustomization.yaml").is_file()
    identities = next(d for name, d in kustomizations.items() if name != NAME)
    assert identities["spec"]["wait"] is True
    assert identities["spec"]["dependsOn"] == [{"name": NAME}]
    sources = {d["metadata"]["name"] for d in documents if d["kind"] == "GitRepository"}
    assert {k["spec"]["sourceRef"]["name"] for k in kustomizations.values()} <= sources


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_the_argocd_configmap_patch_is_a_valid_configmap(version: str) -> None:
    patch = yaml.safe_load((ROOT / "deploy" / "argocd" / "argocd-cm-patch.yaml").read_text())
    kubernetes_validate.validate(patch, version, strict=True)
