"""The FastAPI twin of ``starlette_app``: the same routes, cookie and pages.

It shares the cookie name, path and secret with the Starlette app, so a
session started on one is continued on the other when both use one Redis.
Form posts are guarded by a dependency and the cached report is a path
operation with ``@cached`` under the route decorator, as a FastAPI user
would write them.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from starlette.routing import Route

from asgi_redis_kit import cached, get_cache

from . import pages, web
from .settings import REPORT_TAG, REPORT_TTL, Settings

FRAMEWORK = "FastAPI"


def same_origin(request: Request) -> None:
    if not web.is_same_origin(request):
        raise HTTPException(status_code=403, detail="Cross-site form posts are refused.")


async def login_name(request: Request) -> str | None:
    return web.clean_user_name(await web.form_field(request, "name"))


SameOrigin = Depends(same_origin)


def _back(path: str = "/") -> RedirectResponse:
    # 303: the browser follows a POST with a GET, so reloading never re-posts.
    return RedirectResponse(path, status_code=303)


def create_app(settings: Settings | None = None) -> FastAPI:
    """The FastAPI example app; ``settings`` defaults to the environment's."""
    settings = settings or Settings.from_env()
    metrics, flusher = web.monitoring(settings)
    middleware, store = web.middleware(settings, FRAMEWORK, metrics)
    app = FastAPI(
        title="asgi_redis_kit example",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        middleware=middleware,
        lifespan=web.lifespan(flusher),
    )
    app.state.store = store
    app.state.fleet = flusher
    # An ASGI app, so a Starlette Route (FastAPI's add_route wants a request handler).
    app.router.routes.append(Route("/metrics", metrics.asgi_app(), methods=["GET"]))
    app.state.settings = settings
    app.state.framework = FRAMEWORK

    @app.get("/", response_class=HTMLResponse)
    async def home(request: Request) -> HTMLResponse:
        return HTMLResponse(await web.home(request))

    @app.post("/reset", dependencies=[SameOrigin])
    async def reset(request: Request) -> RedirectResponse:
        web.session_of(request).pop("visits", None)
        return _back()

    @app.post("/login", dependencies=[SameOrigin])
    async def login(
        request: Request, name: Annotated[str | None, Depends(login_name)]
    ) -> RedirectResponse:
        if name is None:
            return _back()
        # A new id on every privilege change defeats session fixation; the data
        # (the visit counter) comes along.
        session = web.session_of(request)
        session.regenerate()
        session.bind_user(name)
        return _back()

    @app.post("/logout", dependencies=[SameOrigin])
    async def logout(request: Request) -> RedirectResponse:
        web.session_of(request).clear()
        return _back()

    @app.post("/logout-everywhere", dependencies=[SameOrigin])
    async def logout_everywhere(request: Request) -> RedirectResponse:
        session = web.session_of(request)
        if session.user_id is not None:
            await session.store.revoke_user(session.user_id)
        # Revoking deleted this session's record too; clear() also expires the cookie.
        session.clear()
        return _back()

    @app.get("/report", response_class=HTMLResponse)
    @cached(ttl=REPORT_TTL, tags=[REPORT_TAG], ignores_session=True)
    async def report(request: Request) -> HTMLResponse:
        # Never touch request.session here: ignores_session=True shares the page
        # with every visitor, logged in or not.
        delay = web.settings_of(request).report_delay
        built_at, rows = await web.build_report(delay)
        html = pages.report_page(
            built_at=built_at, build_seconds=delay, rows=rows, status=web.status_of(request)
        )
        return HTMLResponse(html)

    @app.post("/report/invalidate", dependencies=[SameOrigin])
    async def invalidate_report(request: Request) -> RedirectResponse:
        await get_cache(request).invalidate_tags(REPORT_TAG)
        return _back("/report")

    @app.get("/rate", response_class=HTMLResponse)
    async def rate(request: Request) -> HTMLResponse:
        return HTMLResponse(await web.rate(request))

    @app.post("/rate/invalidate", dependencies=[SameOrigin])
    async def invalidate_rate(request: Request) -> RedirectResponse:
        await web.invalidate_rate(request)
        return _back("/rate")

    @app.get("/stats", response_class=HTMLResponse)
    async def stats(request: Request) -> HTMLResponse:
        return HTMLResponse(await web.stats(request))

    @app.get("/healthz")
    async def healthz(request: Request) -> dict[str, Any]:
        return await web.health(request)

    return app
