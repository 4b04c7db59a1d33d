"""What the page shows, rendered from the backend's results: the thinking and answer messages, the
status banner and stats line, and — with k samples — the vote tally, each sample and its code check.

Pure functions of their inputs (no Gradio events, no host calls beyond reading its state), so that
ui/page.py holds only the page's layout and its event handlers.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any

import gradio as gr

from backends import FinishReason, Usage
from backends.answers import CheckReport, Consensus, Isolation

from .host import ModelHost
from .strings import RUNTIME, Lang, t

# While the thinking streams, only its tail is sent (the whole text once it is done).
THINKING_TAIL_CHARS = 6000
def _plain_block(text: str) -> str:
    """Text inside a fence shows as typed: no Markdown or LaTeX work while it streams."""
    fence = "```"
    while fence in text:
        fence += "`"
    return f"{fence}text\n{text}\n{fence}"


def thinking_message(lang: Lang, reasoning: str, done: bool, seconds: float, tokens: int | None) -> gr.ChatMessage:
    metadata: dict[str, Any] = {"title": t(lang, "thinking"), "status": "done" if done else "pending",
                                "duration": round(seconds, 1)}
    if tokens is not None:
        metadata["log"] = t(lang, "tokens", n=tokens)
    if done:
        content = reasoning.strip() or "…"
    else:
        tail = reasoning if len(reasoning) <= THINKING_TAIL_CHARS else "…" + reasoning[-THINKING_TAIL_CHARS:]
        content = _plain_block(tail) if tail else "…"
    return gr.ChatMessage(role="assistant", content=content, metadata=metadata)  # type: ignore[arg-type]


def wrap_bare_boxed(text: str) -> str:
    """``\\boxed{4}`` written outside any maths delimiters would show as raw text: make it maths.
    Only done when the text has no delimiters at all, so real LaTeX is never touched."""
    if any(d in text for d in ("$", "\\(", "\\[")) or "\\boxed{" not in text:
        return text
    out, i = [], 0
    while (start := text.find("\\boxed{", i)) != -1:
        depth, j = 0, start + len("\\boxed")
        while j < len(text):
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            j += 1
            if depth == 0:
                break
        if depth != 0:  # unbalanced (still streaming): leave the rest as is
            break
        out.append(text[i:start] + "$" + text[start:j] + "$")
        i = j
    out.append(text[i:])
    return "".join(out)


def answer_message(lang: Lang, answer: str, boxed: str | None) -> gr.ChatMessage:
    text = wrap_bare_boxed(answer.strip())
    if boxed:
        text += f'\n\n<div class="vt-final"><b>{t(lang, "final_answer")}:</b> $\\boxed{{{boxed}}}$</div>'
    return gr.ChatMessage(role="assistant", content=text)


def _fmt_s(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} s"


def stats_line(lang: Lang, host: ModelHost, usage: Usage) -> str:
    info = host.status().info
    line = t(
        lang, "stats",
        backend=info.backend if info else "?",
        device=info.device if info else "?",
        ttft=_fmt_s(usage.time_to_first_token_s),
        prompt=usage.prompt_tokens,
        reasoning=usage.reasoning_tokens,
        answer=usage.answer_tokens,
        speed=f"{usage.decode_tokens_per_s:.1f}" if usage.decode_tokens_per_s else "-",
        finish=t(lang, f"finish_{usage.finish_reason.value}"),
    )
    if usage.detail and usage.detail != usage.finish_reason.value:
        line += f" ({usage.detail})"
    return line


def status_banner(lang: Lang, host: ModelHost) -> str:
    st = host.status()
    if st.state == "loading":
        return t(lang, "loading", pct=f"{st.fraction:.0%}", message=st.message)
    if st.state == "failed":
        return t(lang, "failed", error=st.error)
    if st.state == "draining":
        return t(lang, "draining")
    info = st.info
    assert info is not None
    problem = host.engine_problem()
    if problem:
        return t(lang, "unavailable", model=host.manifest.model.id, backend=info.backend, device=info.device,
                 reason=problem)
    return t(lang, "ready", model=host.manifest.model.id, backend=info.backend, device=info.device,
             dtype=info.dtype, context=info.context_length, reason=f" · {info.reason}" if info.reason else "")


# -- voting and code checks (k > 1, solve.run_code) -----------------------------------------------

VOTE_TAIL_CHARS = 1500  # while a sample thinks, the tail shown per sample (k of them stream together)


def _math(answer: str) -> str:
    """An answer as inline maths for the chat's KaTeX (\\(…\\))."""
    return f"\\({answer}\\)" if answer else "-"


def isolation_line(lang: Lang, iso: Isolation) -> str:
    limits = iso.limits.describe()
    if iso.kind == "bubblewrap":
        return t(lang, "isolation_bubblewrap", limits=limits)
    details = [t(lang, "isolation_net")] if iso.network else []
    if iso.own_user:
        details.append(t(lang, "isolation_user"))
    details.append(t(lang, "isolation_hook"))
    line = t(lang, "isolation_process", details=", ".join(details), limits=limits)
    return f"{line}. {iso.note}" if iso.note else line


def check_markdown(lang: Lang, report: CheckReport | None, examples: int, iso: Isolation | None) -> str:
    """A program's verdict on each example: a table, then the diffs of the failures."""
    if report is None:
        return t(lang, "checking", n=examples)
    if not report.program_found:
        return t(lang, "no_program")
    lines = []
    if not report.results:
        lines.append(t(lang, "no_examples"))
    else:
        lines.append(f"**{t(lang, 'check_title', passed=report.passed, total=report.total)}**\n")
        lines.append("| | # | verdict | time |\n|---|---|---|---|")
        for r in report.results:
            mark = "✔" if r.passed else ("·" if r.verdict == "skipped" else "✘")
            verdict = t(lang, f"verdict_{r.verdict}") if f"verdict_{r.verdict}" in RUNTIME[lang] else r.verdict
            detail = "" if r.passed or r.verdict == "wrong_answer" else f" — {r.message}"
            lines.append(f"| {mark} | {r.name} | {verdict}{detail.replace('|', '/')} | {r.time_s:.2f} s |")
        for r in report.results:
            if r.diff:
                lines.append(f"\n{t(lang, 'expected_got', name=r.name)}\n{_fenced(r.diff, 'diff')}")
            elif r.stderr.strip() and not r.passed and r.verdict != "skipped":
                lines.append(f"\n{t(lang, 'stderr', name=r.name)}\n{_fenced(r.stderr.strip()[-1500:], 'text')}")
    if iso is not None:
        lines.append(f"\n<small>{isolation_line(lang, iso)}</small>")
    return "\n".join(lines)


def _fenced(text: str, lang: str) -> str:
    fence = "```"
    while fence in text:
        fence += "`"
    return f"{fence}{lang}\n{text}\n{fence}"


def _apart(lang: Lang, c: Consensus) -> str:
    items = [t(lang, key, n=len(v)) for key, v in (("apart_no_answer", c.no_answer), ("apart_cut_off", c.cut_off),
                                                     ("apart_failed", c.failed), ("apart_running", c.pending)) if v]
    return t(lang, "apart", items=" · ".join(items)) if items else ""


def tally_markdown(lang: Lang, c: Consensus, iso: Isolation | None = None) -> str:
    """The vote, live: the leading answer pinned like a final answer, the others with their
    counts, the samples that did not vote counted apart."""
    done = c.samples - len(c.pending)
    lines = []
    if c.kind == "code":
        total = c.examples or 0
        if c.answer is not None:
            key = "programs_pass" if c.done else "programs_pass_so_far"
            head = t(lang, key, votes=c.votes, samples=c.samples, done=done, total=total)
        elif not c.groups:
            head = t(lang, "no_programs" if c.done else "no_programs_yet")
        else:
            head = t(lang, "no_program_passes", total=total)
        lines.append(f'<div class="vt-final vt-vote"><b>{head}</b></div>')
        others = [f"{g.answer} × {g.votes}" for g in c.groups if g.answer != c.answer]
    else:
        if c.answer is None:
            head = f"<b>{t(lang, 'no_votes' if c.done else 'no_votes_yet')}</b>"
        else:
            key = "agree" if c.done else "agree_so_far"
            head = f"<b>{t(lang, key, votes=c.votes, samples=c.samples, done=done, answer='')}</b> {_math(c.answer)}"
        lines.append(f'<div class="vt-final vt-vote">{head}</div>')
        others = [f"{_math(g.answer)} × {g.votes}" for g in c.groups[1:]]
    if others:
        lines.append(t(lang, "others", answers=" · ".join(others)))
    apart = _apart(lang, c)
    if apart:
        lines.append(apart)
    if c.notes:
        lines.append(f"<small>{t(lang, 'notes', notes='; '.join(c.notes))}</small>")
    if iso is not None:
        lines.append(f"<small>{isolation_line(lang, iso)}</small>")
    return "\n\n".join(lines)


@dataclasses.dataclass
class SampleState:
    reasoning: str = ""
    answer: str = ""
    usage: Usage | None = None
    boxed: str | None = None
    started: float = dataclasses.field(default_factory=time.monotonic)
    think_end: float | None = None

    @property
    def finish(self) -> str | None:
        return self.usage.finish_reason.value if self.usage is not None else None


def sample_message(lang: Lang, index: int, s: SampleState, check: str | None, final: bool,
                   label: str | None = None) -> gr.ChatMessage:
    """One sample, collapsible: its reasoning, its answer and (code) its verdicts; ``label`` is
    what the title says of a finished sample instead of its boxed answer (code problems)."""
    done = s.usage is not None
    if not done:
        state = t(lang, "sample_answering" if s.answer else "sample_running")
    elif label is not None:
        state = label
    elif s.boxed:
        state = s.boxed
    else:
        state = t(lang, "sample_no_answer")
    title = f"{t(lang, 'sample', i=index + 1)} · {state}"
    if done:
        title += f" · {t(lang, 'finish_' + s.usage.finish_reason.value).split(' ')[0]}"
    parts = []
    if s.reasoning:
        if done or final:
            parts.append(f"**{t(lang, 'thinking')}**\n\n{s.reasoning.strip()}")
        else:
            tail = s.reasoning if len(s.reasoning) <= VOTE_TAIL_CHARS else "…" + s.reasoning[-VOTE_TAIL_CHARS:]
            parts.append(f"**{t(lang, 'thinking')}**\n\n{_plain_block(tail)}")
    if s.answer:
        parts.append(f"**{t(lang, 'answer_label')}**\n\n{wrap_bare_boxed(s.answer.strip())}")
    if check:
        parts.append(check)
    metadata: dict[str, Any] = {"title": title, "status": "done" if done or final else "pending",
                                "duration": round(((s.think_end or time.monotonic()) - s.started), 1)}
    if s.usage is not None:
        metadata["log"] = t(lang, "tokens", n=s.usage.completion_tokens)
    return gr.ChatMessage(role="assistant", content="\n\n".join(parts) or "…", metadata=metadata)  # type: ignore[arg-type]


def stats_many(lang: Lang, host: ModelHost, samples: list[SampleState], wall: float) -> str:
    info = host.status().info
    usages = [s.usage for s in samples if s.usage is not None]
    finishes: dict[str, int] = {}
    for s in samples:
        key = s.finish or FinishReason.CANCELLED.value
        finishes[key] = finishes.get(key, 0) + 1
    completion = sum(u.completion_tokens for u in usages)
    return t(lang, "stats_many", backend=info.backend if info else "?", device=info.device if info else "?",
             k=len(samples), prompt=max((u.prompt_tokens for u in usages), default=0),
             reasoning=sum(u.reasoning_tokens for u in usages), answer=sum(u.answer_tokens for u in usages),
             speed=f"{completion / wall:.1f}" if wall > 0 and completion else "-",
             finishes=", ".join(f"{k} ×{v}" for k, v in finishes.items()))
