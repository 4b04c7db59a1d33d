"""The requirement files the one-click script installs, as text. Standard library only.

Two sources write the same set of files (bootstrap, base, torch-cpu, torch-cuda, llamacpp,
modelscope): a bundle build pins them to its tested environment (bundle/requirements.py), and a
git checkout, which has no build environment to pin from, takes ``pyproject.toml``'s ranges so
that ``bash 1键推理.sh`` works there too. This module is imported by bundle/oneclick.py on the
platform's bare Python, before anything is installed — hence no ``packaging``, and a small
fallback for Python 3.10, whose standard library has no TOML parser.
"""
from __future__ import annotations

import re
from pathlib import Path

# PyPI's Linux torch wheel is the CUDA build (several GB); CPU machines take PyTorch's CPU index.
CPU_TORCH_INDEX = "https://download.pytorch.org/whl/cpu"
# Installed first, so that manifest.yaml is validated through the one schema before gigabytes.
BOOTSTRAP = ("pyyaml", "pydantic")
# The one-click script decides about these at install time (reuse, CPU/CUDA build, backend).
SEPARATE = ("torch", "llama-cpp-python")


def torch_cpu_text(header: str, linux: str, other: str) -> str:
    return (header
            + "# CPU build: PyTorch's CPU index on Linux (PyPI's Linux wheel is the CUDA build, several GB).\n"
            + f"--extra-index-url {CPU_TORCH_INDEX}\n"
            + f'{linux} ; sys_platform == "linux"\n'
            + f'{other} ; sys_platform != "linux"\n')


def torch_cuda_text(header: str, requirement: str) -> str:
    return header + "# CUDA build: PyPI's Linux wheel.\n" + f"{requirement}\n"


def requirement_name(text: str) -> str:
    """``"llama-cpp-python>=0.3"`` → ``"llama-cpp-python"``, normalised as PEP 503 does."""
    m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", text)
    return re.sub(r"[-_.]+", "-", m.group(1)).lower() if m else ""


def _code(line: str) -> str:
    """``line`` without its comment (a ``#`` outside a string)."""
    quoted = False
    for i, ch in enumerate(line):
        if ch == '"':
            quoted = not quoted
        elif ch == "#" and not quoted:
            return line[:i]
    return line


def _toml_string_array(text: str, table: str, key: str) -> list[str] | None:
    """``key = ["a", "b"]`` in ``[table]`` of a simple TOML file (Python 3.10 has no tomllib).

    Enough for our own pyproject.toml: arrays of double-quoted strings, comments, several lines.
    """
    inside, body = False, None
    for line in text.splitlines():
        code = _code(line)
        if body is not None:
            body.append(code)
        elif re.match(r"^\s*\[[^\[\]]+\]\s*$", code):
            inside = code.strip()[1:-1].strip() == table
            continue
        elif inside and re.match(rf"^\s*{re.escape(key)}\s*=\s*\[", code):
            body = [code.split("[", 1)[1]]
        else:
            continue
        if "]" in re.sub(r'"[^"]*"', "", body[-1]):
            return re.findall(r'"([^"]*)"', "\n".join(body))
    return None


def read_pyproject(root: Path) -> dict:
    """``{"version", "dependencies", "optional-dependencies"}`` of the project at ``root``."""
    text = (root / "pyproject.toml").read_text(encoding="utf-8")
    try:
        import tomllib
    except ImportError:  # Python 3.10
        version = re.search(r'(?m)^version\s*=\s*"([^"]+)"', text)
        extras = {}
        for name in ("llamacpp", "modelscope"):
            found = _toml_string_array(text, "project.optional-dependencies", name)
            if found is not None:
                extras[name] = found
        return {"version": version.group(1) if version else "0",
                "dependencies": _toml_string_array(text, "project", "dependencies") or [],
                "optional-dependencies": extras}
    return tomllib.loads(text)["project"]


def source_requirement_files(root: Path) -> dict[str, str]:
    """The requirement files for a git checkout: pyproject.toml's ranges, resolved by pip."""
    project = read_pyproject(root)
    deps = list(project["dependencies"])
    extras = project.get("optional-dependencies", {})
    by_name = {requirement_name(d): d for d in deps}
    torch = by_name.get("torch", "torch")
    header = ("# From pyproject.toml's ranges (a git checkout; a release bundle pins the tested versions).\n"
              "# Written by bundle/reqfiles.py on every start: edit pyproject.toml, not this file.\n")
    return {
        "bootstrap.txt": header + "".join(f"{by_name.get(n, n)}\n" for n in BOOTSTRAP),
        "base.txt": header + "".join(f"{d}\n" for d in deps if requirement_name(d) not in SEPARATE),
        "torch-cpu.txt": torch_cpu_text(header, torch, torch),
        "torch-cuda.txt": torch_cuda_text(header, torch),
        "llamacpp.txt": header + "".join(f"{d}\n" for d in extras.get("llamacpp", [])),
        "modelscope.txt": header + "".join(f"{d}\n" for d in extras.get("modelscope", [])),
    }
