"""kopf's settings as the operator tunes them at start."""

from __future__ import annotations

import kopf
import pytest

from chainguard_identity_operator.handlers import FINALIZER, KOPF_PREFIX, configure_kopf


@pytest.mark.parametrize("namespaced", [False, True])
def test_kopf_scans_namespaces_only_when_watching_the_whole_cluster(namespaced: bool) -> None:
    # With CGID_NAMESPACES the names are exact: listing namespaces (not granted) would only cost kopf
    # a minute of retries at every start, measured on a real kube-apiserver.
    settings = kopf.OperatorSettings()
    configure_kopf(settings, namespaced=namespaced)
    assert settings.scanning.disabled is namespaced


def test_kopf_bookkeeping_uses_the_operator_s_own_names() -> None:
    settings = kopf.OperatorSettings()
    configure_kopf(settings)
    assert settings.persistence.finalizer == FINALIZER
    assert KOPF_PREFIX == "kopf.iam.chainguard.dev"
