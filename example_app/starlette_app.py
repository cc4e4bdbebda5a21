"""The example app on plain Starlette.

Routes (the FastAPI twin in ``fastapi_app`` serves the same ones):

    GET  /                    the visit counter ("Número de visitas: N"), login form
    POST /reset               forget the counter
    POST /login               log in as a name: rotate the session id, bind the user
    POST /logout              end this session (record deleted, cookie expired)
    POST /logout-everywhere   revoke every session of the logged-in user
    GET  /report              a slow page cached in Redis under the tag "report"
    POST /report/invalidate   drop the cached report by tag
    GET  /rate                a slow lookup memoized in Redis (tag "rate"), page per user
    POST /rate/invalidate     drop the memoized lookup by tag
    GET  /healthz             JSON: who is answering, which Redis, the near cache
    GET  /stats               the fleet's last minutes (counters every instance adds in Redis)
    GET  /metrics             Prometheus exposition of this instance
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse
from starlette.routing import Route

from asgi_redis_kit import cached, get_cache

from . import pages, web
from .settings import REPORT_TAG, REPORT_TTL, Settings

FRAMEWORK = "Starlette"


def _forbidden() -> PlainTextResponse:
    return PlainTextResponse("Cross-site form posts are refused.", status_code=403)


def _back(path: str = "/") -> RedirectResponse:
    # 303: the browser follows a POST with a GET, so reloading never re-posts.
    return RedirectResponse(path, status_code=303)


async def home(request: Request) -> HTMLResponse:
    return HTMLResponse(await web.home(request))


async def reset(request: Request) -> RedirectResponse | PlainTextResponse:
    if not web.is_same_origin(request):
        return _forbidden()
    web.session_of(request).pop("visits", None)
    return _back()


async def login(request: Request) -> RedirectResponse | PlainTextResponse:
    if not web.is_same_origin(request):
        return _forbidden()
    name = web.clean_user_name(await web.form_field(request, "name"))
    if name is None:
        return _back()
    # A new id on every privilege change defeats session fixation; the data
    # (the visit counter) comes along.
    session = web.session_of(request)
    session.regenerate()
    session.bind_user(name)
    return _back()


async def logout(request: Request) -> RedirectResponse | PlainTextResponse:
    if not web.is_same_origin(request):
        return _forbidden()
    web.session_of(request).clear()
    return _back()


async def logout_everywhere(request: Request) -> RedirectResponse | PlainTextResponse:
    if not web.is_same_origin(request):
        return _forbidden()
    session = web.session_of(request)
    if session.user_id is not None:
        await session.store.revoke_user(session.user_id)
    # Revoking deleted this session's record too; clear() also expires the cookie.
    session.clear()
    return _back()


@cached(ttl=REPORT_TTL, tags=[REPORT_TAG], ignores_session=True)
async def report(request: Request) -> HTMLResponse:
    # Never touch request.session here: ignores_session=True shares the page
    # with every visitor, logged in or not.
    built_at, rows = await web.build_report(web.settings_of(request).report_delay)
    html = pages.report_page(
        built_at=built_at,
        build_seconds=web.settings_of(request).report_delay,
        rows=rows,
        status=web.status_of(request),
    )
    return HTMLResponse(html)


async def invalidate_report(request: Request) -> RedirectResponse | PlainTextResponse:
    if not web.is_same_origin(request):
        return _forbidden()
    await get_cache(request).invalidate_tags(REPORT_TAG)
    return _back("/report")


async def rate(request: Request) -> HTMLResponse:
    return HTMLResponse(await web.rate(request))


async def invalidate_rate(request: Request) -> RedirectResponse | PlainTextResponse:
    if not web.is_same_origin(request):
        return _forbidden()
    await web.invalidate_rate(request)
    return _back("/rate")


async def stats(request: Request) -> HTMLResponse:
    return HTMLResponse(await web.stats(request))


async def healthz(request: Request) -> JSONResponse:
    return JSONResponse(await web.health(request))


def create_app(settings: Settings | None = None) -> Starlette:
    """The Starlette example app; ``settings`` defaults to the environment's."""
    settings = settings or Settings.from_env()
    metrics, flusher = web.monitoring(settings)
    routes = [
        Route("/", home, methods=["GET"]),
        Route("/reset", reset, methods=["POST"]),
        Route("/login", login, methods=["POST"]),
        Route("/logout", logout, methods=["POST"]),
        Route("/logout-everywhere", logout_everywhere, methods=["POST"]),
        Route("/report", report, methods=["GET"]),
        Route("/report/invalidate", invalidate_report, methods=["POST"]),
        Route("/rate", rate, methods=["GET"]),
        Route("/rate/invalidate", invalidate_rate, methods=["POST"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/stats", stats, methods=["GET"]),
        Route("/metrics", metrics.asgi_app(), methods=["GET"]),
    ]
    middleware, store = web.middleware(settings, FRAMEWORK, metrics)
    app = Starlette(routes=routes, middleware=middleware, lifespan=web.lifespan(flusher))
    app.state.fleet = flusher
    app.state.store = store
    app.state.settings = settings
    app.state.framework = FRAMEWORK
    return app
