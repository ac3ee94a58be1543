"""What the cluster says about itself: which key set a Static identity may be given, and why none when
there is none. One failed JWKS read must not take every Static identity down; keys older than the
staleness bound must not be uploaded. Pure, ``now`` always given.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from chainguard_identity_operator.facts import ClusterFacts
from chainguard_identity_operator.jwks import KeySet, parse_jwks

UTC = datetime.UTC
td = datetime.timedelta
NOW = datetime.datetime(2026, 11, 23, 10, 0, tzinfo=UTC)
BOUND = td(hours=1)  # Settings.jwks_max_staleness by default
ISSUER = "https://kubernetes.default.svc.cluster.local"
ERROR = "reading the cluster's JWKS: HTTP 503"


@pytest.fixture
def keys(ec_private_keys: tuple[ec.EllipticCurvePrivateKey, ...], public_jwk: Callable[..., Any]) -> KeySet:
    return parse_jwks({"keys": [public_jwk(ec_private_keys[0], "k1")]})


def test_fresh_keys_are_used(keys: KeySet) -> None:
    facts = ClusterFacts(issuer=ISSUER, keys=keys, keys_read_at=NOW)
    assert facts.usable_keys(NOW, BOUND) is keys
    assert facts.usable_keys(NOW + td(minutes=5), BOUND) is keys


@pytest.mark.parametrize(
    ("age", "usable"),
    [
        (td(0), True),
        (td(minutes=59), True),
        (BOUND, True),  # at the bound itself: still trusted
        (BOUND + td(seconds=1), False),
        (td(days=2), False),
    ],
)
def test_after_a_failed_read_the_last_good_keys_are_used_until_the_bound(
    keys: KeySet, age: td, usable: bool
) -> None:
    facts = ClusterFacts(issuer=ISSUER, keys=keys, keys_read_at=NOW - age, keys_error=ERROR)
    assert facts.usable_keys(NOW, BOUND) is (keys if usable else None)


def test_the_bound_is_the_one_given(keys: KeySet) -> None:
    facts = ClusterFacts(issuer=ISSUER, keys=keys, keys_read_at=NOW - td(hours=2), keys_error=ERROR)
    assert facts.usable_keys(NOW, td(hours=1)) is None
    assert facts.usable_keys(NOW, td(hours=3)) is keys


def test_a_successful_read_after_a_failure_is_fresh_again(keys: KeySet) -> None:
    stale = ClusterFacts(issuer=ISSUER, keys=keys, keys_read_at=NOW - td(hours=3), keys_error=ERROR)
    assert stale.usable_keys(NOW, BOUND) is None
    recovered = ClusterFacts(issuer=ISSUER, keys=keys, keys_read_at=NOW)
    assert recovered.usable_keys(NOW, BOUND) is keys


@pytest.mark.parametrize("error", [None, ERROR])
def test_never_read_keys_are_never_used(keys: KeySet, error: str | None) -> None:
    assert ClusterFacts(issuer=ISSUER, keys=None, keys_error=error).usable_keys(NOW, BOUND) is None
    # Keys without a time they were read at cannot be judged fresh.
    assert ClusterFacts(issuer=ISSUER, keys=keys, keys_error=error).usable_keys(NOW, BOUND) is None


def test_keys_problem_names_the_error_the_age_and_the_bound(keys: KeySet) -> None:
    facts = ClusterFacts(
        issuer=ISSUER, keys=keys, keys_read_at=NOW - td(minutes=75, seconds=30), keys_error=ERROR
    )
    assert facts.usable_keys(NOW, BOUND) is None
    problem = facts.keys_problem(NOW, BOUND)
    assert problem.startswith(ERROR)
    assert "75 minutes old" in problem
    assert f"limit {BOUND}" in problem


def test_keys_problem_without_keys_says_why() -> None:
    assert ClusterFacts(issuer=ISSUER, keys=None, keys_error=ERROR).keys_problem(NOW, BOUND) == ERROR
    never = ClusterFacts(issuer=ISSUER, keys=None).keys_problem(NOW, BOUND)
    assert never == "the cluster's JWKS has not been read yet"
