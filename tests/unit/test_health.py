"""How a pass's end becomes the conditions: ``classify`` for every failure a pass can end in, and what a
pass that ran to the end still has to say (``ready``, ``service_account_missing``, ``expiry_emergency``).
Pure functions, no I/O; ``now`` is always given.
"""

from __future__ import annotations

import dataclasses
import datetime

import pytest

from chainguard_identity_operator import health
from chainguard_identity_operator.chainguard import errors
from chainguard_identity_operator.chainguard.errors import (
    AlreadyExists,
    APIError,
    ChainguardError,
    CredentialsError,
    InvalidArgument,
    NotFound,
    OutcomeUnknown,
    PermissionDenied,
    RateLimited,
    ServerError,
    TransportError,
    Unauthenticated,
    error_from_response,
)
from chainguard_identity_operator.cluster_errors import ClusterError, ConfigMapConflict, SecretConflict
from chainguard_identity_operator.conditions import Health, Phase
from chainguard_identity_operator.health import (
    FAILURES,
    AccessNotGranted,
    Failure,
    KeysUnavailable,
    NoConvergence,
    classify,
)
from chainguard_identity_operator.model import SpecError

UTC = datetime.UTC
td = datetime.timedelta
NOW = datetime.datetime(2026, 11, 23, 10, 0, 0, tzinfo=UTC)
OWN = "c95870ebffa72a258df087ea727ee92daf177e29/00000000000000aa"


@dataclasses.dataclass(frozen=True)
class Expected:
    phase: Phase
    reason: str
    transient: bool
    retry_after: float | None = None
    ambiguous: bool = False
    says: tuple[str, ...] = ()  # what the message must contain


CASES: list[tuple[str, Exception, Expected]] = [
    (
        "transport",
        TransportError("GET /iam/v2/identities: connection reset"),
        Expected(Phase.PROGRESSING, "ChainguardUnavailable", True, says=("retrying: ", "connection reset")),
    ),
    (
        "transport-retry-after",
        TransportError("GET /iam/v2/identities: timed out", retry_after=4.0),
        Expected(Phase.PROGRESSING, "ChainguardUnavailable", True, retry_after=4.0),
    ),
    (
        "outcome-unknown",
        OutcomeUnknown("POST /iam/v2/identities/org", "timed out", status=None),
        Expected(
            Phase.PROGRESSING,
            "ChainguardUnavailable",
            True,
            ambiguous=True,
            says=("outcome unknown", "looks before it writes"),
        ),
    ),
    (
        "outcome-unknown-500",
        OutcomeUnknown("PATCH /iam/v2/identities/org/x", "HTTP 500", status=500),
        Expected(Phase.PROGRESSING, "ChainguardUnavailable", True, ambiguous=True),
    ),
    (
        "credentials-transient",
        CredentialsError("STS unavailable", status=503, transient=True),
        Expected(
            Phase.PROGRESSING,
            "OperatorCredentialsUnavailable",
            True,
            says=("cannot authenticate to Chainguard", "STS unavailable"),
        ),
    ),
    (
        "credentials-refused",
        CredentialsError("verifying token: oidc: token is expired", status=403, transient=False),
        Expected(
            Phase.STALLED,
            "OperatorCredentialsFailed",
            True,  # retried at the resync: a new projected token may fix it
            says=("cannot authenticate to Chainguard", "token is expired"),
        ),
    ),
    (
        "api-error",
        APIError(418, 2, "I am a teapot"),
        Expected(Phase.PROGRESSING, "ChainguardUnavailable", True, says=("retrying: I am a teapot",)),
    ),
    (
        "invalid-argument",
        InvalidArgument(400, 3, "name must match ^[a-z0-9 ._-]{1,}$"),
        Expected(
            Phase.STALLED, "ChainguardRejected", False, says=("Chainguard rejected the request", "name must")
        ),
    ),
    (
        "unauthenticated",
        Unauthenticated(401, 16, "token expired"),
        # After the client refreshed the token once: the operator's own credentials are rejected.
        Expected(Phase.STALLED, "OperatorUnauthenticated", True, says=("token expired", "CGID_IDENTITY")),
    ),
    (
        "permission-denied",
        PermissionDenied(403, 7, "identity may not create identities"),
        Expected(
            Phase.STALLED,
            "PermissionDenied",
            True,
            says=(
                "Chainguard denied the operator",
                "may not create",
                "grant its identity a role in the parent",
            ),
        ),
    ),
    (
        "not-found",
        NotFound(404, 5, "no such group"),
        Expected(Phase.PROGRESSING, "ChainguardUnavailable", True, says=("no such group",)),
    ),
    (
        "already-exists",
        AlreadyExists(409, 10, "concurrent change"),
        Expected(Phase.PROGRESSING, "ChainguardUnavailable", True),
    ),
    (
        "rate-limited",
        RateLimited(429, 8, "slow down", retry_after=7.0),
        Expected(Phase.PROGRESSING, "ChainguardUnavailable", True, retry_after=7.0, says=("slow down",)),
    ),
    (
        "server-error",
        ServerError(503, 14, "unavailable", retry_after=12.5),
        Expected(
            Phase.PROGRESSING,
            "ChainguardUnavailable",
            True,
            retry_after=12.5,
            says=("retrying: unavailable",),
        ),
    ),
    (
        "server-error-from-response",
        error_from_response(503, b'{"code": 14, "message": "try later"}', retry_after="30"),
        Expected(Phase.PROGRESSING, "ChainguardUnavailable", True, retry_after=30.0, says=("try later",)),
    ),
    (
        "base-chainguard-error",
        ChainguardError("something else"),
        Expected(Phase.PROGRESSING, "ChainguardUnavailable", True, says=("retrying: something else",)),
    ),
    (
        "keys-unavailable",
        KeysUnavailable("JWKS read failed; the last good key set is 75 minutes old (limit 1:00:00)"),
        Expected(Phase.PROGRESSING, "ClusterKeysUnavailable", True, says=("75 minutes old",)),
    ),
    (
        "cluster-error",
        ClusterError("reading ConfigMap shop/x: HTTP 500", status=500),
        Expected(Phase.PROGRESSING, "ClusterUnavailable", True, says=("retrying: reading ConfigMap",)),
    ),
    (
        "cluster-forbidden",
        ClusterError("reading ConfigMap shop/x: Kubernetes API answered 403 Forbidden", status=403),
        Expected(Phase.STALLED, "ClusterForbidden", True, says=("denied the operator", "deploy/")),
    ),
    (
        "no-convergence",
        NoConvergence("the reconcile did not converge in 32 steps; please report this"),
        Expected(Phase.STALLED, "NotConverging", True, says=("did not converge",)),
    ),
    (
        "pull-secret-conflict",
        SecretConflict("Secret shop/pull exists and is not owned by this ChainguardIdentity"),
        Expected(Phase.STALLED, "PullSecretConflict", False, says=("not owned by this ChainguardIdentity",)),
    ),
    (
        "access-not-granted",
        AccessNotGranted("Kubernetes API answered 403 Forbidden; ... need this Role in shop"),
        Expected(Phase.STALLED, "AccessNotGranted", True, says=("need this Role",)),
    ),
    (
        "config-map-conflict",
        ConfigMapConflict("ConfigMap shop/x exists and is not owned by this ChainguardIdentity"),
        Expected(Phase.STALLED, "ConfigMapConflict", False, says=("not owned by this ChainguardIdentity",)),
    ),
    (
        "spec-error",
        SpecError("spec.parent", "exactly one of spec.parent and spec.parentName must be set"),
        Expected(Phase.STALLED, "InvalidSpec", False, says=("spec.parent: exactly one",)),
    ),
    (
        "spec-error-with-reason",
        SpecError("spec.roles[0]", "role 'owner' is not allowed", reason="RoleNotAllowed"),
        Expected(Phase.STALLED, "RoleNotAllowed", False, says=("spec.roles[0]: role 'owner'",)),
    ),
    (
        "adoption-refused",
        SpecError("spec.adopt", "identity x is managed by another resource", reason="AdoptionRefused"),
        Expected(Phase.STALLED, "AdoptionRefused", False),
    ),
]


@pytest.mark.parametrize(
    ("exc", "expected"), [(exc, want) for _, exc, want in CASES], ids=[c[0] for c in CASES]
)
def test_classify(exc: Exception, expected: Expected) -> None:
    failure = classify(exc)
    assert isinstance(failure, Failure)
    assert (failure.health.phase, failure.health.reason) == (expected.phase, expected.reason)
    assert failure.transient is expected.transient
    assert failure.retry_after == expected.retry_after
    assert failure.ambiguous is expected.ambiguous
    for text in expected.says:
        assert text in failure.health.message
    assert failure.health.phase is not Phase.READY


def _subclasses(cls: type) -> set[type]:
    found = set()
    for sub in cls.__subclasses__():
        found |= {sub, *_subclasses(sub)}
    return found


def test_every_failure_class_is_classified_above() -> None:
    # A new exception in the chainguard tree or in FAILURES must get a case of its own here.
    covered = {type(exc) for _, exc, _ in CASES}
    tree = {cls for cls in _subclasses(ChainguardError) if cls.__module__ == errors.__name__}
    assert {ChainguardError, *tree} <= covered
    assert set(FAILURES) <= covered
    assert all(issubclass(cls, FAILURES) for cls in covered)


def test_only_the_ambiguous_failure_says_to_look_before_writing() -> None:
    ambiguous = {name for name, exc, _ in CASES if classify(exc).ambiguous}
    assert ambiguous == {"outcome-unknown", "outcome-unknown-500"}


@pytest.mark.parametrize("transient", [True, False])
def test_credentials_failures_say_the_operator_cannot_authenticate_not_grant_a_role(transient: bool) -> None:
    exc = CredentialsError("exchange refused", status=503 if transient else 403, transient=transient)
    failure = classify(exc, operator_identity=OWN)
    message = failure.health.message
    assert message.startswith("the operator cannot authenticate to Chainguard: ")
    assert f"for its identity {OWN}" in message
    assert "exchange refused" in message
    assert "grant" not in message  # no role the user could grant fixes the operator's own token
    assert "role" not in message


def test_credentials_failures_transient_and_not_are_told_apart() -> None:
    transient = classify(CredentialsError("STS 503", status=503, transient=True))
    refused = classify(CredentialsError("STS 403", status=403, transient=False))
    assert transient.health.reason != refused.health.reason
    assert transient.health.phase is Phase.PROGRESSING
    assert refused.health.phase is Phase.STALLED
    assert "for its identity" not in transient.health.message  # no identity given, none named


def test_a_transient_credentials_failure_keeps_the_servers_retry_hint() -> None:
    sts = error_from_response(429, b'{"code": 8, "message": "slow down"}', retry_after="20")
    exc = errors.as_credentials_error(sts, "exchanging the operator's token")
    assert exc.transient is True
    assert exc.retry_after == 20.0
    assert classify(exc).retry_after == 20.0


def test_a_token_never_reaches_a_message() -> None:
    token = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl"
    for exc in (
        CredentialsError(f"bad token {token}", status=403),
        error_from_response(403, f'{{"code": 7, "message": "token {token} denied"}}'.encode()),
    ):
        failure = classify(exc)
        assert token not in failure.health.message
        assert "[REDACTED]" in failure.health.message


def test_anything_else_is_not_swallowed() -> None:
    bug = KeyError("a bug")
    with pytest.raises(KeyError) as caught:
        classify(bug)
    assert caught.value is bug


# ---------------------------------------------------------------------------------------------------
# What a pass that ran to the end still has to say


def test_ready() -> None:
    expires = datetime.datetime(2026, 12, 23, 10, 0, 0, 999, tzinfo=UTC)
    ready = health.ready(OWN, "Static", 2, expires)
    assert ready == Health(
        Phase.READY,
        "IdentityReady",
        f"identity {OWN} (Static) has 2 role(s) bound; keys valid until 2026-12-23T10:00:00Z",
    )
    assert (
        health.ready(OWN, "ClaimMatch", 1, None).message == f"identity {OWN} (ClaimMatch) has 1 role(s) bound"
    )


def test_service_account_missing() -> None:
    failure = health.service_account_missing("shop", "image-puller")
    assert (failure.health.phase, failure.health.reason) == (Phase.PROGRESSING, "ServiceAccountNotFound")
    assert failure.transient is True
    assert failure.ambiguous is False
    assert "shop/image-puller does not exist" in failure.health.message
    assert "no pod can use it until it is created" in failure.health.message


EXPIRES = datetime.datetime(2026, 12, 13, 10, 0, tzinfo=UTC)
RENEW_BEFORE = td(days=10)
FAILING = Health(Phase.PROGRESSING, "ChainguardUnavailable", "retrying: HTTP 503")


@pytest.mark.parametrize(
    ("now", "prefix"),
    [
        (EXPIRES - RENEW_BEFORE - td(seconds=1), None),  # not yet due: the failure as it is
        (EXPIRES - RENEW_BEFORE, "renewal is failing and the identity expires in 10d0h: "),
        (EXPIRES - td(days=1, hours=5, minutes=59), "renewal is failing and the identity expires in 1d5h: "),
        (EXPIRES - td(minutes=30), "renewal is failing and the identity expires in 0d0h: "),
        (EXPIRES, "the identity EXPIRED at 2026-12-13T10:00:00Z and could not be renewed: "),
        (EXPIRES + td(days=3), "the identity EXPIRED at 2026-12-13T10:00:00Z and could not be renewed: "),
    ],
)
def test_expiry_emergency_wording(now: datetime.datetime, prefix: str | None) -> None:
    result = health.expiry_emergency(FAILING, EXPIRES, RENEW_BEFORE, now)
    if prefix is None:
        assert result == FAILING
        return
    assert result == Health(Phase.PROGRESSING, "RenewalFailing", prefix + FAILING.message)


def test_expiry_emergency_keeps_the_phase_of_the_failure() -> None:
    stalled = Health(Phase.STALLED, "PermissionDenied", "Chainguard denied the operator")
    result = health.expiry_emergency(stalled, EXPIRES, RENEW_BEFORE, EXPIRES + td(hours=1))
    assert result.phase is Phase.STALLED
    assert result.reason == "RenewalFailing"
    assert result.message.endswith("Chainguard denied the operator")


@pytest.mark.parametrize(
    ("health_", "expires", "renew_before"),
    [
        (Health(Phase.READY, "IdentityReady", "fine"), EXPIRES, RENEW_BEFORE),  # a ready pass is no emergency
        (FAILING, None, RENEW_BEFORE),  # a ClaimMatch identity never expires
        (FAILING, EXPIRES, None),  # no spec to say when renewal is due
    ],
)
def test_expiry_emergency_only_for_a_failing_static_identity(
    health_: Health, expires: datetime.datetime | None, renew_before: td | None
) -> None:
    assert health.expiry_emergency(health_, expires, renew_before, EXPIRES + td(days=1)) == health_
