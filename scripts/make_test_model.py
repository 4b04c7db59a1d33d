"""Build the tiny VibeThinker-like test model (or a random model of a real size) locally.

    python scripts/make_test_model.py OUT_DIR                      # tiny trained model (~10 s)
    python scripts/make_test_model.py OUT_DIR --random vibethinker-1.5b   # benchmark weights
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.synthetic import PRESETS, make_random_model, make_tiny_model  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--random", choices=sorted(PRESETS), help="random weights with this architecture")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    args = parser.parse_args()
    if args.random:
        path = make_random_model(args.out_dir, args.random, dtype=args.dtype)
    else:
        path = make_tiny_model(args.out_dir, progress=lambda msg: print(msg, flush=True))
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
