"""How long `orch --help`, `orch list` and `orch status` take (goal: under 0.5 s each), and proof
that none of them imports torch, mlflow or deepspeed.

    .venv/bin/python bench/cli_latency.py
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from orchestrator.jobs.directory import JobDir, JobState, new_job_id  # noqa: E402
from tests.helpers import heavy_modules_loaded  # noqa: E402

ORCH = str(Path(sys.executable).with_name("orch"))
RUNS = 15


def fake_root(root: Path, jobs: int = 20) -> str:
    """A job root with some finished jobs, as `orch list` would meet it."""
    last = ""
    for i in range(jobs):
        job = JobDir.create(root, new_job_id(f"bench{i}"), f"bench{i}", "name: x\n", total_steps=100)
        job.transition(JobState.RUNNING)
        job.transition(JobState.SUCCEEDED, message="finished")
        last = job.id
    return last


def timed(args: list[str]) -> float:
    samples = []
    for _ in range(RUNS):
        start = time.perf_counter()
        subprocess.run([ORCH, *args], check=True, capture_output=True)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main() -> None:
    print(
        f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        job_id = fake_root(Path(tmp))
        for args in (["--help"], ["--root", tmp, "list"], ["--root", tmp, "status", job_id]):
            median = timed(args)
            heavy = heavy_modules_loaded(args)
            verdict = "ok" if median < 0.5 and not heavy else "TOO SLOW" if median >= 0.5 else "HEAVY IMPORT"
            print(
                f"orch {' '.join(a for a in args if a != tmp and a != '--root'):<40} median {median * 1000:6.0f} ms "
                f"over {RUNS} runs; heavy imports: {heavy or 'none'}  [{verdict}]"
            )


if __name__ == "__main__":
    main()
