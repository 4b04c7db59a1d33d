"""Turning chat histories (page or API) into the backend's messages, and small text checks."""
from __future__ import annotations

import re
import unicodedata

from backends import ChatMessage

_THINK_BLOCK = re.compile(r"<think>.*?(</think>|$)", re.DOTALL)


def strip_thinking(text: str) -> str:
    """Previous answers go back into the prompt without their reasoning (as the model was trained)."""
    return _THINK_BLOCK.sub("", text).strip()


def build_messages(system: str, turns: list[tuple[str, str]], question: str) -> tuple[ChatMessage, ...]:
    """``system`` empty = no system message, so the chat template supplies the model's default."""
    out: list[ChatMessage] = []
    if system.strip():
        out.append(ChatMessage("system", system.strip()))
    for user, answer in turns:
        out.append(ChatMessage("user", user))
        out.append(ChatMessage("assistant", strip_thinking(answer)))
    out.append(ChatMessage("user", question))
    return tuple(out)


def cjk_share(text: str) -> float:
    """Share of CJK characters among the letters of ``text`` (0.0 when there are none)."""
    letters = [c for c in text if c.isalpha()]
    if not letters:
        return 0.0
    cjk = sum(1 for c in letters if unicodedata.name(c, "").startswith(("CJK", "HIRAGANA", "KATAKANA", "HANGUL")))
    return cjk / len(letters)


def mostly_chinese(text: str) -> bool:
    return cjk_share(text) >= 0.5
