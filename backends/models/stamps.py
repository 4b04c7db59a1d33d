"""What a finished GGUF conversion was made from (a stamp next to it), and the atomic-write
helpers that make an interrupted conversion detectable: a stale or partial file is never loaded."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from ..types import BackendError
from .safetensors_reader import _read_safetensors_header, _safetensors_files

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


def remove_partials(folder: Path, out_name: str) -> list[Path]:
    """Delete temporary files an interrupted conversion to ``out_name`` left in ``folder``."""
    removed: list[Path] = []
    for path in Path(folder).glob(f".{out_name}.*{PARTIAL_MARK}"):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed.append(path)
    return removed
