"""The transformers engine through the shared driver, on the tiny trained model (CPU, no network)."""
from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from backends.config import Manifest  # noqa: E402
from bench.synthetic import ADD_PROMPT, ADD_REPLY, LOOP_PROMPT  # noqa: E402
from backends.engines.transformers import TransformersBackend  # noqa: E402
from backends.types import (  # noqa: E402
    BackendError,
    ChatMessage,
    FinishReason,
    GenerationRequest,
    LoadProgress,
    SamplingParams,
    StreamChunk,
)

GREEDY = dict(temperature=0.0)


class CountingBackend(TransformersBackend):
    """Records what the engine does: tokens offered to the driver and tokens fed to the model."""

    def __init__(self, manifest: Manifest) -> None:
        super().__init__(manifest)
        self.tokens_offered = 0
        self.forward_lengths: list[int] = []  # input length of each forward pass
        self.loop_starts: list[int] = []  # index into forward_lengths where each decode_loop began

    def load(self, progress=None) -> None:
        super().load(progress)
        if not getattr(self._model, "_counting", False):
            def hook(module, args, kwargs):
                ids = kwargs.get("input_ids", args[0] if args else None)
                if ids is not None:
                    self.forward_lengths.append(int(ids.shape[1]))

            self._model.register_forward_pre_hook(hook, with_kwargs=True)
            self._model._counting = True

    def decode_loop(self, ids, params, max_tokens, on_token):
        def counted(token: int) -> bool:
            self.tokens_offered += 1
            return on_token(token)

        self.loop_starts.append(len(self.forward_lengths))
        super().decode_loop(ids, params, max_tokens, counted)


def make_manifest(path: Path, **sections) -> Manifest:
    data = {"model": {"path": str(path)}, "transformers": {"device": "cpu"}}
    for key, value in sections.items():
        data.setdefault(key, {}).update(value)
    return Manifest.model_validate(data)


@pytest.fixture(scope="module")
def backend(tiny_model_dir) -> CountingBackend:
    b = CountingBackend(make_manifest(tiny_model_dir))
    b.load()
    yield b
    b.close()


def ask(b, prompt: str = ADD_PROMPT, messages=None, **params):
    msgs = messages or (ChatMessage("user", prompt),)
    chunks = list(b.stream(GenerationRequest(messages=tuple(msgs), params=SamplingParams(**params))))
    assert chunks[-1].final
    return "".join(c.reasoning for c in chunks), "".join(c.answer for c in chunks), chunks[-1], chunks


def _expected_parts() -> tuple[str, str]:
    reasoning, answer = ADD_REPLY.split("</think>")
    return reasoning.removeprefix("<think>").strip(), answer.strip()


def no_worker_threads() -> bool:
    return not any(t.name.startswith("vt-generate-") for t in threading.enumerate())


def test_greedy_reply_has_reasoning_and_boxed_answer(backend):
    reasoning, answer, last, chunks = ask(backend, **GREEDY)
    assert (reasoning, answer) == _expected_parts()
    assert last.boxed_answer == "4"
    usage = last.usage
    assert usage.finish_reason == FinishReason.STOP
    prompt = backend.encode_chat([ChatMessage("user", ADD_PROMPT)])
    assert usage.prompt_tokens == len(prompt)
    reply_ids = backend.encode_text(ADD_REPLY)
    assert usage.completion_tokens == len(reply_ids)
    assert 0 < usage.reasoning_tokens < usage.completion_tokens
    assert usage.time_to_first_token_s is not None and usage.decode_tokens_per_s is not None
    assert len(chunks) > 2  # streamed, not one block
    assert no_worker_threads()


def test_stream_matches_plain_generate(backend):
    """The driver's incremental text equals one decode of what model.generate produces."""
    ids = backend.encode_chat([ChatMessage("user", ADD_PROMPT)])
    model = backend._model
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         do_sample=False, max_new_tokens=80, eos_token_id=sorted(backend.eos_token_ids),
                         pad_token_id=0)
    new = out[0, len(ids):].tolist()
    while new and new[-1] in backend.eos_token_ids:
        new.pop()
    assert backend.decode(new) == ADD_REPLY


def test_chat_template_default_system_prompt_and_empty_system_message(backend):
    text = backend.decode(backend.encode_chat([ChatMessage("user", "hi")]))
    assert "Please reason step by step, and put your final answer within \\boxed{}." in text
    assert text.endswith("<|im_start|>assistant\n")
    _, _, plain, _ = ask(backend, **GREEDY, max_new_tokens=4)
    _, _, empty_sys, _ = ask(backend, messages=[ChatMessage("system", ""), ChatMessage("user", ADD_PROMPT)],
                             **GREEDY, max_new_tokens=4)
    _, _, own_sys, _ = ask(backend, messages=[ChatMessage("system", "Be brief."), ChatMessage("user", ADD_PROMPT)],
                           **GREEDY, max_new_tokens=4)
    assert empty_sys.usage.prompt_tokens == plain.usage.prompt_tokens
    assert own_sys.usage.prompt_tokens != plain.usage.prompt_tokens


def test_chinese_prompt_streams_without_broken_characters(backend):
    reasoning, answer, last, chunks = ask(backend, "计算 1+1 等于几？", **GREEDY)
    assert "一加一等于二" in reasoning
    assert last.boxed_answer == "2"
    assert not any("\ufffd" in c.reasoning + c.answer for c in chunks)


def test_thinking_budget_forces_an_answer_and_reuses_the_kv_cache(backend):
    backend.forward_lengths.clear()
    backend.loop_starts.clear()
    reasoning, answer, last, _ = ask(backend, **GREEDY, thinking_budget=5)
    assert last.usage.finish_reason == FinishReason.BUDGET
    assert "thinking budget of 5 tokens" in last.usage.detail
    assert reasoning.endswith("I have thought long enough; now I will write the final answer.")
    assert "\\boxed{" in answer
    assert last.usage.reasoning_tokens >= 5
    # Phase 2 started from the cache of phase 1: its first forward saw only the uncached tail
    # (the last sampled token plus the injected closing text), not the whole conversation.
    assert len(backend.loop_starts) == 2
    phase2_first = backend.forward_lengths[backend.loop_starts[1]]
    injected = len(backend.encode_text("\n\nI have thought long enough; now I will write the final answer.\n</think>\n\n"))
    assert phase2_first <= injected + 1
    assert phase2_first < last.usage.prompt_tokens


def test_loop_guard_closes_thinking_and_the_model_answers(backend):
    reasoning, answer, last, _ = ask(backend, LOOP_PROMPT, **GREEDY)
    assert last.usage.finish_reason == FinishReason.LOOP
    assert "while thinking" in last.usage.detail
    assert reasoning.startswith("wait wait wait")
    assert "\\boxed{" in answer and last.boxed_answer is not None
    assert last.usage.reasoning_tokens < 240  # stopped long before the trained 240 waits


def test_loop_guard_off_lets_the_loop_run_to_the_limit(backend):
    reasoning, answer, last, _ = ask(backend, LOOP_PROMPT, **GREEDY, loop_guard=False, max_new_tokens=100)
    assert last.usage.finish_reason == FinishReason.LENGTH
    assert answer == "" and reasoning.count("wait") > 90


def test_seeded_sampling_is_reproducible(backend):
    params = dict(temperature=0.6, top_p=0.95, seed=1234)
    first = ask(backend, **params)[:2]
    ask(backend, "What is 3+5?", temperature=1.0, seed=99)  # something else in between
    second = ask(backend, **params)[:2]
    assert first == second


def test_sampling_depends_on_the_seed(backend):
    outputs = {ask(backend, LOOP_PROMPT, temperature=2.0, top_p=1.0, seed=s, max_new_tokens=12,
                   loop_guard=False)[:2] for s in range(4)}
    assert len(outputs) > 1


def test_cancel_stops_within_one_step(backend):
    request = GenerationRequest(messages=(ChatMessage("user", LOOP_PROMPT),),
                                params=SamplingParams(temperature=0, loop_guard=False, max_new_tokens=5000))
    stream = backend.stream(request)
    next(stream)
    assert backend.cancel(request.request_id) is True
    offered = backend.tokens_offered
    rest = list(stream)
    assert rest[-1].usage.finish_reason == FinishReason.CANCELLED
    assert backend.tokens_offered - offered <= 1
    assert rest[-1].usage.completion_tokens < 5000
    assert no_worker_threads()


def test_closing_the_iterator_stops_generation(backend):
    stream = backend.stream(GenerationRequest(messages=(ChatMessage("user", LOOP_PROMPT),),
                                              params=SamplingParams(temperature=0, loop_guard=False,
                                                                    max_new_tokens=5000)))
    next(stream)
    stream.close()
    offered = backend.tokens_offered
    assert no_worker_threads()
    assert backend.tokens_offered == offered
    # The engine is free again.
    assert ask(backend, **GREEDY)[2].boxed_answer == "4"


def test_concurrent_streams_are_served_one_at_a_time(backend):
    results: list[list[StreamChunk]] = []

    def run() -> None:
        results.append(list(backend.stream(GenerationRequest(messages=(ChatMessage("user", ADD_PROMPT),),
                                                             params=SamplingParams(temperature=0)))))

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r[-1].boxed_answer for r in results] == ["4", "4", "4"]


def test_info_and_idempotent_load(backend):
    info = backend.info()
    assert info.backend == "transformers"
    assert info.device.startswith("cpu") and info.dtype == "float32"
    assert info.context_length == 32768
    seen: list[LoadProgress] = []
    backend.load(seen.append)
    assert seen and seen[-1].fraction == 1.0 and "already" in seen[-1].message


def test_load_progress_close_and_reload_with_bfloat16(tiny_model_dir):
    b = TransformersBackend(make_manifest(tiny_model_dir, transformers={"dtype": "bfloat16"}))
    with pytest.raises(BackendError, match="not loaded"):
        b.info()
    seen: list[LoadProgress] = []
    b.load(seen.append)
    fractions = [p.fraction for p in seen]
    assert fractions == sorted(fractions) and fractions[0] == 0.0 and fractions[-1] == 1.0
    assert b.info().dtype == "bfloat16"
    _, answer, last, _ = ask(b, **GREEDY, max_new_tokens=60)
    assert last.usage.completion_tokens > 0
    b.close()
    assert not b.loaded
    with pytest.raises(BackendError, match="not loaded"):
        list(b.stream(GenerationRequest(messages=(ChatMessage("user", "x"),))))
    b.load()
    assert b.loaded
    b.close()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")
def test_cuda_requested_without_cuda(tiny_model_dir):
    b = TransformersBackend(make_manifest(tiny_model_dir, transformers={"device": "cuda", "cpu_fallback": False}))
    with pytest.raises(BackendError, match="transformers.device"):
        b.load()
    b = TransformersBackend(make_manifest(tiny_model_dir, transformers={"device": "cuda", "cpu_fallback": True}))
    b.load()
    info = b.info()
    assert info.device.startswith("cpu") and "fell back" in info.reason
    b.close()


def _pickle_copy(src: Path, dst: Path) -> Path:
    from safetensors.torch import load_file

    shutil.copytree(src, dst)
    state = load_file(dst / "model.safetensors")
    (dst / "model.safetensors").unlink()
    torch.save(state, dst / "pytorch_model.bin")
    return dst


def test_pickle_weights_refused_unless_allowed(tiny_model_dir, tmp_path):
    folder = _pickle_copy(tiny_model_dir, tmp_path / "bin-model")
    with pytest.raises(BackendError, match="allow_pickle_weights"):
        TransformersBackend(make_manifest(folder)).load()
    b = TransformersBackend(make_manifest(folder, model={"allow_pickle_weights": True}))
    b.load()
    assert ask(b, **GREEDY)[2].boxed_answer == "4"
    b.close()


class _Exploit:
    def __reduce__(self):
        import os

        return (os.system, ("touch pwned-marker",))


def test_malicious_pickle_is_not_executed_even_when_allowed(tiny_model_dir, tmp_path, monkeypatch):
    folder = tmp_path / "evil"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "model.safetensors").unlink()
    torch.save({"model.embed_tokens.weight": _Exploit()}, folder / "pytorch_model.bin")
    monkeypatch.chdir(tmp_path)
    b = TransformersBackend(make_manifest(folder, model={"allow_pickle_weights": True}))
    with pytest.raises(BackendError, match="weights_only|safetensors"):
        b.load()
    assert not (tmp_path / "pwned-marker").exists()


def test_gguf_folder_given_to_transformers(tmp_path):
    folder = tmp_path / "gguf-only"
    folder.mkdir()
    (folder / "model.gguf").write_bytes(b"GGUF" + b"\0" * 60)
    with pytest.raises(BackendError, match="llamacpp"):
        TransformersBackend(make_manifest(folder)).load()


def test_missing_model_folder(tmp_path):
    with pytest.raises(BackendError, match="does not exist.*config.json"):
        TransformersBackend(make_manifest(tmp_path / "nowhere")).load()


def test_kv_cache_prefix_is_reused_across_requests(backend):
    ask(backend, **GREEDY)
    backend.forward_lengths.clear()
    backend.loop_starts.clear()
    _, _, last, _ = ask(backend, **GREEDY)  # same prompt: only its last token is evaluated again
    assert backend.forward_lengths[0] == 1 and last.boxed_answer == "4"
    backend.forward_lengths.clear()
    _, _, other, _ = ask(backend, "What is 3+5?", **GREEDY)  # shares the system prompt only
    assert 1 < backend.forward_lengths[0] < other.usage.prompt_tokens
    assert other.boxed_answer == "8"


class StaticCacheBackend(CountingBackend):
    """The CUDA static-cache code path, exercised on the CPU (StaticCache works there too)."""

    def _cache_mode(self) -> str:
        return "static"


def test_static_cache_path_matches_and_reuses_at_the_phase_boundary(tiny_model_dir, backend):
    from transformers import StaticCache

    b = StaticCacheBackend(make_manifest(tiny_model_dir, transformers={"cache": "static"}))
    b.load()
    try:
        assert ask(b, **GREEDY)[:2] == ask(backend, **GREEDY)[:2]
        assert isinstance(b._cache, StaticCache)
        b.forward_lengths.clear()
        b.loop_starts.clear()
        reasoning, answer, last, _ = ask(b, **GREEDY, thinking_budget=5)
        assert last.usage.finish_reason == FinishReason.BUDGET and "\\boxed{" in answer
        assert (reasoning, answer) == ask(backend, **GREEDY, thinking_budget=5)[:2]
        assert b.forward_lengths[b.loop_starts[1]] < last.usage.prompt_tokens
    finally:
        b.close()
