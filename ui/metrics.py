"""Prometheus metrics for ``GET /metrics``.

Each app gets its own registry so that several apps in one process (tests) do not collide.
"""
from __future__ import annotations

import threading
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from backends import Usage

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "vibethinker_requests",
            "Finished generations (one per sample) by entry point (page, api) and finish reason "
            "(stop, length, budget, loop, cancelled, error).",
            ["source", "finish_reason"],
            registry=r,
        )
        self.tokens = Counter(
            "vibethinker_tokens", "Tokens processed, by kind (prompt, reasoning, answer).", ["kind"], registry=r
        )
        self.ttft = Histogram(
            "vibethinker_time_to_first_token_seconds",
            "Time from the start of generation to the first generated token.",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60),
            registry=r,
        )
        self.decode_speed = Histogram(
            "vibethinker_decode_tokens_per_second",
            "Decode speed of each finished generation.",
            buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000),
            registry=r,
        )
        self.errors = Counter(
            "vibethinker_errors",
            "Refused or failed requests by kind (queue_full, not_ready, invalid_request, auth, "
            "model_not_found, backend).",
            ["kind"],
            registry=r,
        )
        self.queue_waiting = Gauge("vibethinker_queue_waiting", "Requests waiting for the model.", registry=r)
        self.running = Gauge("vibethinker_requests_running",
                             "Sequences the engine is decoding now (a request of n samples counts n).", registry=r)
        self.ready = Gauge("vibethinker_model_ready", "1 when the model is loaded and serving.", registry=r)
        self.engine_up = Gauge(
            "vibethinker_engine_up",
            "1 while the loaded engine can serve, 0 while it cannot (the remote engine: its upstream does not "
            "answer); labelled with the engine and, for the remote engine, the upstream's address.",
            ["engine", "endpoint"], registry=r)

        self.threads = Gauge(
            "vibethinker_process_threads",
            "Threads alive in the server process (returns to its idle level once requests end: a leak shows).",
            registry=r)
        self.threads.set_function(threading.active_count)

    def bind(self, waiting: Callable[[], float], running: Callable[[], float], ready: Callable[[], float]) -> None:
        """Read live values at scrape time instead of tracking them by hand."""
        self.queue_waiting.set_function(waiting)
        self.running.set_function(running)
        self.ready.set_function(ready)

    def bind_engine(self, engine: str, endpoint: str, up: Callable[[], float]) -> None:
        """The loaded engine's live state, read at scrape time."""
        self.engine_up.labels(engine=engine, endpoint=endpoint).set_function(up)

    def record(self, source: str, usage: Usage, count_prompt: bool = True) -> None:
        """One finished sequence (a request of n samples records n, its prompt once)."""
        self.requests.labels(source=source, finish_reason=usage.finish_reason.value).inc()
        if count_prompt:
            self.tokens.labels(kind="prompt").inc(usage.prompt_tokens)
        self.tokens.labels(kind="reasoning").inc(usage.reasoning_tokens)
        self.tokens.labels(kind="answer").inc(usage.answer_tokens)
        if usage.time_to_first_token_s is not None:
            self.ttft.observe(usage.time_to_first_token_s)
        if usage.decode_tokens_per_s:
            self.decode_speed.observe(usage.decode_tokens_per_s)

    def render(self) -> bytes:
        return generate_latest(self.registry)
