"""What the launcher prints, and how a failed check stops it. Standard library only (it runs on
the platform's bare Python, before anything is installed).

Every message a user can meet is bilingual (zh first, then en) and names the fix; a failed check
raises :class:`Stop`, which ``commands.main`` prints as is and turns into the exit code.
"""
from __future__ import annotations

from pathlib import Path
from typing import NoReturn


def say(msg: str = "") -> None:
    print(msg, flush=True)


def ok(msg: str) -> None:
    say(f"  ✔ {msg}")


def warn(msg: str) -> None:
    say(f"  ⚠ {msg}")


def note(msg: str) -> None:
    say(f"  · {msg}")


class Stop(Exception):
    """A check failed: ``message`` is printed as is (bilingual, with the fix); exit with ``code``."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def fail(message: str, code: int = 1) -> NoReturn:
    raise Stop(message, code)


def tail(path: Path, lines: int = 20) -> str:
    """The last ``lines`` of a log, indented for a message."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join("    | " + line for line in text[-lines:])
