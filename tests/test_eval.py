"""bench/eval.py: the numbers on a 5-problem file, resume, malformed files, parquet, code grading."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from backends.answers import Limits, MathJudge, Sandbox
from backends.answers.code import examples_from_tests
from bench.eval import (
    Problem,
    ProblemFileError,
    Sample,
    grade_code,
    load_problems,
    main,
    markdown_table,
    summarise,
)
from bench.synthetic import ADD_PROMPT

ROOT = Path(__file__).resolve().parents[1]

# Greedy answers of the tiny model: 4, 8, 7, 9 and 2. The fourth reference is written 9.0 (math-verify
# makes it equal); the fifth is wrong on purpose.
FIVE = [
    {"id": "add", "problem": ADD_PROMPT, "answer": "4"},
    {"id": "three-five", "problem": "What is 3+5?", "answer": "8"},
    {"id": "six-one", "problem": "What is 6+1?", "answer": "\\boxed{7}"},
    {"id": "five-four", "problem": "What is 5+4?", "answer": "9.0"},
    {"id": "one-one", "problem": "计算 1+1 等于几？", "answer": "3"},
]


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.mark.slow
def test_numbers_on_five_problems_and_resume(tiny_model_dir, tmp_path, capsys):
    problems = _write(tmp_path / "five.jsonl", FIVE)
    out = tmp_path / "run"
    args = ["--problems", str(problems), "--samples", "2", "--out", str(out), "--backend", "transformers",
            "--model", str(tiny_model_dir), "--temperature", "0", "--max-tokens", "200", "--no-progress"]
    assert main(args + ["--limit", "3"]) == 0  # an interrupted run: three problems done
    assert len((out / "results.jsonl").read_text().splitlines()) == 6
    capsys.readouterr()
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "resuming: 3 of 5 problems already" in err
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 10 and sorted({r["id"] for r in rows}) == sorted(p["id"] for p in FIVE)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["problems"] == 5 and summary["samples"] == 10 and summary["samples_per_problem"] == 2
    assert summary["pass_at_1"] == 0.8 and summary["cons_at_k"] == 0.8 and summary["pass_at_k"] == 0.8
    assert summary["truncated_fraction"] == 0.0
    assert summary["mean_reasoning_tokens"] > 0 and summary["mean_answer_tokens"] > 0
    assert summary["wall_time_s"] > 0 and summary["tokens_per_s"] > 0
    assert {r["id"]: r["correct"] for r in rows} == {"add": True, "three-five": True, "six-one": True,
                                                       "five-four": True, "one-one": False}
    assert "| pass@1 | 0.800 |" in (out / "summary.md").read_text()
    assert main(args) == 0  # nothing left to do: the numbers stay
    assert json.loads((out / "summary.json").read_text())["pass_at_1"] == 0.8
    assert len((out / "results.jsonl").read_text().splitlines()) == 10


def test_a_malformed_line_is_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"id": "a", "problem": "1+1?", "answer": "2"}\n\n{"id": "b", "problem": oops}\n')
    with pytest.raises(ProblemFileError, match=r"bad.jsonl line 3: not valid JSON"):
        load_problems(path)
    path.write_text('{"id": "a", "problem": "1+1?"}\n')
    with pytest.raises(ProblemFileError, match=r"line 1: needs an 'answer' \(maths\) or 'tests' \(code\)"):
        load_problems(path)
    path.write_text('{"id": "a", "problem": "1?", "answer": "1"}\n{"id": "a", "problem": "2?", "answer": "2"}\n')
    with pytest.raises(ProblemFileError, match="appears twice"):
        load_problems(path)
    path.write_text('{"id": "a", "problem": "x", "tests": [{"input": "1"}]}\n')
    with pytest.raises(ProblemFileError, match="line 1: test 1 must be an object"):
        load_problems(path)
    assert main(["--problems", str(path), "--out", str(tmp_path / "o")]) == 2


def test_parquet_reads_like_jsonl(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [{**r, "tests": None} for r in FIVE] + [
        {"id": "code", "problem": "echo", "answer": None, "tests": json.dumps([{"input": "1\n", "output": "1\n"}])}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    problems = load_problems(tmp_path / "p.parquet")
    assert [p.id for p in problems] == [r["id"] for r in rows]
    assert problems[3].answer == "9.0" and problems[-1].kind == "code" and problems[-1].tests[0].output == "1\n"
    assert load_problems(ROOT / "bench" / "data" / "sample_problems.jsonl")  # the shipped sample reads


def test_code_grading_and_the_behaviour_vote():
    tests = tuple(examples_from_tests([{"input": "1 2\n", "output": "3\n"}, {"input": "5 5\n", "output": "10\n"}],
                                      source="eval"))
    problem = Problem("sum", "Print A+B.", None, tests)
    good = "```python\na, b = map(int, input().split())\nprint(a + b)\n```"
    wrong = "```python\na, b = map(int, input().split())\nprint(a * b)\n```"
    samples = [Sample(wrong, 5, 5, "stop"), Sample(good, 5, 5, "stop"), Sample(good, 5, 5, "stop"),
               Sample("no code", 5, 5, "stop")]
    box = Sandbox(Limits(cpu_s=1, wall_s=5))
    records, vote = grade_code(problem, samples, box)
    assert [r["correct"] for r in records] == [False, True, True, False]
    assert records[3]["program_found"] is False and records[0]["verdicts"] == ["wrong_answer", "wrong_answer"]
    assert vote == {"consensus_answer": "sample 1", "consensus_votes": 2, "consensus_correct": True}
    rows = [{"id": "sum", "kind": "code", "sample": i, "k": 4, **r, "finish_reason": "stop", "reasoning_tokens": 5,
             "answer_tokens": 5, "problem_time_s": 1.0, **vote} for i, r in enumerate(records)]
    summary = summarise(rows, 4)
    assert summary["pass_at_1"] == 0.5 and summary["cons_at_k"] == 1.0 and summary["kinds"] == {"math": 0, "code": 1}
    assert "cons@4" in markdown_table(summary)


def test_math_grading_gold_first():
    from bench.eval import grade_math

    judge = MathJudge()
    try:
        problem = Problem("half", "?", "\\frac{1}{2}")
        samples = [Sample("\\boxed{0.5}", 1, 1, "stop"), Sample("\\boxed{1/2}", 1, 1, "stop"),
                   Sample("\\boxed{2}", 1, 1, "stop"), Sample("none", 1, 1, "stop")]
        records, vote = grade_math(problem, samples, judge)
    finally:
        judge.close()
    assert [r["correct"] for r in records] == [True, True, False, False]
    assert vote["consensus_votes"] == 2 and vote["consensus_correct"] is True
