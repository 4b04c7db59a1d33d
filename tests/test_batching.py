"""Many users on the transformers engine: continuous batching through the shared driver (tiny model, CPU).

The streams are made to decode together by holding the batch paused until every request has joined
it (synchronisation, not timing), and a forward hook records how many tokens each step carried.
"""
from __future__ import annotations

import threading
from collections.abc import Callable

import pytest

torch = pytest.importorskip("torch")

from backends.config import Manifest  # noqa: E402
from bench.synthetic import ADD_PROMPT, ADD_REPLY, LOOP_PROMPT  # noqa: E402
from backends.engines.transformers import TransformersBackend, batching_wanted  # noqa: E402
from backends.types import (  # noqa: E402
    ChatMessage,
    FinishReason,
    GenerationRequest,
    SamplingParams,
    StreamChunk,
)

STREAMS = 4


def make_manifest(path, **sections) -> Manifest:
    data = {"model": {"path": str(path)}, "transformers": {"device": "cpu"}, "server": {"concurrency": STREAMS}}
    for key, value in sections.items():
        data.setdefault(key, {}).update(value)
    return Manifest.model_validate(data)


class RecordingBackend(TransformersBackend):
    """Counts the batch's runs (one per decode_loop that joined it) and the tokens of each forward pass."""

    def load(self, progress=None) -> None:
        super().load(progress)
        self.step_tokens: list[int] = []
        self.batch_runs = 0
        self.fail_next_forward = False

        def hook(module, args, kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            if self.fail_next_forward:
                self.fail_next_forward = False
                raise RuntimeError("injected forward failure")
            if ids is not None:
                self.step_tokens.append(int(ids.numel()))

        self._model.register_forward_pre_hook(hook, with_kwargs=True)
        runner = self._batch
        original = runner.run

        def counted(*args, **kwargs):
            self.batch_runs += 1
            return original(*args, **kwargs)

        runner.run = counted


@pytest.fixture(scope="module")
def backend(tiny_model_dir) -> RecordingBackend:
    b = RecordingBackend(make_manifest(tiny_model_dir))
    b.load()
    yield b
    b.close()


def _wait_until(predicate: Callable[[], bool]) -> None:
    # Synchronisation, not timing: wait for other threads to reach a state (bounded by pytest-timeout).
    event = threading.Event()
    while not predicate():
        event.wait(0.005)


def _parts(chunks: list[StreamChunk]) -> tuple[str, str]:
    return "".join(c.reasoning for c in chunks), "".join(c.answer for c in chunks)


def _expected() -> tuple[str, str]:
    reasoning, answer = ADD_REPLY.split("</think>")
    return reasoning.removeprefix("<think>").strip(), answer.strip()


def run_together(b: RecordingBackend, requests: list[GenerationRequest],
                 while_running: Callable[[dict[str, list[StreamChunk]]], None] | None = None
                 ) -> dict[str, list[StreamChunk]]:
    """Stream all requests from their own threads, released into the batch at the same step."""
    results: dict[str, list[StreamChunk]] = {r.request_id: [] for r in requests}
    errors: list[BaseException] = []

    def consume(request: GenerationRequest) -> None:
        try:
            for chunk in b.stream(request):
                results[request.request_id].append(chunk)
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread
            errors.append(exc)

    threads = [threading.Thread(target=consume, args=(r,)) for r in requests]
    with b._batch.paused():
        for t in threads:
            t.start()
        _wait_until(lambda: len(b._batch._routes) == len(requests))
    if while_running is not None:
        while_running(results)
    for t in threads:
        t.join()
    assert not errors, errors
    return results


def req(prompt: str = ADD_PROMPT, rid: str | None = None, **params) -> GenerationRequest:
    kwargs = {"request_id": rid} if rid else {}
    return GenerationRequest(messages=(ChatMessage("user", prompt),), params=SamplingParams(**params), **kwargs)


def test_batching_is_on_for_many_users_only(tiny_model_dir):
    assert batching_wanted(make_manifest(tiny_model_dir))
    assert not batching_wanted(make_manifest(tiny_model_dir, server={"concurrency": 1}))
    assert batching_wanted(make_manifest(tiny_model_dir, server={"concurrency": 1}, transformers={"batching": "on"}))
    assert not batching_wanted(make_manifest(tiny_model_dir, transformers={"batching": "off"}))
    assert not batching_wanted(make_manifest(tiny_model_dir, transformers={"attn_implementation": "eager"}))
    off = TransformersBackend(make_manifest(tiny_model_dir, transformers={"batching": "off"}))
    assert off.capacity == 1


def test_info_says_batching(backend):
    assert backend.capacity == STREAMS
    assert backend.info().extra["batching"] == f"continuous, {STREAMS} at once"


def test_four_greedy_streams_decode_together_with_the_unbatched_text(backend):
    backend.step_tokens.clear()
    runs = backend.batch_runs
    requests = [req(rid=f"g{i}", temperature=0.0) for i in range(STREAMS)]
    results = run_together(backend, requests)
    assert backend.batch_runs - runs == STREAMS
    for chunks in results.values():
        assert _parts(chunks) == _expected()  # the same text greedy gives one at a time
        usage = chunks[-1].usage
        assert usage.finish_reason == FinishReason.STOP
        assert chunks[-1].boxed_answer == "4"
        assert len(chunks) > 2  # streamed in pieces, not in one final chunk
        assert usage.prompt_tokens > 0 and usage.reasoning_tokens > 0 and usage.answer_tokens > 0
        assert usage.time_to_first_token_s is not None and usage.decode_tokens_per_s is not None
        assert usage.total_time_s >= usage.time_to_first_token_s
    # One forward pass carried a decoding token of every stream.
    assert STREAMS in backend.step_tokens
    assert backend.pending_requests == 0 and not backend._batch._routes


def test_cancelling_one_stream_leaves_the_others_intact(backend):
    requests = [req(LOOP_PROMPT, rid="endless", temperature=0.0, loop_guard=False, max_new_tokens=2000)]
    requests += [req(rid=f"c{i}", temperature=0.0) for i in range(STREAMS - 1)]

    def cancel_endless(results: dict[str, list[StreamChunk]]) -> None:
        _wait_until(lambda: len(results["endless"]) > 0)
        assert backend.cancel("endless") is True

    results = run_together(backend, requests, cancel_endless)
    endless = results["endless"][-1].usage
    assert endless.finish_reason == FinishReason.CANCELLED
    assert endless.completion_tokens < 2000
    for i in range(STREAMS - 1):
        assert _parts(results[f"c{i}"]) == _expected()
        assert results[f"c{i}"][-1].usage.finish_reason == FinishReason.STOP
    # The manager dropped the cancelled request too (its cache is freed, no hidden decoding goes on).
    scheduler = backend._batch._manager.batch_processor.scheduler
    _wait_until(lambda: not scheduler.active_requests and not scheduler.waiting_requests)


def test_closing_a_stream_cancels_it_in_the_batch(backend):
    stream = backend.stream(req(LOOP_PROMPT, temperature=0.0, loop_guard=False, max_new_tokens=2000))
    next(stream)
    stream.close()
    assert backend.pending_requests == 0
    scheduler = backend._batch._manager.batch_processor.scheduler
    _wait_until(lambda: not scheduler.active_requests and not scheduler.waiting_requests)


def test_budget_and_loop_guard_in_the_batch(backend):
    runs = backend.batch_runs
    requests = [req(rid="budget", temperature=0.0, thinking_budget=5), req(LOOP_PROMPT, rid="loop", temperature=0.0)]
    requests += [req(rid=f"b{i}", temperature=0.0) for i in range(STREAMS - 2)]
    results = run_together(backend, requests)
    # Each closed thinking is a follow-up request in the batch (prompt + generated + closing text).
    assert backend.batch_runs - runs == STREAMS + 2

    budget = results["budget"][-1].usage
    reasoning, answer = _parts(results["budget"])
    assert budget.finish_reason == FinishReason.BUDGET
    assert "I have thought long enough" in reasoning and answer
    assert budget.reasoning_tokens >= 5

    loop = results["loop"][-1].usage
    reasoning, answer = _parts(results["loop"])
    assert loop.finish_reason == FinishReason.LOOP and "while thinking" in loop.detail
    assert reasoning.startswith("wait wait") and "\\boxed{" in answer
    for i in range(STREAMS - 2):
        assert _parts(results[f"b{i}"]) == _expected()


def test_max_new_tokens_per_request_in_the_batch(backend):
    requests = [req(rid="short", temperature=0.0, max_new_tokens=3)]
    requests += [req(rid=f"m{i}", temperature=0.0) for i in range(STREAMS - 1)]
    results = run_together(backend, requests)
    short = results["short"][-1].usage
    assert short.finish_reason == FinishReason.LENGTH and short.completion_tokens == 3
    assert all(_parts(results[f"m{i}"]) == _expected() for i in range(STREAMS - 1))


def test_sampled_streams_share_the_batch(backend):
    runs = backend.batch_runs
    requests = [req(rid=f"s{i}", temperature=1.0, top_p=0.95, top_k=20 * i) for i in range(STREAMS)]
    results = run_together(backend, requests)
    assert backend.batch_runs - runs == STREAMS
    for chunks in results.values():
        usage = chunks[-1].usage
        assert usage.finish_reason in (FinishReason.STOP, FinishReason.LENGTH, FinishReason.LOOP)
        assert usage.completion_tokens > 0


def test_seeded_requests_decode_alone_and_reproducibly(backend):
    runs = backend.batch_runs
    first = list(backend.stream(req(temperature=1.0, seed=7, max_new_tokens=40)))
    second = list(backend.stream(req(temperature=1.0, seed=7, max_new_tokens=40)))
    assert backend.batch_runs == runs  # a fixed seed cannot be reproduced inside a batch
    assert _parts(first) == _parts(second)


def test_a_seeded_request_beside_batched_ones(backend):
    runs = backend.batch_runs
    requests = [req(rid="seeded", temperature=0.0, seed=1)]
    requests += [req(rid=f"n{i}", temperature=0.0) for i in range(STREAMS - 1)]
    results: dict[str, list[StreamChunk]] = {}
    threads = [threading.Thread(target=lambda r=r: results.__setitem__(r.request_id, list(backend.stream(r))))
               for r in requests]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert backend.batch_runs - runs == STREAMS - 1
    assert all(_parts(chunks) == _expected() for chunks in results.values())


def test_a_failed_step_surfaces_and_the_batch_recovers(backend):
    backend.fail_next_forward = True
    with pytest.raises(RuntimeError, match="injected forward failure|batch decoding"):
        list(backend.stream(req(temperature=0.0)))
    assert backend.pending_requests == 0
    chunks = list(backend.stream(req(temperature=0.0)))  # a fresh manager takes over
    assert _parts(chunks) == _expected()
