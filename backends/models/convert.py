"""Convert an HF Qwen2 checkpoint folder (VibeThinker, or the tiny test model) to GGUF.

Why our own writer instead of llama.cpp's ``convert_hf_to_gguf.py``: that script names the BPE
pre-tokenizer by hashing how the tokenizer splits a check string, so it refuses any tokenizer it
does not know (our tiny test model); and it is not installed with llama-cpp-python. VibeThinker
is a plain Qwen2, whose GGUF layout is small and stable, so we write it with gguf-py directly:

- F32 / F16 / Q8_0 are written here; norms and biases stay F32 (llama.cpp's convention), and a
  Q8_0 tensor whose last dimension is not a multiple of 32 falls back to F16.
- Q4_K_M needs llama.cpp's k-quant search: we write an F16 (F32 for F32 sources) intermediate
  and hand it to ``llama_cpp.llama_model_quantize``.

Tensors are streamed from memory-mapped safetensors one at a time, so a 3B model is never held
twice. The output is written to a temporary file in the target folder and renamed when complete;
a stamp (``<out>.stamp.json``) records the sources and the quant so that a stale or partial
conversion is detected (:func:`conversion_is_current`).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..types import BackendError, LoadProgress
from .safetensors_reader import _Mmaps, _safetensors_files, _tensor_refs, _TensorRef, _to_f32
from .stamps import (  # noqa: F401 - conversion_is_current/read_stamp/remove_partials/stamp_path are public here
    CONVERTER_VERSION,
    PARTIAL_MARK,
    STAMP_SUFFIX,
    _atomic_write_text,
    _mkstemp,
    conversion_is_current,
    read_stamp,
    remove_partials,
    source_fingerprint,
    stamp_path,
)

log = logging.getLogger(__name__)

QUANTS = ("F32", "F16", "Q8_0", "Q4_K_M")

Progress = Callable[[LoadProgress], None]


# ---------------------------------------------------------------------------------------------
# hparams and tokenizer


def _load_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BackendError(f"{path} is missing: the folder is not a complete HF checkpoint.") from None
    except ValueError as exc:
        raise BackendError(f"{path} is not valid JSON ({exc}). Re-copy it from the model release.") from None


def _rope_theta(config: dict[str, Any]) -> float:
    # transformers 5 moved rope_theta into rope_parameters; older configs keep it at the top level.
    params = config.get("rope_parameters") or {}
    if isinstance(params, dict) and "rope_theta" in params:
        return float(params["rope_theta"])
    return float(config.get("rope_theta", 10000.0))


def _rope_scaling(config: dict[str, Any]) -> dict[str, Any] | None:
    scaling = config.get("rope_scaling") or config.get("rope_parameters") or None
    if not isinstance(scaling, dict):
        return None
    kind = scaling.get("rope_type") or scaling.get("type")
    if kind in (None, "default"):
        return None
    return scaling


def _check_config(src: Path, config: dict[str, Any]) -> None:
    archs = config.get("architectures") or []
    if config.get("model_type") != "qwen2" and "Qwen2ForCausalLM" not in archs:
        raise BackendError(
            f"{src}/config.json describes a {config.get('model_type') or archs or 'unknown'} model; the converter "
            "handles Qwen2 checkpoints (VibeThinker-1.5B/3B). Use llama.cpp's convert_hf_to_gguf.py for other models."
        )
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"):
        if not isinstance(config.get(key), int):
            raise BackendError(f"{src}/config.json lacks {key!r}: the file is incomplete. Re-copy it.")


def _write_hparams(writer: Any, gguf: Any, config: dict[str, Any], name: str, file_type: int) -> None:
    writer.add_name(name)
    writer.add_context_length(int(config.get("max_position_embeddings", 32768)))
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(int(config.get("num_key_value_heads") or config["num_attention_heads"]))
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_file_type(file_type)
    scaling = _rope_scaling(config)
    if scaling is not None:
        kind = scaling.get("rope_type") or scaling.get("type")
        factor = float(scaling.get("factor", 1.0))
        if kind == "yarn":
            writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
            writer.add_rope_scaling_factor(factor)
            writer.add_rope_scaling_orig_ctx_len(int(scaling["original_max_position_embeddings"]))
        elif kind == "linear":
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(factor)
        else:
            raise BackendError(f"config.json uses rope scaling {kind!r}, which the converter does not support.")


def _write_tokenizer(writer: Any, gguf: Any, src: Path, vocab_size: int) -> None:
    tok = _load_json(src / "tokenizer.json")
    model = tok.get("model") or {}
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise BackendError(
            f"{src}/tokenizer.json is not a byte-level BPE tokenizer (model type {model.get('type')!r}); "
            "VibeThinker/Qwen2 checkpoints ship one. Re-copy tokenizer.json from the model release."
        )
    tok_config: dict[str, Any] = {}
    if (src / "tokenizer_config.json").is_file():
        tok_config = _load_json(src / "tokenizer_config.json")
    decoder = tok_config.get("added_tokens_decoder") or {}

    id_to_token: dict[int, str] = {int(i): t for t, i in model["vocab"].items()}
    special: dict[int, bool] = {}
    for added in tok.get("added_tokens", []):
        id_to_token[int(added["id"])] = added["content"]
        special[int(added["id"])] = bool(added.get("special"))
    for i, entry in decoder.items():
        if isinstance(entry, dict) and "content" in entry:
            id_to_token.setdefault(int(i), entry["content"])
            special.setdefault(int(i), bool(entry.get("special")))
    n_vocab = max(vocab_size, max(id_to_token) + 1)

    tokens: list[str] = []
    types: list[int] = []
    for i in range(n_vocab):
        text = id_to_token.get(i)
        if text is None:
            # Embedding rows beyond the tokenizer (Qwen pads the vocab to a round number).
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in special:
            looks_special = text.startswith("<|") and text.endswith("|>")
            types.append(gguf.TokenType.CONTROL if special[i] or looks_special else gguf.TokenType.USER_DEFINED)
            tokens.append(text)
        else:
            tokens.append(text)
            types.append(gguf.TokenType.NORMAL)

    writer.add_tokenizer_model("gpt2")
    # Our folders are Qwen2 by construction (checked in _check_config): name the pre-tokenizer
    # instead of guessing it from a hash as llama.cpp's converter does.
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special_vocab = gguf.SpecialVocab(src, load_merges=True, n_vocab=n_vocab)
    if not special_vocab.merges:
        raise BackendError(f"{src}/tokenizer.json has no BPE merges. Re-copy it from the model release.")
    if special_vocab.chat_template is None:
        raise BackendError(
            f"{src} has no chat template (tokenizer_config.json chat_template or chat_template.jinja). "
            "Re-copy the tokenizer files from the model release."
        )
    special_vocab.add_to_gguf(writer, quiet=True)
    if "bos" not in special_vocab.add_special_token:
        writer.add_add_bos_token(False)


# ---------------------------------------------------------------------------------------------
# per-tensor plan


@dataclass
class _Planned:
    ref: _TensorRef
    gguf_name: str
    qtype: Any  # gguf.GGMLQuantizationType
    nbytes: int


def _plan(refs: list[_TensorRef], config: dict[str, Any], out_quant: str, gguf: Any) -> list[_Planned]:
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2, config["num_hidden_layers"])
    tied = bool(config.get("tie_word_embeddings", False))
    names = {r.name for r in refs}
    T = gguf.GGMLQuantizationType
    plan: list[_Planned] = []
    for ref in refs:
        if ref.name.endswith(("rotary_emb.inv_freq",)):
            continue
        if ref.name == "lm_head.weight" and tied:
            continue  # llama.cpp reuses token_embd when output.weight is absent
        new = tmap.get_name(ref.name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise BackendError(
                f"Tensor {ref.name} of the checkpoint has no GGUF counterpart in a Qwen2 model. "
                "Is this a VibeThinker/Qwen2 checkpoint?"
            )
        if len(ref.shape) <= 1:
            qtype = T.F32
        elif out_quant == "F32":
            qtype = T.F32
        elif out_quant == "Q8_0" and ref.shape[-1] % gguf.GGML_QUANT_SIZES[T.Q8_0][0] == 0:
            qtype = T.Q8_0
        else:
            # F16, the F16 intermediate of Q4_K_M, and Q8_0's fallback for odd shapes.
            qtype = T.F16
        n = int(np.prod(ref.shape))
        if qtype == T.Q8_0:
            block, tsize = gguf.GGML_QUANT_SIZES[T.Q8_0]
            nbytes = n // block * tsize
        else:
            nbytes = n * (4 if qtype == T.F32 else 2)
        plan.append(_Planned(ref, new, qtype, nbytes))
    if "model.embed_tokens.weight" not in names:
        raise BackendError("The checkpoint has no model.embed_tokens.weight: it is incomplete. Re-copy all shards.")
    if not tied and "lm_head.weight" not in names:
        raise BackendError("config.json says tie_word_embeddings=false but there is no lm_head.weight. Re-copy all shards.")
    return plan


def _convert_tensor(item: _Planned, arr: np.ndarray, gguf: Any) -> np.ndarray:
    T = gguf.GGMLQuantizationType
    # Chunks of rows bound the float32 temporaries of a large tensor (embeddings: 150k rows).
    rows = arr.reshape(-1, arr.shape[-1]) if arr.ndim > 1 else arr.reshape(1, -1)
    step = max(1, (64 * 2**20) // max(1, rows.shape[1] * 4))
    if item.qtype == T.F32:
        out = np.empty(rows.shape, dtype=np.float32)
    elif item.qtype == T.F16:
        out = np.empty(rows.shape, dtype=np.float16)
    else:
        out = np.empty((rows.shape[0], item.nbytes // rows.shape[0]), dtype=np.uint8)
    for lo in range(0, rows.shape[0], step):
        chunk = _to_f32(item.ref, rows[lo : lo + step])
        if item.qtype == T.F32:
            out[lo : lo + step] = chunk
        elif item.qtype == T.F16:
            out[lo : lo + step] = chunk.astype(np.float16)
        else:
            out[lo : lo + step] = gguf.quants.quantize(chunk, item.qtype)
    if item.qtype in (T.F32, T.F16):
        return out.reshape(item.ref.shape)
    return out


# ---------------------------------------------------------------------------------------------
# public API


def estimate_gguf_bytes(src: Path, quant: str = "F16") -> int:
    """Bytes the output will take (plus the F16/F32 intermediate for Q4_K_M), from headers only."""
    import gguf

    _check_quant(quant)
    src = Path(src)
    config = _load_json(src / "config.json")
    refs = _tensor_refs(_safetensors_files(src))
    if quant == "Q4_K_M":
        inter = sum(p.nbytes for p in _plan(refs, config, _intermediate_quant(refs), gguf))
        return inter + inter * 9 // 20  # Q4_K_M is about 0.3x of F16; keep a margin
    return sum(p.nbytes for p in _plan(refs, config, quant, gguf)) + 16 * 2**20


def _check_quant(quant: str) -> None:
    if quant not in QUANTS:
        raise BackendError(f"Unknown GGUF quantization {quant!r}; choose one of {', '.join(QUANTS)}.")


def _intermediate_quant(refs: list[_TensorRef]) -> str:
    # An F32 source (the tiny test model) keeps full precision until llama.cpp quantizes it.
    return "F32" if all(r.dtype == "F32" for r in refs) else "F16"


def _report(progress: Progress | None, fraction: float, message: str, level: int = logging.INFO) -> None:
    log.log(level, "%s", message)
    if progress is not None:
        progress(LoadProgress(max(0.0, min(1.0, fraction)), message))


def _write_gguf(src: Path, out: Path, quant: str, progress: Progress | None, span: tuple[float, float]) -> None:
    import gguf

    config = _load_json(src / "config.json")
    _check_config(src, config)
    refs = _tensor_refs(_safetensors_files(src))
    plan = _plan(refs, config, quant, gguf)
    ftype = {
        "F32": gguf.LlamaFileType.ALL_F32,
        "F16": gguf.LlamaFileType.MOSTLY_F16,
        "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }[quant]
    writer = gguf.GGUFWriter(out, "qwen2")
    maps = _Mmaps()
    try:
        _write_hparams(writer, gguf, config, src.name, int(ftype))
        _write_tokenizer(writer, gguf, src, config["vocab_size"])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for item in plan:
            writer.add_tensor_info(
                item.gguf_name, item.ref.shape, np.dtype(np.float32), item.nbytes, raw_dtype=item.qtype
            )
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        total = sum(p.nbytes for p in plan) or 1
        done = 0
        lo, hi = span
        for item in plan:
            data = _convert_tensor(item, maps.array(item.ref), gguf)
            writer.write_tensor_data(data)
            del data
            done += item.nbytes
            _report(progress, lo + (hi - lo) * done / total, f"Converting to GGUF {quant}: {item.gguf_name}",
                    logging.DEBUG)
        writer.flush()
        assert writer.fout is not None
        for fh in writer.fout:
            os.fsync(fh.fileno())
    finally:
        writer.close()
        maps.close()


def _quantize_q4_k_m(inp: Path, out: Path) -> None:
    try:
        import llama_cpp
    except ImportError as exc:
        raise BackendError(
            f"Q4_K_M needs llama-cpp-python's quantizer, which cannot be imported ({exc}). "
            'Install it (pip install "llama-cpp-python>=0.3.16") or choose gguf_quant: Q8_0.'
        ) from None
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    params.nthread = max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    rc = llama_cpp.llama_model_quantize(str(inp).encode(), str(out).encode(), llama_cpp.byref(params))
    if rc != 0 or not out.is_file():
        raise BackendError(f"llama.cpp could not quantize {inp.name} to Q4_K_M (code {rc}). Try gguf_quant: Q8_0.")


def convert_hf_to_gguf(src: Path, out: Path, quant: str = "F16", progress: Progress | None = None) -> Path:
    """Convert the HF Qwen2 checkpoint in ``src`` to ``out`` (GGUF) and stamp it.

    ``progress`` receives :class:`LoadProgress` (0…1). Raises :class:`BackendError` with a
    fix-it message on a bad folder, an unknown quant or too little disk space.
    """
    _check_quant(quant)
    src, out = Path(src), Path(out)
    if not (src / "config.json").is_file():
        raise BackendError(f"{src} has no config.json: it is not an HF checkpoint folder. Point to the model folder.")
    out.parent.mkdir(parents=True, exist_ok=True)
    need = estimate_gguf_bytes(src, quant)
    free = shutil.disk_usage(out.parent).free
    if free < need:
        raise BackendError(
            f"Not enough disk space in {out.parent} for the GGUF conversion: need about {need / 2**30:.1f} GiB, "
            f"{free / 2**30:.1f} GiB free. Free some space, set model.cache_dir to a larger disk, "
            "or choose a smaller model.gguf_quant (Q4_K_M)."
        )
    fingerprint = source_fingerprint(src)
    _report(progress, 0.0, f"Converting {src.name} to GGUF {quant} → {out}")
    tmp = _mkstemp(out.parent, f".{out.name}.")
    inter: Path | None = None
    try:
        if quant == "Q4_K_M":
            inter = _mkstemp(out.parent, f".{out.name}.f16.")
            refs = _tensor_refs(_safetensors_files(src))
            _write_gguf(src, inter, _intermediate_quant(refs), progress, (0.0, 0.6))
            _report(progress, 0.6, "Quantizing to Q4_K_M with llama.cpp…")
            _quantize_q4_k_m(inter, tmp)
        else:
            _write_gguf(src, tmp, quant, progress, (0.0, 0.98))
        stamp = {
            "converter_version": CONVERTER_VERSION,
            "quant": quant,
            "source_dir": str(src.resolve()),
            "sources": fingerprint,
            "gguf_size": tmp.stat().st_size,
        }
        if source_fingerprint(src) != fingerprint:
            raise BackendError(f"{src} changed while it was being converted. Start again once the copy has finished.")
        # The stamp goes first: a GGUF present with a matching stamp is then always complete,
        # and an interruption between the two leaves a stamp whose GGUF is missing (redone).
        # The old GGUF goes before that, or it could pair with the new stamp.
        out.unlink(missing_ok=True)
        _atomic_write_text(stamp_path(out), json.dumps(stamp, indent=1))
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    finally:
        if inter is not None:
            with contextlib.suppress(FileNotFoundError):
                inter.unlink()
    _report(progress, 1.0, f"GGUF ready: {out} ({out.stat().st_size / 2**20:.0f} MiB)")
    return out


def default_gguf_name(src: Path, quant: str) -> str:
    """File name the app gives a conversion of ``src``: ``<folder>-<quant>.gguf``."""
    return f"{Path(src).resolve().name}-{quant}.gguf"


