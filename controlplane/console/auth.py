"""Console sign-in, sessions and CSRF.

Signing in takes the admin token (compared in constant time) and a name for the audit trail. The
server then keeps a session in Postgres, so every control-plane instance honours it; the browser
holds only a random session token, in an HTTP-only, `SameSite=Strict` cookie scoped to
`/console`. The admin token never reaches a page, a cookie or a log line.

Every POST under /console carries the session's CSRF token in a `csrf` form field (the sign-in
form: a per-visit token in a short-lived cookie, double-submitted); a missing or wrong one is a
403. A request whose `Origin` names another site is refused too. Actions run with
`commands.ACTOR` set to `console:<name>`, so their config events and escalation decisions name
who did them.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit

import structlog
from aiohttp import web
from psycopg_pool import AsyncConnectionPool

from schemas.http import Handler

log = structlog.get_logger(__name__)

COOKIE = "alephant_console"
LOGIN_COOKIE = "alephant_console_login"
PREFIX = "/console"
SESSION_TTL = dt.timedelta(hours=12)
# Paths served without a session: the sign-in page and the static assets.
_OPEN = re.compile(r"^/console/(login|static/.*)$")
ACTOR_NAME = re.compile(r"^[A-Za-z0-9 ._@-]{1,64}$")


@dataclass(frozen=True, slots=True)
class Session:
    token_hash: str
    actor: str  # as given at sign-in
    csrf: str
    flash: str | None = None  # the notice waiting for the next page (see Sessions.flash)

    @property
    def audit_actor(self) -> str:
        return f"console:{self.actor}"


SESSION: web.RequestKey[Session] = web.RequestKey("console_session", Session)


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def token_matches(given: str, expected: str) -> bool:
    return bool(given) and hmac.compare_digest(given.encode(), expected.encode())


class Sessions:
    """Console sessions in Postgres (table console_session)."""

    def __init__(self, pool: AsyncConnectionPool[Any]) -> None:
        self.pool = pool

    async def create(self, actor: str) -> tuple[str, Session]:
        token, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        session = Session(_hash(token), actor, csrf)
        async with self.pool.connection() as conn:
            await conn.execute("DELETE FROM console_session WHERE expires_at < now()")
            await conn.execute(
                "INSERT INTO console_session (token_hash, actor, csrf, expires_at) VALUES (%s, %s, %s, %s)",
                (session.token_hash, actor, csrf, dt.datetime.now(dt.UTC) + SESSION_TTL))
        return token, session

    async def find(self, token: str) -> Session | None:
        if not token or len(token) > 128:
            return None
        async with self.pool.connection() as conn:
            cur = await conn.execute("SELECT token_hash, actor, csrf, flash FROM console_session "
                                     "WHERE token_hash = %s AND expires_at > now()", (_hash(token),))
            row = await cur.fetchone()
        return None if row is None else Session(*row)

    async def end(self, session: Session) -> None:
        async with self.pool.connection() as conn:
            await conn.execute("DELETE FROM console_session WHERE token_hash = %s", (session.token_hash,))

    async def flash(self, session: Session, message: str) -> None:
        """A one-line notice for the next page this session sees (an action's outcome)."""
        async with self.pool.connection() as conn:
            await conn.execute("UPDATE console_session SET flash = %s WHERE token_hash = %s",
                               (message[:500], session.token_hash))

    async def clear_flash(self, session: Session) -> None:
        """The notice was shown: forget it (only a page that had one writes)."""
        async with self.pool.connection() as conn:
            await conn.execute("UPDATE console_session SET flash = NULL WHERE token_hash = %s AND flash = %s",
                               (session.token_hash, session.flash))


def safe_next(target: str | None) -> str:
    """Where to go after sign-in: a console path of this site, never another origin."""
    if not target or not target.startswith(PREFIX) or target.startswith("//") or "\\" in target:
        return PREFIX
    parts = urlsplit(target)
    if parts.scheme or parts.netloc:
        return PREFIX
    return target


def cookie_secure(request: web.Request) -> bool:
    return request.secure or request.headers.get("X-Forwarded-Proto", "") == "https"


def set_session_cookie(response: web.StreamResponse, request: web.Request, token: str) -> None:
    response.set_cookie(COOKIE, token, path=PREFIX, httponly=True, samesite="Strict", secure=cookie_secure(request),
                        max_age=int(SESSION_TTL.total_seconds()))


def same_origin(request: web.Request) -> bool:
    """False when the browser says the request comes from another site (Origin or Referer)."""
    origin = request.headers.get("Origin") or request.headers.get("Referer")
    if not origin or origin == "null":
        return origin is None
    parts = urlsplit(origin)
    return parts.netloc == request.host


def refused(message: str) -> web.Response:
    return web.Response(status=403, text=message, content_type="text/plain")


def middleware(sessions_of: Any) -> Any:
    """Console paths need a session (GET without one: 303 to the sign-in page; POST: 403), and
    every console POST a matching CSRF token. Other paths pass through untouched."""

    @web.middleware
    async def console_auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        path = request.path
        if not (path == PREFIX or path.startswith(PREFIX + "/")):
            return await handler(request)
        if request.method == "POST" and not same_origin(request):
            return refused("Cross-site request refused.")
        if _OPEN.match(path):
            return await handler(request)
        sessions: Sessions = sessions_of(request)
        session = await sessions.find(request.cookies.get(COOKIE, ""))
        if session is None:
            if request.method == "GET":
                target = request.path_qs if path != PREFIX else PREFIX
                raise web.HTTPSeeOther(f"{PREFIX}/login?next={quote(target, safe='/')}")
            return refused("Sign in first.")
        if request.method == "POST":
            form = await request.post()
            given = form.get("csrf")
            if not isinstance(given, str) or not token_matches(given, session.csrf):
                log.warning("console_csrf_refused", path=path, actor=session.actor)
                return refused("The form's CSRF token is missing or wrong. Reload the page and retry.")
        request[SESSION] = session
        return await handler(request)

    return console_auth
