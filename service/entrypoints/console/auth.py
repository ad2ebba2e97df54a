"""Who is asking: API tokens, session cookies, a trusted proxy's header; CSRF tokens.

Pure and in memory (no I/O): the middleware of :mod:`.app` resolves every request's
user before any route runs. Tokens are configured only as their sha256
(``CREDITNOTES_CONSOLE_TOKENS``); a session is a cookie signed with HMAC-SHA256,
holding the user, role, expiry, a binding to the token it was opened with, and a
nonce that its CSRF token is derived from and its row in ``console_sessions`` is
keyed by (:func:`session_key`; the app checks that row: sign-out ends it).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import json
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from starlette.datastructures import Headers

from service.settings import ConsoleRole, Settings

Via = Literal["token", "session", "proxy"]
SESSION_COOKIE = "cn_session"
#: Its name when cookies are Secure: the browser then refuses it unless it was set over
#: HTTPS, for this host only (no Domain), on path / (a sibling subdomain cannot plant one).
SECURE_SESSION_COOKIE = "__Host-cn_session"
CSRF_HEADER = "X-CSRF-Token"
CSRF_FIELD = "csrf_token"
#: A user name from a proxy header: printable ASCII without spaces, as a token's name.
_NAME_CHARACTERS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._@+-")
MAX_NAME_LENGTH = 100


@dataclass(frozen=True)
class User:
    name: str
    role: ConsoleRole
    via: Via
    #: The session's nonce (CSRF tokens are derived from it); "" for tokens and proxies.
    nonce: str = field(default="", repr=False)

    @property
    def is_operator(self) -> bool:
        return self.role == "operator"


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    """A fresh API token: 256 random bits, URL-safe."""
    return "cn_" + secrets.token_urlsafe(32)


def valid_name(name: str) -> bool:
    return 0 < len(name) <= MAX_NAME_LENGTH and set(name) <= _NAME_CHARACTERS


class ProxyRefused(Exception):
    """A trusted proxy's request that names its user in a way not to be believed."""


class AmbiguousProxyUser(ProxyRefused):
    """A trusted proxy's request names more than one user (two user headers, or a list):
    a proxy that appends to the header instead of replacing it passes the client's own
    value along, and neither may be believed."""


class ProxyUserIsTokenUser(ProxyRefused):
    """The proxy names a user who also has an API token: the two would share one audit
    name, one CloudEvents source and one Idempotency-Key scope (one could answer for the
    other's commands). Names must not overlap: rename one."""


def session_cookie(settings: Settings) -> str:
    return SECURE_SESSION_COOKIE if settings.console_secure_cookies else SESSION_COOKIE


def session_key(nonce: str) -> str:
    """The key of a session's row in ``console_sessions`` (the nonce itself never
    leaves the cookie and this process)."""
    return hashlib.sha256(b"session|" + nonce.encode()).hexdigest()


class Authenticator:
    """Resolves credentials to a :class:`User`; signs sessions and CSRF tokens."""

    def __init__(self, settings: Settings, secret: bytes | None = None) -> None:
        configured = settings.console_session_secret
        self._secret = secret or (configured.get_secret_value().encode() if configured
                                  else secrets.token_bytes(32))
        self._tokens = {token.sha256: (token.name, token.role) for token in settings.console_tokens}
        #: A session cookie names the token it was opened with by an HMAC of its sha256
        #: (readable in the cookie, useless without the secret): a rotated token (same
        #: user, new hash) ends the sessions the old one opened.
        self._bindings = {self._binding(token.sha256): (token.name, token.role)
                          for token in settings.console_tokens}
        self._one_time: dict[str, tuple[str, ConsoleRole]] = {}
        self._session_seconds = settings.console_session_minutes * 60
        self._proxies = [ipaddress.ip_network(proxy, strict=False)
                         for proxy in settings.console_trusted_proxies]
        self._proxy_header = settings.console_proxy_user_header.lower()
        self._proxy_operators = frozenset(settings.console_proxy_operators)
        self._token_users = frozenset(token.name for token in settings.console_tokens)

    # ----------------------------------------------------------------- tokens

    def by_token(self, token: str) -> User | None:
        """The configured user of an API token (``Authorization: Bearer``)."""
        found = self._lookup(self._tokens, token)
        return None if found is None else User(found[0], found[1], "token")

    def one_time_token(self, name: str = "dev", role: ConsoleRole = "operator") -> str:
        """A token that opens one session (POST /login) and then never works again."""
        token = new_token()
        self._one_time[hash_token(token)] = (name, role)
        return token

    def login(self, token: str, now: float) -> tuple[User, str] | None:
        """A session for a configured or one-time token: the user and its cookie value."""
        found, source = self._lookup(self._tokens, token), "token"
        binding = self._binding(hash_token(token))
        if found is None:
            found, source, binding = self._lookup(self._one_time, token), "once", ""
            if found is not None:
                del self._one_time[hash_token(token)]  # once
        if found is None:
            return None
        user = User(found[0], found[1], "session", secrets.token_urlsafe(16))
        return user, self._sign_session(user, now + self._session_seconds, source, binding)

    def _binding(self, sha256: str) -> str:
        return self._sign(f"token|{sha256}".encode())[:32]

    @staticmethod
    def _lookup(table: Mapping[str, tuple[str, ConsoleRole]], token: str,
                ) -> tuple[str, ConsoleRole] | None:
        digest = hash_token(token)
        found = None
        for known, entry in table.items():  # compare with each, in constant time
            if hmac.compare_digest(known, digest):
                found = entry
        return found

    # --------------------------------------------------------------- sessions

    def _sign(self, message: bytes) -> str:
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest()

    def _sign_session(self, user: User, expires: float, source: str, binding: str) -> str:
        body = json.dumps({"u": user.name, "r": user.role, "e": int(expires), "n": user.nonce,
                           "s": source, "t": binding},
                          separators=(",", ":")).encode()
        payload = base64.urlsafe_b64encode(body).decode().rstrip("=")
        return f"{payload}.{self._sign(b'session|' + payload.encode())}"

    def by_session(self, cookie: str, now: float) -> User | None:
        """The user of a session cookie this process (or one with the same secret) signed,
        until it expires, and while the very token it was opened with is still configured
        for the same user and role (a token removed, rotated or changed ends its sessions
        at the next restart). The signature is checked before anything is parsed. The
        app also checks the session's row (:func:`session_key`): not signed out."""
        payload, dot, signature = cookie.partition(".")
        if not dot or not hmac.compare_digest(self._sign(b"session|" + payload.encode()),
                                              signature):
            return None
        try:
            body = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
            name, role, expires, nonce, source, binding = (
                body["u"], body["r"], body["e"], body["n"], body["s"], body["t"])
        except (ValueError, KeyError, TypeError, binascii.Error):
            return None
        if (not isinstance(expires, int) or expires <= now or role not in ("viewer", "operator")
                or not isinstance(name, str) or not isinstance(nonce, str)
                or source not in ("token", "once")
                or (source == "token" and self._bindings.get(binding) != (name, role))):
            return None
        return User(name, role, "session", nonce)

    def session_seconds(self) -> int:
        return self._session_seconds

    # ------------------------------------------------------------------ proxy

    def trusts(self, peer: str | None) -> bool:
        if peer is None or not self._proxies:
            return False
        try:
            address = ipaddress.ip_address(peer)
        except ValueError:
            return False
        return any(address in network for network in self._proxies)

    def by_proxy(self, peer: str | None, headers: Headers) -> User | None:
        """The user a trusted proxy names; from any other peer the header is ignored.
        Two user headers, or one holding a list, raise :class:`AmbiguousProxyUser`; the
        name of a token's user raises :class:`ProxyUserIsTokenUser`."""
        if not self.trusts(peer):
            return None
        given = headers.getlist(self._proxy_header)
        if len(given) > 1 or any("," in value for value in given):
            raise AmbiguousProxyUser
        name = given[0].strip() if given else ""
        if not valid_name(name):
            return None
        if name in self._token_users:
            raise ProxyUserIsTokenUser(name)
        return User(name, "operator" if name in self._proxy_operators else "viewer", "proxy")

    def client_address(self, peer: str | None, headers: Headers) -> str:
        """Who is asking, for the sign-in limit: the TCP peer, or behind a trusted proxy the
        nearest address in ``X-Forwarded-For`` that is not itself a trusted proxy (the
        addresses to its left are the client's own word). From any other peer the header
        is ignored: a client cannot pick its address."""
        address = peer or "unknown"
        if not self.trusts(peer):
            return address
        hops = [hop.strip() for value in headers.getlist("x-forwarded-for")
                for hop in value.split(",")]
        for hop in reversed(hops):
            try:
                ipaddress.ip_address(hop)
            except ValueError:
                return address  # an unreadable hop: the nearest trusted proxy is all we know
            if not self.trusts(hop):
                return hop
            address = hop
        return address

    # ------------------------------------------------------------------- CSRF

    def csrf_token(self, user: User) -> str:
        """What a session or proxy user's POSTs carry (form field or ``X-CSRF-Token``)."""
        return self._sign(f"csrf|{user.via}|{user.name}|{user.nonce}".encode())

    def csrf_ok(self, user: User, given: str | None) -> bool:
        return given is not None and hmac.compare_digest(self.csrf_token(user), given)


def needs_csrf(user: User) -> bool:
    """A browser sends cookies (and passes through a proxy) by itself; a Bearer token it
    never sends unasked, so only session and proxy identities need the CSRF token."""
    return user.via in ("session", "proxy")
