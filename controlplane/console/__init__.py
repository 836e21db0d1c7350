"""The Alephant console: server-rendered pages at /console on the control plane, for finance and
operations. It adds no business logic: every number comes from the finance projections through
the same query code as the admin API, and every action is the same admin command, run under the
signed-in actor's name (auth.py). Charts are drawn by the pinned, vendored Chart.js
(static/vendor/, see tests/unit/test_console_assets.py); every chart also has a table of the same
numbers, for keyboard and screen-reader users and for the tests.

Pages register themselves in PAGES (path, handler) and ACTIONS (POST path, handler); `install`
adds them, the sign-in routes and the static files to the admin app.
"""

from __future__ import annotations

import hmac
from importlib import resources
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web

from controlplane.console import auth
from controlplane.console.render import SESSIONS, Page, render_open

log = structlog.get_logger(__name__)

STATIC = Path(str(resources.files("controlplane.console") / "static"))


def _login_nonce(request: web.Request) -> str:
    return request.cookies.get(auth.LOGIN_COOKIE, "")


def _login_page(request: web.Request, *, error: str = "", status: int = 200, name: str = "") -> web.Response:
    import secrets

    nonce = secrets.token_urlsafe(24)
    response = render_open("login.html", status=status, error=error, nonce=nonce, name=name,
                           next=auth.safe_next(request.query.get("next")))
    response.set_cookie(auth.LOGIN_COOKIE, nonce, path="/console/login", httponly=True, samesite="Strict",
                        secure=auth.cookie_secure(request), max_age=900)
    return response


async def login_form(request: web.Request) -> web.StreamResponse:
    session = await request.app[SESSIONS].find(request.cookies.get(auth.COOKIE, ""))
    if session is not None:
        raise web.HTTPSeeOther(auth.safe_next(request.query.get("next")))
    return _login_page(request)


def _admin_token(request: web.Request) -> str:
    from controlplane.app import ADMIN

    return request.app[ADMIN].settings.admin_token.reveal()


async def login(request: web.Request) -> web.StreamResponse:
    form = await request.post()
    nonce, given_nonce = _login_nonce(request), form.get("csrf")
    if not isinstance(given_nonce, str) or not auth.token_matches(given_nonce, nonce):
        return _login_page(request, error="The sign-in form expired. Please try again.", status=403)
    name = str(form.get("name") or "").strip() or "admin"
    token = form.get("token")
    if not auth.ACTOR_NAME.match(name):
        return _login_page(request, error="Your name may use letters, digits, spaces and . _ @ - (at most 64).",
                           status=400)
    if not isinstance(token, str) or not hmac.compare_digest(token.encode(), _admin_token(request).encode()):
        log.warning("console_sign_in_refused", actor=name, peer=request.remote)
        return _login_page(request, error="That is not the admin token.", status=401, name=name)
    cookie, session = await request.app[SESSIONS].create(name)
    log.info("console_signed_in", actor=session.actor, peer=request.remote)
    target = auth.safe_next(str(form.get("next") or ""))
    response = web.HTTPSeeOther(target)
    auth.set_session_cookie(response, request, cookie)
    response.del_cookie(auth.LOGIN_COOKIE, path="/console/login")
    raise response


async def logout(request: web.Request) -> web.StreamResponse:
    session = request[auth.SESSION]
    await request.app[SESSIONS].end(session)
    log.info("console_signed_out", actor=session.actor)
    response = web.HTTPSeeOther("/console/login")
    response.del_cookie(auth.COOKIE, path=auth.PREFIX)
    raise response


async def not_found(request: web.Request) -> web.StreamResponse:
    from controlplane.console.render import render

    return await render(request, "notfound.html", page="", title="Page not found", status=404,
                        missing=request.path)


def _pages() -> tuple[list[tuple[str, Page]], list[tuple[str, Page]]]:
    from controlplane.console import live, overview, people, policy, providers, runs

    modules = (overview, runs, people, policy, providers, live)
    pages: list[tuple[str, Page]] = [p for m in modules for p in m.PAGES]
    actions: list[tuple[str, Page]] = [a for m in modules for a in m.ACTIONS]
    return pages, actions


def install(app: web.Application, pool_of: Any) -> None:
    """Add the console to the admin app. `pool_of(app)` gives the Postgres pool once it is open."""
    pages, actions = _pages()
    app.router.add_get("/console/login", login_form)
    app.router.add_post("/console/login", login)
    app.router.add_post("/console/logout", logout)
    app.router.add_static("/console/static", STATIC, append_version=False)
    for path, handler in pages:
        app.router.add_get(path, handler)
    for path, handler in actions:
        app.router.add_post(path, handler)
    app.router.add_get("/console/{missing:.*}", not_found)  # last: after every page
    from controlplane.console import live

    live.setup(app)  # the live tail's stream registry and its shutdown hook

    async def sessions(app_: web.Application) -> Any:
        app_[SESSIONS] = auth.Sessions(pool_of(app_))
        yield

    app.cleanup_ctx.append(sessions)


def middleware() -> Any:
    return auth.middleware(lambda request: request.app[SESSIONS])
