"""HF Qwen2 → GGUF conversion (backends.models.convert) on the tiny trained model."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from backends.models import convert
from backends.models.convert import conversion_is_current, convert_hf_to_gguf, stamp_path
from bench.synthetic import ADD_PROMPT, CHAT_TEMPLATE
from backends.types import BackendError

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
gguf = pytest.importorskip("gguf")

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def converted(tiny_model_dir, tiny_gguf, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("convert")
    paths = {"F32": tiny_gguf}
    for quant in ("F16", "Q8_0", "Q4_K_M"):
        paths[quant] = convert_hf_to_gguf(tiny_model_dir, out / f"tiny-{quant}.gguf", quant)
    return paths


def _hf_prompt_ids(model_dir: Path, text: str) -> list[int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    return list(tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                        tokenize=True, return_dict=True)["input_ids"])


def _greedy_text(path: Path, ids: list[int], n: int = 40) -> str:
    llm = llama_cpp.Llama(str(path), n_ctx=512, verbose=False)
    try:
        eos = llm.token_eos()
        out: list[int] = []
        for tok in llm.generate(ids, temp=0.0, top_k=0, top_p=1.0, min_p=0.0, repeat_penalty=1.0):
            if tok == eos or len(out) >= n:
                break
            out.append(tok)
        return llm.detokenize(out).decode("utf-8", "replace")
    finally:
        llm.close()


@pytest.mark.parametrize("quant,file_type", [("F32", 0), ("F16", 1), ("Q8_0", 7), ("Q4_K_M", 15)])
def test_every_quant_loads_in_llama_cpp_and_keeps_tokenizer_and_template(converted, tiny_model_dir, quant, file_type):
    path = converted[quant]
    ok, why = conversion_is_current(tiny_model_dir, path, quant)
    assert ok, why
    llm = llama_cpp.Llama(str(path), n_ctx=256, verbose=False)
    try:
        meta = llm.metadata
        assert meta["general.architecture"] == "qwen2"
        assert int(meta["general.file_type"]) == file_type
        assert meta["tokenizer.ggml.model"] == "gpt2"
        assert meta["tokenizer.ggml.pre"] == "qwen2"
        assert meta["tokenizer.chat_template"] == CHAT_TEMPLATE
        assert meta["tokenizer.ggml.add_bos_token"] == "false"
        tok_cfg = json.loads((tiny_model_dir / "tokenizer.json").read_text(encoding="utf-8"))
        im_end = next(t["id"] for t in tok_cfg["added_tokens"] if t["content"] == "<|im_end|>")
        assert llm.token_eos() == im_end
        # The same ids as transformers for a mixed-script chat prompt.
        text = "Hello 你好, what is 12+34? 请回答。"
        prompt = _hf_prompt_ids(tiny_model_dir, text)
        rendered = (
            "<|im_start|>system\nPlease reason step by step, and put your final answer within \\boxed{}.<|im_end|>\n"
            f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"
        )
        assert llm.tokenize(rendered.encode(), add_bos=False, special=True) == prompt
    finally:
        llm.close()


@pytest.mark.parametrize("quant", ["F32", "F16", "Q8_0"])
def test_converted_model_still_answers(converted, tiny_model_dir, quant):
    text = _greedy_text(converted[quant], _hf_prompt_ids(tiny_model_dir, ADD_PROMPT))
    assert "\\boxed{4}" in text


def test_q8_0_keeps_norms_and_biases_f32_and_falls_back_for_odd_shapes():
    T = gguf.GGMLQuantizationType
    ref = convert._TensorRef
    refs = [
        ref("model.embed_tokens.weight", Path("x"), "F32", (10, 64), 0, 0),
        ref("model.layers.0.self_attn.q_proj.weight", Path("x"), "F32", (64, 48), 0, 0),
        ref("model.layers.0.self_attn.q_proj.bias", Path("x"), "F32", (64,), 0, 0),
        ref("model.layers.0.input_layernorm.weight", Path("x"), "BF16", (64,), 0, 0),
    ]
    plan = {p.gguf_name: p for p in convert._plan(refs, {"num_hidden_layers": 1, "tie_word_embeddings": True}, "Q8_0", gguf)}
    assert plan["token_embd.weight"].qtype == T.Q8_0
    assert plan["token_embd.weight"].nbytes == 10 * 64 // 32 * 34
    assert plan["blk.0.attn_q.weight"].qtype == T.F16  # 48 is not a multiple of 32
    assert plan["blk.0.attn_q.bias"].qtype == T.F32
    assert plan["blk.0.attn_norm.weight"].qtype == T.F32


def _rewrite_safetensors(src: Path, dst: Path, transform) -> None:
    """Copy an HF folder, passing its tensors through ``transform(dict) -> list[dict]`` (shards)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    tensors = load_file(src / "model.safetensors")
    (dst / "model.safetensors").unlink()
    shards = transform(tensors)
    if len(shards) == 1:
        save_file(shards[0], dst / "model.safetensors", metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, dst / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def _tensor(path: Path, name: str) -> np.ndarray:
    reader = gguf.GGUFReader(path)
    t = next(t for t in reader.tensors if t.name == name)
    return np.array(t.data)


def test_bf16_and_sharded_checkpoints(tiny_model_dir, tiny_gguf, tmp_path):
    import torch

    bf16 = tmp_path / "bf16"
    _rewrite_safetensors(tiny_model_dir, bf16, lambda t: [{k: v.to(torch.bfloat16) for k, v in t.items()}])
    out = convert_hf_to_gguf(bf16, tmp_path / "bf16.gguf", "F32")
    from safetensors.torch import load_file

    want = load_file(tiny_model_dir / "model.safetensors")["model.embed_tokens.weight"].to(torch.bfloat16).float()
    np.testing.assert_array_equal(_tensor(out, "token_embd.weight"), want.numpy())

    sharded = tmp_path / "sharded"

    def split(t):
        keys = sorted(t)
        return [{k: t[k] for k in keys[: len(keys) // 2]}, {k: t[k] for k in keys[len(keys) // 2 :]}]

    _rewrite_safetensors(tiny_model_dir, sharded, split)
    out2 = convert_hf_to_gguf(sharded, tmp_path / "sharded.gguf", "F32")
    for name in ("token_embd.weight", "blk.1.ffn_down.weight", "output_norm.weight"):
        np.testing.assert_array_equal(_tensor(out2, name), _tensor(tiny_gguf, name))


def test_old_and_new_rope_theta_keys(tiny_model_dir, tmp_path):
    assert convert._rope_theta({"rope_parameters": {"rope_theta": 1e6, "rope_type": "default"}}) == 1e6
    assert convert._rope_theta({"rope_theta": 5e5}) == 5e5
    old = tmp_path / "old"
    shutil.copytree(tiny_model_dir, old)
    cfg = json.loads((old / "config.json").read_text())
    cfg.pop("rope_parameters", None)
    cfg["rope_theta"] = 12345.0
    (old / "config.json").write_text(json.dumps(cfg))
    out = convert_hf_to_gguf(old, tmp_path / "old.gguf", "F16")
    field = gguf.GGUFReader(out).get_field("qwen2.rope.freq_base")
    assert float(field.contents()) == 12345.0


def test_stamp_detects_stale_and_partial(tiny_model_dir, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny_model_dir, src)
    out = convert_hf_to_gguf(src, tmp_path / "m.gguf", "Q8_0")
    assert conversion_is_current(src, out, "Q8_0")[0]
    assert not conversion_is_current(src, out, "F16")[0]
    st = (src / "config.json").stat()
    os.utime(src / "config.json", ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    ok, why = conversion_is_current(src, out, "Q8_0")
    assert not ok and "config.json" in why
    out = convert_hf_to_gguf(src, out, "Q8_0")
    assert conversion_is_current(src, out, "Q8_0")[0]
    with open(out, "r+b") as fh:
        fh.truncate(out.stat().st_size // 2)
    ok, why = conversion_is_current(src, out, "Q8_0")
    assert not ok and "size" in why
    stamp_path(out).unlink()
    assert not conversion_is_current(src, out, "Q8_0")[0]


def test_failed_conversion_leaves_nothing_behind(tiny_model_dir, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = convert._convert_tensor

    def failing(item, arr, g):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C mid-way
        return real(item, arr, g)

    monkeypatch.setattr(convert, "_convert_tensor", failing)
    with pytest.raises(KeyboardInterrupt):
        convert_hf_to_gguf(tiny_model_dir, tmp_path / "m.gguf", "F16")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_bad_inputs_have_clear_errors(tiny_model_dir, tmp_path, monkeypatch):
    with pytest.raises(BackendError, match="Unknown GGUF quantization 'Q5'"):
        convert_hf_to_gguf(tiny_model_dir, tmp_path / "x.gguf", "Q5")
    with pytest.raises(BackendError, match="no config.json"):
        convert_hf_to_gguf(tmp_path, tmp_path / "x.gguf", "F16")
    llama = tmp_path / "llama"
    shutil.copytree(tiny_model_dir, llama)
    cfg = json.loads((llama / "config.json").read_text())
    cfg.update(model_type="llama", architectures=["LlamaForCausalLM"])
    (llama / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(BackendError, match="Qwen2"):
        convert_hf_to_gguf(llama, tmp_path / "x.gguf", "F16")
    cut = tmp_path / "cut"
    shutil.copytree(tiny_model_dir, cut)
    with open(cut / "model.safetensors", "r+b") as fh:
        fh.truncate((cut / "model.safetensors").stat().st_size - 1000)
    with pytest.raises(BackendError, match="truncated"):
        convert_hf_to_gguf(cut, tmp_path / "x.gguf", "F16")
    monkeypatch.setattr(convert.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9, 1000))
    with pytest.raises(BackendError, match="Not enough disk space"):
        convert_hf_to_gguf(tiny_model_dir, tmp_path / "x.gguf", "F16")
    assert not (tmp_path / "x.gguf").exists()


def test_cli(tiny_model_dir, tmp_path):
    src = tmp_path / "m"
    shutil.copytree(tiny_model_dir, src)
    script = ROOT / "scripts" / "convert_to_gguf.py"
    done = subprocess.run([sys.executable, str(script), str(src), "--quant", "F16"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    out = src / "m-F16.gguf"
    assert out.is_file() and stamp_path(out).is_file()
    assert done.stdout.strip().endswith(str(out))
    bad = subprocess.run([sys.executable, str(script), str(tmp_path), "--out", str(tmp_path / "y.gguf")],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "error:" in bad.stderr and "config.json" in bad.stderr
