"""Scrubbing secrets from text that may reach a log, a status, an event or an exception.

Servers — Chainguard's API and STS, the Kubernetes API server — may echo a presented token, whole or in
part, in an error message, and any such message can end up where people read it. ``redact`` is applied
to every message from outside before it is kept.
"""

from __future__ import annotations

import re

# Anything shaped like a JWT or a piece of one. A JWT's header and payload are base64url JSON
# objects, so each starts with "eyJ" (base64 for '{"'). Two shapes: three segments of any length
# (a whole token), or one run of at least ten characters starting with "eyJ" and followed by any
# number of ".segment" parts (a header alone, header.payload, an unsigned token) — what a server
# echoes of a token it could not parse. Over-redacting ordinary text is the cheaper mistake.
_JWT_SHAPED = re.compile(
    r"eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*(?:\.[A-Za-z0-9_-]*)*"
    r"|eyJ[A-Za-z0-9_-]{7,}(?:\.[A-Za-z0-9_-]*)*"
)


def redact(text: str, *secrets: str) -> str:
    """Replace every given secret and anything JWT-shaped (a whole token or a fragment of one) in
    ``text`` by ``[REDACTED]``."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "[REDACTED]")
    return _JWT_SHAPED.sub("[REDACTED]", text)
