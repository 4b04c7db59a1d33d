"""Virtual environments: the launcher's bootstrap environment and the app's venv (install.venv).
Standard library only (the platform's bare Python creates them).

A venv is created with ``python -m venv`` (ensurepip brings pip). While it is being made, a mark
file inside it holds the creating launch's pid: a venv left half-made by a launch that died is
recreated, one that a live launch is still making is never touched. Creation happens under the
install lock (lock.py), so two launches of one folder never race here; the mark also covers a
venv shared by two app folders (an absolute install.venv). When ``venv`` fails, the message names
the cause it can tell apart: no venv support in this Python (Debian's python3.X-venv), another
launch working on the same venv, or a full disk.
"""
from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from .lock import pid_alive
from .output import fail, ok, warn

CREATING_MARK = ".vt-creating"
REUSE_PTH = "zz_vibethinker_platform_site.pth"
MIN_FREE_MB = 300  # below this a venv (pip ~ 15 MB) with its packages cannot be made


def venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text.split("+")[0])[:3])


def platform_torch(python: str) -> str | None:
    """Version of the torch the platform's Python imports, or None."""
    try:
        out = subprocess.run([python, "-c", "import torch; print(torch.__version__)"], capture_output=True,
                             text=True, timeout=180, env=clean_env())
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[-1] if out.returncode == 0 and out.stdout.strip() else None


def platform_site_dirs() -> list[str]:
    import site

    dirs = list(site.getsitepackages())
    if site.ENABLE_USER_SITE and os.path.isdir(site.getusersitepackages()):
        dirs.append(site.getusersitepackages())
    return [d for d in dirs if os.path.isdir(d)]


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """pip's and venv's environment: nothing of the user's PYTHONPATH or user site leaks in."""
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PYTHONNOUSERSITE": "1"}
    env.pop("PYTHONPATH", None)
    env.update(extra or {})
    return env


def die_with_launcher() -> None:
    """In a child (pip, venv): exit when the launcher dies, so a killed launch leaves nothing
    writing on (the next launch takes the lock over and redoes the step)."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass


def _mark_owner(venv: Path) -> int | None:
    try:
        text = (venv / CREATING_MARK).read_text(encoding="utf-8").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else 0


def _site_dir(venv: Path) -> Path:
    return next(iter(sorted(venv.glob("lib/python3*/site-packages"))), None) or venv / "Lib" / "site-packages"


def ensure_venv(venv: Path, *, reuse_platform: bool, app_dir: Path, log: Path) -> None:
    """Make ``venv`` if it is missing (or was left half-made), then set the platform .pth.

    ``reuse_platform``: append the platform Python's site-packages to the venv's (after it, so the
    app's pinned packages win) — how the platform's torch is reused.
    """
    py = venv_python(venv)
    owner = _mark_owner(venv)
    if owner is not None or (venv.exists() and not py.exists()):
        if owner and owner != os.getpid() and pid_alive(owner):
            fail(f"✖ 另一个启动正在创建虚拟环境 / The venv {venv} is being created by another launch (pid {owner}).\n"
                 f"  修复 / Fix: wait for it to finish and rerun; if another app folder uses the same install.venv, "
                 f"give each folder its own (install.venv in manifest.yaml).")
        who = f" (by pid {owner}, no longer running)" if owner else ""
        warn(f"上次创建虚拟环境未完成, 重新创建 / the venv {venv} was left half-created{who}: recreating it")
        shutil.rmtree(venv, ignore_errors=True)
    if not py.exists():
        create_venv(venv, app_dir=app_dir, log=log)
    pth = _site_dir(venv) / REUSE_PTH
    if reuse_platform:
        # addsitedir (not a bare path) so that the platform's own .pth files are processed too.
        lines = [f"import site; site.addsitedir({d!r})" for d in platform_site_dirs()]
        pth.write_text("\n".join(lines) + "\n", encoding="utf-8")
    elif pth.exists():
        pth.unlink()


def create_venv(venv: Path, *, app_dir: Path, log: Path) -> None:
    t0 = time.monotonic()
    try:
        venv.mkdir(parents=True, exist_ok=True)
        (venv / CREATING_MARK).write_text(str(os.getpid()), encoding="utf-8")
    except OSError as exc:
        cause = ("磁盘已满 / the disk is full" if exc.errno == errno.ENOSPC else
                 "没有写权限 / no permission to write there" if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS)
                 else exc.strerror)
        fail(f"✖ 无法创建虚拟环境 / Cannot create the virtual environment {venv}: {exc}\n"
             f"  原因 / Cause: {cause}.\n  修复 / Fix: free space or fix the permissions there, or set install.venv "
             f"in manifest.yaml to a folder you can write (relative paths are inside the app folder).")
    done = subprocess.run([sys.executable, "-m", "venv", str(venv)], capture_output=True, text=True, env=clean_env(),
                          preexec_fn=die_with_launcher)
    output = (done.stderr or "") + (done.stdout or "")
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(f"$ {sys.executable} -m venv {venv}\n{output}", encoding="utf-8")
    if done.returncode != 0:
        message = venv_failure(venv, output, app_dir=app_dir, log=log)
        if _mark_owner(venv) == os.getpid():  # never delete what another launch now works on
            shutil.rmtree(venv, ignore_errors=True)
        fail(message)
    (venv / CREATING_MARK).unlink()
    ok(f"虚拟环境已创建 / venv created: {venv} ({time.monotonic() - t0:.1f} s)")


def has_venv_support(python: str = sys.executable) -> bool:
    """Whether this Python can make a venv with pip in it (Debian's python3 lacks ensurepip unless
    python3.X-venv is installed)."""
    probe = subprocess.run([python, "-c", "import venv, ensurepip; ensurepip.version()"], capture_output=True,
                           env=clean_env())
    return probe.returncode == 0


def venv_failure(venv: Path, output: str, *, app_dir: Path, log: Path) -> str:
    """The message for a failed ``python -m venv``, naming the cause this launch can tell apart."""
    detail = " ".join(output.strip().splitlines()[-3:])
    head = f"✖ 无法创建虚拟环境 / Cannot create the virtual environment {venv}: {detail}\n"
    owner = _mark_owner(venv)
    if not has_venv_support():
        ver = f"{sys.version_info.major}.{sys.version_info.minor}"
        return (head + f"  修复 / Fix: apt-get install -y python{ver}-venv (Debian/Ubuntu), or use conda "
                f"(conda create -y -p {app_dir / '.conda-py311'} python=3.11), then rerun.")
    if owner != os.getpid():
        who = f"pid {owner}" if owner else "another process"
        return (head + f"  原因 / Cause: 另一个启动同时在改动这个虚拟环境 / another launch ({who}) changed this venv while "
                f"this one created it (this Python's venv support is fine).\n"
                f"  修复 / Fix: let one launch finish, then rerun; give each app folder its own install.venv.")
    free_mb = _free_mb(venv)
    if "No space left" in output or "Errno 28" in output or free_mb < MIN_FREE_MB:
        return (head + f"  原因 / Cause: 磁盘已满 / the disk is full: {free_mb:.0f} MB free where the venv goes.\n"
                f"  修复 / Fix: free space on that disk (or move the app folder / install.venv to a larger one), "
                f"then rerun.")
    return (head + f"  This Python's venv support is fine (ensurepip imports) and the disk has room: the output "
            f"above is the cause. Log: {log}\n"
            f"  修复 / Fix: rerun; if it fails again, try another Python: VT_PYTHON=/path/to/python3.11 bash 1键推理.sh")


def _free_mb(path: Path) -> float:
    probe = path
    while not probe.exists():
        probe = probe.parent
    return shutil.disk_usage(probe).free / 2**20
