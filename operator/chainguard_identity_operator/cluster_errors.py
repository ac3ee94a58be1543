"""The exceptions of the Kubernetes side, apart from its client so that pure code can name them.

``cluster.ClusterClient`` raises them; ``health.classify`` turns them into conditions without importing
the client (or the ``kubernetes`` package) — the import-linter contracts in ``pyproject.toml`` hold the
decision modules to that.
"""

from __future__ import annotations


class ClusterError(Exception):
    """The Kubernetes API answered with an error, or could not be reached. Transient unless said."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class ConfigMapConflict(Exception):
    """A ConfigMap with the wanted name exists and belongs to something else; it is left untouched."""


class SecretConflict(Exception):
    """A Secret with the pull secret's name exists and belongs to something else; it is left untouched."""
