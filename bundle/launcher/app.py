"""The app folder the launcher works in: its files, what kind of folder it is, and the environment
the launcher's children get. Standard library only (runs on the platform's bare Python).

An app folder is either an extracted release bundle (``BUNDLE.json``, ``requirements/`` pinned by
the build) or a git checkout (``pyproject.toml``, no ``requirements/``), whose requirement files
are written under ``run/requirements/`` from pyproject.toml's ranges on every start.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..reqfiles import INDEX_NAME, source_requirement_files
from .output import fail

# Created at run time inside the app folder (never in SHA256SUMS): logs, pid records, the lock,
# the launcher's own bootstrap environment, a checkout's requirement files.
LOGS = "logs"
RUN = "run"


@dataclass
class App:
    dir: Path
    args: argparse.Namespace
    bundle: dict[str, Any] = field(default_factory=dict)

    @property
    def logs(self) -> Path:
        return self.dir / LOGS

    @property
    def run_dir(self) -> Path:
        return self.dir / RUN

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

    def req_index(self) -> dict[str, Any]:
        """requirements/index.json: the requirement file of the core, of each extra, of torch."""
        path = self.req(INDEX_NAME)
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            fail(f"✖ 发布包不完整 / The bundle is incomplete: cannot read {path} ({exc}).\n"
                 f"  修复 / Fix: extract the bundle again (python -m bundle verify <archive> checks it).")

    def venv(self, cfg: dict[str, Any]) -> Path:
        """install.venv of the effective configuration; relative paths are inside the app folder."""
        path = Path(str(cfg["install"]["venv"])).expanduser()
        return path if path.is_absolute() else self.dir / path

    def child_env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """The environment of ``python -m bundle.resolve`` and ``python -m ui``: the app folder first
        on the path, then whatever the user had there (plugin engines: VT_ENGINE_MODULES)."""
        user = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
                if p and Path(p).expanduser().resolve() != self.dir.resolve()]
        return {**os.environ, "PYTHONPATH": os.pathsep.join([str(self.dir), *user]), **(extra or {})}


def load_bundle_info(app: App, gpu: Callable[[], bool]) -> None:
    try:
        app.bundle = json.loads((app.dir / "BUNDLE.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        app.bundle = {"target": "cpu", "wheelhouse": "none"}
    if not (app.dir / "requirements").is_dir() and (app.dir / "pyproject.toml").is_file():
        # A git checkout: nothing was pinned by a bundle build, so install pyproject.toml's
        # ranges, with the torch build that suits this machine.
        app.bundle = {"target": "cuda" if gpu() else "cpu", "wheelhouse": "none", "source": True}
        write_source_requirements(app)


def write_source_requirements(app: App) -> None:
    """Rewritten only when pyproject.toml changed them, so that the install stamp stays valid.

    Each file is replaced atomically through a temporary file of its own, so that two launches
    starting at once never see (or write) half a file.
    """
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
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{name}.")
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
