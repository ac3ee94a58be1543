"""Integration fixtures: a World on the Kubernetes emulator (``sandbox``), and the backends a scenario
can be parametrized over (``backend``): the emulator, or the run's real control plane with deploy/'s
CRD and RBAC installed (``real_cluster``, once per session; see tests/conftest.py for when it is skipped
and when its absence fails the run)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from cgid_testkit.controlplane import ControlPlane
from cgid_testkit.harness import World, world
from cgid_testkit.tools import install_deploy


@pytest.fixture
async def sandbox() -> AsyncIterator[World]:
    async with world() as the_world:
        yield the_world


@pytest.fixture(scope="session")
def real_cluster(control_plane: ControlPlane) -> ControlPlane:
    """The run's control plane with deploy/'s CRD and RBAC, as an admin installs them (server-side apply
    is idempotent, so the e2e suite's install and this one agree). Each World on it then makes its own
    namespaces and operator ServiceAccount (cgid_testkit.harness.RealKube)."""
    install_deploy(control_plane.kubeconfig, field_manager="cgid-integration", established_within=60.0)
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
