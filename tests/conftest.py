"""Suite-wide fixtures: the real Kubernetes control plane, started once per run.

Every run starts etcd, kube-apiserver and kube-controller-manager on loopback (``cgid_testkit.controlplane``,
binaries from ``make test``'s build or from ``KUBEBUILDER_ASSETS``) for the tests marked ``controlplane``:
the e2e suite and the backend-parametrized integration scenarios. Without the binaries those tests are
skipped with the reason — except under CI (``CI=true``), where a missing control plane fails the run.
``--kubeconfig=PATH`` points the e2e suite at another cluster instead (kind, a test cluster).
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Iterator

import pytest

from cgid_testkit.controlplane import ControlPlane, ControlPlaneUnavailable, find_binaries
from cgid_testkit.harness import PUBLIC_ISSUER
from cgid_testkit.tools import ToolUnavailable, find_crane

_VERSION = pytest.StashKey[str]()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--kubeconfig", default=None, help="run the e2e tests against the cluster in this kubeconfig"
    )


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture(scope="session")
def control_plane(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ControlPlane]:
    """A real control plane for the whole run; stopped at the end even when tests fail."""
    try:
        binaries = find_binaries()
    except ControlPlaneUnavailable as exc:
        pytest.fail(str(exc)) if _in_ci() else pytest.skip(str(exc))
    if binaries is None:
        message = (
            "no control plane binaries: `make test` builds them (hack/controlplane/build.sh), or set "
            "KUBEBUILDER_ASSETS to a setup-envtest folder"
        )
        pytest.fail(message) if _in_ci() else pytest.skip(message)
    plane = ControlPlane(binaries, issuer=PUBLIC_ISSUER, workdir=tmp_path_factory.mktemp("controlplane"))
    try:
        plane.start()
    except ControlPlaneUnavailable as exc:
        pytest.fail(f"the control plane did not start: {exc}")
    request.config.stash[_VERSION] = f"kube-apiserver {plane.version} ({binaries.source}: {binaries.folder})"
    try:
        yield plane
    finally:
        plane.stop()


@pytest.fixture
def needs_controller_manager(control_plane: ControlPlane) -> None:
    """For tests that need garbage collection or namespace deletion (setup-envtest ships no
    kube-controller-manager)."""
    if not control_plane.has_controller_manager:
        pytest.skip(
            "needs kube-controller-manager (garbage collection, namespaces); KUBEBUILDER_ASSETS has none"
        )


@pytest.fixture(scope="session")
def crane() -> pathlib.Path:
    """The real crane (go-containerregistry), a registry client nobody here wrote; skipped without it,
    except under CI, where it is a failure."""
    try:
        found = find_crane()
    except ToolUnavailable as exc:
        pytest.fail(str(exc)) if _in_ci() else pytest.skip(str(exc))
    if found is None:
        message = "no crane: `make tools` (or `make test`) builds it with hack/tools/build.sh"
        pytest.fail(message) if _in_ci() else pytest.skip(message)
    return found


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    version = config.stash.get(_VERSION, None)
    if version is not None:
        terminalreporter.write_line(f"real control plane: {version}")


def kubeconfig_option(config: pytest.Config) -> pathlib.Path | None:
    value = config.getoption("--kubeconfig")
    return pathlib.Path(value).expanduser() if value else None
