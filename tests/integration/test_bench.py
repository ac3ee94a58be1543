"""The bench (bench/convergence.py) at N = 10 on the run's real control plane, so that it cannot rot.

It runs every phase — create, quiet, edit, key rotation, delete — with the operator in its own process,
then checks that the JSON has every figure the bench promises and the invariants that hold at any
scale: nothing is left in Chainguard, a quiet resync writes nothing to Chainguard, calls in flight
never pass the limit, a key rotation updates each Static identity once, and no Chainguard call of the
operator's was answered with an error (nor any of the emulator's), all with a busy loop competing for
the CPUs (``--cpu-hog 1``): a slowed operator may converge later, never by retrying. It asserts nothing
about time: that is what the bench measures, on a machine chosen for it.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib
import sys
from types import ModuleType

import pytest

from cgid_testkit.controlplane import ControlPlane

ROOT = pathlib.Path(__file__).resolve().parents[2]
KEYS = {
    "n",
    "latency_ms",
    "concurrency",
    "ready_s",
    "limit_s",
    "ratio",
    "peak_in_flight",
    "chainguard_calls_per_identity",
    "idle_kube_writes",
    "idle_chainguard_writes",
    "idle_chainguard_reads_per_resync",
    "rotation_writes",
    "rss_mib",
    "cpu_s",
    "delete_s",
    "delete_ratio",
    "leftover_identities",
    "cpu_hog",
    "retry_storm",
    "chainguard_requests",
    "chainguard_errors",
    "emulator_errors",
    "transient_passes",
    "retries_per_identity",
}
PHASES = {"create", "quiet", "edit", "rotate", "delete", "total"}
ERROR_DETAILS = (
    "chainguard_errors_by_route",
    "emulator_errors_by_route",
    "passes_by_outcome",
    "logged_not_ready",
    "handler_retries",
)


def _bench() -> ModuleType:
    path = ROOT / "bench" / "convergence.py"
    spec = importlib.util.spec_from_file_location("bench_convergence", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


@pytest.mark.timeout(240)
async def test_bench_runs_small_on_the_control_plane(
    control_plane: ControlPlane, tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # One busy loop competes for the CPUs throughout: every invariant below must hold under load too.
    cpu_hog = 1
    bench = _bench()
    out = tmp_path / "bench.json"
    options = bench.parse_args(
        ["--n", "10", "--latency-ms", "5", "--concurrency", "4", "--namespaces", "2", "--quick",
         "--cpu-hog", str(cpu_hog), "--json", str(out), "--timeout", "200"]
    )  # fmt: skip
    bench.report(options, await bench.run_bounded(options, plane=control_plane))
    printed = capsys.readouterr().out
    assert "all Ready" in printed
    assert f"{cpu_hog} busy loops" in printed
    assert "Chainguard requests (errors)" in printed

    results = json.loads(out.read_text())
    assert results.keys() >= KEYS, f"missing: {sorted(KEYS - results.keys())}"
    assert results["n"] == 10
    assert results["cpu_hog"] == cpu_hog
    storm = results["retry_storm"]
    assert storm.keys() == PHASES
    for figures in storm.values():
        assert figures.keys() >= set(bench.STORM_KEYS)
    assert results["chainguard_requests"] == storm["total"]["chainguard_requests"] > 0
    assert results["ready_s"] is not None, results["phases"]["create"]
    assert results["delete_s"] is not None, results["phases"]["delete"]
    assert results["leftover_identities"] == 0
    assert results["leftover_role_bindings"] == 0
    # Load is no reason for an error: whatever the operator sent was answered 2xx, and so was all the
    # emulator saw (STS included). Where not, the routes and the operator's log say what it was.
    why = {
        phase: {key: figures[key] for key in ERROR_DETAILS if figures.get(key)}
        for phase, figures in storm.items()
    }
    assert results["chainguard_errors"] == 0, why
    assert results["emulator_errors"] == 0, why
    assert results["idle_chainguard_writes"] == 0
    assert 1 <= results["peak_in_flight"] <= results["concurrency"]
    static = results["rotation_static_identities"]
    assert static == 5  # half of the mixed ten
    assert results["rotation_writes_per_static"] == {"1": static}
