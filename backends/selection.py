"""Which engine runs the model: ``backend: transformers | llamacpp | auto``.

An explicit choice is honoured as is: if it cannot run, loading fails with a fix-it message and
nothing falls back silently. ``auto`` (issue 7) is resolved inside :meth:`AutoBackend.load`,
not here, because its CPU path may convert the HF checkpoint to GGUF first (minutes) and the
server must already be answering ``/health`` with "converting…" while that happens.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator

from .base import Backend, ProgressCallback
from .manifest import Manifest
from .types import BackendError, BackendInfo, GenerationRequest, StreamChunk

log = logging.getLogger(__name__)


def create_backend(manifest: Manifest) -> Backend:
    """Build (not load) the backend the manifest selects."""
    if manifest.backend == "transformers":
        return _transformers(manifest)
    if manifest.backend == "llamacpp":
        return _llamacpp(manifest)
    return AutoBackend(manifest)


def _transformers(manifest: Manifest) -> Backend:
    from .transformers_backend import TransformersBackend

    return TransformersBackend(manifest)


def _llamacpp(manifest: Manifest, **kwargs) -> Backend:
    from .llamacpp_backend import LlamaCppBackend

    return LlamaCppBackend(manifest, **kwargs)


class AutoBackend(Backend):
    """Placeholder until issue 7 lands: resolves to an explicit engine on load."""

    name = "auto"

    def __init__(self, manifest: Manifest) -> None:
        self.manifest = manifest
        self._inner: Backend | None = None
        self.reason = ""

    def load(self, progress: ProgressCallback | None = None) -> None:
        if self._inner is None:
            self._inner = _transformers(self.manifest)
            self.reason = "backend: auto"
        self._inner.load(progress)

    @property
    def loaded(self) -> bool:
        return self._inner is not None and self._inner.loaded

    def _require(self) -> Backend:
        if self._inner is None:
            raise BackendError("The model is not loaded yet: call load() first.")
        return self._inner

    def stream(self, request: GenerationRequest) -> Iterator[StreamChunk]:
        return self._require().stream(request)

    def cancel(self, request_id: str) -> bool:
        return self._inner.cancel(request_id) if self._inner is not None else False

    def info(self) -> BackendInfo:
        return dataclasses.replace(self._require().info(), reason=self.reason)

    def close(self) -> None:
        if self._inner is not None:
            self._inner.close()
