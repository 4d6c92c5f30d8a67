"""Who is calling, and what they may do: authentication of every AgentService call in one interceptor.

A caller proves who it is with a bearer JWT (``authorization: Bearer <token>`` metadata: signature, issuer,
audience and expiry checked, keys from a JWKS file or URL) or, on a server that requires client certificates, with
its certificate (CN is the subject, O the tenant, rights configured per tenant/subject). A token wins over the
certificate it travels with. The result is a ``Principal``, which handlers read through ``principal()`` and never
from the request. Health and reflection are other services: the interceptor leaves them open.

No token is ever logged or echoed: messages say what is wrong with it (expired, wrong audience, bad signature).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import math
import os
import re
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, cast

import aiohttp
import grpc
import jwt
from cryptography import x509
from cryptography.x509.oid import NameOID

from agent_service._errors import ApiError, Context, Handler, StreamBehavior, UnaryBehavior, abort
from shared.contract import ID_CHARACTERS, ID_PATTERN
from shared.settings import Settings

log = logging.getLogger("agentrun.server")

# The rights, one per kind of act: starting runs, reading them (GetRun, StreamRun, ListRuns, ListAgents),
# cancelling them, and deciding approvals. A token carries them in its "scope" claim, separated by spaces.
RUNS_START = "runs:start"
RUNS_READ = "runs:read"
RUNS_CANCEL = "runs:cancel"
APPROVALS_DECIDE = "approvals:decide"
RIGHTS = (RUNS_START, RUNS_READ, RUNS_CANCEL, APPROVALS_DECIDE)
SCOPE_CLAIM = "scope"
# The right each AgentService method needs; a method missing here is refused to everyone.
METHOD_RIGHTS = {
    "StartRun": RUNS_START,
    "StreamRun": RUNS_READ,
    "GetRun": RUNS_READ,
    "ListRuns": RUNS_READ,
    "ListAgents": RUNS_READ,
    "CancelRun": RUNS_CANCEL,
    "Approve": APPROVALS_DECIDE,
}
# Subjects under this prefix are the server's own (the approver "agentrun:timeout"): no caller can be one.
RESERVED_PREFIX = "agentrun:"
# Clocks of the issuer and this server may disagree by this much.
CLOCK_SKEW_SECONDS = 30
# A JWKS URL is fetched again in the background after JWKS_CACHE_SECONDS (callers go on with the keys they have),
# and at most every JWKS_REFETCH_SECONDS whatever asks (a key id it does not have, a failed fetch), so that neither
# made-up key ids nor an issuer that is down make it hammer the issuer. One fetch waits at most
# JWKS_FETCH_TIMEOUT_SECONDS, and reads at most JWKS_MAX_BYTES.
JWKS_CACHE_SECONDS = 300
JWKS_REFETCH_SECONDS = 30
JWKS_FETCH_TIMEOUT_SECONDS = 5
JWKS_MAX_BYTES = 1 << 20
# A JWKS file is looked at (stat) at most this often: not on every call, and never on the event loop.
JWKS_FILE_CHECK_SECONDS = 5
# Algorithms a JWKS key may name; "none" and the HMAC ones (a shared secret is no public key) are never accepted.
ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"})
MAX_NAME_LENGTH = 128
# Subjects are recorded as approvers; tenants go into Temporal queries and Redis keys, so their rule is the ids'.
_SUBJECT_CHARACTERS = ("letters, digits and . _ : @ | + -", re.compile(r"[A-Za-z0-9._:@|+\-]+"))
_TENANT_CHARACTERS = (ID_CHARACTERS, ID_PATTERN)
_SERVICE_PREFIX = "/agentrun.v1.AgentService/"


class AuthConfigError(ValueError):
    """The authentication settings are incomplete or unreadable; the message names the setting."""


@dataclass(frozen=True)
class Principal:
    """The caller of the current call: who (``subject``), on behalf of which ``tenant``, allowed to do what."""

    subject: str
    tenant: str
    rights: frozenset[str]
    # False only on a server that authenticates no one (loopback dev and tests): every caller is this one.
    authenticated: bool = True

    @property
    def key(self) -> str:
        """What limits count per principal."""
        return f"{self.tenant}/{self.subject}"


# Without authentication every caller may do everything in the one tenant "", as before authentication existed.
ANONYMOUS = Principal("", "", frozenset(RIGHTS), authenticated=False)
_CURRENT: ContextVar[Principal] = ContextVar("principal")


def principal() -> Principal:
    """The caller of the call being served: the one place handlers learn it."""
    return _CURRENT.get()


def is_reserved(name: str) -> bool:
    """Whether ``name`` is one of the server's own (the approver "agentrun:timeout"), which no caller may be."""
    return name.startswith(RESERVED_PREFIX)


def _unauthenticated(problem: str) -> ApiError:
    return ApiError(grpc.StatusCode.UNAUTHENTICATED, problem)


def _key_set(text: str) -> jwt.PyJWKSet:
    """A JWKS document's keys; ValueError (or PyJWKSetError, one) saying what is wrong with it."""
    document = json.loads(text)
    keys = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(keys, list) or not all(isinstance(key, dict) for key in keys):
        raise ValueError("not a JWKS document (an object with a 'keys' list of keys)")
    return jwt.PyJWKSet(keys)  # PyJWKSetError when none of the keys is usable


# What a bad key set, file or response, raises: each means "no keys from there now", never a caller's mistake.
_KEY_SET_ERRORS = (OSError, ValueError, jwt.PyJWKSetError, jwt.PyJWKError, aiohttp.ClientError)


class _JwksFile:
    """Keys from a JWKS file, read again when the file changes (a key rotation needs no restart)."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._checked = time.monotonic()
        try:
            self._stamp, keys = self._read(None)
        except _KEY_SET_ERRORS as err:
            raise AuthConfigError(f"AGENTRUN_AUTH_JWKS: cannot read the JWKS file {self._path}: {err}") from None
        assert keys is not None
        self._keys = keys
        self._lock = asyncio.Lock()

    def _read(self, stamp: tuple[int, int] | None) -> tuple[tuple[int, int], jwt.PyJWKSet | None]:
        """The file's stamp, and its keys when the stamp is not ``stamp`` (else None: unchanged)."""
        stat = os.stat(self._path)
        now = (stat.st_mtime_ns, stat.st_size)
        if now == stamp:
            return now, None
        with open(self._path, encoding="utf-8") as file:
            return now, _key_set(file.read())

    async def key(self, kid: str | None) -> jwt.PyJWK:
        if time.monotonic() - self._checked >= JWKS_FILE_CHECK_SECONDS:
            async with self._lock:  # one look at a time; the others use the keys they have meanwhile
                if time.monotonic() - self._checked >= JWKS_FILE_CHECK_SECONDS:
                    await self._check()
        return _match(self._keys.keys, kid)

    async def _check(self) -> None:
        try:
            stamp, keys = await asyncio.to_thread(self._read, self._stamp)
        except _KEY_SET_ERRORS as err:
            log.warning("kept the keys read before: cannot read the JWKS file %s: %s", self._path, err)
        else:
            self._stamp, self._keys = stamp, keys or self._keys
        self._checked = time.monotonic()


class _JwksUrl:
    """Keys from a JWKS URL, fetched with a deadline, one fetch at a time, never more often than
    JWKS_REFETCH_SECONDS. The last good key set is kept through failed fetches (an issuer that is down or answers
    garbage does not lock out callers whose keys did not change); only while there never was one is a call
    UNAVAILABLE."""

    def __init__(self, url: str) -> None:
        self._url = url
        self._keys: jwt.PyJWKSet | None = None
        self._fetched = -math.inf  # when the keys were last fetched (monotonic)
        self._attempted = -math.inf  # when a fetch last started, good or not
        self._failing = False  # whether the last fetch failed; the warning is logged once per streak
        self._lock = asyncio.Lock()
        self._background: asyncio.Task[None] | None = None

    async def key(self, kid: str | None) -> jwt.PyJWK:
        if self._keys is None:
            await self._refresh()  # nothing to go on with: the caller waits for the first fetch
        elif time.monotonic() - self._fetched >= JWKS_CACHE_SECONDS and self._background is None:
            self._background = asyncio.create_task(self._refresh_in_background())
        if self._keys is None:
            raise self._unavailable()
        if kid is not None and not _has(self._keys, kid) and time.monotonic() - self._attempted >= JWKS_REFETCH_SECONDS:
            await self._refresh()  # a rotation: the issuer may have a key that this server has not fetched yet
        if kid is not None and not _has(self._keys, kid) and self._failing:
            raise self._unavailable()  # the key may be one the issuer has now: no reason to call the token bad
        return _match(self._keys.keys, kid)

    def _unavailable(self) -> ApiError:
        return ApiError(
            grpc.StatusCode.UNAVAILABLE, f"the token's keys cannot be fetched from {self._url}; retry later"
        )

    async def close(self) -> None:
        """Stops a refresh under way: the server is shutting down."""
        if self._background is not None:
            self._background.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._background

    async def _refresh_in_background(self) -> None:
        try:
            await self._refresh()
        finally:
            self._background = None

    async def _refresh(self) -> None:
        async with self._lock:
            if time.monotonic() - self._attempted < JWKS_REFETCH_SECONDS:
                return  # another caller has just fetched, or failed to: its outcome stands
            self._attempted = time.monotonic()
            try:
                keys = await self._fetch()
            except (*_KEY_SET_ERRORS, TimeoutError) as err:
                if not self._failing:
                    kept = "kept the keys fetched before" if self._keys is not None else "no keys yet"
                    log.warning("%s: cannot fetch the JWKS from %s: %s", kept, self._url, _problem(err))
                self._failing = True
                return
            if self._failing:
                log.info("fetched the JWKS from %s again", self._url)
            self._keys, self._fetched, self._failing = keys, time.monotonic(), False

    async def _fetch(self) -> jwt.PyJWKSet:
        timeout = aiohttp.ClientTimeout(total=JWKS_FETCH_TIMEOUT_SECONDS)
        async with aiohttp.ClientSession(timeout=timeout) as session, session.get(self._url) as response:
            response.raise_for_status()
            body = b""
            async for chunk in response.content.iter_chunked(1 << 16):
                body += chunk
                if len(body) > JWKS_MAX_BYTES:
                    raise ValueError(f"the response is larger than {JWKS_MAX_BYTES} bytes")
        return _key_set(body.decode())


def _has(keys: jwt.PyJWKSet, kid: str) -> bool:
    return any(key.key_id == kid for key in keys.keys)


def _problem(err: BaseException) -> str:
    """What went wrong with a fetch, for the log (aiohttp's own words for a status would repeat the URL)."""
    if isinstance(err, TimeoutError):
        return f"no answer within {JWKS_FETCH_TIMEOUT_SECONDS} s"
    if isinstance(err, aiohttp.ClientResponseError):
        return f"HTTP {err.status}"
    return f"{type(err).__name__}: {err}" if str(err) else type(err).__name__


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address, IPv6 in brackets or not) is this machine's loopback."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _match(keys: Iterable[jwt.PyJWK], kid: str | None) -> jwt.PyJWK:
    keys = list(keys)
    if kid is None and len(keys) == 1:
        return keys[0]
    if kid is None:
        raise _unauthenticated("the token names no key id (kid), and this server trusts several keys")
    for key in keys:
        if key.key_id == kid:
            return key
    raise _unauthenticated("the token is signed with a key that this server does not trust")


# Why PyJWT refused a token, in words for the caller; none repeats the token.
_TOKEN_PROBLEMS: list[tuple[type[Exception], str]] = [
    (jwt.ExpiredSignatureError, "the token has expired"),
    (jwt.ImmatureSignatureError, "the token is not valid yet (nbf or iat in the future)"),
    (jwt.InvalidAudienceError, "the token is not for this service (wrong audience)"),
    (jwt.InvalidIssuerError, "the token comes from an issuer this server does not trust (wrong issuer)"),
    (jwt.InvalidSignatureError, "the token's signature does not verify (bad signature)"),
    (jwt.InvalidAlgorithmError, "the token is signed with an algorithm that its key does not allow"),
]


@dataclass
class Authenticator:
    """Turns a call's credentials into a Principal, or refuses them."""

    issuer: str
    audience: str
    tenant_claim: str
    keys: _JwksFile | _JwksUrl | None
    # Rights of certificates by "tenant/subject" (O/CN), "*" for any other; None when no certificate identifies.
    certificate_rights: dict[str, frozenset[str]] | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> Authenticator | None:
        """None when the settings turn authentication off (no JWKS and no client CA)."""
        if not settings.auth_jwks and not settings.tls_client_ca:
            return None
        keys: _JwksFile | _JwksUrl | None = None
        if settings.auth_jwks:
            if not settings.auth_issuer or not settings.auth_audience:
                raise AuthConfigError(
                    "AGENTRUN_AUTH_ISSUER and AGENTRUN_AUTH_AUDIENCE are needed with AGENTRUN_AUTH_JWKS"
                )
            source = settings.auth_jwks
            if source.startswith("http://") and not is_loopback(urllib.parse.urlsplit(source).hostname or ""):
                raise AuthConfigError(
                    "AGENTRUN_AUTH_JWKS: a JWKS URL must be https:// (keys fetched in plaintext can be forged)"
                )
            keys = _JwksUrl(source) if source.startswith(("https://", "http://")) else _JwksFile(source)
        rights = parse_certificate_rights(settings.auth_client_rights) if settings.tls_client_ca else None
        return cls(settings.auth_issuer or "", settings.auth_audience or "", settings.auth_tenant_claim, keys, rights)

    async def close(self) -> None:
        if isinstance(self.keys, _JwksUrl):
            await self.keys.close()

    async def authenticate(self, metadata: Iterable[tuple[str, Any]], auth_context: Mapping[str, Any]) -> Principal:
        tokens = [value for key, value in metadata if key == "authorization"]
        if len(tokens) > 1:
            raise _unauthenticated("the call carries more than one authorization metadata entry")
        if tokens:
            return await self._from_token(tokens[0])
        certificate = auth_context.get("x509_pem_cert")
        if certificate and self.certificate_rights is not None:
            return self._from_certificate(certificate[0])
        raise _unauthenticated(
            "the call has no credentials: send 'authorization: Bearer <token>' metadata"
            + (" or a client certificate" if self.certificate_rights is not None else "")
        )

    async def _from_token(self, value: Any) -> Principal:
        scheme, _, token = (value if isinstance(value, str) else "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise _unauthenticated("authorization: must be 'Bearer <token>'")
        if self.keys is None:
            raise _unauthenticated("this server takes no tokens (no AGENTRUN_AUTH_JWKS): use a client certificate")
        token = token.strip()
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            raise _unauthenticated("the token is malformed (not a signed JWT)") from None
        kid = header.get("kid")
        key = await self.keys.key(kid if isinstance(kid, str) else None)
        if key.algorithm_name not in ALGORITHMS:
            raise _unauthenticated("the token is signed with an algorithm this server does not accept")
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[key.algorithm_name],
                audience=self.audience,
                issuer=self.issuer,
                leeway=CLOCK_SKEW_SECONDS,
                options={"require": ["exp", "iss", "aud", "sub"]},
            )
        except jwt.MissingRequiredClaimError as err:
            raise _unauthenticated(f"the token lacks the {err.claim!r} claim") from None
        except jwt.InvalidTokenError as err:
            for kind, problem in _TOKEN_PROBLEMS:
                if isinstance(err, kind):
                    raise _unauthenticated(problem) from None
            raise _unauthenticated("the token is malformed or its claims are not valid") from None
        subject = _name(claims.get("sub"), "the token's 'sub' claim", _SUBJECT_CHARACTERS)
        tenant = _name(claims.get(self.tenant_claim), f"the token's {self.tenant_claim!r} claim", _TENANT_CHARACTERS)
        scope = claims.get(SCOPE_CLAIM, "")
        granted = scope.split() if isinstance(scope, str) else scope if isinstance(scope, list) else []
        return Principal(subject, tenant, frozenset(r for r in granted if r in RIGHTS))

    def _from_certificate(self, pem: bytes) -> Principal:
        assert self.certificate_rights is not None
        subject_name = x509.load_pem_x509_certificate(pem).subject

        def attribute(oid: x509.ObjectIdentifier) -> Any:
            values = subject_name.get_attributes_for_oid(oid)
            return values[0].value if len(values) == 1 else None

        subject = _name(attribute(NameOID.COMMON_NAME), "the client certificate's CN", _SUBJECT_CHARACTERS)
        organization = attribute(NameOID.ORGANIZATION_NAME)
        tenant = _name(organization, "the client certificate's O (its tenant)", _TENANT_CHARACTERS)
        # By tenant and subject together: the same CN in another tenant is another principal.
        rights = self.certificate_rights.get(f"{tenant}/{subject}", self.certificate_rights.get("*", frozenset()))
        return Principal(subject, tenant, rights)


def _name(value: Any, what: str, characters: tuple[str, re.Pattern[str]]) -> str:
    if not isinstance(value, str) or not value:
        raise _unauthenticated(f"{what} is missing")
    allowed, pattern = characters
    if len(value) > MAX_NAME_LENGTH or not pattern.fullmatch(value):
        raise _unauthenticated(f"{what} must be 1 to {MAX_NAME_LENGTH} characters of {allowed}")
    if is_reserved(value):
        raise _unauthenticated(f"{what} starts with {RESERVED_PREFIX!r}, which is reserved for the server")
    return value


def parse_certificate_rights(text: str) -> dict[str, frozenset[str]]:
    """``"acme/billing-bot=runs:start runs:read; acme/approver=approvals:decide; *=runs:read"``: each certificate's
    tenant and subject (O/CN), or ``*`` for any other certificate, and its rights."""
    rights: dict[str, frozenset[str]] = {}
    for entry in filter(None, (part.strip() for part in text.split(";"))):
        holder, equals, granted = (part.strip() for part in entry.partition("="))
        tenant, slash, subject = holder.partition("/")
        unknown = set(granted.split()) - set(RIGHTS)
        if not equals or (holder != "*" and not (tenant and slash and subject)) or unknown:
            raise AuthConfigError(
                f"AGENTRUN_AUTH_CLIENT_RIGHTS: {entry!r} must be 'tenant/subject=right right ...' (the certificate's "
                f"O/CN) or '*=...', with rights among {', '.join(RIGHTS)}"
                + (f" (unknown: {', '.join(sorted(unknown))})" if unknown else "")
            )
        rights[holder] = frozenset(granted.split())
    return rights


def _authorize(caller: Principal, method: str) -> None:
    name = method.removeprefix(_SERVICE_PREFIX)
    needed = METHOD_RIGHTS.get(name)
    if needed is None:  # a method added to the contract and not given a right here: closed until it is
        raise ApiError(grpc.StatusCode.PERMISSION_DENIED, f"{name} is open to no caller: no right grants it")
    if needed not in caller.rights:
        raise ApiError(
            grpc.StatusCode.PERMISSION_DENIED, f"{caller.subject!r} may not call {name}: it needs the right {needed!r}"
        )


class Authentication(grpc.aio.ServerInterceptor):
    """Authenticates and authorizes every AgentService call before its handler runs, streams included, and makes
    the caller the current ``principal()``. Without an authenticator every caller is ANONYMOUS.

    It goes outside ErrorMapping, so that a caller who is not authenticated learns nothing else (not even that its
    request did not decode) and costs no log line; it answers its own refusals with the statuses ErrorMapping gives.
    """

    def __init__(self, authenticator: Authenticator | None) -> None:
        self._authenticator = authenticator

    async def _enter(self, context: Context, method: str) -> None:
        if self._authenticator is None:
            _CURRENT.set(ANONYMOUS)
            return
        try:
            caller = await self._authenticator.authenticate(context.invocation_metadata() or (), context.auth_context())
            _authorize(caller, method)
        except Exception as err:
            await abort(context, err)
        _CURRENT.set(caller)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not method.startswith(_SERVICE_PREFIX):
            return handler  # health and reflection stay open
        enter = self._enter
        if handler.unary_unary is not None:
            behavior = cast(UnaryBehavior, handler.unary_unary)

            async def unary(request: Any, context: Context) -> Any:
                await enter(context, method)
                return await behavior(request, context)

            return grpc.unary_unary_rpc_method_handler(unary, handler.request_deserializer, handler.response_serializer)
        if handler.unary_stream is not None:
            streaming = cast(StreamBehavior, handler.unary_stream)

            async def stream(request: Any, context: Context) -> AsyncIterator[Any]:
                await enter(context, method)
                async for response in streaming(request, context):
                    yield response

            return grpc.unary_stream_rpc_method_handler(
                stream, handler.request_deserializer, handler.response_serializer
            )
        return None  # AgentService has no other kinds of method: refuse what cannot be checked
