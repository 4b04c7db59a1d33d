"""The generation driver shared by every engine.

:class:`EngineBackend` implements ``stream`` and ``cancel`` once: the fair request queue, the
worker thread, incremental detokenisation, the ``<think>`` split, the thinking budget, the loop
guard, usage statistics and the boxed answer. An engine subclasses it and provides only model
loading and a handful of hooks (see the class docstring); it never sees requests or threads.

Phases of one reply:
1. decode from the prompt;
2. if the thinking budget is reached or a loop is detected inside ``<think>``, append
   :data:`CLOSE_THINKING_TEXT` and decode again so that the model still writes an answer.
A loop in the answer stops the reply (finish reason ``loop``).

Errors: a problem before the first token (model not loaded, conversation too long, an engine
failure during prefill) is raised from the iterator; a failure after text has streamed ends the
stream with a final chunk whose ``usage.finish_reason`` is ``error`` and ``usage.detail`` says why,
so clients keep what they already received.
"""
from __future__ import annotations

import abc
import logging
import queue
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from .base import Backend
from .config import Manifest
from .reasoning import IncrementalDetokenizer, LoopDetector, ThinkSplitter, extract_boxed
from .types import (
    BackendError,
    ChatMessage,
    ContextLengthExceeded,
    FinishReason,
    GenerationRequest,
    RequestError,
    SamplingParams,
    StreamChunk,
    Usage,
)

log = logging.getLogger(__name__)

# Written for the model when its thinking is cut short, so that it moves on to the answer.
CLOSE_THINKING_TEXT = "\n\nI have thought long enough; now I will write the final answer.\n</think>\n\n"


class FairLock:
    """A FIFO lock whose waiters can give up (cancellation) while in line.

    ``capacity`` > 1 makes it a fair counting semaphore for engines that decode several requests
    together (continuous batching): each request takes one slot, :meth:`EngineBackend.exclusive`
    takes them all. FIFO order holds for every weight, so a waiting exclusive user is never
    overtaken by later requests. With the default capacity of 1 it is the plain FIFO lock.
    """

    def __init__(self, capacity: int = 1) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self._cond = threading.Condition()
        self._line: deque[object] = deque()
        self._used = 0

    def acquire(self, cancelled: threading.Event | None = None, weight: int = 1) -> bool:
        """Wait for our turn; False (and out of the line) if ``cancelled`` is set first."""
        weight = max(1, min(weight, self.capacity))
        ticket = object()
        with self._cond:
            self._line.append(ticket)
            try:
                while self._used + weight > self.capacity or self._line[0] is not ticket:
                    if cancelled is not None and cancelled.is_set():
                        return False
                    self._cond.wait()
                if cancelled is not None and cancelled.is_set():
                    return False
                self._used += weight
                return True
            finally:
                self._line.remove(ticket)
                # Whoever is now first in line must re-check (we left it or took the lock).
                self._cond.notify_all()

    def release(self, weight: int = 1) -> None:
        with self._cond:
            self._used = max(0, self._used - max(1, min(weight, self.capacity)))
            self._cond.notify_all()

    def wake(self) -> None:
        """Make waiters re-check their cancellation flag."""
        with self._cond:
            self._cond.notify_all()

    @property
    def waiting(self) -> int:
        with self._cond:
            return len(self._line)

    @property
    def held(self) -> bool:
        with self._cond:
            return self._used > 0

    @property
    def running(self) -> int:
        """Slots in use (requests decoding now, or ``capacity`` during an exclusive section)."""
        with self._cond:
            return self._used


@dataclass
class _RequestState:
    request: GenerationRequest
    cancelled: threading.Event = field(default_factory=threading.Event)
    out: queue.Queue = field(default_factory=queue.Queue)
    started_at: float = field(default_factory=time.perf_counter)


class _Done:
    pass


@dataclass
class _Failure:
    error: BaseException


_DONE = _Done()


class _Reply:
    """Per-reply bookkeeping driven by ``on_token`` (worker thread only)."""

    def __init__(self, backend: EngineBackend, state: _RequestState, prompt_ids: list[int],
                 max_new: int) -> None:
        self.backend = backend
        self.state = state
        self.params = state.request.params
        self.max_new = max_new
        self.prompt_tokens = len(prompt_ids)
        self.generated: list[int] = []
        tail = backend.decode(prompt_ids[-16:]) if prompt_ids else ""
        self.splitter = ThinkSplitter(starts_in_reasoning=tail.rstrip().endswith("<think>"))
        self.detok = IncrementalDetokenizer(backend.decode, prompt_ids)
        guard = backend.manifest.generation.loop_guard
        self.loops = (
            LoopDetector(guard.max_period, guard.min_repeats, guard.min_tokens)
            if self.params.loop_guard and guard.enabled else None
        )
        self.reasoning_tokens = 0
        self.answer_tokens = 0
        self._undecided = 0  # tokens seen before we know whether the reply thinks
        self.sampled = 0  # tokens the model produced (the injected closing text is not counted)
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self.emitted = False
        self.reasoning_text: list[str] = []
        self.answer_text: list[str] = []
        # Why on_token asked the engine to stop: a FinishReason, or "close" to force </think>.
        self.stop: FinishReason | str | None = None
        self.stop_detail = ""
        self.close_reason = FinishReason.BUDGET  # why thinking was closed (budget or loop)
        self.forced = False  # thinking already closed by us once

    # -- text and accounting ------------------------------------------------------------------
    def _emit(self, reasoning: str, answer: str) -> None:
        if reasoning or answer:
            self.reasoning_text.append(reasoning)
            self.answer_text.append(answer)
            self.state.out.put(StreamChunk(reasoning=reasoning, answer=answer))
            self.emitted = True

    def _account(self, token: int, text: str) -> None:
        before = self.splitter.mode
        reasoning, answer = self.splitter.feed(text)
        after = self.splitter.mode
        if before == "start":
            self._undecided += 1
            if after != "start":
                if self.splitter.opened_think:
                    self.reasoning_tokens += self._undecided
                else:
                    self.answer_tokens += self._undecided
                self._undecided = 0
        elif before == "reasoning":
            self.reasoning_tokens += 1
        else:
            self.answer_tokens += 1
        if before != "answer" and after == "answer" and self.loops is not None:
            self.loops.reset()  # a loop must lie within one part
        self._emit(reasoning, answer)

    def add_token(self, token: int) -> None:
        self.generated.append(token)
        self._account(token, self.detok.step(token))

    @property
    def thinking(self) -> bool:
        return self.splitter.mode == "reasoning"

    # -- the engine's per-token callback --------------------------------------------------------
    def on_token(self, token: int) -> bool:
        now = time.perf_counter()
        if self.state.cancelled.is_set():
            self.stop = FinishReason.CANCELLED
            return True
        if token in self.backend.eos_token_ids:
            self.stop = FinishReason.STOP
            return True
        if self.first_token_at is None:
            self.first_token_at = now
        self.last_token_at = now
        self.sampled += 1
        self.add_token(token)
        if self.loops is not None:
            loop = self.loops.push(token)
            if loop is not None:
                if self.thinking and not self.forced:
                    self.stop, self.stop_detail = "close", f"{loop.describe()} while thinking"
                    self.close_reason = FinishReason.LOOP
                else:
                    self.stop = FinishReason.LOOP
                    self.stop_detail = f"{loop.describe()} in the answer; generation stopped"
                return True
        budget = self.params.thinking_budget
        if budget and self.thinking and not self.forced and self.reasoning_tokens >= budget:
            self.stop, self.close_reason = "close", FinishReason.BUDGET
            self.stop_detail = f"thinking budget of {budget} tokens reached"
            return True
        if len(self.generated) >= self.max_new:
            self.stop = FinishReason.LENGTH
            self.stop_detail = f"reached the limit of {self.max_new} new tokens"
            return True
        return False

    def usage(self, reason: FinishReason, detail: str) -> Usage:
        end = time.perf_counter()
        rate = None
        if self.first_token_at is not None and self.last_token_at is not None and self.sampled > 1:
            span = self.last_token_at - self.first_token_at
            if span > 0:
                rate = (self.sampled - 1) / span
        return Usage(
            prompt_tokens=self.prompt_tokens,
            reasoning_tokens=self.reasoning_tokens,
            answer_tokens=self.answer_tokens + self._undecided,
            time_to_first_token_s=(
                None if self.first_token_at is None else self.first_token_at - self.state.started_at
            ),
            decode_tokens_per_s=rate,
            total_time_s=end - self.state.started_at,
            finish_reason=reason,
            detail=detail,
        )


class EngineBackend(Backend):
    """A Backend built from engine hooks; the driver here does everything per request.

    Subclasses implement ``load``, ``loaded``, ``info``, ``close`` and:

    - ``eos_token_ids``: ids that end the reply (``<|im_end|>``, ``<|endoftext|>``, …);
    - ``context_length``: the context window in tokens;
    - ``encode_chat(messages)``: prompt ids from the model's own chat template with the
      generation prompt added (an empty system message is dropped beforehand by the driver);
    - ``encode_text(text)``: plain text to ids, no special tokens added;
    - ``decode(ids)``: ids to text, keeping special tokens such as ``<think>`` (the driver never
      passes end-of-reply ids);
    - ``decode_loop(ids, params, max_tokens, on_token)``: evaluate ``ids`` (reusing cached KV of
      a common prefix is the engine's business), sample with ``params`` and call
      ``on_token(id)`` for every new token in order, returning as soon as it returns True or
      after ``max_tokens`` tokens. It runs in the driver's worker thread with the engine lock held.

    Engines use :meth:`exclusive` around anything that must not overlap a generation
    (load/close), and may call :meth:`cancel_all` first in ``close``.

    Many users (optional): an engine that decodes several requests together passes
    ``capacity=N`` to ``__init__``. Up to N requests then run ``decode_loop`` at the same
    time, each in its own worker thread (the rest wait in the same FIFO line), and
    ``decode_loop`` must be safe to call from several threads at once. Inside ``decode_loop``
    :meth:`request_cancelled` tells whether the current request was cancelled, so that an engine
    waiting on its own batch can give up without a token arriving. ``exclusive`` waits for all N.
    """

    name = "engine"
    eos_token_ids: frozenset[int] = frozenset()
    context_length: int = 0

    def __init__(self, manifest: Manifest, capacity: int = 1) -> None:
        self.manifest = manifest
        self._lock = FairLock(capacity)
        self._requests: dict[str, _RequestState] = {}
        self._registry = threading.Lock()
        # The request a worker thread is generating (for request_cancelled inside decode_loop).
        self._current = threading.local()

    @property
    def capacity(self) -> int:
        """Requests decoded at the same time (1 = one at a time, in a fair FIFO line)."""
        return self._lock.capacity

    # -- hooks ----------------------------------------------------------------------------------
    @abc.abstractmethod
    def encode_chat(self, messages: Sequence[ChatMessage]) -> list[int]: ...

    @abc.abstractmethod
    def encode_text(self, text: str) -> list[int]: ...

    @abc.abstractmethod
    def decode(self, ids: Sequence[int]) -> str: ...

    @abc.abstractmethod
    def decode_loop(self, ids: list[int], params: SamplingParams, max_tokens: int,
                    on_token: Callable[[int], bool]) -> None: ...

    # -- queue and cancellation -----------------------------------------------------------------
    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold the engine lock (in FIFO order with requests) for load/close."""
        weight = self._lock.capacity  # every slot: no request decodes meanwhile
        self._lock.acquire(weight=weight)
        try:
            yield
        finally:
            self._lock.release(weight)

    def request_cancelled(self) -> bool:
        """Inside ``decode_loop``: whether the request being decoded was cancelled (or dropped)."""
        state: _RequestState | None = getattr(self._current, "state", None)
        return state is not None and state.cancelled.is_set()

    def cancel(self, request_id: str) -> bool:
        with self._registry:
            state = self._requests.get(request_id)
        if state is None or state.cancelled.is_set():
            return False
        state.cancelled.set()
        self._lock.wake()
        return True

    def cancel_all(self) -> int:
        with self._registry:
            states = list(self._requests.values())
        for state in states:
            state.cancelled.set()
        self._lock.wake()
        return len(states)

    @property
    def pending_requests(self) -> int:
        """Requests running or waiting in line (for metrics and queue limits)."""
        with self._registry:
            return len(self._requests)

    def _unregister(self, request_id: str, state: _RequestState) -> None:
        with self._registry:
            if self._requests.get(request_id) is state:
                del self._requests[request_id]

    # -- streaming ------------------------------------------------------------------------------
    def stream(self, request: GenerationRequest) -> Iterator[StreamChunk]:
        if not request.messages:
            raise RequestError("The request has no messages; send at least one user message.")
        state = _RequestState(request)
        with self._registry:
            if request.request_id in self._requests:
                raise RequestError(f"Request id {request.request_id!r} is already in use; use a new id.")
            self._requests[request.request_id] = state
        iterator = self._iterate(state)
        # A stream that is dropped without ever being started must not stay registered.
        weakref.finalize(iterator, self._unregister, request.request_id, state)
        return iterator

    def _iterate(self, state: _RequestState) -> Iterator[StreamChunk]:
        worker = threading.Thread(
            target=self._work, args=(state,), name=f"vt-generate-{state.request.request_id[:8]}", daemon=True
        )
        worker.start()
        held: object | None = None
        try:
            while True:
                item, held = (held, None) if held is not None else (state.out.get(), None)
                if isinstance(item, _Done):
                    return
                if isinstance(item, _Failure):
                    raise item.error
                # Merge what has piled up so that a slow reader gets fewer, larger chunks.
                while not item.final:
                    try:
                        nxt = state.out.get_nowait()
                    except queue.Empty:
                        break
                    if not isinstance(nxt, StreamChunk):
                        held = nxt  # _DONE or a failure: handled by the outer loop next
                        break
                    item = StreamChunk(
                        reasoning=item.reasoning + nxt.reasoning,
                        answer=item.answer + nxt.answer,
                        usage=nxt.usage,
                        boxed_answer=nxt.boxed_answer,
                    )
                yield item
        finally:
            state.cancelled.set()
            self._lock.wake()
            worker.join()
            self._unregister(state.request.request_id, state)

    def _work(self, state: _RequestState) -> None:
        try:
            if not self._lock.acquire(state.cancelled):
                usage = Usage(finish_reason=FinishReason.CANCELLED, detail="cancelled while waiting in line",
                              total_time_s=time.perf_counter() - state.started_at)
                state.out.put(StreamChunk(usage=usage))
                return
            self._current.state = state
            try:
                self._generate(state)
            finally:
                self._current.state = None
                self._lock.release()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            state.out.put(_Failure(exc))
        finally:
            state.out.put(_DONE)

    def _prompt_ids(self, messages: Sequence[ChatMessage]) -> list[int]:
        # An empty system message would replace the template's default maths prompt with nothing.
        kept = [m for m in messages if not (m.role == "system" and not m.content.strip())]
        if not kept:
            raise RequestError("The request has only an empty system message; add a user message.")
        return list(self.encode_chat(kept))

    def _generate(self, state: _RequestState) -> None:
        if not self.loaded:
            raise BackendError("The model is not loaded yet; call load() first (or wait until /health is ready).")
        params = state.request.params
        prompt_ids = self._prompt_ids(state.request.messages)
        room = self.context_length - len(prompt_ids)
        if room <= 0:
            raise ContextLengthExceeded(
                f"对话太长 / The conversation is {len(prompt_ids)} tokens but the context window is "
                f"{self.context_length}: start a new chat or shorten the messages."
            )
        max_new = min(params.max_new_tokens, room)
        reply = _Reply(self, state, prompt_ids, max_new)
        try:
            self._phases(reply, prompt_ids)
        except BackendError:
            raise
        except Exception as exc:
            if not reply.emitted:
                raise
            log.exception("generation failed after streaming began")
            self._finish(reply, FinishReason.ERROR, f"{type(exc).__name__}: {exc}")
            return

    def _phases(self, reply: _Reply, prompt_ids: list[int]) -> None:
        params = reply.params
        if reply.state.cancelled.is_set():
            self._finish(reply, FinishReason.CANCELLED, "cancelled before decoding")
            return
        self.decode_loop(list(prompt_ids), params, reply.max_new, reply.on_token)
        self._note_cancel(reply)
        if reply.stop == "close":
            why = reply.stop_detail
            reason = reply.close_reason
            reply.forced = True
            reply.stop = None
            closing = self.encode_text(CLOSE_THINKING_TEXT)
            for token in closing:
                reply.add_token(token)
            if reply.loops is not None:
                reply.loops.reset()
            left = reply.max_new - len(reply.generated)
            if left <= 0:
                self._finish(reply, FinishReason.LENGTH, f"{why}, but no tokens were left for the answer")
                return
            self.decode_loop(list(prompt_ids) + reply.generated, params, left, reply.on_token)
            self._note_cancel(reply)
            if reply.stop in (None, FinishReason.STOP):
                detail = f"{why}; thinking closed and the answer written"
                if reply.stop is None:
                    reason, detail = FinishReason.LENGTH, f"{why}; the answer reached the token limit"
                self._finish(reply, reason, detail)
                return
        stop = reply.stop
        if stop is None:
            stop = FinishReason.LENGTH
            reply.stop_detail = reply.stop_detail or f"reached the limit of {reply.max_new} new tokens"
        if stop == FinishReason.CANCELLED:
            reply.stop_detail = "cancelled"
        assert isinstance(stop, FinishReason)
        self._finish(reply, stop, reply.stop_detail if stop != FinishReason.STOP else "")

    @staticmethod
    def _note_cancel(reply: _Reply) -> None:
        # An engine may return from decode_loop without a token once request_cancelled() is true
        # (e.g. while its batch had nothing for this request yet): that is a cancel, not a length stop.
        if reply.stop is None and reply.state.cancelled.is_set():
            reply.stop = FinishReason.CANCELLED

    def _finish(self, reply: _Reply, reason: FinishReason, detail: str) -> None:
        reasoning, answer = reply.splitter.feed(reply.detok.flush())
        tail_r, tail_a = reply.splitter.finish()
        reasoning += tail_r
        answer += tail_a
        reply.reasoning_text.append(reasoning)
        reply.answer_text.append(answer)
        boxed = extract_boxed("".join(reply.answer_text))
        reply.state.out.put(
            StreamChunk(reasoning=reasoning, answer=answer, usage=reply.usage(reason, detail), boxed_answer=boxed)
        )
