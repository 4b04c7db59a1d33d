"""Access: with server.auth set, every route that reaches the model or reveals configuration
demands it. The test walks the app's whole route table (ours and Gradio's), so a route added later
cannot slip through unnoticed; the public ones are an explicit allow-list with a reason each."""
from __future__ import annotations

import ast
import logging
import re
import socket
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from backends import load_manifest
from helpers.echo_engine import EchoBackend
from ui import guard
from ui.app import build_app
from ui.host import ModelHost

ROOT = Path(__file__).resolve().parents[2]
MODEL = "vibethinker-1.5b"
ADD = [{"role": "user", "content": "What is 2+2?"}]
KEY = "sekrit-key"
LOGIN = {"server.auth.username": "alice", "server.auth.password": "wonderland"}


def _app(**settings):
    manifest = load_manifest(env={}, overrides={"server.host": "127.0.0.1", **settings})
    host = ModelHost(manifest, backend_factory=EchoBackend)
    host.start_loading()
    assert host.wait_loaded(30).ready
    return build_app(host), host


def _sub_routes(route):
    for attr in ("original_router", "router"):
        sub = getattr(route, attr, None)
        if sub is not None and hasattr(sub, "routes"):
            return sub.routes
    if type(route).__name__ == "Mount":
        return route.routes
    return None


def all_routes(routes, prefix: str = ""):
    """(method, path) of every endpoint, through included routers and the mounted Gradio app."""
    for route in routes:
        path = prefix + getattr(route, "path", "")
        sub = _sub_routes(route)
        if sub is not None:
            yield from all_routes(sub, path)
            continue
        for method in sorted(getattr(route, "methods", None) or {"GET"}):
            yield method, path


def _concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "x", path)


def test_every_route_demands_the_login_or_the_key_except_the_listed_public_ones():
    app, _ = _app(**{"server.auth.api_key": KEY}, **LOGIN)
    routes = sorted(set(all_routes(app.routes)))
    paths = {p for _, p in routes}
    # The walk really sees Gradio's routes and ours (else the test would prove nothing).
    assert {"/config", "/gradio_api/queue/join", "/gradio_api/info", "/v1/chat/completions", "/metrics"} <= paths
    http = TestClient(app, follow_redirects=False)
    open_routes = []
    for method, path in routes:
        if method == "HEAD":
            continue
        url = _concrete(path)
        r = http.request(method, url, json={"model": MODEL, "messages": ADD})
        if guard.is_public(url):
            continue
        if r.status_code not in (401, 403):
            open_routes.append((method, path, r.status_code))
    assert not open_routes, f"reachable without login or key: {open_routes}"
    # The public ones say nothing about the model or the configuration.
    page = http.get("/").text
    assert '"auth_required":true' in page.replace(" ", "") and "vibethinker" not in page.lower().replace(
        "<title>vibethinker", "")
    assert http.get("/health").json() == {"health": "true"}
    for path in guard.PUBLIC_PATHS:
        assert guard.PUBLIC_PATHS[path].strip(), path  # each public route has its reason


def test_the_listed_public_routes_exist():
    """An allow-list entry whose route went away is a stale hole waiting for a new route."""
    app, _ = _app(**LOGIN)
    paths = {p for _, p in all_routes(app.routes)}
    for path in guard.PUBLIC_PATHS:
        assert path in paths, path
    for prefix in guard.PUBLIC_PREFIXES:
        assert any(p.startswith(prefix) for p in paths), prefix


def test_after_login_the_page_and_its_api_work_and_the_key_still_guards_v1():
    app, _ = _app(**{"server.auth.api_key": KEY}, **LOGIN)
    http = TestClient(app)
    assert http.get("/config").status_code == 401
    assert http.post("/login", data={"username": "alice", "password": "wonderland"}).status_code == 200
    assert http.get("/config").status_code == 200 and "components" in http.get("/config").json()
    assert http.get("/gradio_api/info").status_code == 200
    # The page's session is not an API key.
    assert http.get("/v1/models").status_code == 401
    assert http.get("/v1/openapi.json").status_code == 401
    keyed = {"Authorization": f"Bearer {KEY}"}
    assert http.get("/v1/openapi.json", headers=keyed).status_code == 200
    r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": ADD}, headers=keyed)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]


def test_key_only_guards_v1_and_metrics():
    app, _ = _app(**{"server.auth.api_key": KEY})
    http = TestClient(app)
    for method, path in all_routes(app.routes):
        if (path.startswith("/v1/") or path == "/metrics") and method != "HEAD":
            assert http.request(method, path, json={}).status_code == 401, path
    assert http.get("/config").status_code == 200  # documented: the page needs the login (start-up warns)


def test_login_without_key_guards_v1_and_metrics_with_the_login():
    app, _ = _app(**LOGIN)
    http = TestClient(app)
    for method, path in all_routes(app.routes):
        if (path.startswith("/v1/") or path == "/metrics") and method != "HEAD":
            assert http.request(method, path, json={}).status_code == 401, path
    assert http.post("/login", data={"username": "alice", "password": "wonderland"}).status_code == 200
    assert http.get("/v1/models").status_code == 200 and http.get("/metrics").status_code == 200
    app, _ = _app(**LOGIN, **{"server.auth.metrics": "false"})
    assert TestClient(app).get("/metrics").status_code == 200  # left open on purpose


def test_failed_logins_are_rate_limited_with_retry_after():
    app, _ = _app(**{"server.auth.api_key": KEY}, **LOGIN)
    http = TestClient(app)
    for _ in range(guard.LOGIN_FAILURES):
        assert http.post("/login", data={"username": "alice", "password": "guess"}).status_code == 400
    r = http.post("/login", data={"username": "alice", "password": "wonderland"})
    assert r.status_code == 429 and 1 <= int(r.headers["retry-after"]) <= guard.LOGIN_WINDOW_S
    assert r.json()["error"]["code"] == "too_many_failed_logins"


def test_wrong_api_keys_are_rate_limited_and_a_right_key_still_works_from_elsewhere():
    app, _ = _app(**{"server.auth.api_key": KEY})
    http = TestClient(app)
    for _ in range(guard.LOGIN_FAILURES):
        assert http.get("/v1/models", headers={"Authorization": "Bearer nope"}).status_code == 401
    r = http.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
    other = TestClient(app, client=("10.0.0.9", 5000))
    assert other.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


def test_throttle_window_slides():
    now = [0.0]
    throttle = guard.LoginThrottle(limit=3, window_s=10, clock=lambda: now[0])
    for _ in range(3):
        throttle.failed("a")
    assert throttle.retry_after("a") == 10 and throttle.retry_after("b") == 0
    now[0] = 10.5
    assert throttle.retry_after("a") == 0


def test_secrets_are_compared_in_constant_time():
    """No ``==``/``!=`` on a key, password or token anywhere in ui/ (hmac.compare_digest only);
    Gradio compares the page password with hmac.compare_digest too."""
    offenders = []
    for path in sorted((ROOT / "ui").glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Compare) and any(isinstance(op, (ast.Eq, ast.NotEq)) for op in node.ops):
                text = ast.unparse(node).lower()
                operands = [node.left, *node.comparators]
                if any(isinstance(o, ast.Call) and ast.unparse(o.func) == "bool" for o in operands):
                    continue  # is it set at all: not a comparison of the secret
                if re.search(r"api_key|password|secret|token|\bkey\b", text) and "none" not in text:
                    offenders.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
    assert not offenders, offenders
    import inspect

    from gradio import route_utils

    assert "compare_digest" in inspect.getsource(route_utils.compare_passwords_securely)


def test_serving_on_all_interfaces_without_auth_warns_at_start(monkeypatch, caplog):
    from ui import server as server_module

    with socket.socket() as sock:
        monkeypatch.setattr(server_module, "bind_socket", lambda host, port: sock)
        monkeypatch.setattr(server_module.DrainingServer, "run", lambda self, sockets=None: None)
        manifest = load_manifest(env={}, overrides={"server.host": "0.0.0.0", "model.path": "/nonexistent"})
        with caplog.at_level(logging.WARNING, logger="ui.server"):
            assert server_module.serve(manifest) == 0
    assert any("anyone who can reach this port" in r.getMessage() for r in caplog.records)
