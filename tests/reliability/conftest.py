"""Servers the reliability tests share: the echo engine (no model: fuzzing is fast) and the tiny
transformers model with room for several users at once."""
from __future__ import annotations

from pathlib import Path

import pytest

from helpers.server import ServerProcess

TESTS = Path(__file__).resolve().parents[1]
ROOT = TESTS.parent
ECHO_ENV = {"VT_ENGINE_MODULES": "helpers.echo_engine", "PYTHONPATH": f"{TESTS}:{ROOT}"}


@pytest.fixture(scope="session")
def echo_server():
    with ServerProcess(["--backend", "echo"], env=ECHO_ENV) as srv:
        yield srv


@pytest.fixture(scope="session")
def busy_server(tiny_model_dir):
    """transformers with continuous batching of 4, a queue of 64 (the disconnect storm waits in it)."""
    with ServerProcess(["--backend", "transformers", "--model", str(tiny_model_dir),
                        "--set", "server.concurrency=4", "--set", "server.max_queue=64",
                        "--set", "generation.loop_guard.enabled=false"]) as srv:
        yield srv
