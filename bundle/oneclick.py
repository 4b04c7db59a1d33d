"""What ``1键推理.sh`` runs once it has found a Python ≥ 3.10: preflight, install, checks, start.

Standard library only: this runs on the platform's bare Python before anything is installed.

start (default):
  1. preflight: Python, free disk, GPU/driver (nvidia-smi), CUDA toolkit (nvcc), wheelhouse
  2. venv (manifest install.venv): created once; when install.torch is ``reuse`` and the platform's
     Python has a usable torch, a .pth file appends the platform's site-packages to the venv, so
     torch (and whatever else is there) is reused while the app's pins go into the venv first
  3. bootstrap pyyaml + pydantic, then validate the configuration through backends/manifest.py
     (``python -m bundle.resolve``): a bad key stops here, before gigabytes are installed
  4. CUDA / port checks, then the install steps (torch unless reused, app deps, llama.cpp when it
     can be chosen), each timed and logged to logs/pip-<step>.log; wheels/ first (offline),
     then the index. A stamp (hash of requirements + Python + target + choices) written after
     success lets the next run skip all of it; an interrupted run resumes.
  5. model folder check (backends.checks), or download when model.source.download is true
  6. ``python -m ui serve``: exec'd in the foreground (SIGTERM reaches the server), or started
     with --daemon (log + pid file); waits for /health and prints the URL.
stop / status / doctor: see ``usage`` in 1键推理.sh.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable
from typing import Any, NoReturn

from .reqfiles import source_requirement_files

MIN_PYTHON = (3, 10)
MIN_REUSED_TORCH = (2, 4)
STAMP_NAME = ".vt-install-stamp.json"
CREATING_MARK = ".vt-creating"
REUSE_PTH = "zz_vibethinker_platform_site.pth"
PID_NAME = "server.json"


# ---------------------------------------------------------------------------------------------
# output


def say(msg: str = "") -> None:
    print(msg, flush=True)


def ok(msg: str) -> None:
    say(f"  ✔ {msg}")


def warn(msg: str) -> None:
    say(f"  ⚠ {msg}")


class Stop(Exception):
    """A check failed: ``message`` is printed as is (bilingual, with the fix); exit with ``code``."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def fail(message: str, code: int = 1) -> NoReturn:
    raise Stop(message, code)


def tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join("    | " + line for line in text[-lines:])


# ---------------------------------------------------------------------------------------------
# the app folder and its files


@dataclass
class App:
    dir: Path
    args: argparse.Namespace
    bundle: dict[str, Any] = field(default_factory=dict)

    @property
    def manifest(self) -> Path:
        return Path(self.args.manifest).expanduser().resolve() if self.args.manifest else self.dir / "manifest.yaml"

    @property
    def logs(self) -> Path:
        return self.dir / "logs"

    @property
    def run_dir(self) -> Path:
        return self.dir / "run"

    @property
    def pid_file(self) -> Path:
        return self.run_dir / PID_NAME

    @property
    def wheels(self) -> Path | None:
        w = self.dir / "wheels"
        return w if w.is_dir() and any(w.glob("*.whl")) else None

    @property
    def target(self) -> str:
        return str(self.bundle.get("target", "cpu"))

    @property
    def source(self) -> bool:
        """A git checkout: requirements come from pyproject.toml's ranges, written under run/."""
        return bool(self.bundle.get("source"))

    def req(self, name: str) -> Path:
        return (self.run_dir if self.source else self.dir) / "requirements" / name


def read_install_section(path: Path) -> dict[str, str]:
    """``install:`` scalars from manifest.yaml without a YAML library (before anything is installed).

    Only used to find the venv and the index before the full validation, which goes through the
    one schema (backends/manifest.py) as soon as pyyaml + pydantic are importable.
    """
    values: dict[str, str] = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return values
    inside = False
    for line in lines:
        if re.match(r"^install:\s*(#.*)?$", line):
            inside = True
            continue
        if inside and line and not line[0].isspace() and not line.startswith("#"):
            break
        m = re.match(r"^\s+(\w+):\s*(.*?)\s*$", line) if inside else None
        if m:
            value = re.sub(r"\s+#.*$", "", m.group(2)).strip()
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
                value = value[1:-1]
            values[m.group(1)] = value
    return values


# ---------------------------------------------------------------------------------------------
# preflight


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


def free_gb(path: Path) -> float:
    probe = path
    while not probe.exists():
        probe = probe.parent
    return shutil.disk_usage(probe).free / 2**30


def needed_gb(install_needed: bool, torch_mode: str) -> float:
    if os.environ.get("VT_MIN_FREE_GB"):
        try:
            return float(os.environ["VT_MIN_FREE_GB"])
        except ValueError:
            fail(f"VT_MIN_FREE_GB={os.environ['VT_MIN_FREE_GB']!r} 不是数字 / is not a number (GB), e.g. VT_MIN_FREE_GB=5")
    if not install_needed:
        return 1.0
    return {"cuda": 10.0, "cpu": 4.0}.get(torch_mode, 3.0)


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


def index_url_for(app: App, install: dict[str, str]) -> tuple[str, str]:
    """(index URL, where it came from) that pip will use."""
    if app.args.index_url:
        return app.args.index_url, "--index-url"
    if install.get("index_url"):
        return install["index_url"], "manifest install.index_url"
    if os.environ.get("PIP_INDEX_URL"):
        return os.environ["PIP_INDEX_URL"], "PIP_INDEX_URL"
    return "https://pypi.org/simple", "pip's default"


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


# ---------------------------------------------------------------------------------------------
# venv and install


def venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def platform_torch(python: str) -> str | None:
    """Version of the torch the platform's Python imports, or None."""
    try:
        out = subprocess.run([python, "-c", "import torch; print(torch.__version__)"], capture_output=True, text=True, timeout=180)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[-1] if out.returncode == 0 and out.stdout.strip() else None


def version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text.split("+")[0])[:3])


def platform_site_dirs() -> list[str]:
    import site

    dirs = list(site.getsitepackages())
    if site.ENABLE_USER_SITE and os.path.isdir(site.getusersitepackages()):
        dirs.append(site.getusersitepackages())
    return [d for d in dirs if os.path.isdir(d)]


@dataclass
class Plan:
    venv: Path
    torch_mode: str  # reuse | cpu | cuda
    torch_version: str | None  # the reused one
    llama: str  # none | cpu | cuda
    llama_why: str
    steps: list[tuple[str, str]]  # (step name, requirements file)
    key: str = ""


def ensure_venv(venv: Path, reuse: bool) -> None:
    py = venv_python(venv)
    if (venv / CREATING_MARK).exists() or (venv.exists() and not py.exists()):
        warn(f"上次创建虚拟环境未完成, 重新创建 / the venv {venv} was left half-created: recreating it")
        shutil.rmtree(venv, ignore_errors=True)
    if not py.exists():
        t0 = time.monotonic()
        venv.mkdir(parents=True, exist_ok=True)
        (venv / CREATING_MARK).write_text("", encoding="utf-8")
        done = subprocess.run([sys.executable, "-m", "venv", str(venv)], capture_output=True, text=True)
        if done.returncode != 0:
            shutil.rmtree(venv, ignore_errors=True)
            detail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            ver = f"{sys.version_info.major}.{sys.version_info.minor}"
            fail(
                f"✖ 无法创建虚拟环境 / Cannot create the virtual environment {venv}: {' '.join(detail)}\n"
                f"  修复 / Fix: apt-get install -y python{ver}-venv (Debian/Ubuntu), or use conda "
                f"(conda create -y -p {venv.parent / '.conda-py311'} python=3.11), then rerun."
            )
        (venv / CREATING_MARK).unlink()
        ok(f"虚拟环境已创建 / venv created: {venv} ({time.monotonic() - t0:.1f} s)")
    site_dir = next(iter(sorted(venv.glob("lib/python3*/site-packages"))), None) or venv / "Lib" / "site-packages"
    pth = site_dir / REUSE_PTH
    if reuse:
        # addsitedir (not a bare path) so that the platform's own .pth files are processed too;
        # appended after the venv's site-packages, so the app's pinned packages win.
        lines = [f"import site; site.addsitedir({d!r})" for d in platform_site_dirs()]
        pth.write_text("\n".join(lines) + "\n", encoding="utf-8")
    elif pth.exists():
        pth.unlink()


def _pip_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PYTHONNOUSERSITE": "1"}
    env.pop("PYTHONPATH", None)
    env.update(extra or {})
    return env


def _pip_failure_reason(log: Path) -> str:
    text = log.read_text(encoding="utf-8", errors="replace") if log.exists() else ""
    for pattern in (
        r"No matching distribution found for (\S+)",
        r"Could not find a version that satisfies the requirement (\S+)",
        r"Failed building wheel for (\S+)",
        r"Failed to build (\S+)",
        r"ERROR: (Could not install packages due to an OSError.*)",
        r"ERROR: (Cannot install .*)",
        r"ERROR: (.+)",
    ):
        m = re.search(pattern, text)
        if m:
            return m.group(0).strip()
    return "see the log"


def pip_install(app: App, venv: Path, step: str, req: Path, *, offline_only: bool, index: tuple[str, str] | None,
                extra_args: list[str] | None = None, env: dict[str, str] | None = None,
                allow_wheels: bool = True) -> None:
    """One timed install step: wheels/ (no index) first, then the index unless offline."""
    app.logs.mkdir(parents=True, exist_ok=True)
    log = app.logs / f"pip-{step}.log"
    base = [str(venv_python(venv)), "-m", "pip", "install", "--progress-bar", "off", "--prefer-binary", "-r", str(req)]
    base += extra_args or []
    wheels = app.wheels if allow_wheels else None
    t0 = time.monotonic()
    with open(log, "w", encoding="utf-8") as fh:
        fh.write(f"# {step}: offline attempt (--no-index{' --find-links ' + str(wheels) if wheels else ''})\n")
        fh.flush()
        cmd = base + ["--no-index"] + (["--find-links", str(wheels)] if wheels else [])
        done = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=_pip_env(env))
    if done.returncode == 0:
        ok(f"[{time.monotonic() - t0:5.1f} s] {step}: {'from wheels/' if wheels else 'already satisfied'} (offline)")
        return
    if offline_only:
        fail(
            f"✖ 离线安装失败 / Offline install failed at step '{step}': {_pip_failure_reason(log)}\n"
            f"  日志 / log: {log}\n{tail(log)}\n"
            f"  修复 / Fix: the wheelhouse lacks a package for this Python ({python_line()}); build the bundle with "
            f"`python -m bundle build --wheelhouse full` on the same Python version, or rerun without --offline "
            f"when an index is reachable."
        )
    assert index is not None
    problem = index_problem(index[0])
    if problem is not None:
        fail(
            f"✖ 无法连接 pip 源 / pip index unreachable: {index[0]} (from {index[1]}): {problem}\n"
            f"  需要安装 / still to install: step '{step}' ({req.name})\n"
            f"  修复 / Fix: set a reachable mirror: install.index_url in manifest.yaml or "
            f"PIP_INDEX_URL=https://pypi.tuna.tsinghua.edu.cn/simple (or --index-url URL); "
            f"or use a bundle with a wheelhouse (python -m bundle build --wheelhouse) and --offline."
        )
    cmd = base + (["--index-url", index[0]] if index[1] in ("--index-url", "manifest install.index_url") else [])
    cmd += ["--find-links", str(wheels)] if wheels else []
    with open(log, "a", encoding="utf-8") as fh:
        fh.write(f"\n# {step}: online attempt ({index[0]})\n")
        fh.flush()
        done = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=_pip_env(env))
    if done.returncode != 0:
        fail(
            f"✖ 安装失败 / Install failed at step '{step}': {_pip_failure_reason(log)}\n"
            f"  日志 / log: {log}\n{tail(log)}\n"
            f"  修复 / Fix: read the reason above (network, mirror missing a version, compiler); rerun afterwards: "
            f"finished steps are skipped / 修复后重新运行, 已完成的步骤会跳过."
        )
    ok(f"[{time.monotonic() - t0:5.1f} s] {step}: installed from {index[0]}")


def install_key(app: App, plan: Plan) -> str:
    digest = hashlib.sha256()
    for _, req in plan.steps:
        digest.update(req.encode())
        digest.update(app.req(req).read_bytes())
    digest.update(json.dumps([sys.version, sys.executable, app.target, plan.torch_mode, plan.torch_version, plan.llama]).encode())
    return digest.hexdigest()


def read_stamp(venv: Path) -> dict[str, Any]:
    try:
        return json.loads((venv / STAMP_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def make_plan(app: App, install: dict[str, str], cfg: dict[str, Any] | None, gpu: bool, nvcc: tuple[bool, str]) -> Plan:
    venv = Path(install.get("venv") or ".venv")
    venv = venv if venv.is_absolute() else app.dir / venv
    torch_mode = (app.args.torch or install.get("torch") or "reuse").strip()
    if torch_mode not in ("reuse", "cpu", "cuda"):
        fail(f"✖ install.torch = {torch_mode!r}: 可选 / choose reuse | cpu | cuda (manifest.yaml or --torch)")
    reused = None
    if torch_mode == "reuse":
        reused = platform_torch(sys.executable)
        if reused and version_tuple(reused) >= MIN_REUSED_TORCH:
            pass
        else:
            why = f"torch {reused} is older than {'.'.join(map(str, MIN_REUSED_TORCH))}" if reused else "the platform's Python has no torch"
            torch_mode = app.target
            say(f"  · torch: {why} → install the {torch_mode.upper()} build / 安装 {torch_mode} 版 torch")
            reused = None
    backend = (cfg or {}).get("backend", "auto")
    if backend == "transformers":
        llama, why = "none", "backend transformers"
    elif backend == "auto" and gpu:
        llama, why = "none", "backend auto with a GPU → transformers"
    elif gpu and not app.args.llama_cpu:
        llama, why = "cuda", f"GPU present, {nvcc[1]}"
        if not nvcc[0] and app.bundle.get("llamacpp_wheel") != "cuda":
            fail(
                f"✖ 有 GPU 但没有 nvcc / GPU present but no nvcc: llama.cpp must be compiled for CUDA ({nvcc[1]}).\n"
                f"  修复 / Fix: install the CUDA toolkit (conda install -y -c nvidia cuda-nvcc, or an image with CUDA devel), "
                f"or rerun with --llama-cpu to build the CPU version, or use --backend transformers."
            )
    else:
        llama, why = "cpu", ("--llama-cpu" if gpu else "no GPU") + " → CPU build"
    steps = [("bootstrap", "bootstrap.txt")]
    if torch_mode != "reuse":
        steps.append((f"torch-{torch_mode}", f"torch-{torch_mode}.txt"))
    steps.append(("app", "base.txt"))
    if llama != "none":
        steps.append((f"llama-cpp-{llama}", "llamacpp.txt"))
    src = ((cfg or {}).get("model") or {}).get("source") or {}
    if src.get("download") and src.get("hub") == "modelscope":
        steps.append(("modelscope", "modelscope.txt"))
    plan = Plan(venv=venv, torch_mode=torch_mode, torch_version=reused, llama=llama, llama_why=why, steps=steps)
    plan.key = install_key(app, plan)
    return plan


def run_install(app: App, plan: Plan, install: dict[str, str]) -> None:
    index = None if app.args.offline else index_url_for(app, install)
    for step, req in plan.steps:
        if step == "bootstrap" and imports_ok(plan.venv, "yaml", "pydantic"):
            continue
        extra: list[str] = []
        env: dict[str, str] | None = None
        allow_wheels = True
        if step.startswith("llama-cpp"):
            if plan.llama == "cuda":
                env = {"CMAKE_ARGS": "-DGGML_CUDA=on", "FORCE_CMAKE": "1"}
                # pip's wheel cache ignores CMAKE_ARGS: a cached CPU build must not be reused.
                extra = ["--no-cache-dir", "--no-binary", "llama-cpp-python"]
                allow_wheels = app.bundle.get("llamacpp_wheel") == "cuda"
            else:
                allow_wheels = app.bundle.get("llamacpp_wheel") in ("cpu", None)
            say(f"  · llama-cpp-python: {plan.llama.upper()} build ({plan.llama_why}); compiling takes 5–20 min when "
                f"no built wheel is at hand / 没有现成 wheel 时编译需 5–20 分钟")
        say(f"  → {step} ({req}) …")
        pip_install(app, plan.venv, step, app.req(req), offline_only=app.args.offline, index=index,
                    extra_args=extra, env=env, allow_wheels=allow_wheels)


def imports_ok(venv: Path, *modules: str) -> bool:
    py = venv_python(venv)
    if not py.exists():
        return False
    code = "import " + ", ".join(modules)
    return subprocess.run([str(py), "-c", code], capture_output=True, env=_pip_env()).returncode == 0


# ---------------------------------------------------------------------------------------------
# configuration through the one schema (bundle/resolve.py)


def resolve_args(app: App) -> list[str]:
    a = app.args
    out = ["--manifest", str(app.manifest)]
    for flag, value in (("--backend", a.backend), ("--model", a.model), ("--host", a.host), ("--port", a.port),
                        ("--device", a.device), ("--torch", a.torch), ("--index-url", a.index_url)):
        if value is not None:
            out += [flag, str(value)]
    return out


def resolve(app: App, python: Path | str, *, check_model: bool = False, fetch: bool = False,
            no_choice: bool = False) -> dict[str, Any]:
    cmd = [str(python), "-m", "bundle.resolve", *resolve_args(app)]
    cmd += ["--check-model"] if check_model else []
    cmd += ["--no-choice"] if no_choice else []
    cmd += ["--fetch"] if fetch else []
    env = {**os.environ, "PYTHONPATH": str(app.dir)}
    done = subprocess.run(cmd, cwd=app.dir, stdout=subprocess.PIPE, text=True, env=env)
    lines = done.stdout.strip().splitlines()
    try:
        return json.loads(lines[-1])
    except (IndexError, ValueError):
        fail(f"✖ 内部错误 / internal error: `{' '.join(cmd)}` exited {done.returncode} without an answer:\n{done.stdout[-2000:]}")


def config_or_stop(result: dict[str, Any]) -> dict[str, Any]:
    if result.get("ok"):
        return result
    kind, error = result.get("kind"), result.get("error", "")
    if kind == "manifest":
        fail(f"✖ 配置无效 / Invalid configuration:\n{error}\n  修复 / Fix: correct the key or value named above "
             f"(manifest.yaml, the VT_* variable or the flag it came from); `bash 1键推理.sh doctor` shows the rest.", 2)
    if kind == "fetch":
        fail(f"✖ 模型下载失败 / Model download failed:\n  {error}")
    hint = "" if result.get("download") else (
        "\n  或在 manifest.yaml 设置 model.source.download: true 自动下载 / or set model.source.download: true to fetch it")
    if "does not exist" in error:
        fail(f"✖ 模型文件夹不存在 / Model folder not found:\n  {error}{hint}")
    fail(f"✖ 模型文件夹不完整或损坏 / Model folder incomplete or corrupt:\n  {error}")


# ---------------------------------------------------------------------------------------------
# server: start, wait, stop, status


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


def read_pid(app: App) -> dict[str, Any] | None:
    """The server recorded in run/server.json if that process is still alive and is ours."""
    try:
        info = json.loads(app.pid_file.read_text(encoding="utf-8"))
        pid = int(info["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    cmdline = Path(f"/proc/{pid}/cmdline")
    if cmdline.exists():
        args = cmdline.read_bytes().split(b"\0")
        if b"ui" not in args or b"serve" not in args:
            # Foreground: the pid file is written before exec; give the exec a moment.
            if b"bundle.oneclick" not in args:
                return None
    return info


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

    def alive() -> bool:
        try:
            os.kill(server_pid, 0)
            return True
        except ProcessLookupError:
            return False

    try:
        if wait_ready(host, port, alive, timeout):
            say(ready_message(url))
    finally:
        os._exit(0)


def ui_flags(app: App) -> list[str]:
    """The launcher's flags as ``python -m ui serve|config`` flags (the same precedence applies there)."""
    a = app.args
    flags = ["--manifest", str(app.manifest)]
    for flag, value in (("--backend", a.backend), ("--model", a.model), ("--host", a.host), ("--port", a.port)):
        if value is not None:
            flags += [flag, str(value)]
    if a.device:
        flags += ["--set", f"transformers.device={a.device}"]
    return flags


def serve_command(app: App, python: Path) -> list[str]:
    return [str(python), "-m", "ui", "serve", *ui_flags(app)]


def start_server(app: App, python: Path, cfg: dict[str, Any]) -> int:
    host, port = cfg["server"]["host"], int(cfg["server"]["port"])
    url = f"http://{connect_host(host)}:{port}"
    cmd = serve_command(app, python)
    env = {**os.environ, "PYTHONPATH": str(app.dir)}
    if app.args.offline:
        env.setdefault("HF_HUB_OFFLINE", "1")
    timeout = float(os.environ.get("VT_START_TIMEOUT", "1800"))
    app.run_dir.mkdir(parents=True, exist_ok=True)
    record = {"host": host, "port": port, "url": url, "drain_timeout_s": cfg["server"].get("drain_timeout_s", 85),
              "started": time.time()}
    if not app.args.daemon:
        record["pid"] = os.getpid()
        record["mode"] = "foreground"
        app.pid_file.write_text(json.dumps(record), encoding="utf-8")
        say(f"▶ 启动服务 (前台, Ctrl-C 停止) / starting the server in the foreground (Ctrl-C stops it): {' '.join(cmd)}")
        watcher(host, port, os.getpid(), url, timeout)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.chdir(app.dir)
        os.execve(str(python), cmd, env)
    app.logs.mkdir(parents=True, exist_ok=True)
    log = app.logs / "server.log"
    say(f"▶ 后台启动服务 / starting the server in the background: {' '.join(cmd)}\n  日志 / log: {log}")
    with open(log, "ab") as fh:
        proc = subprocess.Popen(cmd, cwd=app.dir, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    record.update(pid=proc.pid, mode="daemon", log=str(log))
    app.pid_file.write_text(json.dumps(record), encoding="utf-8")
    t0 = time.monotonic()
    if wait_ready(host, port, lambda: proc.poll() is None, timeout):
        say(f"  [{time.monotonic() - t0:.1f} s] /health → 200")
        say(ready_message(url))
        return 0
    if proc.poll() is not None:
        app.pid_file.unlink(missing_ok=True)
        fail(f"✖ 服务未能就绪 / Server did not become ready: it exited with code {proc.returncode}.\n"
             f"  日志 / log: {log}\n{tail(log, 30)}")
    fail(f"✖ 服务未能就绪 / Server did not become ready within {timeout:.0f} s (VT_START_TIMEOUT); it keeps running "
         f"(pid {proc.pid}): `bash 1键推理.sh status`, or stop it with `bash 1键推理.sh stop`.\n{tail(log, 30)}")


def cmd_stop(app: App) -> int:
    info = read_pid(app)
    if info is None:
        app.pid_file.unlink(missing_ok=True)
        say("· 服务没有在运行 / the server is not running (no live pid in run/server.json)")
        return 0
    pid = int(info["pid"])
    wait_s = float(info.get("drain_timeout_s", 85)) + 15
    say(f"■ 停止服务 / stopping pid {pid} (SIGTERM; in-flight requests get up to {wait_s - 15:.0f} s) …")
    t0 = time.monotonic()
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    while time.monotonic() - t0 < wait_s:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        if Path(f"/proc/{pid}/stat").exists() and Path(f"/proc/{pid}/stat").read_text().split(") ")[-1].startswith("Z"):
            break  # a zombie: exited, waiting for its parent to reap it
        time.sleep(0.3)
    else:
        os.kill(pid, signal.SIGKILL)
        app.pid_file.unlink(missing_ok=True)
        say(f"✖ 进程 {pid} 在 {wait_s:.0f} 秒内未退出, 已强制结束 / pid {pid} did not exit within {wait_s:.0f} s after SIGTERM: killed (SIGKILL)")
        return 1
    app.pid_file.unlink(missing_ok=True)
    say(f"✔ 已停止 / stopped (pid {pid}) in {time.monotonic() - t0:.1f} s")
    return 0


def cmd_status(app: App) -> int:
    info = read_pid(app)
    if info is None:
        say("· 未运行 / not running")
        return 3
    status, body = health(info["host"], int(info["port"]))
    state = {200: "就绪 / ready", 503: "加载中 / loading"}.get(status or 0, f"no answer ({status})")
    say(f"● 运行中 / running: pid {info['pid']} ({info.get('mode')}), {info['url']}, health: {state} {body.strip()[:200]}")
    if info.get("log"):
        say(f"  日志 / log: {info['log']}")
    return 0


# ---------------------------------------------------------------------------------------------
# start and doctor


def load_bundle_info(app: App) -> None:
    try:
        app.bundle = json.loads((app.dir / "BUNDLE.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        app.bundle = {"target": "cpu", "wheelhouse": "none"}
    if not (app.dir / "requirements").is_dir() and (app.dir / "pyproject.toml").is_file():
        # A git checkout: nothing was pinned by a bundle build, so install pyproject.toml's
        # ranges, with the torch build that suits this machine.
        app.bundle = {"target": "cuda" if gpu_info()[0] else "cpu", "wheelhouse": "none", "source": True}
        write_source_requirements(app)


def write_source_requirements(app: App) -> None:
    """Rewritten only when pyproject.toml changed them, so that the install stamp stays valid."""
    try:
        files = source_requirement_files(app.dir)
    except (OSError, KeyError, ValueError) as exc:
        fail(f"✖ 无法读取 / cannot read {app.dir / 'pyproject.toml'}: {exc}\n"
             f"  修复 / Fix: restore it from git (git checkout -- pyproject.toml), or use a release bundle.")
    for name, text in files.items():
        path = app.req(name)
        if path.is_file() and path.read_text(encoding="utf-8") == text:
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)


def preflight(app: App, install: dict[str, str]) -> tuple[bool, tuple[bool, str]]:
    say(f"  · {python_line()}")
    gpu, gpu_text = gpu_info()
    nvcc = nvcc_info()
    say(f"  · GPU: {gpu_text}")
    say(f"  · CUDA toolkit: {nvcc[1]}")
    w = app.wheels
    wheels = f"{w} ({sum(1 for _ in w.glob('*.whl'))} wheels)" if w else "none (pip index)"
    if app.source:
        say(f"  · 源码目录, 依赖按 pyproject.toml 的版本范围安装 / source checkout: dependencies from pyproject.toml's "
            f"ranges (a release bundle pins the tested versions); target {app.target}")
    else:
        say(f"  · wheelhouse: {wheels}, bundle target: {app.target}")
    return gpu, nvcc


def check_disk(app: App, install_needed: bool, torch_mode: str) -> None:
    need = needed_gb(install_needed, torch_mode)
    have = free_gb(app.dir)
    if have < need:
        fail(f"✖ 磁盘空间不足 / Not enough free disk space: {have:.1f} GB free in {app.dir}, need ≥ {need:.1f} GB "
             f"(VT_MIN_FREE_GB).\n  修复 / Fix: free space on that disk or move the app folder to a larger one.")
    ok(f"磁盘 / disk: {have:.1f} GB free (need {need:.1f} GB)")


def check_cuda_request(app: App, cfg: dict[str, Any], plan: Plan | None, gpu: bool, gpu_text: str) -> None:
    if gpu:
        return
    reasons = []
    if (app.args.torch or "") == "cuda" or (plan and plan.torch_mode == "cuda"):
        reasons.append("install.torch: cuda" if app.target != "cuda" or app.args.torch else "the cuda bundle installs the CUDA torch")
    tcfg = cfg.get("transformers", {})
    if tcfg.get("device") == "cuda" and (app.args.device == "cuda" or not tcfg.get("cpu_fallback", True)):
        reasons.append("transformers.device: cuda" + ("" if app.args.device else " with cpu_fallback: false"))
    if reasons:
        fail(f"✖ 请求了 CUDA, 但没有可用的 NVIDIA GPU / CUDA was requested ({'; '.join(reasons)}) but no NVIDIA GPU is "
             f"usable: {gpu_text}.\n  修复 / Fix: choose a GPU flavour, or run on the CPU: --torch cpu / --device cpu, "
             f"the cpu bundle, or --backend llamacpp.")


def check_port(cfg: dict[str, Any]) -> None:
    host, port = cfg["server"]["host"], int(cfg["server"]["port"])
    problem = port_problem(host, port)
    if problem:
        fail(f"✖ 端口已被占用 / Port {port} is already in use on {host}: {problem}.\n"
             f"  修复 / Fix: stop what listens there (if it is this app: bash 1键推理.sh stop; to see who: "
             f"ss -ltnp 'sport = :{port}'), or choose another port: --port N / VT_PORT=N.")
    ok(f"端口 / port {host}:{port} free")


def early_python(venv: Path) -> Path | None:
    """A Python that can already validate the configuration (has pyyaml + pydantic), if any."""
    for py in (venv_python(venv), Path(sys.executable)):
        if py.exists() and subprocess.run([str(py), "-c", "import yaml, pydantic"], capture_output=True,
                                          env=_pip_env()).returncode == 0:
            return py
    return None


def early_config(app: App, venv: Path) -> dict[str, Any] | None:
    """Validate the configuration before installing, when some Python already can."""
    py = early_python(venv)
    return config_or_stop(resolve(app, py)) if py else None


def early_model_check(app: App, venv: Path, cfg: dict[str, Any]) -> None:
    """Stop before a long install when the model folder is missing or broken (unless it will be downloaded)."""
    py = early_python(venv)
    if py is None or (cfg["model"]["source"]["download"] and not app.args.offline):
        return
    result = resolve(app, py, check_model=True, no_choice=True)
    if result.get("ok") or result.get("kind") != "model":
        return
    config_or_stop(result)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def cmd_start(app: App) -> int:
    # A platform stopping us (SIGTERM) during the install gets the same clean report as Ctrl-C.
    signal.signal(signal.SIGTERM, _interrupt)
    existing = read_pid(app)
    if existing is not None:
        say(f"● 已在运行 / already running: pid {existing['pid']}, {existing['url']}  (bash 1键推理.sh stop 停止 / to stop)")
        return 0
    t_all = time.monotonic()
    install = read_install_section(app.manifest)
    say("【1/5】环境检查 / preflight")
    gpu, nvcc = preflight(app, install)
    gpu_text = gpu_info()[1]
    venv_guess = Path(install.get("venv") or ".venv")
    venv_guess = venv_guess if venv_guess.is_absolute() else app.dir / venv_guess
    cfg_result = early_config(app, venv_guess)
    cfg = cfg_result["config"] if cfg_result else None
    plan = make_plan(app, install, cfg, gpu, nvcc)
    stamp_ok = read_stamp(plan.venv).get("key") == plan.key and venv_python(plan.venv).exists()
    check_disk(app, not stamp_ok, plan.torch_mode)
    if cfg is not None:
        check_cuda_request(app, cfg, plan, gpu, gpu_text)
        check_port(cfg)
        if not stamp_ok:
            early_model_check(app, venv_guess, cfg)

    say("【2/5】安装依赖 / install")
    if stamp_ok:
        ok(f"依赖已安装, 跳过安装 / dependencies already installed, skipping install ({plan.venv})")
    else:
        t0 = time.monotonic()
        say(f"  · venv: {plan.venv}; torch: {plan.torch_mode}"
            + (f" (reusing the platform's torch {plan.torch_version} / 复用平台自带 torch)" if plan.torch_version else ""))
        step = "venv"
        try:
            ensure_venv(plan.venv, reuse=plan.torch_mode == "reuse")
            if cfg is None:
                step = "bootstrap"
                run_install(app, Plan(plan.venv, plan.torch_mode, None, "none", "", [("bootstrap", "bootstrap.txt")]), install)
                cfg = config_or_stop(resolve(app, venv_python(plan.venv)))["config"]
                plan = make_plan(app, install, cfg, gpu, nvcc)
                check_cuda_request(app, cfg, plan, gpu, gpu_text)
                check_port(cfg)
            step = "packages"
            run_install(app, plan, install)
        except KeyboardInterrupt:
            fail(f"⚠ 安装被中断 / Install interrupted (during {step}). 已完成的部分会保留, 重新运行 bash 1键推理.sh 即可继续 / "
                 f"what finished is kept: rerun bash 1键推理.sh to resume (the install stamp is written only after success).", 130)
        (plan.venv / STAMP_NAME).write_text(json.dumps({"key": plan.key, "steps": plan.steps, "time": time.time()}),
                                            encoding="utf-8")
        ok(f"安装完成 / install complete in {time.monotonic() - t0:.1f} s")
    vpy = venv_python(plan.venv)

    say("【3/5】配置 / configuration")
    result = config_or_stop(resolve(app, vpy))
    cfg = result["config"]
    check_cuda_request(app, cfg, plan, gpu, gpu_text)
    ok(f"backend {cfg['backend']}, model {cfg['model']['path']}, listen {cfg['server']['host']}:{cfg['server']['port']}")

    say("【4/5】模型检查 / model check")
    t0 = time.monotonic()
    result = config_or_stop(resolve(app, vpy, check_model=True, fetch=not app.args.offline))
    ok(f"[{time.monotonic() - t0:4.1f} s] {result['model']['path']} ({result['model']['kind']}); {result.get('choice', '')}")
    check_port(cfg)

    say(f"【5/5】启动 / start  (preparation took {time.monotonic() - t_all:.1f} s)")
    return start_server(app, vpy, cfg)


def cmd_doctor(app: App) -> int:
    problems = 0
    install = read_install_section(app.manifest)
    say("== doctor: 只检查, 不启动 / checks only, nothing is started ==")
    gpu, nvcc = preflight(app, install)
    venv = Path(install.get("venv") or ".venv")
    venv = venv if venv.is_absolute() else app.dir / venv
    try:
        cfg_result = early_config(app, venv)
    except Stop as exc:
        say(str(exc))
        return 1
    cfg = cfg_result["config"] if cfg_result else None
    plan = make_plan(app, install, cfg, gpu, nvcc)
    stamp_ok = read_stamp(plan.venv).get("key") == plan.key and venv_python(plan.venv).exists()
    say(f"  · venv {plan.venv}: {'installed and current / 已安装' if stamp_ok else 'install needed / 需要安装'}; "
        f"torch: {plan.torch_mode}{' ' + plan.torch_version if plan.torch_version else ''}; llama.cpp: {plan.llama} ({plan.llama_why})")
    index = index_url_for(app, install)
    if not stamp_ok and not app.args.offline:
        problem = index_problem(index[0])
        (warn if problem else ok)(f"pip index {index[0]} ({index[1]}): {problem or 'reachable'}")
        problems += bool(problem) and not app.wheels
    for check in (lambda: check_disk(app, not stamp_ok, plan.torch_mode),
                  lambda: cfg and check_cuda_request(app, cfg, plan, gpu, gpu_text=gpu_info()[1]),
                  lambda: cfg and check_port(cfg)):
        try:
            check()
        except Stop as exc:
            say(str(exc))
            problems += 1
    if cfg is None:
        warn("配置将在安装 pyyaml/pydantic 后校验 / the configuration is validated once pyyaml + pydantic are installed")
    else:
        checker = venv_python(plan.venv) if stamp_ok else early_python(venv)
        result = resolve(app, checker, check_model=True, no_choice=not stamp_ok) if checker else {"ok": True}
        if result.get("ok") and "model" in result:
            ok(f"model {result['model']['path']} ({result['model']['kind']}); {result.get('choice', '')}")
        else:
            try:
                config_or_stop(result)
            except Stop as exc:
                say(str(exc))
                problems += 1
    if cfg is not None and stamp_ok:
        done = subprocess.run([str(venv_python(plan.venv)), "-m", "ui", "config", *ui_flags(app)], cwd=app.dir, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(app.dir)})
        say("  · 生效配置 / effective configuration (python -m ui config):")
        say("\n".join("    " + line for line in (done.stdout or done.stderr).splitlines()))
    if cfg is not None and not stamp_ok:
        say("  · 生效配置 / effective configuration:")
        say("\n".join("    " + line for line in json.dumps(cfg, indent=2, ensure_ascii=False).splitlines()))
    running = read_pid(app)
    say(f"  · server: {'running, pid ' + str(running['pid']) if running else 'not running'}")
    say(f"== {problems} problem(s) / 发现 {problems} 个问题 ==")
    return 1 if problems else 0


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="1键推理.sh", add_help=False)
    p.add_argument("command", nargs="?", default="start", choices=["start", "stop", "status", "doctor"])
    p.add_argument("--app-dir", required=True)
    p.add_argument("--backend", choices=["auto", "transformers", "llamacpp"])
    p.add_argument("--model")
    p.add_argument("--port", type=int)
    p.add_argument("--host")
    p.add_argument("--manifest")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"])
    p.add_argument("--torch", choices=["reuse", "cpu", "cuda"])
    p.add_argument("--index-url", dest="index_url")
    p.add_argument("--daemon", action="store_true")
    p.add_argument("--offline", action="store_true")
    p.add_argument("--llama-cpu", action="store_true", dest="llama_cpu")

    def error(message: str) -> NoReturn:
        raise Stop(f"✖ 参数错误 / bad argument: {message}. 查看全部参数 / all options: bash 1键推理.sh --help", 2)

    p.error = error  # type: ignore[method-assign]
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse(sys.argv[1:] if argv is None else argv)
        app = App(dir=Path(args.app_dir).resolve(), args=args)
        if args.model:
            args.model = str(Path(args.model).expanduser().resolve())
        if args.manifest and not Path(args.manifest).expanduser().is_file():
            fail(f"✖ 找不到配置文件 / manifest not found: {args.manifest}. 修复 / Fix: pass an existing file to --manifest.", 2)
        load_bundle_info(app)
        os.chdir(app.dir)
        if args.command == "stop":
            return cmd_stop(app)
        if args.command == "status":
            return cmd_status(app)
        if args.command == "doctor":
            return cmd_doctor(app)
        return cmd_start(app)
    except Stop as exc:
        print(str(exc), flush=True)
        return exc.code
    except KeyboardInterrupt:
        print("⚠ 已中断 / interrupted", flush=True)
        return 130


if __name__ == "__main__":
    sys.exit(main())
