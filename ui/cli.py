"""``python -m ui serve|config``: the entry points the launcher (1键推理.sh) calls."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any

from backends import ManifestError, load_manifest

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
    parser.add_argument("--backend", choices=["auto", "transformers", "llamacpp"], help="inference engine")
    parser.add_argument("--model", metavar="PATH", help="model folder (HF checkpoint or GGUF)")
    parser.add_argument("--host", metavar="H", help="address to listen on (default 0.0.0.0)")
    parser.add_argument("--port", metavar="N", type=int, help="port to listen on (default 8080)")
    parser.add_argument("--root-path", metavar="P", dest="root_path",
                        help="sub-path behind a proxy, e.g. /proxy/8080 (default: from X-Forwarded-Prefix)")
    parser.add_argument("--set", metavar="KEY=VALUE", action="append", default=[], dest="sets",
                        help="any manifest key, e.g. --set server.max_queue=8 (repeatable)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ui", description="VibeThinker web app and OpenAI-compatible API")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="start the page + API server")
    _add_common(serve)
    config = sub.add_parser("config", help="print the effective configuration as JSON")
    _add_common(config)
    config.add_argument("--get", metavar="KEY", help="print only this dotted key's value (e.g. server.port)")
    config.add_argument("--show-secrets", action="store_true", help="do not mask passwords and API keys")
    return parser


def overrides_from(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {key: getattr(args, flag) for flag, key in FLAG_KEYS.items()}
    for item in args.sets:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ManifestError(f"--set {item!r}: expected KEY=VALUE, e.g. --set server.max_queue=8")
        out[key.strip()] = value
    return out


def _masked(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: ("***" if k in SECRET_KEYS and v else _masked(v)) for k, v in data.items()}
    return data


def _lookup(data: dict[str, Any], dotted: str) -> Any:
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ManifestError(f"--get {dotted}: no such key; see `python -m ui config` for the full list")
        node = node[part]
    return node


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        manifest = load_manifest(args.manifest, overrides=overrides_from(args))
        if args.command == "config":
            data = manifest.model_dump(mode="json")
            if not args.show_secrets:
                data = _masked(data)
            if args.get:
                value = _lookup(data, args.get)
                print(value if not isinstance(value, (dict, list)) else json.dumps(value, ensure_ascii=False))
            else:
                print(json.dumps(data, indent=2, ensure_ascii=False))
            return 0
        # No usage reporting from an app that may run with no internet (it would only time out).
        os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
        from .server import serve, setup_logging

        setup_logging()
        return serve(manifest)
    except ManifestError as exc:
        print(f"Configuration error: {exc}", file=sys.stderr)
        logging.getLogger("ui").debug("configuration error", exc_info=True)
        return 2
