"""``python -m ui serve|config``: the entry points the launcher (1键推理.sh) calls."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any

from backends import BackendError, ManifestError, describe_choice, registry
from backends.config import effective_settings, env_name, load_config

# Flag -> dotted manifest key (precedence: flag > VT_* environment > manifest.yaml > default).
FLAG_KEYS = {
    "backend": "backend",
    "model": "model.path",
    "host": "server.host",
    "port": "server.port",
    "root_path": "server.root_path",
}

SECRET_KEYS = ("password", "api_key")


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--manifest", metavar="PATH", help="manifest.yaml to read (default: the app's own)")
    parser.add_argument("--backend", choices=registry.choices(), metavar="{" + ",".join(registry.choices()) + "}",
                        help="inference engine — " + registry.help_text())
    parser.add_argument("--model", metavar="PATH", help="model folder (HF checkpoint or GGUF)")
    parser.add_argument("--host", metavar="H", help="address to listen on (default 0.0.0.0)")
    parser.add_argument("--port", metavar="N", type=int, help="port to listen on (default 8080)")
    parser.add_argument("--root-path", metavar="P", dest="root_path",
                        help="sub-path behind a proxy, e.g. /proxy/8080 (default: from X-Forwarded-Prefix)")
    parser.add_argument("--set", metavar="KEY=VALUE", action="append", default=[], dest="sets",
                        help="any manifest key, e.g. --set server.max_queue=8 (repeatable); every key is also "
                        "the environment variable VT_<SECTION>__<KEY>, e.g. VT_SERVER__MAX_QUEUE=8")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ui", description="VibeThinker web app and OpenAI-compatible API")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="start the page + API server")
    _add_common(serve)
    config = sub.add_parser("config", help="print every effective setting and where it came from")
    _add_common(config)
    config.add_argument("--get", metavar="KEY", help="print only this dotted key's value (e.g. server.port)")
    config.add_argument("--json", action="store_true", help="the effective configuration as JSON")
    config.add_argument("--show-secrets", action="store_true", help="do not mask passwords and API keys")
    config.add_argument("--describe", action="store_true", help="also print each setting's meaning")
    return parser


def overrides_from(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {key: getattr(args, flag) for flag, key in FLAG_KEYS.items()}
    for item in args.sets:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ManifestError(f"--set {item!r}: expected KEY=VALUE, e.g. --set server.max_queue=8")
        out[key.strip()] = value
    return out


def _secret(dotted: str) -> bool:
    return dotted.rsplit(".", 1)[-1] in SECRET_KEYS


def _masked(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: ("***" if k in SECRET_KEYS and v else _masked(v)) for k, v in data.items()}
    return data


def _print_config(args: argparse.Namespace) -> int:
    loaded = load_config(args.manifest, overrides=overrides_from(args))
    rows = effective_settings(loaded)
    if args.get:
        found = [r for r in rows if r[0] == args.get]
        if not found:
            raise ManifestError(f"--get {args.get}: no such key; `python -m ui config` lists them all")
        value = found[0][1]
        print(value if not isinstance(value, (dict, list)) else json.dumps(value, ensure_ascii=False))
        return 0
    if args.json:
        data = loaded.manifest.model_dump(mode="json")
        print(json.dumps(data if args.show_secrets else _masked(data), indent=2, ensure_ascii=False))
        return 0
    print(f"# manifest: {loaded.path or 'none (built-in defaults)'}; precedence: flag > environment > manifest > default")
    width = max(len(r[0]) for r in rows)
    for dotted, value, origin, description in rows:
        shown = "***" if _secret(dotted) and value and not args.show_secrets else json.dumps(value, ensure_ascii=False)
        print(f"{dotted:<{width}} = {shown}   # {origin}")
        if args.describe:
            print(f"{'':<{width}}   {description} (env {env_name(dotted)})")
    try:
        print(f"# {describe_choice(loaded.manifest)}")
    except BackendError as exc:
        print(f"# backend: {exc}")
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        parser = _parser()  # the --backend choices come from the engine registry
    except BackendError as exc:
        print(f"Configuration error: {exc}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    try:
        if args.command == "config":
            return _print_config(args)
        manifest = load_config(args.manifest, overrides=overrides_from(args)).manifest
        # No usage reporting from an app that may run with no internet (it would only time out).
        os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
        from .server import serve, setup_logging

        setup_logging()
        return serve(manifest)
    except ManifestError as exc:
        print(f"Configuration error: {exc}", file=sys.stderr)
        logging.getLogger("ui").debug("configuration error", exc_info=True)
        return 2
