"""Self-consistency voting over k samples of one question (``cons@k``).

Each finished sample's final ``\\boxed{}`` answer (:func:`backends.reasoning.extract_boxed`, the
last complete one) is grouped with the answers it is mathematically equal to; the largest group
wins (a tie goes to the group that formed first, and says so). Equality: the same normalised text
(:func:`.judge.normalise`), else math-verify's ``verify(first answer of the group, answer)`` when it
can parse both. An answer math-verify cannot parse (or not in time) is compared as normalised
text only, and the consensus says so in ``notes``. Samples that are not votes are counted apart:
``no_answer`` (finished without a boxed answer), ``cut_off`` (stopped at the length limit),
``failed`` (cancelled or an error), ``pending`` (still running: the tally is live).
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from ..reasoning import extract_boxed
from ..types import FinishReason
from .judge import MathJudge, normalise

__all__ = ["Consensus", "Group", "SampleAnswer", "boxed_answers", "tally"]

NOT_VOTES = {FinishReason.CANCELLED.value, FinishReason.ERROR.value}


def boxed_answers(text: str) -> list[str]:
    """Every complete ``\\boxed{…}`` in ``text``, in order (the last one is the final answer)."""
    found: list[str] = []
    rest = text
    while (last := extract_boxed(rest)) is not None:
        found.append(last)
        cut = max(rest.rfind("\\boxed"), rest.rfind("\\fbox"))
        if cut < 0:
            break
        rest = rest[:cut]
    return found[::-1]


@dataclass(frozen=True)
class SampleAnswer:
    """What voting needs of one sample. ``finish_reason`` None = still running."""

    index: int
    answer: str  # the answer part (after </think>)
    finish_reason: str | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


@dataclass
class Group:
    answer: str  # the group's first answer, as written
    votes: int
    indexes: list[int]
    method: Literal["text", "math-verify"] = "text"  # how members beyond the first were matched

    def to_dict(self) -> dict[str, Any]:
        return {"answer": self.answer, "votes": self.votes, "indexes": list(self.indexes), "method": self.method}


@dataclass
class Consensus:
    kind: Literal["math", "code"]
    answer: str | None  # the winning answer (code: "passes all N" with the best sample in ``best_index``)
    votes: int
    samples: int
    groups: list[Group]
    no_answer: list[int] = field(default_factory=list)
    cut_off: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    pending: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    equivalence: str = "math-verify"  # or "text" when math-verify is not available
    best_index: int | None = None  # a sample of the winning group (code: a passing program)
    tie: bool = False
    examples: int | None = None  # code: how many examples each program ran on

    @property
    def done(self) -> bool:
        return not self.pending

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind, "answer": self.answer, "votes": self.votes, "samples": self.samples,
            "groups": [g.to_dict() for g in self.groups], "no_answer": list(self.no_answer),
            "cut_off": list(self.cut_off), "failed": list(self.failed), "pending": list(self.pending),
            "tie": self.tie, "best_index": self.best_index, "equivalence": self.equivalence,
            "examples": self.examples, "notes": list(self.notes),
        }


def _sort_out(samples: Iterable[SampleAnswer], total: int) -> tuple[list[tuple[int, str]], Consensus]:
    """Votes (index, final boxed answer) and a Consensus holding everything that is not a vote."""
    out = Consensus(kind="math", answer=None, votes=0, samples=total, groups=[])
    votes: list[tuple[int, str]] = []
    seen = set()
    for s in sorted(samples, key=lambda s: s.index):
        seen.add(s.index)
        if not s.done:
            out.pending.append(s.index)
            continue
        if s.finish_reason in NOT_VOTES:
            out.failed.append(s.index)
            continue
        boxes = boxed_answers(s.answer)
        if s.finish_reason == FinishReason.LENGTH.value:
            out.cut_off.append(s.index)
            continue
        if not boxes or not boxes[-1].strip():
            out.no_answer.append(s.index)
            continue
        if len({normalise(b) for b in boxes}) > 1:
            out.notes.append(f"sample {s.index}: {len(boxes)} different boxed answers; the last one counts")
        votes.append((s.index, boxes[-1]))
    out.pending += [i for i in range(total) if i not in seen]
    out.pending.sort()
    return votes, out


def _winner(out: Consensus) -> None:
    if not out.groups:
        return
    best = max(out.groups, key=lambda g: g.votes)  # max keeps the first of equals: the earliest group
    out.answer, out.votes, out.best_index = best.answer, best.votes, best.indexes[0]
    equals = [g for g in out.groups if g.votes == best.votes]
    if len(equals) > 1:
        out.tie = True
        out.notes.append(f"tie: {len(equals)} answers have {best.votes} vote(s) each; the first to appear wins")


def tally(samples: Sequence[SampleAnswer], judge: MathJudge | None, total: int | None = None) -> Consensus:
    """The vote over ``samples`` (``total`` = how many samples the request has, default all given).
    ``judge`` None compares normalised text only."""
    total = max(total or 0, len(samples), max((s.index + 1 for s in samples), default=0))
    votes, out = _sort_out(samples, total)
    if judge is None or judge.unavailable:
        out.equivalence = "text"
    reps: list[tuple[Group, str, bool]] = []  # group, its first answer's normal form, parsed?
    unparsable: set[str] = set()
    parse_cache: dict[str, bool] = {}

    def parsed(answer: str, index: int) -> bool:
        if out.equivalence == "text" or judge is None:
            return False
        if answer not in parse_cache:
            result = judge.parse(answer)
            if judge.unavailable:  # found out just now: every answer is compared as text
                out.equivalence = "text"
                return False
            parse_cache[answer] = result.parsed
            if not result.parsed and answer not in unparsable:
                unparsable.add(answer)
                out.notes.append(f"sample {index}: {result.why} ({answer!r}); compared as text")
        return parse_cache[answer]

    for index, answer in votes:
        norm = normalise(answer)
        for group, rep_norm, _ in reps:
            if norm == rep_norm:
                group.votes += 1
                group.indexes.append(index)
                break
        else:
            placed = False
            if parsed(answer, index):
                for group, _, rep_parsed in reps:
                    if not rep_parsed:
                        continue
                    same = judge.equivalent(group.answer, answer) if judge is not None else None
                    if same is None:
                        out.notes.append(f"sample {index}: math-verify could not compare {answer!r} with "
                                         f"{group.answer!r} in time; counted as different")
                        continue
                    if same:
                        group.votes += 1
                        group.indexes.append(index)
                        group.method = "math-verify"
                        placed = True
                        break
            if not placed:
                group = Group(answer=answer, votes=1, indexes=[index])
                out.groups.append(group)
                reps.append((group, norm, parse_cache.get(answer, False)))
    if out.equivalence == "text" and judge is not None and judge.unavailable:
        out.notes.append(judge.unavailable)
    out.groups.sort(key=lambda g: (-g.votes, g.indexes[0]))
    _winner(out)
    return out
