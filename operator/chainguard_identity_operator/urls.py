"""What an OIDC issuer URL may be, for ``spec.issuer`` (CRD and operator) and ``CGID_ISSUER`` alike.

OpenID Connect Discovery: the issuer is an https URL with a host and no query or fragment, and it is
compared as a string with the ``iss`` of every token — so whitespace cannot be in it either. One
pattern, in RE2 syntax, so the API server's CEL rule and the operator's check agree.
"""

from __future__ import annotations

import re

ISSUER_URL_PATTERN = r"^https://[^\s/?#]+(/[^\s?#]*)?$"
ISSUER_URL = re.compile(ISSUER_URL_PATTERN)
ISSUER_URL_RULE = "an https:// URL with a host, no query or fragment, and no whitespace"
