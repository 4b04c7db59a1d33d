"""backend selection: explicit choices honoured, ``auto`` (issue 7) converts once and falls back."""
from __future__ import annotations

import logging
import os
import shutil
import sys
from pathlib import Path

import pytest

import dataclasses

from backends import auto as selection
from backends import registry
from backends.models import gguf_source
from backends.models.convert import default_gguf_name, stamp_path
from backends.config import load_manifest
from backends.auto import AutoBackend, create_backend, describe_choice
from backends.types import BackendError

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
from backends.engines.llamacpp import LlamaCppBackend, LlamaCppUnavailable  # noqa: E402


@pytest.fixture
def model(tiny_model_dir, tmp_path) -> Path:
    dst = tmp_path / "vibethinker-tiny"
    shutil.copytree(tiny_model_dir, dst)
    return dst


@pytest.fixture
def conversions(monkeypatch) -> list[Path]:
    """Counts real conversions made through the GGUF source resolution."""
    made: list[Path] = []
    real = gguf_source.convert_hf_to_gguf

    def counting(src, out, quant="F16", progress=None):
        made.append(Path(out))
        return real(src, out, quant, progress)

    monkeypatch.setattr(gguf_source, "convert_hf_to_gguf", counting)
    return made


@pytest.fixture(autouse=True)
def no_gpu(monkeypatch):
    monkeypatch.setattr(selection, "cuda_available", lambda: False)


def _manifest(path: Path, tmp_path: Path, **overrides):
    values = {"model.path": str(path), "llamacpp.n_ctx": 1024, "model.cache_dir": str(tmp_path / "cache")}
    values.update(overrides)
    return load_manifest(None, env={}, overrides=values)


def _load(manifest, progress=None):
    backend = create_backend(manifest)
    backend.load(progress)
    return backend


def test_auto_on_cpu_converts_once_then_reuses(model, tmp_path, conversions):
    seen = []
    b = _load(_manifest(model, tmp_path), seen.append)
    try:
        info = b.info()
        assert isinstance(b, AutoBackend) and isinstance(b.inner, LlamaCppBackend)
        assert info.backend == "llamacpp" and info.dtype == "Q8_0"
        assert info.reason.startswith("no CUDA GPU found → llama.cpp Q8_0 on cpu (")
        assert any("Converting" in p.message for p in seen) and seen[-1].fraction == 1.0
    finally:
        b.close()
    out = model / default_gguf_name(model, "Q8_0")
    assert conversions == [out] and stamp_path(out).is_file()
    before = out.stat()
    b2 = _load(_manifest(model, tmp_path))
    b2.close()
    after = out.stat()
    assert conversions == [out]  # no second conversion
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert "converted earlier" in describe_choice(_manifest(model, tmp_path))


def test_interrupted_or_stale_conversion_is_redone(model, tmp_path, conversions):
    out = model / default_gguf_name(model, "Q8_0")
    _load(_manifest(model, tmp_path)).close()
    # A kill mid-write leaves a temp file; a kill between stamp and rename leaves a stamp without
    # its GGUF; here also the GGUF is cut short as a copy gone wrong would leave it.
    leftover = model / f".{out.name}.abc123.partial"
    leftover.write_bytes(b"half")
    with open(out, "r+b") as fh:
        fh.truncate(out.stat().st_size // 2)
    b = _load(_manifest(model, tmp_path))
    b.close()
    assert len(conversions) == 2 and not leftover.exists()
    assert b.info().dtype == "Q8_0"
    # The checkpoint changed (re-uploaded config): the conversion is stale.
    st = (model / "config.json").stat()
    os.utime(model / "config.json", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert "changed" in describe_choice(_manifest(model, tmp_path))
    _load(_manifest(model, tmp_path)).close()
    assert len(conversions) == 3


def test_read_only_model_folder_uses_the_cache(model, tmp_path, conversions, monkeypatch):
    # CI runs as root, where chmod does not stop writes: simulate read-only at the probe.
    real = gguf_source.folder_writable
    monkeypatch.setattr(gguf_source, "folder_writable", lambda f: Path(f) != model and real(f))
    m = _manifest(model, tmp_path, **{"model.gguf_quant": "F16"})
    _load(m).close()
    assert len(conversions) == 1
    out = conversions[0]
    assert out.parent.parent == tmp_path / "cache" and out.name == default_gguf_name(model, "F16")
    assert not list(model.glob("*.gguf"))
    b = _load(m)
    assert b.info().dtype == "F16" and b.info().model_path == str(out)
    b.close()
    assert len(conversions) == 1


def test_explicit_transformers_is_honoured(model, tmp_path, conversions):
    from backends.engines.transformers import TransformersBackend

    b = create_backend(_manifest(model, tmp_path, backend="transformers"))
    assert isinstance(b, TransformersBackend)
    assert describe_choice(_manifest(model, tmp_path, backend="transformers")).startswith("backend: transformers")
    assert conversions == []


def test_explicit_llamacpp_converts_on_the_way(model, tmp_path, conversions):
    b = create_backend(_manifest(model, tmp_path, backend="llamacpp"))
    assert isinstance(b, LlamaCppBackend)
    b.load()
    b.close()
    assert len(conversions) == 1


def test_auto_falls_back_to_transformers_without_llama_cpp(model, tmp_path, conversions, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    assert "llama.cpp unavailable" in describe_choice(_manifest(model, tmp_path))
    with caplog.at_level(logging.WARNING, logger="backends.auto"):
        b = _load(_manifest(model, tmp_path))
    try:
        info = b.info()
        assert info.backend == "transformers"
        assert "llama.cpp unavailable (The llama.cpp backend needs llama-cpp-python" in info.reason
        assert info.reason.endswith("(slower)") and "→ transformers float32 on cpu" in info.reason
        assert any("llama.cpp is unavailable" in w for w in info.extra["warnings"])
        assert any("using transformers" in r.getMessage() for r in caplog.records)
    finally:
        b.close()
    assert conversions == []


def test_explicit_llamacpp_never_falls_back(model, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    b = create_backend(_manifest(model, tmp_path, backend="llamacpp"))
    with pytest.raises(LlamaCppUnavailable, match='pip install "llama-cpp-python'):
        b.load()
    assert "will fail" in describe_choice(_manifest(model, tmp_path, backend="llamacpp"))


def test_no_disk_room_for_the_gguf(model, tmp_path, conversions, monkeypatch):
    monkeypatch.setattr(gguf_source, "estimate_gguf_bytes", lambda src, quant: 1 << 60)
    b = _load(_manifest(model, tmp_path))
    try:
        assert b.info().backend == "transformers"
        assert "llama.cpp unavailable (No place to write the GGUF" in b.info().reason
    finally:
        b.close()
    with pytest.raises(gguf_source.NotEnoughDisk, match="model.cache_dir"):
        create_backend(_manifest(model, tmp_path, backend="llamacpp")).load()
    assert conversions == []


def test_gpu_picks_transformers_without_converting(model, tmp_path, conversions, monkeypatch):
    monkeypatch.setattr(selection, "cuda_available", lambda: True)
    assert describe_choice(_manifest(model, tmp_path)) == "backend: auto — CUDA GPU found → transformers: float16 on CUDA"

    class FakeTransformers:
        name = "transformers"
        loaded = True

        def load(self, progress=None):
            pass

        def info(self):
            from backends.types import BackendInfo

            return BackendInfo("transformers", "m", str(model), "cuda:0 (Fake GPU)", "float16", 1024)

    fake = dataclasses.replace(registry.get("transformers"), create=lambda manifest: FakeTransformers())
    monkeypatch.setitem(registry._engines, "transformers", fake)
    b = _load(_manifest(model, tmp_path))
    assert b.info().reason == "CUDA GPU found → transformers float16 on cuda:0 (Fake GPU)"
    assert conversions == []


def test_gguf_only_folder_without_llama_cpp_fails_clearly(tiny_gguf, tmp_path, monkeypatch):
    folder = tmp_path / "g"
    folder.mkdir()
    shutil.copy(tiny_gguf, folder / "m.gguf")
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    with pytest.raises(BackendError, match="holds a GGUF, but no engine can run it here: llama.cpp: .*pip install"):
        _load(_manifest(folder, tmp_path))
