"""orch jobs with `launcher: slurm` on a real single-machine Slurm: submit, status from Slurm's view, the
time-limit warning (checkpoint, self-requeue, resume from that checkpoint by itself), cancel."""

import json

import pytest

from tests.helpers import log_text, only_job, orch, state, tiny_spec, wait_for
from tests.slurm_cluster import started_cluster

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster():
    yield from started_cluster()


def slurm_log(job) -> str:
    return "\n".join(p.read_text(errors="replace") for p in (job / "logs").glob("slurm-*.out")) + log_text(job)


def test_a_slurm_job_checkpoints_on_the_time_limit_warning_requeues_and_finishes(tmp_path, cluster):
    root = tmp_path / "runs"
    spec = tiny_spec(
        tmp_path,
        "slurmjob",
        train={"steps": 400},
        checkpoint={"every": 100000},
        sample={"every": 100000},
        tracking={"enabled": True, "log_every": 10},
        resources={"launcher": "slurm", "processes": 2, "threads_per_process": 1, "slurm": {"signal_seconds": 60}},
    )
    plan = orch("plan", str(spec), root=root, env=cluster.env)
    assert (
        plan.returncode == 0 and "#SBATCH --requeue" in plan.stdout and "#SBATCH --signal=B:USR1@60" in plan.stdout
    ), plan.stdout + plan.stderr

    submitted = orch("submit", str(spec), root=root, env=cluster.env)
    assert submitted.returncode == 0, submitted.stderr
    job = only_job(root)
    slurm_id = state(job)["slurm_job_id"]
    assert f"submitted to Slurm as job {slurm_id}" in submitted.stdout
    assert (job / "slurm" / "job.sbatch").is_file()

    wait_for(
        lambda: state(job)["state"] == "running" and state(job)["step"] >= 20, timeout=120, what="training under Slurm"
    )
    listed = json.loads(orch("status", job.name, "--json", root=root, env=cluster.env).stdout)
    assert listed["state"] == "running" and listed["slurm_job_id"] == slurm_id

    cluster.cancel(slurm_id, "USR1", batch=True)  # what slurmctld sends signal_seconds before the time limit
    wait_for(lambda: state(job)["attempts"] == 2, timeout=120, what="the requeued run to start")
    requeued = state(job)
    assert requeued["restarts"] == 1 and requeued["checkpoint_step"] is not None, requeued
    stopped_at = requeued["checkpoint_step"]
    wait_for(lambda: state(job)["state"] == "succeeded", timeout=240, what="the requeued run to finish")
    assert state(job)["step"] == 400, state(job)
    text = slurm_log(job)
    assert f"resumed from step-{stopped_at:07d}" in text, text[-3000:]
    assert f"requeueing job {slurm_id}" in text

    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert (
        len(runs) == 1
        and runs[0].data.tags["orch.slurm_restarts"] == "1"
        and runs[0].data.tags["orch.slurm_job_id"] == slurm_id
    )


def test_orch_cancel_of_a_slurm_job_checkpoints_and_stops_without_requeue(tmp_path, cluster):
    root = tmp_path / "runs"
    spec = tiny_spec(
        tmp_path,
        "slurmcancel",
        train={"steps": 100000},
        checkpoint={"every": 100000},
        sample={"every": 100000},
        resources={"launcher": "slurm", "processes": 1, "threads_per_process": 1},
    )
    assert orch("submit", str(spec), root=root, env=cluster.env).returncode == 0
    job = only_job(root)
    wait_for(lambda: state(job)["step"] >= 5, timeout=120, what="training under Slurm")
    cancelled = orch("cancel", job.name, "--timeout", "90", root=root, env=cluster.env)
    assert cancelled.returncode == 0, cancelled.stderr
    record = state(job)
    assert record["state"] == "cancelled" and record["checkpoint_step"] == record["step"] > 0, (
        record["message"] + slurm_log(job)[-2000:]
    )
    assert record["attempts"] == 1  # not requeued
    wait_for(lambda: cluster.state(record["slurm_job_id"]) != "RUNNING", timeout=30, what="the Slurm job to end")


def test_launcher_slurm_without_sbatch_is_refused_before_anything_is_created(tmp_path):
    import sys
    from pathlib import Path

    spec = tiny_spec(tmp_path, "nosbatch", resources={"launcher": "slurm"})
    result = orch("submit", str(spec), root=tmp_path / "runs", env={"PATH": str(Path(sys.executable).parent)})
    assert result.returncode == 2 and "launcher slurm needs sbatch on the PATH" in result.stderr, result.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_a_rank_killed_under_slurm_is_restarted_in_the_allocation_by_torchrun_and_counted(tmp_path, cluster):
    import os
    import signal

    root = tmp_path / "runs"
    spec = tiny_spec(
        tmp_path,
        "slurmrestart",
        train={"steps": 300},
        checkpoint={"every": 100},
        sample={"every": 100000},
        resources={"launcher": "slurm", "processes": 2, "threads_per_process": 1, "max_restarts": 1},
    )
    submitted = orch("submit", str(spec), root=root, env=cluster.env)
    assert submitted.returncode == 0, submitted.stderr
    job = only_job(root)
    slurm_id = state(job)["slurm_job_id"]
    wait_for(lambda: (state(job)["checkpoint_step"] or 0) >= 100, timeout=180, what="the checkpoint at step 100")
    os.kill(json.loads((job / "ranks" / "1.json").read_text())["pid"], signal.SIGKILL)  # a rank dies mid-run

    wait_for(lambda: state(job)["state"] in ("succeeded", "failed"), timeout=240, what="the job to end")
    record = state(job)
    assert record["state"] == "succeeded" and record["step"] == 300, slurm_log(job)[-3000:]
    assert record["restarts"] == 1 and record["attempts"] == 2 and record["slurm_job_id"] == slurm_id
    text = slurm_log(job)
    assert "--max_restarts 1" in (job / "slurm" / "job.sbatch").read_text()
    assert "resumed from step-0000" in text and "requeueing" not in text  # the same allocation, not a requeue


def test_a_sweep_on_slurm_keeps_max_parallel_trials_in_the_queue_and_no_more(tmp_path, cluster):
    root = tmp_path / "runs"
    spec = tiny_spec(
        tmp_path,
        "slurmsweep",
        train={"steps": 120},
        checkpoint={"every": 100000},
        sample={"every": 100000},
        resources={"launcher": "slurm", "processes": 1, "threads_per_process": 1},
    )
    swept = orch(
        "sweep", str(spec), "--grid", "train.learning_rate=1e-3,2e-3,3e-3", "--max-parallel", "2", "--name", "q",
        root=root, env=cluster.env,
    )  # fmt: skip
    assert swept.returncode == 0, swept.stdout + swept.stderr
    assert "3 completed, 0 failed, 0 pruned of 3" in swept.stdout, swept.stdout
    trials = [state(root / f"q-t{n:03d}") for n in range(3)]
    slurm_ids = [record["slurm_job_id"] for record in trials]
    assert all(slurm_ids) and len(set(slurm_ids)) == 3, slurm_ids
    for n, slurm_id in enumerate(slurm_ids):
        assert f"q-t{n:03d}: Slurm job {slurm_id}" in swept.stdout
    assert all(record["state"] == "succeeded" and record["step"] == 120 for record in trials), trials
    first, second, third = trials
    assert second["started_at"] < first["ended_at"] and first["started_at"] < second["ended_at"]  # two at once
    assert third["started_at"] >= min(first["ended_at"], second["ended_at"])  # the third waited for a free place
