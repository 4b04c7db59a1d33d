"""Benchmark models: random weights with a real architecture, built once and cached.

The benchmark must decode the same number of tokens on every path (bare library, our backend,
the HTTP API) without a hook to ignore the end of a reply. So the models are made such that an
end-of-reply token (or a token the tokenizer cannot print) practically cannot be sampled:

- the embedding rows of the special tokens, of tokens that do not print at once (lone UTF-8
  bytes, blanks, ``<``: see :func:`printable_ids`) and of the padding ids beyond the tokenizer (the real
  1.5B vocabulary is 151936 while the test tokenizer has ~530 tokens) are set to zero, so their
  logits are exactly 0 (the embeddings are tied: logits = final hidden state · embedding rows);
- the other rows are random and scaled so that their logits spread with a standard deviation of about
  ``LOGIT_STD``; the best one then beats 0 by ~3 standard deviations, i.e. the end token has a
  probability of about exp(-30 / 0.6) at the model card's temperature.

With tied embeddings and random layers the residual stream is dominated by the input embedding,
so the model would repeat its last token forever (one token, often whitespace, which the stream
may hold back). The final norm's weights are therefore set to random signs: the next token
becomes a pseudo-random function of the context and the text cycles through many tokens.

Every sampled token is then printable (streams carry text, so TTFT and chunk rates are
measurable over HTTP) and generation runs until ``max_new_tokens``. The change touches values
only, not shapes, so it costs the same per token as the real model.
"""
from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

# Bump when the way models are made changes, so that caches are rebuilt.
BENCH_MODEL_VERSION = 3
LOGIT_STD = 10.0
DEFAULT_CACHE = Path(os.environ.get("VT_BENCH_CACHE", "~/.cache/vibethinker-app/bench")).expanduser()
EMBED_KEY = "model.embed_tokens.weight"
NORM_KEY = "model.norm.weight"

Progress = Callable[[str], None]


def _say(progress: Progress | None, message: str) -> None:
    log.info(message)
    if progress is not None:
        progress(message)


def _file_of(folder: Path, key: str) -> Path:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return folder / json.loads(index.read_text(encoding="utf-8"))["weight_map"][key]
    return folder / "model.safetensors"


def printable_ids(tokenizer) -> list[int]:
    """Tokens that print at once: whole characters (byte-level BPE has lone UTF-8 bytes, which a
    stream holds back until the character is complete), not blank, and without ``<`` (a stream
    holds back what may start ``<think>``); never special tokens."""
    special = set(tokenizer.all_special_ids)
    special.update(tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|im_start|>", "<|endoftext|>"))
    keep = []
    for token in range(len(tokenizer)):
        text = tokenizer.decode([token])
        if token in special or not text.strip() or "\ufffd" in text or "<" in text:
            continue
        keep.append(token)
    return keep


def make_never_ending(folder: Path) -> None:
    """Rewrite the embedding of the HF checkpoint in ``folder`` as the module docstring says."""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    keep = printable_ids(tokenizer)
    path = _file_of(folder, EMBED_KEY)
    tensors = load_file(path)
    emb = tensors[EMBED_KEY]
    hidden = emb.shape[1]
    gen = torch.Generator().manual_seed(1)
    # After the final RMSNorm the hidden state has a norm of about sqrt(hidden); rows with this
    # standard deviation give logits with a standard deviation of about LOGIT_STD.
    rows = torch.randn((len(keep), hidden), generator=gen) * (LOGIT_STD / math.sqrt(hidden))
    new = torch.zeros(emb.shape, dtype=torch.float32)
    new[torch.tensor(keep)] = rows
    tensors[EMBED_KEY] = new.to(emb.dtype).contiguous()
    save_file(tensors, str(path), metadata={"format": "pt"})
    norm_path = _file_of(folder, NORM_KEY)
    tensors = load_file(norm_path)
    norm = tensors[NORM_KEY]
    signs = torch.randint(0, 2, norm.shape, generator=gen).to(torch.float32) * 2 - 1
    tensors[NORM_KEY] = signs.to(norm.dtype).contiguous()
    save_file(tensors, str(norm_path), metadata={"format": "pt"})


def _marker(folder: Path) -> Path:
    return folder / ".bench-model.json"


def hf_model(preset: str, cache: Path = DEFAULT_CACHE, progress: Progress | None = None) -> Path:
    """The random never-ending checkpoint for ``preset`` ("tiny" or "vibethinker-1.5b")."""
    from .synthetic import make_random_model

    folder = cache / f"{preset}-random-bf16" if preset != "tiny" else cache / "tiny-random-f32"
    marker = _marker(folder)
    want = {"version": BENCH_MODEL_VERSION, "preset": preset}
    if marker.is_file() and json.loads(marker.read_text(encoding="utf-8")) == want:
        return folder
    # The tiny model stays float32 so that its F32 GGUF is exact and quick to make.
    dtype = "float32" if preset == "tiny" else "bfloat16"
    old = json.loads(marker.read_text(encoding="utf-8")) if marker.is_file() else {}
    marker.unlink(missing_ok=True)
    if old.get("preset") != preset:
        _say(progress, f"building the random {preset} checkpoint ({dtype}) in {folder} (once)")
        make_random_model(folder, preset, dtype=dtype)
    # Made from a fixed seed, whatever the rows held before: an older bench model is just redone.
    _say(progress, f"making {folder.name} unable to end its replies")
    make_never_ending(folder)
    marker.write_text(json.dumps(want), encoding="utf-8")
    return folder


def gguf_model(hf_folder: Path, quant: str, progress: Progress | None = None) -> Path:
    """``hf_folder`` converted to GGUF ``quant`` with the app's converter (cached by its stamp)."""
    from backends.models.convert import conversion_is_current, convert_hf_to_gguf

    out = hf_folder.parent / f"{hf_folder.name}-{quant}.gguf"
    current, why = conversion_is_current(hf_folder, out, quant)
    if current:
        return out
    _say(progress, f"converting {hf_folder.name} to GGUF {quant} ({why})")
    return convert_hf_to_gguf(hf_folder, out, quant)


def weight_bytes_hf(folder: Path, dtype_bytes: int) -> dict[str, int]:
    """Bytes a decoding step reads from the weights of an HF checkpoint at ``dtype_bytes``/value.

    Tied embeddings: the output projection reads the whole embedding matrix once per token; the
    input lookup reads one row (ignored).
    """
    total = 0
    for path in sorted(folder.glob("*.safetensors")):
        with open(path, "rb") as fh:
            size = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(size))
        for name, entry in header.items():
            if name != "__metadata__":
                total += math.prod(entry["shape"]) * dtype_bytes
    return {"weights": total}


def kv_bytes_per_token(config: dict, dtype_bytes: int) -> int:
    """K and V bytes one cached position takes over all layers."""
    heads = int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or int(config["hidden_size"]) // heads)
    return 2 * int(config["num_hidden_layers"]) * int(config["num_key_value_heads"]) * head_dim * dtype_bytes


def read_config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text(encoding="utf-8"))
