"""The Prometheus registry and its HTTP endpoint.

The rendered text is read back with the official client's parser, so a value the format cannot
carry exactly (``1.79802e+09`` for a timestamp) or a line Prometheus would refuse fails a test.
"""

from __future__ import annotations

import datetime
import socket

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from chainguard_identity_operator.metrics import Metrics, MetricsServer

WHEN = datetime.datetime(2026, 12, 23, 10, 0, tzinfo=datetime.UTC)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_identity_series_and_forgetting() -> None:
    metrics = Metrics()
    metrics.observe_identity("shop", "ci", ready=True, expires_at=WHEN, renew_at=WHEN, rotated="renewal")
    metrics.observe_identity("shop", "ci", ready=False, expires_at=WHEN, renew_at=None, rotated="renewal")
    assert metrics.value("chainguard_identity_ready", namespace="shop", name="ci") == 0.0
    assert (
        metrics.value("chainguard_identity_expiration_timestamp_seconds", namespace="shop", name="ci")
        == WHEN.timestamp()
    )
    assert metrics.value("chainguard_identity_renewal_timestamp_seconds", namespace="shop", name="ci") is None
    assert (
        metrics.value("chainguard_identity_rotations_total", namespace="shop", name="ci", reason="renewal")
        == 2
    )
    metrics.forget_identity("shop", "ci")
    assert metrics.value("chainguard_identity_ready", namespace="shop", name="ci") is None
    assert (
        metrics.value("chainguard_identity_rotations_total", namespace="shop", name="ci", reason="renewal")
        is None
    )


def test_api_requests_by_method_route_and_code() -> None:
    metrics = Metrics()
    for status in (200, 200, 503, None):
        metrics.observe_api_request("GET", "/iam/v2/identities/{uid}", status)
    route = "/iam/v2/identities/{uid}"
    assert metrics.value("chainguard_api_requests_total", method="GET", route=route, code="200") == 2
    assert metrics.value("chainguard_api_requests_total", method="GET", route=route, code="503") == 1
    assert metrics.value("chainguard_api_requests_total", method="GET", route=route, code="error") == 1


async def test_the_endpoint_serves_the_text_format() -> None:
    metrics = Metrics()
    metrics.observe_identity("shop", 'we"ird', ready=True, expires_at=WHEN, renew_at=WHEN, rotated=None)
    port = free_port()
    server = MetricsServer(metrics, port, host="127.0.0.1")
    await server.start()
    try:
        async with httpx.AsyncClient() as client:
            response = await client.get(f"http://127.0.0.1:{port}/metrics")
    finally:
        await server.stop()
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    lines = response.text.splitlines()
    assert "# TYPE chainguard_identity_ready gauge" in lines
    assert "# TYPE chainguard_identity_rotations_total counter" in lines
    assert 'chainguard_identity_ready{name="we\\"ird",namespace="shop"} 1' in lines
    assert (
        'chainguard_identity_expiration_timestamp_seconds{name="we\\"ird",namespace="shop"} 1798020000'
        in lines
    )
    assert parsed(response.text)["chainguard_identity_ready"] == [
        ({"namespace": "shop", "name": 'we"ird'}, 1.0)
    ]


def parsed(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Every sample of the exposition by sample name, as Prometheus's own parser reads it."""
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return samples


def test_timestamps_are_rendered_exactly() -> None:
    metrics = Metrics()
    expires = datetime.datetime.fromtimestamp(1798021053, datetime.UTC)
    renew = datetime.datetime.fromtimestamp(1798021053.25, datetime.UTC)
    metrics.observe_identity("shop", "ci", ready=True, expires_at=expires, renew_at=renew, rotated=None)
    text = metrics.render()
    assert "1.79802e+09" not in text
    samples = parsed(text)
    labels = {"namespace": "shop", "name": "ci"}
    assert samples["chainguard_identity_expiration_timestamp_seconds"] == [(labels, 1798021053.0)]
    assert samples["chainguard_identity_renewal_timestamp_seconds"] == [(labels, 1798021053.25)]
    assert 'chainguard_identity_expiration_timestamp_seconds{name="ci",namespace="shop"} 1798021053\n' in text


def test_counters_keep_counting_past_a_million() -> None:
    metrics = Metrics()
    route = "/iam/v2/identities/{uid}"
    for _ in range(3):
        metrics.observe_api_request("GET", route, 200)
    series = metrics._values["chainguard_api_requests_total"]
    key = next(iter(series))
    series[key] = 1_234_567.0  # as if it had counted that far
    before = parsed(metrics.render())["chainguard_api_requests_total"]
    metrics.observe_api_request("GET", route, 200)
    after = parsed(metrics.render())["chainguard_api_requests_total"]
    labels = {"method": "GET", "route": route, "code": "200"}
    assert before == [(labels, 1_234_567.0)]
    assert after == [(labels, 1_234_568.0)]


@pytest.mark.parametrize(
    ("value", "rendered"),
    [
        (0.0, "0"),
        (1.0, "1"),
        (-3.0, "-3"),
        (2.0**53, "9007199254740992"),
        (0.1, "0.1"),
        (1798021053.123456, "1798021053.123456"),
        (1e300, "1e+300"),
        (float("inf"), "+Inf"),
        (float("-inf"), "-Inf"),
        (float("nan"), "NaN"),
    ],
)
def test_values_render_in_the_text_format(value: float, rendered: str) -> None:
    metrics = Metrics()
    metrics._values["chainguard_identity_ready"][(("name", "x"), ("namespace", "y"))] = value
    text = metrics.render()
    assert f'chainguard_identity_ready{{name="x",namespace="y"}} {rendered}\n' in text
    (sample,) = parsed(text)["chainguard_identity_ready"]
    if value == value:
        assert sample[1] == value
    else:
        assert sample[1] != sample[1]  # NaN


def test_gauges_read_at_render_time_are_exported() -> None:
    metrics = Metrics()
    in_flight = [3]
    metrics.gauge("chainguard_api_in_flight", lambda: in_flight[0])
    in_flight[0] = 7
    families = {f.name: f for f in text_string_to_metric_families(metrics.render())}
    (sample,) = families["chainguard_api_in_flight"].samples
    assert sample.value == 7
    assert metrics.value("chainguard_api_in_flight") == 7
