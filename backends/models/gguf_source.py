"""Which GGUF the llama.cpp engine loads, converting the HF checkpoint once when there is none.

Order of preference for a model folder:
1. ``model.gguf_file`` when set (used as is);
2. a folder that holds only GGUF: its single ``*.gguf``;
3. an HF checkpoint folder: a current conversion made by the app (stamp matches the sources
   and ``model.gguf_quant``) next to the model, or in the cache folder; else a GGUF the user put
   in the folder themselves (no stamp); else convert now — into the model folder when it is
   writable, otherwise into ``model.cache_dir`` (default ``~/.cache/vibethinker-app/gguf``).

A conversion writes a temporary file and a stamp (see :mod:`backends.models.convert`), so an
interrupted or stale one is never loaded: it is redone. Two processes converting the same
checkpoint take turns on a lock file.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path


from ..base import ProgressCallback
from .checks import ModelFolder, check_gguf_file, inspect_model_folder, require_gguf
from ..config import Manifest
from .convert import convert_hf_to_gguf, default_gguf_name, estimate_gguf_bytes
from .stamps import conversion_is_current, read_stamp, remove_partials, stamp_path
from ..types import BackendError, EngineUnavailable

log = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = "~/.cache/vibethinker-app/gguf"


class NotEnoughDisk(EngineUnavailable):
    """No writable place has room for the conversion (``backend: auto`` falls back on it)."""


class ConversionNotAllowed(BackendError):
    """The folder holds only an HF checkpoint and the caller did not allow a conversion."""


@dataclass(frozen=True)
class GgufPlan:
    """What :func:`ensure_gguf` will do, computed without converting (for ``doctor``)."""

    path: Path | None  # the GGUF to load (None: a conversion target could not be found)
    convert_from: Path | None  # HF folder to convert first, or None to load ``path`` as is
    quant: str | None  # quant of the conversion (None when nothing is converted)
    why: str  # one line for logs, doctor and BackendInfo.reason


def folder_writable(folder: Path) -> bool:
    """Whether we can create files in ``folder``: tried for real (root ignores permission bits,
    and read-only mounts report writable modes)."""
    try:
        fd, name = tempfile.mkstemp(dir=folder, prefix=".vt-write-probe-")
    except OSError:
        return False
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(name)
    return True


def cache_dir(manifest: Manifest) -> Path:
    return Path(manifest.model.cache_dir or DEFAULT_CACHE_DIR).expanduser()


def _cache_folder_for(manifest: Manifest, src: Path) -> Path:
    # One sub-folder per source checkpoint, so two models of the same folder name never collide.
    key = hashlib.sha256(str(src.resolve()).encode()).hexdigest()[:10]
    return cache_dir(manifest) / f"{src.resolve().name}-{key}"


def _candidates(manifest: Manifest, src: Path, quant: str) -> list[Path]:
    name = default_gguf_name(src, quant)
    return [src / name, _cache_folder_for(manifest, src) / name]


def _user_gguf(folder: ModelFolder) -> Path | None:
    """A GGUF the user placed next to the checkpoint (not one of our stamped conversions)."""
    own = [g for g in folder.ggufs if read_stamp(g) is None]
    return own[0] if len(own) == 1 else None


def plan_gguf(manifest: Manifest, folder: ModelFolder | None = None) -> GgufPlan:
    """Decide where the GGUF comes from. Cheap: reads headers and stamps, converts nothing."""
    folder = folder or inspect_model_folder(manifest.model.path, manifest.model.gguf_file)
    if manifest.model.gguf_file:
        assert folder.gguf is not None  # inspect_model_folder raised otherwise
        return GgufPlan(folder.gguf, None, None, f"model.gguf_file {folder.gguf.name}")
    if folder.kind == "gguf":
        return GgufPlan(require_gguf(folder), None, None, f"GGUF {folder.gguf.name if folder.gguf else '?'}")
    src = folder.path
    quant = manifest.model.gguf_quant
    stale: list[str] = []
    for candidate in _candidates(manifest, src, quant):
        current, why = conversion_is_current(src, candidate, quant)
        if current:
            return GgufPlan(candidate, None, None, f"{quant} GGUF converted earlier ({candidate})")
        if candidate.exists() or stamp_path(candidate).exists():
            stale.append(f"{candidate}: {why}")
    user = _user_gguf(folder)
    if user is not None:
        return GgufPlan(user, None, None, f"GGUF {user.name} found next to the checkpoint")
    target = conversion_target(manifest, src, quant)
    why = f"converting the HF checkpoint to GGUF {quant} once ({target})"
    if stale:
        why += "; earlier conversion not reused: " + "; ".join(stale)
    return GgufPlan(target, src, quant, why)


def conversion_target(manifest: Manifest, src: Path, quant: str) -> Path:
    """Where a new conversion goes: next to the model if writable and roomy, else the cache."""
    need = estimate_gguf_bytes(src, quant)
    tried: list[str] = []
    for out in _candidates(manifest, src, quant):
        folder = out.parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            tried.append(f"{folder} (cannot create: {exc.strerror})")
            continue
        if not folder_writable(folder):
            tried.append(f"{folder} (read-only)")
            continue
        free = shutil.disk_usage(folder).free
        if free < need:
            tried.append(f"{folder} ({free / 2**30:.1f} GiB free)")
            continue
        return out
    raise NotEnoughDisk(
        f"No place to write the GGUF {quant} conversion of {src} (about {need / 2**30:.1f} GiB needed): "
        + "; ".join(tried)
        + ". Free some disk space, set model.cache_dir to a writable folder with room, choose a smaller "
        "model.gguf_quant (Q4_K_M), or use backend: transformers."
    )


def _remove_old_conversions(folder: Path, src: Path, keep: Path) -> None:
    """Drop our earlier conversions of ``src`` at other quants: each one is GBs."""
    stem = src.resolve().name
    for gguf in folder.glob(f"{stem}-*.gguf"):
        if gguf == keep or read_stamp(gguf) is None:
            continue
        log.info("Removing an earlier conversion of the same checkpoint: %s", gguf)
        with contextlib.suppress(FileNotFoundError):
            gguf.unlink()
        with contextlib.suppress(FileNotFoundError):
            stamp_path(gguf).unlink()


def ensure_gguf(manifest: Manifest, progress: ProgressCallback | None = None, *,
                allow_convert: bool = True) -> Path:
    """The GGUF to load, converting the HF checkpoint first when needed. Checked before returning."""
    folder = inspect_model_folder(manifest.model.path, manifest.model.gguf_file)
    plan = plan_gguf(manifest, folder)
    if plan.convert_from is None:
        assert plan.path is not None
        check_gguf_file(plan.path)
        log.info("llama.cpp model: %s", plan.why)
        return plan.path
    if not allow_convert:
        raise ConversionNotAllowed(
            f"{folder.path} holds a Hugging Face checkpoint but no GGUF, and conversion is not allowed here. "
            "Convert it once with: python scripts/convert_to_gguf.py "
            f"{folder.path} --quant {manifest.model.gguf_quant}; or use backend: transformers."
        )
    assert plan.path is not None and plan.quant is not None
    out = plan.path
    src = plan.convert_from
    log.info("llama.cpp model: %s", plan.why)
    # Two processes converting the same checkpoint take turns (filelock: released if one dies).
    # Imported here: the registry imports every engine module in the launcher's bootstrap
    # environment, which has only the schema's libraries (bundle/reqfiles.py BOOTSTRAP).
    from filelock import FileLock

    with FileLock(out.parent / f".{out.name}.lock"):
        # Another process may have finished the same conversion while we waited for the lock.
        current, _ = conversion_is_current(src, out, plan.quant)
        if not current:
            removed = remove_partials(out.parent, out.name)
            if removed:
                log.warning("Removed %d leftover file(s) of an interrupted conversion in %s", len(removed), out.parent)
            convert_hf_to_gguf(src, out, plan.quant, progress)
            _remove_old_conversions(out.parent, src, keep=out)
    check_gguf_file(out)
    return out
