"""Answers you can trust: self-consistency voting and code run against the problem's examples.

- :mod:`.vote`: the final ``\\boxed{}`` answer of each sample, grouped by mathematical
  equivalence (math-verify, in a bounded worker process: :mod:`.judge`), the majority and the
  samples that did not vote (no answer, cut off, failed, still running).
- :mod:`.code`: the final Python program of an answer, the examples stated in a problem
  (AtCoder/Codeforces "Sample Input/Output", LeetCode "Example 1: Input: … Output: …") and the
  verdict of the program on each, run by :mod:`.sandbox` (own process, temporary folder, no
  network, CPU/memory/output/process limits, wall-clock timeout, bubblewrap when present).

No UI here: the page, the API and the evaluation runner (bench/eval.py) all use these.
"""
from .code import CheckReport, Example, TestResult, check_program, code_tally, extract_program, parse_examples
from .judge import MathJudge, normalise, shared_judge
from .sandbox import Execution, Isolation, Limits, Outcome, Sandbox, SandboxUnavailable
from .vote import Consensus, Group, SampleAnswer, boxed_answers, tally

__all__ = [
    "CheckReport", "Consensus", "Example", "Execution", "Group", "Isolation", "Limits", "MathJudge", "Outcome",
    "SampleAnswer", "Sandbox", "SandboxUnavailable", "TestResult", "boxed_answers", "check_program", "code_tally",
    "extract_program", "normalise", "parse_examples", "shared_judge", "tally",
]
