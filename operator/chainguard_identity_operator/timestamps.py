"""RFC 3339 timestamps as Chainguard's gateway and the Kubernetes API write them.

Both sides of the operator speak this format — Chainguard's ``createTime`` and ``expirationTime``, the
status fields and conditions the operator writes — so it lives apart from either client.
"""

from __future__ import annotations

import datetime


def parse_time(value: object) -> datetime.datetime | None:
    """Parse an RFC 3339 timestamp as the gateway sends it; ``None``/``""`` mean unset."""
    if not value or not isinstance(value, str):
        return None
    text = value.strip()
    if text.endswith("Z"):
        text = text[:-1] + "+00:00"
    # Go emits up to nanoseconds; Python's fromisoformat takes at most microseconds.
    if "." in text:
        head, _, rest = text.partition(".")
        digits = ""
        while rest and rest[0].isdigit():
            digits, rest = digits + rest[0], rest[1:]
        text = f"{head}.{digits[:6].ljust(6, '0')}{rest}"
    parsed = datetime.datetime.fromisoformat(text)
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=datetime.UTC)
    return parsed.astimezone(datetime.UTC)


def format_time(value: datetime.datetime) -> str:
    """Format a datetime as RFC 3339 UTC with ``Z`` and whole seconds."""
    return value.astimezone(datetime.UTC).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")
