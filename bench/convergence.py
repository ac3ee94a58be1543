"""The operator at scale: convergence, quiet, edits, a key rotation and deletion of N resources.

Run: ``make bench`` (N = 1,000 on the real control plane), or
``.venv/bin/python bench/convergence.py --n 100 --concurrency 20 --latency-ms 50 --json out.json``.
It prints a table (and ``--json FILE`` writes the figures) and asserts nothing: performance is
measured here, not asserted in the test suite (tests/integration/test_bench.py runs it small, so it
cannot rot).

The set-up (bench/backends.py): a real etcd + kube-apiserver + kube-controller-manager on loopback with
deploy/'s CRD and RBAC (``--backend real``, the default), or the test kit's Kubernetes emulator
(``--backend emulator``); the Chainguard emulator in this process, answering every call after
``--latency-ms``; and the operator in **its own process** — ``chainguard-identity-operator run``
configured by ``CGID_*`` variables as in a pod, authenticating to the API server as deploy/'s
ServiceAccount and to Chainguard as a static identity bootstrapped from the cluster's JWKS. Its CPU and
RSS are read from ``/proc/<pid>``; its own ``/metrics`` give the peak of Chainguard calls in flight.

The phases, for N resources spread over ``--namespaces`` namespaces (``--mode``: Static, ClaimMatch or
half each):

1. **create** all of them; ``ready_s`` is the time until the last one is Ready (observedGeneration
   current), with the p50/p95 of each one's time to Ready. Chainguard calls per identity are the round
   trips the limit counts: ``limit_s = ceil(N / concurrency) x round_trips x latency`` (the time the
   calls need if the operator kept ``concurrency`` of them in flight all along); ``ratio`` = ready_s /
   limit_s. CPU is the operator's, from the first create to the last Ready.
2. **quiet** for ``--quiet-resyncs`` resync intervals (``CGID_RESYNC_INTERVAL`` = ``--resync-s``):
   Kubernetes write *requests* (the API server's ``apiserver_request_total``: it counts a status patch
   that changes nothing in etcd too), the writes that changed something (MODIFIED events of the
   resources, ConfigMaps whose resourceVersion moved, new Events), and the Chainguard emulator's
   request log: writes (must be 0) and reads per resync.
3. **edit** every resource's ``spec.roles`` (registry.pull -> apk.pull: one binding made and one removed
   each) and time until all show the new role, Ready, at their new generation.
4. **rotate** the cluster's service-account signing key (the API server restarts; the old public key is
   still published) and count Chainguard PATCHes per Static identity: each must be updated exactly once.
5. **delete** all and time until all are gone; ``delete_limit_s`` uses the round trips deletion made;
   then count the identities and role bindings left in Chainguard (must be 0).

Load must make convergence slower, never turn into a retry storm (a pool or queue wait is not an API
failure): ``--latency-ms`` slows the API, and ``--cpu-hog K`` starts K busy loops once set-up is done,
which compete with the operator (and everything else) for the CPUs until the deletion is over. For
every phase and for the whole measured span (first create to the end of the deletion) ``retry_storm``
has what would show a storm: ``chainguard_requests`` and ``chainguard_errors``, the operator's own
count of its Chainguard API tries and of those not answered 2xx or not answered at all (its
``chainguard_api_requests_total``, by route and code in ``chainguard_errors_by_route``);
``emulator_errors``, what the Chainguard emulator answered with an error status (STS included: 0 unless
faults are injected); ``transient_passes``, reconcile passes that ended other than ready (from
``chainguard_identity_reconciles_total{outcome}``, by outcome in ``passes_by_outcome``); and
``retries_per_identity``, chainguard_requests / N — not a difference from a minimum, which cannot be
known from outside (see bench/README.md): read it next to a clean run's. The operator's log in the span
adds its handlers' retries (``handler_retries``), the not-Ready reasons it logged and its warnings and
errors by logger. The totals are at the top level of the JSON too.

Whatever happens, every process the bench started (the operator, py-spy, the CPU hog, the control
plane) is stopped before it exits, and ``--timeout`` bounds the whole run. The Chainguard emulator shares this process
with the bench's watch of the resources; the bench's own CPU is reported so that a reader can tell it
was not the bottleneck. ``--py-spy DIR`` records the operator during the busy phases (a summary by
package goes into the JSON), ``--tracemalloc`` runs it under tracemalloc (bench/traced_operator.py) and
reports where its Python memory goes at idle and at steady state — such runs are slower: read their
times with that in mind.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import collections
import contextlib
import dataclasses
import json
import math
import os
import pathlib
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import httpx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import backends
import observe
import profiling

GROUP, VERSION, PLURAL = "iam.chainguard.dev", "v1alpha1", "chainguardidentities"
ALL_PATH = f"/apis/{GROUP}/{VERSION}/{PLURAL}"
NS_PATH = f"/apis/{GROUP}/{VERSION}/namespaces/{{namespace}}/{PLURAL}"
RUN_LABEL = "cgid-bench/run"
MANAGED_BY = "app.kubernetes.io/managed-by=chainguard-identity-operator"
WRITE_VERBS = frozenset({"POST", "PUT", "PATCH", "DELETE", "DELETECOLLECTION", "APPLY"})
OPERATOR_RESOURCES = ("chainguardidentities", "chainguardidentities/status", "configmaps", "events")
CLIENT_PARALLEL = 16  # the bench's own requests to the API server at once
EDIT_ROLES = ("apk.pull",)
# The figures of a retry storm, per phase in ``retry_storm`` and for the whole run at the top level.
STORM_KEYS = (
    "chainguard_requests",
    "chainguard_errors",
    "emulator_errors",
    "transient_passes",
    "retries_per_identity",
)


@dataclasses.dataclass(frozen=True)
class Options:
    n: int = 1000
    latency_ms: float = 50.0
    concurrency: int = 20
    namespaces: int = 10
    mode: str = "mixed"  # static, claimmatch or mixed
    backend: str = "real"
    resync_s: float = 20.0
    quiet_resyncs: int = 3
    jwks_poll_s: float = 5.0
    json: pathlib.Path | None = None
    py_spy: pathlib.Path | None = None
    tracemalloc: bool = False
    timeout_s: float = 3600.0
    workdir: pathlib.Path | None = None
    log_level: str = "INFO"
    cpu_hog: int = 0  # busy-loop processes competing for the CPUs during the measured phases

    @property
    def latency(self) -> float:
        return self.latency_ms / 1000.0


def _mode(options: Options, index: int) -> str:
    if options.mode == "static":
        return "Static"
    if options.mode == "claimmatch":
        return "ClaimMatch"
    return "Static" if index % 2 else "ClaimMatch"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# -- the operator's process -------------------------------------------------------------------------------


class OperatorProcess:
    """``chainguard-identity-operator run`` in its own process group, stopped (then killed) on ``stop``."""

    def __init__(self, env: dict[str, str], log: pathlib.Path, *, traced: pathlib.Path | None) -> None:
        self.env = env
        self.log = log
        self.traced = traced
        self.metrics_port = int(env["CGID_METRICS_PORT"])
        self.popen: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def start(self) -> None:
        executable = pathlib.Path(sys.executable).parent / "chainguard-identity-operator"
        argv = (
            [str(executable), "run"]
            if executable.exists()
            else [sys.executable, "-m", "chainguard_identity_operator", "run"]
        )
        env = dict(self.env)
        if self.traced is not None:
            self.traced.mkdir(parents=True, exist_ok=True)
            argv = [sys.executable, str(pathlib.Path(__file__).with_name("traced_operator.py"))]
            env["BENCH_TRACEMALLOC_DIR"] = str(self.traced)
        with self.log.open("ab") as handle:
            self.popen = subprocess.Popen(
                argv, env=env, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )  # fmt: skip

    def exited(self) -> int | None:
        return self.popen.poll() if self.popen is not None else None

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    async def metrics(self) -> dict[tuple[str, observe.Labels], float]:
        async with httpx.AsyncClient(timeout=30) as client:
            response = await client.get(f"http://127.0.0.1:{self.metrics_port}/metrics")
        response.raise_for_status()
        return observe.parse_prometheus(response.text)

    async def wait_serving(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.exited() is not None:
                raise RuntimeError(f"the operator exited with {self.exited()}:\n{self.tail()}")
            try:
                await self.metrics()
                return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the operator did not serve /metrics within {timeout}s:\n{self.tail()}")
            await asyncio.sleep(0.2)

    async def snapshot(self, timeout: float = 300.0) -> pathlib.Path | None:
        """A tracemalloc snapshot of the traced operator (None when not traced)."""
        if self.traced is None or self.popen is None:
            return None
        taken = len(list(self.traced.glob("*.done")))
        os.kill(self.pid, signal.SIGUSR1)
        done = self.traced / f"snapshot-{taken + 1}.done"
        deadline = time.monotonic() + timeout
        while not done.exists():
            if time.monotonic() > deadline or self.exited() is not None:
                return None
            await asyncio.sleep(0.2)
        return done.with_suffix(".tracemalloc")

    async def stop(self, timeout: float = 20.0) -> None:
        popen = self.popen
        if popen is None or popen.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(popen.pid, signal.SIGTERM)
        try:
            await asyncio.to_thread(popen.wait, timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(popen.pid, signal.SIGKILL)
            popen.wait(timeout=10)

    def kill_now(self) -> None:
        """The last resort (atexit): no process of ours outlives the bench."""
        if self.popen is not None and self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGKILL)


class PySpy:
    """py-spy recording the operator during one phase (raw collapsed stacks)."""

    def __init__(self, folder: pathlib.Path | None, pid: int) -> None:
        self.folder = folder
        self.pid = pid
        self.binary = shutil.which("py-spy") or str(pathlib.Path(sys.executable).parent / "py-spy")
        self.popen: subprocess.Popen[bytes] | None = None
        self.output: pathlib.Path | None = None

    def start(self, phase: str) -> None:
        if self.folder is None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        self.output = self.folder / f"{phase}.txt"
        self.popen = subprocess.Popen(
            [self.binary, "record", "--pid", str(self.pid), "--rate", "100", "--format", "raw",
             "--gil", "--nonblocking", "--output", str(self.output)],
            stdout=subprocess.DEVNULL, stderr=(self.folder / f"{phase}.log").open("wb"), start_new_session=True,
        )  # fmt: skip

    async def stop(self) -> dict[str, object] | None:
        popen, self.popen = self.popen, None
        if popen is None:
            return None
        if popen.poll() is None:
            popen.send_signal(signal.SIGINT)  # py-spy writes its output on Ctrl-C
            for _ in range(300):
                if popen.poll() is not None:
                    break
                await asyncio.sleep(0.1)
            else:
                popen.kill()
                popen.wait(timeout=10)
        if self.output is None or not self.output.exists():
            return None
        return profiling.summarize_collapsed(self.output.read_text().splitlines())

    def kill_now(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.kill()


class CpuHog:
    """``count`` busy loops (``python -c``) competing with the operator for the machine's CPUs.

    Each is a plain child of the bench (no session of its own: a Ctrl-C of the terminal stops them
    too), killed by ``stop``; and each loop ends by itself within milliseconds once its parent is gone,
    so not even a SIGKILL of the bench leaves one spinning."""

    LOOP = (
        "import os\nparent = os.getppid()\nwhile os.getppid() == parent:\n    for _ in range(100000): pass\n"
    )

    def __init__(self, count: int) -> None:
        self.count = count
        self.popens: list[subprocess.Popen[bytes]] = []

    def start(self) -> None:
        for _ in range(self.count):
            self.popens.append(
                subprocess.Popen(
                    [sys.executable, "-S", "-c", self.LOOP],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )

    def cpu_s(self) -> float:
        return sum(_cpu(popen.pid) for popen in self.popens if popen.poll() is None)

    def stop(self) -> None:
        popens, self.popens = self.popens, []
        for popen in popens:
            if popen.poll() is None:
                popen.kill()
        for popen in popens:
            with contextlib.suppress(subprocess.TimeoutExpired):
                popen.wait(timeout=10)


# -- phases -----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Mark:
    """Where every counter stood at one moment."""

    at: float
    chainguard: int  # index into the emulator's request log
    operator_cpu: float
    bench_cpu: float
    cluster_cpu: dict[str, tuple[int, float]]  # name -> (pid, CPU seconds)
    metrics: dict[tuple[str, observe.Labels], float] | None = None  # the operator's; None if unreadable
    log_offset: int = 0  # bytes of the operator's log
    hog_cpu: float = 0.0  # CPU seconds of the --cpu-hog loops


def _cpu(pid: int) -> float:
    stats = observe.process_stats(pid)
    return stats.cpu_s if stats is not None else 0.0


class Bench:
    def __init__(
        self,
        options: Options,
        backend: backends.Backend,
        operator: OperatorProcess,
        run_id: str,
        hog: CpuHog | None = None,
    ) -> None:
        self.o = options
        self.b = backend
        self.operator = operator
        self.hog = hog
        self.run_id = run_id
        self.namespaces = namespaces_of(run_id, options.namespaces)
        self.selector = f"{RUN_LABEL}={self.run_id}"
        self.watcher = observe.Watcher(backend.client, ALL_PATH, self.selector)
        self.sampler: observe.RssSampler | None = None
        self.phases: dict[str, dict[str, Any]] = {}
        self.spans: dict[str, tuple[Mark, Mark]] = {}  # each phase's first and last mark

    # -- counters ------------------------------------------------------------------------------------

    async def mark(self) -> Mark:
        try:
            metrics: dict[tuple[str, observe.Labels], float] | None = await self.operator.metrics()
        except httpx.HTTPError:
            metrics = None
        try:
            log_offset = self.operator.log.stat().st_size
        except OSError:
            log_offset = 0
        return Mark(
            at=time.monotonic(),
            chainguard=len(self.b.chainguard.requests),
            operator_cpu=_cpu(self.operator.pid),
            bench_cpu=_cpu(os.getpid()),
            cluster_cpu={name: (pid, _cpu(pid)) for name, pid in self.b.cluster_pids().items()},
            metrics=metrics,
            log_offset=log_offset,
            hog_cpu=self.hog.cpu_s() if self.hog is not None else 0.0,
        )

    def since(self, start: Mark, end: Mark) -> dict[str, Any]:
        """What happened between two marks: time, CPU of everyone, Chainguard calls by route."""
        requests = self.b.chainguard.requests[start.chainguard : end.chainguard]
        api = [r for r in requests if not r.path.startswith("/sts/")]
        return {
            "seconds": round(end.at - start.at, 3),
            "operator_cpu_s": round(end.operator_cpu - start.operator_cpu, 3),
            "bench_cpu_s": round(end.bench_cpu - start.bench_cpu, 3),
            # A process restarted in between (the API server, at a key rotation) counts from its start.
            "cluster_cpu_s": {
                name: round(
                    cpu
                    - (start.cluster_cpu[name][1] if start.cluster_cpu.get(name, (0, 0))[0] == pid else 0),
                    3,
                )
                for name, (pid, cpu) in end.cluster_cpu.items()
            },
            "chainguard_calls": len(api),
            "chainguard_writes": sum(1 for r in api if r.method != "GET"),
            "chainguard_reads": sum(1 for r in api if r.method == "GET"),
            "chainguard_errors": sum(1 for r in api if r.status >= 400 or r.status == 0),
            "sts_exchanges": len(requests) - len(api),
            "chainguard_by_route": observe.counts(f"{r.method} {_route(r.path)} {r.status}" for r in api),
        }

    def load(self, start: Mark, end: Mark) -> dict[str, Any]:
        """Whether load turned into retries between two marks: the operator's own count of its
        Chainguard API calls and of those not answered 2xx (``chainguard_api_requests_total``, every try
        of its client; code ``error``: no answer), what the emulator answered with an error status (STS
        included), the reconcile passes by outcome, and the operator's log in between."""
        requests = self.b.chainguard.requests[start.chainguard : end.chainguard]
        refused = [r for r in requests if r.status >= 400 or r.status == 0]
        figures: dict[str, Any] = {
            "seconds": round(end.at - start.at, 3),
            "chainguard_requests": None,
            "chainguard_errors": None,
            "chainguard_errors_by_route": {},
            "emulator_errors": len(refused),
            "emulator_errors_by_route": observe.counts(
                f"{r.method} {_route(r.path)} {r.status}" for r in refused
            ),
            "transient_passes": None,
            "passes_by_outcome": {},
            "retries_per_identity": None,
            "cpu_hog_cpu_s": round(end.hog_cpu - start.hog_cpu, 3),
        }
        if start.metrics is not None and end.metrics is not None:
            calls = observe.delta(end.metrics, start.metrics, "chainguard_api_requests_total")
            errors = {key: n for key, n in calls.items() if not dict(key).get("code", "").startswith("2")}
            passes = observe.delta(end.metrics, start.metrics, "chainguard_identity_reconciles_total")
            outcomes = {dict(key).get("outcome", ""): int(n) for key, n in sorted(passes.items())}
            sent = int(sum(calls.values()))
            figures.update(
                chainguard_requests=sent,
                chainguard_errors=int(sum(errors.values())),
                chainguard_errors_by_route={
                    "{method} {route} {code}".format(**dict(key)): int(n) for key, n in sorted(errors.items())
                },
                # The metric's outcome is the pass's phase; every spec here is valid, so a pass that
                # ended other than ready ended in a failure, which the operator retries with backoff.
                transient_passes=sum(n for outcome, n in outcomes.items() if outcome != "ready"),
                passes_by_outcome=outcomes,
                retries_per_identity=round(sent / self.o.n, 3) if self.o.n else None,
            )
        figures.update(_log_slice(self.operator.log, start.log_offset, end.log_offset))
        return figures

    def retry_storm(self) -> dict[str, dict[str, Any]]:
        """``load`` of every phase, and of the whole measured span (from the first create to the end
        of the deletion, the moments between phases included)."""
        figures = {name: self.load(start, end) for name, (start, end) in self.spans.items()}
        if "create" in self.spans and "delete" in self.spans:
            figures["total"] = self.load(self.spans["create"][0], self.spans["delete"][1])
        return figures

    async def kube_delta(
        self, before: backends.KubeCounts, own: dict[tuple[str, str], int] | None = None
    ) -> dict[str, Any]:
        """Kubernetes requests since ``before``, less ``own`` (the bench's own writes: creating,
        editing and deleting the resources)."""
        after = await self.b.kube_requests()
        own = own or {}
        delta = {
            key: count for key in after if (count := after[key] - before.get(key, 0) - own.get(key, 0)) > 0
        }
        writes = {key: count for key, count in delta.items() if key[0] in WRITE_VERBS}
        return {
            "kube_writes": sum(count for key, count in writes.items() if key[1] in OPERATOR_RESOURCES),
            "kube_other_writes": sum(
                count for key, count in writes.items() if key[1] not in OPERATOR_RESOURCES
            ),
            "kube_gets": sum(count for (verb, _), count in delta.items() if verb == "GET"),
            "kube_requests": backends.describe_counts(delta),
            "kube_bench_requests_excluded": backends.describe_counts(own),
        }

    def timeline(self, start: Mark, end: Mark, ready: Sequence[float]) -> dict[str, Any]:
        """Per second of the phase: Chainguard calls begun (identity creates apart) and resources Ready."""
        arrivals = [
            (at - start.at, method, path) for at, method, path in self.b.arrivals if start.at <= at <= end.at
        ]
        seconds = max(1, math.ceil(end.at - start.at))
        calls, creates, readies = [0] * seconds, [0] * seconds, [0] * seconds
        for at, method, path in arrivals:
            calls[min(int(at), seconds - 1)] += 1
            if method == "POST" and path.startswith("/iam/v2/identities/"):
                creates[min(int(at), seconds - 1)] += 1
        for at in ready:
            readies[min(int(at), seconds - 1)] += 1
        first = next(
            (
                at
                for at, method, path in arrivals
                if method == "POST" and path.startswith("/iam/v2/identities/")
            ),
            None,
        )
        return {
            "first_identity_create_s": _round(first, 3),
            "calls_per_s": calls,
            "identity_creates_per_s": creates,
            "ready_per_s": readies,
        }

    # -- the resources -------------------------------------------------------------------------------

    def manifest(self, index: int) -> dict[str, Any]:
        return {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "ChainguardIdentity",
            "metadata": {
                "name": f"bench-{index:05d}",
                "namespace": self.namespaces[index % len(self.namespaces)],
                "labels": {RUN_LABEL: self.run_id},
            },
            "spec": {"parent": self.b.org, "mode": _mode(self.o, index), "roles": ["registry.pull"]},
        }

    async def each(
        self, items: Sequence[Any], call: Callable[[httpx.AsyncClient, Any], Awaitable[None]]
    ) -> None:
        """``call`` for every item, CLIENT_PARALLEL at a time, on one admin client."""
        gate = asyncio.Semaphore(CLIENT_PARALLEL)
        async with self.b.client() as client:

            async def one(item: Any) -> None:
                async with gate:
                    await call(client, item)

            await asyncio.gather(*(one(item) for item in items))

    async def list_config_maps(self) -> dict[str, str]:
        found: dict[str, str] = {}
        async with self.b.client() as client:
            for namespace in self.namespaces:
                response = await client.get(
                    f"/api/v1/namespaces/{namespace}/configmaps", params={"labelSelector": MANAGED_BY}
                )
                response.raise_for_status()
                for item in response.json().get("items") or []:
                    found[f"{namespace}/{item['metadata']['name']}"] = item["metadata"]["resourceVersion"]
        return found

    async def list_events(self) -> dict[str, str]:
        """The operator's events in the bench's namespaces: name -> reason."""
        found: dict[str, str] = {}
        async with self.b.client() as client:
            for namespace in self.namespaces:
                response = await client.get(f"/api/v1/namespaces/{namespace}/events")
                response.raise_for_status()
                for item in response.json().get("items") or []:
                    if (item.get("involvedObject") or {}).get("kind") == "ChainguardIdentity":
                        found[f"{namespace}/{item['metadata']['name']}"] = str(item.get("reason"))
        return found

    # -- the phases ----------------------------------------------------------------------------------

    async def create(self) -> None:
        o = self.o
        keys = [(self.manifest(i)["metadata"]["namespace"], f"bench-{i:05d}") for i in range(o.n)]
        kube_before = await self.b.kube_requests()
        start = await self.mark()

        async def post(client: httpx.AsyncClient, index: int) -> None:
            body = self.manifest(index)
            response = await client.post(NS_PATH.format(namespace=body["metadata"]["namespace"]), json=body)
            response.raise_for_status()

        await self.each(range(o.n), post)
        submitted = time.monotonic() - start.at

        def all_ready() -> bool:
            return all((seen := self.watcher.seen.get(key)) is not None and seen.converged() for key in keys)

        timeout = max(180.0, o.n * 0.6)
        finished = await self.watcher.wait(all_ready, timeout=timeout)
        end = await self.mark()
        self.spans["create"] = (start, end)
        phase = self.since(start, end)
        phase.update(await self.kube_delta(kube_before, {("POST", PLURAL): o.n}))
        times = sorted(
            seen.first_ready - start.at
            for key in keys
            if (seen := self.watcher.seen.get(key)) is not None and seen.first_ready is not None
        )
        phase["submitted_s"] = round(submitted, 3)
        phase["finished"] = finished
        phase["ready"] = len(times)
        if not finished:
            phase["not_ready"] = _not_ready(self.watcher, keys)
        if times:
            phase["p50_s"] = round(statistics.median(times), 3)
            phase["p95_s"] = round(times[int(0.95 * (len(times) - 1))], 3)
            phase["ready_s"] = round(times[-1], 3) if finished else None
        metrics = await self.operator.metrics()
        phase["peak_in_flight"] = int(observe.total(metrics, "chainguard_api_in_flight_peak"))
        phase["timeline"] = self.timeline(start, end, times)
        self.phases["create"] = phase

    async def quiet(self) -> None:
        o = self.o
        await asyncio.sleep(2.0)  # the last passes' events and patches land
        kube_before = await self.b.kube_requests()
        config_maps = await self.list_config_maps()
        events = await self.list_events()
        modified = self.watcher.modified
        metrics_before = await self.operator.metrics()
        start = await self.mark()
        await asyncio.sleep(o.quiet_resyncs * o.resync_s)
        end = await self.mark()
        self.spans["quiet"] = (start, end)
        phase = self.since(start, end)
        phase.update(await self.kube_delta(kube_before))
        config_maps_after = await self.list_config_maps()
        events_after = await self.list_events()
        metrics_after = await self.operator.metrics()
        passes = observe.total(metrics_after, "chainguard_identity_reconciles_total") - observe.total(
            metrics_before, "chainguard_identity_reconciles_total"
        )
        phase["resyncs"] = o.quiet_resyncs
        phase["reconcile_passes"] = int(passes)
        phase["resource_writes_that_changed_something"] = self.watcher.modified - modified
        phase["config_maps_changed"] = sum(
            1 for name, version in config_maps_after.items() if config_maps.get(name) != version
        )
        phase["events_new"] = observe.counts(
            reason for name, reason in events_after.items() if name not in events
        )
        phase["chainguard_reads_per_resync"] = round(phase["chainguard_reads"] / o.quiet_resyncs, 1)
        phase["kube_gets_per_resync"] = round(phase["kube_gets"] / o.quiet_resyncs, 1)
        phase["operator_cpu_per_resync_s"] = round(phase["operator_cpu_s"] / o.quiet_resyncs, 3)
        if self.sampler is not None:
            phase["rss_median_mib"] = _round(self.sampler.median(start.at, end.at))
        self.phases["quiet"] = phase

    async def edit(self) -> None:
        live = [(seen.namespace, seen.name) for seen in self.watcher.live()]
        kube_before = await self.b.kube_requests()
        start = await self.mark()

        async def patch(client: httpx.AsyncClient, key: tuple[str, str]) -> None:
            namespace, name = key
            response = await client.patch(
                f"{NS_PATH.format(namespace=namespace)}/{name}",
                json={"spec": {"roles": list(EDIT_ROLES)}},
                headers={"Content-Type": "application/merge-patch+json"},
            )
            response.raise_for_status()

        await self.each(live, patch)
        submitted = time.monotonic() - start.at
        wanted = frozenset(EDIT_ROLES)

        def all_edited() -> bool:
            return all(
                (seen := self.watcher.seen.get(key)) is not None and seen.converged() and seen.roles == wanted
                for key in live
            )

        finished = await self.watcher.wait(all_edited, timeout=max(180.0, len(live) * 0.6))
        end = await self.mark()
        self.spans["edit"] = (start, end)
        phase = self.since(start, end)
        phase.update(await self.kube_delta(kube_before, {("PATCH", PLURAL): len(live)}))
        phase["submitted_s"] = round(submitted, 3)
        phase["finished"] = finished
        if not finished:
            phase["not_converged"] = sum(
                1
                for key in live
                if not ((s := self.watcher.seen.get(key)) is not None and s.converged() and s.roles == wanted)
            )
        self.phases["edit"] = phase

    async def rotate(self) -> None:
        o = self.o
        static = {(s.namespace, s.name): s for s in self.watcher.live() if s.mode == "Static"}
        old = {key: seen.fingerprint for key, seen in static.items()}
        identities = {seen.identity_id: key for key, seen in static.items()}
        start = await self.mark()
        await self.b.rotate_signing_key()
        restarted = await self.mark()
        kube_before = await self.b.kube_requests()  # the API server's counters restarted with it

        def all_rekeyed() -> bool:
            return all(
                (seen := self.watcher.seen.get(key)) is not None and seen.fingerprint not in ("", old[key])
                for key in static
            )

        finished = await self.watcher.wait(all_rekeyed, timeout=max(120.0, len(static) * 0.5))
        rekeyed = await self.mark()
        # Another poll interval and its spread: a second write to any identity would show by then.
        await asyncio.sleep(o.jwks_poll_s + min(30.0, o.jwks_poll_s / 10) + 3.0)
        end = await self.mark()
        self.spans["rotate"] = (start, end)
        phase = self.since(start, end)
        phase.update(await self.kube_delta(kube_before))
        requests = self.b.chainguard.requests[start.chainguard : end.chainguard]
        patches = collections.Counter(
            r.path.removeprefix("/iam/v2/identities/")
            for r in requests
            if r.method == "PATCH" and r.path.startswith("/iam/v2/identities/")
        )
        per_static = [patches.get(uid, 0) for uid in identities]
        phase["api_server_restart_s"] = round(restarted.at - start.at, 3)
        phase["rekeyed_s"] = round(rekeyed.at - start.at, 3) if finished else None
        phase["finished"] = finished
        phase["static_identities"] = len(static)
        phase["rotation_writes"] = sum(patches.values())
        phase["writes_per_static"] = observe.counts(str(count) for count in per_static)
        phase["writes_to_others"] = sum(count for uid, count in patches.items() if uid not in identities)
        phase["watch_restarts"] = self.watcher.restarts
        self.phases["rotate"] = phase

    async def delete(self) -> None:
        live = [(seen.namespace, seen.name) for seen in self.watcher.live()]
        kube_before = await self.b.kube_requests()
        start = await self.mark()
        own = 0
        singly: list[tuple[str, str]] = []
        async with self.b.client() as client:
            for namespace in self.namespaces:
                response = await client.delete(
                    NS_PATH.format(namespace=namespace), params={"labelSelector": self.selector}
                )
                if response.status_code in (404, 405):  # the emulator has no delete of a collection
                    singly += [key for key in live if key[0] == namespace]
                    continue
                response.raise_for_status()
                own += 1

        async def delete_one(client: httpx.AsyncClient, key: tuple[str, str]) -> None:
            response = await client.delete(f"{NS_PATH.format(namespace=key[0])}/{key[1]}")
            if response.status_code != 404:
                response.raise_for_status()

        await self.each(singly, delete_one)
        own += len(singly)

        def all_gone() -> bool:
            return not self.watcher.live()

        finished = await self.watcher.wait(all_gone, timeout=max(180.0, len(live) * 0.6))
        end = await self.mark()
        self.spans["delete"] = (start, end)
        phase = self.since(start, end)
        # A delete of a collection is counted as a DELETE of the resource.
        phase.update(await self.kube_delta(kube_before, {("DELETE", PLURAL): own}))
        phase["finished"] = finished
        phase["deleted"] = len(live) - len(self.watcher.live())
        phase["delete_s"] = round(end.at - start.at, 3) if finished else None
        # Each resource's time until it was gone: one held back (its finalizer run again, say) shows here.
        gone = sorted(
            (seen.deleted - start.at, f"{seen.namespace}/{seen.name}")
            for key in live
            if (seen := self.watcher.seen.get(key)) is not None and seen.deleted is not None
        )
        if gone:
            phase["gone_p50_s"] = round(statistics.median(at for at, _ in gone), 3)
            phase["gone_p95_s"] = round(gone[int(0.95 * (len(gone) - 1))][0], 3)
            phase["slowest_gone"] = {name: round(at, 3) for at, name in gone[-3:]}
        await asyncio.sleep(1.0)  # a finalizer's last call lands after its resource went
        chainguard = self.b.chainguard
        operator_identity = self.b.operator_identity
        phase["leftover_identities"] = sum(
            1
            for uid in chainguard.identities
            if uid != operator_identity and uid.startswith(self.b.org + "/")
        )
        phase["leftover_names"] = sorted(
            str(identity.get("name"))
            for uid, identity in chainguard.identities.items()
            if uid != operator_identity and uid.startswith(self.b.org + "/")
        )[:20]
        phase["identity_listings"] = _listings_racing_deletes(
            chainguard.requests[start.chainguard : len(chainguard.requests)]
        )
        phase["leftover_role_bindings"] = sum(
            1
            for binding in chainguard.role_bindings.values()
            if (binding.get("identityUid") or (binding.get("identity") or {}).get("uid")) != operator_identity
        )
        self.phases["delete"] = phase

    async def cleanup(self) -> None:
        """What a failed run left: strip the finalizers of its resources, then delete its namespaces."""
        with contextlib.suppress(httpx.HTTPError):
            async with self.b.client() as client:
                response = await client.get(ALL_PATH, params={"labelSelector": self.selector})
                for item in response.json().get("items") or [] if response.status_code == 200 else []:
                    meta = item["metadata"]
                    await client.patch(
                        f"{NS_PATH.format(namespace=meta['namespace'])}/{meta['name']}",
                        json={"metadata": {"finalizers": None}},
                        headers={"Content-Type": "application/merge-patch+json"},
                    )
        with contextlib.suppress(httpx.HTTPError):
            await self.b.delete_namespaces(self.namespaces)


def namespaces_of(run_id: str, count: int) -> list[str]:
    return [f"bench-{run_id}-{i:02d}" for i in range(count)]


def _round(value: float | None, digits: int = 1) -> float | None:
    return round(value, digits) if value is not None else None


def _route(path: str) -> str:
    for prefix in ("/iam/v2/identities/", "/iam/v2/roleBindings/"):
        if path.startswith(prefix):
            return prefix + "{uid}"
    return path


def _listings_racing_deletes(requests: Sequence[Any]) -> dict[str, int]:
    """How many paginated listings of identities had identities deleted between their first and last
    page (in the emulator's log order): an offset-paged listing then skips some that still exist."""
    listings = racing = deletes = 0
    first: int | None = None
    last = 0

    def close() -> None:
        nonlocal racing, deletes
        if first is not None:
            between = sum(
                1
                for r in requests[first:last]
                if r.method == "DELETE" and r.path.startswith("/iam/v2/identities/")
            )
            racing += 1 if between else 0
            deletes += between

    for index, request in enumerate(requests):
        if request.method != "GET" or request.path != "/iam/v2/identities":
            continue
        if request.query.get("pageToken") or request.query.get("page_token"):
            last = index
            continue
        close()
        listings += 1
        first = last = index
    close()
    return {"listings": listings, "racing_deletes": racing, "deletes_between_pages": deletes}


def _not_ready(watcher: observe.Watcher, keys: Sequence[tuple[str, str]]) -> dict[str, int]:
    reasons = []
    for key in keys:
        seen = watcher.seen.get(key)
        if seen is None:
            reasons.append("not seen")
        elif not seen.converged():
            reasons.append(seen.reason or "no Ready condition")
    return observe.counts(reasons)


def _log_slice(path: pathlib.Path, start: int, end: int) -> dict[str, Any]:
    """What the operator logged between two offsets: its handlers' retries (kopf's "failed
    temporarily" and "failed with an exception"; the finalizer's DeletionBlocked is one), passes that
    failed unexpectedly, the not-Ready reasons its reconciler logged (once per change of reason), and
    the warnings and errors by logger."""
    try:
        with path.open("rb") as handle:
            handle.seek(start)
            text = handle.read(max(0, end - start)).decode(errors="replace")
    except OSError:
        return {}
    handler_retries = unexpected = 0
    reasons: list[str] = []
    problems: list[str] = []
    for line in text.splitlines():
        parts = line.split(" ", 4)
        if len(parts) < 5:
            continue
        level, logger, message = parts[2], parts[3].rstrip(":"), parts[4]
        if logger == "kopf.objects" and (
            "failed temporarily" in message or "failed with an exception" in message
        ):
            handler_retries += 1
        if "failed unexpectedly" in message:
            unexpected += 1
        if logger == "chainguard_identity_operator.reconcile":
            words = message.split(" ", 3)  # "<namespace>/<name>: <phase> <Reason>: <message>"
            if len(words) >= 3 and words[0].endswith(":") and words[1] != "ready":
                reasons.append(f"{words[1]} {words[2].rstrip(':')}")
        if level in ("WARNING", "ERROR", "CRITICAL"):
            problems.append(f"{logger} {level}")
    return {
        "handler_retries": handler_retries,
        "passes_failed_unexpectedly": unexpected,
        "logged_not_ready": observe.counts(reasons),
        "log_warnings_and_errors": observe.counts(problems),
    }


def _log_stats(path: pathlib.Path) -> dict[str, Any]:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return {}
    lines = text.splitlines()
    return {
        "bytes": len(text.encode()),
        "lines": len(lines),
        "info": sum(1 for line in lines if " INFO " in line),
        "warnings": sum(1 for line in lines if " WARNING " in line),
        "errors": sum(1 for line in lines if " ERROR " in line),
        "tracebacks": text.count("Traceback (most recent call last)"),
        "pool_timeouts": text.count("PoolTimeout"),
        "by_logger_and_level": observe.counts(
            f"{parts[3].rstrip(':')} {parts[2]}" for line in lines if len(parts := line.split(" ", 4)) > 3
        ),
    }


# -- the run ------------------------------------------------------------------------------------------------


async def run(options: Options, *, plane: Any = None) -> dict[str, Any]:
    """Run every phase and return the figures (see the module docstring). ``plane`` is a running
    ``ControlPlane`` to use instead of starting one (the test suite's); only for ``backend="real"``."""
    async with contextlib.AsyncExitStack() as stack:
        if options.workdir is not None:
            workdir = options.workdir
            workdir.mkdir(parents=True, exist_ok=True)
        else:
            workdir = pathlib.Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="cgid-bench-")))
        started = time.monotonic()
        if options.backend == "real":
            backend = await stack.enter_async_context(
                backends.real(workdir, latency=options.latency, plane=plane)
            )
        else:
            backend = await stack.enter_async_context(backends.emulated(workdir, latency=options.latency))
        setup_s = time.monotonic() - started
        env = {key: value for key, value in os.environ.items() if not key.startswith("CGID_")}
        env.update(backend.operator_env)
        run_id = secrets.token_hex(3)
        env.update(
            {
                "CGID_CLUSTER_NAME": "bench",
                "CGID_PUBLIC_ISSUER_HOSTS": "sandbox-cluster.example",
                "CGID_RESYNC_INTERVAL": f"{options.resync_s}s",
                "CGID_JWKS_POLL_INTERVAL": f"{options.jwks_poll_s}s",
                "CGID_MAX_IN_FLIGHT": str(options.concurrency),
                "CGID_METRICS_PORT": str(_free_port()),
                "CGID_LIVENESS_PORT": "0",
                "CGID_BASE_BACKOFF": "500ms",
                "CGID_MAX_BACKOFF": "10s",
                "CGID_LOG_LEVEL": options.log_level,
                "CGID_NAMESPACES": ",".join(namespaces_of(run_id, options.namespaces)),
            }
        )
        operator = OperatorProcess(
            env, workdir / "operator.log", traced=workdir / "tracemalloc" if options.tracemalloc else None
        )
        hog = CpuHog(options.cpu_hog)
        stack.callback(hog.stop)
        atexit.register(hog.stop)
        bench = Bench(options, backend, operator, run_id, hog)
        await asyncio.gather(*(backend.add_namespace(namespace) for namespace in bench.namespaces))
        stack.push_async_callback(bench.cleanup)  # runs after the operator has stopped
        stack.callback(operator.kill_now)
        stack.push_async_callback(operator.stop)
        atexit.register(operator.kill_now)  # even if the loop is torn down some other way
        operator.start()
        await operator.wait_serving()
        spy = PySpy(options.py_spy, operator.pid)
        stack.callback(spy.kill_now)
        sampler = bench.sampler = observe.RssSampler(operator.pid)
        sampler.start()
        stack.push_async_callback(sampler.stop)
        bench.watcher.start()
        stack.push_async_callback(bench.watcher.stop)

        await asyncio.sleep(3.0)  # kopf is watching; the start-up reads are done
        idle_stats = observe.process_stats(operator.pid)
        idle_snapshot = await operator.snapshot()
        profiles: dict[str, Any] = {}
        hog.start()  # set-up is done: from here on the measured phases compete with the loops

        async def phase(name: str, step: Callable[[], Awaitable[None]]) -> None:
            spy.start(name)
            try:
                await step()
            finally:
                summary = await spy.stop()
                if summary is not None:
                    profiles[name] = summary

        await phase("create", bench.create)
        await bench.quiet()
        steady_snapshot = await operator.snapshot()
        await phase("edit", bench.edit)
        await phase("rotate", bench.rotate)
        await phase("delete", bench.delete)
        hog.stop()
        final = observe.process_stats(operator.pid)
        metrics = await operator.metrics()

        results = _figures(options, backend, bench, idle_stats, final, metrics)
        results["setup_s"] = round(setup_s, 1)
        results["operator_log"] = _log_stats(operator.log)
        results["phases"] = bench.phases
        storm = results["retry_storm"] = bench.retry_storm()
        for key in STORM_KEYS:
            results[key] = storm.get("total", {}).get(key)
        if profiles:
            results["py_spy"] = profiles
        if idle_snapshot is not None and steady_snapshot is not None:
            results["tracemalloc"] = {
                "idle": profiling.summarize_tracemalloc(idle_snapshot),
                "steady": profiling.summarize_tracemalloc(steady_snapshot),
                "growth_idle_to_steady": profiling.diff_tracemalloc(idle_snapshot, steady_snapshot),
            }
        if options.workdir is not None:
            results["workdir"] = str(workdir)
        return results
    raise AssertionError("unreachable")  # pragma: no cover - the stack never swallows


def _figures(
    options: Options,
    backend: backends.Backend,
    bench: Bench,
    idle: observe.ProcessStats | None,
    final: observe.ProcessStats | None,
    metrics: dict[tuple[str, observe.Labels], float],
) -> dict[str, Any]:
    o = options
    create = bench.phases["create"]
    quiet = bench.phases["quiet"]
    rotate = bench.phases["rotate"]
    delete = bench.phases["delete"]
    waves = math.ceil(o.n / o.concurrency)
    round_trips = create["chainguard_calls"] / o.n if o.n else 0.0
    delete_round_trips = delete["chainguard_calls"] / o.n if o.n else 0.0
    limit = waves * round_trips * o.latency
    delete_limit = waves * delete_round_trips * o.latency
    ready_s = create.get("ready_s")
    delete_s = delete.get("delete_s")
    api_errors = sum(
        value
        for (name, labels), value in metrics.items()
        if name == "chainguard_api_requests_total" and not dict(labels).get("code", "").startswith("2")
    )
    return {
        "command": " ".join(sys.argv),
        "backend": backend.name,
        "cluster": backend.version,
        "mode": o.mode,
        "n": o.n,
        "latency_ms": o.latency_ms,
        "concurrency": o.concurrency,
        "cpu_hog": o.cpu_hog,
        "namespaces": o.namespaces,
        "resync_s": o.resync_s,
        "ready_s": ready_s,
        "p50_s": create.get("p50_s"),
        "p95_s": create.get("p95_s"),
        # The clock starts at the first create; the bench's own creates take a while on a busy server.
        "submitted_s": create["submitted_s"],
        "ready_after_submitted_s": round(ready_s - create["submitted_s"], 3) if ready_s else None,
        "round_trips_per_identity": round(round_trips, 3),
        "limit_s": round(limit, 3),
        "ratio": round(ready_s / limit, 2) if ready_s and limit else None,
        "peak_in_flight": int(observe.total(metrics, "chainguard_api_in_flight_peak")),
        "create_peak_in_flight": create["peak_in_flight"],
        "avg_in_flight_create": round(create["chainguard_calls"] * o.latency / ready_s, 1)
        if ready_s
        else None,
        "chainguard_calls_per_identity": round(round_trips, 3),
        "chainguard_calls_create_by_route": create["chainguard_by_route"],
        "kube_writes_per_identity_create": round(create["kube_writes"] / o.n, 2) if o.n else None,
        "idle_kube_writes": quiet["kube_writes"],
        "idle_kube_effective_writes": quiet["resource_writes_that_changed_something"]
        + quiet["config_maps_changed"]
        + sum(quiet["events_new"].values()),
        "idle_kube_gets_per_resync": quiet["kube_gets_per_resync"],
        "idle_chainguard_writes": quiet["chainguard_writes"],
        "idle_chainguard_reads_per_resync": quiet["chainguard_reads_per_resync"],
        "idle_reconcile_passes": quiet["reconcile_passes"],
        "idle_cpu_per_resync_s": quiet["operator_cpu_per_resync_s"],
        "edit_s": bench.phases["edit"]["seconds"] if bench.phases["edit"]["finished"] else None,
        "edit_chainguard_calls_per_identity": round(bench.phases["edit"]["chainguard_calls"] / o.n, 3)
        if o.n
        else None,
        "rotation_s": rotate["rekeyed_s"],
        "rotation_writes": rotate["rotation_writes"],
        "rotation_static_identities": rotate["static_identities"],
        "rotation_writes_per_static": rotate["writes_per_static"],
        "rss_mib": {
            "idle": _round(idle.rss_mib if idle else None),
            "steady": quiet.get("rss_median_mib"),
            "peak": _round(final.hwm_mib if final else None),
        },
        "cpu_s": create["operator_cpu_s"],
        "cpu_ms_per_creation": round(1000 * create["operator_cpu_s"] / o.n, 2) if o.n else None,
        "delete_s": delete_s,
        "delete_round_trips_per_identity": round(delete_round_trips, 3),
        "delete_limit_s": round(delete_limit, 3),
        "delete_ratio": round(delete_s / delete_limit, 2) if delete_s and delete_limit else None,
        "delete_cpu_s": delete["operator_cpu_s"],
        "leftover_identities": delete["leftover_identities"],
        "leftover_role_bindings": delete["leftover_role_bindings"],
        "operator_api_errors": int(api_errors),
        "reconciles_by_outcome": {
            dict(labels).get("outcome", ""): int(value)
            for (name, labels), value in metrics.items()
            if name == "chainguard_identity_reconciles_total"
        },
    }


TABLE = (
    ("backend / cluster", lambda r: f"{r['backend']} / {r['cluster']}"),
    ("N, mode, namespaces", lambda r: f"{r['n']}, {r['mode']}, {r['namespaces']}"),
    (
        "latency, concurrency, CPU hog",
        lambda r: f"{r['latency_ms']} ms, {r['concurrency']}, {r['cpu_hog']} busy loops",
    ),
    ("all Ready (p50 / p95)", lambda r: f"{r['ready_s']} s ({r['p50_s']} / {r['p95_s']} s)"),
    (
        "all created by the bench, then Ready",
        lambda r: f"{r['submitted_s']} s, +{r['ready_after_submitted_s']} s",
    ),
    ("limit, ratio", lambda r: f"{r['limit_s']} s, {r['ratio']}"),
    ("Chainguard calls / identity", lambda r: r["chainguard_calls_per_identity"]),
    ("peak in flight (create)", lambda r: f"{r['peak_in_flight']} ({r['create_peak_in_flight']})"),
    ("avg in flight (create)", lambda r: r["avg_in_flight_create"]),
    ("operator CPU converging", lambda r: f"{r['cpu_s']} s ({r['cpu_ms_per_creation']} ms / creation)"),
    ("RSS idle -> steady (peak)", lambda r: "{idle} -> {steady} MiB ({peak})".format(**r["rss_mib"])),
    ("kube writes / identity (create)", lambda r: r["kube_writes_per_identity_create"]),
    ("idle kube writes (changed)", lambda r: f"{r['idle_kube_writes']} ({r['idle_kube_effective_writes']})"),
    ("idle kube GETs / resync", lambda r: r["idle_kube_gets_per_resync"]),
    ("idle Chainguard writes", lambda r: r["idle_chainguard_writes"]),
    ("idle Chainguard reads / resync", lambda r: r["idle_chainguard_reads_per_resync"]),
    ("idle CPU / resync", lambda r: f"{r['idle_cpu_per_resync_s']} s"),
    (
        "spec edit, all converged",
        lambda r: f"{r['edit_s']} s ({r['edit_chainguard_calls_per_identity']} calls / id)",
    ),
    ("key rotation: rekeyed", lambda r: f"{r['rotation_s']} s"),
    (
        "rotation writes",
        lambda r: (
            f"{r['rotation_writes']} for {r['rotation_static_identities']} Static "
            f"(per identity: {r['rotation_writes_per_static']})"
        ),
    ),
    ("delete all", lambda r: f"{r['delete_s']} s (limit {r['delete_limit_s']} s, ratio {r['delete_ratio']})"),
    (
        "each gone p50 / p95 (slowest)",
        lambda r: "{gone_p50_s} / {gone_p95_s} s ({slowest})".format(
            slowest=max(r["phases"]["delete"]["slowest_gone"].values()), **r["phases"]["delete"]
        ),
    ),
    ("delete calls / identity", lambda r: r["delete_round_trips_per_identity"]),
    ("leftover identities, bindings", lambda r: f"{r['leftover_identities']}, {r['leftover_role_bindings']}"),
    ("operator API errors", lambda r: r["operator_api_errors"]),
    ("Chainguard requests (errors)", lambda r: _by_phase(r, "chainguard_requests", "chainguard_errors")),
    ("emulator errors", lambda r: _by_phase(r, "emulator_errors")),
    ("transient passes", lambda r: _by_phase(r, "transient_passes")),
    ("requests / identity (retries)", lambda r: _by_phase(r, "retries_per_identity")),
    (
        "operator log",
        lambda r: "{bytes} bytes, {lines} lines, {warnings} warnings, {errors} errors".format(
            **r["operator_log"]
        ),
    ),
)


def _by_phase(results: dict[str, Any], key: str, second: str | None = None) -> str:
    """``key`` of every phase and of the total, as ``create 230 (0), quiet 4 (0), ..., total 890 (0)``."""
    parts = []
    for phase, figures in results["retry_storm"].items():
        text = f"{phase} {figures[key]}"
        if second is not None:
            text += f" ({figures[second]})"
        parts.append(text)
    return ", ".join(parts)


def print_table(results: dict[str, Any]) -> None:
    width = max(len(label) for label, _ in TABLE)
    for label, value in TABLE:
        try:
            text = str(value(results))
        except (KeyError, TypeError, ValueError):
            text = "-"
        print(f"{label:<{width}}  {text}")
    for phase, summary in (results.get("py_spy") or {}).items():
        print(f"py-spy {phase} ({summary['samples']} samples), by layer:")
        print("   " + ", ".join(f"{name} {pct}%" for name, pct in summary["by_layer_pct"]))
    traced = results.get("tracemalloc")
    if traced:
        for when in ("idle", "steady"):
            print(f"tracemalloc {when} ({traced[when]['traced_mib']} MiB traced):")
            print("   " + ", ".join(f"{name} {mib}" for name, mib in traced[when]["by_package_mib"][:10]))


def parse_args(argv: Sequence[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=1000, help="resources (default 1000)")
    parser.add_argument("--latency-ms", type=float, default=50.0, help="Chainguard latency per call (50)")
    parser.add_argument("--concurrency", type=int, default=20, help="CGID_MAX_IN_FLIGHT (20)")
    parser.add_argument("--namespaces", type=int, default=10, help="namespaces to spread over (10)")
    parser.add_argument("--mode", choices=("mixed", "static", "claimmatch"), default="mixed")
    parser.add_argument("--backend", choices=("real", "emulator"), default="real")
    parser.add_argument("--resync-s", type=float, default=20.0, help="CGID_RESYNC_INTERVAL (20)")
    parser.add_argument("--quiet-resyncs", type=int, default=3, help="resync intervals of quiet (3)")
    parser.add_argument("--jwks-poll-s", type=float, default=5.0, help="CGID_JWKS_POLL_INTERVAL (5)")
    parser.add_argument(
        "--quick", action="store_true", help="resync 3 s, 2 quiet resyncs, JWKS poll 1 s (CI)"
    )
    parser.add_argument("--json", type=pathlib.Path, help="write the figures to this file")
    parser.add_argument(
        "--py-spy", type=pathlib.Path, help="record the operator with py-spy into this folder"
    )
    parser.add_argument("--tracemalloc", action="store_true", help="run the operator under tracemalloc")
    parser.add_argument("--timeout", type=float, default=3600.0, help="stop the whole run after this (s)")
    parser.add_argument("--workdir", type=pathlib.Path, help="keep logs and state here (default: a temp dir)")
    parser.add_argument("--log-level", default="INFO", help="CGID_LOG_LEVEL of the operator")
    parser.add_argument(
        "--cpu-hog", type=int, default=0, metavar="K", help="K busy loops on the CPUs while measuring (0)"
    )
    args = parser.parse_args(argv)
    if args.n < 1 or args.concurrency < 1 or args.namespaces < 1:
        parser.error("--n, --concurrency and --namespaces must be at least 1")
    if args.cpu_hog < 0:
        parser.error("--cpu-hog must be at least 0")
    quick = {"resync_s": 3.0, "quiet_resyncs": 2, "jwks_poll_s": 1.0} if args.quick else {}
    return Options(
        n=args.n,
        latency_ms=args.latency_ms,
        concurrency=args.concurrency,
        namespaces=args.namespaces,
        mode=args.mode,
        backend=args.backend,
        resync_s=quick.get("resync_s", args.resync_s),
        quiet_resyncs=int(quick.get("quiet_resyncs", args.quiet_resyncs)),
        jwks_poll_s=quick.get("jwks_poll_s", args.jwks_poll_s),
        json=args.json,
        py_spy=args.py_spy,
        tracemalloc=args.tracemalloc,
        timeout_s=args.timeout,
        workdir=args.workdir,
        log_level=args.log_level,
        cpu_hog=args.cpu_hog,
    )


async def run_bounded(options: Options, *, plane: Any = None) -> dict[str, Any]:
    """``run`` within ``options.timeout_s``; SIGTERM cancels it too (and so stops what it started)."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    if task is not None:
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        async with asyncio.timeout(options.timeout_s):
            return await run(options, plane=plane)
    finally:
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.remove_signal_handler(signal.SIGTERM)


def report(options: Options, results: dict[str, Any]) -> None:
    """The table on stdout, and the figures in ``--json FILE``."""
    print_table(results)
    if options.json is not None:
        options.json.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
        print(f"figures written to {options.json}")


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_args(argv)
    report(options, asyncio.run(run_bounded(options)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
