"""What the bench scripts print about the machine they ran on (imported as `machine` from bench/)."""

import os
import platform


def cpu_name() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0))
