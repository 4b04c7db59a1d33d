"""``python -m bundle.resolve``: the launcher's view of the configuration, through the one schema.

The launcher (bundle/launcher/, standard library only) runs this with a Python that has the
schema's libraries — the platform's own, its bootstrap environment or the app's venv (see
bundle/launcher/config.py for why) — and reads one JSON object from the last line of stdout:

    {"ok": true, "config": {...effective manifest...}, "origins": {"server.port": "command-line flag", …},
     "engines": [...], "help": {...},        with --engines: every registered engine, for --help / doctor
     "plan": {"engines": [...], "extras": [...]},   with --plan: what to install, from the registry
     "model": {...}, "choice": "..."}        with --check-model (and --fetch: download it first)
    {"ok": false, "kind": "manifest"|"engines"|"model"|"fetch", "error": "<user-ready message>"}

The flags are those of ``python -m ui serve`` (``--set KEY=VALUE`` included), turned into the same
``load_config`` overrides, so the launcher checks exactly what the server will use.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from backends import registry
from backends.config import ManifestError, iter_fields, load_config, short_env_names
from backends.types import BackendError

FLAG_KEYS = {"backend": "backend", "model": "model.path", "host": "server.host", "port": "server.port"}
# Not an engine's extra: the model hub's client, needed only to download from ModelScope.
MODELSCOPE_EXTRA = "modelscope"


def overrides(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {key: getattr(args, flag) for flag, key in FLAG_KEYS.items()}
    for item in args.sets:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ManifestError(f"--set {item!r}: expected KEY=VALUE, e.g. --set server.max_queue=8")
        out[key.strip()] = value
    return out


def plugin_modules() -> dict[str, str]:
    """engine name -> module, for the engines added through VT_ENGINE_MODULES."""
    out = {}
    for module in (m.strip() for m in os.environ.get(registry.PLUGINS_ENV, "").split(",")):
        spec = getattr(importlib.import_module(module), "ENGINE", None) if module else None
        if spec is not None:
            out[spec.name] = module
    return out


def engine_list() -> list[dict[str, Any]]:
    specs = registry.engines()  # first: its error names VT_ENGINE_MODULES and the fix
    plugins = plugin_modules()
    return [{"name": s.name, "label": s.label, "summary": s.summary, "extras": list(s.extras),
             "needs_local_model": s.needs_local_model, "auto": s.auto_rank is not None,
             "plugin": plugins.get(s.name)} for s in specs.values()]


def help_info() -> dict[str, Any]:
    """What --help prints from the schema: the short environment variables and their keys."""
    fields = dict(iter_fields())
    env = [{"var": var, "key": dotted, "description": fields[dotted].description}
           for var, dotted in short_env_names().items()]
    return {"env": env, "auto": registry.help_text().split(";")[0].split(":", 1)[1].strip()}


def install_plan(manifest: Any, gpu: bool | None) -> dict[str, Any]:
    """The engines this configuration may run here, best first, and the extras they need."""
    from backends.auto import auto_candidates

    if manifest.backend != "auto":
        spec = registry.get(manifest.backend)
        chosen = [(spec, f"backend: {spec.name}")]
    else:
        try:
            chosen = [(spec, f"auto: {bid.why}") for spec, bid in auto_candidates(manifest, gpu)]
        except BackendError:
            # The model is not on disk: if it will be downloaded, any engine auto ranks may run it;
            # if not, the model check stops the launch before anything is installed.
            chosen = ([(s, "auto, the model is not downloaded yet") for s in registry.engines().values()
                       if s.auto_rank is not None] if manifest.model.source.download else [])
    extras: list[str] = []
    for spec, _ in chosen:
        extras += [e for e in spec.extras if e not in extras]
    src = manifest.model.source
    if src.download and src.hub == "modelscope" and MODELSCOPE_EXTRA not in extras:
        extras.append(MODELSCOPE_EXTRA)
    return {"engines": [{"name": s.name, "label": s.label, "why": why, "extras": list(s.extras)} for s, why in chosen],
            "extras": extras}


def check_model(manifest: Any, gpu: bool | None) -> dict[str, Any]:
    """Everything the engine that will run needs from the model folder (raises BackendError)."""
    from backends.auto import auto_candidates
    from backends.models.checks import inspect_model_folder, verify_sha256

    if manifest.backend != "auto":
        spec = registry.get(manifest.backend)
    else:
        bids = auto_candidates(manifest, gpu)
        if not bids:
            raise BackendError(f"backend: auto — no engine can run the model in {manifest.model.path}; "
                               f"choose one with --backend.")
        spec = bids[0][0]
    if not spec.needs_local_model:
        return {"path": None, "kind": "none", "gguf": None, "engine": spec.name, "check": "no local model needed"}
    what = spec.check_model(manifest) if spec.check_model else ""
    folder = inspect_model_folder(manifest.model.path, manifest.model.gguf_file)
    if manifest.model.sha256:
        verify_sha256(folder.path, manifest.model.sha256)
    return {"path": str(folder.path), "kind": folder.kind, "gguf": str(folder.gguf) if folder.gguf else None,
            "engine": spec.name, "check": what}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bundle.resolve")
    parser.add_argument("--manifest")
    for flag in FLAG_KEYS:
        parser.add_argument(f"--{flag}")
    parser.add_argument("--set", action="append", default=[], dest="sets", metavar="KEY=VALUE")
    parser.add_argument("--gpu", choices=["yes", "no"], help="what nvidia-smi says (default: ask torch)")
    parser.add_argument("--engines", action="store_true", help="list the registered engines (and --help's data)")
    parser.add_argument("--plan", action="store_true", help="the install plan (extras) from the engine registry")
    parser.add_argument("--check-model", action="store_true")
    parser.add_argument("--fetch", action="store_true", help="download the model when missing and source.download")
    parser.add_argument("--no-choice", action="store_true", help="skip describing the backend choice")
    return parser


def answer(args: argparse.Namespace) -> dict[str, Any]:
    gpu = None if args.gpu is None else args.gpu == "yes"
    result: dict[str, Any] = {"ok": True}
    try:
        if args.engines:
            result["engines"] = engine_list()
            result["help"] = help_info()
        loaded = load_config(args.manifest, env=os.environ, overrides=overrides(args))
    except ManifestError as exc:
        return {**result, "ok": False, "kind": "manifest", "error": str(exc)}
    except (BackendError, ImportError) as exc:  # a plugin engine module that does not load
        return {"ok": False, "kind": "engines", "error": str(exc)}
    manifest = loaded.manifest
    result.update(config=manifest.model_dump(mode="json"), origins=loaded.origins)
    if args.plan:
        result["plan"] = install_plan(manifest, gpu)
    if not args.check_model:
        return result
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
                return {**result, "ok": False, "kind": "fetch", "error": str(exc)}
    try:
        result["model"] = check_model(manifest, gpu)
    except BackendError as exc:
        return {**result, "ok": False, "kind": "model", "error": str(exc), "download": src.download}
    if args.no_choice:
        return result
    try:
        from backends.auto import describe_choice

        result["choice"] = describe_choice(manifest, gpu)
    except Exception as exc:  # doctor's extra line must not hide the checks above
        result["choice"] = f"(could not describe the backend choice: {type(exc).__name__}: {exc})"
    return result


def main(argv: list[str] | None = None) -> int:
    print(json.dumps(answer(_parser().parse_args(argv)), ensure_ascii=False, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
