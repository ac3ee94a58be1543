"""Integration fixtures: a World on the Kubernetes emulator (``sandbox``), and the backends a scenario
can be parametrized over (``backend``): the emulator, or the run's real control plane with deploy/'s
CRD and RBAC installed (``real_cluster``, once per session; see tests/conftest.py for when it is skipped
and when its absence fails the run)."""

from __future__ import annotations

import pathlib
import shutil
import subprocess
from collections.abc import AsyncIterator

import pytest
import yaml

from cgid_testkit.controlplane import ControlPlane
from cgid_testkit.harness import World, world

ROOT = pathlib.Path(__file__).resolve().parents[2]
# What the tests take from the rendered deploy/: the operator runs in the test process, not in a pod.
INSTALLED_KINDS = {
    "Namespace",
    "CustomResourceDefinition",
    "ServiceAccount",
    "ClusterRole",
    "ClusterRoleBinding",
}


@pytest.fixture
async def sandbox() -> AsyncIterator[World]:
    async with world() as the_world:
        yield the_world


def _kubectl(kubeconfig: pathlib.Path, *args: str, stdin: str | None = None) -> str:
    binary = shutil.which("kubectl")
    assert binary, "the real backend needs kubectl on PATH (to render and apply deploy/)"
    result = subprocess.run(
        [binary, f"--kubeconfig={kubeconfig}", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if result.returncode != 0:
        raise AssertionError(f"kubectl {' '.join(args)} failed: {result.stderr.strip()}")
    return result.stdout


@pytest.fixture(scope="session")
def real_cluster(control_plane: ControlPlane) -> ControlPlane:
    """The run's control plane with deploy/'s CRD and RBAC, as an admin installs them (server-side apply
    is idempotent, so the e2e suite's install and this one agree). Each World on it then makes its own
    namespaces and operator ServiceAccount (cgid_testkit.harness.RealKube)."""
    rendered = [
        doc
        for doc in yaml.safe_load_all(_kubectl(control_plane.kubeconfig, "kustomize", str(ROOT / "deploy")))
        if doc and doc["kind"] in INSTALLED_KINDS
    ]
    assert {doc["kind"] for doc in rendered} == INSTALLED_KINDS
    _kubectl(
        control_plane.kubeconfig,
        "apply",
        "--server-side",
        "--force-conflicts",
        "--field-manager=cgid-integration",
        "-f",
        "-",
        stdin=yaml.safe_dump_all(rendered),
    )
    for doc in rendered:
        if doc["kind"] == "CustomResourceDefinition":
            _kubectl(
                control_plane.kubeconfig,
                "wait",
                "--for=condition=Established",
                f"crd/{doc['metadata']['name']}",
                "--timeout=60s",
            )
    # The garbage collector learns of a CRD installed after it started only at its next resync (~30 s):
    # a restart makes it collect the ConfigMaps owned by ChainguardIdentities at once.
    control_plane.restart_controller_manager()
    return control_plane


@pytest.fixture(params=["emulator", "real"])
def backend(request: pytest.FixtureRequest) -> ControlPlane | None:
    """Which cluster a scenario runs on: None for the emulator, else the real control plane (pass it to
    ``world(control_plane=...)``)."""
    if request.param == "emulator":
        return None
    plane: ControlPlane = request.getfixturevalue("real_cluster")
    return plane
