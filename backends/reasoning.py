"""Engine-independent pieces of a reasoning reply, all pure Python and streaming-safe.

- :class:`ThinkSplitter` separates ``<think>…</think>`` reasoning from the answer while text
  arrives in arbitrary pieces (a tag may be cut anywhere).
- :func:`extract_boxed` finds the final ``\\boxed{…}`` answer (nested braces allowed).
- :class:`LoopDetector` notices a span of tokens repeated back to back, in O(max_period) per token.
- :class:`IncrementalDetokenizer` turns token ids into text without ever showing half a UTF-8
  character (the prefix/read offset scheme of text-generation-inference).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"

Mode = Literal["start", "reasoning", "answer"]


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``tag``."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


class ThinkSplitter:
    """Splits streamed model text into (reasoning, answer) pieces.

    A reply that starts with ``<think>`` (after whitespace) is reasoning until ``</think>``; a
    reply that never opens the tag is all answer. Some chat templates open the tag inside the
    prompt: pass ``starts_in_reasoning=True`` then. Whitespace right after a tag and right before
    ``</think>`` is dropped so that neither part starts or ends with blank lines.
    """

    def __init__(self, starts_in_reasoning: bool = False) -> None:
        self.mode: Mode = "reasoning" if starts_in_reasoning else "start"
        self.opened_think = starts_in_reasoning
        self._buf = ""  # text held back: a possible partial tag, or whitespace of unknown role
        self._at_part_start = True  # still dropping leading whitespace of the current part

    def feed(self, text: str) -> tuple[str, str]:
        """Add text; return the (reasoning, answer) text that is now certain."""
        reasoning: list[str] = []
        answer: list[str] = []
        buf = self._buf + text
        while buf:
            if self.mode == "start":
                stripped = buf.lstrip()
                if not stripped:
                    buf = ""  # only whitespace so far: drop it, the role is still unknown
                    break
                if stripped.startswith(THINK_OPEN):
                    self.mode, self.opened_think, self._at_part_start = "reasoning", True, True
                    buf = stripped[len(THINK_OPEN):]
                    continue
                if THINK_OPEN.startswith(stripped):
                    buf = stripped  # maybe a tag cut short: wait for more text
                    break
                self.mode, self._at_part_start = "answer", True
                buf = stripped
                continue
            if self.mode == "reasoning":
                if self._at_part_start:
                    buf = buf.lstrip()
                    if not buf:
                        break
                    self._at_part_start = False
                end = buf.find(THINK_CLOSE)
                if end >= 0:
                    reasoning.append(buf[:end].rstrip())
                    self.mode, self._at_part_start = "answer", True
                    buf = buf[end + len(THINK_CLOSE):]
                    continue
                keep = _partial_suffix(buf, THINK_CLOSE)
                body = buf[: len(buf) - keep]
                # Trailing whitespace waits: it is dropped if "</think>" follows.
                certain = body.rstrip()
                reasoning.append(certain)
                buf = buf[len(certain):]
                break
            # answer: everything passes, except leading whitespace
            if self._at_part_start:
                buf = buf.lstrip()
                if not buf:
                    break
                self._at_part_start = False
            answer.append(buf)
            buf = ""
        self._buf = buf
        return "".join(reasoning), "".join(answer)

    def finish(self) -> tuple[str, str]:
        """End of the reply: release held-back text (a tag that never completed is plain text)."""
        buf, self._buf = self._buf, ""
        if self.mode == "start":
            if buf.strip():
                self.mode = "answer"
                return "", buf.strip()
            return "", ""
        if self.mode == "reasoning":
            return buf.rstrip(), ""
        return "", buf


def extract_boxed(text: str) -> str | None:
    """Content of the last complete ``\\boxed{…}`` (or ``\\fbox{…}``) in ``text``, or None.

    Braces nest; ``\\{`` and ``\\}`` are literal braces and do not count.
    """
    best: str | None = None
    i = 0
    while True:
        starts = [p for p in (text.find("\\boxed", i), text.find("\\fbox", i)) if p >= 0]
        if not starts:
            return best
        start = min(starts)
        j = start + (6 if text.startswith("\\boxed", start) else 5)
        while j < len(text) and text[j] == " ":
            j += 1
        if j >= len(text) or text[j] != "{":
            i = j if j > start else start + 1
            continue
        depth, k = 0, j
        while k < len(text):
            c = text[k]
            if c == "\\" and k + 1 < len(text) and text[k + 1] in "{}":
                k += 2
                continue
            if c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
                if depth == 0:
                    break
            k += 1
        if depth != 0:
            return best  # unclosed: the reply was cut off
        best = text[j + 1 : k].strip()
        i = k + 1


@dataclass(frozen=True)
class Loop:
    period: int  # tokens in the repeated span
    repeats: int  # how many times it occurs back to back (so far)

    def describe(self) -> str:
        return f"repeated a {self.period}-token span {self.repeats} times"


class LoopDetector:
    """Detects a span of at most ``max_period`` tokens repeated back to back.

    A loop is a period ``p`` whose span occurs ``min_repeats`` times in a row and covers at least
    ``min_tokens`` tokens. For every ``p`` it keeps the length of the current run of positions
    where ``tok[i] == tok[i - p]``; a run of ``r`` means the last ``r + p`` tokens are periodic
    with period ``p``. Each token costs one vectorised O(max_period) update.
    """

    def __init__(self, max_period: int = 256, min_repeats: int = 4, min_tokens: int = 64) -> None:
        if max_period < 1 or min_repeats < 2 or min_tokens < 1:
            raise ValueError("loop guard needs max_period >= 1, min_repeats >= 2, min_tokens >= 1")
        self.max_period = max_period
        self.min_repeats = min_repeats
        self.min_tokens = min_tokens
        periods = np.arange(1, max_period + 1, dtype=np.int64)
        # Periodic run length needed per period: (min_repeats - 1) spans after the first, and
        # enough tokens overall.
        self._needed = np.maximum((min_repeats - 1) * periods, min_tokens - periods)
        self.reset()

    def reset(self) -> None:
        # _recent[p - 1] is the token p positions back; -1 never equals a token id.
        self._recent = np.full(self.max_period, -1, dtype=np.int64)
        self._runs = np.zeros(self.max_period, dtype=np.int64)
        self.count = 0

    def push(self, token: int) -> Loop | None:
        """Add one token; return the shortest loop now present, if any."""
        same = self._recent == token
        self._runs = np.where(same, self._runs + 1, 0)
        self._recent[1:] = self._recent[:-1]
        self._recent[0] = token
        self.count += 1
        hits = np.flatnonzero(self._runs >= self._needed)
        if hits.size == 0:
            return None
        p = int(hits[0]) + 1
        return Loop(period=p, repeats=(int(self._runs[p - 1]) + p) // p)


class IncrementalDetokenizer:
    """Token ids in, new text out, never splitting a multi-byte character.

    ``decode`` must turn ids into text exactly as the tokenizer does for the whole sequence.
    Text is re-decoded from ``prefix_offset`` so that tokenizers whose decoding depends on the
    previous token (byte-level BPE pieces, SentencePiece spaces) stay correct; a trailing U+FFFD
    means an incomplete character and holds the text back until the next token completes it.
    """

    def __init__(self, decode: Callable[[Sequence[int]], str], context: Sequence[int] = ()) -> None:
        self._decode = decode
        self.ids: list[int] = list(context[-6:])
        # Context tokens (the end of the prompt) are decoded but never emitted.
        self._prefix = 0
        self._read = len(self.ids)

    def step(self, token: int) -> str:
        self.ids.append(token)
        prefix_text = self._decode(self.ids[self._prefix : self._read])
        new_text = self._decode(self.ids[self._prefix :])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            delta = new_text[len(prefix_text) :]
            self._prefix = self._read
            self._read = len(self.ids)
            return delta
        return ""

    def flush(self) -> str:
        """Text still held back at the end (possibly an incomplete character as U+FFFD)."""
        if self._read >= len(self.ids):
            return ""
        prefix_text = self._decode(self.ids[self._prefix : self._read])
        new_text = self._decode(self.ids[self._prefix :])
        self._prefix = self._read = len(self.ids)
        return new_text[len(prefix_text) :] if new_text.startswith(prefix_text) else new_text
