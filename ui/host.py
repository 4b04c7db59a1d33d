"""The loaded model as the server sees it: background loading, readiness, the shared fair line,
cancellation and draining. Both the page and the /v1 API generate only through ``ModelHost``.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

from backends import (
    Backend,
    BackendError,
    BackendInfo,
    FinishReason,
    GenerationRequest,
    LoadProgress,
    Manifest,
    RequestError,
    StreamChunk,
    Usage,
    create_backend,
)
from backends.base import ServiceUnavailable

from .limiter import FairLimiter, LimiterClosed, QueueFull, Ticket
from .metrics import Metrics

log = logging.getLogger("ui.host")

State = Literal["loading", "ready", "failed", "draining"]

__all__ = ["HostStatus", "ModelHost", "NotReady", "QueueFull", "Queued"]


class LoadCancelled(BackendError):
    """Raised from the progress callback to stop a load at shutdown."""


class NotReady(RuntimeError):
    """The model is loading, failed to load, or the server is shutting down (HTTP 503)."""


@dataclass(frozen=True)
class Queued:
    """Yielded by :meth:`ModelHost.generate` while the request waits: ``position`` 1 = next."""

    position: int


@dataclass(frozen=True)
class HostStatus:
    state: State
    fraction: float
    message: str
    error: str
    info: BackendInfo | None

    @property
    def ready(self) -> bool:
        return self.state == "ready"


class ModelHost:
    def __init__(
        self,
        manifest: Manifest,
        backend_factory: Callable[[Manifest], Backend] = create_backend,
        metrics: Metrics | None = None,
    ) -> None:
        self.manifest = manifest
        self._factory = backend_factory
        self.metrics = metrics or Metrics()
        # Resized to the engine's capacity once it has loaded (nothing is admitted before).
        self.limiter = FairLimiter(manifest.server.concurrency, manifest.server.max_queue)
        self._closing = threading.Event()
        self._lock = threading.Lock()
        self._state: State = "loading"
        self._progress = LoadProgress(0.0, "starting")
        self._error = ""
        self._info: BackendInfo | None = None
        self._backend: Backend | None = None
        self._thread: threading.Thread | None = None
        self.metrics.bind(
            waiting=lambda: self.limiter.waiting,
            running=lambda: self.limiter.running,
            ready=lambda: 1.0 if self._state == "ready" else 0.0,
        )

    # ---- loading -------------------------------------------------------------------------
    def start_loading(self) -> threading.Thread:
        """Load in the background so that the server answers (/health 503 "loading") at once."""
        self._thread = threading.Thread(target=self._load, name="model-loader", daemon=True)
        self._thread.start()
        return self._thread

    def _on_progress(self, progress: LoadProgress) -> None:
        if self._closing.is_set():
            # Shutdown while loading: the loader stops at its next progress report (a conversion
            # between two tensors), not after minutes of work nobody will use.
            raise LoadCancelled("the server is shutting down")
        with self._lock:
            self._progress = progress
        log.info("loading %3.0f%%: %s", progress.fraction * 100, progress.message)

    def _load(self) -> None:
        started = time.monotonic()
        try:
            backend = self._factory(self.manifest)
            with self._lock:
                self._backend = backend
            backend.load(self._on_progress)
            info = backend.info()
        except LoadCancelled:
            log.info("model loading stopped: the server is shutting down")
            self._fail("loading was stopped because the server is shutting down")
            return
        except BackendError as exc:
            self._fail(str(exc))
            return
        except Exception as exc:  # a bug or an unexpected library error: still show it, not a dead page
            log.exception("model loading crashed")
            self._fail(f"{type(exc).__name__}: {exc}")
            return
        if self._closing.is_set():  # finished loading after shutdown began: nothing will use it
            backend.close()
            return
        # The line admits exactly what the engine decodes at once: one queue, honest gauges.
        self.limiter.resize(max(1, backend.capacity))
        self.metrics.bind_engine(info.backend, str(info.extra.get("endpoint", "")),
                                 lambda: 0.0 if backend.unavailable() else 1.0)
        with self._lock:
            self._info = info
            self._progress = LoadProgress(1.0, "ready")
            if self._state == "loading":
                self._state = "ready"
        log.info(
            "model ready in %.1f s: %s on %s (%s, context %d, %d sequence(s) at once)%s",
            time.monotonic() - started, info.model_id, info.device, info.dtype, info.context_length,
            backend.capacity, f"; {info.reason}" if info.reason else "",
        )

    def _fail(self, message: str) -> None:
        with self._lock:
            self._error = message
            if self._state == "loading":
                self._state = "failed"
        log.error("model failed to load: %s", message)

    def wait_loaded(self, timeout: float | None = None) -> HostStatus:
        if self._thread is not None:
            self._thread.join(timeout)
        return self.status()

    def status(self) -> HostStatus:
        with self._lock:
            return HostStatus(self._state, self._progress.fraction, self._progress.message, self._error, self._info)

    def not_ready_reason(self) -> str:
        st = self.status()
        if st.state == "loading":
            return f"The model is still loading ({st.fraction:.0%}: {st.message}). Try again in a moment."
        if st.state == "failed":
            return f"The model failed to load: {st.error}"
        if st.state == "draining":
            return "The server is shutting down and starts no new generations."
        return ""

    def engine_problem(self) -> str:
        """Why the loaded engine cannot serve right now (a remote engine's upstream does not
        answer), or "": /health is 503 with it and requests are refused, until it clears."""
        with self._lock:
            backend = self._backend if self._state == "ready" else None
        return (backend.unavailable() or "") if backend is not None else ""

    # ---- generation ----------------------------------------------------------------------
    def generate(self, request: GenerationRequest, source: str) -> Iterator[Queued | StreamChunk]:
        """Admit ``request`` and return its stream: :class:`Queued` while it waits, then the
        backend's chunks (each sample's last one carries its usage).

        Raises at once, before anything waits or runs: NotReady (loading, failed, draining),
        RequestError (empty, too long, bad n) and QueueFull. Closing the returned iterator (a
        Stop button, a dropped client) cancels the backend's generation.
        """
        backend = self._require_ready(source)
        try:
            problem = backend.unavailable()
            if problem:
                raise ServiceUnavailable(problem)
            backend.check(request)
        except ServiceUnavailable as exc:
            self.metrics.errors.labels(kind="not_ready").inc()
            raise NotReady(str(exc)) from None
        except BackendError as exc:
            kind = "invalid_request" if isinstance(exc, RequestError) else "backend"
            self.metrics.errors.labels(kind=kind).inc()
            raise
        try:
            ticket = self.limiter.enter(weight=request.n)
        except QueueFull:
            self.metrics.errors.labels(kind="queue_full").inc()
            raise
        except LimiterClosed as exc:
            raise NotReady(str(exc)) from None
        return self._run(backend, request, ticket, source)

    def _run(self, backend: Backend, request: GenerationRequest, ticket: Ticket,
             source: str) -> Iterator[Queued | StreamChunk]:
        stream: Iterator[StreamChunk] | None = None
        finals: dict[int, Usage] = {}
        failure = ""
        started = time.monotonic()
        try:
            try:
                while not ticket.wait(0.5):
                    yield Queued(ticket.position() + 1)
            except LimiterClosed as exc:
                raise NotReady(str(exc)) from None
            log.info("%s request %s started (waited %.1f s, %d sample(s))", source, request.request_id,
                     time.monotonic() - started, request.n)
            stream = backend.stream(request)
            for chunk in stream:
                if chunk.usage is not None:
                    finals[chunk.index] = chunk.usage
                yield chunk
        except GeneratorExit:
            raise
        except ServiceUnavailable as exc:  # the engine went away before anything streamed: 503, retry
            failure = str(exc)
            raise NotReady(failure) from None
        except BackendError as exc:
            failure = str(exc)
            raise
        except Exception as exc:
            failure = f"{type(exc).__name__}: {exc}"
            log.exception("%s request %s failed", source, request.request_id)
            raise
        finally:
            if stream is not None and len(finals) < request.n:
                # Stopped early (Stop button, dropped client, error): make sure decoding stops.
                backend.cancel(request.request_id)
                close = getattr(stream, "close", None)
                if close is not None:
                    close()
            ticket.release()
            if stream is not None:
                self._record(request, source, finals, failure, time.monotonic() - started)

    def _record(self, request: GenerationRequest, source: str, finals: dict[int, Usage], failure: str,
                elapsed: float) -> None:
        if failure:
            self.metrics.errors.labels(kind="backend").inc()
        reason = FinishReason.ERROR if failure else FinishReason.CANCELLED
        for index in range(request.n):
            usage = finals.get(index) or Usage(finish_reason=reason, detail=failure, total_time_s=elapsed)
            # The prompt was evaluated once for all samples.
            self.metrics.record(source, usage, count_prompt=index == 0)
            log.info(
                "%s request %s%s finished: %s%s, prompt %d, reasoning %d, answer %d tokens, %s tok/s",
                source, request.request_id, f" sample {index}" if request.n > 1 else "",
                usage.finish_reason.value, f" ({usage.detail})" if usage.detail else "",
                usage.prompt_tokens, usage.reasoning_tokens, usage.answer_tokens,
                f"{usage.decode_tokens_per_s:.1f}" if usage.decode_tokens_per_s else "-",
            )

    def _require_ready(self, source: str) -> Backend:
        with self._lock:
            backend = self._backend if self._state == "ready" else None
        if backend is None:
            self.metrics.errors.labels(kind="not_ready").inc()
            raise NotReady(self.not_ready_reason())
        return backend

    def cancel(self, request_id: str) -> bool:
        with self._lock:
            backend = self._backend
        return backend.cancel(request_id) if backend is not None else False

    # ---- shutdown ------------------------------------------------------------------------
    def begin_drain(self) -> None:
        """Admit no new generations; the running ones go on to the end."""
        with self._lock:
            self._state = "draining"
        dropped = self.limiter.close()
        log.info(
            "draining: %d generation(s) running, %d waiting request(s) refused",
            self.limiter.running, len(dropped),
        )

    @property
    def busy(self) -> int:
        return self.limiter.running

    def close(self, loader_timeout_s: float = 10.0) -> None:
        """Stop loading (at its next progress report), free the model. Waits at most
        ``loader_timeout_s`` for the loader: a load inside a library call cannot be interrupted,
        and it closes its own model when it finishes."""
        self._closing.set()
        if self._thread is not None and self._thread.is_alive():
            self._thread.join(loader_timeout_s)
            if self._thread.is_alive():
                log.warning("the model loader is still busy; exiting without waiting for it")
                return
        with self._lock:
            backend, self._backend = self._backend, None
        if backend is not None:
            backend.close()
