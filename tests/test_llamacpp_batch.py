"""Many sequences at once on the llama.cpp engine: continuous batching through the shared driver
(the tiny model's GGUF, CPU).

The streams are made to decode together by holding the scheduler's admission until every one of
them has arrived (synchronisation, not timing); the batcher's own counters say what each step did.
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pytest

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")

from backends.config import load_manifest  # noqa: E402
from backends.engines.llamacpp import LlamaCppBackend  # noqa: E402
from backends.types import (  # noqa: E402
    BackendError,
    ChatMessage,
    ContextLengthExceeded,
    FinishReason,
    GenerationRequest,
    SamplingParams,
    StreamChunk,
)
from bench.synthetic import ADD_PROMPT, ADD_REPLY, LOOP_PROMPT, VOTE_PROMPT  # noqa: E402

STREAMS = 4


def _manifest(folder: Path, parallel: int, **overrides):
    base = {"backend": "llamacpp", "model.path": str(folder), "llamacpp.n_ctx": 2048,
            "llamacpp.parallel": parallel}
    base.update(overrides)
    return load_manifest(None, env={}, overrides=base)


class HeldBackend(LlamaCppBackend):
    """Its scheduler admits nothing while ``hold_for`` sequences have not all arrived."""

    def load(self, progress=None) -> None:
        super().load(progress)
        batcher = self._batcher
        self.hold_for = 0
        original = batcher._admit

        def admit() -> None:
            while self.hold_for:
                with batcher._cond:
                    arrived = len(batcher._inbox) + len(batcher._waiting) + batcher.running
                    if arrived >= self.hold_for:
                        self.hold_for = 0
                        batcher._waiting.extend(batcher._inbox)
                        batcher._inbox.clear()
                        break
                    batcher._cond.wait(0.01)
            original()

        batcher._admit = admit


@pytest.fixture(scope="module")
def backend(gguf_dir):
    b = HeldBackend(_manifest(gguf_dir, STREAMS))
    b.load()
    yield b
    b.close()


@pytest.fixture(scope="module")
def single(gguf_dir):
    b = LlamaCppBackend(_manifest(gguf_dir, 1))
    b.load()
    yield b
    b.close()


def req(prompt: str = ADD_PROMPT, rid: str | None = None, n: int = 1, **params) -> GenerationRequest:
    kwargs = {"request_id": rid} if rid else {}
    return GenerationRequest(messages=(ChatMessage("user", prompt),), params=SamplingParams(**params), n=n, **kwargs)


def _parts(chunks: list[StreamChunk], index: int = 0) -> tuple[str, str]:
    mine = [c for c in chunks if c.index == index]
    return "".join(c.reasoning for c in mine), "".join(c.answer for c in mine)


def _expected() -> tuple[str, str]:
    reasoning, answer = ADD_REPLY.split("</think>")
    return reasoning.removeprefix("<think>").strip(), answer.strip()


def _wait_until(predicate: Callable[[], bool]) -> None:
    # Synchronisation, not timing (bounded by pytest-timeout).
    event = threading.Event()
    while not predicate():
        event.wait(0.005)


def run_together(b: HeldBackend, requests: list[GenerationRequest], sequences: int | None = None,
                 while_running: Callable[[dict[str, list[StreamChunk]]], None] | None = None,
                 order: list[tuple[str, bool]] | None = None) -> dict[str, list[StreamChunk]]:
    """Stream every request from its own thread; the scheduler admits them all in one go."""
    results: dict[str, list[StreamChunk]] = {r.request_id: [] for r in requests}
    errors: list[BaseException] = []
    lock = threading.Lock()

    def consume(request: GenerationRequest) -> None:
        try:
            for chunk in b.stream(request):
                with lock:
                    results[request.request_id].append(chunk)
                    if order is not None:
                        order.append((request.request_id, chunk.final))
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread
            errors.append(exc)

    b.hold_for = sequences or len(requests)
    threads = [threading.Thread(target=consume, args=(r,)) for r in requests]
    for t in threads:
        t.start()
    if while_running is not None:
        while_running(results)
    for t in threads:
        t.join()
    assert not errors, errors
    return results


def test_parallel_follows_concurrency_and_info_says_so(gguf_dir):
    b = LlamaCppBackend(load_manifest(None, env={}, overrides={
        "backend": "llamacpp", "model.path": str(gguf_dir), "server.concurrency": 3}))
    assert b.capacity == 3  # llamacpp.parallel: auto
    one = LlamaCppBackend(_manifest(gguf_dir, 1))
    assert one.capacity == 1


def test_info_says_batching(backend):
    assert backend.capacity == STREAMS
    assert backend.info().extra["batching"] == f"continuous, {STREAMS} at once"
    assert backend.context_length == 2048  # the window of each sequence


def test_four_greedy_streams_decode_together_with_the_serial_text(backend, single):
    serial = [_parts(list(single.stream(req(rid=f"serial{i}", temperature=0.0)))) for i in range(2)]
    assert serial[0] == serial[1] == _expected()
    order: list[tuple[str, bool]] = []
    stats = backend.batch_stats
    requests = [req(rid=f"g{i}", temperature=0.0) for i in range(STREAMS)]
    results = run_together(backend, requests, order=order)
    for chunks in results.values():
        assert _parts(chunks) == serial[0]
        usage = chunks[-1].usage
        assert usage.finish_reason == FinishReason.STOP and chunks[-1].boxed_answer == "4"
        assert len(chunks) > 2  # streamed in pieces
    # One step carried a token of every stream, and the streams interleaved in time: the last
    # stream's first text came before the first stream's end.
    assert stats.most_decoding == STREAMS
    first_text = {rid: i for i, (rid, final) in reversed(list(enumerate(order))) if not final}
    ends = {rid: i for i, (rid, final) in enumerate(order) if final}
    assert max(first_text.values()) < min(ends.values()), order
    assert backend.pending_requests == 0 and backend._batcher.running == 0


def test_cancelling_one_stream_leaves_the_others_intact_and_frees_its_cells(backend):
    requests = [req(LOOP_PROMPT, rid="endless", temperature=0.0, loop_guard=False, max_new_tokens=1500)]
    requests += [req(rid=f"c{i}", temperature=0.0) for i in range(STREAMS - 1)]

    def cancel_endless(results: dict[str, list[StreamChunk]]) -> None:
        _wait_until(lambda: len(results["endless"]) > 0)
        assert backend.cancel("endless") is True

    results = run_together(backend, requests, while_running=cancel_endless)
    endless = results["endless"][-1].usage
    assert endless.finish_reason == FinishReason.CANCELLED and endless.completion_tokens < 1500
    for i in range(STREAMS - 1):
        assert _parts(results[f"c{i}"]) == _expected()
    batcher = backend._batcher
    _wait_until(lambda: batcher.running == 0)
    # The cancelled sequence's cells are gone; finished ones keep theirs as a prefix cache.
    memory = llama_cpp.llama_get_memory(batcher._ctx)
    emptied = [s for s in batcher._slots if not s.cached]
    assert emptied and all(llama_cpp.llama_memory_seq_pos_max(memory, s.seq_id) == -1 for s in emptied)
    # A fifth request runs (all four slots are free again).
    assert _parts(list(backend.stream(req(rid="fifth", temperature=0.0)))) == _expected()


def test_closing_a_stream_stops_its_sequence(backend):
    stream = backend.stream(req(LOOP_PROMPT, temperature=0.0, loop_guard=False, max_new_tokens=1500))
    next(stream)
    stream.close()
    assert backend.pending_requests == 0
    _wait_until(lambda: backend._batcher.running == 0)


def test_budget_and_loop_guard_per_sequence(backend, single):
    alone = {"budget": list(single.stream(req(rid="b-alone", temperature=0.0, thinking_budget=5))),
             "loop": list(single.stream(req(LOOP_PROMPT, rid="l-alone", temperature=0.0)))}
    requests = [req(rid="budget", temperature=0.0, thinking_budget=5), req(LOOP_PROMPT, rid="loop", temperature=0.0)]
    requests += [req(rid=f"b{i}", temperature=0.0) for i in range(STREAMS - 2)]
    results = run_together(backend, requests)
    budget = results["budget"][-1].usage
    reasoning, answer = _parts(results["budget"])
    assert budget.finish_reason == FinishReason.BUDGET and "I have thought long enough" in reasoning and answer
    loop = results["loop"][-1].usage
    reasoning, answer = _parts(results["loop"])
    assert loop.finish_reason == FinishReason.LOOP and "while thinking" in loop.detail and "\\boxed{" in answer
    for rid in ("budget", "loop"):  # the same reply as decoded alone
        assert _parts(results[rid]) == _parts(alone[rid])
        assert results[rid][-1].usage.detail == alone[rid][-1].usage.detail
    for i in range(STREAMS - 2):
        assert _parts(results[f"b{i}"]) == _expected()


def test_n_samples_evaluate_their_prompt_once(backend):
    prompt = VOTE_PROMPT + " Answer in one line."  # not in any slot's cache yet
    stats = backend.batch_stats
    before = (stats.prompt_tokens, stats.shared_tokens, stats.cached_tokens)
    ids = backend.encode_chat([ChatMessage("user", prompt)])
    chunks = list(backend.stream(req(prompt, rid="samples", n=4, temperature=1.0, seed=11, max_new_tokens=40)))
    finals = [c for c in chunks if c.final]
    assert sorted(c.index for c in finals) == [0, 1, 2, 3]
    assert all(c.usage.prompt_tokens == len(ids) for c in finals)
    # Sample 0 evaluated the prompt (less the system prompt's prefix a slot still held); each other
    # sample evaluated only the prompt's last token (it needs logits of its own) and shared the rest.
    evaluated, cached = stats.prompt_tokens - before[0], stats.cached_tokens - before[2]
    assert evaluated + cached == len(ids) + 3 and evaluated >= 4
    assert stats.shared_tokens - before[1] == 3 * (len(ids) - 1)


def test_a_seeded_request_is_reproducible_at_one_and_at_four(backend, single):
    alone = _parts(list(single.stream(req(VOTE_PROMPT, rid="seed-alone", temperature=1.0, seed=5,
                                           max_new_tokens=40))))
    again = _parts(list(single.stream(req(VOTE_PROMPT, rid="seed-again", temperature=1.0, seed=5,
                                           max_new_tokens=40))))
    assert alone == again
    requests = [req(VOTE_PROMPT, rid="seeded", temperature=1.0, seed=5, max_new_tokens=40)]
    requests += [req(VOTE_PROMPT, rid=f"other{i}", temperature=1.0, seed=100 + i, max_new_tokens=40)
                 for i in range(STREAMS - 1)]
    results = run_together(backend, requests)
    assert _parts(results["seeded"]) == alone


def test_a_prompt_longer_than_one_sequence_window_is_refused(gguf_dir):
    b = LlamaCppBackend(_manifest(gguf_dir, 2, **{"llamacpp.n_ctx": 512}))
    b.load()
    try:
        with pytest.raises(ContextLengthExceeded, match="512"):
            b.check(req("word " * 600))
        assert b.batch_stats.prompt_tokens == 0  # nothing reached the engine
    finally:
        b.close()


def test_a_kv_cache_too_big_for_memory_names_the_keys(gguf_dir):
    b = LlamaCppBackend(_manifest(gguf_dir, 64, **{"llamacpp.n_ctx": 50_000_000}))
    with pytest.raises(BackendError, match=r"llamacpp\.parallel 64 × llamacpp\.n_ctx 50000000.*GiB"):
        b.load()
    assert not b.loaded
