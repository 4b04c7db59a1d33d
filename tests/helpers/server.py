"""Start and stop a real ``python -m ui serve`` process (tests, smoke checks, screenshots)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO

import httpx

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``with ServerProcess([...flags...]) as srv: srv.url`` — always stopped on exit.

    The environment is cleaned of ``VT_*`` so that a developer's settings do not leak into tests;
    pass ``env`` to set some on purpose. Output is kept in ``srv.log_text()``.
    """

    def __init__(self, args: list[str], port: int | None = None, env: dict[str, str] | None = None,
                 ready_timeout: float = 300.0) -> None:
        self.port = port or free_port()
        self.args = [sys.executable, "-m", "ui", "serve", "--host", "127.0.0.1", "--port", str(self.port), *args]
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("VT_")}
        self.env.update(env or {})
        self.env.setdefault("PYTHONUNBUFFERED", "1")
        self.ready_timeout = ready_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._log_path = ""
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self) -> ServerProcess:
        fd, self._log_path = tempfile.mkstemp(prefix="vt-server-", suffix=".log")
        self._log = os.fdopen(fd, "wb")
        self.proc = subprocess.Popen(self.args, cwd=ROOT, env=self.env, stdout=self._log, stderr=subprocess.STDOUT)
        return self

    def log_text(self) -> str:
        return Path(self._log_path).read_text(encoding="utf-8", errors="replace") if self._log_path else ""

    def wait_answering(self) -> httpx.Response:
        """Wait until the port answers /health (any status) and return that first answer."""
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                return httpx.get(self.url + "/health", timeout=5)
            except httpx.TransportError:
                time.sleep(0.2)
        raise TimeoutError(f"server did not answer within {self.ready_timeout} s:\n{self.log_text()}")

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                r = httpx.get(self.url + "/health", timeout=5)
                if r.status_code == 200:
                    return
                if r.json().get("status") == "failed":
                    raise RuntimeError(f"model failed to load: {r.text}\n{self.log_text()}")
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"server not ready within {self.ready_timeout} s:\n{self.log_text()}")

    def _check_alive(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_text()}")

    def terminate(self, timeout: float = 120.0) -> int:
        """SIGTERM (graceful drain), then SIGKILL if it does not exit in time."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.terminate(timeout=30)
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> ServerProcess:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def read_metric(url: str, name: str, labels: dict[str, str] | None = None, headers: dict[str, str] | None = None) -> float:
    """One sample from /metrics (0.0 when the labelled series does not exist yet)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url.rstrip("/") + "/metrics", headers=headers, timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in (labels or {}).items()):
                return sample.value
    return 0.0


def wait_for(predicate, timeout: float = 60.0, interval: float = 0.2, what: str = "condition") -> None:
    """Poll until ``predicate()`` is true; a deadline, not a timing assertion."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


