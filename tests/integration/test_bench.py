"""The bench (bench/convergence.py) at N = 10 on the run's real control plane, so that it cannot rot.

It runs every phase — create, quiet, edit, key rotation, delete — with the operator in its own process,
then checks that the JSON has every figure the bench promises and the invariants that hold at any
scale: nothing is left in Chainguard, a quiet resync writes nothing to Chainguard, calls in flight
never pass the limit, and a key rotation updates each Static identity once. It asserts nothing about
time: that is what the bench measures, on a machine chosen for it.
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
}


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
    bench = _bench()
    out = tmp_path / "bench.json"
    options = bench.parse_args(
        ["--n", "10", "--latency-ms", "5", "--concurrency", "4", "--namespaces", "2", "--quick",
         "--json", str(out), "--timeout", "200"]
    )  # fmt: skip
    bench.report(options, await bench.run_bounded(options, plane=control_plane))
    assert "all Ready" in capsys.readouterr().out

    results = json.loads(out.read_text())
    assert results.keys() >= KEYS, f"missing: {sorted(KEYS - results.keys())}"
    assert results["n"] == 10
    assert results["ready_s"] is not None, results["phases"]["create"]
    assert results["delete_s"] is not None, results["phases"]["delete"]
    assert results["leftover_identities"] == 0
    assert results["leftover_role_bindings"] == 0
    assert results["idle_chainguard_writes"] == 0
    assert 1 <= results["peak_in_flight"] <= results["concurrency"]
    static = results["rotation_static_identities"]
    assert static == 5  # half of the mixed ten
    assert results["rotation_writes_per_static"] == {"1": static}
