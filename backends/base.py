"""The Backend interface every engine implements (transformers, llama.cpp, …)."""
from __future__ import annotations

import abc
from collections.abc import Callable, Iterator

from .types import MAX_SAMPLES, BackendError, BackendInfo, GenerationRequest, LoadProgress, RequestError, StreamChunk

ProgressCallback = Callable[[LoadProgress], None]


class ServiceUnavailable(BackendError):
    """The engine cannot serve right now but will again without a restart (a remote engine whose
    upstream does not answer): the server answers 503 with Retry-After instead of failing."""


class Backend(abc.ABC):
    """One loaded model.

    Contract:
    - ``load`` is idempotent and may take minutes; it reports progress through the callback and
      raises :class:`~backends.types.BackendError` with a fix-it message on bad input.
    - ``check`` refuses a request that cannot run, before it is queued anywhere;
    - ``stream`` yields :class:`StreamChunk` objects; each sample's last one carries ``usage``. Closing the
      iterator early (``GeneratorExit``) cancels the generation, as does ``cancel(request_id)``;
      either way the decoding loop stops within one step and nothing keeps running.
    - ``stream`` is safe to call from several threads; a backend serialises or batches as it can.
    """

    name: str = "base"

    @abc.abstractmethod
    def load(self, progress: ProgressCallback | None = None) -> None: ...

    @property
    @abc.abstractmethod
    def loaded(self) -> bool: ...

    def check(self, request: GenerationRequest) -> int | None:
        """Refuse a request that cannot run (RequestError: empty, too long, bad ``n``) before it
        waits in any line. Returns the prompt's length in tokens when the engine knows it."""
        if not request.messages:
            raise RequestError("The request has no messages; send at least one user message.")
        if not 1 <= request.n <= MAX_SAMPLES:
            raise RequestError(f"n = {request.n}: ask for 1 to {MAX_SAMPLES} samples.")
        return None

    @abc.abstractmethod
    def stream(self, request: GenerationRequest) -> Iterator[StreamChunk]:
        """The reply as chunks; a request of n samples interleaves them (``chunk.index``) and
        each sample's last chunk carries its usage."""

    @abc.abstractmethod
    def cancel(self, request_id: str) -> bool:
        """Stop a running or queued request. Returns False if it is unknown or already done."""

    @abc.abstractmethod
    def info(self) -> BackendInfo: ...

    @property
    def capacity(self) -> int:
        """Sequences the engine decodes at once once loaded (the server admits exactly this many)."""
        return 1

    def unavailable(self) -> str | None:
        """Why the loaded engine cannot serve right now (an unreachable upstream), or None.

        Cheap and non-blocking (the server asks on every /health and request); an engine that can
        lose its means after loading keeps the answer fresh itself."""
        return None

    def close(self) -> None:
        """Free the model's memory. The backend may be loaded again afterwards."""
