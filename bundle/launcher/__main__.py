"""``python -m bundle.launcher``: what 1键推理.sh runs once it has found a Python ≥ 3.10."""
import sys

from .commands import main

sys.exit(main())
