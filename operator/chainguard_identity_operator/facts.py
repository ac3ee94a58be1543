"""What the cluster says about itself — its issuer and signing keys — shared by every resource.

The facts are read once per poll interval for the whole operator (``cluster.ClusterFactsCache``). A read
of the JWKS can fail (an API server restarting, a network blip); one failure must not make every Static
identity un-Ready, so the facts keep the *last good* key set with the time it was read, and a key set is
used until it is older than the staleness bound (``CGID_JWKS_MAX_STALENESS``). Past it the keys are not
trusted any more: the cluster may have rotated them during the outage.
"""

from __future__ import annotations

import dataclasses
import datetime

from chainguard_identity_operator.jwks import KeySet


@dataclasses.dataclass(frozen=True)
class ClusterFacts:
    issuer: str
    keys: KeySet | None  # the last key set read successfully, None if there never was one
    keys_read_at: datetime.datetime | None = None  # when ``keys`` was read
    keys_error: str | None = None  # why the latest read failed; None when it succeeded

    def usable_keys(self, now: datetime.datetime, max_staleness: datetime.timedelta) -> KeySet | None:
        """The key set to upload now: the last good one unless it is older than ``max_staleness``."""
        if self.keys is None or self.keys_read_at is None:
            return None
        if self.keys_error is not None and now - self.keys_read_at > max_staleness:
            return None
        return self.keys

    def keys_problem(self, now: datetime.datetime, max_staleness: datetime.timedelta) -> str:
        """Why ``usable_keys`` gave nothing, for a status message."""
        error = self.keys_error or "the cluster's JWKS has not been read yet"
        if self.keys_read_at is None:
            return error
        age = int((now - self.keys_read_at).total_seconds() // 60)
        return f"{error}; the last good key set is {age} minutes old (limit {max_staleness})"
