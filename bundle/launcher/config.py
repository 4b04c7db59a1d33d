"""The configuration, read through the one schema: the launcher asks ``python -m bundle.resolve``.
Standard library only on this side; resolve runs in a Python that has the schema's libraries.

The chicken and the egg. ``manifest.yaml`` is read only through backends/config (pyyaml,
pydantic, pydantic-settings; the engine registry, which decides the install plan, also needs
numpy), and where the app's venv lives is itself a manifest key (``install.venv``, settable from
the file, ``VT_INSTALL__VENV`` or a flag). So the venv cannot hold the libraries that find the venv.
The launcher breaks the circle with a Python of its own that no setting moves:

1. the platform's Python, when it already imports those libraries (nothing to install); else
2. ``run/launcher-env``, a small venv owned by the launcher (bundle/reqfiles.py ``BOOTSTRAP``,
   from wheels/ when offline, else the index), made once under the install lock.

That Python answers with the effective configuration (so ``install.venv``, ``install.torch``,
``install.index_url`` come from the same precedence as every other key), the model check and the
install plan; only then is the app's venv made where the configuration says. The one thing that
happens before the manifest is read — installing the bootstrap libraries — therefore uses only
sources that need no manifest: wheels/, the --index-url flag and pip's own configuration
(PIP_INDEX_URL, pip.conf); ``install.index_url`` applies from the next step on, and the
"pip index unreachable" message of that first step says so. Nothing here copies a schema default.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from .app import App
from .install import bootstrap_ready, install_bootstrap
from .lock import InstallLock
from .output import fail

# Launcher flag -> dotted manifest key; the same overrides reach resolve, `ui config` and `ui serve`.
SET_KEYS = {"device": "transformers.device", "torch": "install.torch", "index_url": "install.index_url"}


def config_flags(app: App) -> list[str]:
    """The launcher's configuration flags as ``python -m ui`` / ``bundle.resolve`` flags."""
    a = app.args
    flags = ["--manifest", a.manifest] if a.manifest else []
    for flag, value in (("--backend", a.backend), ("--model", a.model), ("--host", a.host), ("--port", a.port)):
        if value is not None:
            flags += [flag, str(value)]
    for attr, key in SET_KEYS.items():
        if getattr(a, attr) is not None:
            flags += ["--set", f"{key}={getattr(a, attr)}"]
    for item in a.sets:
        flags += ["--set", item]
    return flags


def resolve(app: App, python: Path | str, *options: str, probe: bool = False) -> dict[str, Any] | None:
    """``python -m bundle.resolve`` with the launcher's flags; its JSON answer.

    ``probe``: None (instead of stopping) when ``python`` cannot run it (its libraries are missing).
    """
    cmd = [str(python), "-m", "bundle.resolve", *config_flags(app), *options]
    done = subprocess.run(cmd, cwd=app.dir, stdout=subprocess.PIPE, stderr=subprocess.PIPE if probe else None,
                          text=True, env=app.child_env())
    lines = done.stdout.strip().splitlines()
    try:
        answer = json.loads(lines[-1])
        if isinstance(answer, dict) and "ok" in answer:
            return answer
    except (IndexError, ValueError):
        pass
    if probe:
        return None
    fail(f"✖ 内部错误 / internal error: `{' '.join(cmd)}` exited {done.returncode} without an answer:\n"
         f"{done.stdout[-2000:]}")


def existing_config_python(app: App, *options: str) -> tuple[Path | None, dict[str, Any] | None]:
    """A Python that reads the manifest without installing anything, and its first answer."""
    candidates = [Path(sys.executable)]
    ready = bootstrap_ready(app)
    if ready is not None:
        candidates.append(ready)
    for python in candidates:
        answer = resolve(app, python, *options, probe=True)
        if answer is not None:
            return python, answer
    return None, None


def config_python(app: App, lock: InstallLock, *options: str) -> tuple[Path, dict[str, Any]]:
    """A Python that reads the manifest (installing the bootstrap libraries if needed), and its answer."""
    python, answer = existing_config_python(app, *options)
    if python is not None and answer is not None:
        return python, answer
    python = install_bootstrap(app, lock)
    answer = resolve(app, python, *options)
    assert answer is not None
    return python, answer


def config_or_stop(result: dict[str, Any]) -> dict[str, Any]:
    """The answer when it is good; otherwise stop with the message for its kind of problem."""
    if result.get("ok"):
        return result
    kind, error = result.get("kind"), result.get("error", "")
    if kind == "manifest":
        fail(f"✖ 配置无效 / Invalid configuration:\n{error}\n  修复 / Fix: correct the key or value named above "
             f"(manifest.yaml, the VT_* variable or the flag it came from); `bash 1键推理.sh doctor` shows the rest.", 2)
    if kind == "engines":
        fail(f"✖ 引擎模块无法加载 / An engine module cannot be loaded:\n  {error}\n  修复 / Fix: correct or unset "
             f"VT_ENGINE_MODULES (comma-separated importable modules, each defining ENGINE = EngineSpec(...)); "
             f"PYTHONPATH must reach them.", 2)
    if kind == "fetch":
        fail(f"✖ 模型下载失败 / Model download failed:\n  {error}")
    hint = "" if result.get("download") else (
        "\n  或在 manifest.yaml 设置 model.source.download: true 自动下载 / or set model.source.download: true to fetch it")
    if "does not exist" in error:
        fail(f"✖ 模型文件夹不存在 / Model folder not found:\n  {error}{hint}")
    fail(f"✖ 模型文件夹不完整或损坏 / Model folder incomplete or corrupt:\n  {error}")


def gpu_flag(gpu: bool) -> list[str]:
    return ["--gpu", "yes" if gpu else "no"]
