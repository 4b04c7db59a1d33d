#!/usr/bin/env python3
"""Convert an HF VibeThinker/Qwen2 checkpoint folder to GGUF for llama.cpp.

    python scripts/convert_to_gguf.py /root/models/vibethinker-1.5b-app --quant Q8_0
    python scripts/convert_to_gguf.py SRC_DIR --out model-Q4_K_M.gguf --quant Q4_K_M
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backends.models.convert import QUANTS, convert_hf_to_gguf, default_gguf_name  # noqa: E402
from backends.types import BackendError, LoadProgress  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", type=Path, help="HF checkpoint folder (config.json, tokenizer, *.safetensors)")
    parser.add_argument("--out", type=Path, help="output .gguf (default: SRC_DIR/<folder>-<QUANT>.gguf)")
    parser.add_argument("--quant", choices=QUANTS, default="Q8_0", help="quantization (default: Q8_0)")
    args = parser.parse_args(argv)
    out = args.out or args.src / default_gguf_name(args.src, args.quant)
    last = [-1]

    def show(p: LoadProgress) -> None:
        pct = int(p.fraction * 100)
        if pct != last[0]:
            last[0] = pct
            print(f"[{pct:3d}%] {p.message}", flush=True)

    try:
        path = convert_hf_to_gguf(args.src, out, args.quant, progress=show)
    except BackendError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
