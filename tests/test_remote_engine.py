"""backend: remote in front of real OpenAI-compatible servers on loopback.

Upstreams (each started once for the module): llama-cpp-python's own server
(``python -m llama_cpp.server``, a third party's code) and a second instance of this app, both
serving the tiny trained GGUF at temperature 0. The remote engine runs in-process for the
reply-level checks and as a real ``python -m ui serve --backend remote`` for health, the openai
SDK, secrets and the page.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from backends import BackendError, ChatMessage, FinishReason, GenerationRequest, SamplingParams, create_backend, registry
from backends.config import load_manifest
from backends.config.schema import LoopGuardSettings, ManifestError
from backends.engines.remote import RemoteBackend, UpstreamUnavailable, detect_kind, plain_http_warning
from backends.engines.remote_policy import TextLoopGuard, TextReply
from bench.synthetic import ADD_PROMPT, ENDLESS_PROMPT, LOOP_PROMPT
from helpers.server import ROOT, ServerProcess, free_port, read_metric, wait_for

KEY = "sk-upstream-7f3a9c-secret"  # the upstream's key: must never show up on our side
CHROMIUM = "/usr/bin/chromium"

# llama_cpp.server loads the model through llama_cpp.Llama: take llama_cpp through the engine's
# import first (its AMX workaround; this machine's llama.cpp crashes without it).
LLAMA_SERVER_CODE = (
    "import runpy, sys\n"
    "from backends.engines.llamacpp import import_llama_cpp\n"
    "import_llama_cpp()\n"
    "runpy.run_module('llama_cpp.server', run_name='__main__', alter_sys=True)\n"
)


class LlamaServer:
    """llama-cpp-python's OpenAI-compatible server on a fixed loopback port (restartable there)."""

    def __init__(self, gguf: Path, key: str) -> None:
        self.gguf, self.key, self.port = gguf, key, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.log = Path(os.environ.get("TMPDIR", "/tmp")) / f"vt-llama-server-{self.port}.log"

    def start(self) -> LlamaServer:
        env = {k: v for k, v in os.environ.items() if not k.startswith("VT_")}
        env["PYTHONPATH"] = str(ROOT)
        # --interrupt_requests False: by default a new request cuts the one streaming.
        args = [sys.executable, "-c", LLAMA_SERVER_CODE, "--model", str(self.gguf), "--host", "127.0.0.1",
                "--port", str(self.port), "--n_ctx", "4096", "--n_threads", "2", "--interrupt_requests", "False",
                "--api_key", self.key]
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)

        def up() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama_cpp.server exited:\n{self.log.read_text(errors='replace')[-3000:]}")
            try:
                r = httpx.get(self.url + "/v1/models", headers={"Authorization": f"Bearer {self.key}"}, timeout=5)
                return r.status_code == 200
            except httpx.TransportError:
                return False

        wait_for(up, timeout=120, what="llama_cpp.server to answer")
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()


def _manifest(**overrides):
    return load_manifest(None, env={}, overrides={"backend": "remote", "generation.temperature": 0, **overrides})


def _run(backend, prompt: str, n: int = 1, **params):
    # A modest max_new_tokens: llama-cpp-python's server slows down with a large max_tokens.
    params = {"temperature": 0.0, "max_new_tokens": 400, **params}
    req = GenerationRequest((ChatMessage("user", prompt),), SamplingParams(**params), n=n)
    reasoning, answer, finals = [""] * n, [""] * n, [None] * n
    for chunk in backend.stream(req):
        reasoning[chunk.index] += chunk.reasoning
        answer[chunk.index] += chunk.answer
        if chunk.final:
            finals[chunk.index] = chunk
    return reasoning, answer, finals


# -- the upstreams -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama_server(tiny_gguf):
    pytest.importorskip("starlette_context", reason="llama-cpp-python's server needs its [server] extra "
                        "(pip install starlette-context)")
    server = LlamaServer(tiny_gguf, KEY).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def upstream_app(tiny_gguf):
    # Loop guard off on the upstream: the endless prompt keeps it busy until we hang up.
    with ServerProcess(["--backend", "llamacpp", "--model", str(tiny_gguf), "--set", "generation.temperature=0",
                        "--set", "generation.loop_guard.enabled=false", "--set", "llamacpp.n_ctx=4096"]) as srv:
        yield srv


@pytest.fixture(scope="module")
def via_llama(llama_server, tiny_model_dir):
    b = RemoteBackend(_manifest(**{"remote.base_url": llama_server.url + "/v1", "remote.api_key": KEY,
                                   "remote.chat_template": str(tiny_model_dir / "tokenizer_config.json")}))
    b.load()
    yield b
    b.close()


@pytest.fixture(scope="module")
def via_app(upstream_app):
    b = RemoteBackend(_manifest(**{"remote.base_url": upstream_app.url + "/v1"}))
    b.load()
    yield b
    b.close()


@pytest.fixture(scope="module")
def local_llamacpp(tiny_gguf):
    from backends.engines.llamacpp import LlamaCppBackend

    b = LlamaCppBackend(load_manifest(None, env={}, overrides={"backend": "llamacpp", "model.path": str(tiny_gguf),
                                                               "llamacpp.n_ctx": 4096}))
    b.load()
    yield b
    b.close()


# -- the reply, in-process ------------------------------------------------------------------------------

def test_upstream_kinds_are_recognised(via_llama, via_app):
    assert via_llama.kind.name == "llamacpp" and via_app.kind.name == "vibethinker"
    assert detect_kind({"id": "m", "owned_by": "vllm"}) == "vllm"
    assert detect_kind({"id": "m", "owned_by": "sglang"}) == "sglang"
    assert detect_kind({"id": "m", "owned_by": "someone"}) == "openai"
    info = via_llama.info()
    assert info.backend == "remote" and info.model_path == via_llama.url and KEY not in repr(info)
    assert via_llama.can_continue and not via_app.can_continue  # our own app has no /v1/completions


def test_answer_and_reasoning_match_the_local_llamacpp_engine(local_llamacpp, via_llama, via_app):
    expected = _run(local_llamacpp, ADD_PROMPT)
    assert expected[2][0].boxed_answer == "4"
    for remote in (via_llama, via_app):  # <think> inside content / reasoning_content fields
        reasoning, answer, finals = _run(remote, ADD_PROMPT)
        assert (reasoning, answer) == expected[:2], remote.kind.name
        assert finals[0].boxed_answer == "4"
        assert finals[0].usage.finish_reason == FinishReason.STOP
        assert finals[0].usage.reasoning_tokens > 0 and finals[0].usage.answer_tokens > 0
    # Our own app reports usage: the prompt's tokens are the local engine's.
    assert _run(via_app, ADD_PROMPT)[2][0].usage.prompt_tokens == expected[2][0].usage.prompt_tokens


def test_enforced_budget_closes_thinking_and_the_model_still_answers(via_llama):
    # llama-cpp-python's server takes no budget: we cut the stream and continue via /v1/completions.
    reasoning, answer, finals = _run(via_llama, ADD_PROMPT, thinking_budget=3)
    usage = finals[0].usage
    assert usage.finish_reason == FinishReason.BUDGET
    assert usage.detail == "thinking budget of 3 tokens reached; thinking closed and the answer written"
    assert "I have thought long enough" in reasoning[0] and "Two plus two" not in reasoning[0]
    assert "\\boxed{" in answer[0] and finals[0].boxed_answer


def test_native_budget_is_applied_by_the_upstream(via_app, upstream_app):
    before = read_metric(upstream_app.url, "vibethinker_requests_total", {"finish_reason": "budget"})
    reasoning, answer, finals = _run(via_app, ADD_PROMPT, thinking_budget=3)
    assert finals[0].usage.finish_reason == FinishReason.BUDGET
    assert "I have thought long enough" in reasoning[0] and finals[0].boxed_answer
    # The upstream closed the thinking itself (thinking_budget passed through).
    assert read_metric(upstream_app.url, "vibethinker_requests_total", {"finish_reason": "budget"}) == before + 1


def test_loop_guard_on_the_text_stream(via_llama):
    reasoning, answer, finals = _run(via_llama, LOOP_PROMPT)
    usage = finals[0].usage
    assert usage.finish_reason == FinishReason.LOOP
    assert "character span" in usage.detail and usage.detail.endswith("while thinking; thinking closed and the "
                                                                      "answer written")
    assert reasoning[0].count("wait") < 240  # long before the trained 240 repetitions
    assert finals[0].boxed_answer is not None  # the thinking was closed and an answer written
    # Without the guard the same prompt runs its course: the cut above was ours.
    reasoning, _, finals = _run(via_llama, LOOP_PROMPT, loop_guard=False)
    assert finals[0].usage.finish_reason == FinishReason.STOP and reasoning[0].count("wait") >= 200


@pytest.mark.parametrize("which", ["llama", "app"])
def test_n_samples_pass_through(which, via_llama, via_app):
    remote = via_llama if which == "llama" else via_app  # one request per sample / OpenAI n
    reasoning, answer, finals = _run(remote, ADD_PROMPT, n=2)
    assert [f.index for f in finals] == [0, 1]
    assert all(f.boxed_answer == "4" and f.usage.finish_reason == FinishReason.STOP for f in finals)
    assert reasoning[0] == reasoning[1] and answer[0] == answer[1]  # greedy


def test_shared_stream_cut_continues_every_sample_and_n_falls_back(llama_server, tiny_model_dir):
    # kind: openai sends n as is; llama-cpp-python's server answers one choice whatever n says.
    remote = RemoteBackend(_manifest(**{"remote.base_url": llama_server.url + "/v1", "remote.api_key": KEY,
                                        "remote.kind": "openai", "remote.chat_template": str(tiny_model_dir)}))
    remote.load()
    try:
        # Sample 0 loops: the shared stream is cut and each sample continues on its own (sample 1
        # from the start, through /v1/completions), both closing their thinking and answering.
        reasoning, answer, finals = _run(remote, LOOP_PROMPT, n=2)
        assert [f.usage.finish_reason for f in finals] == [FinishReason.LOOP, FinishReason.LOOP]
        assert all(f.boxed_answer is not None for f in finals) and reasoning[0] == reasoning[1]
        # No cut: the stream ends with sample 1 never sent; it is asked for on its own.
        reasoning, answer, finals = _run(remote, ADD_PROMPT, n=2)
        assert [f.boxed_answer for f in finals] == ["4", "4"] and answer[0] == answer[1]
        assert remote._split_n  # remembered: one request per sample from now on
    finally:
        remote.close()


@pytest.mark.parametrize("how", ["close", "cancel"])
def test_stopping_closes_the_upstream_request(how, via_app, upstream_app):
    counted = {"finish_reason": "cancelled"}
    before = read_metric(upstream_app.url, "vibethinker_requests_total", counted)
    req = GenerationRequest((ChatMessage("user", ENDLESS_PROMPT),),
                            SamplingParams(temperature=0.0, loop_guard=False, max_new_tokens=3000))
    stream = via_app.stream(req)
    first = next(stream)
    assert first.reasoning or first.answer
    if how == "cancel":  # the page's Stop
        assert via_app.cancel(req.request_id)
        rest = list(stream)
        assert rest and rest[-1].usage.finish_reason == FinishReason.CANCELLED
    else:  # a closed tab, a dropped API client
        stream.close()
    # The upstream saw the connection close and stopped its generation.
    wait_for(lambda: read_metric(upstream_app.url, "vibethinker_requests_total", counted) == before + 1,
             timeout=60, what="the upstream to count a cancelled generation")
    wait_for(lambda: read_metric(upstream_app.url, "vibethinker_requests_running") == 0, timeout=60,
             what="the upstream to go idle")
    assert via_app.pending_requests == 0


def test_unreachable_upstream_while_loading(tmp_path):
    url = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(UpstreamUnavailable, match="connection refused"):
        RemoteBackend(_manifest(**{"remote.base_url": url})).load()  # no progress callback: no waiting
    seen = []

    class Enough(BackendError):
        pass

    def progress(p):
        seen.append(p.message)
        if "waiting" in p.message:
            raise Enough("stop")

    backend = RemoteBackend(_manifest(**{"remote.base_url": url}))
    with pytest.raises(Enough):
        backend.load(progress)  # the server's loader: waits, saying why
    assert any(url in m and "connection refused" in m for m in seen)


def test_wrong_key_and_wrong_address_fail_with_the_fix(llama_server):
    with pytest.raises(BackendError, match="remote.api_key"):
        RemoteBackend(_manifest(**{"remote.base_url": llama_server.url + "/v1", "remote.api_key": "wrong"})).load()
    with pytest.raises(BackendError, match="ending in /v1"):
        RemoteBackend(_manifest(**{"remote.base_url": llama_server.url + "/nope", "remote.api_key": KEY})).load()
    with pytest.raises(BackendError, match="serves no model 'other'"):
        RemoteBackend(_manifest(**{"remote.base_url": llama_server.url + "/v1", "remote.api_key": KEY,
                                   "remote.model": "other"})).load()


# -- configuration and the text policy (no server) --------------------------------------------------

def test_registered_like_any_engine():
    spec = registry.get("remote")
    assert spec.needs_local_model is False and spec.auto_rank is None and spec.extras == ("remote",)
    assert "remote" in registry.choices() and spec.problem() is None
    manifest = _manifest(**{"remote.base_url": "http://127.0.0.1:9/v1", "remote.max_concurrency": 24})
    backend = create_backend(manifest)
    assert isinstance(backend, RemoteBackend)
    assert backend.capacity == 24  # the host's one line admits what the upstream takes


def test_base_url_is_checked():
    with pytest.raises(BackendError, match="remote.base_url"):
        RemoteBackend(_manifest()).load()
    with pytest.raises(ManifestError, match="http:// or https://"):
        _manifest(**{"remote.base_url": "ftp://example.org/v1"})
    with pytest.raises(ManifestError, match="remote.api_key"):
        _manifest(**{"remote.base_url": "http://user:secret@example.org/v1"})
    assert plain_http_warning("http://10.1.2.3:8000/v1") and plain_http_warning("http://gpu-box:8000/v1")
    assert plain_http_warning("https://gpu-box/v1") is None and plain_http_warning("http://127.0.0.1:8000/v1") is None
    assert plain_http_warning("http://localhost:8000/v1") is None and plain_http_warning("http://[::1]:8/v1") is None


def test_text_loop_guard():
    guard = TextLoopGuard(LoopGuardSettings())
    found = None
    for i in range(300):
        found = found or guard.feed("wait ")
    assert found is not None and found.unit == "character" and found.period == 5
    guard.reset()
    prose = ("To add the numbers we line them up by place value, then carry when a column exceeds nine; "
             "the thousands column needs no carry, so the total follows directly from the digits above. ")
    assert all(guard.feed(word + " ") is None for word in (prose * 3).split())  # three times: not yet a loop
    guard = TextLoopGuard(LoopGuardSettings(max_period=8))  # blocks longer than the character periods
    block = "".join(f"Step {c}: compute the partial sum of the series once more for term {c}.\n" for c in "abcdefg")
    hits = [guard.feed(block) for _ in range(5)]
    assert hits[-1] is not None and hits[-1].unit == "line" and hits[-1].period == 7


def test_text_reply_takes_every_reasoning_shape():
    for deltas in ([("r", "I add 2 and 2."), ("c", "\n\nThe answer is \\boxed{4}.")],  # reasoning fields
                   [("c", "<thi"), ("c", "nk>\nI add 2 and 2.\n</th"), ("c", "ink>\n\nThe answer is \\boxed{4}.")]):
        out = []
        reply = TextReply(index=0, params=SamplingParams(), loop_guard=LoopGuardSettings(), emit=out.append,
                          started_at=time.perf_counter(), max_new=100, budget_at=None)
        for kind, text in deltas:
            assert (reply.feed_reasoning if kind == "r" else reply.feed_content)(text) is None
        final = reply.finish(FinishReason.STOP, "")
        chunks = out + [final]
        assert "".join(c.reasoning for c in chunks) == "I add 2 and 2."
        assert "".join(c.answer for c in chunks) == "The answer is \\boxed{4}." and final.boxed_answer == "4"
        # What a continuation would send after the prompt, in the model's own format.
        assert reply.continuation_text().replace("\n", "") == "<think>I add 2 and 2.</think>The answer is \\boxed{4}."


# -- a real server with backend: remote -------------------------------------------------------------------

@pytest.fixture(scope="module")
def front(llama_server, tiny_model_dir):
    # model.path is the tiny HF folder: its chat template renders continuations.
    with ServerProcess(["--backend", "remote", "--model", str(tiny_model_dir),
                        "--set", f"remote.base_url={llama_server.url}/v1", "--set", f"remote.api_key={KEY}",
                        "--set", "generation.temperature=0"]) as srv:
        yield srv


def test_openai_sdk_through_the_remote_engine(front):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=front.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    content, thought = "", ""
    for chunk in client.chat.completions.create(model="vibethinker-1.5b", stream=True, max_tokens=400,
                                                messages=[{"role": "user", "content": ADD_PROMPT}]):
        if chunk.choices:
            content += chunk.choices[0].delta.content or ""
            thought += (chunk.choices[0].delta.model_extra or {}).get("reasoning_content") or ""
    assert content == "The answer is \\boxed{4}." and "Two plus two is four" in thought
    resp = client.chat.completions.create(model="vibethinker-1.5b", extra_body={"thinking_budget": 3},
                                          max_tokens=400,
                                          messages=[{"role": "user", "content": ADD_PROMPT}])
    assert resp.model_extra["vibethinker"]["finish_reason"] == "budget"
    assert "\\boxed{" in resp.choices[0].message.content


def test_the_upstream_key_never_leaves(front):
    seen = [httpx.get(front.url + path, timeout=30).text for path in ("/v1/models", "/health", "/metrics", "/",
                                                                      "/config")]
    seen.append(httpx.get(front.url + "/v1/openapi.json", timeout=30).text)
    assert all(KEY not in text for text in seen)
    assert KEY not in front.log_text()
    models = httpx.get(front.url + "/v1/models", timeout=30).json()["data"][0]["metadata"]
    assert models["backend"] == "remote" and models["model_path"].endswith("/v1")


def test_upstream_down_is_503_and_back_is_200_without_a_restart(front, llama_server):
    assert httpx.get(front.url + "/health", timeout=10).status_code == 200
    llama_server.kill()
    try:
        # Within 5 s (the watcher checks every 2 s while the upstream answers).
        wait_for(lambda: httpx.get(front.url + "/health", timeout=5).status_code == 503, timeout=5, interval=0.1,
                 what="/health to turn 503")
        health = httpx.get(front.url + "/health", timeout=5)
        assert health.json()["status"] == "unavailable" and llama_server.url in health.json()["reason"]
        # A request now is refused at once, with Retry-After (a client timeout of 10 s: never a hang).
        resp = httpx.post(front.url + "/v1/chat/completions", timeout=10,
                          json={"model": "vibethinker-1.5b", "messages": [{"role": "user", "content": ADD_PROMPT}],
                                "max_tokens": 400})
        assert resp.status_code == 503 and resp.headers["retry-after"]
        assert resp.json()["error"]["code"] == "model_not_ready"
        assert read_metric(front.url, "vibethinker_engine_up", {"engine": "remote"}) == 0
    finally:
        llama_server.start()  # the same port: the front finds it again by itself
    wait_for(lambda: httpx.get(front.url + "/health", timeout=5).status_code == 200, timeout=60,
             what="/health to turn 200 again")
    resp = httpx.post(front.url + "/v1/chat/completions", timeout=60,
                      json={"model": "vibethinker-1.5b", "messages": [{"role": "user", "content": ADD_PROMPT}],
                            "max_tokens": 400})
    assert resp.status_code == 200 and "\\boxed{4}" in resp.json()["choices"][0]["message"]["content"]
    assert read_metric(front.url, "vibethinker_engine_up", {"engine": "remote"}) == 1


@pytest.mark.slow
@pytest.mark.browser
def test_the_page_through_the_remote_engine(front):
    if not Path(CHROMIUM).exists():
        pytest.skip("chromium is not installed (Debian: apt-get install chromium)")
    playwright = pytest.importorskip("playwright.sync_api")
    from helpers.browser import launch

    with playwright.sync_playwright() as p:
        browser = launch(p, CHROMIUM)
        try:
            page = browser.new_page(locale="en-US")
            page.goto(front.url + "/")
            page.wait_for_selector("#vt-status :text('Ready')", timeout=120_000)
            status = page.inner_text("#vt-status")
            assert "remote" in status and "127.0.0.1" in status  # the upstream's address
            page.fill("#vt-question textarea", ADD_PROMPT)
            page.click("#vt-submit")
            page.wait_for_selector("#vt-chat .vt-final", timeout=120_000)
            chat = page.locator("#vt-chat")
            assert chat.get_by_text("Thinking").count() >= 1 and "The answer is" in chat.inner_text()
            page.wait_for_selector("#vt-stats :text('finish: stop')", timeout=120_000)
        finally:
            browser.close()
