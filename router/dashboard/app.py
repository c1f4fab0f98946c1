"""The dashboard's web application: pages, the JSON API (``api.py``), ``/metrics``, and who may use them.

Access (README, "Operations"):

* Bound to loopback (the default) without a token, anyone on this host may
  use it; the ``Host`` header must then name loopback too, so that a web page
  elsewhere cannot reach it through a DNS name rebound to 127.0.0.1.
* With a token (required beyond loopback: ``router/preflight.py`` refuses to
  start without one), every page, API call and ``/metrics`` needs it: the
  API as ``Authorization: Bearer TOKEN``, a browser through the login form,
  which sets an HttpOnly, SameSite=Strict cookie holding an HMAC of the token.
* Every state-changing call is a POST that must carry ``X-Requested-With``
  (a page on another site cannot send a custom header without a CORS
  preflight, which this app never grants) and, when the browser sends one,
  an ``Origin`` equal to this server's own.
* Every request is logged (``router.dashboard.access``): client address,
  method, path and status, never the query string (a search term may be an
  accession number); successful reads at DEBUG, as the page polls every 2 s.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from prometheus_client import CONTENT_TYPE_LATEST

from router import readiness
from router.dashboard.api import api
from router.dashboard.token import LOOPBACK_NAMES, is_loopback, read_token
from router.kernel.settings import Config
from router.metrics import exposition
from router.operations import Operator

log = logging.getLogger(__name__)
access_log = logging.getLogger("router.dashboard.access")

HERE = Path(__file__).resolve().parent
COOKIE = "dicom_router_session"
CSRF_HEADER = "x-requested-with"
SESSION_LABEL = b"dicom-router dashboard session"
UNSAFE_METHODS = {"POST", "PUT", "PATCH", "DELETE"}
API_DOCS = "/api/docs"
SWAGGER_ASSETS = "/static/swagger-ui"


class Access:
    """Who may use the dashboard: the token (when there is one), the Host, and same-origin POSTs.

    Args:
        host: the address the dashboard binds.
        token: the token every request must prove; None: none required (loopback only).
    """

    def __init__(self, host: str, token: str | None) -> None:
        self.loopback = is_loopback(host)
        self.token = token
        self.session = hmac.new(token.encode(), SESSION_LABEL, hashlib.sha256).hexdigest() if token else None

    def authenticated(self, request: Request) -> bool:
        """Whether the request proves the token (always, when none is required)."""
        if self.token is None:
            return True
        scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(credentials.strip().encode(), self.token.encode()):
            return True
        cookie = request.cookies.get(COOKIE, "")
        return bool(cookie) and hmac.compare_digest(cookie.encode(), self.session.encode())

    def valid_token(self, offered: str) -> bool:
        return self.token is not None and hmac.compare_digest(offered.strip().encode(), self.token.encode())

    def host_refused(self, request: Request) -> str | None:
        """Bound to loopback without a token: a Host header naming anything else (DNS rebinding) is refused."""
        if not self.loopback or self.token is not None:
            return None
        host = (urlsplit("//" + request.headers.get("host", "")).hostname or "").lower()
        if host in LOOPBACK_NAMES or is_loopback(host):
            return None
        return f"Host {host!r} is not this loopback dashboard"

    def cross_site(self, request: Request) -> str | None:
        """Why a state-changing request looks cross-site; None when it is this page's own."""
        if request.method not in UNSAFE_METHODS:
            return None
        origin = request.headers.get("origin")
        if origin is not None and origin != f"{request.url.scheme}://{request.headers.get('host', '')}":
            return f"Origin {origin} is not this dashboard"
        if request.headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
            return "a cross-site request"
        if request.url.path.startswith("/api/") and not request.headers.get(CSRF_HEADER):
            return f"state-changing API calls need the {CSRF_HEADER} header"
        return None


def create_app(config: Config, redis_url: str | None = None, token: str | None = None,
               ingest_here: bool = False) -> FastAPI:
    """The dashboard application for ``config``.

    Args:
        redis_url: the queues' Redis (default: the config's, or a running ``run``'s embedded one).
        token: the token; default: read from the ``dashboard:`` section's ``token_file`` / ``token_env``.
        ingest_here: the ingest runs on this host (``run``): ``/readyz`` checks its port too.
    """
    settings = config.dashboard
    if token is None and settings is not None:
        token = read_token(settings)
    access = Access(settings.host if settings else "127.0.0.1", token)
    operator = Operator.of(config, redis_url)

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # noqa: ANN202
        yield
        operator.close()

    app = FastAPI(title="dicom-router", lifespan=lifespan, summary="Queues, destinations, dead letters, journeys and rules of a router",
                  docs_url=None, redoc_url=None, openapi_url="/api/openapi.json")
    app.state.config = config
    app.state.operator = operator
    app.state.access = access
    app.include_router(api)
    _mount_probes(app, ingest_here)
    _mount_api_docs(app)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    templates = Jinja2Templates(directory=HERE / "templates")
    _mount_metrics(app)

    @app.middleware("http")
    async def guard(request: Request, call_next):  # noqa: ANN001, ANN202
        if request.url.path in PROBES:  # an orchestrator's probe: no token, any Host; says nothing private
            return await call_next(request)
        if (why := access.host_refused(request)) is not None:
            return JSONResponse({"detail": why}, status_code=400)
        if (why := access.cross_site(request)) is not None:
            log.warning("refused %s %s: %s", request.method, request.url.path, why)
            return JSONResponse({"detail": why}, status_code=403)
        path = request.url.path
        if path.startswith("/static/") or path == "/login" or access.authenticated(request):
            return await call_next(request)
        if (path.startswith("/api/") and path != API_DOCS) or path == "/metrics":  # the docs are a page
            return JSONResponse({"detail": "the dashboard's token is required"}, status_code=401,
                                headers={"WWW-Authenticate": "Bearer"})
        return RedirectResponse("/login", status_code=303)

    @app.middleware("http")  # added last, so outermost: refusals by guard are logged too
    async def log_access(request: Request, call_next):  # noqa: ANN001, ANN202
        response = await call_next(request)
        quiet = request.method in ("GET", "HEAD") and response.status_code < 400
        access_log.log(logging.DEBUG if quiet else logging.INFO, "%s %s %s %d",
                       request.client.host if request.client else "?", request.method, request.url.path,
                       response.status_code)
        return response

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index(request: Request) -> Response:
        return templates.TemplateResponse(request, "index.html", {
            "router": config.router, "destinations": list(config.destinations), "token": access.token is not None})

    @app.get("/login", response_class=HTMLResponse, include_in_schema=False)
    def login_form(request: Request) -> Response:
        return templates.TemplateResponse(request, "login.html", {"failed": False})

    @app.post("/login", include_in_schema=False)
    async def login(request: Request) -> Response:
        offered = parse_qs((await request.body()).decode("utf-8", "replace")).get("token", [""])[0]
        if not access.valid_token(offered):
            log.warning("dashboard login refused from %s", request.client.host if request.client else "?")
            return templates.TemplateResponse(request, "login.html", {"failed": True}, status_code=401)
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(COOKIE, access.session, httponly=True, samesite="strict",
                            secure=request.url.scheme == "https")
        return response

    return app


PROBES = ("/healthz", "/readyz")


def _mount_probes(app: FastAPI, ingest_here: bool) -> None:
    """``/healthz`` (the process answers) and ``/readyz`` (Redis answers, the spool takes a
    file, and with ``ingest_here`` the ingest listens: ``router/readiness.py``), open to
    probes without the token: they name checks and reasons, nothing about instances."""

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> Response:
        return JSONResponse({"alive": True})

    @app.get("/readyz", include_in_schema=False)
    def readyz() -> Response:
        operator: Operator = app.state.operator
        checks = readiness.ready(app.state.config, operator.redis_url, ingest_here)
        ok = all(check.ok for check in checks)
        return JSONResponse({"ready": ok, "checks": [check.as_dict() for check in checks]},
                            status_code=200 if ok else 503)


def _mount_api_docs(app: FastAPI) -> None:
    """``/api/docs``: Swagger UI for the OpenAPI document, its files served from the installed
    ``fastapi-offline`` package, never a CDN (a router's network often reaches no internet), and
    ``validatorUrl: null``, or Swagger UI may ask swagger.io's online validator about the document.
    Behind the token it is a page like ``/``: without it, a browser is sent to the login form.

    Mounted before ``/static``, which would otherwise take ``/static/swagger-ui/`` for its own.
    """
    app.mount(SWAGGER_ASSETS, StaticFiles(packages=[("fastapi_offline", "static")]), name="swagger-ui")

    @app.get(API_DOCS, include_in_schema=False)
    def api_docs() -> Response:
        return get_swagger_ui_html(openapi_url=app.openapi_url, title="dicom-router API",
                                   swagger_js_url=f"{SWAGGER_ASSETS}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{SWAGGER_ASSETS}/swagger-ui.css",
                                   swagger_favicon_url=f"{SWAGGER_ASSETS}/favicon.png",
                                   swagger_ui_parameters={"validatorUrl": None})


def _mount_metrics(app: FastAPI) -> None:
    """``/metrics`` for Prometheus (``router/metrics.py``): the router's counters, read from Redis at each scrape."""

    @app.get("/metrics", include_in_schema=False)
    def scrape() -> Response:
        operator: Operator = app.state.operator
        if (problem := operator.redis_problem) is not None:
            return Response(problem + "\n", status_code=503, media_type="text/plain")
        return Response(exposition(app.state.config, operator.redis, operator.spool), media_type=CONTENT_TYPE_LATEST)


def serve(config: Config, redis_url: str | None = None, ingest_here: bool = False) -> None:
    """Serve the dashboard until SIGINT/SIGTERM (uvicorn).

    Raises:
        OSError: the port cannot be bound.
    """
    import uvicorn

    settings = config.dashboard
    app = create_app(config, redis_url, ingest_here=ingest_here)
    log.info("dashboard on http://%s:%d/ (%s)", settings.host, settings.port,
             "token required" if app.state.access.token else "loopback, no token")
    server = uvicorn.Server(uvicorn.Config(app, host=settings.host, port=settings.port, log_level="warning",
                                           access_log=False, lifespan="on"))
    try:
        server.run()
    except SystemExit as exc:  # uvicorn exits when it cannot bind; say it as the other servers do
        if server.started:
            raise
        raise OSError(f"cannot bind {settings.host}:{settings.port}") from exc
