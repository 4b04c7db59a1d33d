"""Checks on the model folder and the device, with messages that name the path and the fix.

Shared by both engines, the launcher and ``doctor``. Everything here is cheap: headers are read,
weights are not (except the optional SHA-256 check, which reads the files once).
"""
from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..types import BackendError

SUPPORTED_GGUF_ARCHITECTURES = ("qwen2",)
PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json")

_WHAT_TO_PUT = (
    "put the model there: a Hugging Face checkpoint (config.json, tokenizer.json or vocab.json + "
    "merges.txt, tokenizer_config.json, *.safetensors) or a single .gguf file; "
    "or set model.path in manifest.yaml / --model PATH / VT_MODEL to the folder that has it"
)
_SAFETENSORS_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}
# safetensors refuses headers above 100 MB; a larger length means a corrupt or foreign file.
_MAX_SAFETENSORS_HEADER = 100_000_000


class ModelFolderError(BackendError):
    """The model folder (or file) cannot be used; the message says what to do."""


@dataclass(frozen=True)
class ModelFolder:
    """What a model folder holds. ``kind`` is "hf" when it has a config.json, else "gguf"."""

    path: Path
    kind: Literal["hf", "gguf"]
    files: tuple[str, ...]  # names relative to ``path`` (recursive, sorted)
    config: Path | None = None
    tokenizer_files: tuple[str, ...] = ()
    safetensors: tuple[Path, ...] = ()
    pickle_weights: tuple[Path, ...] = ()
    ggufs: tuple[Path, ...] = ()
    gguf: Path | None = None  # the GGUF a llama.cpp engine would use (None if none or ambiguous)
    model_type: str | None = None  # config.json model_type (hf)
    extra: dict = field(default_factory=dict)

    @property
    def has_hf_weights(self) -> bool:
        return bool(self.safetensors or self.pickle_weights)


def _tokenizer_files(names: set[str]) -> tuple[str, ...]:
    found = [n for n in ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json") if n in names]
    return tuple(found)


def inspect_model_folder(path: str | Path, gguf_file: str = "") -> ModelFolder:
    """Describe a model folder (or a .gguf file). Raises ModelFolderError if it is unusable for any engine.

    ``gguf_file`` selects a GGUF inside the folder (or an absolute path), like model.gguf_file.
    """
    p = Path(path).expanduser()
    if p.is_file():
        if p.suffix.lower() != ".gguf":
            raise ModelFolderError(
                f"Model path {p} is a file, not a folder: point model.path at the folder that holds it "
                f"(or at a .gguf file for the llama.cpp backend)."
            )
        return ModelFolder(path=p.parent, kind="gguf", files=(p.name,), ggufs=(p,), gguf=p)
    if not p.exists():
        raise ModelFolderError(f"Model folder {p} does not exist: {_WHAT_TO_PUT}.")
    if not p.is_dir():
        raise ModelFolderError(f"Model path {p} is neither a folder nor a .gguf file: {_WHAT_TO_PUT}.")
    files = sorted(str(f.relative_to(p)) for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
    if not files:
        raise ModelFolderError(f"Model folder {p} is empty: {_WHAT_TO_PUT}.")
    top = {f for f in files if "/" not in f}
    ggufs = tuple(p / f for f in files if f.lower().endswith(".gguf"))
    chosen: Path | None = None
    if gguf_file:
        candidate = Path(gguf_file).expanduser()
        candidate = candidate if candidate.is_absolute() else p / candidate
        if not candidate.is_file():
            have = ", ".join(g.name for g in ggufs) or "none"
            raise ModelFolderError(
                f"GGUF file {candidate} (model.gguf_file) does not exist; GGUF files in {p}: {have}. "
                f"Fix model.gguf_file or leave it empty to use the only .gguf in the folder."
            )
        chosen = candidate
    elif len(ggufs) == 1:
        chosen = ggufs[0]
    config = p / "config.json" if "config.json" in top else None
    model_type = None
    if config is not None:
        try:
            cfg = json.loads(config.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ModelFolderError(
                f"{config} is not valid JSON ({exc}); copy config.json again from the original checkpoint."
            ) from None
        if not isinstance(cfg, dict):
            raise ModelFolderError(f"{config} must hold a JSON object; copy it again from the original checkpoint.")
        model_type = cfg.get("model_type")
    safetensors = tuple(p / f for f in sorted(top) if f.endswith(".safetensors"))
    pickles = tuple(p / f for f in sorted(top) if f.startswith("pytorch_model") and f.endswith(".bin"))
    if config is None and not ggufs:
        raise ModelFolderError(
            f"Model folder {p} has neither config.json nor a .gguf file (it has: {', '.join(files[:8])}"
            f"{', …' if len(files) > 8 else ''}): {_WHAT_TO_PUT}."
        )
    return ModelFolder(
        path=p,
        kind="hf" if config is not None else "gguf",
        files=tuple(files),
        config=config,
        tokenizer_files=_tokenizer_files(top),
        safetensors=safetensors,
        pickle_weights=pickles,
        ggufs=ggufs,
        gguf=chosen,
        model_type=model_type,
    )


# -- Hugging Face checkpoints (transformers) ----------------------------------------------------------

def check_safetensors_file(path: Path) -> int:
    """Validate a .safetensors header and that the data size matches it. Returns the tensor count."""
    size = path.stat().st_size
    fix = "the file is truncated or corrupt: copy or download it again (compare its size or SHA-256 with the source)"
    if size < 8:
        raise ModelFolderError(f"{path} is {size} bytes, too short for a safetensors file; {fix}.")
    with path.open("rb") as fh:
        (header_len,) = struct.unpack("<Q", fh.read(8))
        if header_len > _MAX_SAFETENSORS_HEADER or 8 + header_len > size:
            raise ModelFolderError(
                f"{path}: header length {header_len} does not fit in a {size}-byte file; {fix}."
            )
        raw = fh.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise ModelFolderError(f"{path}: the safetensors header is not valid JSON; {fix}.") from None
    if not isinstance(header, dict):
        raise ModelFolderError(f"{path}: the safetensors header is not a JSON object; {fix}.")
    data_end = 0
    count = 0
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = (int(x) for x in meta["data_offsets"])
            dtype, shape = meta["dtype"], [int(d) for d in meta["shape"]]
        except (KeyError, TypeError, ValueError):
            raise ModelFolderError(f"{path}: tensor {name!r} has a malformed header entry; {fix}.") from None
        n = 1
        for d in shape:
            n *= d
        width = _SAFETENSORS_DTYPE_BYTES.get(dtype)
        if width is not None and end - begin != n * width:
            raise ModelFolderError(
                f"{path}: tensor {name!r} ({dtype}, shape {shape}) should take {n * width} bytes but its "
                f"offsets give {end - begin}; {fix}."
            )
        data_end = max(data_end, end)
        count += 1
    expected = 8 + header_len + data_end
    if size != expected:
        raise ModelFolderError(
            f"{path} is {size} bytes but its header describes {expected} bytes "
            f"({'missing' if size < expected else 'extra'} {abs(expected - size)} bytes); {fix}."
        )
    return count


def _check_index(folder: ModelFolder, index_name: str) -> None:
    index = folder.path / index_name
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise ModelFolderError(f"{index} is not a valid shard index; copy it again from the original checkpoint.") from None
    missing = [s for s in shards if not (folder.path / s).is_file()]
    if missing:
        raise ModelFolderError(
            f"{index} lists shards that are missing from {folder.path}: {', '.join(missing)}; copy them there."
        )


def check_hf_folder(folder: ModelFolder, *, allow_pickle_weights: bool = False) -> None:
    """Everything the transformers engine needs, or a ModelFolderError saying what is wrong."""
    p = folder.path
    if folder.kind != "hf":
        which = folder.gguf.name if folder.gguf else ", ".join(g.name for g in folder.ggufs)
        raise ModelFolderError(
            f"{p} holds a GGUF model ({which}), which the transformers backend cannot load: use the llama.cpp "
            f"backend (--backend llamacpp, VT_BACKEND=llamacpp or backend: llamacpp in manifest.yaml), or point "
            f"model.path at a Hugging Face checkpoint folder (config.json + *.safetensors)."
        )
    names = set(folder.tokenizer_files)
    if "tokenizer.json" not in names and not {"vocab.json", "merges.txt"} <= names:
        raise ModelFolderError(
            f"{p} has no tokenizer: copy tokenizer.json (or vocab.json and merges.txt) and tokenizer_config.json "
            f"from the original checkpoint into it."
        )
    if "tokenizer_config.json" not in names:
        raise ModelFolderError(
            f"{p} has no tokenizer_config.json (it holds the chat template): copy it from the original checkpoint."
        )
    if folder.safetensors:
        if (p / "model.safetensors.index.json").is_file():
            _check_index(folder, "model.safetensors.index.json")
        for f in folder.safetensors:
            check_safetensors_file(f)
        return
    if folder.pickle_weights:
        names_txt = ", ".join(f.name for f in folder.pickle_weights)
        if not allow_pickle_weights:
            raise ModelFolderError(
                f"{p} has only pickle weights ({names_txt}), which can run code when loaded, so they are refused. "
                f"Prefer *.safetensors; or, if you trust the file, set model.allow_pickle_weights: true in "
                f"manifest.yaml (it is then read with torch.load(weights_only=True))."
            )
        if (p / "pytorch_model.bin.index.json").is_file():
            _check_index(folder, "pytorch_model.bin.index.json")
        return
    raise ModelFolderError(
        f"{p} has config.json but no weights: copy the *.safetensors files (and model.safetensors.index.json "
        f"if the checkpoint is sharded) into it."
    )


# -- GGUF (llama.cpp) ----------------------------------------------------------------------------------

def check_gguf_file(path: Path) -> str:
    """Validate a GGUF (magic, parse, tensor data inside the file, architecture). Returns the architecture."""
    fix = "the file is truncated or corrupt: copy or convert it again"
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise ModelFolderError(f"Cannot read {path}: {exc}.") from None
    if magic != b"GGUF":
        raise ModelFolderError(f"{path} is not a GGUF file (it does not start with 'GGUF'); {fix}.")
    try:
        from gguf import GGUFReader

        reader = GGUFReader(path)
    except Exception as exc:  # the reader raises many types on bad input
        raise ModelFolderError(f"{path} cannot be parsed as GGUF ({type(exc).__name__}: {exc}); {fix}.") from None
    for tensor in reader.tensors:
        if int(tensor.data_offset) + int(tensor.n_bytes) > size:
            raise ModelFolderError(
                f"{path}: tensor {tensor.name} ends past the end of the {size}-byte file; {fix}."
            )
    fld = reader.get_field("general.architecture")
    arch = fld.contents() if fld is not None else None
    if arch not in SUPPORTED_GGUF_ARCHITECTURES:
        raise ModelFolderError(
            f"{path} is a GGUF of architecture {arch!r}; this app runs VibeThinker "
            f"({', '.join(SUPPORTED_GGUF_ARCHITECTURES)}): use a VibeThinker GGUF or convert the checkpoint."
        )
    return str(arch)


def require_gguf(folder: ModelFolder) -> Path:
    """The GGUF the llama.cpp engine should load, or a clear error."""
    if folder.gguf is not None:
        check_gguf_file(folder.gguf)
        return folder.gguf
    if len(folder.ggufs) > 1:
        raise ModelFolderError(
            f"{folder.path} holds several GGUF files ({', '.join(g.name for g in folder.ggufs)}): "
            f"choose one with model.gguf_file in manifest.yaml."
        )
    raise ModelFolderError(
        f"{folder.path} has no .gguf file; it holds a Hugging Face checkpoint: use the transformers backend "
        f"(--backend transformers, VT_BACKEND=transformers or backend: transformers in manifest.yaml), or let "
        f"the app convert it to GGUF (leave model.gguf_file empty), or put a VibeThinker .gguf there."
    )


# -- integrity and device -------------------------------------------------------------------------------

def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def verify_sha256(folder: str | Path, digests: Mapping[str, str]) -> None:
    """Compare files with model.sha256 entries (name relative to the folder -> hex digest)."""
    base = Path(folder).expanduser()
    base = base.parent if base.is_file() else base
    for name, want in digests.items():
        f = base / name
        if not f.is_file():
            raise ModelFolderError(
                f"model.sha256 lists {name}, but {f} does not exist: copy the file there or remove the entry."
            )
        got = sha256_of(f)
        if got != want.lower():
            raise ModelFolderError(
                f"{f} has SHA-256 {got}, but model.sha256 expects {want.lower()}: the file is corrupt or a "
                f"different version; copy or download it again."
            )


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def require_cuda() -> None:
    """Raise a BackendError with the fix when CUDA was asked for but cannot be used."""
    try:
        import torch
    except ImportError:
        raise BackendError("torch is not installed; run 1键推理.sh again (it installs it) or pip install torch.") from None
    if torch.cuda.is_available():
        return
    build = torch.version.cuda
    why = (
        f"this torch ({torch.__version__}) is a CPU-only build: set install.torch: cuda in manifest.yaml and rerun "
        f"1键推理.sh to install the CUDA build"
        if not build
        else f"torch {torch.__version__} (CUDA {build}) sees no GPU: check nvidia-smi and CUDA_VISIBLE_DEVICES"
    )
    raise BackendError(
        f"CUDA was requested (transformers.device: cuda) but is not available: {why}; or set transformers.device: "
        f"cpu (VT_DEVICE=cpu), or transformers.cpu_fallback: true to fall back to the CPU."
    )
