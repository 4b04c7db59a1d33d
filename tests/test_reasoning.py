"""The reasoning helpers and the shared generation driver, with a scripted character-level engine."""
from __future__ import annotations

import itertools
import random
import threading
from collections.abc import Callable, Iterator, Sequence

import pytest

from backends.driver import CLOSE_THINKING_TEXT, EngineBackend, FairLock
from backends.config import Manifest
from backends.reasoning import (
    IncrementalDetokenizer,
    LoopDetector,
    ThinkSplitter,
    extract_boxed,
)
from backends.types import (
    BackendError,
    ChatMessage,
    FinishReason,
    GenerationRequest,
    SamplingParams,
    StreamChunk,
)

REPLY = " \n<think>\n  Let me think: 中文 ok.\n\n</think>\n\nThe answer is \\boxed{4}."
REASONING = "Let me think: 中文 ok."
ANSWER = "The answer is \\boxed{4}."


def split_all(pieces: Sequence[str], **kwargs) -> tuple[str, str]:
    splitter = ThinkSplitter(**kwargs)
    reasoning, answer = [], []
    for piece in pieces:
        r, a = splitter.feed(piece)
        reasoning.append(r)
        answer.append(a)
    r, a = splitter.finish()
    return "".join(reasoning) + r, "".join(answer) + a


# -- ThinkSplitter ---------------------------------------------------------------------------------

def test_splitter_whole_reply():
    assert split_all([REPLY]) == (REASONING, ANSWER)


def test_splitter_every_single_cut():
    for i in range(len(REPLY) + 1):
        assert split_all([REPLY[:i], REPLY[i:]]) == (REASONING, ANSWER), i


def test_splitter_every_pair_of_cuts():
    n = len(REPLY)
    for i in range(n + 1):
        for j in range(i, n + 1):
            assert split_all([REPLY[:i], REPLY[i:j], REPLY[j:]]) == (REASONING, ANSWER), (i, j)


def test_splitter_character_by_character_never_leaks_tag_text():
    splitter = ThinkSplitter()
    for ch in REPLY:
        r, a = splitter.feed(ch)
        assert "<" not in r and ">" not in r
        assert "think" not in a


def test_splitter_reply_without_think_is_all_answer():
    text = "  The answer is 4. <think> is only mentioned here"
    for i in range(len(text) + 1):
        assert split_all([text[:i], text[i:]]) == ("", text.strip()), i


def test_splitter_false_start_that_looks_like_a_tag():
    assert split_all(["<th", "is is < not a tag"]) == ("", "<this is < not a tag")
    assert split_all(["<", "5 is less"]) == ("", "<5 is less")


def test_splitter_template_opened_think_in_prompt():
    text = "reasoning here\n</think>\n\nanswer"
    for i in range(len(text) + 1):
        assert split_all([text[:i], text[i:]], starts_in_reasoning=True) == ("reasoning here", "answer"), i


def test_splitter_unclosed_thinking_and_partial_tag_at_end():
    assert split_all(["<think>still thinking "]) == ("still thinking", "")
    assert split_all(["<think>x </thi"]) == ("x </thi", "")
    assert split_all(["  "]) == ("", "")
    assert split_all(["<thi"]) == ("", "<thi")


def test_splitter_keeps_inner_whitespace_and_later_tags_in_answer():
    r, a = split_all(["<think>a  b\n\nc</think>x <think> y </think> z"])
    assert r == "a  b\n\nc"
    assert a == "x <think> y </think> z"


def test_splitter_mode_transitions():
    s = ThinkSplitter()
    assert s.mode == "start"
    s.feed("<think>")
    assert s.mode == "reasoning" and s.opened_think
    s.feed("a</think>")
    assert s.mode == "answer"
    s2 = ThinkSplitter()
    s2.feed("Hello")
    assert s2.mode == "answer" and not s2.opened_think


# -- extract_boxed ---------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The answer is \\boxed{4}.", "4"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("first \\boxed{1} then \\boxed{ 2 }", "2"),
        ("\\boxed{\\{a, b\\}}", "\\{a, b\\}"),
        ("\\boxed{x^{2}} and \\boxed{unclosed {", "x^{2}"),
        ("no box here", None),
        ("\\boxed 5 without braces", None),
        ("\\fbox{7}", "7"),
        ("\\boxed {8}", "8"),
        ("\\boxed{}", ""),
        ("", None),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


# -- LoopDetector ----------------------------------------------------------------------------------

def _reference_loop(tokens: list[int], max_period: int, min_repeats: int, min_tokens: int) -> int | None:
    """Shortest period that loops at the end of ``tokens``, computed the slow obvious way."""
    i = len(tokens) - 1
    for p in range(1, max_period + 1):
        run = 0
        j = i
        while j - p >= 0 and tokens[j] == tokens[j - p]:
            run += 1
            j -= 1
        if run >= max((min_repeats - 1) * p, min_tokens - p):
            return p
    return None


@pytest.mark.parametrize("alphabet", [2, 3, 5])
@pytest.mark.parametrize(("max_period", "min_repeats", "min_tokens"), [(4, 3, 6), (8, 4, 12), (16, 2, 4)])
def test_loop_detector_matches_brute_force(alphabet, max_period, min_repeats, min_tokens):
    rng = random.Random(alphabet * 1000 + max_period)
    det = LoopDetector(max_period, min_repeats, min_tokens)
    tokens: list[int] = []
    for _ in range(1500):
        # Mix random tokens with stretches copied from earlier so that loops occur.
        if tokens and rng.random() < 0.5:
            p = rng.randint(1, max_period)
            tok = tokens[-p] if len(tokens) >= p else rng.randrange(alphabet)
        else:
            tok = rng.randrange(alphabet)
        tokens.append(tok)
        found = det.push(tok)
        expected = _reference_loop(tokens, max_period, min_repeats, min_tokens)
        assert (found.period if found else None) == expected, len(tokens)
        if found:
            det.reset()
            tokens.clear()


def test_loop_detector_fires_exactly_at_the_threshold():
    det = LoopDetector(max_period=8, min_repeats=4, min_tokens=12)
    span = [7, 8, 9]
    seq = span * 4
    for k, tok in enumerate(seq):
        loop = det.push(tok)
        if k < len(seq) - 1:
            assert loop is None, k
    assert loop is not None and loop.period == 3 and loop.repeats == 4
    assert "3-token span 4 times" in loop.describe()


def test_loop_detector_min_tokens_dominates_for_short_periods():
    det = LoopDetector(max_period=4, min_repeats=2, min_tokens=10)
    results = [det.push(5) for _ in range(10)]
    assert all(r is None for r in results[:-1])
    assert results[-1] is not None and results[-1].period == 1 and results[-1].repeats == 10


def test_loop_detector_ignores_spans_longer_than_max_period():
    det = LoopDetector(max_period=3, min_repeats=2, min_tokens=2)
    span = [1, 2, 3, 4]
    assert all(det.push(t) is None for t in span * 5)


def test_loop_detector_rejects_bad_settings():
    with pytest.raises(ValueError):
        LoopDetector(max_period=0)
    with pytest.raises(ValueError):
        LoopDetector(min_repeats=1)


# -- IncrementalDetokenizer ------------------------------------------------------------------------

def _utf8_decode(ids: Sequence[int]) -> str:
    return bytes(ids).decode("utf-8", errors="replace")


def test_detokenizer_never_splits_multibyte_characters():
    text = "héllo 中文 🎉 done"
    detok = IncrementalDetokenizer(_utf8_decode)
    pieces = [detok.step(b) for b in text.encode("utf-8")]
    pieces.append(detok.flush())
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def test_detokenizer_context_is_not_emitted_and_flush_returns_incomplete_tail():
    detok = IncrementalDetokenizer(_utf8_decode, context=list(b"prompt: "))
    assert detok.step(ord("a")) == "a"
    assert detok.step("中".encode()[0]) == ""
    assert detok.flush() == "\ufffd"


# -- the driver, with a scripted engine ------------------------------------------------------------

Script = Callable[[str], Iterator[str]]


class ScriptedEngine(EngineBackend):
    """One token per character; the script maps the text so far (prompt included) to more text."""

    name = "scripted"
    EOS = 0

    def __init__(self, manifest: Manifest, script: Script, *, context_length: int = 4000,
                 prompt_suffix: str = "", gate: threading.Event | None = None, capacity: int = 1,
                 barrier: threading.Barrier | None = None) -> None:
        super().__init__(manifest, capacity=capacity)
        self.barrier = barrier  # when set, each decode_loop waits for the others to start too
        self.seeds: list[int | None] = []
        self.sequences: list[tuple[int, int]] = []
        self.script = script
        self.context_length = context_length
        self.eos_token_ids = frozenset({self.EOS})
        self.prompt_suffix = prompt_suffix
        self.gate = gate  # when set, each token waits for it (to hold the engine busy)
        self.calls: list[str] = []
        self.seen_messages: list[tuple[ChatMessage, ...]] = []
        self.tokens_offered = 0
        self.fail_after: int | None = None
        self.is_loaded = True

    def load(self, progress=None) -> None:
        self.is_loaded = True

    @property
    def loaded(self) -> bool:
        return self.is_loaded

    def info(self):  # pragma: no cover - not used by the driver
        raise NotImplementedError

    def encode_chat(self, messages):
        self.seen_messages.append(tuple(messages))
        body = "".join(f"[{m.role}]{m.content}" for m in messages)
        return self.encode_text(f"{body}[assistant]{self.prompt_suffix}")

    def encode_text(self, text):
        return [ord(c) for c in text]

    def decode(self, ids):
        return "".join(chr(i) for i in ids)

    def decode_loop(self, ids, params, max_tokens, on_token):
        text = self.decode(ids)
        self.calls.append(text)
        self.seeds.append(params.seed)
        seq = self.current_sequence()
        self.sequences.append((seq.index, seq.n))
        if self.barrier is not None and len(self.calls) <= self.barrier.parties:
            self.barrier.wait()
        for n, piece in enumerate(self.script(text)):
            if n >= max_tokens:
                return
            if self.gate is not None:
                self.gate.wait()
            self.tokens_offered += 1
            if self.fail_after is not None and self.tokens_offered > self.fail_after:
                raise RuntimeError("engine exploded")
            token = self.EOS if piece == "<eos>" else ord(piece)
            if on_token(token):
                return


def chars(text: str, eos: bool = True) -> Iterator[str]:
    yield from text
    if eos:
        yield "<eos>"


def forever(text: str) -> Iterator[str]:
    while True:
        yield from text


def thinking_then_answer(prompt: str) -> Iterator[str]:
    if "</think>" in prompt:
        return chars("Done: \\boxed{42}.")
    return chars("<think>\n" + "".join(f"step {i}; " for i in range(200)) + "</think>\nnever")


def manifest(**loop_guard) -> Manifest:
    return Manifest.model_validate({"generation": {"loop_guard": loop_guard}} if loop_guard else {})


def ask(backend: EngineBackend, text: str = "hi", **params) -> tuple[str, str, StreamChunk, list[StreamChunk]]:
    request = GenerationRequest(messages=(ChatMessage("user", text),), params=SamplingParams(**params))
    chunks = list(backend.stream(request))
    assert chunks and chunks[-1].final and not any(c.final for c in chunks[:-1])
    return "".join(c.reasoning for c in chunks), "".join(c.answer for c in chunks), chunks[-1], chunks


def no_worker_threads() -> bool:
    return not any(t.name.startswith("vt-generate-") for t in threading.enumerate())


def test_driver_plain_reply_and_usage():
    engine = ScriptedEngine(manifest(), lambda _: chars(REPLY))
    reasoning, answer, last, _ = ask(engine)
    assert (reasoning, answer) == (REASONING, ANSWER)
    assert last.boxed_answer == "4"
    usage = last.usage
    assert usage.finish_reason == FinishReason.STOP and usage.detail == ""
    assert usage.prompt_tokens == len("[user]hi[assistant]")
    assert usage.completion_tokens == len(REPLY)
    assert usage.reasoning_tokens == REPLY.index("</think>") + len("</think>")
    assert usage.time_to_first_token_s is not None and usage.time_to_first_token_s >= 0
    assert usage.decode_tokens_per_s is not None and usage.decode_tokens_per_s > 0
    assert usage.total_time_s >= usage.time_to_first_token_s
    assert no_worker_threads()


def test_driver_answer_only_reply_counts_answer_tokens():
    engine = ScriptedEngine(manifest(), lambda _: chars("Just \\boxed{3}"))
    reasoning, answer, last, _ = ask(engine)
    assert (reasoning, answer, last.boxed_answer) == ("", "Just \\boxed{3}", "3")
    assert last.usage.reasoning_tokens == 0 and last.usage.answer_tokens == len("Just \\boxed{3}")


def test_driver_boxed_only_from_the_answer():
    engine = ScriptedEngine(manifest(), lambda _: chars("<think>maybe \\boxed{1}</think>no box"))
    _, answer, last, _ = ask(engine)
    assert answer == "no box" and last.boxed_answer is None


def test_driver_template_that_opens_think_in_the_prompt():
    engine = ScriptedEngine(manifest(), lambda _: chars("idea\n</think>\n\nfinal"), prompt_suffix="<think>\n")
    reasoning, answer, last, _ = ask(engine)
    assert (reasoning, answer) == ("idea", "final")
    assert last.usage.reasoning_tokens == len("idea\n</think>")


def test_driver_thinking_budget_closes_thinking_and_answers():
    engine = ScriptedEngine(manifest(), thinking_then_answer)
    reasoning, answer, last, _ = ask(engine, thinking_budget=30)
    assert last.usage.finish_reason == FinishReason.BUDGET
    assert "budget of 30 tokens" in last.usage.detail
    assert reasoning.endswith(CLOSE_THINKING_TEXT.split("</think>")[0].strip())
    assert answer == "Done: \\boxed{42}." and last.boxed_answer == "42"
    assert len(engine.calls) == 2 and engine.calls[1].endswith(CLOSE_THINKING_TEXT)
    # 30 thinking tokens were generated before the close text was injected.
    assert engine.calls[1] == "[user]hi[assistant]" + "<think>\n" + "".join(
        f"step {i}; " for i in range(200))[: 30 - len("<think>\n")] + CLOSE_THINKING_TEXT
    closing = CLOSE_THINKING_TEXT.index("</think>") + len("</think>")
    assert last.usage.reasoning_tokens == 30 + closing
    assert last.usage.answer_tokens == len(CLOSE_THINKING_TEXT) - closing + len("Done: \\boxed{42}.")


def test_driver_budget_without_room_for_the_answer_is_length():
    engine = ScriptedEngine(manifest(), thinking_then_answer)
    _, answer, last, _ = ask(engine, thinking_budget=30, max_new_tokens=40)
    assert last.usage.finish_reason == FinishReason.LENGTH
    assert "no tokens were left" in last.usage.detail and answer == ""


def test_driver_budget_ignored_for_replies_that_do_not_think():
    engine = ScriptedEngine(manifest(), lambda _: chars("x" * 50 + " plain answer"))
    _, answer, last, _ = ask(engine, thinking_budget=5, loop_guard=False)
    assert last.usage.finish_reason == FinishReason.STOP and answer.endswith("plain answer")


def test_driver_loop_inside_thinking_is_closed_and_answered():
    def script(prompt: str) -> Iterator[str]:
        if "</think>" in prompt:
            return chars("ok \\boxed{0}")
        return itertools.chain("<think>", forever("wait "))

    engine = ScriptedEngine(manifest(max_period=8, min_repeats=4, min_tokens=20), script)
    reasoning, answer, last, _ = ask(engine)
    assert last.usage.finish_reason == FinishReason.LOOP
    assert "5-token span 4 times while thinking" in last.usage.detail
    assert reasoning.startswith("wait wait") and answer == "ok \\boxed{0}"


def test_driver_loop_in_the_answer_stops():
    engine = ScriptedEngine(manifest(max_period=4, min_repeats=3, min_tokens=9), lambda _: forever("abc"))
    _, answer, last, _ = ask(engine)
    assert last.usage.finish_reason == FinishReason.LOOP
    assert "in the answer" in last.usage.detail
    assert answer == "abcabcabc" and len(engine.calls) == 1


def test_driver_loop_guard_off_by_request_or_manifest():
    engine = ScriptedEngine(manifest(max_period=4, min_repeats=3, min_tokens=9), lambda _: forever("ab"))
    _, answer, last, _ = ask(engine, loop_guard=False, max_new_tokens=50)
    assert last.usage.finish_reason == FinishReason.LENGTH and len(answer) == 50
    engine = ScriptedEngine(manifest(enabled=False), lambda _: forever("ab"))
    _, _, last, _ = ask(engine, max_new_tokens=300)
    assert last.usage.finish_reason == FinishReason.LENGTH


def test_driver_loop_after_forced_close_stops_with_loop():
    def script(prompt: str) -> Iterator[str]:
        if "</think>" in prompt:
            return forever("z")
        return chars("<think>" + "".join(chr(65 + i % 26) + chr(97 + i % 7) for i in range(300)))

    engine = ScriptedEngine(manifest(max_period=4, min_repeats=3, min_tokens=10), script)
    _, answer, last, _ = ask(engine, thinking_budget=10)
    assert last.usage.finish_reason == FinishReason.LOOP and answer == "z" * 10


def test_driver_max_new_tokens_and_context_window():
    engine = ScriptedEngine(manifest(), lambda _: chars("abcdefghij" * 10), context_length=30)
    _, answer, last, _ = ask(engine, max_new_tokens=1000, loop_guard=False)
    room = 30 - len("[user]hi[assistant]")
    assert last.usage.finish_reason == FinishReason.LENGTH and len(answer) == room
    assert f"limit of {room} new tokens" in last.usage.detail


def test_driver_prompt_longer_than_context_is_a_clear_error():
    engine = ScriptedEngine(manifest(), lambda _: chars("x"), context_length=10)
    with pytest.raises(BackendError, match="context window is 10"):
        ask(engine, "a long question")
    assert no_worker_threads()


def test_driver_refuses_when_not_loaded_and_bad_requests():
    engine = ScriptedEngine(manifest(), lambda _: chars("x"))
    engine.is_loaded = False
    with pytest.raises(BackendError, match="not loaded"):
        ask(engine)
    with pytest.raises(BackendError, match="no messages"):
        engine.stream(GenerationRequest(messages=()))
    engine.is_loaded = True
    with pytest.raises(BackendError, match="only an empty system message"):
        list(engine.stream(GenerationRequest(messages=(ChatMessage("system", " "),))))


def test_driver_drops_an_empty_system_message():
    engine = ScriptedEngine(manifest(), lambda _: chars("x"))
    request = GenerationRequest(messages=(ChatMessage("system", ""), ChatMessage("user", "q")))
    list(engine.stream(request))
    assert engine.seen_messages[-1] == (ChatMessage("user", "q"),)
    request = GenerationRequest(messages=(ChatMessage("system", "Be brief."), ChatMessage("user", "q")))
    list(engine.stream(request))
    assert engine.seen_messages[-1][0] == ChatMessage("system", "Be brief.")


def test_driver_duplicate_request_id_is_refused():
    engine = ScriptedEngine(manifest(), lambda _: forever("a"))
    request = GenerationRequest(messages=(ChatMessage("user", "q"),), request_id="same")
    first = engine.stream(request)
    next(first)
    with pytest.raises(BackendError, match="already in use"):
        engine.stream(request)
    first.close()
    assert engine.cancel("same") is False  # finished streams are forgotten
    list(engine.stream(GenerationRequest(messages=(ChatMessage("user", "q"),), request_id="same",
                                         params=SamplingParams(max_new_tokens=3))))


def test_driver_engine_error_before_any_text_is_raised():
    engine = ScriptedEngine(manifest(), lambda _: chars("never"))
    engine.fail_after = 0
    with pytest.raises(RuntimeError, match="engine exploded"):
        ask(engine)
    assert no_worker_threads()


def test_driver_engine_error_after_text_ends_with_an_error_chunk():
    engine = ScriptedEngine(manifest(), lambda _: chars("partial text that fails"))
    engine.fail_after = 7
    _, answer, last, _ = ask(engine)
    assert answer == "partial"
    assert last.usage.finish_reason == FinishReason.ERROR
    assert "RuntimeError: engine exploded" in last.usage.detail


def test_cancel_stops_within_one_token():
    engine = ScriptedEngine(manifest(), lambda _: forever("wait for it "))
    request = GenerationRequest(messages=(ChatMessage("user", "q"),), params=SamplingParams(loop_guard=False))
    stream = engine.stream(request)
    first = next(stream)
    assert first.answer
    assert engine.cancel(request.request_id) is True
    offered_at_cancel = engine.tokens_offered
    rest = list(stream)
    assert rest[-1].usage.finish_reason == FinishReason.CANCELLED
    assert engine.tokens_offered - offered_at_cancel <= 1
    assert engine.cancel(request.request_id) is False
    assert no_worker_threads()


def test_closing_the_iterator_stops_the_worker():
    engine = ScriptedEngine(manifest(), lambda _: forever("more "))
    stream = engine.stream(GenerationRequest(messages=(ChatMessage("user", "q"),),
                                             params=SamplingParams(loop_guard=False)))
    next(stream)
    stream.close()
    offered = engine.tokens_offered
    assert no_worker_threads()
    assert engine.tokens_offered == offered
    assert engine.pending_requests == 0


def test_cancel_before_the_stream_starts():
    engine = ScriptedEngine(manifest(), lambda _: forever("x"))
    request = GenerationRequest(messages=(ChatMessage("user", "q"),))
    stream = engine.stream(request)
    assert engine.cancel(request.request_id) is True
    chunks = list(stream)
    assert chunks[-1].usage.finish_reason == FinishReason.CANCELLED
    assert engine.tokens_offered == 0


def _wait_until(predicate: Callable[[], bool]) -> None:
    # Synchronisation, not timing: wait for another thread to reach a state (bounded by pytest-timeout).
    event = threading.Event()
    while not predicate():
        event.wait(0.005)


def test_queue_is_fifo_and_waiting_requests_can_be_cancelled():
    gate = threading.Event()
    order: list[str] = []

    def script(prompt: str) -> Iterator[str]:
        order.append(prompt.split("]")[1].split("[")[0])
        return chars("ok")

    engine = ScriptedEngine(manifest(), script, gate=gate)
    results: dict[str, list[StreamChunk]] = {}

    def run(name: str) -> None:
        request = GenerationRequest(messages=(ChatMessage("user", name),), request_id=name)
        results[name] = list(engine.stream(request))

    threads = []
    for i, name in enumerate(["A", "B", "C", "D", "E"]):
        t = threading.Thread(target=run, args=(name,))
        t.start()
        threads.append(t)
        # A holds the engine (blocked on the gate); each later one must be in line before the next.
        _wait_until(lambda i=i: engine._lock.held and engine._lock.waiting == i)
    assert engine.pending_requests == 5
    assert engine.cancel("C") is True
    threads[2].join()
    assert results["C"][-1].usage.finish_reason == FinishReason.CANCELLED
    assert "waiting in line" in results["C"][-1].usage.detail
    gate.set()
    for t in threads:
        t.join()
    assert order == ["A", "B", "D", "E"]
    assert all(results[n][-1].usage.finish_reason == FinishReason.STOP for n in "ABDE")
    assert engine.pending_requests == 0 and no_worker_threads()


def test_exclusive_waits_for_the_running_request():
    gate = threading.Event()
    engine = ScriptedEngine(manifest(), lambda _: chars("abc"), gate=gate)
    stream = engine.stream(GenerationRequest(messages=(ChatMessage("user", "q"),)))
    runner = threading.Thread(target=lambda: list(stream))
    runner.start()
    _wait_until(lambda: engine._lock.held)
    entered = threading.Event()

    def exclusive() -> None:
        with engine.exclusive():
            entered.set()

    closer = threading.Thread(target=exclusive)
    closer.start()
    _wait_until(lambda: engine._lock.waiting == 1)
    assert not entered.is_set()
    gate.set()
    closer.join()
    runner.join()
    assert entered.is_set()


def test_fair_lock_gives_up_when_cancelled_while_waiting():
    lock = FairLock()
    assert lock.acquire()
    cancelled = threading.Event()
    result: list[bool] = []
    t = threading.Thread(target=lambda: result.append(lock.acquire(cancelled)))
    t.start()
    _wait_until(lambda: lock.waiting == 1)
    cancelled.set()
    lock.wake()
    t.join()
    assert result == [False] and lock.waiting == 0
    lock.release()
    assert lock.acquire(threading.Event())
    lock.release()


# -- n samples of one request ----------------------------------------------------------------------

def samples_of(chunks: list[StreamChunk]) -> dict[int, tuple[str, StreamChunk]]:
    out: dict[int, tuple[str, StreamChunk]] = {}
    for index in sorted({c.index for c in chunks}):
        mine = [c for c in chunks if c.index == index]
        assert mine[-1].final and not any(c.final for c in mine[:-1]), index
        out[index] = ("".join(c.answer for c in mine), mine[-1])
    return out


def test_n_samples_one_at_a_time_each_with_its_seed_and_index():
    engine = ScriptedEngine(manifest(), lambda _: chars("<think>x</think>ok \\boxed{1}"))
    request = GenerationRequest(messages=(ChatMessage("user", "q"),), params=SamplingParams(seed=7), n=3)
    got = samples_of(list(engine.stream(request)))
    assert sorted(got) == [0, 1, 2]
    assert all(answer == "ok \\boxed{1}" and last.boxed_answer == "1" for answer, last in got.values())
    assert engine.seeds == [7, 8, 9] and engine.sequences == [(0, 3), (1, 3), (2, 3)]
    assert all(last.usage.finish_reason == FinishReason.STOP for _, last in got.values())
    assert no_worker_threads()


def test_n_samples_run_together_up_to_the_capacity():
    # Two lanes must start together (the barrier breaks otherwise); the third sample follows.
    barrier = threading.Barrier(2, timeout=30)
    gate = threading.Event()
    engine = ScriptedEngine(manifest(), lambda _: chars("abc"), capacity=2, barrier=barrier, gate=gate)
    request = GenerationRequest(messages=(ChatMessage("user", "q"),), n=3)
    stream = engine.stream(request)
    chunks: list[StreamChunk] = []
    reader = threading.Thread(target=lambda: chunks.extend(stream))
    reader.start()
    _wait_until(lambda: len(engine.calls) == 2)
    assert engine._lock.running == 2  # the request holds min(n, capacity) slots
    gate.set()
    reader.join(30)
    got = samples_of(chunks)
    assert sorted(got) == [0, 1, 2] and all(a == "abc" for a, _ in got.values())
    assert engine.seeds == [None, None, None]  # unseeded samples draw their own randomness
    assert engine._lock.running == 0


def test_cancel_ends_every_sample():
    engine = ScriptedEngine(manifest(), lambda _: forever("wait "))
    request = GenerationRequest(messages=(ChatMessage("user", "q"),), n=3,
                                params=SamplingParams(loop_guard=False))
    stream = engine.stream(request)
    next(stream)
    engine.cancel(request.request_id)
    got = samples_of(list(stream))
    assert sorted(got) == [0, 1, 2]
    assert {last.usage.finish_reason for _, last in got.values()} == {FinishReason.CANCELLED}
    assert no_worker_threads()


def test_a_failing_sample_ends_alone_with_an_error():
    engine = ScriptedEngine(manifest(), lambda _: chars("partial text"))
    engine.fail_after = 15  # the first sample (12 tokens + eos) completes, the second fails mid-way
    request = GenerationRequest(messages=(ChatMessage("user", "q"),), n=2)
    got = samples_of(list(engine.stream(request)))
    assert got[0][1].usage.finish_reason == FinishReason.STOP and got[0][0] == "partial text"
    assert got[1][1].usage.finish_reason == FinishReason.ERROR and "engine exploded" in got[1][1].usage.detail


def test_check_refuses_before_anything_runs():
    engine = ScriptedEngine(manifest(), lambda _: chars("x"), context_length=10)
    with pytest.raises(BackendError, match="context window is 10"):
        engine.stream(GenerationRequest(messages=(ChatMessage("user", "a long question"),)))
    with pytest.raises(BackendError, match="1 to 16 samples"):
        engine.check(GenerationRequest(messages=(ChatMessage("user", "q"),), n=17))
    assert engine.calls == [] and engine.pending_requests == 0 and no_worker_threads()


def test_cancel_during_a_long_prefill_returns_without_waiting_for_it(monkeypatch):
    import backends.driver as driver

    monkeypatch.setattr(driver, "JOIN_TIMEOUT_S", 0.05)
    prefill = threading.Event()
    started = threading.Event()

    class SlowPrefill(ScriptedEngine):
        def decode_loop(self, ids, params, max_tokens, on_token):
            started.set()
            prefill.wait(30)  # a prompt being evaluated: no token, no callback, for a while
            super().decode_loop(ids, params, max_tokens, on_token)

    engine = SlowPrefill(manifest(), lambda _: forever("x"))
    request = GenerationRequest(messages=(ChatMessage("user", "q"),), params=SamplingParams(loop_guard=False))
    stream = engine.stream(request)
    chunks: list[StreamChunk] = []
    reader = threading.Thread(target=lambda: chunks.extend(stream))
    reader.start()
    started.wait(30)
    assert engine.cancel(request.request_id)  # what Stop or a dropped client does
    reader.join(30)
    assert not reader.is_alive(), "the reader waited for the prefill"
    assert chunks[-1].usage.finish_reason == FinishReason.CANCELLED
    assert engine._lock.running == 1  # the engine is still inside its step …
    prefill.set()  # … which ends: the engine stops at its first token and frees its slot
    _wait_until(lambda: engine._lock.running == 0 and no_worker_threads())
    assert engine.tokens_offered <= 1
