"""backends.answers without a model: voting, equivalence, examples in problems, the sandbox."""
from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import pytest

from backends.answers import (
    Limits,
    MathJudge,
    Outcome,
    SampleAnswer,
    Sandbox,
    SandboxUnavailable,
    boxed_answers,
    check_program,
    code_tally,
    extract_program,
    normalise,
    parse_examples,
    tally,
)
from backends.answers.code import compare_output, parse_test_text, examples_from_tests


@pytest.fixture(scope="module")
def judge():
    j = MathJudge(timeout_s=5)
    yield j
    j.close()


def S(index: int, answer: str, finish: str | None = "stop") -> SampleAnswer:
    return SampleAnswer(index, answer, finish)


# -- voting ---------------------------------------------------------------------------------------

def test_equivalent_forms_vote_together(judge):
    c = tally([S(0, r"The answer is \boxed{\frac{1}{2}}."), S(1, r"\boxed{0.5}"), S(2, r"so \boxed{1/2}"),
               S(3, r"\boxed{2}"), S(4, r"\boxed{\dfrac{1}{2}}")], judge)
    assert (c.answer, c.votes, c.samples) == (r"\frac{1}{2}", 4, 5)
    assert [(g.answer, g.votes, g.indexes) for g in c.groups] == [(r"\frac{1}{2}", 4, [0, 1, 2, 4]), ("2", 1, [3])]
    assert c.groups[0].method == "math-verify" and c.best_index == 0 and not c.tie and c.done
    d = c.to_dict()
    assert d["answer"] == r"\frac{1}{2}" and d["votes"] == 4 and d["groups"][0]["indexes"] == [0, 1, 2, 4]


def test_verify_order_gold_first(judge):
    assert judge.equivalent(r"\frac{1}{2}", "0.5") is True
    assert judge.equivalent("0.5", "1/2") is True
    assert judge.equivalent("391", "392") is False


def test_samples_that_do_not_vote_are_counted_apart(judge):
    c = tally([S(0, r"\boxed{391}"), S(1, "I could not finish."), S(2, r"\boxed{3", "length"),
               S(3, r"\boxed{391}", "length"), S(4, "", "cancelled"), S(5, "partial", None), S(6, r"\boxed{391}")],
              judge, total=8)
    assert (c.answer, c.votes, c.samples) == ("391", 2, 8)
    assert c.no_answer == [1] and c.cut_off == [2, 3] and c.failed == [4] and c.pending == [5, 7]
    assert not c.done


def test_two_boxed_answers_the_last_counts_and_says_so(judge):
    assert boxed_answers(r"first \boxed{3}, no: \boxed{\frac{1}{2}} and \fbox{x}") == ["3", r"\frac{1}{2}", "x"]
    c = tally([S(0, r"\boxed{3} no wait, \boxed{5}"), S(1, r"\boxed{5}")], judge)
    assert (c.answer, c.votes) == ("5", 2)
    assert any("sample 0" in n and "last one counts" in n for n in c.notes)


def test_unparsable_latex_falls_back_to_text_and_says_so(judge):
    c = tally([S(0, r"\boxed{\frac{1}{}}"), S(1, r"\boxed{ \frac{1}{} }"), S(2, r"\boxed{\frac{1}{2}}")], judge)
    assert [(g.answer, g.votes, g.method) for g in c.groups] == [(r"\frac{1}{}", 2, "text"),
                                                                  (r"\frac{1}{2}", 1, "text")]
    assert any("cannot parse" in n and "compared as text" in n for n in c.notes)


def test_ties_go_to_the_first_answer_and_say_so(judge):
    c = tally([S(0, r"\boxed{7}"), S(1, r"\boxed{8}")], judge)
    assert c.answer == "7" and c.tie and any("tie" in n for n in c.notes)


def test_without_math_verify_text_comparison_only():
    c = tally([S(0, r"\boxed{\frac{1}{2}}"), S(1, r"\boxed{0.5}"), S(2, r"\boxed{\dfrac{1}{2}}")], None)
    assert c.equivalence == "text" and [g.votes for g in c.groups] == [2, 1]
    broken = MathJudge(python="/nonexistent/python")
    c = tally([S(0, r"\boxed{1}")], broken)
    assert c.equivalence == "text" and "could not start" in " ".join(c.notes)


def test_a_slow_comparison_is_cut_off_and_the_worker_recovers():
    j = MathJudge(timeout_s=1)
    try:
        assert j.equivalent("(10^{7})!", "(10^{7}+1)!") is None  # SymPy would think for a minute
        assert j.equivalent(r"\frac{1}{2}", "0.5") is True  # a new worker answers
    finally:
        j.close()


def test_answers_compared_from_threads(judge):
    """math-verify's own SIGALRM timeouts would fail here: the work runs in the worker process."""
    results = []

    def vote() -> None:
        results.append(tally([S(0, r"\boxed{0.25}"), S(1, r"\boxed{\frac{1}{4}}")], judge).votes)

    threads = [threading.Thread(target=vote) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == [2, 2, 2]


def test_normalise():
    assert normalise(r" \left( 1, 2 \right) ") == "(1,2)"
    assert normalise(r"\text{Yes}.") == "yes"
    assert normalise(r"\dfrac{1}{2}") == normalise(r"\frac12".replace("12", "{1}{2}"))


# -- code problems --------------------------------------------------------------------------------

ATCODER = """Given N integers, print their sum.

Input
Input is given from Standard Input in the following format:
N
A_1 ... A_N

Output
Print the sum.

Sample Input 1

3
1 2 3

Sample Output 1

6

The sum of 1, 2 and 3 is 6.

Sample Input 2
```
2
10 20
```
Sample Output 2
```
30
```
"""

CODEFORCES = """Print a+b.

Input
The only line contains a and b.

Output
Print one number.

Examples
Input
1 2
Output
3
Input
5 5
Output
10

Note
Easy.
"""

LEETCODE = """Given nums and target, return the indices of the two numbers that add up to target.

Example 1:

Input: nums = [2,7,11,15], target = 9
Output: [0,1]
Explanation: nums[0] + nums[1] == 9.

Example 2:

Input: nums = [3,2,4], target = 6
Output: [1,2]
"""

SUM = "n = int(input())\nprint(sum(map(int, input().split())))\n"
TWO_SUM = """class Solution:
    def twoSum(self, nums, target):
        seen = {}
        for i, x in enumerate(nums):
            if target - x in seen:
                return [seen[target - x], i]
            seen[x] = i
"""


def test_examples_atcoder_codeforces_leetcode():
    assert [(e.name, e.input, e.output) for e in parse_examples(ATCODER)] == [
        ("Sample 1", "3\n1 2 3", "6"), ("Sample 2", "2\n10 20", "30")]
    assert [(e.input, e.output) for e in parse_examples(CODEFORCES)] == [("1 2", "3"), ("5 5", "10")]
    leet = parse_examples(LEETCODE)
    assert [(e.name, dict(e.call or {}), e.output) for e in leet] == [
        ("Example 1", {"kwargs": {"nums": [2, 7, 11, 15], "target": 9}}, "[0,1]"),
        ("Example 2", {"kwargs": {"nums": [3, 2, 4], "target": 6}}, "[1,2]")]
    assert parse_examples("What is 2+2?") == []


def test_program_extraction():
    answer = "Try:\n```python\nprint(1)\n```\nFinal:\n```python\nprint(2)\n```\n```cpp\nint main(){}\n```"
    assert extract_program(answer) == "print(2)\n"
    assert extract_program("```\n#include <cstdio>\nint main(){}\n```") is None
    assert extract_program("no code here") is None


def test_user_tests_and_output_comparison():
    tests = parse_test_text("1 2\n---\n3\n===\n4 5\n---\n9\n")
    assert [(t.input, t.output, t.source) for t in tests] == [("1 2", "3", "user"), ("4 5", "9", "user")]
    with pytest.raises(ValueError, match="---"):
        parse_test_text("1 2\n3")
    with pytest.raises(ValueError, match="test 1"):
        examples_from_tests([{"input": "1"}])
    assert compare_output("6\n", "6   \n\n") == (True, "")
    assert compare_output("0.333333", "0.3333333333")[0] is True
    assert compare_output("3", "3.0000001")[0] is False  # an integer answer must be written as one


@pytest.fixture(scope="module")
def sandbox():
    return Sandbox(Limits(cpu_s=1, wall_s=10, memory_mb=256, output_kb=64, max_processes=8))


def test_correct_and_wrong_programs(sandbox):
    good = check_program(SUM, parse_examples(ATCODER), sandbox)
    assert good.verdict == "passed" and good.passed == good.total == 2
    assert all(r.time_s > 0 for r in good.results)
    wrong = check_program("input()\nprint(7)\n", parse_examples(ATCODER), sandbox)
    assert wrong.verdict == "failed" and [r.verdict for r in wrong.results] == ["wrong_answer", "wrong_answer"]
    assert "-6\n+7" in wrong.results[0].diff
    leet = check_program(TWO_SUM, parse_examples(LEETCODE), sandbox)
    assert leet.verdict == "passed", [r.message for r in leet.results]
    crash = check_program("raise ValueError('no')", parse_examples(CODEFORCES), sandbox)
    assert crash.results[0].verdict == "runtime_error" and "ValueError: no" in crash.results[0].message
    syntax = check_program("def (", parse_examples(CODEFORCES), sandbox)
    assert [r.verdict for r in syntax.results] == ["compile_error", "skipped"]
    assert check_program(None, [], sandbox).verdict == "no_program"


def _modes() -> list[str]:
    return ["bubblewrap", "process"]


@pytest.fixture(scope="module", params=_modes())
def hostile_box(request):
    box = Sandbox(Limits(cpu_s=1, wall_s=3, memory_mb=256, output_kb=64, max_processes=8), mode=request.param)
    try:
        box.isolation
    except SandboxUnavailable as exc:
        pytest.skip(str(exc))
    return box


def _leftovers() -> list[str]:
    """Live processes of the sandbox's user ids (61000–61999)."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                status = Path(f"/proc/{name}/status").read_text()
            except OSError:
                continue
            uid = int(status.split("Uid:")[1].split()[0])
            state = status.split("State:")[1].split()[0]
            if 61000 <= uid < 62000 and state not in ("Z", "X"):
                found.append(name)
    return found


@pytest.mark.parametrize("name, source, verdict", [
    ("endless loop", "while True:\n    pass\n", "time_limit"),
    ("sleeper", "import time\ntime.sleep(60)\n", "time_limit"),
    ("memory hog", "x = []\nwhile True:\n    x.append(bytearray(10**6))\n", "memory_limit"),
    ("fork bomb", "import os\nwhile True:\n    os.fork()\n", "blocked"),
    ("fork bomb (ctypes)", "import ctypes\nlibc = ctypes.CDLL(None)\nwhile True:\n    libc.fork()\n", "time_limit"),
    ("write outside", "open('/tmp/vt-hostile-write.txt', 'w').write('x')\n", "blocked"),
    ("socket", "import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=1)\n", "blocked"),
    ("flood", "while True:\n    print('x' * 1000)\n", "output_limit"),
])
def test_hostile_programs_are_stopped(hostile_box, name, source, verdict):
    started = time.monotonic()
    ex = hostile_box.run(source)
    assert ex.outcome.value == verdict, (name, ex.message, ex.stderr)
    assert ex.message
    assert time.monotonic() - started < hostile_box.limits.wall_s + 10  # stopped, not left running
    assert not Path("/tmp/vt-hostile-write.txt").exists()
    if os.geteuid() == 0:
        assert _leftovers() == []  # a run's own user id has no process left


def test_no_network_even_around_the_audit_hook(hostile_box):
    """The kernel keeps the network away (bubblewrap or a network namespace), not only the hook."""
    if not hostile_box.isolation.network:
        pytest.skip("no network namespace on this machine")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.5)
    port = server.getsockname()[1]
    prog = ("import ctypes, struct\nlibc = ctypes.CDLL(None)\nfd = libc.socket(2, 1, 0)\n"
            f"addr = struct.pack('!HH4s8x', 2, {port}, bytes([127, 0, 0, 1]))\n"
            "addr = struct.pack('H', 2) + addr[2:]\n"
            "print('connect', libc.connect(fd, addr, len(addr)))\n")
    ex = hostile_box.run(prog)
    assert ex.outcome == Outcome.OK and "connect -1" in ex.stdout, (ex.message, ex.stdout, ex.stderr)
    with pytest.raises(TimeoutError):
        server.accept()
    server.close()


def test_isolation_is_reported(hostile_box):
    iso = hostile_box.isolation.to_dict()
    assert iso["kind"] == hostile_box.mode and iso["summary"] and iso["limits"]["cpu_s"] == 1


def test_code_vote_counts_passing_programs(sandbox):
    examples = parse_examples(ATCODER)
    reports = {0: check_program(SUM, examples, sandbox), 1: check_program("input()\nprint(6)", examples, sandbox),
               2: check_program(None, examples, sandbox), 3: check_program(SUM, examples, sandbox)}
    c = code_tally(reports, {0: "stop", 1: "stop", 2: "stop", 3: "stop", 4: "length"}, 5)
    assert (c.kind, c.votes, c.samples, c.best_index) == ("code", 2, 5, 0)
    assert c.answer == "passes all 2 examples"
    assert [(g.answer, g.indexes) for g in c.groups] == [("passes all 2 examples", [0, 3]),
                                                          ("passes 1 of 2 examples", [1])]
    assert c.no_answer == [2] and c.cut_off == [4]


def test_the_tiny_model_learns_the_page_code_prompt():
    from bench.synthetic import CODE_SYSTEM_PROMPT
    from ui.strings import CODE_SYSTEM_PROMPT as PAGE_PROMPT

    assert CODE_SYSTEM_PROMPT == PAGE_PROMPT


def test_a_python_under_tmp_is_bound_after_the_sandbox_tmp(monkeypatch):
    # A venv under /tmp (a clone in a temporary folder) must not be hidden by the sandbox's own
    # empty /tmp: its bind comes after the tmpfs (bubblewrap mounts in order).
    import sys

    from backends.answers.sandbox import Sandbox

    monkeypatch.setattr(sys, "prefix", "/tmp/vt-clone/.venv")
    args = Sandbox(mode="bubblewrap")._bwrap_args(Path("/tmp/ctl"))
    pairs = list(zip(args, args[1:]))
    assert pairs.index(("--tmpfs", "/tmp")) < pairs.index(("--ro-bind", "/tmp/vt-clone/.venv"))
