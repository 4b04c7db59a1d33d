"""``python -m bundle build``: the one-click tarball.

Layout of ``dist/vibethinker-app-<version>-<target>.tar.gz`` (one top-level folder of that name):

    1键推理.sh            the one-click script (from scripts/)
    VERSION, BUNDLE.json  version; target, wheelhouse kind, build Python/platform
    manifest.yaml         the app's configuration
    backends/ ui/ bundle/ the app (no tests, benchmark, caches or secrets)
    scripts/convert_to_gguf.py, scripts/fetch_model.py   the user-facing tools
    requirements/         pinned from the build environment (bundle/requirements.py): bootstrap,
                          core, one file per extra, torch per build, index.json; every line of
                          all but torch's has its --hash=sha256 (bundle/pinhash.py, hashes.lock.json)
    wheels/               optional wheelhouse for offline installs
    models/<name>/        optional model files (manifest's model.path points there)
    SHA256SUMS            every other file, sha256sum format
"""
from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .archive import SUMS_NAME, sha256_file, sums_text, write_tar_gz
from .hashes import parse_pins
from .pinhash import HashError, hash_requirement_files
from .reqfiles import INDEX_NAME
from .requirements import pinned_requirements, project_metadata

ROOT = Path(__file__).resolve().parent.parent
SCRIPT_NAME = "1键推理.sh"
APP_PACKAGES = ("backends", "ui", "bundle")
# Only what a user runs ships from scripts/ (the benchmark and the test-model maker stay behind).
USER_SCRIPTS = ("convert_to_gguf.py", "fetch_model.py")
TOP_LEVEL_FILES = ("manifest.yaml", "pyproject.toml", "README.md", "LICENSE")
_EXCLUDED_DIRS = {"__pycache__", ".git", ".venv", "dist", "build", "tests", "bench", ".pytest_cache", ".mypy_cache",
                  "node_modules"}
# Never ship what looks like a secret or a leftover.
_EXCLUDED_NAME = re.compile(r"(^\.env.*|.*\.(pyc|pyo|log|partial|pem|key|crt|p12)$|^id_(rsa|ed25519).*|^\.DS_Store$|.*~$)")
WHEELHOUSE_KINDS = ("none", "app", "full")


__all__ = ["BuildError", "BuildResult", "HashError", "build"]


class BuildError(RuntimeError):
    """A bundle cannot be built; the message names the problem and the fix."""


@dataclass(frozen=True)
class BuildResult:
    archive: Path
    files: int
    wheels: int


def _app_files(root: Path) -> dict[str, Path]:
    files: dict[str, Path] = {}
    for package in APP_PACKAGES:
        base = root / package
        if not (base / "__init__.py").is_file():
            raise BuildError(f"{base} is not a Python package (no __init__.py): the bundle needs it.")
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = sorted(d for d in dirnames if d not in _EXCLUDED_DIRS and not d.startswith("."))
            for name in filenames:
                if not _EXCLUDED_NAME.match(name):
                    path = Path(dirpath) / name
                    files[path.relative_to(root).as_posix()] = path
    for name in USER_SCRIPTS:
        path = root / "scripts" / name
        if not path.is_file():
            raise BuildError(f"{path} is missing: the bundle ships it as a user-facing tool.")
        files[f"scripts/{name}"] = path
    for name in TOP_LEVEL_FILES:
        if (root / name).is_file():
            files[name] = root / name
    script = root / "scripts" / SCRIPT_NAME
    if not script.is_file():
        raise BuildError(f"{script} is missing: the bundle's entry point is copied from there.")
    files[SCRIPT_NAME] = script
    return files


def _model_files(model: Path) -> tuple[str, dict[str, Path]]:
    """Files of ``--with-model`` under models/<name>/ and that folder's relative path."""
    if not model.exists():
        raise BuildError(f"--with-model {model}: no such file or folder.")
    if model.is_file():
        if model.suffix != ".gguf":
            raise BuildError(f"--with-model {model}: a single file must be a .gguf; pass the folder of an HF checkpoint.")
        folder = f"models/{model.stem}"
        return folder, {f"{folder}/{model.name}": model}
    folder = f"models/{model.name}"
    files = {
        f"{folder}/{p.relative_to(model).as_posix()}": p
        for p in sorted(model.rglob("*"))
        if p.is_file() and not _EXCLUDED_NAME.match(p.name) and not (set(p.relative_to(model).parts) & _EXCLUDED_DIRS)
    }
    if not files:
        raise BuildError(f"--with-model {model}: the folder is empty.")
    return folder, files


def _point_manifest_at(text: str, model_folder: str) -> str:
    """Rewrite ``model.path`` in manifest.yaml (keeping its comments) to the bundled model."""
    section = re.search(r"^model:[^\n]*\n", text, re.M)
    if section is None:
        return text + f"\nmodel:\n  path: {model_folder}\n"
    head, tail = text[: section.end()], text[section.end() :]
    new_tail, count = re.subn(r"^(  path:)[^\n#]*", rf"\g<1> {model_folder} ", tail, count=1, flags=re.M)
    if count == 0:
        new_tail = f"  path: {model_folder}\n" + tail
    return head + new_tail


def _source_date(root: Path) -> int:
    if os.environ.get("SOURCE_DATE_EPOCH", "").isdigit():
        return int(os.environ["SOURCE_DATE_EPOCH"])
    try:
        out = subprocess.run(["git", "-C", str(root), "log", "-1", "--format=%ct"], capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip().isdigit():
            return int(out.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return 1_700_000_000


def _nvcc_works() -> bool:
    try:
        return subprocess.run(["nvcc", "--version"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _pip_wheel(args: list[str], wheel_dir: Path, env: dict[str, str] | None = None) -> None:
    cmd = [sys.executable, "-m", "pip", "wheel", "--wheel-dir", str(wheel_dir), *args]
    print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
    done = subprocess.run(cmd, env=env)
    if done.returncode != 0:
        raise BuildError(
            f"pip wheel failed (exit {done.returncode}) for {' '.join(args)}: see pip's output above. "
            "Fix the index (PIP_INDEX_URL) or build without --wheelhouse."
        )


def engine_extras() -> list[str]:
    """The extras of every registered engine (the registry says which engines exist)."""
    from backends import registry

    out: list[str] = []
    for spec in registry.engines().values():
        out += [e for e in spec.extras if e not in out]
    return out


def _wheelhouse(kind: str, target: str, req_dir: Path, wheel_dir: Path) -> tuple[str, list[str]]:
    """Fill ``wheel_dir``; returns how llama-cpp-python was included (cpu | cuda | none) and the
    requirement files whose every pin now has its wheel there (``python -m bundle verify`` checks them)."""
    index = json.loads((req_dir / INDEX_NAME).read_text(encoding="utf-8"))
    groups = [index["core"]] + [index["extras"][e] for e in engine_extras() if e in index["extras"]]
    covered = [index["bootstrap"]] + [g["file"] for g in groups if not g["llama_cpp"]]
    reqs = [a for f in covered for a in ("-r", str(req_dir / f))]
    if kind == "full" and any(g["torch"] for g in groups):
        reqs += ["-r", str(req_dir / index["torch"][target])]
    _pip_wheel(reqs, wheel_dir)
    llama_files = [g["file"] for g in groups if g["llama_cpp"]]
    llama_groups = [a for f in llama_files for a in ("-r", str(req_dir / f))]
    if not llama_groups:
        return "none", covered
    if target == "cpu":
        # pip's cache holds the CPU build made when the build environment was installed.
        _pip_wheel(llama_groups, wheel_dir)
        return "cpu", covered + llama_files
    if _nvcc_works():
        env = {**os.environ, "CMAKE_ARGS": "-DGGML_CUDA=on", "FORCE_CMAKE": "1"}
        # No cache: a cached wheel would be the CPU build (the cache key ignores CMAKE_ARGS).
        _pip_wheel([*llama_groups, "--no-cache-dir", "--no-binary", "llama-cpp-python"], wheel_dir, env)
        return "cuda", covered + llama_files
    print(
        "warning: no nvcc + GPU here, so the cuda wheelhouse has no llama-cpp-python; the notebook builds it "
        "(needs its index and nvcc) / 本机无法编译 CUDA 版 llama-cpp-python, 将在 Notebook 上编译",
        file=sys.stderr,
    )
    return "none"


def build(
    target: str = "cpu",
    out_dir: Path = Path("dist"),
    wheelhouse: str = "none",
    with_model: Path | None = None,
    root: Path = ROOT,
) -> BuildResult:
    if target not in ("cpu", "cuda"):
        raise BuildError(f"--target {target!r}: choose cpu or cuda.")
    if wheelhouse not in WHEELHOUSE_KINDS:
        raise BuildError(f"--wheelhouse {wheelhouse!r}: choose one of {', '.join(WHEELHOUSE_KINDS)}.")
    project = project_metadata(root)
    version = project["version"]
    name = f"vibethinker-app-{version}-{target}"
    files = _app_files(root)
    pins = pinned_requirements(root)

    with tempfile.TemporaryDirectory(prefix="vt-bundle-") as tmp_name:
        tmp = Path(tmp_name)
        generated: dict[str, str] = {f"requirements/{n}": text for n, text in pins.files.items()}
        generated["VERSION"] = version + "\n"
        model_folder = None
        if with_model is not None:
            model_folder, model_files = _model_files(with_model.resolve())
            files.update(model_files)
            generated["manifest.yaml"] = _point_manifest_at((root / "manifest.yaml").read_text(encoding="utf-8"), model_folder)
        for rel, text in generated.items():
            path = tmp / "gen" / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            files[rel] = path

        llama_wheel, covered = "none", []
        wheel_dir = None
        if wheelhouse != "none":
            wheel_dir = tmp / "wheels"
            wheel_dir.mkdir()
            llama_wheel, covered = _wheelhouse(wheelhouse, target, tmp / "gen" / "requirements", wheel_dir)
            for wheel in sorted(wheel_dir.iterdir()):
                files[f"wheels/{wheel.name}"] = wheel
        # After the wheelhouse: a wheel built here (llama-cpp-python) adds its own digest.
        hashed = hash_requirement_files(tmp / "gen" / "requirements", root, wheel_dir)
        pinned = {d for f in hashed for p in parse_pins(f, (tmp / "gen" / "requirements" / f).read_text("utf-8"))[0]
                  for d in p.digests}
        # Wheels no hash pin covers (torch and its own dependencies in a full wheelhouse): named here,
        # checked against SHA256SUMS.
        unpinned = sorted(w.name for w in (wheel_dir.glob("*.whl") if wheel_dir else []) if sha256_file(w) not in pinned)

        info = {
            "name": "vibethinker-app",
            "version": version,
            "target": target,
            "wheelhouse": wheelhouse,
            "llamacpp_wheel": llama_wheel,
            "torch": pins.torch_version,
            "python": f"{sys.version_info.major}.{sys.version_info.minor}",
            "platform": sysconfig.get_platform(),
            "machine": platform.machine(),
            "model": model_folder,
            "hashed": hashed,
            "wheelhouse_files": [f for f in covered if f in hashed],
            "unpinned_wheels": unpinned,
        }
        info_path = tmp / "gen" / "BUNDLE.json"
        info_path.write_text(json.dumps(info, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        files["BUNDLE.json"] = info_path

        digests = {rel: sha256_file(src) for rel, src in files.items()}
        sums_path = tmp / "gen" / SUMS_NAME
        sums_path.write_text(sums_text(digests), encoding="utf-8")
        entries = [(rel, src, rel == SCRIPT_NAME or rel.endswith(".sh")) for rel, src in files.items()]
        entries.append((SUMS_NAME, sums_path, False))
        archive = Path(out_dir).resolve() / f"{name}.tar.gz"
        write_tar_gz(archive, name, entries, _source_date(root))
        wheels = sum(1 for rel in files if rel.startswith("wheels/"))
        return BuildResult(archive=archive, files=len(entries), wheels=wheels)
