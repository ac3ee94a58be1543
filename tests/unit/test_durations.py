"""Go-style durations: what the CRD's ``static.validFor``/``renewBefore`` and the CGID_* timings accept."""

from __future__ import annotations

import datetime

import pytest

from chainguard_identity_operator.durations import format_duration, parse_duration

td = datetime.timedelta


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("720h", td(days=30)),
        ("1h30m", td(minutes=90)),
        ("90s", td(seconds=90)),
        ("1.5h", td(minutes=90)),
        ("90m", td(minutes=90)),
        ("240h0m0s", td(hours=240)),  # how Go prints a duration
        ("1h1m1s", td(hours=1, minutes=1, seconds=1)),
        ("250ms", td(milliseconds=250)),
        ("1500us", td(microseconds=1500)),
        ("1500µs", td(microseconds=1500)),
        ("2.5s", td(seconds=2.5)),
        (" 8760h ", td(days=365)),  # surrounding whitespace from an env var or YAML block
    ],
)
def test_parse_accepts_go_durations(text: str, expected: datetime.timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "10",  # no unit
        "h",  # no number
        "-1h",  # negative
        "+1h",
        "",
        "   ",
        "1h 30m",  # inner space
        "1d",  # days are not a Go unit
        "1H",  # units are case-sensitive
        "1.h",
        ".5h",
        "1h30",  # trailing number without unit
        "h1",
        "1e3s",
        "720hours",
    ],
)
def test_parse_rejects_what_is_not_a_duration(text: str) -> None:
    with pytest.raises(ValueError, match=r"duration"):
        parse_duration(text)


def test_parse_error_names_the_offending_text() -> None:
    with pytest.raises(ValueError, match=r"'10x'"):
        parse_duration("10x")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (td(days=30), "720h"),
        (td(hours=240), "240h"),
        (td(minutes=90), "1h30m"),
        (td(seconds=90), "1m30s"),
        (td(hours=1, seconds=1), "1h1s"),
        (td(seconds=59), "59s"),
        (td(0), "0s"),
    ],
)
def test_format(value: datetime.timedelta, expected: str) -> None:
    assert format_duration(value) == expected


@pytest.mark.parametrize(
    "value",
    [td(seconds=1), td(seconds=61), td(hours=23, minutes=59, seconds=59), td(days=365), td(hours=240)],
)
def test_format_then_parse_round_trips(value: datetime.timedelta) -> None:
    assert parse_duration(format_duration(value)) == value


@pytest.mark.parametrize("text", ["720h", "1h30m", "1m30s", "30s", "2h5s", "45m"])
def test_parse_then_format_round_trips_canonical_text(text: str) -> None:
    assert format_duration(parse_duration(text)) == text
