"""Evaluation runner: k samples per problem, pass@1, cons@k (majority vote) and more.

    python -m bench.eval --problems FILE.jsonl --samples K --out DIR [--base-url URL | in-process flags]

``FILE`` is JSON Lines (or Parquet: VibeThinker's own evaluation sets ship as parquet) of maths
problems ``{"id", "problem", "answer"}`` or code problems ``{"id", "problem", "tests": [{"input",
"output"}]}``. Every problem is asked ``K`` times (one request with ``n = K``) either from a running
OpenAI-compatible server (``--base-url``: ours, vLLM, llama-server …) or in this process
(``--backend``/``--model``/``--set``, the app's own engines). Grading:

- maths: the final ``\\boxed{}`` of each sample against ``answer`` with math-verify
  (``verify(gold, answer)``, bounded in a worker process; normalised text when it cannot parse);
  cons@k grades the answer of the sample vote (:func:`backends.answers.tally`);
- code: the final Python program of each sample on every test, in the sandbox
  (:mod:`backends.answers.sandbox`, limits from the manifest's ``solve`` section); a sample is right
  when it passes all tests; cons@k grades the majority behaviour: samples are grouped by their
  outputs on the tests' inputs and the largest group's program is graded (a vote that does not
  peek at the expected outputs).

Results go to ``DIR/results.jsonl`` (one line per sample, written a problem at a time), so a rerun
skips the problems already there (resume); ``DIR/summary.json`` and ``DIR/summary.md`` are
computed from all of ``results.jsonl``: ``pass_at_1`` (mean share of right samples),
``cons_at_k``, ``pass_at_k`` (any sample right), ``truncated_fraction`` (samples stopped at the
length limit), mean reasoning and answer tokens, wall time and tokens per second.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from backends.answers import Limits, MathJudge, SampleAnswer, Sandbox, check_program, extract_program, normalise, tally
from backends.answers.code import Example, examples_from_tests
from backends.reasoning import extract_boxed

PROBLEM_FIELDS = ("problem", "question", "prompt")
ANSWER_FIELDS = ("answer", "gold", "ground_truth", "expected_answer", "final_answer")
TESTS_FIELDS = ("tests", "test_cases", "input_output")
ID_FIELDS = ("id", "problem_id", "question_id", "task_id", "idx", "unique_id")


class ProblemFileError(ValueError):
    """A problem file that cannot be read; the message names the file and the line (or row)."""


@dataclass(frozen=True)
class Problem:
    id: str
    problem: str
    answer: str | None = None  # maths
    tests: tuple[Example, ...] = ()  # code
    system: str | None = None  # this problem's system prompt (else --system)

    @property
    def kind(self) -> str:
        return "code" if self.tests else "math"


# -- reading problems -----------------------------------------------------------------------------

def _pick(row: dict, names: tuple[str, ...], chosen: str | None) -> Any:
    if chosen:
        return row.get(chosen)
    for name in names:
        if name in row and row[name] is not None:
            return row[name]
    return None


def _problem(row: Any, where: str, fields: dict[str, str | None], fallback_id: str) -> Problem:
    if not isinstance(row, dict):
        raise ProblemFileError(f"{where}: expected a JSON object, got {type(row).__name__}")
    text = _pick(row, PROBLEM_FIELDS, fields.get("problem"))
    if not isinstance(text, str) or not text.strip():
        raise ProblemFileError(f"{where}: needs a non-empty 'problem' (or {', '.join(PROBLEM_FIELDS[1:])}) string; "
                               f"it has {', '.join(sorted(map(str, row))) or 'no fields'}")
    pid = _pick(row, ID_FIELDS, fields.get("id"))
    pid = fallback_id if pid is None else str(pid)
    tests = _pick(row, TESTS_FIELDS, fields.get("tests"))
    answer = _pick(row, ANSWER_FIELDS, fields.get("answer"))
    system = row.get("system")
    if system is not None and not isinstance(system, str):
        raise ProblemFileError(f"{where}: 'system' must be a string")
    if tests is not None:
        if isinstance(tests, str):
            try:
                tests = json.loads(tests)
            except ValueError as exc:
                raise ProblemFileError(f"{where}: 'tests' is a string that is not JSON ({exc})") from None
        if isinstance(tests, dict) and "inputs" in tests and "outputs" in tests:  # APPS-style
            tests = [{"input": i, "output": o} for i, o in zip(tests["inputs"], tests["outputs"])]
        if not isinstance(tests, list) or not tests:
            raise ProblemFileError(f"{where}: 'tests' must be a non-empty list of {{'input', 'output'}} objects")
        try:
            examples = tuple(examples_from_tests(tests, source="eval"))
        except ValueError as exc:
            raise ProblemFileError(f"{where}: {exc}") from None
        return Problem(pid, text, None, examples, system)
    if answer is None or not str(answer).strip():
        raise ProblemFileError(f"{where}: needs an 'answer' (maths) or 'tests' (code)")
    return Problem(pid, text, str(answer).strip(), (), system)


def load_problems(path: Path, fields: dict[str, str | None] | None = None) -> list[Problem]:
    """Problems of a ``.jsonl`` (blank lines allowed) or ``.parquet`` file; ids must be unique."""
    fields = fields or {}
    if not path.is_file():
        raise ProblemFileError(f"{path}: no such file")
    problems: list[Problem] = []
    if path.suffix.lower() in (".parquet", ".pq"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ProblemFileError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as exc:  # noqa: BLE001 - pyarrow's errors are many; the message is what matters
            raise ProblemFileError(f"{path}: not a readable parquet file ({exc})") from None
        for n, row in enumerate(rows, 1):
            problems.append(_problem(row, f"{path} row {n}", fields, fallback_id=str(n)))
    else:
        with open(path, encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError as exc:
                    raise ProblemFileError(f"{path} line {n}: not valid JSON ({exc})") from None
                problems.append(_problem(row, f"{path} line {n}", fields, fallback_id=f"line-{n}"))
    seen: set[str] = set()
    for p in problems:
        if p.id in seen:
            raise ProblemFileError(f"{path}: the id {p.id!r} appears twice; ids must be unique (resume relies on them)")
        seen.add(p.id)
    if not problems:
        raise ProblemFileError(f"{path}: no problems in it")
    return problems


# -- asking the model -----------------------------------------------------------------------------

@dataclass
class Sample:
    answer: str
    reasoning_tokens: int | None
    answer_tokens: int | None
    finish_reason: str  # stop | length | budget | loop | cancelled | error


# (problem text, k, system prompt or None = the default) -> k samples
Ask = Callable[[str, int, "str | None"], list[Sample]]


@dataclass
class Settings:
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    seed: int | None = None
    system: str = ""


def http_asker(base_url: str, model: str | None, settings: Settings, api_key: str = "",
               timeout_s: float = 3600.0) -> tuple[Ask, str]:
    """Ask an OpenAI-compatible server; a server that returns fewer than n choices is asked
    again for the rest (llama-server and others may ignore n)."""
    import httpx

    base = base_url.rstrip("/")
    if not base.endswith("/v1"):
        base += "/v1"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    client = httpx.Client(timeout=timeout_s, headers=headers)
    if model is None:
        try:
            r = client.get(base + "/models")
            r.raise_for_status()
            model = r.json()["data"][0]["id"]
        except Exception as exc:  # noqa: BLE001 - one clear message for every way this fails
            raise SystemExit(f"--base-url {base_url}: cannot list the models ({exc}); is the server running? "
                             "Pass --model-id NAME to skip this.") from None

    def ask(problem: str, k: int, system: str | None = None) -> list[Sample]:
        system = settings.system if system is None else system
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": problem}]
        out: list[Sample] = []
        while len(out) < k:
            body: dict[str, Any] = {"model": model, "messages": messages, "n": k - len(out)}
            for key, value in (("temperature", settings.temperature), ("top_p", settings.top_p),
                               ("max_tokens", settings.max_tokens)):
                if value is not None:
                    body[key] = value
            if settings.seed is not None:
                body["seed"] = settings.seed + len(out)
            r = client.post(base + "/chat/completions", json=body)
            if r.status_code != 200:
                raise RuntimeError(f"the server answered {r.status_code}: {r.text[:500]}")
            data = r.json()
            usage = data.get("usage") or {}
            choices = data.get("choices") or []
            if not choices:
                raise RuntimeError("the server answered no choices")
            total_reasoning = (usage.get("completion_tokens_details") or {}).get("reasoning_tokens")
            for choice in choices:
                extra = choice.get("vibethinker") or {}
                finish = extra.get("finish_reason") or choice.get("finish_reason") or "stop"
                reasoning = extra.get("reasoning_tokens")
                answer_tokens = extra.get("answer_tokens")
                if reasoning is None and total_reasoning is not None:  # another server: the mean
                    reasoning = round(total_reasoning / len(choices))
                out.append(Sample(choice.get("message", {}).get("content") or "", reasoning, answer_tokens, finish))
        return out[:k]

    return ask, f"{base} ({model})"


def local_asker(manifest_path: str | None, overrides: dict[str, Any], settings: Settings) -> tuple[Ask, str, Any]:
    """Load the app's own engine in this process (as ``python -m ui serve`` would)."""
    from backends import ChatMessage, GenerationRequest, create_backend, to_sampling_params
    from backends.config import load_config

    manifest = load_config(manifest_path, overrides=overrides).manifest
    backend = create_backend(manifest)
    print(f"[eval] loading {manifest.model.path} with {backend.name} …", file=sys.stderr)
    backend.load(lambda p: None)
    params = to_sampling_params(manifest.generation, temperature=settings.temperature, top_p=settings.top_p,
                                max_new_tokens=settings.max_tokens, seed=settings.seed)

    def ask(problem: str, k: int, system: str | None = None) -> list[Sample]:
        system = settings.system if system is None else system
        messages = ((ChatMessage("system", system),) if system else ()) + (ChatMessage("user", problem),)
        req = GenerationRequest(messages=messages, params=params, n=k)
        backend.check(req)
        answers = [""] * k
        finals: dict[int, Any] = {}
        for chunk in backend.stream(req):
            answers[chunk.index] += chunk.answer
            if chunk.usage is not None:
                finals[chunk.index] = chunk.usage
        return [Sample(answers[i], finals[i].reasoning_tokens if i in finals else None,
                       finals[i].answer_tokens if i in finals else None,
                       finals[i].finish_reason.value if i in finals else "cancelled") for i in range(k)]

    info = backend.info()
    return ask, f"{info.backend} · {info.model_path} · {info.device}", manifest


# -- grading --------------------------------------------------------------------------------------

def _same(judge: MathJudge, gold: str, answer: str | None) -> tuple[bool, str]:
    """(right, how) for one boxed answer against the reference."""
    if answer is None:
        return False, "no boxed answer"
    gold_text = extract_boxed(gold) or gold
    if normalise(gold_text) == normalise(answer):
        return True, "text"
    verdict = judge.equivalent(gold_text, answer)
    if verdict is None:
        return False, "math-verify undecided; text differs"
    return verdict, "math-verify"


def grade_math(problem: Problem, samples: list[Sample], judge: MathJudge) -> tuple[list[dict], dict]:
    records = []
    for i, s in enumerate(samples):
        boxed = extract_boxed(s.answer)
        right, how = _same(judge, problem.answer or "", boxed)
        records.append({"boxed": boxed, "correct": right, "graded_by": how})
    vote = tally([SampleAnswer(i, s.answer, s.finish_reason) for i, s in enumerate(samples)], judge, len(samples))
    right, _ = _same(judge, problem.answer or "", vote.answer)
    return records, {"consensus_answer": vote.answer, "consensus_votes": vote.votes, "consensus_correct": right}


def grade_code(problem: Problem, samples: list[Sample], sandbox: Sandbox) -> tuple[list[dict], dict]:
    records, behaviours = [], {}
    for i, s in enumerate(samples):
        report = check_program(extract_program(s.answer), problem.tests, sandbox)
        right = report.verdict == "passed"
        records.append({"program_found": report.program_found, "correct": right,
                        "passed_tests": report.passed, "tests": len(problem.tests),
                        "verdicts": [r.verdict for r in report.results]})
        if report.program_found and report.results:
            # What the program does on the inputs (not whether it matches): the vote's key.
            key = tuple((r.verdict if r.verdict not in ("passed", "wrong_answer") else "out", r.got.strip())
                        for r in report.results)
            behaviours.setdefault(key, []).append(i)
    if behaviours:
        winner = max(behaviours.values(), key=len)  # the first of equals: the earliest behaviour
        best = winner[0]
        return records, {"consensus_answer": f"sample {best}", "consensus_votes": len(winner),
                         "consensus_correct": records[best]["correct"]}
    return records, {"consensus_answer": None, "consensus_votes": 0, "consensus_correct": False}


# -- results, resume, summary ---------------------------------------------------------------------

def read_results(path: Path) -> list[dict]:
    """Every complete line of results.jsonl (a line cut by a crash is ignored)."""
    out = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and "id" in row:
                out.append(row)
    return out


def finished_ids(rows: list[dict], k: int) -> set[str]:
    counts: dict[str, set[int]] = {}
    for row in rows:
        if row.get("k") == k:
            counts.setdefault(str(row["id"]), set()).add(int(row.get("sample", -1)))
    return {pid for pid, got in counts.items() if len(got) >= k}


def summarise(rows: list[dict], k: int) -> dict[str, Any]:
    rows = [r for r in rows if r.get("k") == k]
    by_problem: dict[str, list[dict]] = {}
    for r in rows:
        by_problem.setdefault(str(r["id"]), []).append(r)
    n = len(by_problem)

    def mean(values: list[float]) -> float | None:
        return round(sum(values) / len(values), 4) if values else None

    per_problem_pass = [sum(bool(s["correct"]) for s in v) / len(v) for v in by_problem.values()]
    wall = sum(v[0].get("problem_time_s", 0.0) for v in by_problem.values())
    reasoning = [s["reasoning_tokens"] for s in rows if s.get("reasoning_tokens") is not None]
    answer = [s["answer_tokens"] for s in rows if s.get("answer_tokens") is not None]
    tokens = sum(reasoning) + sum(answer)
    return {
        "problems": n,
        "samples_per_problem": k,
        "samples": len(rows),
        "kinds": {kind: sum(1 for v in by_problem.values() if v[0].get("kind") == kind) for kind in ("math", "code")},
        "pass_at_1": mean(per_problem_pass),
        "cons_at_k": mean([1.0 if v[0].get("consensus_correct") else 0.0 for v in by_problem.values()]),
        "pass_at_k": mean([1.0 if any(s["correct"] for s in v) else 0.0 for v in by_problem.values()]),
        "truncated_fraction": mean([1.0 if s.get("finish_reason") == "length" else 0.0 for s in rows]),
        "mean_reasoning_tokens": mean(reasoning),
        "mean_answer_tokens": mean(answer),
        "wall_time_s": round(wall, 2),
        "tokens_per_s": round(tokens / wall, 2) if wall > 0 and tokens else None,
    }


def markdown_table(summary: dict[str, Any], source: str = "") -> str:
    k = summary["samples_per_problem"]
    fmt = lambda v: "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))  # noqa: E731
    rows = [("problems", summary["problems"]), ("samples per problem (k)", k), ("pass@1", summary["pass_at_1"]),
            (f"cons@{k}", summary["cons_at_k"]), (f"pass@{k}", summary["pass_at_k"]),
            ("truncated fraction", summary["truncated_fraction"]),
            ("mean reasoning tokens", summary["mean_reasoning_tokens"]),
            ("mean answer tokens", summary["mean_answer_tokens"]), ("wall time s", summary["wall_time_s"]),
            ("tokens/s", summary["tokens_per_s"])]
    head = f"Evaluation{f' of {source}' if source else ''}\n\n" if source else ""
    return head + "| metric | value |\n| --- | --- |\n" + "".join(f"| {a} | {fmt(b)} |\n" for a, b in rows)


def write_summary(out: Path, k: int, source: str) -> dict[str, Any]:
    summary = summarise(read_results(out / "results.jsonl"), k)
    summary["source"] = source
    (out / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / "summary.md").write_text(markdown_table(summary, source), encoding="utf-8")
    return summary


@dataclass
class Progress:
    right: float = 0.0
    graded: int = 0
    tokens: int = 0
    started: float = field(default_factory=time.monotonic)

    def postfix(self) -> dict[str, str]:
        elapsed = time.monotonic() - self.started
        acc = self.right / self.graded if self.graded else 0.0
        return {"acc": f"{acc:.3f}", "tok/s": f"{self.tokens / elapsed:.1f}" if elapsed > 0 else "-"}


def run(problems: list[Problem], k: int, out: Path, ask: Ask, source: str, judge: MathJudge,
        sandbox: Sandbox | None, show_progress: bool = True) -> dict[str, Any]:
    from tqdm import tqdm

    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    done = finished_ids(read_results(results), k)
    todo = [p for p in problems if p.id not in done]
    if done:
        print(f"[eval] resuming: {len(problems) - len(todo)} of {len(problems)} problems already in {results}",
              file=sys.stderr)
    progress = Progress()
    bar = tqdm(total=len(problems), initial=len(problems) - len(todo), unit="problem", disable=not show_progress,
               dynamic_ncols=True, desc="eval")
    try:
        for problem in todo:
            started = time.monotonic()
            samples = ask(problem.problem, k, problem.system)
            if problem.kind == "code":
                if sandbox is None:
                    raise RuntimeError("code problems need the sandbox")
                records, vote = grade_code(problem, samples, sandbox)
            else:
                records, vote = grade_math(problem, samples, judge)
            elapsed = time.monotonic() - started
            lines = []
            for i, (s, rec) in enumerate(zip(samples, records)):
                lines.append(json.dumps({"id": problem.id, "kind": problem.kind, "sample": i, "k": k, **rec,
                                         "finish_reason": s.finish_reason, "reasoning_tokens": s.reasoning_tokens,
                                         "answer_tokens": s.answer_tokens, "problem_time_s": round(elapsed, 3),
                                         **vote, "answer": s.answer}, ensure_ascii=False))
                progress.right += bool(rec["correct"])
                progress.graded += 1
                progress.tokens += (s.reasoning_tokens or 0) + (s.answer_tokens or 0)
            # A problem at a time, flushed: a crash loses at most the problem being asked.
            with open(results, "a", encoding="utf-8") as fh:
                fh.write("\n".join(lines) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            bar.update(1)
            bar.set_postfix(progress.postfix())
    finally:
        bar.close()
    return write_summary(out, k, source)


# -- command line ---------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--problems", required=True, type=Path, help="JSONL (or .parquet) of problems")
    p.add_argument("--samples", "-k", type=int, default=1, help="samples per problem (1–16 per request)")
    p.add_argument("--out", required=True, type=Path, help="folder for results.jsonl, summary.json, summary.md")
    p.add_argument("--limit", type=int, help="only the first N problems")
    src = p.add_argument_group("where the answers come from (default: in this process)")
    src.add_argument("--base-url", help="an OpenAI-compatible server, e.g. http://127.0.0.1:8080")
    src.add_argument("--model-id", help="the model name to send (default: the server's first)")
    src.add_argument("--api-key", default=os.environ.get("VT_API_KEY", ""), help="bearer key (default $VT_API_KEY)")
    src.add_argument("--manifest", help="in-process: manifest.yaml to read")
    src.add_argument("--backend", help="in-process: engine (transformers, llamacpp, …)")
    src.add_argument("--model", help="in-process: model folder or .gguf")
    src.add_argument("--set", action="append", default=[], dest="sets", metavar="KEY=VALUE",
                     help="in-process: any manifest key (repeatable), e.g. --set llamacpp.parallel=4")
    gen = p.add_argument_group("sampling (default: the server's / manifest's)")
    gen.add_argument("--temperature", type=float, help="VibeThinker's own evaluation: 1.0 (maths), 0.6 (code)")
    gen.add_argument("--top-p", type=float)
    gen.add_argument("--max-tokens", type=int, help="VibeThinker's own evaluation: 40960")
    gen.add_argument("--seed", type=int, help="sample i of a problem uses seed + i")
    gen.add_argument("--system", default="", help="system prompt (default none: the model's own maths prompt)")
    fields = p.add_argument_group("column names (default: found by their usual names)")
    for name in ("id", "problem", "answer", "tests"):
        fields.add_argument(f"--{name}-field")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if not 1 <= args.samples <= 16:
        print("--samples must be between 1 and 16 (the server's n)", file=sys.stderr)
        return 2
    try:
        problems = load_problems(args.problems, {n: getattr(args, f"{n}_field") for n in ("id", "problem", "answer",
                                                                                           "tests")})
    except ProblemFileError as exc:
        print(f"[eval] {exc}", file=sys.stderr)
        return 2
    if args.limit:
        problems = problems[: args.limit]
    settings = Settings(args.temperature, args.top_p, args.max_tokens, args.seed, args.system)
    from backends.config import load_config

    if args.base_url:
        if args.backend or args.model or args.sets:
            print("[eval] --base-url asks a server: --backend/--model/--set are for the in-process mode",
                  file=sys.stderr)
            return 2
        ask, source = http_asker(args.base_url, args.model_id, settings, args.api_key)
        manifest = load_config(args.manifest).manifest
    else:
        overrides: dict[str, Any] = {"backend": args.backend, "model.path": args.model}
        for item in args.sets:
            key, sep, value = item.partition("=")
            if not sep:
                print(f"[eval] --set {item!r}: expected KEY=VALUE", file=sys.stderr)
                return 2
            overrides[key.strip()] = value
        ask, source, manifest = local_asker(args.manifest, overrides, settings)
    judge = MathJudge(manifest.solve.math_timeout_s)
    sandbox = None
    if any(p.kind == "code" for p in problems):
        sandbox = Sandbox(Limits.from_settings(manifest.solve), mode=manifest.solve.sandbox,
                          parallel=manifest.solve.parallel_runs)
        print(f"[eval] code runs in: {sandbox.isolation.summary}", file=sys.stderr)
    try:
        summary = run(problems, args.samples, args.out, ask, source, judge, sandbox, not args.no_progress)
    finally:
        judge.close()
    print(markdown_table(summary, source))
    print(f"[eval] {args.out / 'summary.json'}, {args.out / 'results.jsonl'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
