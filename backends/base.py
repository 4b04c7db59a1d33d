"""The Backend interface every engine implements (transformers, llama.cpp, …)."""
from __future__ import annotations

import abc
from collections.abc import Callable, Iterator

from .types import BackendInfo, GenerationRequest, LoadProgress, StreamChunk

ProgressCallback = Callable[[LoadProgress], None]


class Backend(abc.ABC):
    """One loaded model.

    Contract:
    - ``load`` is idempotent and may take minutes; it reports progress through the callback and
      raises :class:`~backends.types.BackendError` with a fix-it message on bad input.
    - ``stream`` yields :class:`StreamChunk` objects; the last one carries ``usage``. Closing the
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

    @abc.abstractmethod
    def stream(self, request: GenerationRequest) -> Iterator[StreamChunk]: ...

    @abc.abstractmethod
    def cancel(self, request_id: str) -> bool:
        """Stop a running or queued request. Returns False if it is unknown or already done."""

    @abc.abstractmethod
    def info(self) -> BackendInfo: ...

    @property
    def capacity(self) -> int:
        """Sequences the engine decodes at once once loaded (the server admits exactly this many)."""
        return 1

    def close(self) -> None:
        """Free the model's memory. The backend may be loaded again afterwards."""
