"""The server process: start (foreground exec or --daemon), wait for /health, stop, status.
Standard library only (the platform's bare Python runs it).

Each server is recorded in ``run/server-<port>.json`` (pid, url, mode, log, drain time; a daemon
logs to ``logs/server-<port>.log``), so that
several launches of one app folder can each run their own server on their own port; ``stop`` and
``status`` act on all of them (or on ``--port N`` only).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .app import App
from .lock import pid_alive
from .output import fail, say, tail

RECORD_GLOB = "server-*.json"
STOP_MARGIN_S = 15.0


def record_path(app: App, port: int) -> Path:
    return app.run_dir / f"server-{port}.json"


def connect_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host


def health(host: str, port: int, timeout: float = 3.0) -> tuple[int | None, str]:
    url = f"http://{connect_host(host)}:{port}/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read(500).decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(500).decode("utf-8", "replace")
    except (urllib.error.URLError, OSError):
        return None, ""


def _is_ours(pid: int) -> bool:
    """A live process that is our server (or our launcher about to exec into it)."""
    if not pid_alive(pid):
        return False
    cmdline = Path(f"/proc/{pid}/cmdline")
    if not cmdline.exists():
        return True
    try:
        args = cmdline.read_bytes().split(b"\0")
    except OSError:
        return False
    # Foreground: the record is written before exec; give the exec a moment.
    return (b"ui" in args and b"serve" in args) or b"bundle.launcher" in args


def read_record(path: Path) -> dict[str, Any] | None:
    """The server recorded in ``path`` if that process is still alive and is ours."""
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        pid = int(info["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return info if _is_ours(pid) else None


def running(app: App, port: int | None = None) -> list[tuple[Path, dict[str, Any]]]:
    """The live servers of this app folder (only the one on ``port`` when given), by port."""
    paths = [record_path(app, port)] if port is not None else sorted(app.run_dir.glob(RECORD_GLOB))
    out = []
    for path in paths:
        info = read_record(path)
        if info is None:
            path.unlink(missing_ok=True)  # a server that is gone
        else:
            out.append((path, info))
    return out


def ready_message(url: str) -> str:
    return (f"✅ 服务已就绪 / Server ready: {url}\n"
            f"   在 ModelArts 上请点击 网页推理 / on ModelArts click 网页推理 (the platform's proxy to this port)\n"
            f"   OpenAI API: {url}/v1   停止 / stop: bash 1键推理.sh stop")


def wait_ready(host: str, port: int, alive: Callable[[], bool], timeout: float) -> bool:
    t0 = last = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if not alive():
            return False
        status, body = health(host, port)
        if status == 200:
            return True
        if time.monotonic() - last >= 15:
            last = time.monotonic()
            reason = ""
            try:
                reason = json.loads(body).get("reason", "") if body else ""
            except (ValueError, AttributeError):
                pass
            say(f"  … 加载中 / loading ({time.monotonic() - t0:.0f} s){': ' + str(reason) if reason else ''}")
        time.sleep(0.5)
    return False


def watcher(host: str, port: int, server_pid: int, url: str, timeout: float) -> None:
    """Foreground mode: a detached grandchild announces readiness while the server runs in our pid."""
    child = os.fork()
    if child:
        os.waitpid(child, 0)
        return
    if os.fork():
        os._exit(0)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        if wait_ready(host, port, lambda: pid_alive(server_pid), timeout):
            say(ready_message(url))
    finally:
        os._exit(0)


def start_server(app: App, python: Path, cfg: dict[str, Any], flags: list[str]) -> int:
    host, port = cfg["server"]["host"], int(cfg["server"]["port"])
    url = f"http://{connect_host(host)}:{port}"
    cmd = [str(python), "-m", "ui", "serve", *flags]
    env = app.child_env({"HF_HUB_OFFLINE": "1"} if app.args.offline and "HF_HUB_OFFLINE" not in os.environ else None)
    timeout = float(os.environ.get("VT_START_TIMEOUT", "1800"))
    app.run_dir.mkdir(parents=True, exist_ok=True)
    record = {"host": host, "port": port, "url": url, "drain_timeout_s": cfg["server"]["drain_timeout_s"],
              "started": time.time()}
    path = record_path(app, port)
    if not app.args.daemon:
        record.update(pid=os.getpid(), mode="foreground")
        path.write_text(json.dumps(record), encoding="utf-8")
        say(f"▶ 启动服务 (前台, Ctrl-C 停止) / starting the server in the foreground (Ctrl-C stops it): {' '.join(cmd)}")
        watcher(host, port, os.getpid(), url, timeout)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.chdir(app.dir)
        os.execve(str(python), cmd, env)
    app.logs.mkdir(parents=True, exist_ok=True)
    log = app.logs / f"server-{port}.log"  # one per port: launches of one folder may each run a server
    say(f"▶ 后台启动服务 / starting the server in the background: {' '.join(cmd)}\n  日志 / log: {log}")
    with open(log, "ab") as fh:
        proc = subprocess.Popen(cmd, cwd=app.dir, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    record.update(pid=proc.pid, mode="daemon", log=str(log))
    path.write_text(json.dumps(record), encoding="utf-8")
    t0 = time.monotonic()
    if wait_ready(host, port, lambda: proc.poll() is None, timeout):
        say(f"  [{time.monotonic() - t0:.1f} s] /health → 200")
        say(ready_message(url))
        return 0
    if proc.poll() is not None:
        path.unlink(missing_ok=True)
        fail(f"✖ 服务未能就绪 / Server did not become ready: it exited with code {proc.returncode}.\n"
             f"  日志 / log: {log}\n{tail(log, 30)}")
    fail(f"✖ 服务未能就绪 / Server did not become ready within {timeout:.0f} s (VT_START_TIMEOUT); it keeps running "
         f"(pid {proc.pid}): `bash 1键推理.sh status`, or stop it with `bash 1键推理.sh stop`.\n{tail(log, 30)}")


def _stop_one(path: Path, info: dict[str, Any]) -> int:
    pid = int(info["pid"])
    drain = float(info["drain_timeout_s"])
    wait_s = drain + STOP_MARGIN_S
    say(f"■ 停止服务 / stopping pid {pid} on port {info['port']} (SIGTERM; in-flight requests get up to {drain:.0f} s) …")
    t0 = time.monotonic()
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    while time.monotonic() - t0 < wait_s:
        if not pid_alive(pid):
            break
        stat = Path(f"/proc/{pid}/stat")
        try:
            if stat.read_text().split(") ")[-1].startswith("Z"):
                break  # a zombie: exited, waiting for its parent to reap it
        except OSError:
            break
        time.sleep(0.3)
    else:
        os.kill(pid, signal.SIGKILL)
        path.unlink(missing_ok=True)
        say(f"✖ 进程 {pid} 在 {wait_s:.0f} 秒内未退出, 已强制结束 / pid {pid} did not exit within {wait_s:.0f} s after "
            f"SIGTERM: killed (SIGKILL)")
        return 1
    path.unlink(missing_ok=True)
    say(f"✔ 已停止 / stopped (pid {pid}) in {time.monotonic() - t0:.1f} s")
    return 0


def cmd_stop(app: App) -> int:
    servers = running(app, app.args.port)
    if not servers:
        where = f" on port {app.args.port}" if app.args.port else ""
        say(f"· 服务没有在运行 / the server is not running{where} (no live pid in run/{RECORD_GLOB})")
        return 0
    return max(_stop_one(path, info) for path, info in servers)


def cmd_status(app: App) -> int:
    servers = running(app, app.args.port)
    if not servers:
        say("· 未运行 / not running")
        return 3
    for _, info in servers:
        status, body = health(info["host"], int(info["port"]))
        state = {200: "就绪 / ready", 503: "加载中 / loading"}.get(status or 0, f"no answer ({status})")
        say(f"● 运行中 / running: pid {info['pid']} ({info.get('mode')}), {info['url']}, health: {state} "
            f"{body.strip()[:200]}")
        if info.get("log"):
            say(f"  日志 / log: {info['log']}")
    return 0
