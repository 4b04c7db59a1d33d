"""A third engine in ONE file, registered from outside the app (``VT_ENGINE_MODULES``).

It needs no model: it "thinks" the question back and answers with its length in a box. Tests use
it to prove that an engine added this way is offered by ``--backend``, chosen by it, reported by
``doctor`` and served by the page and the API — with nothing else in the app touched.

The reliability tests drive it with the question: ``SLOW <seconds> ...`` thinks that long (one
word every 50 ms, stopping at once when cancelled), ``FAIL ...`` raises after its first chunk.
It decodes ``server.concurrency`` sequences at once.
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

    @property
    def capacity(self) -> int:
        return max(1, self.manifest.server.concurrency)

    def _stopped(self, request: GenerationRequest) -> bool:
        with self._lock:
            return request.request_id in self._cancelled

    def stream(self, request: GenerationRequest) -> Iterator[StreamChunk]:
        question = next(m.content for m in reversed(request.messages) if m.role == "user")
        started = time.perf_counter()
        words = question.split()
        slow = float(words[1]) if len(words) > 1 and words[0] == "SLOW" and words[1].isdigit() else 0.0
        for index in range(request.n):
            yield StreamChunk(reasoning=f"echo: {question}", index=index)
            if words and words[0] == "FAIL":
                raise RuntimeError("the echo engine failed on purpose")
            deadline = time.perf_counter() + slow
            while time.perf_counter() < deadline and not self._stopped(request):
                time.sleep(0.05)
                yield StreamChunk(reasoning=" .", index=index)
            if self._stopped(request):
                return
            answer = f"The answer is \\boxed{{{len(question)}}}."
            count = len(words)
            usage = Usage(prompt_tokens=count, reasoning_tokens=count + 1, answer_tokens=5,
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
