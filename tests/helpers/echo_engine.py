"""A third engine in ONE file, registered from outside the app (``VT_ENGINE_MODULES``).

It needs no model: it "thinks" the question back and answers with its length in a box. Tests use
it to prove that an engine added this way is offered by ``--backend``, chosen by it, reported by
``doctor`` and served by the page and the API — with nothing else in the app touched.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Iterator

from backends.base import Backend, ProgressCallback
from backends.registry import EngineSpec
from backends.types import BackendInfo, FinishReason, GenerationRequest, LoadProgress, StreamChunk, Usage


class EchoBackend(Backend):
    name = "echo"

    def __init__(self, manifest) -> None:
        self.manifest = manifest
        self._loaded = False
        self._cancelled: set[str] = set()
        self._lock = threading.Lock()

    def load(self, progress: ProgressCallback | None = None) -> None:
        self._loaded = True
        if progress is not None:
            progress(LoadProgress(1.0, "echo ready"))

    @property
    def loaded(self) -> bool:
        return self._loaded

    def stream(self, request: GenerationRequest) -> Iterator[StreamChunk]:
        question = next(m.content for m in reversed(request.messages) if m.role == "user")
        started = time.perf_counter()
        for index in range(request.n):
            yield StreamChunk(reasoning=f"echo: {question}", index=index)
            with self._lock:
                if request.request_id in self._cancelled:
                    return
            answer = f"The answer is \\boxed{{{len(question)}}}."
            words = len(question.split())
            usage = Usage(prompt_tokens=words, reasoning_tokens=words + 1, answer_tokens=5,
                          total_time_s=time.perf_counter() - started, finish_reason=FinishReason.STOP)
            yield StreamChunk(answer=answer, usage=usage, boxed_answer=str(len(question)), index=index)

    def cancel(self, request_id: str) -> bool:
        with self._lock:
            self._cancelled.add(request_id)
        return True

    def info(self) -> BackendInfo:
        return BackendInfo(backend="echo", model_id=self.manifest.model.id, model_path="(none)", device="none",
                           dtype="text", context_length=100_000, reason="the test engine")


ENGINE = EngineSpec(
    name="echo",
    label="echo",
    summary="repeats the question (a test engine registered through VT_ENGINE_MODULES)",
    create=EchoBackend,
    needs_local_model=False,
)
