"""While rank 0 works alone (sample grids, converting a ZeRO checkpoint), the other ranks wait at a gloo barrier
with resources.rank0_timeout_s, not in the next collective, whose timeout a long grid would exceed."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
LEAKY = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def run_probe(*args: str) -> subprocess.CompletedProcess:
    env = {**{k: v for k, v in os.environ.items() if k not in LEAKY}, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    argv = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "tests/rank0_alone_probe.py",
        *args,
    ]
    return subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=180)


def test_rank0_working_alone_longer_than_the_collective_timeout_does_not_end_the_job():
    guarded = run_probe("--solo-s", "14")
    assert guarded.returncode == 0, guarded.stdout[-2000:] + guarded.stderr[-3000:]
    assert guarded.stdout.count("gave 2") == 2, guarded.stdout

    unguarded = run_probe("--solo-s", "14", "--unguarded")  # the control: how the loop waited before
    assert unguarded.returncode != 0, (
        "the other rank survived 14 s in a collective with a 10 s timeout: the test proves nothing"
    )
