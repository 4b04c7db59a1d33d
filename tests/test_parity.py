"""Greedy parity: transformers (fp32) and llama.cpp (F32 GGUF of the same tiny model) agree."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from backends.config import load_manifest
from backends.types import ChatMessage, SamplingParams

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
from backends.engines.llamacpp import LlamaCppBackend  # noqa: E402

CHATS = [
    [ChatMessage("user", "Hello! 你好，请计算 12+34 等于几？ Answer in English, 2024 年。")],
    [ChatMessage("system", "You are a careful 数学 tutor."), ChatMessage("user", "What is 3+5? 谢谢 123456789")],
]
N_TOKENS = 32


@pytest.fixture(scope="module")
def hf(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    return tok, model


@pytest.fixture(scope="module")
def llama(tiny_gguf, tmp_path_factory):
    folder = tmp_path_factory.mktemp("parity")
    shutil.copy(tiny_gguf, folder / Path(tiny_gguf).name)
    manifest = load_manifest(None, env={}, overrides={"model.path": str(folder), "llamacpp.n_ctx": 1024})
    backend = LlamaCppBackend(manifest)
    backend.load()
    yield backend
    backend.close()


def _hf_greedy(model, ids: list[int], n: int) -> list[int]:
    import torch

    out: list[int] = []
    seq = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(n):  # no early stop at <|im_end|>: compare a fixed number of tokens
            nxt = int(model(seq).logits[0, -1].argmax())
            out.append(nxt)
            seq = torch.cat([seq, torch.tensor([[nxt]])], dim=1)
    return out


@pytest.mark.parametrize("chat", CHATS, ids=["mixed-user", "with-system"])
def test_same_prompt_ids_and_same_greedy_tokens(hf, llama, chat):
    tok, model = hf
    messages = [{"role": m.role, "content": m.content} for m in chat]
    hf_ids = list(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                          return_dict=True)["input_ids"])
    assert llama.encode_chat(chat) == hf_ids

    got: list[int] = []
    llama.decode_loop(hf_ids, SamplingParams(temperature=0.0, top_k=0, top_p=1.0), N_TOKENS,
                      lambda t: got.append(t) or False)
    assert got == _hf_greedy(model, hf_ids, N_TOKENS)
    assert llama.decode(got) == tok.decode(got, skip_special_tokens=False)
