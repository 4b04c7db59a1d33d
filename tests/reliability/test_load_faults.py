"""Load and faults on real servers: 8 concurrent streaming clients mixed with non-streaming ones
for several rounds on the transformers and llama.cpp engines; a storm of 50 clients that hang up
while queued, in prefill and mid-stream; an engine raising mid-generation; a model that fails to
load; SIGTERM with two requests in flight, and a second signal.

Already proven elsewhere (not repeated here): the queue's 429 + Retry-After beyond
server.max_queue (tests/test_api_openai.py::test_queue_full_is_429_and_waiting_requests_are_served_in_turn,
tests/test_api_contract.py::test_refusals_come_before_anything_waits_or_runs); one dropped stream
cancels its generation (tests/test_api_openai.py::test_dropped_stream_cancels_the_generation);
/health 503 with the reason on a failed load (tests/test_ui_server.py::test_failed_load_is_reported_not_a_dead_page);
SIGTERM lets one running generation finish (tests/test_ui_page_api.py::test_sigterm_finishes_the_running_generation_then_exits_0).
"""
from __future__ import annotations

import json
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from helpers.server import ServerProcess, read_metric, wait_for

from .conftest import ECHO_ENV

MODEL = "vibethinker-1.5b"
CHAT = "/v1/chat/completions"
PROMPTS = ["What is 2+2?", "What is 3+5?", "Compute 7*6.", "你好，1+1 等于几？", "Is 17 prime?",
           "What is 10-4?", "Sum 1 to 4.", "What is 9/3?", "Double 21.", "Half of 8?", "What is 2*8?", "Square 5."]


def _stream(url: str, prompt: str, max_tokens: int) -> dict:
    """One streaming request, parsed: its text, finish reason, usage; every event must be JSON."""
    body = {"model": MODEL, "stream": True, "temperature": 0, "max_tokens": max_tokens,
            "stream_options": {"include_usage": True}, "messages": [{"role": "user", "content": prompt}]}
    reasoning, answer, finish, usage, ids = [], [], None, None, set()
    with httpx.stream("POST", url + CHAT, json=body, timeout=300) as r:
        assert r.status_code == 200, r.read()
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events and events[-1] == "[DONE]", events[-3:]
    for raw in events[:-1]:
        event = json.loads(raw)
        assert "error" not in event, event
        ids.add(event["id"])
        for choice in event["choices"]:
            delta = choice["delta"]
            reasoning.append(delta.get("reasoning_content") or "")
            answer.append(delta.get("content") or "")
            finish = choice.get("finish_reason") or finish
        usage = event.get("usage") or usage
    assert len(ids) == 1  # one completion, not pieces of several
    assert finish in ("stop", "length") and usage and usage["completion_tokens"] > 0
    return {"text": "".join(reasoning) + "|" + "".join(answer), "finish": finish}


def _plain(url: str, prompt: str, max_tokens: int) -> dict:
    r = httpx.post(url + CHAT, timeout=300, json={"model": MODEL, "temperature": 0, "max_tokens": max_tokens,
                                                  "messages": [{"role": "user", "content": prompt}]})
    assert r.status_code == 200, r.text
    data = r.json()
    choice = data["choices"][0]
    assert choice["finish_reason"] in ("stop", "length") and data["usage"]["completion_tokens"] > 0
    return {"text": (choice["message"]["reasoning_content"] or "") + "|" + (choice["message"]["content"] or ""),
            "finish": choice["finish_reason"]}


def _rounds(url: str, rounds: int = 3, streams: int = 8, plains: int = 4, max_tokens: int = 40) -> None:
    # Each prompt's greedy reply alone first: under load every reply must be exactly that one
    # (complete, and not mixed with another client's text).
    solo = {p: _stream(url, p, max_tokens)["text"] for p in PROMPTS[: streams + plains]}
    assert len(set(solo.values())) > 1  # the prompts do give different replies: mixing would show
    for _ in range(rounds):
        with ThreadPoolExecutor(streams + plains) as pool:
            futures = {pool.submit(_stream, url, p, max_tokens): p for p in PROMPTS[:streams]}
            futures.update({pool.submit(_plain, url, p, max_tokens): p for p in PROMPTS[streams: streams + plains]})
            for future, prompt in futures.items():
                assert future.result()["text"] == solo[prompt], prompt  # none lost, none mixed
    assert read_metric(url, "vibethinker_requests_running") == 0
    assert read_metric(url, "vibethinker_queue_waiting") == 0


def test_8_streams_and_4_plain_requests_for_3_rounds_on_transformers(busy_server):
    _rounds(busy_server.url)


def test_8_streams_and_4_plain_requests_for_3_rounds_on_llamacpp(tiny_gguf):
    with ServerProcess(["--backend", "llamacpp", "--model", str(tiny_gguf), "--set", "server.concurrency=4",
                        "--set", "server.max_queue=64", "--set", "generation.loop_guard.enabled=false"]) as srv:
        _rounds(srv.url, rounds=2)


def _hang_up(url: str, kind: str, prompt: str) -> None:
    body = {"model": MODEL, "temperature": 0, "max_tokens": 3000, "messages": [{"role": "user", "content": prompt}]}
    try:
        if kind == "stream":  # mid-stream: after the first thinking event (or while still queued, after 5 s)
            give_up = time.monotonic() + 5
            with httpx.stream("POST", url + CHAT, json={**body, "stream": True}, timeout=120) as r:
                for line in r.iter_lines():
                    if "reasoning_content" in line or time.monotonic() > give_up:
                        break
        elif kind == "queued":  # still waiting in line (or just admitted): gone before any event
            with httpx.stream("POST", url + CHAT, json={**body, "stream": True}, timeout=120) as r:
                pass
        else:  # a non-streaming client that gives up during prefill / decoding
            httpx.post(url + CHAT, json=body, timeout=0.3)
    except httpx.TimeoutException:
        pass


def test_storm_of_50_hang_ups_leaves_nothing_running_and_no_thread_behind(busy_server):
    url = busy_server.url
    _plain(url, "What is 2+2?", 20)  # warm
    idle_threads = read_metric(url, "vibethinker_process_threads")
    length_before = read_metric(url, "vibethinker_requests_total", {"source": "api", "finish_reason": "length"})
    kinds = ["stream", "queued", "plain"]
    long_prompt = "Think about the number forever. " * 40  # a longer prefill
    with ThreadPoolExecutor(50) as pool:
        list(pool.map(lambda i: _hang_up(url, kinds[i % 3], long_prompt if i % 2 else PROMPTS[i % 12]), range(50)))
    wait_for(lambda: read_metric(url, "vibethinker_requests_running") == 0
             and read_metric(url, "vibethinker_queue_waiting") == 0, timeout=120, what="the engine to go idle")
    cancelled = read_metric(url, "vibethinker_requests_total", {"source": "api", "finish_reason": "cancelled"})
    ran_out = read_metric(url, "vibethinker_requests_total", {"source": "api", "finish_reason": "length"})
    # Those that had started were stopped (the endless prompt never ran to its 3000 tokens); those
    # still in line just left it.
    assert cancelled >= 1 and ran_out == length_before
    # Worker threads of the event loop's pool linger a few seconds after use: wait for the level.
    wait_for(lambda: read_metric(url, "vibethinker_process_threads") <= idle_threads + 2, timeout=60,
             what=f"threads back to idle ({idle_threads})")
    assert _stream(url, "What is 2+2?", 40)["finish"] in ("stop", "length")  # the next one is served


def test_engine_raising_mid_generation_fails_that_client_only():
    with ServerProcess(["--backend", "echo", "--set", "server.concurrency=2"], env=ECHO_ENV) as srv:
        with ThreadPoolExecutor(3) as pool:
            ok1 = pool.submit(_stream, srv.url, "SLOW 1 first", 10)
            bad = pool.submit(lambda: httpx.post(srv.url + CHAT, timeout=60, json={
                "model": MODEL, "stream": True, "messages": [{"role": "user", "content": "FAIL now"}]}).text)
            ok2 = pool.submit(_stream, srv.url, "SLOW 1 second", 10)
            events = [line[6:] for line in bad.result().splitlines() if line.startswith("data: ")]
            assert ok1.result()["text"].startswith("echo: SLOW 1 first")
            assert ok2.result()["text"].startswith("echo: SLOW 1 second")
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert "failed on purpose" in error["message"] and error["type"] == "server_error"
        assert httpx.get(srv.url + "/health", timeout=10).status_code == 200
        assert _stream(srv.url, "after", 10)["finish"] == "stop"


def test_failed_load_shows_the_reason_on_the_page_too(tmp_path):
    from backends import load_manifest
    from ui.host import ModelHost
    from ui.page import status_banner

    host = ModelHost(load_manifest(env={}, overrides={"backend": "transformers",
                                                      "model.path": str(tmp_path / "no-such-model")}))
    host.start_loading()
    assert host.wait_loaded(60).state == "failed"
    for lang in ("en", "zh"):
        assert "no-such-model" in status_banner(lang, host)


def test_sigterm_with_two_in_flight_finishes_both_refuses_new_ones_and_exits_early():
    srv = ServerProcess(["--backend", "echo", "--set", "server.concurrency=2", "--set", "server.drain_timeout_s=60"],
                        env=ECHO_ENV)
    with srv:
        started = [threading.Event(), threading.Event()]
        results: list[dict | BaseException] = [{}, {}]

        def run(i: int) -> None:
            try:
                body = {"model": MODEL, "stream": True, "messages": [{"role": "user", "content": f"SLOW 3 r{i}"}]}
                with httpx.stream("POST", srv.url + CHAT, json=body, timeout=60) as r:
                    lines = []
                    for line in r.iter_lines():
                        if line:
                            lines.append(line)
                        if "reasoning_content" in line:
                            started[i].set()
                results[i] = {"lines": lines}
            except BaseException as exc:  # noqa: BLE001 - reported below
                results[i] = exc

        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        assert all(e.wait(30) for e in started)
        assert srv.proc is not None
        srv.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: "draining" in srv.log_text(), timeout=10, what="the drain to begin")
        health = httpx.get(srv.url + "/health", timeout=10)
        assert health.status_code == 503 and health.json()["status"] == "draining"
        new = httpx.post(srv.url + CHAT, json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
                         timeout=10)
        assert new.status_code == 503 and new.headers["retry-after"] and new.json()["error"]["code"] == "model_not_ready"
        for t in threads:
            t.join(60)
        srv.proc.wait(60)
        assert srv.proc.returncode == 0, srv.log_text()
        for result in results:
            assert isinstance(result, dict), result
            assert result["lines"][-1] == "data: [DONE]"
            final = [json.loads(x[6:]) for x in result["lines"] if x.startswith("data: {")][-1]
            assert final["choices"][0]["finish_reason"] == "stop"
        log = srv.log_text()
        # It left as soon as both were done, not at the drain timeout.
        assert "no generation running: shutting down" in log and "drain timeout reached" not in log


@pytest.mark.parametrize("second", [signal.SIGTERM, signal.SIGINT])
def test_a_second_signal_exits_at_once(second):
    srv = ServerProcess(["--backend", "echo", "--set", "server.drain_timeout_s=120"], env=ECHO_ENV)
    with srv:
        started = threading.Event()

        def run() -> None:
            body = {"model": MODEL, "stream": True, "messages": [{"role": "user", "content": "SLOW 100 long"}]}
            try:
                with httpx.stream("POST", srv.url + CHAT, json=body, timeout=150) as r:
                    for line in r.iter_lines():
                        if "reasoning_content" in line:
                            started.set()
            except httpx.HTTPError:
                pass

        reader = threading.Thread(target=run, daemon=True)
        reader.start()
        assert started.wait(30)
        assert srv.proc is not None
        srv.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: "draining" in srv.log_text(), timeout=10, what="the drain to begin")
        srv.proc.send_signal(second)
        srv.proc.wait(30)  # long before the 100 s generation or the 120 s drain timeout
        assert "quitting now" in srv.log_text()
