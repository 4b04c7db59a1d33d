"""The page's own API through gradio_client, and graceful shutdown on SIGTERM."""
from __future__ import annotations

import json
import threading

import httpx
import pytest
from gradio_client import Client

from bench.synthetic import ENDLESS_PROMPT
from helpers.server import ServerProcess, read_metric, wait_for

pytestmark = pytest.mark.slow


def _text(message: dict) -> str:
    content = message.get("content")
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return str(content)


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    with ServerProcess(["--backend", "transformers", "--model", str(tiny_model_dir),
                        "--set", "generation.temperature=0", "--set", "generation.loop_guard.enabled=false"]) as srv:
        yield srv


def test_gradio_client_streams_thinking_and_answer(server):
    client = Client(server.url, verbose=False)
    job = client.submit("What is 2+2?", api_name="/chat")
    updates = list(job)  # every streamed update of (chat, stats, question box)
    assert len(updates) >= 2
    chat, stats, _ = job.result()
    roles = [m["role"] for m in chat]
    assert roles[0] == "user" and _text(chat[0]) == "What is 2+2?"
    thinking = [m for m in chat if (m.get("metadata") or {}).get("title")]
    assert thinking and thinking[0]["metadata"]["status"] == "done"
    assert "Thinking" in thinking[0]["metadata"]["title"] or "思考" in thinking[0]["metadata"]["title"]
    answer = _text(chat[-1])
    assert "\\boxed{4}" in answer and "Final answer" in answer
    assert "transformers" in stats and "finish: stop" in stats
    # A streamed, pending thinking section was shown before the end.
    assert any(
        any((m.get("metadata") or {}).get("status") == "pending" for m in update[0]) for update in updates
    )
    assert read_metric(server.url, "vibethinker_requests_total", {"source": "page", "finish_reason": "stop"}) >= 1

    # A follow-up in the same session: the previous turn goes back into the prompt.
    chat2, stats2, _ = client.predict("What is 2+2?", chat, api_name="/chat")
    assert [m["role"] for m in chat2].count("user") == 2
    prompt = lambda s: int(s.split("prompt ")[1].split(" ")[0])  # noqa: E731
    assert prompt(stats2) > prompt(stats) + 5


def test_gradio_client_cancel_stops_the_backend(server):
    cancelled = {"source": "page", "finish_reason": "cancelled"}
    before = read_metric(server.url, "vibethinker_requests_total", cancelled)
    client = Client(server.url, verbose=False)
    job = client.submit(ENDLESS_PROMPT, max_new_tokens=4000, api_name="/chat")
    wait_for(lambda: read_metric(server.url, "vibethinker_requests_running") == 1, what="the generation to start")
    job.cancel()
    wait_for(lambda: read_metric(server.url, "vibethinker_requests_total", cancelled) == before + 1,
             what="the backend to record the cancelled generation")
    wait_for(lambda: read_metric(server.url, "vibethinker_requests_running") == 0, what="nothing running")


def test_sigterm_finishes_the_running_generation_then_exits_0(tiny_model_dir):
    srv = ServerProcess(["--backend", "transformers", "--model", str(tiny_model_dir),
                         "--set", "generation.loop_guard.enabled=false"])
    with srv:
        lines: list[str] = []
        started = threading.Event()

        def stream() -> None:
            with httpx.stream("POST", srv.url + "/v1/chat/completions", timeout=300,
                              json={"model": "vibethinker-1.5b", "stream": True, "temperature": 0,
                                    "max_tokens": 4000,
                                    "messages": [{"role": "user", "content": "Think about the number forever."}]}) as r:
                for line in r.iter_lines():
                    if line:
                        lines.append(line)
                    if "reasoning_content" in line:
                        started.set()

        reader = threading.Thread(target=stream)
        reader.start()
        assert started.wait(120)
        code = srv.terminate(timeout=120)
        reader.join(60)
        assert code == 0, srv.log_text()
        assert lines[-1] == "data: [DONE]"
        final = [json.loads(x[6:]) for x in lines if x.startswith("data: {")][-1]
        assert final["choices"][0]["finish_reason"] == "stop"
        assert final["vibethinker"]["finish_reason"] != "cancelled"
        log = srv.log_text()
        assert "draining" in log and "no generation running" in log
