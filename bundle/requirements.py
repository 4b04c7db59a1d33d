"""Pinned requirement files for a bundle, taken from the environment that builds it.

Why pin from the build environment instead of a resolver run: the build machine is the one whose
test suite passed, so its exact versions are the known-good set. The closure of the project's
dependencies is walked through installed metadata (markers evaluated for this platform), and
every package gets ``==version``. torch and llama-cpp-python get files of their own because the
one-click script decides about them at install time (reuse the platform's torch, CPU or CUDA
build; llama.cpp only when that backend can be chosen).
"""
from __future__ import annotations

from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from .reqfiles import BOOTSTRAP, SEPARATE, torch_cpu_text, torch_cuda_text
from .reqfiles import read_pyproject as project_metadata


class RequirementsError(RuntimeError):
    """The build environment cannot produce pinned requirements (message is user-ready)."""


@dataclass(frozen=True)
class PinnedSet:
    files: dict[str, str]  # file name under requirements/ -> text
    torch_version: str  # base version, e.g. "2.13.0"
    llamacpp_version: str | None


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
                f'pip install torch==2.13.0 && pip install -e ".[llamacpp]"'
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
    deps = [Requirement(d) for d in project["dependencies"]]
    base = _closure(deps, exclude=set(SEPARATE))
    bootstrap = _closure([Requirement(r) for r in BOOTSTRAP], exclude=set(SEPARATE))
    try:
        torch_version = metadata.version("torch").split("+", 1)[0]
    except metadata.PackageNotFoundError:
        raise RequirementsError("torch is not installed in the build environment: pip install torch==2.13.0") from None
    llama_extra = [Requirement(d) for d in project.get("optional-dependencies", {}).get("llamacpp", [])]
    try:
        llama = _closure(llama_extra, exclude={"torch"})
        llamacpp_version = llama.get("llama-cpp-python")
        llama = {k: v for k, v in llama.items() if k not in base or k == "llama-cpp-python"}
    except RequirementsError:
        llama, llamacpp_version = {}, None

    header = "# Pinned from the environment that built this bundle (bundle/requirements.py).\n"
    files = {
        "bootstrap.txt": header + _lines(bootstrap),
        "base.txt": header + "# Everything the app needs except torch and llama-cpp-python.\n" + _lines(base),
        "torch-cpu.txt": torch_cpu_text(header, f"torch=={torch_version}+cpu", f"torch=={torch_version}"),
        "torch-cuda.txt": torch_cuda_text(header, f"torch=={torch_version}"),
    }
    if llamacpp_version:
        files["llamacpp.txt"] = (
            header
            + "# Compiled at install time unless wheels/ holds a built wheel; CMAKE_ARGS=-DGGML_CUDA=on for GPUs.\n"
            + _lines(llama)
        )
    else:
        files["llamacpp.txt"] = header + "".join(f"{r}\n" for r in llama_extra)
    modelscope = project.get("optional-dependencies", {}).get("modelscope", [])
    files["modelscope.txt"] = "# Optional: model downloads from ModelScope.\n" + "".join(f"{r}\n" for r in modelscope)
    return PinnedSet(files=files, torch_version=torch_version, llamacpp_version=llamacpp_version)
