"""Which engine runs the model: ``backend: <engine>`` or ``backend: auto``.

An explicit choice is honoured as is: if it cannot run, loading fails with a fix-it message and
nothing falls back silently. ``auto`` asks every registered engine for its bid
(:func:`backends.registry.ranked`) and loads the best one that can run here; an engine that turns
out unusable (its library missing, no disk room to prepare its model: :class:`EngineUnavailable`)
hands over to the next bid, with a warning in the log and in ``BackendInfo.reason``. It is resolved
inside :meth:`AutoBackend.load`, not in :func:`create_backend`, because preparing the model may
take minutes (an HF → GGUF conversion) and the server must already answer ``/health`` meanwhile.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from typing import Any

from . import registry
from .base import Backend, ProgressCallback
from .config import Manifest
from .models.checks import cuda_available, inspect_model_folder
from .registry import AutoContext, AutoRank, EngineSpec
from .types import BackendError, BackendInfo, EngineUnavailable, GenerationRequest, StreamChunk

log = logging.getLogger(__name__)


def create_backend(manifest: Manifest) -> Backend:
    """Build (not load) the backend the manifest selects. Cheap: nothing heavy is imported."""
    if manifest.backend == "auto":
        return AutoBackend(manifest)
    return registry.get(manifest.backend).create(manifest)


def auto_context(manifest: Manifest, gpu: bool | None = None) -> AutoContext:
    """The facts ``auto`` ranks engines by. ``gpu`` None = ask torch (the launcher passes what
    nvidia-smi says, before torch is installed)."""
    folder = inspect_model_folder(manifest.model.path, manifest.model.gguf_file)
    return AutoContext(manifest=manifest, folder=folder, gpu=cuda_available() if gpu is None else gpu)


def auto_candidates(manifest: Manifest, gpu: bool | None = None) -> list[tuple[EngineSpec, AutoRank]]:
    return registry.ranked(auto_context(manifest, gpu))


def _short(text: str, limit: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _no_engine(ctx: AutoContext, bids: list[tuple[EngineSpec, AutoRank]],
               skipped: list[tuple[str, str]]) -> BackendError:
    where = ctx.folder.path if ctx.folder is not None else ctx.manifest.model.path
    if not bids:
        return BackendError(f"backend: auto — no engine can run the model in {where}; choose one with --backend.")
    why = bids[0][1].why
    return BackendError(f"backend: auto — {why}, but no engine can run it here: "
                        + "; ".join(f"{label}: {problem}" for label, problem in skipped))


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

    def load(self, progress: ProgressCallback | None = None) -> None:
        if self._inner is not None:
            self._inner.load(progress)
            return
        ctx = auto_context(self.manifest)
        bids = registry.ranked(ctx)
        skipped: list[tuple[str, str]] = []
        for number, (spec, bid) in enumerate(bids):
            following = bids[number + 1][0].label if number + 1 < len(bids) else None
            problem = spec.problem()
            engine: Backend | None = None
            if problem is None:
                engine = spec.create(self.manifest)
                try:
                    engine.load(progress)
                except EngineUnavailable as exc:
                    problem = str(exc)
                    engine.close()
            if problem is not None:
                note = f"{spec.label} is unavailable ({_short(problem, 300)})"
                skipped.append((spec.label, problem))
                self.warnings.append(note)
                log.warning("backend: auto — %s%s", note,
                            f"; using {following} instead / 改用 {following}" if following else "")
                continue
            assert engine is not None
            info = engine.info()
            prefix = "; ".join([bids[0][1].why] + [f"{label} unavailable ({_short(problem, 100)})"
                                                   for label, problem in skipped])
            self._inner = engine
            self.reason = f"{prefix} → {spec.label} {info.dtype} on {info.device}" + (
                " (slower)" if skipped else "")
            return
        raise _no_engine(ctx, bids, skipped)

    @property
    def loaded(self) -> bool:
        return self._inner is not None and self._inner.loaded

    def _require(self) -> Backend:
        if self._inner is None:
            raise BackendError("The model is not loaded yet: call load() first (or wait until /health is ready).")
        return self._inner

    def check(self, request: GenerationRequest) -> int | None:
        return self._require().check(request)

    def stream(self, request: GenerationRequest) -> Iterator[StreamChunk]:
        return self._require().stream(request)

    def cancel(self, request_id: str) -> bool:
        return self._inner.cancel(request_id) if self._inner is not None else False

    @property
    def capacity(self) -> int:
        return self._inner.capacity if self._inner is not None else 1

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


def _plan_of(spec: EngineSpec, ctx: AutoContext | None) -> str:
    if spec.plan is None or ctx is None or ctx.folder is None:
        return spec.summary
    try:
        return spec.plan(ctx)
    except BackendError as exc:
        return f"not usable: {exc}"


def describe_choice(manifest: Manifest, gpu: bool | None = None) -> str:
    """What ``create_backend(manifest).load()`` would run and why, without loading (for doctor)."""
    if manifest.backend != "auto":
        spec = registry.get(manifest.backend)
        ctx = None
        if spec.needs_local_model:
            try:
                ctx = auto_context(manifest, gpu)
            except BackendError as exc:
                return f"backend: {spec.name} — the model folder is not usable: {exc}"
        problem = spec.problem()
        if problem is not None:
            return f"backend: {spec.name} (as configured) — will fail: {problem}"
        return f"backend: {spec.name} (as configured) → {spec.label}: {_plan_of(spec, ctx)}"
    try:
        ctx = auto_context(manifest, gpu)
    except BackendError as exc:
        return f"backend: auto — the model folder is not usable: {exc}"
    notes: list[tuple[str, str]] = []
    bids = registry.ranked(ctx)
    for spec, bid in bids:
        problem = spec.problem()
        if problem is not None:
            notes.append((spec.label, problem))
            continue
        head = "; ".join([bids[0][1].why] + [f"{label} unavailable ({_short(p)})" for label, p in notes])
        return f"backend: auto — {head} → {spec.label}: {_plan_of(spec, ctx)}"
    return f"will fail: {_no_engine(ctx, bids, notes)}"
