"""Download a model folder from the Hugging Face hub (or a mirror) or from ModelScope.

Used only when ``model.source.download: true`` and the model folder is missing or was left
incomplete. Resuming, as huggingface_hub 2.x does it (checked in its source and in
tests/test_fetch.py): a connection dropped in the middle of a file is continued within the same
call with an HTTP Range request; across runs, files that finished are kept and skipped, but a file
cut short is downloaded again from its start (the hub deletes its partial temporary file).
We add a marker file (``.vt-download-incomplete``) written before the first byte and removed
after the last, so that a folder whose download failed is never taken for a complete model and
the next run simply continues it.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

from ..types import BackendError

log = logging.getLogger(__name__)

INCOMPLETE_MARKER = ".vt-download-incomplete"
MIRROR_HINT = "https://hf-mirror.com"
# Files a model folder needs besides its weights (the weights are checked by their extension).
_WEIGHT_SUFFIXES = (".safetensors", ".gguf")
# What we never need from a model repository (other formats of the same weights).
_IGNORE = ["*.pth", "*.bin", "*.h5", "*.msgpack", "*.onnx", "*.ot", "original/*"]


class FetchError(BackendError):
    """The model could not be downloaded; the message says why and what to do."""


def folder_is_complete(dest: Path) -> bool:
    """True when ``dest`` holds a finished download (or files the user put there)."""
    if not dest.is_dir() or (dest / INCOMPLETE_MARKER).exists():
        return False
    return _has_model_files(dest)


def _has_model_files(dest: Path) -> bool:
    if any(p.suffix == ".gguf" for p in dest.iterdir()):
        return True
    return (dest / "config.json").is_file() and any(p.suffix in _WEIGHT_SUFFIXES for p in dest.iterdir())


def _hub_endpoint(endpoint: str | None) -> str:
    return (endpoint or os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def _download_hf(repo_id: str, revision: str, dest: Path, endpoint: str, timeout: float) -> None:
    try:
        from huggingface_hub import HfApi, snapshot_download
        from huggingface_hub.errors import (
            GatedRepoError,
            HfHubHTTPError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError as exc:  # pragma: no cover - huggingface_hub is a core dependency
        raise FetchError(f"huggingface_hub is not installed ({exc}): pip install huggingface_hub") from None
    try:
        # Ask first: snapshot_download returns a non-empty local_dir as is when the hub cannot be
        # reached (with only a log warning), which would hide the reason from the user.
        HfApi(endpoint=endpoint).model_info(repo_id, revision=revision, timeout=timeout)
        snapshot_download(
            repo_id,
            revision=revision,
            local_dir=dest,
            endpoint=endpoint,
            etag_timeout=timeout,
            ignore_patterns=_IGNORE,
        )
    except (RepositoryNotFoundError, GatedRepoError) as exc:
        raise FetchError(
            f"模型仓库不存在或无权访问 / Repository {repo_id!r} not found or not accessible at {endpoint} "
            f"({type(exc).__name__}). 修复 / Fix: check model.source.repo_id in manifest.yaml; for a gated or "
            "private repository set HF_TOKEN."
        ) from None
    except RevisionNotFoundError:
        raise FetchError(
            f"版本不存在 / Revision {revision!r} of {repo_id} not found at {endpoint}. "
            "修复 / Fix: check model.source.revision in manifest.yaml (e.g. main)."
        ) from None
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, Exception) as exc:
        # The hub's HTTP client (httpx) raises its own ConnectError/TimeoutException types: any
        # other failure here is the network's or the endpoint's.
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        raise FetchError(
            f"无法连接模型仓库 / Cannot reach the model hub at {endpoint}: {reason}\n"
            f"修复 / Fix: in mainland China use a mirror: export HF_ENDPOINT={MIRROR_HINT} (then rerun), "
            "or set model.source.hub: modelscope in manifest.yaml, or upload the model files by hand. "
            "Rerun to continue: finished files are kept / 重新运行即可继续, 已下载完成的文件会保留."
        ) from None


def _download_modelscope(repo_id: str, revision: str, dest: Path) -> None:
    try:
        from modelscope import snapshot_download  # type: ignore[import-not-found]
    except ImportError:
        raise FetchError(
            "未安装 modelscope / The modelscope package is not installed. 修复 / Fix: "
            'pip install "vibethinker-app[modelscope]" (or pip install -r requirements/modelscope.txt in the bundle), '
            "or use model.source.hub: huggingface with HF_ENDPOINT."
        ) from None
    try:
        snapshot_download(repo_id, revision=revision, local_dir=str(dest), ignore_patterns=_IGNORE)
    except Exception as exc:  # modelscope raises plain requests/OS errors with no stable hierarchy
        raise FetchError(
            f"ModelScope 下载失败 / Download of {repo_id} from ModelScope failed: {type(exc).__name__}: {exc}\n"
            "修复 / Fix: check the network and model.source.repo_id, or upload the files by hand; rerun to resume."
        ) from None


def fetch_model(
    dest: str | os.PathLike[str],
    repo_id: str,
    hub: str = "huggingface",
    revision: str = "main",
    endpoint: str | None = None,
    timeout: float = 10.0,
    say: Callable[[str], None] = print,
) -> Path:
    """Make ``dest`` a complete model folder, downloading what is missing.

    A folder that is already complete is returned untouched without any network access.
    """
    dest = Path(dest).expanduser()
    if folder_is_complete(dest):
        say(f"模型已存在, 跳过下载 / Model already present in {dest}, no download needed")
        return dest
    if hub not in ("huggingface", "modelscope"):
        raise FetchError(f"model.source.hub = {hub!r}: choose huggingface or modelscope.")
    if dest.exists() and not dest.is_dir():
        raise FetchError(f"{dest} exists but is not a folder: move it away or point model.path elsewhere.")
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FetchError(f"cannot create {dest}: {exc}. Fix: choose a writable model.path / --model.") from None
    marker = dest / INCOMPLETE_MARKER
    resuming = marker.exists()
    marker.write_text(f"{hub}:{repo_id}@{revision}\n", encoding="utf-8")
    where = _hub_endpoint(endpoint) if hub == "huggingface" else "ModelScope"
    say(
        f"{'继续下载' if resuming else '开始下载'} / {'Resuming' if resuming else 'Downloading'} "
        f"{repo_id}@{revision} from {where} into {dest}"
    )
    if hub == "huggingface":
        _download_hf(repo_id, revision, dest, _hub_endpoint(endpoint), timeout)
    else:
        _download_modelscope(repo_id, revision, dest)
    if not _has_model_files(dest):
        raise FetchError(
            f"下载未完成 / The download into {dest} did not complete (no config.json + .safetensors nor a .gguf yet): "
            f"is {repo_id!r} a model repository, and is {where} reachable? Rerun to continue."
        )
    marker.unlink()
    say(f"下载完成 / Download complete: {dest}")
    return dest
