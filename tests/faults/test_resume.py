"""Whatever stops a job — SIGKILL, Ctrl-C, SIGTERM, SIGUSR1, `orch cancel` — `orch resume` continues it exactly."""

import os
import signal

import pytest

from tests.helpers import (
    job_appeared,
    kill_after_checkpoint_then_resume,
    log_text,
    only_job,
    orch,
    start_orch,
    state,
    tiny_spec,
    wait_for,
)

pytestmark = pytest.mark.slow


# 1797 digits in global batches of 160 make 11 batches an epoch: the run checkpoints at step 10,
# draws a slow DDPM grid at step 11 (the job is killed while it draws), and the resumed steps
# 11-14 cross the epoch boundary, where resuming a data loader by skipping batches goes wrong.
RESUME_SPEC = dict(
    train={"steps": 14, "global_batch_size": 160, "seed": 3},
    checkpoint={"every": 10, "keep": 3},
    sample={"every": 11, "sampler": "ddpm", "steps": 100, "per_class": 100, "classes": [0, 1]},
    tracking={"enabled": False, "log_every": 1},
)


# Flow matching with SD3's shift, Heun grids and the OneCycle schedule: the other objective resumes as exactly.
FLOW = [
    "diffusion.objective=flow",
    "diffusion.beta_schedule=linear",
    "diffusion.shift=2",
    "sample.sampler=heun",
    "train.lr_schedule=one_cycle",
    "train.warmup_steps=0",
]


# Two ranks resume bitwise in tests/faults/test_hang_restart.py (after torchrun restarts them),
# tests/integration/test_latent_jobs.py (with DataLoader workers) and, for flow, under FSDP in
# tests/integration/test_strategy_settings.py: not run a fourth time here.
@pytest.mark.parametrize(("processes", "objective"), [(1, []), (1, FLOW)], ids=["1", "1-flow"])
def test_resume_after_sigkill_is_bitwise_exact(tmp_path, processes, objective):
    spec = tiny_spec(tmp_path, **RESUME_SPEC)
    overrides = [arg for o in [f"resources.processes={processes}", *objective] for arg in ("--set", o)]
    job, resumed = kill_after_checkpoint_then_resume(tmp_path, spec, overrides, kill_at=10, total=14)
    assert "resuming from step-0000010" in resumed.stdout
    assert state(job)["state"] == "succeeded" and state(job)["attempts"] == 2


def test_stop_signals_checkpoint_mark_preempted_and_resume_finishes(tmp_path):
    """Each stop signal in turn, on one job: `orch submit` in the foreground gets the first, and the `orch resume`
    that continues it gets the next (both run the job through the same supervisor)."""
    root = tmp_path / "runs"
    spec = tiny_spec(tmp_path, train={"steps": 100000}, checkpoint={"every": 100000}, sample={"every": 100000})
    foreground = start_orch("submit", str(spec), root=root)
    job = wait_for(lambda: job_appeared(root), what="the job directory")
    stopped_at = 0
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):  # Ctrl-C, `kill`, a cluster's time-limit warning
        if stopped_at:
            foreground = start_orch("resume", job.name, root=root)
        wait_for(
            lambda: state(job)["state"] == "running" and state(job)["step"] >= stopped_at + 3,
            timeout=120,
            what="training to go on",
        )
        foreground.send_signal(signum)
        _, err = foreground.communicate(timeout=120)
        assert foreground.returncode == 75, (signum, err + log_text(job))
        record = state(job)
        assert record["state"] == "preempted", record
        assert record["checkpoint_step"] == record["step"] > stopped_at, "no checkpoint of the step it stopped at"
        assert signal.Signals(signum).name in record["stop_reason"]
        stopped_at = record["step"]

    finish = orch("resume", job.name, "--set", f"train.steps={stopped_at + 2}", "--allow-spec-change", root=root)
    assert finish.returncode == 0, finish.stderr + log_text(job)
    assert "train.steps: 100000 -> " in finish.stdout
    assert state(job)["state"] == "succeeded" and state(job)["step"] == stopped_at + 2


def test_cancel_checkpoints_then_stops_and_second_resume_is_refused(tmp_path):
    root = tmp_path / "runs"
    spec = tiny_spec(tmp_path, train={"steps": 100000}, checkpoint={"every": 100000}, sample={"every": 100000})
    assert orch("submit", str(spec), "--detach", root=root).returncode == 0
    job = only_job(root)
    wait_for(lambda: state(job)["step"] >= 2, timeout=120, what="training to start")

    busy = orch("resume", job.name, root=root)
    assert busy.returncode == 2 and "is running" in busy.stderr and "Traceback" not in busy.stderr

    cancelled = orch("cancel", job.name, root=root, check=True)
    assert "cancelled" in cancelled.stdout
    record = state(job)
    assert record["state"] == "cancelled" and record["checkpoint_step"] == record["step"]


def test_resume_refuses_a_changed_spec_unless_allowed(tmp_path):
    root = tmp_path / "runs"
    orch("submit", str(tiny_spec(tmp_path, train={"steps": 2})), root=root, check=True)
    job = only_job(root)
    refused = orch("resume", job.name, "--set", "train.learning_rate=0.5", root=root)
    assert refused.returncode == 2
    assert "train.learning_rate: 0.001 -> 0.5" in refused.stderr and "--allow-spec-change" in refused.stderr
    finished = orch("resume", job.name, root=root)
    assert finished.returncode == 2 and "already finished its 2 steps" in finished.stderr


def rank_pid(job, rank: int) -> int | None:
    """The pid of a rank process of the job (found by its environment), or None."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = open(f"/proc/{entry}/cmdline", "rb").read().split(b"\0")
            environ = open(f"/proc/{entry}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        if b"orchestrator.worker" in cmdline and str(job).encode() in cmdline and f"RANK={rank}".encode() in environ:
            return int(entry)
    return None


def test_a_rank_that_dies_ends_the_job_as_failed_without_a_hang_and_it_resumes(tmp_path):
    root = tmp_path / "runs"
    spec = tiny_spec(
        tmp_path,
        train={"steps": 100000},
        checkpoint={"every": 3},
        sample={"every": 100000},
        resources={"processes": 2, "threads_per_process": 1},
    )
    assert orch("submit", str(spec), "--detach", root=root).returncode == 0
    job = only_job(root)
    wait_for(lambda: (state(job).get("checkpoint_step") or 0) >= 3, timeout=240, what="a first checkpoint")
    victim = wait_for(lambda: rank_pid(job, 1), timeout=30, what="rank 1's process")
    os.kill(victim, signal.SIGKILL)  # one rank dies mid-collective; the other must not wait for it forever
    wait_for(lambda: state(job)["state"] != "running", timeout=90, what="the job to end after a rank died")
    record = state(job)
    assert record["state"] == "failed", record
    assert rank_pid(job, 0) is None, "rank 0 outlived the job"
    stopped_at = record["checkpoint_step"]

    finish = orch("resume", job.name, "--set", f"train.steps={stopped_at + 2}", "--allow-spec-change", root=root)
    assert finish.returncode == 0, finish.stderr + log_text(job)
    assert state(job)["state"] == "succeeded" and state(job)["step"] == stopped_at + 2
