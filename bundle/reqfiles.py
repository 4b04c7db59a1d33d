"""The requirement files the launcher installs, as text. Standard library only.

One file per group of pyproject.toml: ``bootstrap.txt`` (what reading the manifest through the
schema needs, installed first into the launcher's own environment), ``base.txt`` (the core
``dependencies``), ``<extra>.txt`` for every extra (each engine declares the extras it needs:
``EngineSpec.extras``), and ``torch-cpu.txt`` / ``torch-cuda.txt``: torch is taken out of whichever
group lists it and installed as a step of its own, because the launcher decides at install time
whether to reuse the platform's torch or install the CPU or the CUDA build. ``index.json`` says
which file belongs to which group and which groups need torch or build llama-cpp-python (CPU, or
CUDA with CMAKE_ARGS), so that the launcher reads no requirement syntax itself.

Two sources write the same set of files: a bundle build pins them to its tested environment
(bundle/requirements.py), and a git checkout, which has no build environment to pin from, takes
``pyproject.toml``'s ranges so that ``bash 1键推理.sh`` works there too. This module is imported by
the launcher on the platform's bare Python, before anything is installed — hence no
``packaging``, and a small TOML fallback for Python 3.10, whose standard library has no tomllib.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

# PyPI's Linux torch wheel is the CUDA build (several GB); CPU machines take PyTorch's CPU index.
CPU_TORCH_INDEX = "https://download.pytorch.org/whl/cpu"
# What ``python -m bundle.resolve`` needs to read manifest.yaml through the one schema
# (backends/config: pyyaml, pydantic, pydantic-settings) and to ask the engine registry
# (backends/registry imports each engine module, whose shared driver uses numpy). Installed first,
# into the launcher's own environment, so that a bad key stops before gigabytes are installed.
BOOTSTRAP = ("pyyaml", "pydantic", "pydantic-settings", "numpy")
TORCH = "torch"
LLAMA_CPP = "llama-cpp-python"
# Extras that are never installed by the launcher (test tools) and so get no file.
NOT_SHIPPED = ("dev",)
INDEX_NAME = "index.json"
BOOTSTRAP_FILE = "bootstrap.txt"
CORE_FILE = "base.txt"


def extra_file(extra: str) -> str:
    """``requirements/<extra>.txt`` (messages elsewhere name e.g. requirements/modelscope.txt)."""
    name = f"{extra}.txt"
    if name in (BOOTSTRAP_FILE, CORE_FILE) or name.startswith("torch-"):
        raise ValueError(f"pyproject.toml: the extra [{extra}] would overwrite requirements/{name}: rename it")
    return name


def torch_file(build: str) -> str:
    return f"torch-{build}.txt"


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


def group_entry(file: str, requirements: list[str]) -> dict[str, object]:
    """index.json's entry for one group, from the group's declared (unpinned) requirements."""
    names = {requirement_name(r) for r in requirements}
    return {"file": file, "torch": TORCH in names, "llama_cpp": LLAMA_CPP in names}


def index_text(core: list[str], extras: dict[str, list[str]]) -> str:
    index = {
        "bootstrap": BOOTSTRAP_FILE,
        "core": group_entry(CORE_FILE, core),
        "extras": {name: group_entry(extra_file(name), reqs) for name, reqs in extras.items()},
        "torch": {build: torch_file(build) for build in ("cpu", "cuda")},
    }
    return json.dumps(index, indent=2, sort_keys=True) + "\n"


def shipped_extras(project: dict) -> dict[str, list[str]]:
    extras = project.get("optional-dependencies", {})
    return {name: list(reqs) for name, reqs in extras.items() if name not in NOT_SHIPPED}


def _code(line: str) -> str:
    """``line`` without its comment (a ``#`` outside a string)."""
    quoted = False
    for i, ch in enumerate(line):
        if ch == '"':
            quoted = not quoted
        elif ch == "#" and not quoted:
            return line[:i]
    return line


def _toml_string_arrays(text: str, table: str) -> dict[str, list[str]]:
    """Every ``key = ["a", "b"]`` in ``[table]`` of a simple TOML file (Python 3.10 has no tomllib).

    Enough for our own pyproject.toml: arrays of double-quoted strings, comments, several lines.
    """
    found: dict[str, list[str]] = {}
    inside, key, body = False, None, None
    for line in text.splitlines():
        code = _code(line)
        if body is not None:
            body.append(code)
        elif re.match(r"^\s*\[[^\[\]]+\]\s*$", code):
            inside = code.strip()[1:-1].strip() == table
            continue
        elif inside and (m := re.match(r'^\s*"?([A-Za-z0-9_.-]+)"?\s*=\s*\[', code)):
            key, body = m.group(1), [code.split("[", 1)[1]]
        else:
            continue
        if "]" in re.sub(r'"[^"]*"', "", body[-1]):
            found[str(key)] = re.findall(r'"([^"]*)"', "\n".join(body))
            key, body = None, None
    return found


def read_pyproject(root: Path) -> dict:
    """``{"version", "dependencies", "optional-dependencies"}`` of the project at ``root``."""
    text = (root / "pyproject.toml").read_text(encoding="utf-8")
    try:
        import tomllib
    except ImportError:  # Python 3.10
        version = re.search(r'(?m)^version\s*=\s*"([^"]+)"', text)
        return {"version": version.group(1) if version else "0",
                "dependencies": _toml_string_arrays(text, "project").get("dependencies", []),
                "optional-dependencies": _toml_string_arrays(text, "project.optional-dependencies")}
    return tomllib.loads(text)["project"]


def source_requirement_files(root: Path) -> dict[str, str]:
    """The requirement files for a git checkout: pyproject.toml's ranges, resolved by pip."""
    project = read_pyproject(root)
    core = list(project["dependencies"])
    extras = shipped_extras(project)
    every = core + [r for reqs in extras.values() for r in reqs]
    by_name = {requirement_name(d): d for d in every}
    torch = by_name.get(TORCH, TORCH)
    header = ("# From pyproject.toml's ranges (a git checkout; a release bundle pins the tested versions).\n"
              "# Written by bundle/reqfiles.py on every start: edit pyproject.toml, not this file.\n")

    def group(reqs: list[str]) -> str:
        return header + "".join(f"{r}\n" for r in reqs if requirement_name(r) != TORCH)

    files = {
        BOOTSTRAP_FILE: header + "".join(f"{by_name.get(n, n)}\n" for n in BOOTSTRAP),
        CORE_FILE: group(core),
        torch_file("cpu"): torch_cpu_text(header, torch, torch),
        torch_file("cuda"): torch_cuda_text(header, torch),
        INDEX_NAME: index_text(core, extras),
    }
    files.update({extra_file(name): group(reqs) for name, reqs in extras.items()})
    return files
