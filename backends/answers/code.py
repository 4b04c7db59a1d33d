"""Code problems: the final Python program of an answer, the examples a problem states, verdicts.

Examples are read from the problem text in the shapes that competitive-programming statements
use when copied as text:

- AtCoder / LiveCodeBench: ``Sample Input 1`` … ``Sample Output 1`` (also 入力例/出力例 and
  样例输入/样例输出), each followed by a fenced block or by lines up to the next blank line;
- Codeforces: an ``Example(s)`` heading followed by bare ``Input`` / ``Output`` headings (bare
  headings before it are the input/output format sections, not examples);
- LeetCode: ``Example 1:`` … ``Input: nums = [2,7,11,15], target = 9`` / ``Output: [0,1]`` — the
  program's function (``class Solution`` method, or a top-level function) is called with those
  arguments and its return value compared.

Plain-text samples end at the first blank line (a sample with blank lines inside needs a fenced
block). Outputs are compared line by line ignoring trailing spaces and trailing blank lines, then
token by token with a tolerance of 1e-6 for numbers written with a decimal point (and the
verdict says so).
"""
from __future__ import annotations

import ast
import dataclasses
import difflib
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..types import FinishReason
from .sandbox import Execution, Outcome, Sandbox
from .vote import NOT_VOTES, Consensus, Group

__all__ = ["CheckReport", "Example", "TestResult", "check_program", "code_tally", "extract_program",
           "parse_examples", "parse_test_text", "examples_from_tests"]

PYTHON_LANGS = {"", "python", "py", "python3", "py3", "python2"}
FLOAT_TOLERANCE = 1e-6
DIFF_LINES = 40
MAX_TESTS = 20

_FENCE = re.compile(r"^[ \t]*(```+|~~~+)[ \t]*([\w+#.-]*)[^\n]*\n(.*?)^[ \t]*\1[ \t]*$", re.M | re.S)


@dataclass(frozen=True)
class Example:
    name: str  # "Sample 1", "Example 2", "Test 1"
    input: str  # stdin (or, for a call, the "Input:" text as written)
    output: str  # expected stdout (or the "Output:" text)
    call: Mapping[str, Any] | None = None  # LeetCode style: {"kwargs": {...}}
    source: str = "problem"  # "problem" | "user"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "input": self.input, "output": self.output,
                "call": dict(self.call) if self.call is not None else None, "source": self.source}


def extract_program(answer: str) -> str | None:
    """The last fenced Python block of an answer (unlabelled blocks count unless they look like
    C/C++/Java), or None."""
    best = None
    for m in _FENCE.finditer(answer or ""):
        lang, body = m.group(2).lower(), m.group(3)
        if lang not in PYTHON_LANGS:
            continue
        if not lang and re.search(r"^\s*(#include|using namespace|public\s+class|int\s+main\s*\()", body, re.M):
            continue
        if body.strip():
            best = body
    return best


def has_code_block(answer: str) -> bool:
    return extract_program(answer) is not None


# -- examples in a problem statement -------------------------------------------------------------

_DECOR = " \t#*_>`"
_IN = re.compile(r"(?:(?:sample|example)\s*input|input\s*(?:sample|example)"
                 r"|样例输入|输入样例|输入示例|示例输入|入力例)\s*#?\s*(\d*)")
_OUT = re.compile(r"(?:(?:sample|example)\s*output|output\s*(?:sample|example)"
                  r"|样例输出|输出样例|输出示例|示例输出|出力例)\s*#?\s*(\d*)")
_SECTION = re.compile(r"(?:examples?|samples?|样例|示例|入出力例)\s*#?\s*(\d*)")
_BARE_IN = re.compile(r"input\s*(\d*)")
_BARE_OUT = re.compile(r"output\s*(\d*)")
_STOP = re.compile(r"(?:explanation|notes?|constraints?|hint|说明|提示|解释|注意|制約)\b.*", re.I)
_LEET = re.compile(r"^[ \t*_]*Input[ \t*_]*:[ \t*_]*(?P<input>\S.*?)[ \t]*\n(?:[ \t]*\n)*"
                   r"[ \t*_]*Output[ \t*_]*:[ \t*_]*(?P<output>\S.*?)[ \t]*$", re.M | re.I)


def _clean(line: str) -> str:
    s = line.strip().strip(_DECOR).strip()
    s = s.rstrip(":：").strip().strip(_DECOR).strip()
    return s.lower()


def _header(line: str, in_examples: bool) -> tuple[str, str] | None:
    """("in"|"out"|"section"|"stop", number) when ``line`` is a heading."""
    if len(line) > 60:
        return None
    s = _clean(line)
    for kind, pattern in (("in", _IN), ("out", _OUT)):
        m = pattern.fullmatch(s)
        if m:
            return kind, m.group(1)
    if in_examples:
        for kind, pattern in (("in", _BARE_IN), ("out", _BARE_OUT)):
            m = pattern.fullmatch(s)
            if m:
                return kind, m.group(1)
    m = _SECTION.fullmatch(s)
    if m:
        return "section", m.group(1)
    if _STOP.fullmatch(s) or line.lstrip().startswith("#"):
        return "stop", ""
    return None


def _block(lines: list[str], start: int, in_examples: bool) -> tuple[str, int]:
    """The sample text after a heading at ``start - 1``: a fenced block, or lines up to a blank
    line or the next heading. Returns (text, index of the next unread line)."""
    i = start
    while i < len(lines) and not lines[i].strip():
        i += 1
    if i < len(lines) and re.match(r"^[ \t]*(```+|~~~+)", lines[i]):
        fence = re.match(r"^[ \t]*(```+|~~~+)", lines[i]).group(1)  # type: ignore[union-attr]
        body: list[str] = []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i])
            i += 1
        return "\n".join(body), i + 1
    body = []
    while i < len(lines) and lines[i].strip() and _header(lines[i], in_examples) is None:
        body.append(lines[i].rstrip())
        i += 1
    return "\n".join(body), i


def _split_top(text: str) -> list[str]:
    """Split at commas outside brackets and quotes."""
    parts, depth, quote, cur = [], 0, "", []
    for i, c in enumerate(text):
        if quote:
            if c == quote and text[i - 1] != "\\":
                quote = ""
        elif c in "\"'":
            quote = c
        elif c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif c == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
            continue
        cur.append(c)
    parts.append("".join(cur))
    return parts


def literal(text: str) -> Any:
    """A value as LeetCode writes it (JSON, or Python literals); ValueError if it is neither."""
    text = text.strip().rstrip(".")
    try:
        return json.loads(text)
    except ValueError:
        pass
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        pass
    fixed = re.sub(r"\btrue\b", "True", re.sub(r"\bfalse\b", "False", re.sub(r"\bnull\b", "None", text)))
    try:
        return ast.literal_eval(fixed)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        raise ValueError(f"not a value: {text[:80]!r}") from None


def _assignments(text: str) -> dict[str, Any] | None:
    """``nums = [2,7], target = 9`` → {"nums": [2, 7], "target": 9}; None if it is not that shape."""
    out: dict[str, Any] = {}
    parts = _split_top(text)
    # A comma inside a value at top level ("x = 1, 2") would give a part without "=": merge back.
    merged: list[str] = []
    for part in parts:
        if re.match(r"^\s*[A-Za-z_]\w*\s*=(?!=)", part) or not merged:
            merged.append(part)
        else:
            merged[-1] += "," + part
    for part in merged:
        m = re.match(r"^\s*([A-Za-z_]\w*)\s*=(?!=)\s*(.+?)\s*$", part, re.S)
        if not m:
            return None
        try:
            out[m.group(1)] = literal(m.group(2))
        except ValueError:
            return None
    return out or None


def _leetcode(problem: str) -> list[Example]:
    found = []
    for n, m in enumerate(_LEET.finditer(problem), 1):
        raw_in, raw_out = m.group("input").strip().strip("`"), m.group("output").strip().strip("`")
        kwargs = _assignments(raw_in)
        if kwargs is not None:
            found.append(Example(f"Example {n}", raw_in, raw_out, call={"kwargs": kwargs}))
        else:
            found.append(Example(f"Example {n}", raw_in.replace("\\n", "\n"), raw_out.replace("\\n", "\n")))
    return found


def parse_examples(problem: str) -> list[Example]:
    """The examples stated in ``problem`` (empty when it states none in a shape we know)."""
    problem = (problem or "").replace("\r\n", "\n")
    lines = problem.split("\n")
    inputs: list[tuple[str, str]] = []
    outputs: list[tuple[str, str]] = []
    in_examples = False
    i = 0
    while i < len(lines):
        head = _header(lines[i], in_examples)
        if head is None:
            i += 1
            continue
        kind, number = head
        if kind == "section":
            in_examples = True
            i += 1
            continue
        if kind == "stop":
            i += 1
            continue
        text, i = _block(lines, i + 1, in_examples)
        (inputs if kind == "in" else outputs).append((number, text))
    examples: list[Example] = []
    if inputs and outputs:
        by_number = {num: text for num, text in outputs if num}
        for k, (num, text) in enumerate(inputs):
            if num and num in by_number:
                expected = by_number[num]
            elif k < len(outputs):
                expected = outputs[k][1]
            else:
                continue
            examples.append(Example(f"Sample {num or k + 1}", text, expected))
    if not examples:
        examples = _leetcode(problem)
    return examples[:MAX_TESTS]


def examples_from_tests(tests: Sequence[Mapping[str, Any]], source: str = "user") -> list[Example]:
    """``[{"input": …, "output": …}]`` (the API's ``tests``, an evaluation file's ``tests``)."""
    out = []
    for n, t in enumerate(tests, 1):
        if not isinstance(t, Mapping) or "input" not in t or "output" not in t:
            raise ValueError(f"test {n} must be an object with 'input' and 'output' strings")
        out.append(Example(str(t.get("name") or f"Test {n}"), str(t["input"]), str(t["output"]), source=source))
    return out


def parse_test_text(text: str) -> list[Example]:
    """Tests typed on the page: blocks separated by a line ``===``, input and expected output
    separated by a line ``---``."""
    tests = []
    for n, block in enumerate(re.split(r"^\s*===+\s*$", text or "", flags=re.M), 1):
        if not block.strip():
            continue
        parts = re.split(r"^\s*---+\s*$", block, maxsplit=1, flags=re.M)
        if len(parts) != 2:
            raise ValueError(f"test {n}: separate its input and expected output with a line '---'")
        tests.append(Example(f"Test {len(tests) + 1}", parts[0].strip("\n"), parts[1].strip("\n"), source="user"))
    return tests


# -- verdicts ---------------------------------------------------------------------------------------

def _lines(text: str) -> list[str]:
    out = [line.rstrip() for line in text.replace("\r\n", "\n").split("\n")]
    while out and not out[-1]:
        out.pop()
    return out


def _num(token: str) -> float | None:
    try:
        return float(token)
    except ValueError:
        return None


def compare_output(expected: str, got: str) -> tuple[bool, str]:
    """(same, how): exact after whitespace normalisation, or numbers within 1e-6."""
    if _lines(expected) == _lines(got):
        return True, ""
    want, have = expected.split(), got.split()
    if len(want) != len(have):
        return False, ""
    for a, b in zip(want, have):
        if a == b:
            continue
        x, y = _num(a), _num(b)
        if x is None or y is None or not re.search(r"[.eE]", a):
            return False, ""
        if not math.isclose(x, y, rel_tol=FLOAT_TOLERANCE, abs_tol=FLOAT_TOLERANCE):
            return False, ""
    return True, f"numbers within {FLOAT_TOLERANCE:g}"


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def same_value(expected: Any, got: Any) -> bool:
    """Equal values; lists and tuples alike; floats within 1e-6; True is not 1."""
    expected, got = _plain(expected), _plain(got)
    if isinstance(expected, bool) or isinstance(got, bool):
        return type(expected) is type(got) and expected == got
    if isinstance(expected, (int, float)) and isinstance(got, (int, float)):
        if isinstance(expected, float) or isinstance(got, float):
            return math.isclose(expected, got, rel_tol=FLOAT_TOLERANCE, abs_tol=FLOAT_TOLERANCE)
        return expected == got
    if isinstance(expected, list) and isinstance(got, list):
        return len(expected) == len(got) and all(same_value(a, b) for a, b in zip(expected, got))
    if isinstance(expected, dict) and isinstance(got, dict):
        return expected.keys() == got.keys() and all(same_value(expected[k], got[k]) for k in expected)
    return expected == got


def _diff(expected: str, got: str) -> str:
    lines = list(difflib.unified_diff(_lines(expected), _lines(got), "expected", "got", lineterm="", n=2))
    if len(lines) > DIFF_LINES:
        lines = lines[:DIFF_LINES] + [f"… ({len(lines) - DIFF_LINES} more diff lines)"]
    return "\n".join(lines)


def _short(text: str, n: int = 2000) -> str:
    return text if len(text) <= n else text[:n] + "…"


@dataclass
class TestResult:
    name: str
    verdict: str  # passed | wrong_answer | runtime_error | time_limit | memory_limit | output_limit | blocked | …
    message: str
    time_s: float = 0.0  # wall-clock time of the run (Python's start included)
    cpu_s: float = 0.0
    input: str = ""
    expected: str = ""
    got: str = ""
    diff: str = ""
    stderr: str = ""
    source: str = "problem"

    @property
    def passed(self) -> bool:
        return self.verdict == "passed"

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "passed": self.passed}


@dataclass
class CheckReport:
    program_found: bool
    results: list[TestResult] = field(default_factory=list)
    isolation: dict[str, Any] = field(default_factory=dict)
    note: str = ""

    @property
    def total(self) -> int:
        return len(self.results)

    @property
    def passed(self) -> int:
        return sum(r.passed for r in self.results)

    @property
    def verdict(self) -> str:
        if not self.program_found:
            return "no_program"
        if not self.results:
            return "no_tests"
        return "passed" if self.passed == self.total else "failed"

    def to_dict(self) -> dict[str, Any]:
        return {"verdict": self.verdict, "program_found": self.program_found, "passed": self.passed,
                "total": self.total, "results": [r.to_dict() for r in self.results], "isolation": self.isolation,
                "note": self.note}


_FATAL = {Outcome.TIME_LIMIT, Outcome.MEMORY_LIMIT, Outcome.OUTPUT_LIMIT, Outcome.BLOCKED, Outcome.SANDBOX_ERROR,
          Outcome.COMPILE_ERROR}


def _judge(example: Example, ex: Execution) -> TestResult:
    base = TestResult(example.name, ex.outcome.value, ex.message, time_s=round(ex.wall_s, 3),
                      cpu_s=round(ex.cpu_s, 3), input=_short(example.input), expected=_short(example.output),
                      got=_short(ex.shown_stdout), stderr=ex.shown_stderr, source=example.source)
    if ex.outcome != Outcome.OK:
        return base
    if example.call is not None:
        if not ex.has_value:
            base.verdict, base.message = "runtime_error", "the function returned nothing we could read"
            return base
        got_text = json.dumps(ex.value) if ex.value_repr is None else ex.value_repr
        base.got = _short(got_text)
        try:
            want = literal(example.output)
            ok = same_value(want, ex.value) if ex.value_repr is None else repr(want) == ex.value_repr
        except ValueError:
            ok = got_text.strip() == example.output.strip()
        if ok:
            base.verdict, base.message = "passed", "returned the expected value"
        else:
            base.verdict, base.message = "wrong_answer", f"returned {_short(got_text, 200)}, expected {example.output}"
            base.diff = _diff(example.output, got_text)
        return base
    same, how = compare_output(example.output, ex.stdout)
    if same:
        base.verdict, base.message = "passed", "output matches" + (f" ({how})" if how else "")
    else:
        base.verdict, base.message = "wrong_answer", "output differs from the expected output"
        base.diff = _diff(example.output, ex.stdout)
    return base


def check_program(program: str | None, examples: Sequence[Example], sandbox: Sandbox) -> CheckReport:
    """Run ``program`` on each example (stopping after a time/memory/output limit or a blocked
    action: the rest are marked skipped)."""
    if program is None:
        return CheckReport(False, note="the answer has no Python code block")
    report = CheckReport(True, isolation=sandbox.isolation.to_dict())
    if not examples:
        report.note = "no examples found in the problem, and no tests given"
        return report
    stop: TestResult | None = None
    for example in list(examples)[:MAX_TESTS]:
        if stop is not None:
            report.results.append(TestResult(example.name, "skipped", f"not run: {stop.name} ended with "
                                             f"{stop.verdict.replace('_', ' ')}", input=_short(example.input),
                                             expected=_short(example.output), source=example.source))
            continue
        call = {"function": None, "kwargs": dict(example.call.get("kwargs") or {})} if example.call else None
        stdin = example.input if example.input.endswith("\n") or not example.input else example.input + "\n"
        result = _judge(example, sandbox.run(program, stdin="" if call else stdin, call=call))
        report.results.append(result)
        if result.verdict in {o.value for o in _FATAL}:
            stop = result
    if len(examples) > MAX_TESTS:
        report.note = f"only the first {MAX_TESTS} of {len(examples)} tests were run"
    return report


def code_tally(reports: Mapping[int, CheckReport | None], finish: Mapping[int, str | None], total: int) -> Consensus:
    """The vote of k programs: how many pass every example. ``finish[i]`` None = still running;
    ``reports[i]`` None = not checked yet."""
    out = Consensus(kind="code", answer=None, votes=0, samples=total, groups=[])
    by_score: dict[tuple[int, int], Group] = {}
    for index in range(total):
        reason = finish.get(index)
        report = reports.get(index)
        if reason is None or (report is None and reason not in NOT_VOTES and reason != FinishReason.LENGTH.value):
            out.pending.append(index)
            continue
        if reason in NOT_VOTES:
            out.failed.append(index)
            continue
        if reason == FinishReason.LENGTH.value:
            out.cut_off.append(index)
            continue
        assert report is not None
        if not report.program_found:
            out.no_answer.append(index)
            continue
        key = (report.passed, report.total)
        if key not in by_score:
            label = (f"passes all {report.total} examples" if report.total and report.passed == report.total
                     else f"passes {report.passed} of {report.total} examples" if report.total
                     else "not tested (no examples)")
            by_score[key] = Group(answer=label, votes=0, indexes=[], method="text")
        by_score[key].votes += 1
        by_score[key].indexes.append(index)
        out.examples = max(out.examples or 0, report.total)
    out.groups = sorted(by_score.values(), key=lambda g: (-_score(g.answer, by_score), g.indexes[0]))
    passing = [g for (p, t), g in by_score.items() if t and p == t]
    if passing:
        best = passing[0]
        out.answer, out.votes, out.best_index = best.answer, best.votes, best.indexes[0]
    elif out.groups:
        out.best_index = out.groups[0].indexes[0]
    out.equivalence = "tests"
    return out


def _score(label: str, by_score: Mapping[tuple[int, int], Group]) -> float:
    for (p, t), g in by_score.items():
        if g.answer == label:
            return p / t if t else -1.0
    return -1.0
