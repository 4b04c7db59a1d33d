"""One ASGI app on one port: FastAPI routes first (/health, /metrics, /v1/*), then the Gradio page."""
from __future__ import annotations

import hmac
import logging

import gradio as gr
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from .api import ApiError, build_router
from .host import ModelHost
from .metrics import CONTENT_TYPE_LATEST
from .page import CSS, build_page

log = logging.getLogger("ui.app")


def normalize_root_path(value: str) -> str:
    value = value.strip()
    if not value or value == "/":
        return ""
    if value.startswith(("http://", "https://")):
        return value.rstrip("/")
    return "/" + value.strip("/")


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
                    prefix = normalize_root_path(value.decode("latin-1").split(",")[0])
                    break
            prefix = prefix or (self.root_path if not self.root_path.startswith("http") else "")
            if prefix:
                scope = dict(scope)
                scope["root_path"] = prefix
        await self.app(scope, receive, send)


def build_app(host: ModelHost) -> FastAPI:
    manifest = host.manifest
    server = manifest.server
    app = FastAPI(title="VibeThinker", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/health")
    def health() -> JSONResponse:
        st = host.status()
        if st.ready:
            return JSONResponse({"health": "true"})
        body = {"health": "false", "status": st.state, "reason": host.not_ready_reason()}
        if st.state == "loading":
            body["progress"] = round(st.fraction, 3)
        return JSONResponse(body, status_code=503)

    @app.get("/metrics")
    def metrics(request: Request) -> Response:
        # Same key as /v1 when one is set: the counters reveal usage, not content.
        key = server.auth.api_key
        if key:
            scheme, _, given = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key.encode()):
                return ApiError(401, "Missing or wrong API key for /metrics: send 'Authorization: Bearer <key>'.",
                                "invalid_request_error", code="invalid_api_key").response()
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
    app.add_middleware(ForwardedPrefixMiddleware, root_path=root_path)
    return app
