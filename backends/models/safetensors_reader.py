"""safetensors checkpoints read without torch, one memory-mapped tensor at a time (for the GGUF
converter: a 3B model is never held twice). numpy has no bfloat16: BF16 is widened by hand."""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..types import BackendError



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
