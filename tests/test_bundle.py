"""python -m bundle build / verify: contents, sums, reproducibility, tamper detection."""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import subprocess
import sys
import tarfile
import tomllib
from pathlib import Path

import pytest

from bundle.archive import parse_sums, verify_archive, verify_folder
from bundle.build import BuildError, build
from bundle.hashes import parse_pins

ROOT = Path(__file__).resolve().parent.parent
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


@pytest.fixture(scope="module")
def cpu_archive(tmp_path_factory) -> Path:
    return build(target="cpu", out_dir=tmp_path_factory.mktemp("dist")).archive


def _members(archive: Path) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(archive) as tar:
        return {m.name: m for m in tar.getmembers()}


def _read(archive: Path, name: str) -> bytes:
    with tarfile.open(archive) as tar:
        fh = tar.extractfile(name)
        assert fh is not None
        return fh.read()


def _rewrite(src: Path, dst: Path, change: dict[str, bytes | None], add: dict[str, bytes] | None = None) -> None:
    """Copy an archive, replacing (bytes) or dropping (None) members, optionally adding some."""
    with tarfile.open(src) as tin, tarfile.open(dst, "w:gz") as tout:
        for m in tin.getmembers():
            if m.name in change:
                if change[m.name] is None:
                    continue
                data = change[m.name]
                m.size = len(data)
                tout.addfile(m, io.BytesIO(data))
            else:
                tout.addfile(m, tin.extractfile(m) if m.isfile() else None)
        for name, data in (add or {}).items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tout.addfile(info, io.BytesIO(data))


def test_archive_name_layout_and_exclusions(cpu_archive: Path) -> None:
    root = f"vibethinker-app-{VERSION}-cpu"
    assert cpu_archive.name == f"{root}.tar.gz"
    members = _members(cpu_archive)
    names = set(members)
    assert all(n == root or n.startswith(root + "/") for n in names)
    rel = {n[len(root) + 1 :] for n in names if n != root}
    for required in ("1键推理.sh", "manifest.yaml", "VERSION", "BUNDLE.json", "SHA256SUMS",
                     "backends/config/schema.py", "backends/registry.py", "ui/__main__.py", "bundle/launcher/__main__.py",
                     "bundle/launcher/commands.py", "bundle/resolve.py", "requirements/index.json",
                     "requirements/base.txt", "requirements/bootstrap.txt", "requirements/torch-cpu.txt",
                     "requirements/torch-cuda.txt", "requirements/transformers.txt", "requirements/llamacpp.txt"):
        assert required in rel, required
    forbidden = [r for r in rel if r.startswith(("tests/", ".git", ".venv", "dist/")) or "__pycache__" in r
                 or r.endswith((".pyc", ".log")) or "/.env" in r]
    assert forbidden == []
    script = members[f"{root}/1键推理.sh"]
    assert script.mode & 0o111, "the one-click script must be executable"
    assert _read(cpu_archive, f"{root}/1键推理.sh") == (ROOT / "scripts" / "1键推理.sh").read_bytes()
    assert all(m.uid == 0 and m.gid == 0 and m.uname == "" for m in members.values())
    assert _read(cpu_archive, f"{root}/VERSION").decode().strip() == VERSION
    info = json.loads(_read(cpu_archive, f"{root}/BUNDLE.json"))
    assert info["target"] == "cpu" and info["version"] == VERSION and info["wheelhouse"] == "none"


def test_nothing_test_or_benchmark_only_ships(cpu_archive: Path) -> None:
    """The tarball holds the app and the user's tools: no tests, no benchmark, no test-model maker,
    and no shipped module imports them."""
    root = f"vibethinker-app-{VERSION}-cpu"
    with tarfile.open(cpu_archive) as tar:
        files = {m.name[len(root) + 1:]: m for m in tar.getmembers() if m.isfile()}
        sources = {name: tar.extractfile(m).read().decode("utf-8") for name, m in files.items()  # type: ignore[union-attr]
                   if name.endswith((".py", ".sh"))}
    tops = {name.split("/", 1)[0] for name in files}
    assert tops == {"1键推理.sh", "BUNDLE.json", "README.md", "SHA256SUMS", "VERSION", "manifest.yaml", "pyproject.toml",
                    "backends", "bundle", "requirements", "scripts", "ui"}, tops
    assert sorted(n for n in files if n.startswith("scripts/")) == ["scripts/convert_to_gguf.py", "scripts/fetch_model.py"]
    for name, text in sources.items():
        for line in text.splitlines():
            words = line.split()
            if words[:1] in (["import"], ["from"]) and len(words) > 1:
                assert words[1].split(".")[0] not in ("bench", "tests", "helpers", "pytest"), f"{name}: {line}"


def test_requirements_are_pinned_per_group(cpu_archive: Path) -> None:
    root = f"vibethinker-app-{VERSION}-cpu"

    def pins(name: str) -> dict[str, str]:
        text = _read(cpu_archive, f"{root}/requirements/{name}").decode()
        found, loose = parse_pins(name, text)
        assert found and loose == [], text  # every line name==version with its --hash (tests/test_supply_chain.py)
        return {p.name: p.version for p in found}

    core = pins("base.txt")
    assert {"gradio", "pydantic", "pydantic-settings", "pyyaml", "numpy"} <= set(core)
    assert not {"torch", "transformers", "llama-cpp-python"} & set(core), "the core holds no engine's library"
    assert {"pyyaml", "pydantic", "pydantic-settings", "numpy"} <= set(pins("bootstrap.txt"))
    hf = pins("transformers.txt")
    assert {"transformers", "safetensors", "tokenizers"} <= set(hf) and "torch" not in hf
    assert not set(hf) & set(core), "an extra's file holds only what the core does not pin"
    llama = _read(cpu_archive, f"{root}/requirements/llamacpp.txt").decode()
    assert "llama-cpp-python" in llama and "torch" not in llama
    index = json.loads(_read(cpu_archive, f"{root}/requirements/index.json"))
    assert index["extras"]["transformers"] == {"file": "transformers.txt", "torch": True, "llama_cpp": False}
    assert index["extras"]["llamacpp"]["llama_cpp"] and not index["extras"]["llamacpp"]["torch"]
    assert "dev" not in index["extras"], "test tools are never installed by the launcher"
    torch_cpu = _read(cpu_archive, f"{root}/requirements/torch-cpu.txt").decode()
    assert "+cpu" in torch_cpu and "download.pytorch.org/whl/cpu" in torch_cpu
    torch_cuda = _read(cpu_archive, f"{root}/requirements/torch-cuda.txt").decode()
    assert "torch==" in torch_cuda and "+cpu" not in torch_cuda


def test_sums_cover_every_file(cpu_archive: Path) -> None:
    root = f"vibethinker-app-{VERSION}-cpu"
    sums = parse_sums(_read(cpu_archive, f"{root}/SHA256SUMS").decode())
    files = {n[len(root) + 1 :] for n, m in _members(cpu_archive).items() if m.isfile()}
    assert set(sums) == files - {"SHA256SUMS"}
    for name in ("1键推理.sh", "manifest.yaml"):
        assert sums[name] == hashlib.sha256(_read(cpu_archive, f"{root}/{name}")).hexdigest()
    report = verify_archive(cpu_archive)
    assert report.ok and report.checked == len(sums)


def test_build_is_reproducible(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    a = build(target="cpu", out_dir=tmp_path / "a").archive
    b = build(target="cpu", out_dir=tmp_path / "b").archive
    assert a.read_bytes() == b.read_bytes()
    with gzip.open(a) as fh:
        fh.read(1)
    assert all(m.mtime == 1700000000 for m in _members(a).values())


def test_verify_reports_changed_missing_and_extra_files(cpu_archive: Path, tmp_path: Path) -> None:
    root = f"vibethinker-app-{VERSION}-cpu"
    tampered = tmp_path / "tampered.tar.gz"
    original = _read(cpu_archive, f"{root}/manifest.yaml")
    _rewrite(
        cpu_archive,
        tampered,
        {f"{root}/manifest.yaml": original.replace(b"port: 8080", b"port: 9090"), f"{root}/VERSION": None},
        add={f"{root}/ui/evil.py": b"import os\n"},
    )
    report = verify_archive(tampered)
    assert not report.ok
    assert report.changed == ["manifest.yaml"]
    assert report.missing == ["VERSION"]
    assert report.extra == ["ui/evil.py"]
    text = report.render(str(tampered))
    assert "changed / 被修改: manifest.yaml" in text and "missing / 缺失: VERSION" in text and "ui/evil.py" in text

    # The CLI says the same and exits 1; a good archive exits 0.
    bad = subprocess.run([sys.executable, "-m", "bundle", "verify", str(tampered)], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 1 and "FAILED" in bad.stdout and "manifest.yaml" in bad.stdout
    good = subprocess.run([sys.executable, "-m", "bundle", "verify", str(cpu_archive)], cwd=ROOT, capture_output=True, text=True)
    assert good.returncode == 0 and good.stdout.startswith("OK")


def test_verify_rejects_unsafe_members_and_non_archives(tmp_path: Path) -> None:
    evil = tmp_path / "evil.tar.gz"
    with tarfile.open(evil, "w:gz") as tar:
        info = tarfile.TarInfo("../outside.txt")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    report = verify_archive(evil)
    assert not report.ok and any("unsafe path" in p for p in report.problems)
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"not a tarball")
    assert any("cannot read" in p for p in verify_archive(junk).problems)


def test_verify_extracted_folder(cpu_archive: Path, tmp_path: Path) -> None:
    with tarfile.open(cpu_archive) as tar:
        tar.extractall(tmp_path, filter="data")
    folder = tmp_path / f"vibethinker-app-{VERSION}-cpu"
    (folder / "logs").mkdir()  # created by 1键推理.sh at run time: ignored
    (folder / "logs" / "server.log").write_text("x")
    assert verify_folder(folder, ignore=("logs",)).ok
    (folder / "ui" / "__main__.py").write_text("tampered\n")
    report = verify_folder(folder, ignore=("logs",))
    assert report.changed == ["ui/__main__.py"]


def test_with_model_packs_files_and_points_manifest(tiny_model_dir: Path, tmp_path: Path) -> None:
    archive = build(target="cpu", out_dir=tmp_path, with_model=tiny_model_dir).archive
    root = f"vibethinker-app-{VERSION}-cpu"
    rel = {n[len(root) + 1 :] for n in _members(archive)}
    assert f"models/{tiny_model_dir.name}/config.json" in rel
    assert f"models/{tiny_model_dir.name}/model.safetensors" in rel
    manifest = _read(archive, f"{root}/manifest.yaml").decode()
    import yaml

    assert yaml.safe_load(manifest)["model"]["path"] == f"models/{tiny_model_dir.name}"
    assert "# 模型文件夹" in manifest, "comments of the manifest are kept"
    assert json.loads(_read(archive, f"{root}/BUNDLE.json"))["model"] == f"models/{tiny_model_dir.name}"
    assert verify_archive(archive).ok


def test_bad_build_inputs(tmp_path: Path) -> None:
    with pytest.raises(BuildError, match="no such file or folder"):
        build(target="cpu", out_dir=tmp_path, with_model=tmp_path / "nope")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(BuildError, match="must be a .gguf"):
        build(target="cpu", out_dir=tmp_path, with_model=tmp_path / "weights.bin")
    with pytest.raises(BuildError, match="choose cpu or cuda"):
        build(target="tpu", out_dir=tmp_path)
    cli = subprocess.run([sys.executable, "-m", "bundle", "verify", str(tmp_path / "missing.tar.gz")],
                         cwd=ROOT, capture_output=True, text=True)
    assert cli.returncode == 2 and "no such file" in cli.stderr


def test_cuda_target(tmp_path: Path) -> None:
    archive = build(target="cuda", out_dir=tmp_path).archive
    root = f"vibethinker-app-{VERSION}-cuda"
    assert archive.name == f"{root}.tar.gz"
    info = json.loads(_read(archive, f"{root}/BUNDLE.json"))
    assert info["target"] == "cuda" and info["wheelhouse"] == "none"
    assert verify_archive(archive).ok


def test_source_requirements_match_pyproject_on_every_python(monkeypatch):
    """A checkout's requirement files come from pyproject.toml; Python 3.10 (no tomllib) reads the same."""
    import builtins
    import tomllib

    from bundle import reqfiles

    root = Path(__file__).resolve().parent.parent
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    with_tomllib = reqfiles.source_requirement_files(root)
    real_import = builtins.__import__

    def no_tomllib(name, *args, **kwargs):
        if name == "tomllib":
            raise ImportError("Python 3.10")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tomllib)
    fallback = reqfiles.read_pyproject(root)
    assert fallback["version"] == project["version"]
    assert fallback["dependencies"] == project["dependencies"]
    assert fallback["optional-dependencies"] == project["optional-dependencies"]
    assert reqfiles.source_requirement_files(root) == with_tomllib
    names = {reqfiles.requirement_name(line) for line in with_tomllib["base.txt"].splitlines() if not line.startswith("#")}
    assert "torch" not in names and "llama-cpp-python" not in names and "gradio" in names
    assert "llama-cpp-python>=" in with_tomllib["llamacpp.txt"]
    hf = {reqfiles.requirement_name(line) for line in with_tomllib["transformers.txt"].splitlines() if not line.startswith("#")}
    assert "transformers" in hf and "torch" not in hf, "torch is a step of its own"
    assert f"--extra-index-url {reqfiles.CPU_TORCH_INDEX}" in with_tomllib["torch-cpu.txt"]
    index = json.loads(with_tomllib["index.json"])
    assert set(index["extras"]) == set(project["optional-dependencies"]) - {"dev"}
    assert index["extras"]["transformers"]["torch"] and index["extras"]["llamacpp"]["llama_cpp"]
