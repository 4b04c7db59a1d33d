"""Which engine runs the model: ``backend: transformers | llamacpp | auto``.

An explicit choice is honoured as is: if it cannot run, loading fails with a fix-it message and
nothing falls back silently. ``auto`` (issue 7) is resolved inside :meth:`AutoBackend.load`,
not in :func:`create_backend`, because its CPU path may first convert the HF checkpoint to GGUF
(minutes) and the server must already be answering ``/health`` with "converting…" meanwhile:

- a usable CUDA GPU (and an HF checkpoint) → transformers (float16);
- otherwise → llama.cpp on the CPU, converting the checkpoint to ``model.gguf_quant`` once;
- llama.cpp impossible (llama-cpp-python missing or broken, no disk room for the GGUF) →
  transformers, with a warning in the log and in ``BackendInfo.reason``.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from typing import Any

from .base import Backend, ProgressCallback
from .models.checks import ModelFolder, cuda_available, inspect_model_folder
from .config import Manifest
from .types import BackendError, BackendInfo, GenerationRequest, StreamChunk

log = logging.getLogger(__name__)


def create_backend(manifest: Manifest) -> Backend:
    """Build (not load) the backend the manifest selects. Cheap: nothing heavy is imported."""
    if manifest.backend == "transformers":
        return _transformers(manifest)
    if manifest.backend == "llamacpp":
        return _llamacpp(manifest)
    return AutoBackend(manifest)


def _transformers(manifest: Manifest) -> Backend:
    from .engines.transformers import TransformersBackend

    return TransformersBackend(manifest)


def _llamacpp(manifest: Manifest, **kwargs: Any) -> Backend:
    from .engines.llamacpp import LlamaCppBackend

    return LlamaCppBackend(manifest, **kwargs)


def llama_cpp_problem() -> str | None:
    """Why llama-cpp-python cannot be used here, or None when it can."""
    from .engines.llamacpp import import_llama_cpp

    try:
        import_llama_cpp()
    except BackendError as exc:
        return str(exc)
    return None


def _gpu_usable(manifest: Manifest) -> bool:
    return manifest.transformers.device != "cpu" and cuda_available()


def _short(text: str, limit: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


class AutoBackend(Backend):
    """``backend: auto``: picks and loads an engine in :meth:`load`, then delegates to it."""

    def __init__(self, manifest: Manifest) -> None:
        self.manifest = manifest
        self._inner: Backend | None = None
        self.reason = ""
        self.warnings: list[str] = []

    @property
    def name(self) -> str:  # type: ignore[override]
        return self._inner.name if self._inner is not None else "auto"

    @property
    def inner(self) -> Backend | None:
        """The engine chosen by :meth:`load` (None before)."""
        return self._inner

    def _fallback(self, why: str) -> Backend:
        self.warnings.append(why)
        log.warning("backend: auto — %s; using transformers on the CPU instead (slower). / 改用 transformers (CPU)", why)
        return _transformers(self.manifest)

    def load(self, progress: ProgressCallback | None = None) -> None:
        if self._inner is not None:
            self._inner.load(progress)
            return
        folder = inspect_model_folder(self.manifest.model.path, self.manifest.model.gguf_file)
        gguf_only = folder.kind == "gguf" or bool(self.manifest.model.gguf_file)
        if not gguf_only and _gpu_usable(self.manifest):
            inner = _transformers(self.manifest)
            inner.load(progress)
            info = inner.info()
            self._inner, self.reason = inner, f"CUDA GPU found → transformers {info.dtype} on {info.device}"
            return
        why_cpu = "the model folder holds a GGUF" if gguf_only else "no CUDA GPU found"
        problem = llama_cpp_problem()
        if problem is not None:
            if gguf_only:
                raise BackendError(f"backend: auto — {why_cpu}, which only llama.cpp can run, but: {problem}")
            inner = self._fallback(f"llama.cpp is unavailable ({_short(problem)})")
            inner.load(progress)
            self._inner = inner
            self.reason = f"{why_cpu}; llama.cpp unavailable → transformers on {inner.info().device} (slower)"
            return
        from .models.gguf_source import NotEnoughDisk

        llama = _llamacpp(self.manifest)
        try:
            llama.load(progress)
        except NotEnoughDisk as exc:
            inner = self._fallback(f"no room to convert the checkpoint to GGUF ({_short(str(exc), 300)})")
            inner.load(progress)
            self._inner = inner
            self.reason = f"{why_cpu}; no disk room for the GGUF → transformers on {inner.info().device} (slower)"
            return
        info = llama.info()
        self._inner = llama
        self.reason = f"{why_cpu} → llama.cpp {info.dtype} on {info.device}"

    @property
    def loaded(self) -> bool:
        return self._inner is not None and self._inner.loaded

    def _require(self) -> Backend:
        if self._inner is None:
            raise BackendError("The model is not loaded yet: call load() first (or wait until /health is ready).")
        return self._inner

    def stream(self, request: GenerationRequest) -> Iterator[StreamChunk]:
        return self._require().stream(request)

    def cancel(self, request_id: str) -> bool:
        return self._inner.cancel(request_id) if self._inner is not None else False

    def info(self) -> BackendInfo:
        if self._inner is None:
            return BackendInfo(
                backend="auto", model_id=self.manifest.model.id, model_path=self.manifest.model.path,
                device="not loaded yet", dtype="", context_length=0, reason="chosen when the model loads",
            )
        info = self._require().info()
        reason = self.reason + (f" ({info.reason})" if info.reason else "")
        return dataclasses.replace(info, reason=reason, extra={**info.extra, "warnings": list(self.warnings)})

    def close(self) -> None:
        if self._inner is not None:
            self._inner.close()

    def __getattr__(self, attr: str) -> Any:
        # Engine extras (pending_requests, cancel_all, …) once an engine is chosen.
        inner = self.__dict__.get("_inner")
        if inner is None or attr.startswith("__"):
            raise AttributeError(attr)
        return getattr(inner, attr)


def describe_choice(manifest: Manifest) -> str:
    """What ``create_backend(manifest).load()`` would run and why, without loading (for doctor)."""
    try:
        folder = inspect_model_folder(manifest.model.path, manifest.model.gguf_file)
    except BackendError as exc:
        return f"backend: {manifest.backend} — the model folder is not usable: {exc}"
    if manifest.backend == "transformers":
        where = "CUDA" if _gpu_usable(manifest) else "the CPU"
        return f"backend: transformers (as configured) → transformers on {where}"
    gguf_only = folder.kind == "gguf" or bool(manifest.model.gguf_file)
    if manifest.backend == "llamacpp":
        problem = llama_cpp_problem()
        if problem is not None:
            return f"backend: llamacpp (as configured) — will fail: {problem}"
        return f"backend: llamacpp (as configured) → llama.cpp: {_gguf_plan_text(manifest, folder)}"
    if not gguf_only and _gpu_usable(manifest):
        return "backend: auto → transformers float16 (a CUDA GPU is usable)"
    why_cpu = "the model folder holds a GGUF" if gguf_only else "no CUDA GPU found"
    problem = llama_cpp_problem()
    if problem is not None:
        if gguf_only:
            return f"backend: auto — {why_cpu} but llama.cpp is unavailable, so loading will fail: {problem}"
        return f"backend: auto — {why_cpu}; llama.cpp unavailable ({_short(problem)}) → transformers on the CPU"
    return f"backend: auto — {why_cpu} → llama.cpp: {_gguf_plan_text(manifest, folder)}"


def _gguf_plan_text(manifest: Manifest, folder: ModelFolder) -> str:
    from .models.gguf_source import NotEnoughDisk, plan_gguf

    try:
        return plan_gguf(manifest, folder).why
    except NotEnoughDisk as exc:
        return f"cannot convert: {exc}"
    except BackendError as exc:
        return f"not usable: {exc}"
