"""Starting a recorded job: the steps `orch submit`, `orch resume` and a sweep's trials share (the files a spec names
copied into the job, a detached supervisor, or an sbatch submission)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from orchestrator.jobs.directory import ACTIVE_STATES, JobDir, JobState


def keep_user_files(job: JobDir, spec) -> None:
    """Copy the files the spec names and the ranks read at every start (a user's DeepSpeed JSON) into the job
    directory, and point the recorded spec at the copies: a resume a week later trains with what was submitted."""
    from orchestrator.specs.job import replace

    source = spec.resources.deepspeed.config_file
    if source and Path(source).parent != job.path:
        copy = job.path / "deepspeed_user.json"
        shutil.copyfile(source, copy)
        job.write_spec(replace(spec, "resources.deepspeed.config_file", str(copy)).to_yaml())


def start_detached(job: JobDir, wait_s: float = 30.0) -> subprocess.Popen:
    """Run the job's supervisor in the background (its own session, output in logs/supervisor.log); return once it
    holds the job's run lock with the job active (a failed or preempted job being resumed is until then still
    recorded as it ended), or once the supervisor exited, or `wait_s` passed."""
    with open(job.logs_dir / "supervisor.log", "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "orchestrator.jobs.supervisor", str(job.path)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.time() + wait_s
    while time.time() < deadline and process.poll() is None:
        if job.is_locked() and job.read().state in ACTIVE_STATES:
            break
        time.sleep(0.05)
    return process


def submit_to_slurm(job: JobDir) -> str:
    """Write the job's sbatch script and submit it; Slurm runs (and requeues) it from here on. The Slurm job id."""
    from orchestrator.jobs import slurm_queue as slurm
    from orchestrator.jobs.supervisor import write_launch_files

    plan = json.loads(job.plan_file.read_text())
    write_launch_files(plan)  # the sbatch script
    job.logs_dir.mkdir(exist_ok=True)  # Slurm does not create the output folder; its output would be lost
    slurm_job_id = slurm.submit(plan["command"]["argv"])
    record = job.read()
    if record.state != JobState.QUEUED:
        job.transition(JobState.QUEUED, message="")
    job.update(slurm_job_id=slurm_job_id, launcher="slurm", world_size=plan["world_size"], ended_at=None)
    return slurm_job_id


def request_cancel(job: JobDir, record) -> None:
    """Ask an active job to stop (`orch cancel`): its ranks checkpoint and stop, and it ends `cancelled`; a job not
    started yet is cancelled at once."""
    import os
    import signal

    job.update(cancel_requested=True)
    if record.slurm_job_id is not None:
        from orchestrator.jobs import slurm_queue as slurm

        if record.state == JobState.QUEUED:  # not started: nothing to checkpoint
            slurm.cancel(record.slurm_job_id)
            job.transition(
                JobState.CANCELLED,
                ended_at=time.time(),
                message=f"cancelled before it started (Slurm job {record.slurm_job_id})",
            )
        else:
            slurm.signal_tasks(record.slurm_job_id, "TERM")  # the ranks checkpoint and stop; no requeue
    elif record.supervisor_pid and job.is_locked():
        os.kill(record.supervisor_pid, signal.SIGTERM)
    elif record.state == JobState.QUEUED:
        job.transition(JobState.CANCELLED, ended_at=time.time(), message="cancelled before it started")
