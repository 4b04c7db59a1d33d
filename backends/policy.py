"""The reply policy of one sequence, the same on every engine and at every batch size.

:class:`ReplyPolicy` is fed the tokens an engine samples (``on_token``) and decides, token by
token: text to stream (incremental detokenisation, the ``<think>`` split), when to stop (end of
reply, cancel, length), when to close the thinking (the thinking budget, a loop while thinking)
and when a loop in the answer ends the reply. It counts reasoning and answer tokens and times the
reply. It knows nothing of threads or queues: the driver (:mod:`backends.driver`) runs one policy
per sequence, so n samples of one request and N users at once each get their own.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

from .config.schema import LoopGuardSettings
from .reasoning import IncrementalDetokenizer, LoopDetector, ThinkSplitter, extract_boxed
from .types import FinishReason, SamplingParams, StreamChunk, Usage

# Written for the model when its thinking is cut short, so that it moves on to the answer.
CLOSE_THINKING_TEXT = "\n\nI have thought long enough; now I will write the final answer.\n</think>\n\n"

CLOSE = "close"  # ReplyPolicy.stop value: close the thinking, then decode again


class ReplyPolicy:
    """One sequence's bookkeeping, driven by ``on_token`` (in the thread that decodes it)."""

    def __init__(self, *, params: SamplingParams, prompt_ids: Sequence[int], max_new: int,
                 decode: Callable[[Sequence[int]], str], eos_token_ids: frozenset[int],
                 loop_guard: LoopGuardSettings, cancelled: threading.Event,
                 emit: Callable[[StreamChunk], None], started_at: float, index: int = 0) -> None:
        self.params = params
        self.max_new = max_new
        self.index = index
        self.prompt_tokens = len(prompt_ids)
        self._eos = eos_token_ids
        self._cancelled = cancelled
        self._emit_chunk = emit
        self._started_at = started_at
        self.generated: list[int] = []
        tail = decode(list(prompt_ids[-16:])) if prompt_ids else ""
        self.splitter = ThinkSplitter(starts_in_reasoning=tail.rstrip().endswith("<think>"))
        self.detok = IncrementalDetokenizer(decode, prompt_ids)
        self.loops = (
            LoopDetector(loop_guard.max_period, loop_guard.min_repeats, loop_guard.min_tokens)
            if params.loop_guard and loop_guard.enabled else None
        )
        self.reasoning_tokens = 0
        self.answer_tokens = 0
        self._undecided = 0  # tokens seen before we know whether the reply thinks
        self.sampled = 0  # tokens the model produced (the injected closing text is not counted)
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self.emitted = False
        self.answer_text: list[str] = []
        # Why on_token asked the engine to stop: a FinishReason, or CLOSE to force </think>.
        self.stop: FinishReason | str | None = None
        self.stop_detail = ""
        self.close_reason = FinishReason.BUDGET  # why thinking was closed (budget or loop)
        self.forced = False  # thinking already closed by us once

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    # -- text and accounting ------------------------------------------------------------------
    def _emit(self, reasoning: str, answer: str) -> None:
        if reasoning or answer:
            self.answer_text.append(answer)
            self._emit_chunk(StreamChunk(reasoning=reasoning, answer=answer, index=self.index))
            self.emitted = True

    def _account(self, text: str) -> None:
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
        self._account(self.detok.step(token))

    @property
    def thinking(self) -> bool:
        return self.splitter.mode == "reasoning"

    # -- the engine's per-token callback --------------------------------------------------------
    def on_token(self, token: int) -> bool:
        """Take one sampled token; True = the engine must stop decoding this sequence."""
        now = time.perf_counter()
        if self._cancelled.is_set():
            self.stop = FinishReason.CANCELLED
            return True
        if token in self._eos:
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
                    self.stop, self.stop_detail = CLOSE, f"{loop.describe()} while thinking"
                    self.close_reason = FinishReason.LOOP
                else:
                    self.stop = FinishReason.LOOP
                    self.stop_detail = f"{loop.describe()} in the answer; generation stopped"
                return True
        budget = self.params.thinking_budget
        if budget and self.thinking and not self.forced and self.reasoning_tokens >= budget:
            self.stop, self.close_reason = CLOSE, FinishReason.BUDGET
            self.stop_detail = f"thinking budget of {budget} tokens reached"
            return True
        if len(self.generated) >= self.max_new:
            self.stop = FinishReason.LENGTH
            self.stop_detail = f"reached the limit of {self.max_new} new tokens"
            return True
        return False

    def close_thinking(self, closing_ids: Sequence[int]) -> int:
        """Append the closing text's ids (not sampled, not counted as the model's); returns the
        tokens left for the answer."""
        self.forced = True
        self.stop = None
        for token in closing_ids:
            self.add_token(token)
        if self.loops is not None:
            self.loops.reset()
        return self.max_new - len(self.generated)

    # -- the end --------------------------------------------------------------------------------
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
                None if self.first_token_at is None else self.first_token_at - self._started_at
            ),
            decode_tokens_per_s=rate,
            total_time_s=end - self._started_at,
            finish_reason=reason,
            detail=detail,
        )

    def finish(self, reason: FinishReason, detail: str) -> StreamChunk:
        """The sequence's last chunk: held-back text, usage and the boxed answer."""
        reasoning, answer = self.splitter.feed(self.detok.flush())
        tail_r, tail_a = self.splitter.finish()
        reasoning += tail_r
        answer += tail_a
        self.answer_text.append(answer)
        boxed = extract_boxed("".join(self.answer_text))
        return StreamChunk(reasoning=reasoning, answer=answer, usage=self.usage(reason, detail),
                           boxed_answer=boxed, index=self.index)
