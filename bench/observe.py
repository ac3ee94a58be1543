"""What the bench reads without touching the operator's code: /proc, Prometheus text, the resources.

- ``ProcessStats``: CPU seconds (utime + stime) and resident memory of one process, from ``/proc/<pid>``;
  ``VmHWM`` is the kernel's own high-water mark of RSS, so the peak is exact, not sampled.
- ``RssSampler``: RSS every half second, so a phase can report its median (the "steady" figure).
- ``parse_prometheus``: the text format, as ``(name, labels) -> value`` (enough for counters and gauges);
  ``total`` sums a metric's series, ``delta`` is how much each series of a counter grew between two scrapes.
- ``Watcher``: one watch over every benchmarked ``ChainguardIdentity`` (label selector), resumed after an
  API server restart (a key rotation restarts it); it keeps each resource's last state and when it first
  became Ready, and counts the MODIFIED events — each one a write that changed the object in etcd.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import json
import os
import pathlib
import re
import statistics
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import httpx

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
MIB = 1024 * 1024


@dataclasses.dataclass(frozen=True)
class ProcessStats:
    cpu_s: float
    rss_mib: float
    hwm_mib: float  # the peak RSS since the process started


def process_stats(pid: int) -> ProcessStats | None:
    """CPU and memory of ``pid``; None once it is gone."""
    try:
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
        status = pathlib.Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    # The command name is in parentheses and may hold spaces: count fields after the last ")".
    fields = stat[stat.rindex(")") + 2 :].split()
    cpu = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime (fields 14 and 15)
    memory = {}
    for line in status.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            memory[key] = int(value.split()[0]) * 1024 / MIB  # kB
    return ProcessStats(cpu, memory.get("VmRSS", 0.0), memory.get("VmHWM", 0.0))


def children(parent: int) -> dict[str, int]:
    """The direct children of ``parent`` by command name (the control plane's etcd, kube-apiserver, ...)."""
    found: dict[str, int] = {}
    for entry in pathlib.Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        if ppid == parent:
            found[name] = int(entry.name)
    return found


class RssSampler:
    """Samples a process's RSS every ``interval`` seconds while running."""

    def __init__(self, pid: int, interval: float = 0.5) -> None:
        self.pid = pid
        self.interval = interval
        self.samples: list[tuple[float, float]] = []  # (monotonic time, MiB)
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            stats = process_stats(self.pid)
            if stats is not None:
                self.samples.append((time.monotonic(), stats.rss_mib))
            await asyncio.sleep(self.interval)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="rss sampler")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def median(self, start: float, end: float) -> float | None:
        values = [mib for when, mib in self.samples if start <= when <= end]
        return statistics.median(values) if values else None

    def peak(self, start: float, end: float) -> float | None:
        values = [mib for when, mib in self.samples if start <= when <= end]
        return max(values) if values else None


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')

Labels = tuple[tuple[str, str], ...]


def parse_prometheus(text: str, names: Iterable[str] | None = None) -> dict[tuple[str, Labels], float]:
    """Samples of the text format; only the metrics in ``names`` when given (an API server's /metrics
    holds two megabytes of histograms)."""
    wanted = set(names) if names is not None else None
    samples: dict[tuple[str, Labels], float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        if wanted is not None and not any(line.startswith(name) for name in wanted):
            continue
        match = _SAMPLE.match(line)
        if match is None:
            continue
        name, _, labels, value = match.groups()
        if wanted is not None and name not in wanted:
            continue
        key = tuple(sorted(_LABEL.findall(labels or "")))
        samples[(name, key)] = float(value)
    return samples


def total(samples: Mapping[tuple[str, Labels], float], name: str, **match: str) -> float:
    """The sum of ``name``'s samples whose labels include ``match``."""
    return sum(
        value
        for (metric, labels), value in samples.items()
        if metric == name and all((key, want) in labels for key, want in match.items())
    )


def delta(
    after: Mapping[tuple[str, Labels], float], before: Mapping[tuple[str, Labels], float], name: str
) -> dict[Labels, float]:
    """How much each series of the counter ``name`` grew from ``before`` to ``after`` (a series absent
    before counts from 0; series that did not move are left out)."""
    grown: dict[Labels, float] = {}
    for (metric, labels), value in after.items():
        if metric == name and (change := value - before.get((metric, labels), 0.0)) > 0:
            grown[labels] = change
    return grown


# -- the resources ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class Seen:
    """One resource as the watch last showed it."""

    namespace: str
    name: str
    generation: int = 0
    observed_generation: int = 0
    ready: bool = False
    first_ready: float | None = None  # monotonic
    identity_id: str = ""
    mode: str = ""
    fingerprint: str = ""
    roles: frozenset[str] = frozenset()
    resource_version: str = ""
    deleted: float | None = None  # monotonic
    reason: str = ""  # of the Ready condition

    def converged(self) -> bool:
        return self.ready and self.observed_generation >= self.generation


def _summarize(seen: Seen, obj: Mapping[str, Any]) -> None:
    meta = obj.get("metadata") or {}
    status = obj.get("status") or {}
    seen.generation = int(meta.get("generation") or 0)
    seen.resource_version = str(meta.get("resourceVersion") or "")
    seen.observed_generation = int(status.get("observedGeneration") or 0)
    ready = [c for c in status.get("conditions") or [] if c.get("type") == "Ready"]
    seen.ready = any(c.get("status") == "True" for c in ready)
    seen.reason = str(ready[0].get("reason") or "") if ready else ""
    seen.identity_id = str(status.get("identityId") or "")
    seen.mode = str(status.get("mode") or "")
    seen.fingerprint = str((status.get("keys") or {}).get("fingerprint") or "")
    seen.roles = frozenset(str(b.get("role")) for b in status.get("roleBindings") or [])


class Watcher:
    """Every benchmarked resource, kept current by one watch (see the module docstring)."""

    def __init__(self, make_client: Callable[[], httpx.AsyncClient], path: str, selector: str) -> None:
        self._make_client = make_client
        self._path = path
        self._selector = selector
        self.seen: dict[tuple[str, str], Seen] = {}
        self.modified = 0  # MODIFIED events: writes that changed a resource
        self.restarts = 0
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="resource watch")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def _apply(self, kind: str, obj: Mapping[str, Any], now: float) -> None:
        meta = obj.get("metadata") or {}
        key = (str(meta.get("namespace")), str(meta.get("name")))
        seen = self.seen.get(key)
        if kind == "DELETED":
            if seen is not None and seen.deleted is None:
                seen.deleted = now
            return
        if seen is None or seen.deleted is not None:
            seen = self.seen[key] = Seen(*key)
        elif kind == "MODIFIED":
            self.modified += 1
        _summarize(seen, obj)
        if seen.ready and seen.first_ready is None:
            seen.first_ready = now

    async def _list(self, client: httpx.AsyncClient) -> str:
        response = await client.get(self._path, params={"labelSelector": self._selector})
        response.raise_for_status()
        body = response.json()
        now = time.monotonic()
        present = set()
        for obj in body.get("items") or []:
            meta = obj["metadata"]
            present.add((meta["namespace"], meta["name"]))
            self._apply("ADDED", obj, now)
        for key, seen in self.seen.items():  # deleted while the watch was down
            if key not in present and seen.deleted is None:
                seen.deleted = now
        self._changed.set()
        return str(body["metadata"]["resourceVersion"])

    async def _run(self) -> None:
        version = ""
        while True:
            try:
                async with self._make_client() as client:
                    if not version:
                        version = await self._list(client)
                    params = {
                        "labelSelector": self._selector,
                        "watch": "true",
                        "allowWatchBookmarks": "true",
                        "resourceVersion": version,
                        "timeoutSeconds": "300",
                    }
                    async with client.stream(
                        "GET", self._path, params=params, timeout=httpx.Timeout(10, read=330)
                    ) as response:
                        if response.status_code == 410:
                            version = ""
                            continue
                        response.raise_for_status()
                        async for line in response.aiter_lines():
                            if not line.strip():
                                continue
                            event = json.loads(line)
                            kind, obj = event.get("type"), event.get("object") or {}
                            if kind == "ERROR":
                                if obj.get("code") == 410:
                                    version = ""
                                break
                            version = str((obj.get("metadata") or {}).get("resourceVersion") or version)
                            if kind in ("ADDED", "MODIFIED", "DELETED"):
                                self._apply(kind, obj, time.monotonic())
                                self._changed.set()
            except (httpx.HTTPError, ValueError, KeyError):
                # The API server restarted (a key rotation) or the stream broke: watch again shortly.
                self.restarts += 1
                await asyncio.sleep(0.2)

    async def wait(self, predicate: Callable[[], bool], *, timeout: float) -> bool:
        """Until ``predicate()`` holds (re-checked on every change); False after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while not predicate():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(left, 1.0))
        return True

    def live(self) -> list[Seen]:
        return [seen for seen in self.seen.values() if seen.deleted is None]


def counts(items: Iterable[str]) -> dict[str, int]:
    return dict(sorted(collections.Counter(items).items()))
