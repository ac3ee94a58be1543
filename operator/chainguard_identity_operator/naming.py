"""Deterministic identity names, and the ownership marker in identity descriptions.

Names are ``<cluster>.<namespace>.<name>`` so that a crash between creating an identity and recording
its UIDP can be repaired by finding the identity again under the parent. Kubernetes names can be longer
than Chainguard's 63-character limit, so long names keep a readable prefix and end in a hash of the
whole. Names are for humans and for finding; they prove nothing: Chainguard does not keep names unique,
and two clusters may well share a cluster name.

The description starts with a marker naming the cluster and the object. The marker is the operator's
only proof of ownership, and the cluster in it is the *cluster ID* — the UID of the cluster's
``kube-system`` namespace, which no two clusters share — beside the readable cluster name::

    managed-by=chainguard-identity-operator cluster=prod cluster-id=3f0c…-…-9a1e object=shop/puller

An identity is adopted after a crash, corrected, or deleted only when its marker names this cluster ID
and this object. Identities made before cluster IDs existed carry a *legacy* marker without one
(``… cluster=prod object=shop/puller``); ``parse_marker`` reads both, and the reconcile accepts a legacy
marker only for the identity a resource's own status already records, then rewrites it in place.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re

MAX_NAME = 63
MAX_DESCRIPTION = 512
_MARKER_PREFIX = "managed-by=chainguard-identity-operator"
_SEPARATOR = "; "
_MARKER = re.compile(
    re.escape(_MARKER_PREFIX)
    + r" cluster=(?P<cluster>[a-z0-9-]+)(?: cluster-id=(?P<cluster_id>[A-Za-z0-9-]+))?"
    + r" object=(?P<namespace>[a-z0-9-]+)/(?P<name>[a-z0-9.-]+)(?=$|; )"
)


@dataclasses.dataclass(frozen=True)
class Owner:
    """The object that owns an identity, as its marker names it (``cluster_id`` None: legacy marker)."""

    cluster_name: str
    cluster_id: str | None
    namespace: str
    name: str

    def describe(self) -> str:
        where = f"cluster {self.cluster_name}" + (f" ({self.cluster_id})" if self.cluster_id else "")
        return f"ChainguardIdentity {self.namespace}/{self.name} in {where}"


def identity_name(cluster: str, namespace: str, name: str) -> str:
    full = f"{cluster}.{namespace}.{name}"
    if len(full) <= MAX_NAME:
        return full
    digest = hashlib.sha256(full.encode()).hexdigest()[:12]
    return f"{full[: MAX_NAME - len(digest) - 1].rstrip('.-')}-{digest}"


def ownership_marker(owner: Owner) -> str:
    cluster_id = f" cluster-id={owner.cluster_id}" if owner.cluster_id else ""
    return f"{_MARKER_PREFIX} cluster={owner.cluster_name}{cluster_id} object={owner.namespace}/{owner.name}"


def identity_description(owner: Owner, extra: str = "") -> str:
    marker = ownership_marker(owner)
    text = f"{marker}{_SEPARATOR}{extra}" if extra else marker
    return text[:MAX_DESCRIPTION]


def parse_marker(description: str) -> Owner | None:
    """The owner a description's marker names, or None when it carries no marker of this operator."""
    found = _MARKER.match(description)
    if found is None:
        return None
    return Owner(
        cluster_name=found["cluster"],
        cluster_id=found["cluster_id"],
        namespace=found["namespace"],
        name=found["name"],
    )


def is_managed(description: str) -> bool:
    """Whether any instance of this operator claims the identity (possibly another cluster's)."""
    return description.startswith(_MARKER_PREFIX + " ")
