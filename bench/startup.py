"""Time from `orch submit jobs/dit_digits.yaml` to the first completed training step, per launcher.

    .venv/bin/python bench/startup.py

Runs the demo spec (cut to a few steps, tracking to a temporary local store) detached, and watches
the job's state for step 1. Prints the figure and where the time goes (imports, MLflow store).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ORCH = str(Path(sys.executable).with_name("orch"))


def time_to_first_step(processes: int) -> float:
    with tempfile.TemporaryDirectory() as root:
        start = time.perf_counter()
        subprocess.run(
            [
                ORCH,
                "--root",
                root,
                "submit",
                str(REPO / "jobs" / "dit_digits.yaml"),
                "--detach",
                "--set",
                "train.steps=3",
                "--set",
                "tracking.log_every=1",
                "--set",
                f"resources.processes={processes}",
                "--set",
                "sample.sampler=ddim",
                "--set",
                "sample.steps=5",
            ],
            check=True,
            capture_output=True,
            env={**os.environ, "MLFLOW_TRACKING_URI": ""},
        )
        job = next(p for p in Path(root).iterdir() if (p / "state.json").exists())
        while json.loads((job / "state.json").read_text())["step"] < 1:
            time.sleep(0.01)
        first_step = time.perf_counter() - start
        while json.loads((job / "state.json").read_text())["state"] in ("queued", "running"):
            time.sleep(0.1)
        return first_step


def import_seconds(module: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", f"import {module}"], check=True)
    return time.perf_counter() - start


def main() -> None:
    print(f"machine: {platform.node()}, {len(os.sched_getaffinity(0))} cores, Python {platform.python_version()}")
    for processes in (1, 2):
        print(f"submit -> first step done, {processes} process(es): {time_to_first_step(processes):.1f} s")
    for module in ("torch", "accelerate", "diffusers", "mlflow"):
        print(f"  for scale: a bare `import {module}` takes {import_seconds(module):.1f} s")


if __name__ == "__main__":
    main()
