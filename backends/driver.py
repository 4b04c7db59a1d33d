"""The generation driver shared by every engine that decodes token ids (transformers, llama.cpp).

:class:`EngineBackend` implements ``check``, ``stream`` and ``cancel`` once: the engine's fair
line, one worker per request (and one per sample running at once), the reply policy of each
sequence (:mod:`backends.policy`: ``<think>`` split, thinking budget, loop guard, usage, the
boxed answer). An engine subclasses it and provides only model loading and a handful of hooks
(see the class docstring); it never sees requests or threads.

Phases of one sequence:
1. decode from the prompt;
2. if the thinking budget is reached or a loop is detected inside ``<think>``, append
   :data:`CLOSE_THINKING_TEXT` and decode again so that the model still writes an answer.
A loop in the answer stops the sequence (finish reason ``loop``).

Samples (``request.n``): a request takes ``min(n, capacity)`` slots of the engine's line and runs
that many samples at once (the rest follow as slots of the request free up), each with its own
policy, seed (``seed + i``) and chunks (``index = i``).

Errors: a problem found before anything runs (model not loaded, empty request, conversation too
long) is raised by ``check``/``stream`` themselves; an engine failure before any text is raised
from the iterator; a failure after text has streamed ends that sample with a final chunk whose
``usage.finish_reason`` is ``error`` (``usage.detail`` says why), so clients keep what they got.

Threads: closing the stream (Stop, a dropped client) sets the request's cancel flag and waits at
most :data:`JOIN_TIMEOUT_S` for its worker; the engine stops at its next step (a token, or a
prefill chunk) and the worker then frees its slots by itself.

(About 440 lines: a request's life — line, workers, samples, phases, cancel — reads best in one
place; the pieces that stand alone live in fairlock.py and policy.py.)
"""
from __future__ import annotations

import abc
import dataclasses
import logging
import queue
import threading
import time
import weakref
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .base import Backend
from .fairlock import FairLock
from .policy import CLOSE, CLOSE_THINKING_TEXT, ReplyPolicy
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

if TYPE_CHECKING:
    from .config import Manifest

__all__ = ["CLOSE_THINKING_TEXT", "EngineBackend", "FairLock", "SequenceInfo"]

log = logging.getLogger(__name__)

# How long a cancelled or closed stream waits for its worker before returning (the worker then
# ends by itself at the engine's next step).
JOIN_TIMEOUT_S = 2.0
# How often a reader waiting for the next chunk looks at its request's cancel flag.
_POLL_S = 0.1
# Prompts encoded by check() and not yet streamed (a request refused by the queue never is).
_PREPARED_MAX = 256


@dataclass(frozen=True)
class SequenceInfo:
    """Which sequence a ``decode_loop`` call is decoding (for engines that share prompts)."""

    request_id: str
    index: int  # sample number
    n: int  # samples of the request


@dataclass
class _RequestState:
    request: GenerationRequest
    prompt_ids: list[int]
    cancelled: threading.Event = field(default_factory=threading.Event)
    out: queue.Queue = field(default_factory=queue.Queue)
    started_at: float = field(default_factory=time.perf_counter)


class _Done:
    pass


@dataclass
class _Failure:
    error: BaseException


_DONE = _Done()


class EngineBackend(Backend):
    """A Backend built from engine hooks; the driver here does everything per request.

    Subclasses implement ``load``, ``loaded``, ``info``, ``close`` and:

    - ``eos_token_ids``: ids that end the reply (``<|im_end|>``, ``<|endoftext|>``, …);
    - ``context_length``: the context window of one sequence, in tokens;
    - ``encode_chat(messages)``: prompt ids from the model's own chat template with the
      generation prompt added (an empty system message is dropped beforehand by the driver);
    - ``encode_text(text)``: plain text to ids, no special tokens added;
    - ``decode(ids)``: ids to text, keeping special tokens such as ``<think>`` (the driver never
      passes end-of-reply ids);
    - ``decode_loop(ids, params, max_tokens, on_token)``: evaluate ``ids`` (reusing cached KV of
      a common prefix is the engine's business), sample with ``params`` and call
      ``on_token(id)`` for every new token in order, returning as soon as it returns True or
      after ``max_tokens`` tokens. It runs in a driver worker thread with a slot of the engine's
      line held.

    Engines use :meth:`exclusive` around anything that must not overlap a generation
    (load/close), and may call :meth:`cancel_all` first in ``close``.

    Many sequences (optional): an engine that decodes several sequences together passes
    ``capacity=N`` to ``__init__``. Up to N sequences (users, or samples of one request) then run
    ``decode_loop`` at the same time, each in its own worker thread (the rest wait in the same
    FIFO line), and ``decode_loop`` must be safe to call from several threads at once. Inside
    ``decode_loop``, :meth:`request_cancelled` tells whether the current request was cancelled (so
    that an engine waiting on its own batch can give up without a token arriving) and
    :meth:`current_sequence` which request and sample it decodes. ``exclusive`` waits for all N.
    """

    name = "engine"
    eos_token_ids: frozenset[int] = frozenset()
    context_length: int = 0

    def __init__(self, manifest: Manifest, capacity: int = 1) -> None:
        self.manifest = manifest
        self._lock = FairLock(capacity)
        self._requests: dict[str, _RequestState] = {}
        self._registry = threading.Lock()
        self._prepared: OrderedDict[str, list[int]] = OrderedDict()
        # The sequence a worker thread is decoding (for request_cancelled / current_sequence).
        self._current = threading.local()

    @property
    def capacity(self) -> int:
        """Sequences decoded at the same time (1 = one at a time, in a fair FIFO line)."""
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

    def cancel_check(self) -> Callable[[], bool]:
        """Inside ``decode_loop``: a test of the current request's cancel flag that works from any
        thread (for an engine whose own scheduler thread decodes the sequence)."""
        state: _RequestState | None = getattr(self._current, "state", None)
        return state.cancelled.is_set if state is not None else (lambda: False)

    def current_sequence(self) -> SequenceInfo | None:
        """Inside ``decode_loop``: the request and sample being decoded."""
        return getattr(self._current, "sequence", None)

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

    @property
    def running_sequences(self) -> int:
        """Slots of the engine's line in use now."""
        return self._lock.running

    def _unregister(self, request_id: str, state: _RequestState) -> None:
        with self._registry:
            if self._requests.get(request_id) is state:
                del self._requests[request_id]

    # -- checking -------------------------------------------------------------------------------
    def check(self, request: GenerationRequest) -> int:
        """Refuse a request that cannot run (raises RequestError/BackendError) before it waits in
        any line; returns its prompt length in tokens."""
        super().check(request)
        if not self.loaded:
            raise BackendError("The model is not loaded yet; call load() first (or wait until /health is ready).")
        # An empty system message would replace the template's default maths prompt with nothing.
        kept = [m for m in request.messages if not (m.role == "system" and not m.content.strip())]
        if not kept:
            raise RequestError("The request has only an empty system message; add a user message.")
        ids = list(self.encode_chat(kept))
        if len(ids) >= self.context_length:
            raise ContextLengthExceeded(
                f"对话太长 / The conversation is {len(ids)} tokens but the context window is "
                f"{self.context_length}: start a new chat or shorten the messages."
            )
        with self._registry:
            self._prepared[request.request_id] = ids
            while len(self._prepared) > _PREPARED_MAX:
                self._prepared.popitem(last=False)
        return len(ids)

    def _prompt_ids(self, request: GenerationRequest) -> list[int]:
        with self._registry:
            ids = self._prepared.pop(request.request_id, None)
        if ids is None:
            self.check(request)
            with self._registry:
                ids = self._prepared.pop(request.request_id)
        return ids

    # -- streaming ------------------------------------------------------------------------------
    def stream(self, request: GenerationRequest) -> Iterator[StreamChunk]:
        with self._registry:
            if request.request_id in self._requests:
                raise RequestError(f"Request id {request.request_id!r} is already in use; use a new id.")
        state = _RequestState(request, self._prompt_ids(request))
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
        finished: set[int] = set()
        cancelled_at: float | None = None
        try:
            while True:
                if held is not None:
                    item, held = held, None
                else:
                    try:
                        item = state.out.get(timeout=_POLL_S)
                    except queue.Empty:
                        if not state.cancelled.is_set():
                            continue
                        # Cancelled while the engine is inside one long step (a prompt being
                        # evaluated): the reader is not kept waiting for it. The worker stops at
                        # the engine's next step and frees its slots by itself.
                        cancelled_at = cancelled_at or time.monotonic()
                        if time.monotonic() - cancelled_at < JOIN_TIMEOUT_S:
                            continue
                        for index in sorted(set(range(state.request.n)) - finished):
                            usage = Usage(finish_reason=FinishReason.CANCELLED, detail="cancelled",
                                          total_time_s=time.perf_counter() - state.started_at)
                            yield StreamChunk(usage=usage, index=index)
                        return
                if isinstance(item, _Done):
                    return
                if isinstance(item, _Failure):
                    raise item.error
                # Merge what has piled up (of the same sample) so that a slow reader gets fewer,
                # larger chunks.
                while not item.final:
                    try:
                        nxt = state.out.get_nowait()
                    except queue.Empty:
                        break
                    if not isinstance(nxt, StreamChunk) or nxt.index != item.index:
                        held = nxt  # _DONE, a failure or another sample: handled next
                        break
                    item = StreamChunk(
                        reasoning=item.reasoning + nxt.reasoning,
                        answer=item.answer + nxt.answer,
                        usage=nxt.usage,
                        boxed_answer=nxt.boxed_answer,
                        index=item.index,
                    )
                if item.final:
                    finished.add(item.index)
                yield item
        finally:
            state.cancelled.set()
            self._lock.wake()
            worker.join(JOIN_TIMEOUT_S)
            if worker.is_alive():
                log.info("request %s: the engine stops at its next step", state.request.request_id)
            self._unregister(state.request.request_id, state)

    def _work(self, state: _RequestState) -> None:
        request = state.request
        weight = min(request.n, self.capacity)
        try:
            if not self._lock.acquire(state.cancelled, weight=weight):
                for index in range(request.n):
                    usage = Usage(finish_reason=FinishReason.CANCELLED, detail="cancelled while waiting in line",
                                  total_time_s=time.perf_counter() - state.started_at)
                    state.out.put(StreamChunk(usage=usage, index=index))
                return
            try:
                self._run_samples(state, weight)
            finally:
                self._lock.release(weight)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            state.out.put(_Failure(exc))
        finally:
            state.out.put(_DONE)

    def _run_samples(self, state: _RequestState, parallel: int) -> None:
        """Samples 0 … n-1, ``parallel`` at a time; the first failure before any text is raised."""
        n = state.request.n
        if n == 1:
            self._run_sequence(state, 0)
            return
        pending = deque(range(n))
        failures: list[BaseException] = []
        guard = threading.Lock()

        def lane() -> None:
            while True:
                with guard:
                    if not pending or failures:
                        return
                    index = pending.popleft()
                try:
                    self._run_sequence(state, index)
                except BaseException as exc:  # noqa: BLE001 - re-raised below
                    with guard:
                        failures.append(exc)
                    return

        lanes = [threading.Thread(target=lane, name=f"vt-sample-{state.request.request_id[:8]}-{i}", daemon=True)
                 for i in range(parallel)]
        for t in lanes:
            t.start()
        for t in lanes:
            t.join()
        if failures:
            raise failures[0]

    def _run_sequence(self, state: _RequestState, index: int) -> None:
        request = state.request
        params = request.params
        if params.seed is not None and index:
            params = dataclasses.replace(params, seed=params.seed + index)
        prompt_ids = state.prompt_ids
        max_new = min(params.max_new_tokens, self.context_length - len(prompt_ids))
        policy = ReplyPolicy(
            params=params, prompt_ids=prompt_ids, max_new=max_new, decode=self.decode,
            eos_token_ids=self.eos_token_ids, loop_guard=self.manifest.generation.loop_guard,
            cancelled=state.cancelled, emit=state.out.put, started_at=state.started_at, index=index,
        )
        self._current.state = state
        self._current.sequence = SequenceInfo(request.request_id, index, request.n)
        try:
            self._phases(policy, prompt_ids, params)
        except BackendError:
            raise
        except Exception as exc:
            if not policy.emitted:
                raise
            log.exception("generation failed after streaming began")
            state.out.put(policy.finish(FinishReason.ERROR, f"{type(exc).__name__}: {exc}"))
        finally:
            self._current.state = None
            self._current.sequence = None

    def _phases(self, policy: ReplyPolicy, prompt_ids: list[int], params: SamplingParams) -> None:
        out = self._current.state.out
        if policy.cancelled:
            out.put(policy.finish(FinishReason.CANCELLED, "cancelled before decoding"))
            return
        self.decode_loop(list(prompt_ids), params, policy.max_new, policy.on_token)
        self._note_cancel(policy)
        if policy.stop == CLOSE:
            why, reason = policy.stop_detail, policy.close_reason
            left = policy.close_thinking(self.encode_text(CLOSE_THINKING_TEXT))
            if left <= 0:
                out.put(policy.finish(FinishReason.LENGTH, f"{why}, but no tokens were left for the answer"))
                return
            self.decode_loop(list(prompt_ids) + policy.generated, params, left, policy.on_token)
            self._note_cancel(policy)
            if policy.stop in (None, FinishReason.STOP):
                detail = f"{why}; thinking closed and the answer written"
                if policy.stop is None:
                    reason, detail = FinishReason.LENGTH, f"{why}; the answer reached the token limit"
                out.put(policy.finish(reason, detail))
                return
        stop = policy.stop
        if stop is None:
            stop = FinishReason.LENGTH
            policy.stop_detail = policy.stop_detail or f"reached the limit of {policy.max_new} new tokens"
        if stop == FinishReason.CANCELLED:
            policy.stop_detail = "cancelled"
        assert isinstance(stop, FinishReason)
        out.put(policy.finish(stop, policy.stop_detail if stop != FinishReason.STOP else ""))

    @staticmethod
    def _note_cancel(policy: ReplyPolicy) -> None:
        # An engine may return from decode_loop without a token once request_cancelled() is true
        # (e.g. while its batch had nothing for this request yet): that is a cancel, not a length stop.
        if policy.stop is None and policy.cancelled:
            policy.stop = FinishReason.CANCELLED
