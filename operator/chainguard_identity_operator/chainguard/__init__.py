"""Clients of Chainguard's API and STS, and where the operator's own API token comes from.

``ChainguardClient`` speaks the IAM v2 API with retries (a write is re-sent only on an answer
proving nothing was done; otherwise it raises ``OutcomeUnknown``), ``STSClient`` exchanges OIDC
tokens, ``StaticTokenFile``/``AssumedIdentity`` are the two token sources (their failures are
``CredentialsError``), and every failure is one of the exceptions of :mod:`.errors` (see the tree
there).
"""

from .auth import AssumedIdentity, StaticTokenFile, TokenSource
from .client import ChainguardClient, RequestHook, RetryPolicy
from .errors import (
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
)
from .sts import STSClient
from .types import ClaimMatch, ExchangedToken, Group, Identity, Role, RoleBinding, StaticKeys

__all__ = [
    "APIError",
    "AlreadyExists",
    "AssumedIdentity",
    "ChainguardClient",
    "ChainguardError",
    "ClaimMatch",
    "CredentialsError",
    "ExchangedToken",
    "Group",
    "Identity",
    "InvalidArgument",
    "NotFound",
    "OutcomeUnknown",
    "PermissionDenied",
    "RateLimited",
    "RequestHook",
    "RetryPolicy",
    "Role",
    "RoleBinding",
    "STSClient",
    "ServerError",
    "StaticKeys",
    "StaticTokenFile",
    "TokenSource",
    "TransportError",
    "Unauthenticated",
]
