"""An emulator of the Chainguard registry's pull path (``cgr.dev``): Docker Registry v2 / OCI distribution.

:class:`RegistryEmulator` is its own aiohttp server on loopback, another host than the API (a real
client keys its credentials by host), built on a :class:`~cgid_testkit.chainguard.ChainguardEmulator`
whose state it reads: the repositories (``repos``, owned by groups), the identities, the role bindings
and the clock. It answers the requests a real client (docker, crane, skopeo, containerd) makes to
pull, in the order they make them:

1. ``GET /v2/`` without credentials → 401 with ``WWW-Authenticate: Bearer realm="http://HOST/token",
   service="NAME"``; with a valid registry bearer → 200 ``{}``.
2. ``GET /token?service=NAME&scope=repository:<org>/<repo>:pull`` with ``Authorization: Basic
   base64("_token:<Chainguard token>")`` → ``{"token", "access_token", "expires_in": 300,
   "issued_at"}``, a short-lived bearer the registry signs itself (HS256, its own secret). The
   Chainguard token is verified as a relying party verifies it: the signature against the emulator's
   published JWKS (``kid`` included), ``iss`` the STS, ``aud`` this registry's name, unexpired (and
   not before its ``nbf``) by the emulator's clock, ``sub`` an identity that exists and holds the
   ``registry.pull`` capability on the group owning each requested repository (on it or an
   ancestor, as the API authorizes). Every refusal is 401 with a registry error body saying why
   (``{"errors": [{"code": "UNAUTHORIZED" | "DENIED", "message", "detail"}]}``). A request without
   scope (``docker login``) only checks the credentials. Push actions are never granted.
3. ``GET``/``HEAD /v2/<org>/<repo>/manifests/<tag|digest>``, ``/v2/<org>/<repo>/blobs/<digest>`` and
   ``GET /v2/<org>/<repo>/tags/list`` with that bearer → a small valid OCI image: an image manifest
   (``application/vnd.oci.image.manifest.v1+json``) naming a config blob and one gzipped tar layer,
   every digest the real sha256 of the bytes served, with ``Docker-Content-Digest``, Content-Type and
   Content-Length (HEAD: the same headers, no body). Without a bearer, or with one that is expired,
   forged or for another repository → 401 with the challenge (its ``scope``, and ``error=
   "invalid_token"`` or ``"insufficient_scope"``). An unknown repository in an organization the caller
   may pull from → 404 ``NAME_UNKNOWN``; an unknown tag or digest → 404 ``MANIFEST_UNKNOWN`` /
   ``BLOB_UNKNOWN``.

The path's first segment is the organization: a root group's ``name`` (``my-org.example/python`` is
repository ``python`` of the group named ``my-org.example``, or of a folder under it). Each repository
serves one image, tagged ``latest``, whose bytes depend only on the repository's path
(:meth:`RegistryEmulator.image`); tests compare what a client got with it. ``requests`` records every
request (method, path, query, status, the kind of credentials, the subject, the refusal) — never a
token or a password.

The registry's *name* — the ``aud`` it accepts, the ``service`` of its challenge — is its own
``host:port`` unless given (``name="cgr.dev"`` to accept tokens minted for the real registry's
audience). Not emulated: pushing and deleting (uploads, ``PUT``, ``DELETE``: 404/405), the catalog,
referrers, image indexes and multi-platform images, cross-repository mounts, OAuth2 ``POST /token``
(only the GET basic-auth flow that docker, crane and skopeo use with a password), refresh tokens,
anonymous pulls of public images (every repository here is private), rate limits, TLS (plain HTTP on
loopback: clients need their ``--insecure``/``--tls-verify=false``), and what cgr.dev answers in cases
Chainguard does not document (e.g. which error code a denied pull gets).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import datetime
import gzip
import hashlib
import io
import json
import logging
import re
import secrets
import tarfile
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any, TypeGuard

import jwt
from aiohttp import web
from aiohttp.typedefs import Handler

from cgid_testkit.chainguard import STS_ISSUER, ChainguardEmulator
from chainguard_identity_operator.chainguard.types import format_time

logger = logging.getLogger(__name__)

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
PULL_CAPABILITY = "registry.pull"
TOKEN_LIFETIME = datetime.timedelta(seconds=300)
TAGS = ("latest",)
NBF_LEEWAY = datetime.timedelta(minutes=5)

_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
_SCOPE_RE = re.compile(r"^repository:(?P<name>[^:]+):(?P<actions>[a-z*,]*)$")
_SUBJECT = web.RequestKey("subject", str)
_API_VERSION = {"Docker-Distribution-API-Version": "registry/2.0"}
# Signature only: PyJWT checks exp/nbf against the real time, the registry against the emulator's clock.
_SIGNATURE_ONLY: jwt.types.Options = {
    "verify_signature": True,
    "verify_exp": False,
    "verify_nbf": False,
    "verify_iat": False,
    "verify_aud": False,
    "verify_iss": False,
}


class RegistryError(Exception):
    """A registry error answer: ``{"errors": [{"code", "message", "detail"}]}`` with its HTTP status,
    and for a 401 on the ``/v2/`` API the ``WWW-Authenticate`` challenge to send."""

    def __init__(
        self, status: int, code: str, message: str, *, challenge: str | None = None, detail: Any = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.challenge = challenge
        self.detail = detail

    def response(self) -> web.Response:
        body = {"errors": [{"code": self.code, "message": self.message, "detail": self.detail}]}
        headers = dict(_API_VERSION)
        if self.challenge is not None:
            headers["WWW-Authenticate"] = self.challenge
        return web.json_response(body, status=self.status, headers=headers)


@dataclasses.dataclass(frozen=True)
class RegistryRequest:
    """One request the registry answered. ``credentials`` is ``""``, ``"basic"`` or ``"bearer"``;
    ``subject`` the identity a verified token named; ``error`` the refusal's message ("" on success)."""

    method: str
    path: str
    query: Mapping[str, tuple[str, ...]]
    status: int
    credentials: str = ""
    subject: str = ""
    error: str = ""


@dataclasses.dataclass(frozen=True)
class Blob:
    media_type: str
    data: bytes

    @property
    def digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.data).hexdigest()

    def descriptor(self) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": len(self.data)}


@dataclasses.dataclass(frozen=True)
class Image:
    """One single-platform OCI image: the manifest's bytes (as served) and the blobs it names."""

    manifest: Blob
    config: Blob
    layer: Blob

    @property
    def digest(self) -> str:
        return self.manifest.digest

    @property
    def blobs(self) -> dict[str, Blob]:
        return {blob.digest: blob for blob in (self.config, self.layer)}


def build_image(repository: str) -> Image:
    """The image a repository serves: deterministic bytes (fixed times and owners) naming the repository."""
    content = f"emulated image of {repository}\n".encode()
    tar_bytes = io.BytesIO()
    with tarfile.open(fileobj=tar_bytes, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for directory in ("etc",):
            info = tarfile.TarInfo(directory)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 0
            tar.addfile(info)
        info = tarfile.TarInfo("etc/emulated-image")
        info.size, info.mode, info.mtime = len(content), 0o644, 0
        tar.addfile(info, io.BytesIO(content))
    uncompressed = tar_bytes.getvalue()
    layer = Blob(OCI_LAYER, gzip.compress(uncompressed, mtime=0))
    config = {
        "architecture": "amd64",
        "os": "linux",
        "created": "2026-01-01T00:00:00Z",
        "config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Labels": {"dev.chainguard.emulator.repository": repository},
        },
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(uncompressed).hexdigest()]},
        "history": [{"created": "2026-01-01T00:00:00Z", "created_by": "cgid_testkit.registry"}],
    }
    config_blob = Blob(OCI_CONFIG, _canonical(config))
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": config_blob.descriptor(),
        "layers": [layer.descriptor()],
    }
    return Image(manifest=Blob(OCI_MANIFEST, _canonical(manifest)), config=config_blob, layer=layer)


@dataclasses.dataclass(frozen=True)
class _Repo:
    path: str  # "<org>/<repo>", as in the URL
    owner: str  # the group whose repos list holds it


class RegistryEmulator:
    """The registry's pull path on its own loopback port; see the module docstring."""

    def __init__(self, chainguard: ChainguardEmulator, *, name: str | None = None) -> None:
        self.chainguard = chainguard
        self._name = name
        self.requests: list[RegistryRequest] = []
        self._secret = secrets.token_bytes(32)  # signs the registry's own bearer tokens
        self._images: dict[str, Image] = {}
        self._runner: web.AppRunner | None = None
        self._host = ""

    # -- lifecycle ----------------------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        """Serve on ``host:port`` (0: any free port) in the running event loop."""
        if self._runner is not None:
            raise RuntimeError("the registry emulator is already running")
        app = web.Application(middlewares=[self._middleware])
        router = app.router
        router.add_get("/v2/", self._base)
        router.add_get("/token", self._token)
        router.add_get("/v2/{name:.+}/manifests/{reference}", self._manifest)
        router.add_get("/v2/{name:.+}/blobs/{digest}", self._blob)
        router.add_get("/v2/{name:.+}/tags/list", self._tags)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port).start()
        except BaseException:
            await runner.cleanup()
            raise
        bound_port = runner.addresses[0][1]
        self._runner = runner
        self._host = f"[{host}]:{bound_port}" if ":" in host else f"{host}:{bound_port}"
        logger.debug("registry emulator listening on %s as %s", self._host, self.name)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> RegistryEmulator:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT``: what an image reference starts with and a docker config is keyed by."""
        if not self._host:
            raise RuntimeError("the registry emulator is not started")
        return self._host

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    @property
    def name(self) -> str:
        """The audience it accepts and the ``service`` it names: ``name=`` or else :attr:`host`."""
        return self._name if self._name is not None else self.host

    def image(self, repository: str) -> Image:
        """The image ``<org>/<repo>`` serves (whether or not that repository exists)."""
        if repository not in self._images:
            self._images[repository] = build_image(repository)
        return self._images[repository]

    def challenge(self, scope: str | None = None, error: str | None = None) -> str:
        """The ``WWW-Authenticate`` value of a 401 on the ``/v2/`` API."""
        challenge = f'Bearer realm="{self.url}/token",service="{self.name}"'
        if scope is not None:
            challenge += f',scope="{scope}"'
        if error is not None:
            challenge += f',error="{error}"'
        return challenge

    # -- plumbing -------------------------------------------------------------------------------------

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        error = ""
        try:
            response = await handler(request)
        except RegistryError as refusal:
            response, error = refusal.response(), refusal.message
        except web.HTTPException as failure:
            code = {404: "NAME_UNKNOWN", 405: "UNSUPPORTED"}.get(failure.status, "UNKNOWN")
            response = RegistryError(failure.status, code, failure.reason).response()
            error = failure.reason
        except Exception:
            logger.exception("registry emulator failed on %s %s", request.method, request.path)
            response = RegistryError(500, "UNKNOWN", "internal error in the registry emulator").response()
            error = "internal error"
        self.requests.append(
            RegistryRequest(
                method=request.method,
                path=request.path,
                query={key: tuple(request.query.getall(key)) for key in request.query},
                status=response.status,
                credentials=_credentials_kind(request),
                subject=request.get(_SUBJECT, ""),
                error=error,
            )
        )
        logger.debug("registry emulator: %s %s -> %d", request.method, request.path, response.status)
        return response

    def _now(self) -> datetime.datetime:
        return self.chainguard.now()

    # -- token service --------------------------------------------------------------------------------

    async def _token(self, request: web.Request) -> web.Response:
        service = request.query.get("service")
        if service is not None and service != self.name:
            raise RegistryError(400, "UNSUPPORTED", f"service {service!r} is not this registry ({self.name})")
        subject = self._authenticate(request)
        access = [self._grant(subject, scope) for scope in _scopes(request.query.getall("scope", []))]
        now = self._now()
        token = jwt.encode(
            {
                "iss": self.url + "/token",
                "aud": self.name,
                "sub": subject,
                "iat": int(now.timestamp()),
                "exp": int((now + TOKEN_LIFETIME).timestamp()),
                "jti": secrets.token_hex(8),
                "access": access,
            },
            self._secret,
            algorithm="HS256",
        )
        body = {
            "token": token,
            "access_token": token,
            "expires_in": int(TOKEN_LIFETIME.total_seconds()),
            "issued_at": format_time(now),
        }
        return web.json_response(body, headers=_API_VERSION)

    def _authenticate(self, request: web.Request) -> str:
        """The identity the basic credentials' Chainguard token names, verified; else a 401."""
        scheme, _, value = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "basic":
            raise _unauthorized(
                "authentication required: basic credentials, username _token and a Chainguard token"
                f" (aud {self.name}) as the password"
            )
        try:
            username, colon, password = base64.b64decode(value.strip(), validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            raise _unauthorized("malformed basic credentials") from None
        if not colon or username != "_token":
            raise _unauthorized(f"unknown username {username!r}: the username must be _token")
        claims = self._verify(request, password)
        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject:
            raise _unauthorized("invalid token: no subject")
        if subject not in self.chainguard.identities:
            raise _unauthorized(f"invalid token: identity {subject} does not exist")
        return subject

    def _verify(self, request: web.Request, token: str) -> dict[str, Any]:
        """A Chainguard token's claims, verified as a relying party does with the issuer's JWKS (once
        the signature holds, the subject is recorded even if a later check refuses the token)."""
        try:
            header = jwt.get_unverified_header(token)
            keys = jwt.PyJWKSet.from_dict(self.chainguard.jwks())
        except jwt.PyJWTError:
            raise _unauthorized("invalid token: malformed jwt") from None
        kid = header.get("kid")
        key = next((key for key in keys.keys if key.key_id == kid), None)
        if key is None:
            raise _unauthorized(f"invalid token: not signed by {STS_ISSUER} (no key with kid {kid!r})")
        try:
            claims: dict[str, Any] = jwt.decode(token, key=key, algorithms=["RS256"], options=_SIGNATURE_ONLY)
        except jwt.PyJWTError:
            raise _unauthorized(f"invalid token: not signed by {STS_ISSUER} (bad signature)") from None
        request[_SUBJECT] = str(claims.get("sub", ""))
        if claims.get("iss") != STS_ISSUER:
            raise _unauthorized(f"invalid token: issued by {claims.get('iss')!r}, not {STS_ISSUER}")
        audiences = _audiences(claims)
        if self.name not in audiences:
            shown = ", ".join(audiences) or "none"
            raise _unauthorized(f"invalid token: wrong audience ({shown}), this registry accepts {self.name}")
        now = self._now()
        exp = claims.get("exp")
        if not _is_number(exp) or now.timestamp() >= exp:
            expired = (
                format_time(datetime.datetime.fromtimestamp(exp, datetime.UTC)) if _is_number(exp) else ""
            )
            raise _unauthorized(f"invalid token: token is expired{f' (at {expired})' if expired else ''}")
        nbf = claims.get("nbf")
        if _is_number(nbf) and nbf > (now + NBF_LEEWAY).timestamp():
            raise _unauthorized("invalid token: token is not valid yet (nbf)")
        return claims

    def _grant(self, subject: str, scope: tuple[str, tuple[str, ...]]) -> dict[str, Any]:
        """The access granted on one requested repository: pull, if the identity may; else a 401.

        An unknown organization is refused like a forbidden one (nothing leaks); an unknown
        repository in an organization the identity may pull from is granted, so the pull gets 404.
        """
        path, actions = scope
        if "pull" not in actions and "*" not in actions:
            return {"type": "repository", "name": path, "actions": []}
        group = self._owner(path)
        if group is None or not self.chainguard.can(subject, PULL_CAPABILITY, group):
            raise RegistryError(
                401,
                "DENIED",
                f"identity {subject} is not allowed to pull {path}: it needs {PULL_CAPABILITY} on the"
                " group that owns the repository",
            )
        return {"type": "repository", "name": path, "actions": ["pull"]}

    # -- repositories -------------------------------------------------------------------------------

    def _owner(self, path: str) -> str | None:
        """The group owning repository ``<org>/<repo>``; for an unknown repo, the org; None without one."""
        repo = self._find(path)
        if repo is not None:
            return repo.owner
        org = path.partition("/")[0]
        return next(iter(self._orgs(org)), None)

    def _orgs(self, name: str) -> list[str]:
        """Root groups with this name, verified first (group names are not unique)."""
        roots = [
            uid
            for uid, group in self.chainguard.groups.items()
            if "/" not in uid and group.get("name") == name
        ]
        return sorted(roots, key=lambda uid: not self.chainguard.groups[uid].get("verified", False))

    def _find(self, path: str) -> _Repo | None:
        org, _, name = path.partition("/")
        if not name:
            return None
        for org_uid in self._orgs(org):
            for owner, repos in self.chainguard.repos.items():
                if owner != org_uid and not owner.startswith(org_uid + "/"):
                    continue
                if any(repo.get("name") == name for repo in repos):
                    return _Repo(path=path, owner=owner)
        return None

    # -- the /v2/ API ---------------------------------------------------------------------------------

    def _require_pull(self, request: web.Request, path: str) -> _Repo:
        """The repository, if the bearer grants pull on it; a 401 challenge or a 404 otherwise."""
        scope = f"repository:{path}:pull"
        claims = self._bearer(request, scope)
        granted = any(
            entry.get("type") == "repository"
            and entry.get("name") == path
            and "pull" in entry.get("actions", [])
            for entry in claims.get("access", [])
            if isinstance(entry, dict)
        )
        if not granted:
            raise RegistryError(
                401,
                "UNAUTHORIZED",
                f"authentication required: the token does not grant pull on {path}",
                challenge=self.challenge(scope, "insufficient_scope"),
                detail=[{"Type": "repository", "Name": path, "Action": "pull"}],
            )
        repo = self._find(path)
        if repo is None:
            raise RegistryError(404, "NAME_UNKNOWN", f"repository name not known to registry: {path}")
        return repo

    def _bearer(self, request: web.Request, scope: str | None) -> dict[str, Any]:
        scheme, _, value = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise RegistryError(
                401, "UNAUTHORIZED", "authentication required", challenge=self.challenge(scope)
            )
        try:
            claims: dict[str, Any] = jwt.decode(
                value.strip(),
                self._secret,
                algorithms=["HS256"],
                audience=self.name,
                issuer=self.url + "/token",
                options={"verify_exp": False, "verify_iat": False, "verify_nbf": False},
            )
        except jwt.PyJWTError as failure:
            raise RegistryError(
                401,
                "UNAUTHORIZED",
                f"invalid registry token: {failure}",
                challenge=self.challenge(scope, "invalid_token"),
            ) from None
        exp = claims.get("exp")
        if not _is_number(exp) or self._now().timestamp() >= exp:
            raise RegistryError(
                401,
                "UNAUTHORIZED",
                "invalid registry token: token is expired",
                challenge=self.challenge(scope, "invalid_token"),
            )
        request[_SUBJECT] = str(claims.get("sub", ""))
        return claims

    async def _base(self, request: web.Request) -> web.Response:
        self._bearer(request, None)
        return web.json_response({}, headers=_API_VERSION)

    async def _manifest(self, request: web.Request) -> web.Response:
        path, reference = request.match_info["name"], request.match_info["reference"]
        self._require_pull(request, path)
        image = self.image(path)
        if reference not in TAGS and reference != image.digest:
            raise RegistryError(404, "MANIFEST_UNKNOWN", f"manifest unknown: {path}:{reference}")
        return _content(request, image.manifest)

    async def _blob(self, request: web.Request) -> web.Response:
        path, digest = request.match_info["name"], request.match_info["digest"]
        self._require_pull(request, path)
        if not _DIGEST_RE.fullmatch(digest):
            raise RegistryError(
                400, "DIGEST_INVALID", f"provided digest did not match uploaded content: {digest}"
            )
        blob = self.image(path).blobs.get(digest)
        if blob is None:
            raise RegistryError(404, "BLOB_UNKNOWN", f"blob unknown to registry: {digest}")
        return _content(request, blob, media_type="application/octet-stream")

    async def _tags(self, request: web.Request) -> web.Response:
        path = request.match_info["name"]
        self._require_pull(request, path)
        return web.json_response({"name": path, "tags": list(TAGS)}, headers=_API_VERSION)


# -- helpers -------------------------------------------------------------------------------------------


def _content(request: web.Request, blob: Blob, *, media_type: str | None = None) -> web.Response:
    """A manifest or blob answer; for HEAD the same headers and no body."""
    headers = {
        **_API_VERSION,
        "Docker-Content-Digest": blob.digest,
        "ETag": f'"{blob.digest}"',
        "Content-Type": media_type or blob.media_type,
    }
    if request.method == "HEAD":
        headers["Content-Length"] = str(len(blob.data))
        return web.Response(status=200, headers=headers)
    return web.Response(status=200, body=blob.data, headers=headers)


def _scopes(values: Sequence[str]) -> list[tuple[str, tuple[str, ...]]]:
    """The repository scopes asked for (repeated ``scope`` parameters, or space-separated in one)."""
    scopes: list[tuple[str, tuple[str, ...]]] = []
    for value in values:
        for item in value.split():
            match = _SCOPE_RE.fullmatch(item)
            if match is None:
                if item.startswith("repository:"):
                    raise RegistryError(400, "UNSUPPORTED", f"malformed scope {item!r}")
                continue  # other resource types (registry:catalog:*) are granted nothing
            actions = tuple(action for action in match["actions"].split(",") if action)
            scopes.append((match["name"], actions))
    return scopes


def _credentials_kind(request: web.Request) -> str:
    scheme = request.headers.get("Authorization", "").partition(" ")[0].lower()
    return scheme if scheme in ("basic", "bearer") else ""


def _unauthorized(message: str) -> RegistryError:
    return RegistryError(401, "UNAUTHORIZED", message)


def _audiences(claims: Mapping[str, Any]) -> list[str]:
    aud = claims.get("aud")
    if isinstance(aud, str):
        return [aud]
    if isinstance(aud, list):
        return [item for item in aud if isinstance(item, str)]
    return []


def _is_number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _canonical(data: Mapping[str, Any]) -> bytes:
    return json.dumps(data, separators=(",", ":"), sort_keys=True).encode()
