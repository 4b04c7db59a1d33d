"""Download a VibeThinker model folder (Hugging Face hub / HF_ENDPOINT mirror, or ModelScope).

    python scripts/fetch_model.py /root/models/vibethinker-1.5b-app
    HF_ENDPOINT=https://hf-mirror.com python scripts/fetch_model.py DEST
    python scripts/fetch_model.py DEST --hub modelscope

Rerunning continues an interrupted download. See backends/fetch.py.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backends.models.fetch import FetchError, fetch_model  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Download a model folder (resumable).")
    p.add_argument("dest", type=Path, help="model folder to fill, e.g. /root/models/vibethinker-1.5b-app")
    p.add_argument("--repo-id", default="WeiboAI/VibeThinker-1.5B")
    p.add_argument("--revision", default="main")
    p.add_argument("--hub", choices=["huggingface", "modelscope"], default="huggingface")
    p.add_argument("--endpoint", default=None, help="Hugging Face endpoint or mirror (default: $HF_ENDPOINT or huggingface.co)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the hub's first answer per file")
    args = p.parse_args(argv)
    try:
        fetch_model(args.dest, args.repo_id, hub=args.hub, revision=args.revision, endpoint=args.endpoint,
                    timeout=args.timeout)
    except FetchError as exc:
        print(f"✖ {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
