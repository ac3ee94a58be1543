"""Deterministic identity names and the ownership marker in identity descriptions.

Names are ``<cluster>.<namespace>.<name>`` so that a crash between creating an identity and recording
its UIDP can be repaired by looking the name up under the parent. Kubernetes names can be longer than
Chainguard's 63-character limit, so long names keep a readable prefix and end in a hash of the whole.

The description starts with a marker naming the cluster and the object. It is the operator's proof of
ownership: an identity is only ever adopted after a crash, or deleted, when its marker names this
cluster and this object.
"""

from __future__ import annotations

import hashlib

MAX_NAME = 63
MAX_DESCRIPTION = 512
_MARKER_PREFIX = "managed-by=chainguard-identity-operator"
_SEPARATOR = "; "


def identity_name(cluster: str, namespace: str, name: str) -> str:
    full = f"{cluster}.{namespace}.{name}"
    if len(full) <= MAX_NAME:
        return full
    digest = hashlib.sha256(full.encode()).hexdigest()[:12]
    return f"{full[: MAX_NAME - len(digest) - 1].rstrip('.-')}-{digest}"


def ownership_marker(cluster: str, namespace: str, name: str) -> str:
    return f"{_MARKER_PREFIX} cluster={cluster} object={namespace}/{name}"


def identity_description(cluster: str, namespace: str, name: str, extra: str = "") -> str:
    marker = ownership_marker(cluster, namespace, name)
    text = f"{marker}{_SEPARATOR}{extra}" if extra else marker
    return text[:MAX_DESCRIPTION]


def is_owned_by(description: str, cluster: str, namespace: str, name: str) -> bool:
    marker = ownership_marker(cluster, namespace, name)
    return description == marker or description.startswith(marker + _SEPARATOR)


def is_managed(description: str) -> bool:
    """Whether any instance of this operator claims the identity (possibly another cluster's)."""
    return description.startswith(_MARKER_PREFIX + " ")
