"""GitOps health: Argo CD's Lua check, kstatus (Flux ``wait: true``, kpt, cli-utils), the Flux example's
CEL expressions and ``kubectl wait --for=condition=Ready`` all read the operator's conditions the same way.

The status samples come from the operator's own code: ``conditions.build_conditions`` fed with the
``Health`` that ``reconcile`` derives from real failures (``health.classify`` on a ``SpecError``, a 403,
a 503, ...), including transitions from an earlier status. ``deploy/argocd/health.lua`` runs in a real
Lua 5.1 interpreter (lupa) — the dialect of Argo CD's gopher-lua — with only the libraries Argo CD's
sandbox offers. kstatus and kubectl are re-implemented here from their documented rules in a few lines;
the Flux expressions are evaluated with cel-python by Flux's own algorithm (RFC 0009).
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Mapping
from typing import Any

import celpy
import lupa.lua51 as lua51
import pytest
import yaml
from celpy.adapter import json_to_cel
from celpy.evaluation import CELEvalError

from chainguard_identity_operator import conditions, crd
from chainguard_identity_operator.chainguard.errors import PermissionDenied, ServerError
from chainguard_identity_operator.cluster_errors import ClusterError, ConfigMapConflict
from chainguard_identity_operator.conditions import Health, Phase, build_conditions
from chainguard_identity_operator.health import classify
from chainguard_identity_operator.model import SpecError

ROOT = pathlib.Path(__file__).resolve().parents[2]
HEALTH_LUA = ROOT / "deploy" / "argocd" / "health.lua"
ARGOCD_PATCH = ROOT / "deploy" / "argocd" / "argocd-cm-patch.yaml"
FLUX_IDENTITIES = ROOT / "examples" / "flux" / "identities.yaml"
ARGOCD_KEY = f"resource.customizations.health.{crd.GROUP}_{crd.KIND}"
NOW = "2026-11-23T10:00:00Z"
LATER = "2026-11-23T10:05:00Z"

Obj = dict[str, Any]


# -- the evaluators ---------------------------------------------------------------------------------


def argocd(obj: Obj) -> tuple[str, str]:
    """(status, message) from health.lua, run as Argo CD runs it: a global ``obj``, a returned table."""
    runtime = lua51.LuaRuntime(unpack_returned_tuples=True)
    lua_globals = runtime.globals()
    # Argo CD offers base, table, string, math and coroutine; anything else must not be needed.
    for name in ("os", "io", "require", "dofile", "loadfile", "load", "loadstring", "package", "debug"):
        lua_globals[name] = None
    lua_globals.obj = runtime.table_from(obj, recursive=True)
    result = runtime.execute(HEALTH_LUA.read_text())
    return str(result["status"]), str(result["message"])


def kstatus(obj: Obj) -> str:
    """kstatus ``Compute`` for a custom resource (sigs.k8s.io/cli-utils/pkg/kstatus/status)."""
    metadata, status = obj.get("metadata", {}), obj.get("status") or {}
    if metadata.get("deletionTimestamp"):
        return "Terminating"
    if "observedGeneration" in status and status["observedGeneration"] != metadata.get("generation"):
        return "InProgress"
    for condition in status.get("conditions", []):
        if condition["type"] == "Reconciling" and condition["status"] == "True":
            return "InProgress"
        if condition["type"] == "Stalled" and condition["status"] == "True":
            return "Failed"
    # No standard condition says otherwise: kstatus calls every other custom resource Current.
    return "Current"


def flux_health_expressions() -> Mapping[str, str]:
    documents = list(yaml.safe_load_all(FLUX_IDENTITIES.read_text()))
    (kustomization,) = [d for d in documents if d["kind"] == "Kustomization"]
    (exprs,) = [
        e
        for e in kustomization["spec"]["healthCheckExprs"]
        if (e["apiVersion"], e["kind"]) == (f"{crd.GROUP}/{crd.VERSION}", crd.KIND)
    ]
    return exprs


def flux(obj: Obj) -> str:
    """Flux's custom health check (fluxcd/pkg runtime/cel StatusEvaluator): the observedGeneration check,
    then inProgress, failed, current; none true: InProgress. An expression that cannot be evaluated (a
    field not there yet) leaves the resource Unknown, and Flux polls again until its timeout."""
    status, metadata = obj.get("status") or {}, obj.get("metadata", {})
    if "observedGeneration" in status and status["observedGeneration"] != metadata.get("generation"):
        return "InProgress"
    exprs = flux_health_expressions()
    environment = celpy.Environment()
    activation = {key: json_to_cel(value) for key, value in obj.items()}
    for key, verdict in (("inProgress", "InProgress"), ("failed", "Failed"), ("current", "Current")):
        if key not in exprs:
            continue
        program = environment.program(environment.compile(exprs[key]))
        try:
            if bool(program.evaluate(activation)):
                return verdict
        except CELEvalError:
            return "Unknown"
    return "InProgress"


def kubectl_wait_ready(obj: Obj) -> bool:
    """``kubectl wait --for=condition=Ready``: Ready is True, and not for an older generation."""
    generation = obj.get("metadata", {}).get("generation")
    for condition in (obj.get("status") or {}).get("conditions", []):
        if condition["type"] == "Ready":
            stale = "observedGeneration" in condition and condition["observedGeneration"] != generation
            return condition["status"] == "True" and not stale
    return False


# -- samples from the operator's own code -----------------------------------------------------------


def cr(generation: int, status: Obj | None = None) -> Obj:
    obj: Obj = {
        "apiVersion": f"{crd.GROUP}/{crd.VERSION}",
        "kind": crd.KIND,
        "metadata": {"name": "puller", "namespace": "shop", "generation": generation, "uid": "u-1"},
        "spec": {"parentName": "my-org.example", "roles": ["registry.pull"]},
    }
    if status is not None:
        obj["status"] = status
    return obj


def status_for(health: Health, generation: int, previous: Obj | None = None, now: str = NOW) -> Obj:
    """The status a pass writes: the operator's conditions for ``health`` (after ``previous``)."""
    before = (previous or {}).get("conditions", [])
    return {
        "observedGeneration": generation,
        "conditions": build_conditions(before, health, generation=generation, now_text=now),
    }


READY = Health(Phase.READY, "IdentityReady", "identity c958/f067 (ClaimMatch) has 1 role(s) bound")


def failure(exc: Exception) -> Health:
    health = classify(exc).health
    return health


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    obj: Obj
    argocd: str
    kstatus: str
    ready: bool
    message: str = ""  # a part of the message Argo CD must show


def cases() -> list[Case]:
    not_allowed = SpecError("spec.roles[0]", "role 'owner' is not allowed", reason="RoleNotAllowed")
    denied = PermissionDenied(403, 7, "no permission to create identities", request="POST /iam/v2/identities")
    unavailable = ServerError(503, 14, "try again later", request="POST /iam/v2/identities")
    ready_then = status_for(READY, 2)
    return [
        Case("ready", cr(2, status_for(READY, 2)), "Healthy", "Current", True, "IdentityReady"),
        Case(
            "stalled spec",
            cr(1, status_for(failure(not_allowed), 1)),
            "Degraded",
            "Failed",
            False,
            "spec.roles[0]",
        ),
        Case(
            "operator denied",
            cr(1, status_for(failure(denied), 1)),
            "Degraded",
            "Failed",
            False,
            "PermissionDenied",
        ),
        Case(
            "conflicting ConfigMap",
            cr(1, status_for(failure(ConfigMapConflict("ConfigMap shop/x is not ours")), 1)),
            "Degraded",
            "Failed",
            False,
            "ConfigMapConflict",
        ),
        Case(
            "chainguard unavailable",
            cr(1, status_for(failure(unavailable), 1)),
            "Progressing",
            "InProgress",
            False,
            "ChainguardUnavailable",
        ),
        Case(
            "cluster unavailable",
            cr(1, status_for(failure(ClusterError("reading /openid/v1/jwks: timeout")), 1)),
            "Progressing",
            "InProgress",
            False,
            "ClusterUnavailable",
        ),
        Case(
            "ready, then stalled by an edit",
            cr(3, status_for(failure(not_allowed), 3, previous=ready_then, now=LATER)),
            "Degraded",
            "Failed",
            False,
            "RoleNotAllowed",
        ),
        Case(
            "stalled, then fixed",
            cr(4, status_for(READY, 4, previous=status_for(failure(not_allowed), 3), now=LATER)),
            "Healthy",
            "Current",
            True,
            "IdentityReady",
        ),
        # The spec was edited and the operator has not looked yet: the old Ready must not count.
        Case(
            "edited, not yet observed", cr(3, ready_then), "Progressing", "InProgress", False, "generation 3"
        ),
        # Just created: no status at all. kstatus alone calls this Current (see test_flux_...).
        Case("no status yet", cr(1), "Progressing", "Current", False, "Waiting"),
        Case("status without conditions", cr(1, {"observedGeneration": 1}), "Progressing", "Current", False),
    ]


CASES = cases()


@pytest.fixture(params=CASES, ids=[case.name for case in CASES])
def case(request: pytest.FixtureRequest) -> Case:
    result: Case = request.param
    return result


# -- the tests --------------------------------------------------------------------------------------


def test_argocd_health(case: Case) -> None:
    status, message = argocd(case.obj)
    assert status == case.argocd
    assert case.message in message


def test_argocd_shows_the_deciding_condition_s_reason_and_message() -> None:
    obj = cr(1, status_for(failure(SpecError("spec.parent", "is not a group UIDP")), 1))
    stalled = conditions.condition(obj["status"]["conditions"], conditions.STALLED)
    assert stalled is not None
    assert argocd(obj) == ("Degraded", f"{stalled['reason']}: {stalled['message']}")


def test_kstatus(case: Case) -> None:
    assert kstatus(case.obj) == case.kstatus


def test_kubectl_wait_for_ready(case: Case) -> None:
    assert kubectl_wait_ready(case.obj) is case.ready


WITH_CONDITIONS = [case for case in CASES if (case.obj.get("status") or {}).get("conditions")]


@pytest.mark.parametrize("written", WITH_CONDITIONS, ids=[case.name for case in WITH_CONDITIONS])
def test_the_tools_agree_once_the_operator_has_written_status(written: Case) -> None:
    """Where there are conditions to read, Argo CD, kstatus, Flux and kubectl reach the same verdict.
    (Without any, kstatus calls a resource Current: see the Flux test below.)"""
    verdicts = {
        "Healthy": ("Current", True),
        "Degraded": ("Failed", False),
        "Progressing": ("InProgress", False),
    }
    assert (kstatus(written.obj), kubectl_wait_ready(written.obj)) == verdicts[argocd(written.obj)[0]]
    assert flux(written.obj) == kstatus(written.obj)


def test_flux_waits_for_the_first_status_where_plain_kstatus_would_not() -> None:
    created = cr(1)
    assert kstatus(created) == "Current"  # why the Flux example carries healthCheckExprs
    assert flux(created) == "Unknown"
    assert flux(cr(1, {"observedGeneration": 1})) == "Unknown"
    assert flux(cr(1, status_for(READY, 1))) == "Current"


def test_the_operator_always_writes_all_three_conditions() -> None:
    """Tools never have to guess from a missing condition (kstatus treats absence as False)."""
    for health in (READY, failure(SpecError("spec.roles", "empty")), failure(ClusterError("down"))):
        types = [c["type"] for c in status_for(health, 1)["conditions"]]
        assert sorted(types) == sorted([conditions.READY, conditions.RECONCILING, conditions.STALLED])


def test_the_argocd_configmap_patch_carries_health_lua_unchanged() -> None:
    patch = yaml.safe_load(ARGOCD_PATCH.read_text())
    assert (patch["kind"], patch["metadata"]["name"]) == ("ConfigMap", "argocd-cm")
    assert patch["data"] == {ARGOCD_KEY: HEALTH_LUA.read_text()}
