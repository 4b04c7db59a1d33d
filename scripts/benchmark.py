"""Benchmark VibeThinker-app against the bare libraries; no real weights needed.

    python scripts/benchmark.py --quick              # CPU, about 10 minutes on 2 cores
    python scripts/benchmark.py --device cuda        # GPU (see scripts/gpu_benchmark.sh)

Writes reports/benchmark.md and reports/benchmark.json (``--out`` to change). See docs/PERFORMANCE.md.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.benchmark import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
