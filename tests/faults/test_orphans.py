"""No rank outlives its launcher: torchrun starts each rank in a session of its own, so a SIGKILL of the launcher's
process group alone (a crashed supervisor, `kill -9`, the OOM killer) used to leave the ranks training on over their
direct gloo links, writing checkpoints beside the job that `orch resume` then starts."""

import os
import signal
import time
from pathlib import Path

import pytest

from tests.helpers import job_appeared, orch, state, tiny_spec, wait_for

pytestmark = pytest.mark.slow


def processes_of(job: Path) -> list[int]:
    """The pids whose command line names the job directory (its ranks: python -m orchestrator.worker JOB)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            launcher = "torch.distributed.run" in command or "torchrun" in command
            if "orchestrator.worker" in command and str(job) in command and not launcher:
                pids.append(int(entry.name))
    return pids


def test_ranks_die_with_a_killed_launcher(tmp_path):
    root = tmp_path / "runs"
    spec = tiny_spec(tmp_path, train={"steps": 100000}, checkpoint={"every": 100000}, sample={"every": 100000})
    submitted = orch("submit", str(spec), "--detach", "--set", "resources.processes=2", root=root)
    assert submitted.returncode == 0, submitted.stderr
    job = wait_for(lambda: job_appeared(root), what="the job directory")
    wait_for(lambda: state(job)["step"] >= 2, timeout=120, what="training to start")
    assert len(processes_of(job)) == 2, "expected the job's two ranks"

    os.killpg(state(job)["launcher_pid"], signal.SIGKILL)  # torchrun alone: its ranks are in sessions of their own
    deadline = time.time() + 20
    while processes_of(job) and time.time() < deadline:
        time.sleep(0.1)
    left = processes_of(job)
    for pid in left:  # leave nothing behind, whatever the outcome
        os.kill(pid, signal.SIGKILL)
    assert not left, f"ranks {left} outlived their launcher"
    step = state(job)["step"]
    time.sleep(1)
    assert state(job)["step"] == step, "the job went on training after its launcher died"
