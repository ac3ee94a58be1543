"""Status conditions in the shape kstatus, Flux, Argo CD and ``kubectl wait`` read.

Three condition types, always all present so that tools never have to guess from absence:

- ``Ready``: True only when everything the spec asks for is true in Chainguard and in the cluster.
- ``Reconciling``: True while the operator is making progress or retrying a transient failure.
- ``Stalled``: True when the spec can never be satisfied as written; the reason says what to fix.

``lastTransitionTime`` changes only when a condition's status changes, as the Kubernetes API
conventions require, so a resync does not churn the object.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterable, Mapping
from typing import Any

from chainguard_identity_operator.timestamps import format_time

READY = "Ready"
RECONCILING = "Reconciling"
STALLED = "Stalled"
PULL_SECRET_READY = "PullSecretReady"
EXCHANGE_VERIFIED = "ExchangeVerified"


class Phase(enum.Enum):
    READY = "ready"
    PROGRESSING = "progressing"
    STALLED = "stalled"


@dataclasses.dataclass(frozen=True)
class Health:
    """The outcome of one pass, reduced to what the conditions say."""

    phase: Phase
    reason: str
    message: str


def build_conditions(
    previous: Iterable[Mapping[str, Any]],
    health: Health,
    *,
    generation: int,
    now_text: str,
    extra: Mapping[str, tuple[str, str, str]] | None = None,
) -> list[dict[str, Any]]:
    """The three standard conditions from ``health``, then ``extra`` ones (type → status, reason,
    message) for features a resource turned on, such as ``PullSecretReady`` and ``ExchangeVerified``."""
    ready = health.phase is Phase.READY
    wanted = {
        READY: ("True" if ready else "False", health.reason, health.message),
        RECONCILING: (
            "True" if health.phase is Phase.PROGRESSING else "False",
            health.reason if health.phase is Phase.PROGRESSING else "Idle",
            health.message if health.phase is Phase.PROGRESSING else "nothing to do",
        ),
        STALLED: (
            "True" if health.phase is Phase.STALLED else "False",
            health.reason if health.phase is Phase.STALLED else "NotStalled",
            health.message if health.phase is Phase.STALLED else "the spec can be satisfied",
        ),
        **(extra or {}),
    }
    before = {c.get("type"): c for c in previous}
    result: list[dict[str, Any]] = []
    for kind, (status, reason, message) in wanted.items():
        old = before.get(kind)
        changed = old is None or old.get("status") != status
        result.append(
            {
                "type": kind,
                "status": status,
                "reason": reason,
                "message": message,
                "observedGeneration": generation,
                "lastTransitionTime": now_text
                if changed or old is None
                else old.get("lastTransitionTime", now_text),
            }
        )
    return result


def condition(conditions: Iterable[Mapping[str, Any]], kind: str) -> Mapping[str, Any] | None:
    return next((c for c in conditions if c.get("type") == kind), None)


__all__ = [
    "READY",
    "RECONCILING",
    "STALLED",
    "Health",
    "Phase",
    "build_conditions",
    "condition",
    "format_time",
]
