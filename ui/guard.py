"""What stands in front of every route: the login/API-key gate, the failed-login throttle and the
request-body limit (ASGI middlewares around the whole app, Gradio's routes included).

Deny by default: when ``server.auth.username/password`` is set, every path needs the page's
login session (Gradio's own cookie) except :data:`PUBLIC_PATHS` / :data:`PUBLIC_PREFIXES`, each
public for a stated reason; ``/v1/*`` and ``/metrics`` keep their API-key dependency (ui/api.py)
and ``/v1/openapi.json`` joins them when a key is set; with a login and no key they need the
login session like the rest (the model is never left open behind a page login). A route Gradio (or we) add later is
therefore protected without anyone remembering to protect it.
"""
from __future__ import annotations

import collections
import hmac
import json
import math
import threading
import time
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

# Public while a page login is set, and why. Everything else needs the login session.
PUBLIC_PATHS: dict[str, str] = {
    "/": "the login form itself (Gradio serves only {auth_required: true}, no components, until logged in)",
    "/health": "the platform's readiness probe (says ready/loading/failed, nothing else)",
    "/login": "where the login form posts (failed attempts are throttled)",
    "/login/": "the same",
    "/logout": "ends a session",
    "/favicon.ico": "static asset the login form needs",
    "/theme.css": "static asset the login form needs",
    "/gradio_api/theme.css": "static asset the login form needs",
    "/robots.txt": "static asset",
    "/manifest.json": "static web-app manifest (title and icons only)",
    "/gradio_api/startup-events": "the login form's start-up call (returns true)",
    "/gradio_api/user": "who is logged in (null without a session)",
    "/gradio_api/user/": "the same",
    "/gradio_api/token": "the caller's own session token (null without a session)",
    "/gradio_api/token/": "the same",
    "/gradio_api/app_id": "a random id of this app instance",
    "/gradio_api/app_id/": "the same",
    "/gradio_api/login_check": "answers 401 itself without a session",
    "/gradio_api/login_check/": "the same",
}
PUBLIC_PREFIXES: dict[str, str] = {
    "/assets/": "the page's JavaScript/CSS bundle (the same for everyone, needed by the login form)",
    "/static/": "Gradio's static files (fonts, images)",
    "/svelte/": "Gradio's front-end modules",
    "/pwa_icon": "the web-app icon",
}
# Own API-key dependency (ui/api.py) — the gate leaves these to it.
KEY_PATHS = ("/v1/", "/metrics")

MAX_BODY_BYTES = 10 * 1024 * 1024
LOGIN_FAILURES = 10  # failed logins / wrong keys per client ...
LOGIN_WINDOW_S = 60.0  # ... within this window, then 429 until the oldest one ages out


def is_public(path: str) -> bool:
    return path in PUBLIC_PATHS or any(path.startswith(p) for p in PUBLIC_PREFIXES)


def _header(scope: Scope, name: bytes) -> bytes | None:
    for header, value in scope.get("headers", []):
        if header == name:
            return value
    return None


def _cookies(scope: Scope) -> dict[str, str]:
    raw = _header(scope, b"cookie")
    out: dict[str, str] = {}
    if raw:
        for part in raw.decode("latin-1").split(";"):
            name, sep, value = part.strip().partition("=")
            if sep:
                out[name] = value
    return out


async def _send_json(send: Send, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
    data = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": data})


def _openai_error(message: str, type_: str, code: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class LoginThrottle:
    """Failed logins and wrong API keys per client address, in a sliding window."""

    def __init__(self, limit: int = LOGIN_FAILURES, window_s: float = LOGIN_WINDOW_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limit, self.window_s, self.clock = limit, window_s, clock
        self._failures: dict[str, collections.deque[float]] = {}
        self._lock = threading.Lock()

    def _recent(self, client: str, now: float) -> collections.deque[float]:
        times = self._failures.setdefault(client, collections.deque())
        while times and times[0] <= now - self.window_s:
            times.popleft()
        return times

    def retry_after(self, client: str) -> int:
        """Seconds this client must wait (0 = it may try)."""
        with self._lock:
            now = self.clock()
            times = self._recent(client, now)
            if not times:
                self._failures.pop(client, None)
            if len(times) < self.limit:
                return 0
            return max(1, math.ceil(times[0] + self.window_s - now))

    def failed(self, client: str) -> None:
        with self._lock:
            now = self.clock()
            self._recent(client, now).append(now)
            if len(self._failures) > 10_000:  # bound the memory an address-rotating client can take
                oldest = min(self._failures, key=lambda c: self._failures[c][-1] if self._failures[c] else 0)
                self._failures.pop(oldest, None)


class AccessGate:
    """Login gate (deny by default) and failed-login throttle around the whole app.

    ``sessions`` returns the Gradio app's live session tokens and its cookie id (read at request
    time: the Gradio app is mounted after this is built).
    """

    def __init__(self, app: ASGIApp, *, login: bool, api_key: str,
                 sessions: Callable[[], tuple[dict, str]], throttle: LoginThrottle | None = None,
                 on_refused: Callable[[], None] | None = None, metrics_open: bool = False) -> None:
        self.app = app
        self.metrics_open = metrics_open  # server.auth.metrics: false
        self.login = login
        self.api_key = api_key.encode()
        self.sessions = sessions
        self.throttle = throttle or LoginThrottle()
        self.on_refused = on_refused or (lambda: None)

    def _logged_in(self, scope: Scope) -> bool:
        tokens, cookie_id = self.sessions()
        cookies = _cookies(scope)
        for name in (f"access-token-{cookie_id}", f"access-token-unsecure-{cookie_id}"):
            token = cookies.get(name)
            if token and token in tokens:
                return True
        return False

    def _key_ok(self, scope: Scope) -> bool:
        raw = _header(scope, b"authorization") or b""
        scheme, _, given = raw.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), self.api_key)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        root = scope.get("root_path", "")
        if root and not root.startswith("http") and (path == root or path.startswith(root + "/")):
            path = path[len(root):] or "/"  # a proxy that does not strip its prefix
        client = (scope.get("client") or ("?", 0))[0]
        is_login = scope["type"] == "http" and scope.get("method") == "POST" and path.rstrip("/") == "/login"
        keyed = path.startswith(KEY_PATHS) and bool(self.api_key)
        if path == "/v1/openapi.json" and self.api_key and not self._key_ok(scope):
            # The schema route has no dependency: refuse here, the same way as the others.
            await self._refuse_key(scope, receive, send, client)
            return

        if (is_login or (keyed and _header(scope, b"authorization"))) and scope["type"] == "http":
            wait = self.throttle.retry_after(client)
            if wait:
                self.on_refused()
                message = (f"Too many failed logins from this address: try again in {wait} s. "
                           f"/ 登录失败次数过多，请 {wait} 秒后再试。")
                await _send_json(send, 429, _openai_error(message, "rate_limit_error", "too_many_failed_logins"),
                                 {"Retry-After": str(wait)})
                return

        # /v1 and /metrics have their own key; with a page login and no key they need the login.
        key_guarded = bool(self.api_key) and (path.startswith(KEY_PATHS) or path == "/v1/openapi.json")
        if path == "/metrics" and self.metrics_open:
            key_guarded = True  # left open on purpose (server.auth.metrics: false)
        if self.login and not is_public(path) and not key_guarded:
            if not self._logged_in(scope):
                self.on_refused()
                if scope["type"] == "websocket":
                    await send({"type": "websocket.close", "code": 4401})
                    return
                if path.startswith(KEY_PATHS) or path == "/v1/openapi.json":
                    body = _openai_error("Not logged in: this server has a page login and no API key "
                                         "(server.auth.api_key), so the API needs the page's login session.",
                                         "invalid_request_error", "invalid_api_key")
                else:
                    body = {"detail": {"error": "Not authenticated", "auth_message": None}}
                await _send_json(send, 401, body)
                return

        if not (is_login or keyed) or scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def watch(message: Message) -> None:
            if message["type"] == "http.response.start":
                status = message["status"]
                if (is_login and status in (400, 401)) or (keyed and status == 401):
                    self.throttle.failed(client)
            await send(message)

        await self.app(scope, receive, watch)

    async def _refuse_key(self, scope: Scope, receive: Receive, send: Send, client: str) -> None:
        if _header(scope, b"authorization"):
            wait = self.throttle.retry_after(client)
            if wait:
                await _send_json(send, 429, _openai_error(
                    f"Too many failed logins from this address: try again in {wait} s.", "rate_limit_error",
                    "too_many_failed_logins"), {"Retry-After": str(wait)})
                return
            self.throttle.failed(client)
        self.on_refused()
        await _send_json(send, 401, _openai_error(
            "Missing or wrong API key: send 'Authorization: Bearer <key>' with the key set in server.auth.api_key "
            "(or VT_API_KEY).", "invalid_request_error", "invalid_api_key"), {"WWW-Authenticate": "Bearer"})


class BodyLimitMiddleware:
    """Refuse request bodies over ``max_bytes`` with 413 before anything parses them: at once when
    Content-Length says so, else while reading (a chunked or lying upload is cut at the limit)."""

    def __init__(self, app: ASGIApp, max_bytes: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def _too_large(self, send: Send) -> None:
        mb = self.max_bytes / (1024 * 1024)
        await _send_json(send, 413, _openai_error(
            f"The request body is larger than {mb:g} MB; send a shorter conversation.", "invalid_request_error",
            "request_too_large"), {"Connection": "close"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = _header(scope, b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                declared = -1
            if declared > self.max_bytes:
                await self._too_large(send)
                return
            if declared >= 0:
                await self.app(scope, receive, send)  # the server itself refuses more than declared
                return
        # No (valid) length: read up to the limit first, then replay what was read.
        body = bytearray()
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break
            body.extend(message.get("body", b""))
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                await self._too_large(send)
                return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
