"""Pinned requirement files for a bundle, taken from the environment that builds it.

Why pin from the build environment instead of a resolver run: the build machine is the one whose
test suite passed, so its exact versions are the known-good set. The closure of each group's
requirements is walked through installed metadata (markers evaluated for this platform), and
every package gets ``==version``. The groups and files are the same as a git checkout's
(bundle/reqfiles.py): bootstrap, core, one file per extra, torch per build. An extra's file holds
only what the core does not already pin; torch is taken out of every group, because the launcher
decides about it at install time (reuse the platform's torch, CPU or CUDA build).
"""
from __future__ import annotations

from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from .reqfiles import (
    BOOTSTRAP,
    BOOTSTRAP_FILE,
    CORE_FILE,
    INDEX_NAME,
    LLAMA_CPP,
    TORCH,
    extra_file,
    index_text,
    shipped_extras,
    torch_cpu_text,
    torch_cuda_text,
    torch_file,
)
from .reqfiles import read_pyproject as project_metadata

__all__ = ["PinnedSet", "RequirementsError", "pinned_requirements", "project_metadata"]


class RequirementsError(RuntimeError):
    """The build environment cannot produce pinned requirements (message is user-ready)."""


@dataclass(frozen=True)
class PinnedSet:
    files: dict[str, str]  # file name under requirements/ -> text
    torch_version: str | None  # base version, e.g. "2.13.0"; None when no group needs torch
    llamacpp_version: str | None  # pinned llama-cpp-python, when an extra has it installed here


def _closure(roots: list[Requirement], exclude: set[str]) -> dict[str, str]:
    """name -> version for ``roots`` and everything they need, from installed metadata."""
    env = default_environment()
    pins: dict[str, str] = {}
    seen: set[tuple[str, frozenset[str]]] = set()
    queue: list[Requirement] = list(roots)
    while queue:
        req = queue.pop()
        name = canonicalize_name(req.name)
        if name in exclude:
            continue
        key = (name, frozenset(req.extras))
        if key in seen:
            continue
        seen.add(key)
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            raise RequirementsError(
                f"{req.name} is required but not installed in the build environment "
                f"({env['python_full_version']}). Install the project first: "
                f'pip install torch==2.13.0 && pip install -e ".[transformers,llamacpp]"'
            ) from None
        pins[name] = dist.version
        for text in dist.requires or []:
            sub = Requirement(text)
            if sub.marker is not None:
                extras = set(req.extras) | {""}
                if not any(sub.marker.evaluate({**env, "extra": e}) for e in extras):
                    continue
            queue.append(sub)
    return pins


def _lines(pins: dict[str, str]) -> str:
    return "".join(f"{name}=={version}\n" for name, version in sorted(pins.items()))


def pinned_requirements(root: Path) -> PinnedSet:
    """The requirement files of a bundle, pinned to the versions installed here."""
    project = project_metadata(root)
    core_reqs = list(project["dependencies"])
    extras = shipped_extras(project)
    header = "# Pinned from the environment that built this bundle (bundle/requirements.py).\n"
    core = _closure([Requirement(d) for d in core_reqs], exclude={TORCH})
    files = {
        BOOTSTRAP_FILE: header + _lines(_closure([Requirement(r) for r in BOOTSTRAP], exclude={TORCH})),
        CORE_FILE: header + "# The core: the page, the API, the configuration (no engine).\n" + _lines(core),
        INDEX_NAME: index_text(core_reqs, extras),
    }
    llamacpp_version = None
    for name, reqs in extras.items():
        try:
            pins = _closure([Requirement(r) for r in reqs], exclude={TORCH})
        except RequirementsError as exc:
            # Not installed where the bundle is built: pip resolves pyproject.toml's ranges.
            files[extra_file(name)] = (header + f"# Not pinned ({exc}): pyproject.toml's ranges.\n"
                                       + "".join(f"{r}\n" for r in reqs if Requirement(r).name != TORCH))
            continue
        llamacpp_version = llamacpp_version or pins.get(LLAMA_CPP)
        comment = (f"# Extra [{name}]: what it needs beyond the core"
                   + ("; torch is a step of its own" if any(Requirement(r).name == TORCH for r in reqs) else "")
                   + ("; llama-cpp-python compiles at install time unless wheels/ has it (CMAKE_ARGS for CUDA)"
                      if LLAMA_CPP in pins else "") + ".\n")
        files[extra_file(name)] = header + comment + _lines({k: v for k, v in pins.items() if k not in core})
    needs_torch = any(Requirement(r).name == TORCH for r in core_reqs + [r for v in extras.values() for r in v])
    torch_version = None
    if needs_torch:
        try:
            torch_version = metadata.version(TORCH).split("+", 1)[0]
        except metadata.PackageNotFoundError:
            raise RequirementsError("torch is not installed in the build environment: pip install torch==2.13.0") from None
        files[torch_file("cpu")] = torch_cpu_text(header, f"torch=={torch_version}+cpu", f"torch=={torch_version}")
        files[torch_file("cuda")] = torch_cuda_text(header, f"torch=={torch_version}")
    return PinnedSet(files=files, torch_version=torch_version, llamacpp_version=llamacpp_version)
