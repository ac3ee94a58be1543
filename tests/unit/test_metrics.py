"""The Prometheus registry and its HTTP endpoint."""

from __future__ import annotations

import datetime
import socket

import httpx

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
        f'chainguard_identity_expiration_timestamp_seconds{{name="we\\"ird",namespace="shop"}} {WHEN.timestamp():g}'
        in lines
    )
