"""Shared fixtures: tiny real models built locally (no network) and free loopback ports."""
from __future__ import annotations

import os
import shutil
import socket
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session", autouse=True)
def llama_cpp_without_amx_crash() -> None:
    """Tests that use llama_cpp.Llama directly get the engine's AMX workaround too."""
    try:
        from backends.engines.llamacpp import import_llama_cpp

        import_llama_cpp()
    except Exception:  # llama-cpp-python not installed: its tests skip themselves
        pass


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The tiny trained Qwen2 (HF safetensors + tokenizer + VibeThinker's template)."""
    from bench.synthetic import make_tiny_model

    out = tmp_path_factory.mktemp("tiny-hf") / "vibethinker-tiny"
    # VT_TEST_MODEL_CACHE=<folder>: keep the trained model between local runs (minutes each on two
    # cores); CI leaves it unset and trains afresh. Delete the folder after changing bench/synthetic.py.
    cache = os.environ.get("VT_TEST_MODEL_CACHE")
    if not cache:
        return make_tiny_model(out)
    kept = Path(cache) / "vibethinker-tiny"
    if not (kept.parent / "vibethinker-tiny.built").is_file():
        shutil.rmtree(kept, ignore_errors=True)
        make_tiny_model(kept)
        (kept.parent / "vibethinker-tiny.built").touch()
    shutil.copytree(kept, out)
    return out


@pytest.fixture(scope="session")
def tiny_gguf(tiny_model_dir, tmp_path_factory) -> Path:
    """The same tiny model as an F32 GGUF (greedy parity with transformers)."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install -e '.[llamacpp]')")
    from backends.models.convert import convert_hf_to_gguf

    out = tmp_path_factory.mktemp("tiny-gguf") / "vibethinker-tiny-f32.gguf"
    return convert_hf_to_gguf(tiny_model_dir, out, "F32")


@pytest.fixture(scope="session")
def gguf_dir(tiny_gguf, tmp_path_factory) -> Path:
    """A model folder holding only the tiny GGUF (what a user who copied a .gguf has)."""
    folder = tmp_path_factory.mktemp("gguf-only")
    shutil.copy(tiny_gguf, folder / "vibethinker-tiny-f32.gguf")
    return folder


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def free_port() -> int:
    return _free_port()


@pytest.fixture(scope="session")
def trust_server(tiny_model_dir):
    """A server with code checking on, sampling at temperature 1 with seed 0 (sample i: seed i), so
    that the tiny model's vote and code prompts give several different, reproducible answers."""
    from helpers.server import ServerProcess

    with ServerProcess(["--backend", "transformers", "--model", str(tiny_model_dir),
                        "--set", "solve.run_code=true", "--set", "solve.cpu_time_s=1",
                        "--set", "solve.wall_time_s=10", "--set", "generation.temperature=1.0",
                        "--set", "generation.seed=0", "--set", "generation.max_new_tokens=300"]) as srv:
        yield srv
