"""``python -m bundle.resolve``: the launcher's view of the configuration, through the one schema.

1键推理.sh (bundle/oneclick.py) runs this with a Python that has pyyaml + pydantic (the venv, or
the platform's own) and reads one JSON object from stdout:

    {"ok": true, "config": {...effective manifest...}, "model": {...}}      or
    {"ok": false, "kind": "manifest"|"model"|"fetch", "error": "<user-ready message>"}

The same flags become the same ``load_manifest`` overrides that ``python -m ui serve`` applies,
so the launcher checks exactly what the server will use.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from backends.config import ManifestError, load_manifest

# Launcher flag -> dotted manifest key. The first five are also ``python -m ui serve`` flags.
FLAG_KEYS = {
    "backend": "backend",
    "model": "model.path",
    "host": "server.host",
    "port": "server.port",
    "device": "transformers.device",
    "torch": "install.torch",
    "index_url": "install.index_url",
}


def add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--manifest")
    parser.add_argument("--backend")
    parser.add_argument("--model")
    parser.add_argument("--host")
    parser.add_argument("--port")
    parser.add_argument("--device")
    parser.add_argument("--torch")
    parser.add_argument("--index-url", dest="index_url")


def overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {key: getattr(args, flag) for flag, key in FLAG_KEYS.items() if getattr(args, flag) is not None}


def engines_for(manifest: Any, gpu: bool | None) -> list[Any]:
    """The engines this configuration may run, best first: the configured one, or auto's bids."""
    from backends import registry
    from backends.auto import auto_candidates

    if manifest.backend != "auto":
        return [registry.get(manifest.backend)]
    return [spec for spec, _ in auto_candidates(manifest, gpu)]


def _check_model(manifest: Any, gpu: bool | None) -> dict[str, Any]:
    """Everything the chosen engine needs from the model folder (raises BackendError)."""
    from backends.models.checks import inspect_model_folder, verify_sha256

    specs = engines_for(manifest, gpu)
    if not specs:
        from backends.types import BackendError

        raise BackendError(f"backend: auto — no engine can run the model in {manifest.model.path}.")
    spec = specs[0]
    if not spec.needs_local_model:
        return {"path": None, "kind": "none", "gguf": None, "engine": spec.name, "check": "no local model needed"}
    what = spec.check_model(manifest) if spec.check_model else ""
    folder = inspect_model_folder(manifest.model.path, manifest.model.gguf_file)
    if manifest.model.sha256:
        verify_sha256(folder.path, manifest.model.sha256)
    return {"path": str(folder.path), "kind": folder.kind, "gguf": str(folder.gguf) if folder.gguf else None,
            "engine": spec.name, "check": what}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bundle.resolve")
    add_flags(parser)
    parser.add_argument("--check-model", action="store_true")
    parser.add_argument("--fetch", action="store_true", help="download the model when missing and source.download")
    parser.add_argument("--no-choice", action="store_true", help="skip describing the backend choice (imports torch)")
    args = parser.parse_args(argv)

    def emit(obj: dict[str, Any]) -> int:
        print(json.dumps(obj, ensure_ascii=False))
        return 0

    try:
        manifest = load_manifest(args.manifest, env=os.environ, overrides=overrides(args))
    except ManifestError as exc:
        return emit({"ok": False, "kind": "manifest", "error": str(exc)})
    result: dict[str, Any] = {"ok": True, "config": manifest.model_dump(mode="json")}
    if not args.check_model:
        return emit(result)

    from backends.types import BackendError

    src = manifest.model.source
    model_path = Path(manifest.model.path).expanduser()
    if args.fetch and src.download:
        from backends.models.fetch import FetchError, fetch_model, folder_is_complete

        if not folder_is_complete(model_path):
            try:
                # Progress goes to stderr: stdout carries the JSON answer.
                fetch_model(model_path, src.repo_id, hub=src.hub, revision=src.revision,
                            say=lambda m: print(m, file=sys.stderr, flush=True))
            except FetchError as exc:
                return emit({"ok": False, "kind": "fetch", "error": str(exc)})
    try:
        result["model"] = _check_model(manifest)
    except BackendError as exc:
        return emit({"ok": False, "kind": "model", "error": str(exc), "download": src.download})
    if args.no_choice:
        return emit(result)
    try:
        from backends.auto import describe_choice

        result["choice"] = describe_choice(manifest)
    except Exception as exc:  # doctor's extra line must not hide the checks above
        result["choice"] = f"(could not describe the backend choice: {type(exc).__name__}: {exc})"
    return emit(result)


if __name__ == "__main__":
    sys.exit(main())
