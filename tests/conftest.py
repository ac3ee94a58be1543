"""Suite-wide options: the real-cluster suite is opt-in with --kubeconfig."""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--kubeconfig", default=None, help="run the e2e tests against the cluster in this kubeconfig"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--kubeconfig"):
        return
    skip = pytest.mark.skip(reason="e2e: pass --kubeconfig=PATH to run against a real cluster")
    for item in items:
        if "e2e" in item.keywords:
            item.add_marker(skip)
