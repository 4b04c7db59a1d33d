"""One ASGI app on one port: FastAPI routes first (/health, /metrics, /v1/*), then the Gradio page."""
from __future__ import annotations

import logging
import re
from importlib.metadata import PackageNotFoundError, version

import gradio as gr
from fastapi import Depends, FastAPI
from fastapi.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from .api import api_key_guard, build_router, install_error_handlers
from .guard import AccessGate, BodyLimitMiddleware
from .host import ModelHost
from .metrics import CONTENT_TYPE_LATEST
from .openai_models import Health
from .page import CSS, build_page

try:
    __version__ = version("vibethinker-app")
except PackageNotFoundError:  # running from a bundle folder, not installed
    __version__ = "0"

log = logging.getLogger("ui.app")


def normalize_root_path(value: str) -> str:
    value = value.strip()
    if not value or value == "/":
        return ""
    if value.startswith(("http://", "https://")):
        return value.rstrip("/")
    return "/" + value.strip("/")


# A forwarded prefix is a plain URL path: segments of letters, digits and -._~%@+ only. Anything
# else (quotes, angle brackets, a scheme or a host such as //evil.com) would let whoever sends the
# header decide where the page loads its code from, or put markup into it: such a header is ignored.
_SAFE_PREFIX = re.compile(r"(/[A-Za-z0-9._~%@+-]+)+")


def forwarded_prefix(value: str) -> str:
    """The path of an ``X-Forwarded-Prefix`` header, or "" when it is not a plain path."""
    value = value.split(",")[0].strip()
    if not value.startswith("/") or value.startswith("//"):
        return ""
    value = "/" + value.strip("/") if value.strip("/") else ""
    return value if not value or _SAFE_PREFIX.fullmatch(value) else ""


class ForwardedPrefixMiddleware:
    """Behind a sub-path proxy (``/proxy/8080/``) the page must build its URLs under that prefix.

    Gradio reads the ASGI ``root_path`` but ignores ``X-Forwarded-Prefix``, so we copy the header
    (or the configured ``server.root_path``) into the scope. The header wins because it is what
    this very request came through; requests that still carry the prefix in their path (proxies
    that do not strip it) are routed too, since Starlette strips a matching root_path.
    """

    def __init__(self, app: ASGIApp, root_path: str = "") -> None:
        self.app = app
        self.root_path = root_path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            prefix = ""
            for name, value in scope.get("headers", []):
                if name == b"x-forwarded-prefix":
                    prefix = forwarded_prefix(value.decode("latin-1"))
                    break
            prefix = prefix or (self.root_path if not self.root_path.startswith("http") else "")
            if prefix:
                scope = dict(scope)
                scope["root_path"] = prefix
        await self.app(scope, receive, send)


# Runs before Gradio's app boots: if the root URL the server worked out is not where the browser
# actually is (a proxy that rewrites Host and sends no X-Forwarded-Prefix, or a root_path set for
# a proxy while the port is opened directly), use the browser's own location. The page is the
# only route the page lives on, so its location is the app's root.
_ROOT_FIX = (
    b"<script>(function(){var c=window.gradio_config;if(!c||typeof c.root!=='string')return;"
    b"var here=(location.origin+location.pathname).replace(/\\/+$/,'');"
    b"if(c.root.replace(/\\/+$/,'')!==here){c.root=here;}})();</script>"
)
_CONFIG_MARK = b"window.gradio_config ="


class BrowserRootMiddleware:
    """Inject :data:`_ROOT_FIX` into the page's HTML right after Gradio's config."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "GET" or scope["path"] not in ("/", ""):
            await self.app(scope, receive, send)
            return
        start: dict | None = None
        body = bytearray()

        async def capture(message: dict) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                headers = dict(message.get("headers", []))
                if not headers.get(b"content-type", b"").startswith(b"text/html") or b"content-encoding" in headers:
                    start = None
                    await send(message)
                    return
                start = message
                return
            if start is None:
                await send(message)
                return
            body.extend(message.get("body", b""))
            if message.get("more_body"):
                return
            html = bytes(body)
            mark = html.find(_CONFIG_MARK)
            end = html.find(b"</script>", mark) if mark != -1 else -1
            if end != -1:
                end += len(b"</script>")
                html = html[:end] + _ROOT_FIX + html[end:]
            headers = [(k, v) for k, v in start.get("headers", []) if k != b"content-length"]
            headers.append((b"content-length", str(len(html)).encode()))
            await send({**start, "headers": headers})
            await send({"type": "http.response.body", "body": html, "more_body": False})

        await self.app(scope, receive, capture)


def build_app(host: ModelHost) -> FastAPI:
    manifest = host.manifest
    server = manifest.server
    app = FastAPI(
        title="VibeThinker", version=__version__, docs_url=None, redoc_url=None, openapi_url="/v1/openapi.json",
        description="OpenAI-compatible API of VibeThinker (the page is at /). Extras: thinking_budget and top_k "
        "in requests; reasoning_content/reasoning and a vibethinker object in responses.",
    )
    install_error_handlers(app, host)

    @app.get("/health", response_model=Health, responses={503: {"model": Health}},
             summary="200 {\"health\": \"true\"} when ready; 503 with the reason while loading, failed, draining "
             "or while the engine cannot serve (a remote engine's upstream does not answer)")
    def health() -> JSONResponse:
        st = host.status()
        if st.ready:
            problem = host.engine_problem()
            if not problem:
                return JSONResponse({"health": "true"})
            return JSONResponse({"health": "false", "status": "unavailable", "reason": problem}, status_code=503,
                                headers={"Retry-After": "5"})
        body: dict = {"health": "false", "status": st.state, "reason": host.not_ready_reason()}
        if st.state == "loading":
            body["progress"] = round(st.fraction, 3)
        return JSONResponse(body, status_code=503)

    # The counters reveal usage, not content; still behind the API key unless told otherwise.
    metrics_guard = [Depends(api_key_guard(host))] if server.auth.metrics else []

    @app.get("/metrics", dependencies=metrics_guard, summary="Prometheus metrics", response_class=Response)
    def metrics() -> Response:
        return Response(host.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    app.include_router(build_router(host))

    demo, i18n = build_page(host)
    auth = None
    if server.auth.username and server.auth.password:
        auth = (server.auth.username, server.auth.password)
    root_path = normalize_root_path(server.root_path)
    app = gr.mount_gradio_app(
        app, demo, path="/",
        # A full URL must go to Gradio itself; a path is set per request by the middleware below.
        root_path=root_path if root_path.startswith("http") else None, auth=auth, i18n=i18n, css=CSS,
        footer_links=["api", "settings"], run_history=False, ssr_mode=False,
        theme=gr.themes.Soft(),
    )
    if not root_path.startswith("http"):  # an explicit full URL is the user's word
        app.add_middleware(BrowserRootMiddleware)
    app.add_middleware(BodyLimitMiddleware)
    gradio_app = next(r.app for r in app.routes if getattr(r, "path", None) == "" and hasattr(r, "app"))
    app.add_middleware(AccessGate, login=auth is not None, api_key=server.auth.api_key,
                       sessions=lambda: (gradio_app.tokens, gradio_app.cookie_id),
                       on_refused=lambda: host.metrics.errors.labels(kind="auth").inc(),
                       metrics_open=not server.auth.metrics)
    app.add_middleware(ForwardedPrefixMiddleware, root_path=root_path)
    return app
