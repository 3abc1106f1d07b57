"""Talking to Slurm for a job whose launcher is `slurm`: submit its sbatch script, read its state, stop it.

The script itself comes from launch/slurm.py (plain values in, text out). Under Slurm there is no
supervisor process and no run lock: rank 0 of each run records the job's state (see worker.py), Slurm
requeues it, and `orch status` asks squeue whether a job that looks active is still known to Slurm.
"""

from __future__ import annotations

import shutil
import subprocess

from orchestrator.errors import UserError

# squeue's states of a job that is waiting for or holding its allocation (anything else: it has ended).
ALIVE = {
    "PENDING",
    "CONFIGURING",
    "RUNNING",
    "COMPLETING",
    "REQUEUED",
    "REQUEUE_HOLD",
    "REQUEUE_FED",
    "RESIZING",
    "SIGNALING",
    "SUSPENDED",
    "STAGE_OUT",
}


class SlurmError(UserError):
    """Slurm refused or could not be reached."""


def submit(argv: list[str]) -> str:
    """Run `sbatch --parsable SCRIPT`; the Slurm job id."""
    result = _run(argv)
    return result.stdout.strip().split(";")[0]  # "id" or "id;cluster"


def state(slurm_job_id: str) -> str | None:
    """squeue's state of the job (PENDING, RUNNING, ...), or None once Slurm no longer lists it as queued or running."""
    result = _run(["squeue", "-h", "-j", slurm_job_id, "-o", "%T"], check=False)
    words = result.stdout.split()
    return words[0] if result.returncode == 0 and words else None


def signal_tasks(slurm_job_id: str, signal_name: str) -> None:
    """Send a signal to every task of the job's steps (the ranks' torchrun), not to the batch shell: TERM
    makes the ranks checkpoint and stop, and the job ends without requeueing itself."""
    _run(["scancel", f"--signal={signal_name}", slurm_job_id])


def cancel(slurm_job_id: str) -> None:
    """Remove a job that has not started."""
    _run(["scancel", slurm_job_id])


def _run(argv: list[str], check: bool = True) -> subprocess.CompletedProcess:
    if shutil.which(argv[0]) is None:
        raise SlurmError(f"{argv[0]} is not on the PATH: run this on a Slurm login node (or set launcher to torchrun)")
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if check and result.returncode != 0:
        raise SlurmError(f"{' '.join(argv)} failed: {result.stderr.strip() or result.stdout.strip()}")
    return result
