"""Prometheus metrics: when identities expire and renew, how often they rotate, whether they are Ready,
and every Chainguard API request by method, route and status code.

A static identity that silently nears expiry is the failure this operator exists to prevent, so its
expiry and renewal times are exported as timestamps an alert can compare with ``time()``. The registry
is a few dictionaries rendered in the Prometheus text format and served by aiohttp (already a kopf
dependency), which keeps the operator's dependency list to what it needs. Values are rendered exactly
(:func:`format_value`): a whole number as an integer, anything else as Python's shortest round-trip
``repr``, so a timestamp such as 1798021053 never becomes ``1.79802e+09`` and a counter past a million
keeps moving; the tests read the output back with the official client's parser.
"""

from __future__ import annotations

import collections
import datetime
import logging
import math
from collections.abc import Callable

from aiohttp import web

logger = logging.getLogger(__name__)

Labels = tuple[tuple[str, str], ...]

_HELP = {
    "chainguard_identity_expiration_timestamp_seconds": ("gauge", "When the static identity's keys expire."),
    "chainguard_identity_renewal_timestamp_seconds": (
        "gauge",
        "When the static identity is due for renewal.",
    ),
    "chainguard_identity_rotations_total": ("counter", "Renewals and replacements of identities, by reason."),
    "chainguard_identity_ready": ("gauge", "1 when the ChainguardIdentity is Ready, else 0."),
    "chainguard_identity_reconciles_total": ("counter", "Finished reconcile passes, by outcome."),
    "chainguard_api_requests_total": ("counter", "Chainguard API requests by method, route and status code."),
    "chainguard_api_in_flight": (
        "gauge",
        "Chainguard API requests in flight now (bounded by CGID_MAX_IN_FLIGHT).",
    ),
    "chainguard_api_in_flight_peak": (
        "gauge",
        "The most Chainguard API requests in flight at once since start.",
    ),
}


def _labels(**values: str) -> Labels:
    return tuple(sorted(values.items()))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


# Whole numbers up to 2**53 are exact in a float; past that a float's digits are not all meaningful.
_EXACT_INTEGERS = 2.0**53


def format_value(value: float) -> str:
    """A sample value in the text format: exact, never rounded to six digits like ``{:g}``."""
    value = float(value)  # an int has no is_integer() before Python 3.12
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value.is_integer() and abs(value) <= _EXACT_INTEGERS:
        return str(int(value))
    return repr(value)


class Metrics:
    def __init__(self) -> None:
        self._values: dict[str, dict[Labels, float]] = collections.defaultdict(dict)
        self._gauges: dict[str, Callable[[], float]] = {}  # read when rendered
        # Each resource's series, so forgetting one deleted resource is not a scan of everyone's.
        self._series_of: dict[tuple[str, str], set[tuple[str, Labels]]] = collections.defaultdict(set)

    def gauge(self, metric: str, read: Callable[[], float]) -> None:
        """A gauge whose value is read from ``read`` whenever the metrics are rendered."""
        self._gauges[metric] = read

    # -- updates ------------------------------------------------------------------------------------

    def observe_api_request(self, method: str, route: str, status: int | None) -> None:
        key = _labels(method=method, route=route, code=str(status) if status is not None else "error")
        series = self._values["chainguard_api_requests_total"]
        series[key] = series.get(key, 0.0) + 1

    def observe_identity(
        self,
        namespace: str,
        name: str,
        *,
        ready: bool,
        expires_at: datetime.datetime | None,
        renew_at: datetime.datetime | None,
        rotated: str | None,
        phase: str = "",
    ) -> None:
        key = _labels(namespace=namespace, name=name)
        mine = self._series_of[(namespace, name)]
        self._values["chainguard_identity_ready"][key] = 1.0 if ready else 0.0
        mine.add(("chainguard_identity_ready", key))
        if phase:
            passes = self._values["chainguard_identity_reconciles_total"]
            outcome = _labels(outcome=phase)
            passes[outcome] = passes.get(outcome, 0.0) + 1
        for metric, when in (
            ("chainguard_identity_expiration_timestamp_seconds", expires_at),
            ("chainguard_identity_renewal_timestamp_seconds", renew_at),
        ):
            if when is None:
                self._values[metric].pop(key, None)
            else:
                self._values[metric][key] = when.timestamp()
                mine.add((metric, key))
        if rotated is not None:
            rotation = _labels(namespace=namespace, name=name, reason=rotated)
            series = self._values["chainguard_identity_rotations_total"]
            series[rotation] = series.get(rotation, 0.0) + 1
            mine.add(("chainguard_identity_rotations_total", rotation))

    def total(self, metric: str) -> float:
        """The sum of every series of ``metric`` (for tests and the bench)."""
        return sum(self._values.get(metric, {}).values())

    def forget_identity(self, namespace: str, name: str) -> None:
        for metric, key in self._series_of.pop((namespace, name), set()):
            self._values[metric].pop(key, None)

    # -- reading ------------------------------------------------------------------------------------

    def value(self, metric: str, **labels: str) -> float | None:
        """One sample, for tests and the sandbox; ``None`` when the series does not exist."""
        if metric in self._gauges and not labels:
            return self._gauges[metric]()
        return self._values.get(metric, {}).get(_labels(**labels))

    def render(self) -> str:
        lines: list[str] = []
        for metric, (kind, text) in _HELP.items():
            lines.append(f"# HELP {metric} {text}")
            lines.append(f"# TYPE {metric} {kind}")
            if metric in self._gauges:
                lines.append(f"{metric} {format_value(self._gauges[metric]())}")
            for key, value in sorted(self._values.get(metric, {}).items()):
                rendered = ",".join(f'{k}="{_escape(v)}"' for k, v in key)
                lines.append(f"{metric}{{{rendered}}} {format_value(value)}")
        return "\n".join(lines) + "\n"


class MetricsServer:
    """``GET /metrics`` on the given port."""

    def __init__(self, metrics: Metrics, port: int, host: str = "0.0.0.0") -> None:  # noqa: S104 - in a pod
        self._metrics = metrics
        self._port = port
        self._host = host
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._serve)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, self._host, self._port).start()
        logger.info("serving metrics on :%d/metrics", self._port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _serve(self, _: web.Request) -> web.Response:
        return web.Response(text=self._metrics.render(), content_type="text/plain", charset="utf-8")
