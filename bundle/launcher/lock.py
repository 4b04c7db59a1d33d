"""The install lock: one launch at a time installs or prepares the model in an app folder.

Why: two launches in one folder (two ports, a second terminal, a notebook cell run twice) used to
build the same venv at once, delete each other's half-made venv, and then blame the platform's
venv support. Now every step that writes shared state — the launcher's bootstrap environment, the
venv, pip, the llama.cpp build, the model download — runs under an exclusive ``fcntl.flock`` on
``run/install.lock`` (standard library only: this runs on the platform's bare Python, before any
library such as filelock is installed). A second launch waits, says who holds the lock and what
it is doing, then re-checks and reuses the finished install; each launch then starts its own
server on its own port. ``flock`` is released by the kernel when its holder dies, so a lock left
by a killed launch is simply taken over (the file says who held it; the new owner says so).
GGUF conversion, which happens in the server while it loads, has its own lock next to the GGUF
(backends/models/gguf_source.py).
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import time
from pathlib import Path
from typing import Any

from .output import say, warn

LOCK_NAME = "install.lock"
PROGRESS_EVERY_S = 15.0


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class InstallLock:
    """Re-entrant within one launch: ``acquire(step)`` while held only records the new step."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK_NAME
        self._fh: Any = None
        self._unsupported = False
        self._since = 0.0

    @property
    def held(self) -> bool:
        return self._fh is not None or self._unsupported

    def read_info(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8") or "{}")
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _write(self, info: dict[str, Any]) -> None:
        self._fh.seek(0)
        self._fh.truncate()
        self._fh.write(json.dumps(info))
        self._fh.flush()

    def acquire(self, step: str) -> None:
        if self.held:
            self.set_step(step)
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._wait(fh)
        except OSError as exc:
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            fh.close()
            self._unsupported = True
            warn(f"此文件系统不支持文件锁, 请勿同时启动两次 / the file system of {self.path.parent} has no file locks "
                 f"({exc.strerror}): do not start two launches at once in this folder")
            return
        previous = self.read_info()
        self._fh = fh
        self._since = time.time()
        pid = previous.get("pid")
        if isinstance(pid, int) and pid != os.getpid() and not previous.get("released"):
            how = "是其他进程 / is another process now" if pid_alive(pid) else "已不存在 / is gone"
            warn(f"接管上次启动留下的安装锁 / taking over the install lock left by a launch that died during its "
                 f"install (pid {pid} {how}; it was at: {previous.get('step', '?')}); what it left half-done is redone")
        self._write({"pid": os.getpid(), "step": step, "since": self._since, "step_since": self._since})

    def set_step(self, step: str) -> None:
        if self._fh is not None:
            self._write({"pid": os.getpid(), "step": step, "since": self._since, "step_since": time.time()})

    def _wait(self, fh: Any) -> None:
        """Block until the holder releases the lock, printing who it is and what it does."""
        t0 = time.monotonic()
        info: dict[str, Any] = {}
        for _ in range(10):  # the holder writes who it is right after taking the lock
            info = self.read_info()
            if info.get("pid"):
                break
            time.sleep(0.1)
        pid = info.get("pid", "?")
        say(f"  ⏳ 另一个启动正在安装 (pid {pid}), 等待… / another launch is installing (pid {pid}), waiting… "
            f"(now: {info.get('step', '?')})")
        last_step, last_print = info.get("step"), time.monotonic()
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                time.sleep(0.5)
            info = self.read_info()
            now = time.monotonic()
            if info.get("step") and (info.get("step") != last_step or now - last_print >= PROGRESS_EVERY_S):
                last_step, last_print = info.get("step"), now
                say(f"  … 等待中 / waiting ({now - t0:.0f} s): pid {info.get('pid', '?')} is at: {info.get('step')}")
        say(f"  ✔ 另一个启动已完成 / the other launch is done after {time.monotonic() - t0:.0f} s: "
            f"checking what it installed")

    def release(self) -> None:
        if self._fh is None:
            return
        try:
            self._write({"pid": os.getpid(), "released": True, "step": "done", "since": self._since})
            fcntl.flock(self._fh, fcntl.LOCK_UN)
        finally:
            self._fh.close()
            self._fh = None
