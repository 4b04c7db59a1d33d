"""Typed objects at the backend boundary.

The UI, the OpenAI-compatible API and the benchmark depend only on these objects and on
:class:`backends.base.Backend`; nothing above this layer touches torch or llama.cpp.
"""
from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass, field
from typing import Literal

Role = Literal["system", "user", "assistant"]


@dataclass(frozen=True)
class ChatMessage:
    role: Role
    content: str


@dataclass(frozen=True)
class SamplingParams:
    """Per-request generation settings. Defaults follow the VibeThinker model card."""

    temperature: float = 0.6  # 0 means greedy
    top_p: float = 0.95
    top_k: int = 0  # 0 means off (the model card says no top-k)
    max_new_tokens: int = 40960  # capped by the context window at run time
    seed: int | None = None
    # Max reasoning tokens inside <think>…</think>; None = unlimited. When reached the backend
    # closes the thinking itself and the model still writes an answer.
    thinking_budget: int | None = None
    loop_guard: bool = True


MAX_SAMPLES = 16


@dataclass(frozen=True)
class GenerationRequest:
    messages: tuple[ChatMessage, ...]
    params: SamplingParams = field(default_factory=SamplingParams)
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    # Samples of the same prompt (OpenAI ``n``). Sample i is seeded ``params.seed + i`` when a
    # seed is set; its chunks carry ``index = i``. The prompt is evaluated once where the engine
    # can share it (see the engines).
    n: int = 1


class FinishReason(str, enum.Enum):
    STOP = "stop"  # the model ended its reply
    LENGTH = "length"  # max_new_tokens or the context window
    BUDGET = "budget"  # thinking budget reached: thinking closed, answer written
    LOOP = "loop"  # repetition detected: thinking closed (or generation stopped)
    CANCELLED = "cancelled"
    ERROR = "error"


@dataclass
class Usage:
    prompt_tokens: int = 0
    reasoning_tokens: int = 0
    answer_tokens: int = 0
    time_to_first_token_s: float | None = None
    decode_tokens_per_s: float | None = None
    total_time_s: float = 0.0
    finish_reason: FinishReason = FinishReason.STOP
    # Human-readable detail for budget/loop/error stops ("repeated a 12-token span 6 times").
    detail: str = ""

    @property
    def completion_tokens(self) -> int:
        return self.reasoning_tokens + self.answer_tokens


@dataclass
class StreamChunk:
    """One piece of a streamed reply. Text fields hold only the new text since the last chunk."""

    reasoning: str = ""
    answer: str = ""
    # Set on each sample's last chunk only.
    usage: Usage | None = None
    boxed_answer: str | None = None
    index: int = 0  # which sample (0 … n-1)

    @property
    def final(self) -> bool:
        return self.usage is not None


@dataclass(frozen=True)
class LoadProgress:
    fraction: float  # 0.0 … 1.0
    message: str


@dataclass(frozen=True)
class BackendInfo:
    backend: str  # "transformers" | "llamacpp"
    model_id: str
    model_path: str
    device: str  # "cuda:0 (NVIDIA T4)", "cpu (2 threads)"
    dtype: str  # "float16", "Q8_0", …
    context_length: int
    # Why this backend/device was chosen (backend: auto), shown in stats, doctor and /v1/models.
    reason: str = ""
    extra: dict = field(default_factory=dict)


class BackendError(RuntimeError):
    """A problem the user can fix. The message names the file or setting and the fix."""


class EngineUnavailable(BackendError):
    """This engine cannot run here (its library is missing, no disk room to prepare its model):
    ``backend: auto`` tries the next engine; an explicit choice fails with this message."""


class RequestError(BackendError):
    """The request itself cannot be served as sent (empty, too long): the client must change it."""

    code = "invalid_request"


class ContextLengthExceeded(RequestError):
    code = "context_length_exceeded"
