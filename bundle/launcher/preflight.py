"""Checks of the machine before anything is installed: Python, GPU, CUDA toolkit, disk, port, pip
index, and what the configuration asks of them. Standard library only (the platform's bare Python
runs it); the configuration it checks comes from ``python -m bundle.resolve`` as plain JSON.
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, NamedTuple

from .app import App
from .output import fail, note, ok


def python_line() -> str:
    return f"Python {sys.version.split()[0]} ({sys.executable})"


def gpu_info() -> tuple[bool, str]:
    """(usable GPU, description) from nvidia-smi."""
    if os.environ.get("VT_FAKE_NO_GPU") == "1":  # lets tests on GPU machines exercise the CPU path
        return False, "nvidia-smi hidden by VT_FAKE_NO_GPU=1"
    exe = shutil.which("nvidia-smi")
    if not exe:
        return False, "no NVIDIA driver (nvidia-smi not found)"
    try:
        out = subprocess.run(
            [exe, "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return False, f"nvidia-smi failed: {exc}"
    if out.returncode != 0 or not out.stdout.strip():
        reason = (out.stderr or out.stdout).strip().splitlines()
        return False, f"nvidia-smi found no usable GPU ({reason[0] if reason else 'exit ' + str(out.returncode)})"
    gpus = [line.strip() for line in out.stdout.strip().splitlines()]
    return True, "; ".join(gpus)


def nvcc_info() -> tuple[bool, str]:
    # CMake's CUDA detection looks on PATH, then in CUDA_HOME (default /usr/local/cuda).
    cuda_home = Path(os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda")
    exe = shutil.which("nvcc") or (str(cuda_home / "bin" / "nvcc") if (cuda_home / "bin" / "nvcc").exists() else None)
    if not exe:
        return False, f"nvcc not found (CUDA toolkit; looked on PATH and in {cuda_home}/bin)"
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        return False, f"nvcc failed: {exc}"
    release = re.search(r"release ([\d.]+)", out.stdout)
    return out.returncode == 0, f"nvcc {release.group(1) if release else '?'} ({exe})"


class Machine:
    """What preflight found, computed once per launch."""

    def __init__(self) -> None:
        self.gpu, self.gpu_text = gpu_info()
        self.nvcc, self.nvcc_text = nvcc_info()


def report(app: App, machine: Machine) -> None:
    note(python_line())
    note(f"GPU: {machine.gpu_text}")
    note(f"CUDA toolkit: {machine.nvcc_text}")
    w = app.wheels
    wheels = f"{w} ({sum(1 for _ in w.glob('*.whl'))} wheels)" if w else "none (pip index)"
    if app.source:
        note(f"源码目录, 依赖按 pyproject.toml 的版本范围安装 / source checkout: dependencies from pyproject.toml's "
             f"ranges (a release bundle pins the tested versions); target {app.target}")
    else:
        note(f"wheelhouse: {wheels}, bundle target: {app.target}")


def free_gb(path: Path) -> float:
    probe = path
    while not probe.exists():
        probe = probe.parent
    return shutil.disk_usage(probe).free / 2**30


def needed_gb(install_needed: bool, torch_build: str | None) -> float:
    """Free disk an install needs: a CUDA torch is several GB, a CPU one about one."""
    if os.environ.get("VT_MIN_FREE_GB"):
        try:
            return float(os.environ["VT_MIN_FREE_GB"])
        except ValueError:
            fail(f"VT_MIN_FREE_GB={os.environ['VT_MIN_FREE_GB']!r} 不是数字 / is not a number (GB), e.g. VT_MIN_FREE_GB=5")
    if not install_needed:
        return 1.0
    return {"cuda": 10.0, "cpu": 4.0}.get(torch_build or "", 3.0)


def check_disk(app: App, install_needed: bool, torch_build: str | None) -> None:
    need = needed_gb(install_needed, torch_build)
    have = free_gb(app.dir)
    if have < need:
        fail(f"✖ 磁盘空间不足 / Not enough free disk space: {have:.1f} GB free in {app.dir}, need ≥ {need:.1f} GB "
             f"(VT_MIN_FREE_GB).\n  修复 / Fix: free space on that disk or move the app folder to a larger one.")
    ok(f"磁盘 / disk: {have:.1f} GB free (need {need:.1f} GB)")


def port_problem(host: str, port: int) -> str | None:
    """None when ``host:port`` can be bound (as uvicorn does, with SO_REUSEADDR), else the reason."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            return exc.strerror or str(exc)
    return None


def check_port(cfg: dict[str, Any]) -> None:
    host, port = cfg["server"]["host"], int(cfg["server"]["port"])
    problem = port_problem(host, port)
    if problem:
        fail(f"✖ 端口已被占用 / Port {port} is already in use on {host}: {problem}.\n"
             f"  修复 / Fix: stop what listens there (if it is this app: bash 1键推理.sh stop; to see who: "
             f"ss -ltnp 'sport = :{port}'), or choose another port: --port N / VT_PORT=N.")
    ok(f"端口 / port {host}:{port} free")


def check_cuda_request(cfg: dict[str, Any], origins: dict[str, str], torch_build: str | None,
                       machine: Machine, target: str) -> None:
    """Stop when the configuration asks for CUDA on a machine without a usable NVIDIA GPU."""
    if machine.gpu:
        return
    reasons = []
    if cfg["install"]["torch"] == "cuda":
        reasons.append(f"install.torch: cuda (from {origins.get('install.torch', 'the manifest')})")
    elif torch_build == "cuda":
        reasons.append(f"the {target} bundle installs the CUDA torch")
    tcfg = cfg["transformers"]
    device_origin = origins.get("transformers.device", "")
    if tcfg["device"] == "cuda" and (device_origin == "command-line flag" or not tcfg["cpu_fallback"]):
        reasons.append("transformers.device: cuda" + ("" if device_origin == "command-line flag"
                                                      else " with cpu_fallback: false"))
    if reasons:
        fail(f"✖ 请求了 CUDA, 但没有可用的 NVIDIA GPU / CUDA was requested ({'; '.join(reasons)}) but no NVIDIA GPU is "
             f"usable: {machine.gpu_text}.\n  修复 / Fix: choose a GPU flavour, or run on the CPU: --torch cpu / "
             f"--device cpu, the cpu bundle, or an engine that runs on the CPU (bash 1键推理.sh --help lists them).")


class Index(NamedTuple):
    url: str
    origin: str  # where it was set, for messages
    explicit: bool  # pass --index-url to pip (else pip's own configuration finds it)


def index_url_for(app: App, cfg: dict[str, Any] | None, origins: dict[str, str]) -> Index:
    """The pip index the install uses, and where it came from.

    ``cfg`` is None for the bootstrap step, which runs before the manifest can be read: then only
    the --index-url flag and pip's own configuration (PIP_INDEX_URL, pip.conf) apply.
    """
    if cfg is not None and cfg["install"]["index_url"]:
        origin = origins.get("install.index_url", "manifest")
        return Index(cfg["install"]["index_url"], f"install.index_url, {origin}", True)
    if cfg is None and app.args.index_url:
        return Index(app.args.index_url, "--index-url", True)
    if os.environ.get("PIP_INDEX_URL"):
        return Index(os.environ["PIP_INDEX_URL"], "PIP_INDEX_URL", False)
    return Index("https://pypi.org/simple", "pip's default", False)


def index_problem(url: str) -> str | None:
    if url.startswith("file://"):
        return None if Path(url[7:]).exists() else "no such folder"
    timeout = float(os.environ.get("VT_INDEX_TIMEOUT", "15"))
    try:
        with urllib.request.urlopen(urllib.request.Request(url.rstrip("/") + "/", method="GET"), timeout=timeout):
            return None
    except urllib.error.HTTPError as exc:
        return None if exc.code < 500 and exc.code != 404 else f"HTTP {exc.code}"
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return str(reason)
