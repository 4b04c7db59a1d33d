"""The HTTP leg of the benchmark: our server in a subprocess, measured from an SSE client.

The server is started exactly as users start it (``python -m ui serve``) on 127.0.0.1; this
module runs it as a program and never imports ``ui`` (backends must not depend on the UI).
"""
from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .measure import EngineSpec, PathResult, Run, Sampling, backend_manifest_data, peak_rss_bytes

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """``python -m ui serve`` for one engine spec; a context manager that always stops it."""

    def __init__(self, spec: EngineSpec, *, concurrency: int = 1, max_queue: int = 32,
                 ready_timeout_s: float = 600.0, log_dir: Path | None = None) -> None:
        self.spec = spec
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.ready_timeout_s = ready_timeout_s
        self._tmp = tempfile.TemporaryDirectory(prefix="vt-bench-")
        data = backend_manifest_data(spec)
        data["server"] = {"host": "127.0.0.1", "port": self.port, "concurrency": concurrency,
                          "max_queue": max_queue, "drain_timeout_s": 5}
        self.manifest = Path(self._tmp.name) / "manifest.yaml"
        # JSON is YAML: no yaml dependency needed here.
        self.manifest.write_text(json.dumps(data), encoding="utf-8")
        self.log_path = (log_dir or Path(self._tmp.name)) / f"server-{spec.name}.log"
        self.proc: subprocess.Popen | None = None
        self.load_s = 0.0

    def __enter__(self) -> Server:
        import httpx

        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "ui", "serve", "--manifest", str(self.manifest),
               "--host", "127.0.0.1", "--port", str(self.port)]
        env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1")
        start = time.perf_counter()
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = start + self.ready_timeout_s
        while time.perf_counter() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with code {self.proc.returncode}: {self.tail()}")
            try:
                health = httpx.get(self.base + "/health", timeout=2)
                if health.status_code == 200:
                    self.load_s = time.perf_counter() - start
                    return self
                if health.json().get("status") == "failed":  # it will not become ready: say why now
                    self.__exit__(None, None, None)
                    raise RuntimeError(health.json().get("reason", "the model failed to load"))
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.5)
        self.__exit__(None, None, None)
        raise RuntimeError(f"the server was not ready within {self.ready_timeout_s:.0f} s: {self.tail()}")

    def tail(self, chars: int = 1500) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")[-chars:]
        except OSError:
            return ""

    def peak_rss_bytes(self) -> int:
        return peak_rss_bytes(self.proc.pid) if self.proc is not None else 0

    def __exit__(self, *exc: Any) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._tmp.cleanup()


@dataclass
class StreamTiming:
    """One SSE reply seen by the client."""

    start: float
    first: float | None = None  # first text delta
    last: float | None = None  # last text delta
    end: float = 0.0
    chunks: int = 0  # SSE events with text
    completion_tokens: int = 0
    prompt_tokens: int = 0
    produced_tok_s: float | None = None  # the backend's own rate (vibethinker extras)
    server_ttft_s: float | None = None
    finish: str = ""
    error: str = ""

    def run(self) -> Run:
        ttft = (self.first - self.start) if self.first is not None else 0.0
        rate = 0.0
        if self.first is not None and self.last is not None and self.last > self.first and self.completion_tokens > 1:
            rate = (self.completion_tokens - 1) / (self.last - self.first)
        return Run(prompt_tokens=self.prompt_tokens, new_tokens=self.completion_tokens, ttft_s=ttft,
                   decode_tok_s=rate, total_s=self.end - self.start, chunks=self.chunks,
                   produced_tok_s=self.produced_tok_s)


def stream_chat(client: Any, base: str, messages: list[dict], new_tokens: int, sampling: Sampling) -> StreamTiming:
    """POST one streaming chat completion and time its text deltas."""
    body = {"model": "bench", "messages": messages, "stream": True, "max_tokens": new_tokens,
            "temperature": sampling.temperature, "top_p": sampling.top_p, "seed": sampling.seed,
            "stream_options": {"include_usage": True}}
    timing = StreamTiming(start=time.perf_counter())
    with client.stream("POST", base + "/v1/chat/completions", json=body, timeout=None) as resp:
        if resp.status_code != 200:
            resp.read()
            timing.error = f"HTTP {resp.status_code}: {resp.text[:300]}"
            timing.end = time.perf_counter()
            return timing
        for line in resp.iter_lines():
            if not line.startswith("data: "):
                continue
            payload = line[6:]
            if payload == "[DONE]":
                break
            now = time.perf_counter()
            event = json.loads(payload)
            if "error" in event:
                timing.error = str(event["error"].get("message"))
                continue
            if event.get("usage"):
                timing.completion_tokens = int(event["usage"]["completion_tokens"])
                timing.prompt_tokens = int(event["usage"]["prompt_tokens"])
            for choice in event.get("choices") or []:
                delta = choice.get("delta") or {}
                text = (delta.get("content") or "") + (delta.get("reasoning_content") or "")
                if text:
                    timing.chunks += 1
                    timing.first = timing.first if timing.first is not None else now
                    timing.last = now
                if choice.get("finish_reason"):
                    timing.finish = choice["finish_reason"]
            extras = event.get("vibethinker")
            if extras:
                timing.produced_tok_s = extras.get("decode_tokens_per_s")
                timing.server_ttft_s = extras.get("time_to_first_token_s")
    timing.end = time.perf_counter()
    return timing


def measure_http(spec: EngineSpec, prompts: list[dict], new_tokens: int, sampling: Sampling, warmup: int,
                 log_dir: Path | None = None, time_limit_s: float = 3600.0) -> PathResult:
    """Sequential SSE streams through a fresh server (the same runs as the other paths).

    Past ``time_limit_s`` no further run starts (the runs done so far are kept and noted)."""
    import httpx

    result = PathResult(engine=spec.name, path="http")
    started = time.perf_counter()
    with Server(spec, log_dir=log_dir, ready_timeout_s=time_limit_s) as server, httpx.Client() as client:
        result.load_s = server.load_s
        t0 = time.perf_counter()
        for i in range(warmup):
            # torch.compile specialises on the static cache's length: warm up at full length.
            count = new_tokens if spec.compile else min(new_tokens, 8)
            stream_chat(client, server.base, prompts[-1 - i]["messages"], count, sampling)
        result.warmup_s = time.perf_counter() - t0
        for p in prompts[: len(prompts) - warmup]:
            if time.perf_counter() - started > time_limit_s:
                result.info["note"] = f"stopped after {len(result.runs)} runs: time limit {time_limit_s:.0f} s"
                break
            timing = stream_chat(client, server.base, p["messages"], new_tokens, sampling)
            if timing.error:
                raise RuntimeError(f"HTTP stream failed: {timing.error}")
            result.runs.append(timing.run())
        result.peak_rss_bytes = server.peak_rss_bytes()
    return result


@dataclass
class ConcurrencyLevel:
    users: int
    per_user_decode_tok_s: float  # median over users of the client-side rate
    per_user_ttft_s: float  # median (includes waiting in line)
    max_ttft_s: float
    aggregate_tok_s: float  # all completion tokens ÷ wall time from first request to last reply
    wall_s: float
    errors: list[str] = field(default_factory=list)


def measure_concurrency(spec: EngineSpec, prompts: list[dict], new_tokens: int, sampling: Sampling,
                        levels: list[int], concurrency: int = 1, log_dir: Path | None = None) -> dict[str, Any]:
    """Per-user and aggregate speed with ``levels`` simultaneous SSE streams on one server."""
    import httpx

    out: dict[str, Any] = {"engine": spec.name, "server_concurrency": concurrency, "levels": []}
    with Server(spec, concurrency=concurrency, max_queue=max(levels) * 2, log_dir=log_dir) as server:
        with httpx.Client() as warm:  # the first request pays one-time costs (compilation too)
            stream_chat(warm, server.base, prompts[-1]["messages"], new_tokens if spec.compile else 8, sampling)
        for users in levels:
            timings: list[StreamTiming | None] = [None] * users
            errors: list[str] = []

            def user(i: int) -> None:
                try:
                    with httpx.Client() as client:
                        timings[i] = stream_chat(client, server.base, prompts[i % len(prompts)]["messages"],
                                                 new_tokens, sampling)
                except Exception as exc:  # noqa: BLE001 - reported, not raised
                    errors.append(f"user {i}: {type(exc).__name__}: {exc}")

            threads = [threading.Thread(target=user, args=(i,)) for i in range(users)]
            start = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - start
            done = [t for t in timings if t is not None and not t.error]
            errors += [t.error for t in timings if t is not None and t.error]
            runs = [t.run() for t in done]
            level = ConcurrencyLevel(
                users=users,
                per_user_decode_tok_s=float(statistics.median(r.decode_tok_s for r in runs)) if runs else 0.0,
                per_user_ttft_s=float(statistics.median(r.ttft_s for r in runs)) if runs else 0.0,
                max_ttft_s=max((r.ttft_s for r in runs), default=0.0),
                aggregate_tok_s=sum(r.new_tokens for r in runs) / wall if wall > 0 else 0.0,
                wall_s=wall,
                errors=errors,
            )
            out["levels"].append(level.__dict__)
        out["peak_rss_bytes"] = server.peak_rss_bytes()
    return out


def measure_stream_rate(spec: EngineSpec, prompt: dict, new_tokens: int, sampling: Sampling,
                        repeats: int = 3, log_dir: Path | None = None) -> dict[str, Any]:
    """How fast the SSE path delivers a fast producer's tokens (the tiny model): delivered vs produced."""
    import httpx

    rows = []
    with Server(spec, log_dir=log_dir) as server, httpx.Client() as client:
        stream_chat(client, server.base, prompt["messages"], min(new_tokens, 16), sampling)
        for _ in range(repeats):
            t = stream_chat(client, server.base, prompt["messages"], new_tokens, sampling)
            if t.error:
                raise RuntimeError(f"HTTP stream failed: {t.error}")
            run = t.run()
            span = (t.last - t.first) if t.first is not None and t.last is not None else 0.0
            rows.append({
                "tokens": t.completion_tokens,
                "produced_tok_s": t.produced_tok_s or 0.0,
                "delivered_tok_s": run.decode_tok_s,
                "chunks": t.chunks,
                "chunks_per_s": (t.chunks - 1) / span if span > 0 and t.chunks > 1 else 0.0,
                "tokens_per_chunk": t.completion_tokens / t.chunks if t.chunks else 0.0,
            })
    med = {k: float(statistics.median(r[k] for r in rows)) for k in rows[0]}
    return {"engine": spec.name, "runs": rows, "median": med}
