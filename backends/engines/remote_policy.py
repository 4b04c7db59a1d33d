"""The remote engine's reply policy: the local engines' rules applied to text instead of token ids.

An upstream server sends text deltas (reasoning in ``reasoning_content``/``reasoning`` fields, or
``<think>…</think>`` inside ``content``), never token ids, so :class:`backends.policy.ReplyPolicy`
cannot be used as is. :class:`TextReply` keeps the same rules for one sample: the stream-safe
``<think>`` split (:class:`~backends.reasoning.ThinkSplitter`), the boxed answer, the thinking
budget, the loop guard (:class:`TextLoopGuard`, a repeated span of characters or lines), usage,
and the text the model has written so far (to continue it through ``/v1/completions`` once we
closed its thinking). Tokens are counted as streamed pieces: one piece is one token on vLLM,
SGLang and llama-server, which stream token by token.

Pure Python: no HTTP here (that is :mod:`backends.engines.remote`).
"""
from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from ..config.schema import LoopGuardSettings
from ..policy import CLOSE_THINKING_TEXT
from ..reasoning import THINK_CLOSE, THINK_OPEN, LoopDetector, ThinkSplitter, extract_boxed
from ..types import FinishReason, SamplingParams, StreamChunk, Usage

# The loop guard's settings count tokens; text is measured in characters (about 4 per token for
# English and maths, fewer for Chinese, which only makes the guard a little more patient there).
CHARS_PER_TOKEN = 4
# A repeated block of lines is looked for up to this many lines per period.
MAX_LINE_PERIOD = 64

CLOSE = "close"  # Cut.action: close the thinking, then continue the reply
STOP = "stop"  # Cut.action: end the reply here


@dataclass(frozen=True)
class TextLoop:
    unit: str  # "character" or "line"
    period: int  # characters (or lines) in the repeated span
    repeats: int  # back-to-back occurrences so far

    def describe(self) -> str:
        span = "character span" if self.unit == "character" else "line block"
        return f"repeated a {self.period}-{span} {self.repeats} times"


class _TailPeriod:
    """Whether the text's tail repeats back to back with some period p ≤ max_period.

    The rule is LoopDetector's, on characters: the last ``needed(p)`` characters each equal the
    one p places before them, where ``needed(p) = max((min_repeats - 1) * p, min_chars - p)``.
    Candidate periods are the distances at which the tail's last few characters occurred before
    (``str.rfind``, nearest first, so the shortest period wins); each is checked with one slice
    comparison. Ordinary text rarely repeats its last characters nearby, so a check costs a few
    microseconds, done in C by the string methods.
    """

    PROBE = 16  # characters of the tail looked up earlier in the text

    def __init__(self, max_period: int, min_repeats: int, min_chars: int) -> None:
        self.max_period = max_period
        self.min_repeats = min_repeats
        self.min_chars = min_chars
        self._keep = self._needed(max_period) + max_period + self.PROBE
        self.reset()

    def _needed(self, period: int) -> int:
        return max((self.min_repeats - 1) * period, self.min_chars - period)

    def reset(self) -> None:
        self._text = ""

    def push(self, text: str) -> TextLoop | None:
        self._text = (self._text + text)[-self._keep:]
        window = self._text
        size = len(window)
        probe = window[-self.PROBE:]
        end = size - 1  # the probe itself must not count as an earlier occurrence
        while True:
            at = window.rfind(probe, 0, end)
            if at < 0:
                return None
            period = size - len(probe) - at
            if period > self.max_period:
                return None
            needed = self._needed(period)
            if size >= needed + period and window[size - needed:] == window[size - needed - period:size - period]:
                unit = window[-period:]
                repeats = 1
                while (repeats + 1) * period <= size and \
                        window[size - (repeats + 1) * period:size - repeats * period] == unit:
                    repeats += 1
                return TextLoop("character", period, repeats)
            end = at + len(probe) - 1


class TextLoopGuard:
    """A repetition loop in streamed text: a span of characters repeated back to back (the
    ``wait wait wait`` of a looping model), or a block of whole lines repeated back to back
    (a paragraph too long for the character periods). Thresholds come from
    ``generation.loop_guard`` (token counts, times :data:`CHARS_PER_TOKEN`)."""

    def __init__(self, settings: LoopGuardSettings) -> None:
        self.min_chars = settings.min_tokens * CHARS_PER_TOKEN
        self._chars = _TailPeriod(min(settings.max_period * CHARS_PER_TOKEN, 4096), settings.min_repeats,
                                    self.min_chars)
        self._lines = LoopDetector(MAX_LINE_PERIOD, settings.min_repeats, settings.min_repeats)
        self._line: list[str] = []
        self._lengths: deque[int] = deque(maxlen=MAX_LINE_PERIOD * (settings.min_repeats + 1) * 4)

    def reset(self) -> None:
        """A loop must lie within one part (the thinking or the answer)."""
        self._chars.reset()
        self._lines.reset()
        self._line.clear()
        self._lengths.clear()

    def feed(self, text: str) -> TextLoop | None:
        if not text:
            return None
        found = self._chars.push(text)
        if found is not None:
            return found
        *complete, rest = text.split("\n")
        for part in complete:
            self._line.append(part)
            line = "".join(self._line).strip()
            self._line.clear()
            if not line:
                continue  # blank lines neither make nor break a repeated block
            self._lengths.append(len(line) + 1)
            loop = self._lines.push(hash(line) & 0x7FFF_FFFF_FFFF_FFFF)
            if loop is not None:
                covered = list(self._lengths)[-loop.period * loop.repeats:]
                if sum(covered) >= self.min_chars:
                    return TextLoop("line", loop.period, loop.repeats)
        if rest:
            self._line.append(rest)
        return None


@dataclass(frozen=True)
class Cut:
    """Why a reply must leave its upstream stream now: ``action`` CLOSE (close the thinking and
    continue) or STOP (end the reply), the finish reason and the detail for the user."""

    action: str
    reason: FinishReason
    detail: str


class TextReply:
    """One sample's reply, fed the upstream's text deltas in order.

    ``feed_reasoning`` takes a reasoning field's text, ``feed_content`` a chat ``content`` delta
    (``<think>`` tags inside it are split here), ``feed_raw`` the text of a ``/v1/completions``
    continuation (raw model text). Each returns a :class:`Cut` when the reply must leave the
    stream (budget, loop, length), else None. ``raw`` is the model's text after the prompt so far,
    in the model's own format, for a continuation.
    """

    def __init__(self, *, index: int, params: SamplingParams, loop_guard: LoopGuardSettings,
                 emit: Callable[[StreamChunk], None], started_at: float, max_new: int,
                 budget_at: int | None, prompt_opens_think: bool = False) -> None:
        self.index = index
        self.params = params
        self.max_new = max_new
        # Pieces of thinking after which we close it ourselves (None: we do not enforce a budget).
        self.budget_at = budget_at
        self.prompt_opens_think = prompt_opens_think
        self._emit_chunk = emit
        self._started_at = started_at
        self.splitter = ThinkSplitter(starts_in_reasoning=prompt_opens_think)
        self.guard = TextLoopGuard(loop_guard) if params.loop_guard and loop_guard.enabled else None
        self.raw: list[str] = []
        self._via_field = False  # the thinking arrives in a reasoning field (the upstream splits it)
        self.reasoning_pieces = 0
        self.answer_pieces = 0
        self._undecided = 0
        self.first_at: float | None = None
        self.last_at: float | None = None
        self.pieces = 0  # pieces the model produced (our closing text is not counted)
        self.emitted = False
        self.answer_text: list[str] = []
        self.forced = False  # we closed the thinking once
        self.close_reason = FinishReason.BUDGET
        self.close_detail = ""
        self.done = False

    # -- feeding ----------------------------------------------------------------------------
    def feed_reasoning(self, text: str) -> Cut | None:
        if self.splitter.mode == "start":
            # The upstream's reasoning parser took the tags: enter the thinking ourselves.
            self.splitter = ThinkSplitter(starts_in_reasoning=True)
            if not self.prompt_opens_think:
                self.raw.append(THINK_OPEN + "\n")
        if self.splitter.mode == "reasoning":
            self._via_field = True
        self.raw.append(text)
        return self._take(text)

    def feed_content(self, text: str) -> Cut | None:
        if self._via_field and self.splitter.mode == "reasoning":
            # Content after reasoning fields: the upstream saw </think>; close it on our side too.
            self._via_field = False
            self.raw.append("\n" + THINK_CLOSE + "\n\n")
            self._account(THINK_CLOSE, count=False)
        self.raw.append(text)
        return self._take(text)

    def feed_raw(self, text: str) -> Cut | None:
        self._via_field = False
        self.raw.append(text)
        return self._take(text)

    def _account(self, text: str, count: bool = True) -> tuple[str, str, str]:
        before = self.splitter.mode
        reasoning, answer = self.splitter.feed(text)
        after = self.splitter.mode
        if count:
            if before == "start":
                self._undecided += 1
                if after != "start":
                    if self.splitter.opened_think:
                        self.reasoning_pieces += self._undecided
                    else:
                        self.answer_pieces += self._undecided
                    self._undecided = 0
            elif before == "reasoning":
                self.reasoning_pieces += 1
            else:
                self.answer_pieces += 1
        if before != "answer" and after == "answer" and self.guard is not None:
            self.guard.reset()
        self._emit(reasoning, answer)
        return reasoning, answer, after

    def _take(self, text: str) -> Cut | None:
        if not text:
            return None
        now = time.perf_counter()
        self.first_at = self.first_at or now
        self.last_at = now
        self.pieces += 1
        reasoning, answer, mode = self._account(text)
        if self.guard is not None:
            loop = self.guard.feed(reasoning + answer)
            if loop is not None:
                if mode == "reasoning" and not self.forced:
                    return Cut(CLOSE, FinishReason.LOOP, f"{loop.describe()} while thinking")
                return Cut(STOP, FinishReason.LOOP, f"{loop.describe()} in the answer; generation stopped")
        if (self.budget_at is not None and mode == "reasoning" and not self.forced
                and self.reasoning_pieces >= self.budget_at):
            return Cut(CLOSE, FinishReason.BUDGET, f"thinking budget of {self.params.thinking_budget} tokens reached")
        if self.pieces >= self.max_new:
            return Cut(STOP, FinishReason.LENGTH, f"reached the limit of {self.max_new} new tokens")
        return None

    def _emit(self, reasoning: str, answer: str) -> None:
        if reasoning or answer:
            self.answer_text.append(answer)
            self._emit_chunk(StreamChunk(reasoning=reasoning, answer=answer, index=self.index))
            self.emitted = True

    # -- closing the thinking -----------------------------------------------------------------
    @property
    def thinking(self) -> bool:
        return self.splitter.mode == "reasoning"

    def close_thinking(self, reason: FinishReason, detail: str) -> None:
        """Write our closing text (shown in the thinking, not counted as the model's) so that a
        continuation starts with the answer."""
        self.forced = True
        self.close_reason, self.close_detail = reason, detail
        self._via_field = False
        self.raw.append(CLOSE_THINKING_TEXT)
        self._account(CLOSE_THINKING_TEXT, count=False)
        if self.guard is not None:
            self.guard.reset()

    def defer_loop(self) -> None:
        """Let a loop go on once more (the guard starts counting again)."""
        if self.guard is not None:
            self.guard.reset()

    @property
    def tokens_left(self) -> int:
        return self.max_new - self.pieces

    def continuation_text(self) -> str:
        return "".join(self.raw)

    # -- the end --------------------------------------------------------------------------------
    def usage(self, reason: FinishReason, detail: str, prompt_tokens: int = 0,
              exact: tuple[int, int] | None = None) -> Usage:
        rate = None
        if self.first_at is not None and self.last_at is not None and self.pieces > 1:
            span = self.last_at - self.first_at
            if span > 0:
                rate = (self.pieces - 1) / span
        if exact is not None:
            reasoning, answer = exact
        else:
            reasoning, answer = self.reasoning_pieces, self.answer_pieces + self._undecided
        return Usage(
            prompt_tokens=prompt_tokens,
            reasoning_tokens=reasoning,
            answer_tokens=answer,
            time_to_first_token_s=None if self.first_at is None else self.first_at - self._started_at,
            decode_tokens_per_s=rate,
            total_time_s=time.perf_counter() - self._started_at,
            finish_reason=reason,
            detail=detail,
        )

    def finish(self, reason: FinishReason, detail: str, prompt_tokens: int = 0,
               exact: tuple[int, int] | None = None) -> StreamChunk:
        """The sample's last chunk: held-back text, usage, the boxed answer. Emitted once."""
        self.done = True
        reasoning, answer = self.splitter.finish()
        self.answer_text.append(answer)
        boxed = extract_boxed("".join(self.answer_text))
        return StreamChunk(reasoning=reasoning, answer=answer, boxed_answer=boxed, index=self.index,
                           usage=self.usage(reason, detail, prompt_tokens, exact))
