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
import hashlib
import json
import logging
import os
import shutil
import struct
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..types import BackendError, LoadProgress

log = logging.getLogger(__name__)

QUANTS = ("F32", "F16", "Q8_0", "Q4_K_M")
STAMP_SUFFIX = ".stamp.json"
PARTIAL_MARK = ".partial"
# Bump when the writer changes in a way that makes older outputs wrong.
CONVERTER_VERSION = 1
# Files whose change makes a conversion stale (besides the safetensors).
_SOURCE_META_FILES = (
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)

Progress = Callable[[LoadProgress], None]


# ---------------------------------------------------------------------------------------------
# safetensors, read without torch (numpy has no bfloat16: we widen it by hand)


@dataclass(frozen=True)
class _TensorRef:
    name: str
    file: Path
    dtype: str  # safetensors dtype: F32 | F16 | BF16
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int


_ST_DTYPES = {"F32": 4, "F16": 2, "BF16": 2}


def _read_safetensors_header(path: Path) -> tuple[dict[str, Any], int, bytes]:
    """Return (header, data_start, raw header bytes) of a .safetensors file."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise BackendError(f"{path} is not a safetensors file (too short: {size} bytes). Re-copy the checkpoint.")
        (n,) = struct.unpack("<Q", head)
        if n <= 0 or n > min(size - 8, 100 * 2**20):
            raise BackendError(f"{path} has a corrupt safetensors header (length {n}). Re-copy the checkpoint.")
        raw = fh.read(n)
    try:
        header = json.loads(raw)
    except ValueError:
        raise BackendError(f"{path} has a corrupt safetensors header (not JSON). Re-copy the checkpoint.") from None
    return header, 8 + n, raw


def _safetensors_files(src: Path) -> list[Path]:
    index = src / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (ValueError, KeyError) as exc:
            raise BackendError(f"{index} is not a valid safetensors index ({exc}). Re-copy the checkpoint.") from None
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (src / n).is_file()]
        if missing:
            raise BackendError(
                f"{src} is missing weight shards listed in model.safetensors.index.json: {', '.join(missing)}. "
                "Copy all shards (the upload may be incomplete)."
            )
        return [src / n for n in names]
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise BackendError(
            f"No *.safetensors weights in {src}. Point the model path at the folder with config.json and "
            "model*.safetensors (pytorch_model.bin checkpoints must be re-saved as safetensors first)."
        )
    return files


def _tensor_refs(files: list[Path]) -> list[_TensorRef]:
    refs: list[_TensorRef] = []
    for path in files:
        header, data_start, _ = _read_safetensors_header(path)
        size = path.stat().st_size
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            dtype = meta.get("dtype")
            if dtype not in _ST_DTYPES:
                raise BackendError(
                    f"{path.name}: tensor {name} has dtype {dtype}; only F32, F16 and BF16 checkpoints can be "
                    "converted. Use the original (unquantized) VibeThinker weights."
                )
            begin, end = meta["data_offsets"]
            if data_start + end > size:
                raise BackendError(
                    f"{path} is truncated ({size} bytes, tensor {name} needs {data_start + end}). "
                    "Re-copy the checkpoint; the upload was probably interrupted."
                )
            refs.append(_TensorRef(name, path, dtype, tuple(meta["shape"]), data_start + begin, data_start + end))
    return refs


class _Mmaps:
    """One read-only memory map per shard, closed together."""

    def __init__(self) -> None:
        self._maps: dict[Path, np.memmap] = {}

    def array(self, ref: _TensorRef) -> np.ndarray:
        mm = self._maps.get(ref.file)
        if mm is None:
            mm = self._maps[ref.file] = np.memmap(ref.file, dtype=np.uint8, mode="r")
        raw = mm[ref.start : ref.end]
        if ref.dtype == "F32":
            return raw.view(np.float32).reshape(ref.shape)
        if ref.dtype == "F16":
            return raw.view(np.float16).reshape(ref.shape)
        return raw.view(np.uint16).reshape(ref.shape)  # BF16, widened by _to_f32

    def close(self) -> None:
        for mm in self._maps.values():
            mm._mmap.close()  # type: ignore[attr-defined]
        self._maps.clear()


def _to_f32(ref: _TensorRef, arr: np.ndarray) -> np.ndarray:
    if ref.dtype == "BF16":
        return (arr.astype(np.uint32) << 16).view(np.float32)
    return arr.astype(np.float32, copy=False)


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
# stamp: what a finished conversion was made from


def _source_files(src: Path) -> list[Path]:
    files = _safetensors_files(src)
    files += [src / n for n in _SOURCE_META_FILES if (src / n).is_file()]
    index = src / "model.safetensors.index.json"
    if index.is_file():
        files.append(index)
    return files


def source_fingerprint(src: Path) -> dict[str, dict[str, Any]]:
    """Size, mtime and (for safetensors) header hash of every file the conversion reads."""
    out: dict[str, dict[str, Any]] = {}
    for path in _source_files(src):
        st = path.stat()
        entry: dict[str, Any] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
        if path.suffix == ".safetensors":
            entry["header_sha256"] = hashlib.sha256(_read_safetensors_header(path)[2]).hexdigest()
        out[path.name] = entry
    return out


def stamp_path(gguf_path: Path) -> Path:
    return gguf_path.with_name(gguf_path.name + STAMP_SUFFIX)


def read_stamp(gguf_path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(stamp_path(gguf_path).read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):
        return None


def conversion_is_current(src: Path, gguf_path: Path, quant: str) -> tuple[bool, str]:
    """Whether ``gguf_path`` is a complete conversion of ``src`` at ``quant``; else why not."""
    stamp = read_stamp(gguf_path)
    if not gguf_path.is_file():
        return False, f"{gguf_path.name} does not exist yet"
    if stamp is None:
        return False, f"{gguf_path.name} has no conversion stamp (interrupted or made elsewhere)"
    if stamp.get("converter_version") != CONVERTER_VERSION:
        return False, "it was made by another converter version"
    if stamp.get("quant") != quant:
        return False, f"it is {stamp.get('quant')}, {quant} was asked for"
    if stamp.get("gguf_size") != gguf_path.stat().st_size:
        return False, f"{gguf_path.name} has the wrong size (partial or modified)"
    try:
        current = source_fingerprint(src)
    except BackendError as exc:
        return False, str(exc)
    if stamp.get("sources") != current:
        changed = sorted(set(current) ^ set(stamp.get("sources") or {}))
        changed += sorted(n for n in current if n in (stamp.get("sources") or {}) and current[n] != stamp["sources"][n])
        return False, f"the checkpoint changed since the conversion ({', '.join(changed)})"
    return True, "up to date"


def _mkstemp(folder: Path, prefix: str) -> Path:
    fd, name = tempfile.mkstemp(dir=folder, prefix=prefix, suffix=PARTIAL_MARK)
    os.close(fd)
    # mkstemp makes 0600 files; the GGUF should be readable like any other file the user makes.
    os.chmod(name, 0o666 & ~_umask())
    return Path(name)


def _umask() -> int:
    # Read, not set-and-restore: os.umask() would change it for every thread for a moment.
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = _mkstemp(path.parent, f".{path.name}.")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


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


def remove_partials(folder: Path, out_name: str) -> list[Path]:
    """Delete temporary files an interrupted conversion to ``out_name`` left in ``folder``."""
    removed: list[Path] = []
    for path in Path(folder).glob(f".{out_name}.*{PARTIAL_MARK}"):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed.append(path)
    return removed
