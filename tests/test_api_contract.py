"""The /v1 contract in-process, over a scripted backend: OpenAPI, one auth dependency on every
route, SSE pings while the prompt is evaluated, OpenAI-shaped errors before and after the first
chunk, refusals before anything waits."""
from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator

import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from backends import load_manifest
from backends.base import Backend
from backends.types import (
    BackendInfo,
    ContextLengthExceeded,
    FinishReason,
    GenerationRequest,
    StreamChunk,
    Usage,
)
from ui import api as api_module
from ui.app import build_app
from ui.host import ModelHost

MODEL = "vibethinker-1.5b"
ADD = [{"role": "user", "content": "What is 2+2?"}]


class ScriptedBackend(Backend):
    """Replies '<think>…' then an answer; ``prefill_s`` delays the first chunk, ``fail`` raises."""

    name = "scripted"

    def __init__(self, prefill_s: float = 0.0, fail: str | None = None, fail_after_text: bool = False,
                 capacity: int = 1) -> None:
        self.prefill_s, self.fail, self.fail_after_text = prefill_s, fail, fail_after_text
        self._capacity = capacity
        self.streams = 0
        self.cancelled: list[str] = []

    def load(self, progress=None) -> None:
        pass

    @property
    def loaded(self) -> bool:
        return True

    @property
    def capacity(self) -> int:
        return self._capacity

    def check(self, request: GenerationRequest) -> int:
        super().check(request)
        if "too long" in request.messages[-1].content:
            raise ContextLengthExceeded("The conversation is 99999 tokens but the context window is 128.")
        return 3

    def stream(self, request: GenerationRequest) -> Iterator[StreamChunk]:
        self.streams += 1
        time.sleep(self.prefill_s)
        if self.fail and not self.fail_after_text:
            raise RuntimeError(self.fail)
        for index in range(request.n):
            yield StreamChunk(reasoning="thinking", index=index)
            if self.fail:
                raise RuntimeError(self.fail)
            usage = Usage(prompt_tokens=3, reasoning_tokens=1, answer_tokens=4, finish_reason=FinishReason.STOP)
            yield StreamChunk(answer=f"sample {index} \\boxed{{4}}", usage=usage, boxed_answer="4", index=index)

    def cancel(self, request_id: str) -> bool:
        self.cancelled.append(request_id)
        return True

    def info(self) -> BackendInfo:
        return BackendInfo("scripted", MODEL, "-", "cpu", "text", 128)


def _client(backend: Backend, **settings) -> tuple[TestClient, ModelHost]:
    manifest = load_manifest(env={}, overrides={"server.host": "127.0.0.1", **settings})
    host = ModelHost(manifest, backend_factory=lambda m: backend)
    host.start_loading()
    assert host.wait_loaded(30).ready
    return TestClient(build_app(host)), host


def test_openapi_documents_the_api_and_its_extras():
    http, _ = _client(ScriptedBackend())
    spec = http.get("/v1/openapi.json").json()
    assert {"/v1/chat/completions", "/v1/models", "/health", "/metrics"} <= set(spec["paths"])
    request = spec["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    for extra in ("thinking_budget", "top_k", "n", "seed"):
        assert request[extra].get("description"), extra
    responses = spec["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert {"400", "401", "429", "503"} <= set(responses)
    assert "ChatCompletion" in json.dumps(responses["200"])
    assert spec["components"]["securitySchemes"]  # the bearer key is part of the contract


def api_routes(routes) -> Iterator[APIRoute]:
    """Every FastAPI route of the app, through included routers."""
    for route in routes:
        if isinstance(route, APIRoute):
            yield route
        sub = getattr(route, "original_router", None) or getattr(route, "router", None)
        if sub is not None and hasattr(sub, "routes"):
            yield from api_routes(sub.routes)


def test_every_v1_route_and_metrics_demand_the_key():
    http, _ = _client(ScriptedBackend(), **{"server.auth.api_key": "sekrit"})
    routes = [r for r in api_routes(http.app.routes) if r.path.startswith("/v1")]
    assert len(routes) >= 2
    for route in routes:
        for method in route.methods:
            r = http.request(method, route.path, json={"model": MODEL, "messages": ADD})
            assert r.status_code == 401, (method, route.path)
            assert r.json()["error"]["code"] == "invalid_api_key" and r.headers["www-authenticate"] == "Bearer"
    assert http.get("/metrics").status_code == 401
    assert http.get("/metrics", headers={"Authorization": "Bearer sekrit"}).status_code == 200
    assert http.get("/health").status_code == 200  # the platform's probe stays open
    ok = http.post("/v1/chat/completions", json={"model": MODEL, "messages": ADD},
                   headers={"Authorization": "Bearer sekrit"})
    assert ok.status_code == 200


def test_metrics_can_be_left_open():
    http, _ = _client(ScriptedBackend(), **{"server.auth.api_key": "sekrit", "server.auth.metrics": "false"})
    assert http.get("/metrics").status_code == 200


def test_sse_pings_while_the_prompt_is_evaluated(monkeypatch):
    monkeypatch.setattr(api_module, "PING_S", 0.1)
    http, _ = _client(ScriptedBackend(prefill_s=0.8))
    with http.stream("POST", "/v1/chat/completions", json={"model": MODEL, "messages": ADD, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    first_text = next(i for i, line in enumerate(lines) if "thinking" in line)
    assert any(line.startswith(": ping") for line in lines[:first_text]), lines[:first_text]
    assert lines[-1] == "data: [DONE]"


def test_engine_failure_before_the_first_chunk_is_a_json_500():
    http, _ = _client(ScriptedBackend(fail="CUDA out of memory"))
    r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": ADD})
    assert r.status_code == 500
    assert "CUDA out of memory" in r.json()["error"]["message"] and r.json()["error"]["type"] == "server_error"
    # Streaming: the 200 already went out (pings cover the prefill), so the error is the last event.
    with http.stream("POST", "/v1/chat/completions", json={"model": MODEL, "messages": ADD, "stream": True}) as s:
        data = [line[6:] for line in s.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]" and "CUDA out of memory" in json.loads(data[-2])["error"]["message"]


def test_engine_failure_after_text_ends_the_stream_with_an_error_event():
    http, _ = _client(ScriptedBackend(fail="engine exploded", fail_after_text=True))
    with http.stream("POST", "/v1/chat/completions", json={"model": MODEL, "messages": ADD, "stream": True}) as s:
        data = [line[6:] for line in s.iter_lines() if line.startswith("data: ")]
    events = [json.loads(d) for d in data[:-1]]
    assert any(e.get("choices") and e["choices"][0]["delta"].get("reasoning_content") == "thinking" for e in events)
    assert "engine exploded" in events[-1]["error"]["message"] and data[-1] == "[DONE]"


def test_refusals_come_before_anything_waits_or_runs():
    backend = ScriptedBackend()
    http, host = _client(backend, **{"server.max_queue": "1"})
    r = http.post("/v1/chat/completions", json={"model": MODEL, "stream": True,
                                                 "messages": [{"role": "user", "content": "too long"}]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert backend.streams == 0
    for body, param in (({"n": 0}, "n"), ({"messages": []}, "messages"), ({"temperature": "hot"}, "temperature")):
        r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": ADD, **body})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (body, r.text)
    r = http.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    # Full line: one running, one waiting, the third is refused with Retry-After.
    running = host.limiter.enter()
    waiting = host.limiter.enter()
    try:
        r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": ADD})
        assert r.status_code == 429 and r.headers["retry-after"] and r.json()["error"]["code"] == "queue_full"
    finally:
        waiting.release()
        running.release()
    assert backend.streams == 0


def test_n_samples_are_n_choices_with_the_prompt_counted_once():
    http, host = _client(ScriptedBackend(capacity=4))
    r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": ADD, "n": 3})
    body = r.json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert body["choices"][2]["message"]["content"] == "sample 2 \\boxed{4}"
    assert body["choices"][1]["vibethinker"]["boxed_answer"] == "4"
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 15, "total_tokens": 18,
                             "completion_tokens_details": {"reasoning_tokens": 3}}
    with http.stream("POST", "/v1/chat/completions",
                     json={"model": MODEL, "messages": ADD, "n": 2, "stream": True,
                           "stream_options": {"include_usage": True}}) as s:
        events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
    finishes = {e["choices"][0]["index"]: e["choices"][0]["finish_reason"] for e in events
                if e["choices"] and e["choices"][0].get("finish_reason")}
    assert finishes == {0: "stop", 1: "stop"}
    usage = [e for e in events if e.get("usage")]
    assert len(usage) == 1 and usage[0]["choices"] == [] and usage[0]["usage"]["prompt_tokens"] == 3
    # A request of n samples takes n of the engine's slots in the one line.
    assert host.limiter.concurrency == 4 and host.limiter.running == 0


def test_a_dropped_stream_cancels_the_backend():
    backend = ScriptedBackend(prefill_s=0.3)
    http, host = _client(backend)
    done = threading.Event()

    def hang_up() -> None:
        with http.stream("POST", "/v1/chat/completions",
                         json={"model": MODEL, "messages": ADD, "stream": True}) as s:
            for line in s.iter_lines():
                if "role" in line:
                    break  # leave before the reply
        done.set()

    hang_up()
    assert done.is_set()
    deadline = time.monotonic() + 10
    while host.limiter.running and time.monotonic() < deadline:
        time.sleep(0.05)
    assert host.limiter.running == 0


@pytest.mark.parametrize("payload", [{"model": MODEL}, {"messages": ADD}])
def test_missing_fields_name_the_field(payload):
    http, _ = _client(ScriptedBackend())
    r = http.post("/v1/chat/completions", json=payload)
    assert r.status_code == 400 and r.json()["error"]["param"] in ("messages", "model")
