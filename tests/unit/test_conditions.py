"""Status conditions as kstatus, Argo CD, Flux and ``kubectl wait`` read them."""

from __future__ import annotations

from typing import Any

import pytest

from chainguard_identity_operator.conditions import (
    READY,
    RECONCILING,
    STALLED,
    Health,
    Phase,
    build_conditions,
    condition,
)

T0 = "2026-11-23T10:00:00Z"
T1 = "2026-11-23T10:05:00Z"
T2 = "2026-11-23T11:00:00Z"

READY_HEALTH = Health(Phase.READY, "IdentityReady", "identity abc has 1 role(s) bound")
PROGRESSING_HEALTH = Health(Phase.PROGRESSING, "ChainguardUnavailable", "retrying: 503")
STALLED_HEALTH = Health(Phase.STALLED, "RoleNotAllowed", "spec.roles[0]: role 'owner' is not allowed")


def by_type(conditions: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in conditions}


@pytest.mark.parametrize(
    ("health", "expected"),
    [
        (
            READY_HEALTH,
            {
                READY: ("True", "IdentityReady", READY_HEALTH.message),
                RECONCILING: ("False", "Idle", "nothing to do"),
                STALLED: ("False", "NotStalled", "the spec can be satisfied"),
            },
        ),
        (
            PROGRESSING_HEALTH,
            {
                READY: ("False", "ChainguardUnavailable", PROGRESSING_HEALTH.message),
                RECONCILING: ("True", "ChainguardUnavailable", PROGRESSING_HEALTH.message),
                STALLED: ("False", "NotStalled", "the spec can be satisfied"),
            },
        ),
        (
            STALLED_HEALTH,
            {
                READY: ("False", "RoleNotAllowed", STALLED_HEALTH.message),
                RECONCILING: ("False", "Idle", "nothing to do"),
                STALLED: ("True", "RoleNotAllowed", STALLED_HEALTH.message),
            },
        ),
    ],
)
def test_each_phase_sets_all_three_conditions(
    health: Health, expected: dict[str, tuple[str, str, str]]
) -> None:
    conditions = build_conditions([], health, generation=4, now_text=T0)
    assert [c["type"] for c in conditions] == [READY, RECONCILING, STALLED]
    for item in conditions:
        assert (item["status"], item["reason"], item["message"]) == expected[item["type"]]
        assert item["observedGeneration"] == 4
        assert item["lastTransitionTime"] == T0
    # kstatus: never Stalled and Reconciling at once; Ready only when neither.
    statuses = {c["type"]: c["status"] for c in conditions}
    assert list(statuses.values()).count("True") == 1


@pytest.mark.parametrize("health", [READY_HEALTH, PROGRESSING_HEALTH, STALLED_HEALTH])
def test_unchanged_status_keeps_transition_time_and_updates_the_rest(health: Health) -> None:
    first = build_conditions([], health, generation=1, now_text=T0)
    reworded = Health(health.phase, health.reason, health.message + " (again)")
    second = build_conditions(first, reworded, generation=2, now_text=T1)
    for item in second:
        assert item["lastTransitionTime"] == T0
        assert item["observedGeneration"] == 2
    assert by_type(second)[READY]["message"].endswith("(again)")


def test_transition_time_changes_only_for_conditions_that_flip() -> None:
    ready = build_conditions([], READY_HEALTH, generation=3, now_text=T0)
    progressing = build_conditions(ready, PROGRESSING_HEALTH, generation=3, now_text=T1)
    times = {c["type"]: c["lastTransitionTime"] for c in progressing}
    assert times == {READY: T1, RECONCILING: T1, STALLED: T0}

    stalled = build_conditions(progressing, STALLED_HEALTH, generation=4, now_text=T2)
    times = {c["type"]: c["lastTransitionTime"] for c in stalled}
    assert times == {READY: T1, RECONCILING: T2, STALLED: T2}

    ready_again = build_conditions(stalled, READY_HEALTH, generation=5, now_text=T2)
    assert by_type(ready_again)[READY] == {
        "type": READY,
        "status": "True",
        "reason": "IdentityReady",
        "message": READY_HEALTH.message,
        "observedGeneration": 5,
        "lastTransitionTime": T2,
    }


def test_missing_previous_entries_and_times_get_now() -> None:
    previous = [
        {"type": READY, "status": "True", "reason": "IdentityReady"},  # no lastTransitionTime
        {"type": "SomethingElse", "status": "True", "lastTransitionTime": T0},
    ]
    conditions = build_conditions(previous, READY_HEALTH, generation=7, now_text=T1)
    assert [c["type"] for c in conditions] == [READY, RECONCILING, STALLED]
    assert {c["lastTransitionTime"] for c in conditions} == {T1}


def test_condition_lookup() -> None:
    conditions = build_conditions([], STALLED_HEALTH, generation=1, now_text=T0)
    found = condition(conditions, STALLED)
    assert found is not None
    assert found["status"] == "True"
    assert condition(conditions, "Missing") is None
