"""The llama.cpp engine on the tiny model's F32 GGUF, through the shared driver."""
from __future__ import annotations

import threading
from pathlib import Path

import pytest

from backends.models.checks import ModelFolderError
from backends.models.gguf_source import ConversionNotAllowed
from backends.config import load_manifest
from bench.synthetic import ADD_PROMPT, LOOP_PROMPT
from backends.types import BackendError, ChatMessage, FinishReason, GenerationRequest, SamplingParams

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
from backends.engines.llamacpp import LlamaCppBackend, LlamaCppUnavailable, physical_cores  # noqa: E402


def _manifest(path: Path, **overrides):
    base = {"backend": "llamacpp", "model.path": str(path), "llamacpp.n_ctx": 2048}
    base.update(overrides)
    return load_manifest(None, env={}, overrides=base)


class GatedBackend(LlamaCppBackend):
    """Blocks decoding after a few tokens until the test opens the gate (no timing races)."""

    def __init__(self, manifest, gate_after: int | None = None) -> None:
        super().__init__(manifest)
        self.gate = threading.Event()
        self.gate_after = gate_after
        self.reached = threading.Event()
        self.tokens_after_gate = 0

    def decode_loop(self, ids, params, max_tokens, on_token):
        seen = [0]

        def gated(tok: int) -> bool:
            seen[0] += 1
            if self.gate_after is not None and seen[0] == self.gate_after:
                self.reached.set()
                assert self.gate.wait(60), "the test never opened the gate"
            elif self.gate_after is not None and seen[0] > self.gate_after:
                self.tokens_after_gate += 1
            return on_token(tok)

        return super().decode_loop(ids, params, max_tokens, gated)


@pytest.fixture(scope="module")
def backend(gguf_dir):
    b = GatedBackend(_manifest(gguf_dir))
    b.load()
    yield b
    b.close()


def _run(backend, prompt: str, **params):
    req = GenerationRequest((ChatMessage("user", prompt),), SamplingParams(**{"temperature": 0.0, **params}))
    chunks = list(backend.stream(req))
    final = chunks[-1]
    reasoning = "".join(c.reasoning for c in chunks)
    answer = "".join(c.answer for c in chunks)
    return reasoning, answer, final


def test_streams_thinking_then_boxed_answer(backend):
    reasoning, answer, final = _run(backend, ADD_PROMPT)
    assert "I need to add" in reasoning
    assert "\\boxed{4}" in answer and "<think>" not in answer
    assert final.boxed_answer == "4"
    assert final.usage.finish_reason == FinishReason.STOP
    assert final.usage.prompt_tokens > 10 and final.usage.reasoning_tokens > 0 and final.usage.answer_tokens > 0
    info = backend.info()
    assert info.backend == "llamacpp" and info.dtype == "F32"
    assert info.device == f"cpu ({physical_cores()} threads)"
    assert info.context_length == 2048


def test_follow_up_turn_reuses_the_engine(backend):
    msgs = (ChatMessage("user", ADD_PROMPT), ChatMessage("assistant", "The answer is \\boxed{4}."),
            ChatMessage("user", "What is 3+5?"))
    chunks = list(backend.stream(GenerationRequest(msgs, SamplingParams(temperature=0.0, max_new_tokens=200))))
    assert chunks[-1].usage.finish_reason in (FinishReason.STOP, FinishReason.LENGTH)
    assert chunks[-1].usage.completion_tokens > 0


def test_seed_makes_sampling_reproducible(backend):
    a = _run(backend, ADD_PROMPT, temperature=1.0, seed=7, max_new_tokens=60)
    b = _run(backend, ADD_PROMPT, temperature=1.0, seed=7, max_new_tokens=60)
    assert a[:2] == b[:2]


def test_thinking_budget_closes_thinking_and_still_answers(backend):
    reasoning, answer, final = _run(backend, ADD_PROMPT, thinking_budget=3)
    assert final.usage.finish_reason == FinishReason.BUDGET
    assert "I have thought long enough" in reasoning
    # Cut after 3 tokens of thinking the tiny model still answers; what it answers is not ours.
    assert "\\boxed{" in answer and final.boxed_answer


def test_loop_guard_stops_the_repetition(backend):
    reasoning, answer, final = _run(backend, LOOP_PROMPT, max_new_tokens=2000)
    assert final.usage.finish_reason == FinishReason.LOOP
    assert reasoning.count("wait") < 240  # stopped long before the trained 240 repetitions
    assert final.boxed_answer is not None  # thinking was closed and an answer written


@pytest.mark.parametrize("how", ["cancel", "close"])
def test_cancel_stops_decoding(backend, how):
    backend.gate.clear()
    backend.reached.clear()
    backend.gate_after, backend.tokens_after_gate = 5, 0
    try:
        req = GenerationRequest((ChatMessage("user", LOOP_PROMPT),),
                                SamplingParams(temperature=0.0, loop_guard=False, max_new_tokens=1500))
        it = backend.stream(req)
        first = next(it)
        assert first.reasoning or first.answer
        assert backend.reached.wait(60)
        if how == "cancel":
            assert backend.cancel(req.request_id)
            backend.gate.set()
            rest = list(it)
            assert rest[-1].usage.finish_reason == FinishReason.CANCELLED
        else:
            # close() waits for the worker, which waits at the gate: open it from another thread
            # once close() has marked the request cancelled.
            opener = threading.Timer(0.3, backend.gate.set)
            opener.start()
            it.close()
            opener.join()
        assert backend.tokens_after_gate <= 1
        assert backend.pending_requests == 0
    finally:
        backend.gate_after = None
        backend.gate.set()


def test_hf_folder_without_conversion_allowed(tiny_model_dir):
    b = LlamaCppBackend(_manifest(tiny_model_dir), allow_convert=False)
    with pytest.raises(ConversionNotAllowed, match="convert_to_gguf.py"):
        b.load()


def test_truncated_gguf(tiny_gguf, tmp_path):
    cut = tmp_path / "cut.gguf"
    data = tiny_gguf.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFolderError, match="truncated"):
        LlamaCppBackend(_manifest(tmp_path)).load()


def test_gguf_of_another_architecture(tmp_path):
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(tmp_path / "other.gguf", "llama")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelFolderError, match="architecture 'llama'.*VibeThinker"):
        LlamaCppBackend(_manifest(tmp_path)).load()


@pytest.mark.skipif(llama_cpp.llama_supports_gpu_offload(), reason="this llama-cpp-python can offload to a GPU")
def test_gpu_layers_without_a_cuda_build(gguf_dir):
    b = LlamaCppBackend(_manifest(gguf_dir, **{"llamacpp.n_gpu_layers": 10}))
    with pytest.raises(BackendError, match="CPU-only build.*GGML_CUDA=on"):
        b.load()
    assert not b.loaded


def test_llama_cpp_missing_gives_the_pip_command(gguf_dir, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "llama_cpp", None)
    with pytest.raises(LlamaCppUnavailable, match='pip install "llama-cpp-python'):
        LlamaCppBackend(_manifest(gguf_dir)).load()


def test_quantized_kv_cache_needs_flash_attention(gguf_dir):
    b = LlamaCppBackend(_manifest(gguf_dir, **{"llamacpp.kv_cache_type": "q8_0", "llamacpp.flash_attn": "off"}))
    with pytest.raises(BackendError, match="needs flash attention"):
        b.load()


def test_llama_cpp_reason_is_shown_when_the_context_fails(gguf_dir):
    # The tiny model's 16-wide heads cannot hold a q8_0 KV cache (blocks of 32); the real
    # model's 128-wide heads can. llama.cpp's own reason must reach the user.
    b = LlamaCppBackend(_manifest(gguf_dir, **{"llamacpp.kv_cache_type": "q8_0"}))
    with pytest.raises(BackendError, match="llama.cpp says: .*block size 32.*kv_cache_type"):
        b.load()
    assert not b.loaded
