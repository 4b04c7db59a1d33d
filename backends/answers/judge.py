"""Are two answers the same number, set or expression? math-verify in a worker process, bounded.

math-verify (``parse``/``verify``) turns LaTeX into SymPy and compares; some inputs make SymPy
think for minutes or eat memory (``2^{2^{2^{100}}}``). Its own timeouts use SIGALRM, which fails
off the main thread, where the server's page and API handlers run. So the work goes to one
long-lived worker process (:mod:`._judge_worker`, timeouts off there) and every request has a
deadline here: a late reply kills the worker (a new one starts on the next request) and the
answer is "unknown", which callers turn into a normalised text comparison and say so. Answers
longer than :data:`MAX_CHARS` are never parsed (a real final answer is short; a long one is text).
A process rather than a thread because a thread stuck in SymPy cannot be stopped.
"""
from __future__ import annotations

import json
import logging
import os
import re
import select
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

WORKER = Path(__file__).with_name("_judge_worker.py")
MAX_CHARS = 400
# The worker imports SymPy and the LaTeX grammar once (about a second).
START_TIMEOUT_S = 60.0

_SPACES = re.compile(r"\s+")
_TEXT_CMD = re.compile(r"\\(?:text|textbf|mathrm|mathbf|operatorname|mbox)\s*\{([^{}]*)\}")


def normalise(answer: str) -> str:
    """The text form answers are compared in when math-verify cannot tell: no spacing, no
    ``\\left``/``\\right``, ``\\dfrac`` = ``\\frac``, ``\\text{…}`` unwrapped, no trailing full stop,
    lower case."""
    s = answer.strip().strip("$").strip()
    s = _TEXT_CMD.sub(r"\1", s)
    for old, new in (("\\left", ""), ("\\right", ""), ("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"),
                     ("\\!", ""), ("\\,", ""), ("\\;", ""), ("\\:", ""), ("\\ ", ""), ("~", ""),
                     ("^{\\circ}", ""), ("^\\circ", ""), ("\\%", ""), ("%", "")):
        s = s.replace(old, new)
    s = _SPACES.sub("", s)
    return s.rstrip(".").lower()


@dataclass(frozen=True)
class Parsed:
    parsed: bool  # math-verify understood it
    why: str = ""  # when not: "cannot parse", "timed out", "too long", "math-verify unavailable"


class MathJudge:
    """Thread-safe; one request at a time goes to the worker."""

    def __init__(self, timeout_s: float = 5.0, python: str | None = None) -> None:
        self.timeout_s = timeout_s
        self.python = python or sys.executable
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._unavailable = ""
        self._buffer = b""

    # -- the worker -----------------------------------------------------------------------------
    def _start(self) -> subprocess.Popen[bytes] | None:
        if self._unavailable:
            return None
        if self._proc is not None and self._proc.poll() is None:
            return self._proc
        try:
            # -I: the worker imports only math-verify and the standard library; it never needs
            # this app's packages or the caller's environment.
            self._proc = subprocess.Popen([self.python, "-I", str(WORKER)], stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, bufsize=0)
        except OSError as exc:
            self._unavailable = f"could not start the math-verify worker: {exc}"
            return None
        self._buffer = b""
        return self._proc

    def _stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(10)

    def close(self) -> None:
        with self._lock:
            self._stop()

    def _read_line(self, deadline: float) -> dict | None:
        """One JSON line from the worker before ``deadline``; None when late (worker stopped)."""
        proc = self._proc
        assert proc is not None and proc.stdout is not None
        fd = proc.stdout.fileno()
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                self._stop()
                return None
            data = os.read(fd, 65536)
            if not data:
                raise BrokenPipeError("the math-verify worker exited")
            self._buffer += data
        line, _, self._buffer = self._buffer.partition(b"\n")
        try:
            reply = json.loads(line)
        except ValueError:
            return {"error": "unreadable reply"}
        return reply if isinstance(reply, dict) else {"error": "unreadable reply"}

    def _ready(self) -> bool:
        """Start the worker if needed and wait until it has imported math-verify."""
        if self._proc is not None and self._proc.poll() is None:
            return True
        if self._start() is None:
            return False
        try:
            reply = self._read_line(time.monotonic() + START_TIMEOUT_S)
        except OSError:
            reply = None
        if reply is None or not reply.get("ready"):
            self._stop()
            self._check_installed()
            if not self._unavailable:
                log.warning("the math-verify worker did not start within %.0f s", START_TIMEOUT_S)
            return False
        return True

    def warm(self) -> None:
        """Start the worker now (in the background), so the first vote does not wait for its imports."""
        def start() -> None:
            with self._lock:
                self._ready()

        threading.Thread(target=start, name="math-verify-warm", daemon=True).start()

    def _ask(self, request: dict, timeout_s: float) -> dict | None:
        """The worker's reply, or None when it was late or died (the worker is then replaced)."""
        if not self._ready():
            return None
        proc = self._proc
        assert proc is not None and proc.stdin is not None
        try:
            proc.stdin.write((json.dumps(request) + "\n").encode())
            proc.stdin.flush()
            reply = self._read_line(time.monotonic() + timeout_s)
        except (OSError, ValueError) as exc:
            log.warning("math-verify worker failed (%s); restarting it", exc)
            self._stop()
            return None
        if reply is None:
            log.warning("math-verify took longer than %.1f s on %r; restarted its worker", timeout_s, request)
            return None
        return None if "error" in reply else reply

    def _check_installed(self) -> None:
        probe = subprocess.run([self.python, "-I", "-c", "import math_verify"], capture_output=True)
        if probe.returncode != 0:
            self._unavailable = ("math-verify is not installed (pip install 'math-verify[antlr4_13_2]'); "
                                 "answers are compared as text")

    # -- the questions --------------------------------------------------------------------------
    @property
    def unavailable(self) -> str:
        """Why math-verify cannot be used at all ("" when it can)."""
        return self._unavailable

    def parse(self, answer: str) -> Parsed:
        if len(answer) > MAX_CHARS:
            return Parsed(False, f"longer than {MAX_CHARS} characters")
        with self._lock:
            reply = self._ask({"op": "parse", "text": answer}, self.timeout_s)
        if self._unavailable:
            return Parsed(False, self._unavailable)
        if reply is None:
            return Parsed(False, f"math-verify gave no answer within {self.timeout_s:g} s")
        return Parsed(bool(reply.get("parsed")), "" if reply.get("parsed") else "math-verify cannot parse it")

    def equivalent(self, gold: str, answer: str) -> bool | None:
        """``verify(gold, answer)`` (order matters: the reference, or a group's first answer,
        comes first). None when math-verify could not decide in time."""
        if len(gold) > MAX_CHARS or len(answer) > MAX_CHARS:
            return None
        with self._lock:
            reply = self._ask({"op": "verify", "gold": gold, "answer": answer}, self.timeout_s)
        return None if reply is None else bool(reply.get("equal"))


_shared: MathJudge | None = None
_shared_lock = threading.Lock()


def shared_judge(timeout_s: float = 5.0) -> MathJudge:
    """The process's one judge (one worker for the page, the API and the evaluation)."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = MathJudge(timeout_s)
        else:
            _shared.timeout_s = timeout_s
        return _shared
