"""Voting and code checks for the page and the API: one judge and one sandbox per server.

Thin glue over :mod:`backends.answers` with the manifest's ``solve`` section: whether code may run
at all (``solve.run_code``, off by default), its limits and isolation, math-verify's time bound.
"""
from __future__ import annotations

import threading
from collections.abc import Sequence

from backends import Manifest
from backends.answers import (
    CheckReport,
    Consensus,
    Example,
    SampleAnswer,
    Sandbox,
    check_program,
    code_tally,
    extract_program,
    parse_examples,
    shared_judge,
    tally,
)

__all__ = ["Trust", "trust_for"]


class Trust:
    def __init__(self, manifest: Manifest) -> None:
        self.settings = manifest.solve
        self.judge = shared_judge(self.settings.math_timeout_s)
        self._sandbox: Sandbox | None = None
        self._lock = threading.Lock()

    @property
    def run_code(self) -> bool:
        return self.settings.run_code

    def sandbox(self) -> Sandbox:
        """The server's sandbox (its isolation is probed on first use; SandboxUnavailable when
        ``solve.sandbox: bubblewrap`` and bwrap does not work here)."""
        with self._lock:
            if self._sandbox is None:
                self._sandbox = Sandbox.from_settings(self.settings)
        self._sandbox.isolation  # noqa: B018 - probe now: a refusal must come before any generation
        return self._sandbox

    def warm(self) -> None:
        self.judge.warm()

    def examples(self, problem: str, extra: Sequence[Example] = ()) -> list[Example]:
        return (parse_examples(problem) + list(extra))[: self.settings.max_tests]

    def check(self, answer: str, examples: Sequence[Example]) -> CheckReport:
        return check_program(extract_program(answer), examples, self.sandbox())

    def vote(self, samples: Sequence[SampleAnswer], total: int) -> Consensus:
        return tally(samples, self.judge, total)

    @staticmethod
    def code_vote(reports: dict[int, CheckReport | None], finish: dict[int, str | None], total: int) -> Consensus:
        return code_tally(reports, finish, total)


_cache: dict[int, Trust] = {}
_cache_lock = threading.Lock()


def trust_for(manifest: Manifest) -> Trust:
    """The one Trust of this manifest (the page and the API of a server share it)."""
    with _cache_lock:
        trust = _cache.get(id(manifest))
        if trust is None or trust.settings is not manifest.solve:
            trust = _cache[id(manifest)] = Trust(manifest)
        return trust
