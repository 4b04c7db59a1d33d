"""The OpenAI-compatible API of a real server process running the tiny model (transformers)."""
from __future__ import annotations

import json
import threading

import httpx
import openai
import pytest

from bench.synthetic import ENDLESS_PROMPT
from helpers.server import ServerProcess, read_metric, wait_for

pytestmark = pytest.mark.slow

MODEL = "vibethinker-1.5b"
ADD = [{"role": "user", "content": "What is 2+2?"}]
LOOP = [{"role": "user", "content": "Think about the number forever."}]
# Streams for as long as it is let (loop guard off): for tests that must hang up mid-reply.
ENDLESS = [{"role": "user", "content": ENDLESS_PROMPT}]


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    # One request at a time and one waiting: the queue-full test relies on it.
    with ServerProcess([
        "--backend", "transformers", "--model", str(tiny_model_dir),
        "--set", "server.concurrency=1", "--set", "server.max_queue=1",
        "--set", "generation.loop_guard.enabled=false",
    ]) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_models_lists_the_model_with_metadata(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    meta = models.data[0].model_extra["metadata"]
    assert meta["backend"] == "transformers"
    assert meta["device"].startswith("cpu")
    assert meta["context_length"] > 0 and meta["dtype"]


def test_non_streaming_answer_with_reasoning_and_usage(client):
    resp = client.chat.completions.create(model=MODEL, messages=ADD, temperature=0, max_tokens=200)
    msg = resp.choices[0].message
    assert "\\boxed{4}" in msg.content
    assert "<think>" not in msg.content and "</think>" not in msg.content
    reasoning = msg.model_extra["reasoning_content"]
    assert reasoning.strip() and msg.model_extra["reasoning"] == reasoning
    assert resp.choices[0].finish_reason == "stop"
    assert resp.usage.prompt_tokens > 0
    assert resp.usage.completion_tokens_details.reasoning_tokens > 0
    assert resp.usage.completion_tokens > resp.usage.completion_tokens_details.reasoning_tokens
    assert resp.model_extra["vibethinker"]["boxed_answer"] == "4"


def test_streaming_answer_with_reasoning_deltas_and_usage(client):
    stream = client.chat.completions.create(model=MODEL, messages=ADD, temperature=0, max_tokens=200, stream=True,
                                            stream_options={"include_usage": True})
    reasoning, answer, finish, usage = "", "", None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            extra = choice.delta.model_extra or {}
            reasoning += extra.get("reasoning_content") or ""
            answer += choice.delta.content or ""
            finish = choice.finish_reason or finish
    assert reasoning.strip()
    assert "\\boxed{4}" in answer
    assert finish == "stop"
    assert usage is not None and usage.completion_tokens_details.reasoning_tokens > 0


def test_multi_turn_history_is_accepted(client):
    messages = ADD + [{"role": "assistant", "content": "<think>secret</think>The answer is \\boxed{4}."},
                      {"role": "user", "content": [{"type": "text", "text": "What is 2+2?"}]}]
    resp = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=100)
    assert resp.choices[0].message.content is not None


def test_thinking_budget_extra_field(client):
    resp = client.chat.completions.create(model=MODEL, messages=LOOP, temperature=0, max_tokens=400,
                                          extra_body={"thinking_budget": 20, "seed": 1, "top_k": 5})
    extras = resp.model_extra["vibethinker"]
    assert extras["finish_reason"] == "budget"
    # Unbudgeted, this prompt thinks for about 240 tokens.
    assert resp.usage.completion_tokens_details.reasoning_tokens < 100


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-4", messages=ADD)
    assert err.value.body["code"] == "model_not_found"
    assert MODEL in err.value.body["message"]


@pytest.mark.parametrize("bad, param", [
    ({"temperature": 5}, "temperature"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"n": 17}, "n"),
    ({"stop": ["\n"]}, "stop"),
])
def test_invalid_requests_are_400_with_the_param(server, bad, param):
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": MODEL, "messages": ADD, **bad}, timeout=30)
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]


def test_bad_json_and_bad_roles_are_400(server):
    r = httpx.post(server.url + "/v1/chat/completions", content=b"{nope", timeout=30,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/chat/completions", timeout=30,
                   json={"model": MODEL, "messages": [{"role": "tool", "content": "x"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages.0.role"
    r = httpx.post(server.url + "/v1/chat/completions", timeout=30,
                   json={"model": MODEL, "messages": [{"role": "system", "content": "x"}]})
    assert r.status_code == 400 and "role 'user'" in r.json()["error"]["message"]


def _open_stream(server, messages, max_tokens):
    """A streaming request held open by the caller; returns (client, response, first data line)."""
    http = httpx.Client(timeout=120)
    req = http.build_request("POST", server.url + "/v1/chat/completions",
                             json={"model": MODEL, "messages": messages, "temperature": 0,
                                   "max_tokens": max_tokens, "stream": True})
    resp = http.send(req, stream=True)
    assert resp.status_code == 200
    lines = resp.iter_lines()
    return http, resp, lines


def test_dropped_stream_cancels_the_generation(server):
    cancelled = {"source": "api", "finish_reason": "cancelled"}
    before = read_metric(server.url, "vibethinker_requests_total", cancelled)
    http, resp, lines = _open_stream(server, ENDLESS, 4000)
    try:
        seen = 0
        for line in lines:
            if line.startswith("data: ") and "reasoning_content" in line:
                seen += 1
                if seen >= 5:
                    break
        assert seen >= 5
    finally:
        resp.close()
        http.close()
    wait_for(lambda: read_metric(server.url, "vibethinker_requests_total", cancelled) == before + 1,
             what="the backend to record the cancelled generation")
    wait_for(lambda: read_metric(server.url, "vibethinker_requests_running") == 0, what="no generation running")
    assert "finished: cancelled" in server.log_text()


def test_queue_full_is_429_and_waiting_requests_are_served_in_turn(server):
    http1, resp1, lines1 = _open_stream(server, ENDLESS, 4000)
    results: dict[str, object] = {}
    try:
        next(line for line in lines1 if "reasoning_content" in line)  # the first request is running

        def second() -> None:
            r = httpx.post(server.url + "/v1/chat/completions", timeout=300,
                           json={"model": MODEL, "messages": ADD, "temperature": 0, "max_tokens": 100})
            results["second"] = r

        waiter = threading.Thread(target=second)
        waiter.start()
        wait_for(lambda: read_metric(server.url, "vibethinker_queue_waiting") == 1, what="the second request to wait")
        third = httpx.post(server.url + "/v1/chat/completions", timeout=30,
                           json={"model": MODEL, "messages": ADD, "max_tokens": 10})
        assert third.status_code == 429
        assert third.json()["error"]["code"] == "queue_full"
        assert "server.max_queue" in third.json()["error"]["message"]
    finally:
        resp1.close()
        http1.close()
    waiter.join(300)
    second_resp = results["second"]
    assert isinstance(second_resp, httpx.Response) and second_resp.status_code == 200
    assert "\\boxed{4}" in second_resp.json()["choices"][0]["message"]["content"]


def test_metrics_count_requests_and_tokens(server):
    text = httpx.get(server.url + "/metrics", timeout=10).text
    assert 'vibethinker_requests_total{finish_reason="stop",source="api"}' in text
    for name in ("vibethinker_tokens_total", "vibethinker_time_to_first_token_seconds_bucket",
                 "vibethinker_decode_tokens_per_second_count", "vibethinker_queue_waiting",
                 "vibethinker_errors_total", "vibethinker_model_ready 1.0"):
        assert name in text


def test_streaming_sse_format(server):
    with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=120,
                      json={"model": MODEL, "messages": ADD, "temperature": 0, "max_tokens": 100,
                            "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        data = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert "usage" not in chunks[-1]  # only with stream_options.include_usage, as OpenAI does


def test_llamacpp_backend_through_the_api(tiny_gguf):
    """The same API on the llama.cpp engine (the GGUF of the tiny model)."""
    with ServerProcess(["--backend", "llamacpp", "--model", str(tiny_gguf.parent),
                        "--set", f"model.gguf_file={tiny_gguf.name}", "--set", "llamacpp.n_ctx=2048"]) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        assert client.models.list().data[0].model_extra["metadata"]["backend"] == "llamacpp"
        stream = client.chat.completions.create(model=MODEL, messages=ADD, temperature=0, max_tokens=200,
                                                stream=True, stream_options={"include_usage": True})
        reasoning, answer, usage = "", "", None
        for chunk in stream:
            usage = chunk.usage or usage
            for choice in chunk.choices:
                reasoning += (choice.delta.model_extra or {}).get("reasoning_content") or ""
                answer += choice.delta.content or ""
        assert reasoning.strip() and "\\boxed{4}" in answer
        assert usage is not None and usage.completion_tokens_details.reasoning_tokens > 0
        # A conversation longer than the context window is the client's to fix: 400, not 500.
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model=MODEL, max_tokens=10,
                                           messages=[{"role": "user", "content": "wait " * 3000}])
        assert err.value.body["code"] == "context_length_exceeded"
        assert "2048" in err.value.body["message"]


def test_check_code_is_refused_while_solve_run_code_is_off(server):
    r = httpx.post(server.url + "/v1/chat/completions", timeout=30,
                   json={"model": MODEL, "messages": ADD, "check_code": True})
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["code"] == "code_checking_disabled" and error["param"] == "check_code"
    assert "solve.run_code" in error["message"]
