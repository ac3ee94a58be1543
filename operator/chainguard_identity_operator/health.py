"""How a pass went, as the conditions say it: pure functions from a pass's end to its ``Health``.

``classify`` turns the exception that ended a pass into a ``Failure``: what phase the resource is in,
a reason a program can match, a message a person can act on, and whether (and how soon) to try again.
``health`` adds what a pass that ran to the end still has to say — a service account that does not
exist yet, a static identity past its renewal time — and otherwise reports Ready. Every branch is in
``tests/unit/test_health.py``; the reconcile uses these functions and decides nothing of its own.
"""

from __future__ import annotations

import dataclasses
import datetime

from chainguard_identity_operator.chainguard.errors import (
    APIError,
    ChainguardError,
    CredentialsError,
    InvalidArgument,
    OutcomeUnknown,
    PermissionDenied,
    Unauthenticated,
    redact,
)
from chainguard_identity_operator.chainguard.types import format_time
from chainguard_identity_operator.cluster_errors import ClusterError, ConfigMapConflict, SecretConflict
from chainguard_identity_operator.conditions import Health, Phase
from chainguard_identity_operator.model import SpecError


class KeysUnavailable(Exception):
    """The cluster's JWKS cannot be read and the last good key set is too old to trust."""


class AccessNotGranted(Exception):
    """The tenant has not granted the operator what spec.pullSecret or spec.verifyExchange needs; the
    message holds the exact Role to apply."""


class NoConvergence(Exception):
    """A pass needed more actions than any reconcile should: a bug, reported rather than spun on."""


@dataclasses.dataclass(frozen=True)
class Failure:
    health: Health
    transient: bool  # worth retrying soon with backoff (else: at the next resync or spec change)
    retry_after: float | None = None
    ambiguous: bool = False  # a write may have happened: look before writing again


FAILURES = (
    SpecError,
    ConfigMapConflict,
    SecretConflict,
    ChainguardError,
    ClusterError,
    KeysUnavailable,
    NoConvergence,
    AccessNotGranted,
)


def classify(exc: Exception, *, operator_identity: str | None = None) -> Failure:
    """The failure an exception that ended a pass stands for (it must be one of ``FAILURES``).

    Its message goes to status, an event and the log, so anything shaped like a token is scrubbed from
    it here, whichever server's words it carries (a Kubernetes reason phrase is as untrusted as
    Chainguard's).
    """
    failure = _classify(exc, operator_identity)
    health = failure.health
    return dataclasses.replace(failure, health=Health(health.phase, health.reason, redact(health.message)))


def _classify(exc: Exception, operator_identity: str | None) -> Failure:
    if isinstance(exc, SpecError):
        return Failure(Health(Phase.STALLED, exc.reason, str(exc)), transient=False)
    if isinstance(exc, ConfigMapConflict):
        return Failure(Health(Phase.STALLED, "ConfigMapConflict", str(exc)), transient=False)
    if isinstance(exc, SecretConflict):
        return Failure(Health(Phase.STALLED, "PullSecretConflict", str(exc)), transient=False)
    if isinstance(exc, AccessNotGranted):
        # Retried: granting the Role is all it takes, and nothing else tells the operator it happened.
        return Failure(Health(Phase.STALLED, "AccessNotGranted", str(exc)), transient=True)
    if isinstance(exc, CredentialsError):
        who = f" for its identity {operator_identity}" if operator_identity else ""
        message = (
            f"the operator cannot authenticate to Chainguard: exchanging its own token{who} failed: "
            f"{exc.message}"
        )
        if exc.transient:
            health = Health(Phase.PROGRESSING, "OperatorCredentialsUnavailable", message)
            return Failure(health, transient=True, retry_after=exc.retry_after)
        return Failure(Health(Phase.STALLED, "OperatorCredentialsFailed", message), transient=True)
    if isinstance(exc, Unauthenticated):
        message = (
            f"Chainguard rejected the operator's own API token: {exc.message}; check CGID_IDENTITY and that "
            "the identity exists"
        )
        return Failure(Health(Phase.STALLED, "OperatorUnauthenticated", message), transient=True)
    if isinstance(exc, PermissionDenied):
        message = f"Chainguard denied the operator: {exc.message}; grant its identity a role in the parent"
        return Failure(Health(Phase.STALLED, "PermissionDenied", message), transient=True)
    if isinstance(exc, InvalidArgument):
        message = f"Chainguard rejected the request: {exc.message}"
        return Failure(Health(Phase.STALLED, "ChainguardRejected", message), transient=False)
    if isinstance(exc, OutcomeUnknown):
        message = f"retrying: {exc}; the next attempt looks before it writes"
        return Failure(Health(Phase.PROGRESSING, "ChainguardUnavailable", message), True, ambiguous=True)
    if isinstance(exc, ChainguardError):
        text = exc.message if isinstance(exc, APIError) else str(exc)
        health = Health(Phase.PROGRESSING, "ChainguardUnavailable", f"retrying: {text}")
        return Failure(health, transient=True, retry_after=exc.retry_after)
    if isinstance(exc, KeysUnavailable):
        return Failure(Health(Phase.PROGRESSING, "ClusterKeysUnavailable", f"retrying: {exc}"), True)
    if isinstance(exc, ClusterError) and exc.status == 403:
        message = f"the Kubernetes API denied the operator: {exc}; apply the ClusterRole in deploy/"
        return Failure(Health(Phase.STALLED, "ClusterForbidden", message), transient=True)
    if isinstance(exc, ClusterError):
        return Failure(Health(Phase.PROGRESSING, "ClusterUnavailable", f"retrying: {exc}"), True)
    if isinstance(exc, NoConvergence):
        return Failure(Health(Phase.STALLED, "NotConverging", str(exc)), transient=True)
    raise exc


def ready(identity_id: str, mode: str, roles: int, expires_at: datetime.datetime | None) -> Health:
    text = f"identity {identity_id} ({mode}) has {roles} role(s) bound"
    if expires_at is not None:
        text += f"; keys valid until {format_time(expires_at)}"
    return Health(Phase.READY, "IdentityReady", text)


def service_account_missing(namespace: str, name: str) -> Failure:
    message = (
        f"the service account {namespace}/{name} does not exist; the identity is ready for it, but no pod "
        "can use it until it is created"
    )
    return Failure(Health(Phase.PROGRESSING, "ServiceAccountNotFound", message), transient=True)


def expiry_emergency(
    health: Health,
    expires_at: datetime.datetime | None,
    renew_before: datetime.timedelta | None,
    now: datetime.datetime,
) -> Health:
    """A failing pass past the renewal time is an emergency: say how long the identity has left."""
    if health.phase is Phase.READY or expires_at is None or renew_before is None:
        return health
    if now < expires_at - renew_before:
        return health
    left = expires_at - now
    if left <= datetime.timedelta(0):
        message = f"the identity EXPIRED at {format_time(expires_at)} and could not be renewed: "
    else:
        hours = int(left.total_seconds() // 3600)
        message = f"renewal is failing and the identity expires in {hours // 24}d{hours % 24}h: "
    return Health(health.phase, "RenewalFailing", message + health.message)
