"""Go-style durations (``720h``, ``1h30m``, ``90s``), the format of the CRD's ``static`` fields.

Kubernetes users write durations the way Go prints them (cert-manager's ``duration``/``renewBefore`` do
the same), and the CRD's CEL rules compare them with CEL's ``duration()``, which reads the same format.
"""

from __future__ import annotations

import datetime
import re

_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")


def parse_duration(text: str) -> datetime.timedelta:
    """Parse a positive Go duration; raise ``ValueError`` with the offending text otherwise."""
    value = text.strip()
    if not value:
        raise ValueError("empty duration")
    position = 0
    seconds = 0.0
    for match in _PART.finditer(value):
        if match.start() != position:
            break
        seconds += float(match.group(1)) * _UNITS[match.group(2)]
        position = match.end()
    if position != len(value):
        raise ValueError(f"{text!r} is not a duration like 720h, 90m or 1h30m")
    return datetime.timedelta(seconds=seconds)


def format_duration(value: datetime.timedelta) -> str:
    """Format whole seconds the way Go does for the common cases (``240h0m0s`` → ``240h``)."""
    total = int(value.total_seconds())
    hours, rest = divmod(total, 3600)
    minutes, seconds = divmod(rest, 60)
    parts = [f"{hours}h" if hours else "", f"{minutes}m" if minutes else "", f"{seconds}s" if seconds else ""]
    return "".join(parts) or "0s"
