"""Page rendering for the console: one Jinja2 environment (autoescaped), the context every page
shares (who is signed in, the CSRF token, the workspace picker, the flash notice), the security
headers every response carries, and the helpers actions use to report back."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Awaitable, Callable, Mapping
from typing import Any
from urllib.parse import urlencode

import jinja2
import markupsafe
from aiohttp import web

from controlplane import finance
from controlplane.console.auth import SESSION, Session, Sessions
from schemas.errors import GatewayError

_ENV = jinja2.Environment(
    loader=jinja2.PackageLoader("controlplane.console", "templates"),
    autoescape=jinja2.select_autoescape(default=True, default_for_string=True),
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)

# Scripts and styles only from the console's own static files; the charts' data travels in
# `<script type="application/json">` blocks, which never execute.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY",
           "Referrer-Policy": "same-origin", "Cache-Control": "no-store"}

NAV = (("overview", "Overview", "/console"), ("runs", "Runs", "/console/runs"),
       ("people", "Agents & people", "/console/agents"), ("policy", "Policy & escalations", "/console/policy"),
       ("providers", "Providers & routers", "/console/providers"), ("live", "Live", "/console/live"))

SESSIONS: web.AppKey[Sessions] = web.AppKey("console_sessions", Sessions)
Page = Callable[[web.Request], Awaitable[web.StreamResponse]]


def usd(value: Any) -> str:
    """A finance `*_usd` decimal string as shown: `$` and the exact figure (no rounding, so a
    page's numbers are the finance API's)."""
    if value is None or value == "":
        return "—"
    text = str(value)
    return f"-${text[1:]}" if text.startswith("-") else f"${text}"


def when(value: Any) -> str:
    """An ISO timestamp as `YYYY-MM-DD HH:MM:SS UTC`."""
    if not value:
        return "—"
    try:
        parsed = value if isinstance(value, dt.datetime) else dt.datetime.fromisoformat(str(value))
    except ValueError:
        return str(value)
    return parsed.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def as_json(value: Any) -> str:
    """JSON for a `<script type="application/json">` block: `<`, `>` and `&` escaped, so no
    value can close the element."""
    text = json.dumps(value, separators=(",", ":"), default=str)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


_ENV.filters["usd"] = usd
_ENV.filters["when"] = when
_ENV.filters["as_json"] = lambda v: markupsafe.Markup(as_json(v))  # noqa: S704 (escaped by as_json)


def query_string(**params: Any) -> str:
    return urlencode({k: v for k, v in params.items() if v not in (None, "")})


_ENV.globals["qs"] = query_string


def session_of(request: web.Request) -> Session:
    return request[SESSION]


async def workspaces(request: web.Request) -> tuple[list[str], str]:
    """The workspaces the picker lists (every workspace with live config) and the one this page
    shows (`?ws=`, else `demo` when it exists, else the first)."""
    from controlplane.app import ADMIN  # the admin app module imports this package
    from controlplane.commands import WORKSPACE

    async with request.app[ADMIN].pool.connection() as conn:
        cur = await conn.execute(
            "SELECT DISTINCT coalesce(workspace_id, id) FROM config_entity WHERE deleted_at IS NULL "
            "AND (kind = %s OR workspace_id IS NOT NULL) ORDER BY 1", (WORKSPACE.kind,))
        ids = [str(r[0]) for r in await cur.fetchall() if r[0] and r[0] != "_system"]
    asked = request.query.get("ws", "")
    if asked in ids:
        return ids, asked
    return ids, "demo" if "demo" in ids or not ids else ids[0]


async def render(request: web.Request, template: str, *, page: str, title: str, status: int = 200,
                 **context: Any) -> web.Response:
    session = session_of(request)
    ids, ws = context.pop("workspace_choice", None) or await workspaces(request)
    flash = session.flash
    if flash is not None:
        await request.app[SESSIONS].clear_flash(session)
    body = _ENV.get_template(template).render(
        page=page, title=title, nav=NAV, actor=session.actor, csrf=session.csrf, workspaces=ids, ws=ws,
        flash=flash, path=request.rel_url.raw_path, **context)
    return web.Response(text=body, status=status, content_type="text/html", charset="utf-8", headers=HEADERS)


def render_open(template: str, status: int = 200, **context: Any) -> web.Response:
    """A page outside a session (the sign-in page)."""
    body = _ENV.get_template(template).render(**context)
    return web.Response(text=body, status=status, content_type="text/html", charset="utf-8", headers=HEADERS)


async def finance_table(request: web.Request, name: str, params: Mapping[str, str]) -> dict[str, Any]:
    """A finance read exactly as `GET /admin/v1/finance/<name>` answers it (same code, same
    parameters), so the console's numbers are the API's."""
    from controlplane.app import ADMIN

    st = request.app[ADMIN]
    table = await finance.QUERIES[name](st.pool, st.redis, dict(params), dt.datetime.now(dt.UTC))
    return table.to_json()


async def act(request: web.Request, done: str, action: Callable[[], Awaitable[Any]], back: str) -> web.StreamResponse:
    """Run a console action (an admin command, under the session's actor), flash what happened
    (`done`, or the command's own error message) and go back to `back` (303)."""
    from controlplane.commands import ACTOR

    session = session_of(request)
    token = ACTOR.set(session.audit_actor)
    try:
        await action()
        message = done
    except GatewayError as err:
        message = f"Refused: {err.message}"
    finally:
        ACTOR.reset(token)
    await request.app[SESSIONS].flash(session, message)
    raise web.HTTPSeeOther(back)
