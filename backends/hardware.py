"""What the machine lets us use: CPU cores (for llama.cpp's threads)."""
from __future__ import annotations

import os
from pathlib import Path


def physical_cores() -> int:
    """CPU cores we may use, counting hyper-threads once (decode speed scales with cores).

    psutil counts the machine's physical and logical CPUs; the affinity mask and a container's
    CPU quota (cgroup v2 ``cpu.max``, which psutil does not read) cap what this process may use.
    """
    import psutil

    logical = psutil.cpu_count(logical=True) or os.cpu_count() or 1
    physical = psutil.cpu_count(logical=False) or logical
    threads_per_core = max(1, logical // physical)
    try:
        allowed = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        allowed = logical
    cores = max(1, allowed // threads_per_core)
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cores
