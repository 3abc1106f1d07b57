"""A rank that hangs (SIGSTOP) is found by the watchdog, which writes every thread's stack into the log; torchrun
starts the ranks again and the job ends bitwise where an uninterrupted one ends. A crashed single-process run is
started again by the supervisor. Each restart is counted."""

import json
import os
import signal
import time

import pytest

from tests.helpers import (
    assert_bitwise_equal,
    final_weights,
    log_text,
    only_job,
    orch,
    start_orch,
    state,
    tiny_spec,
    wait_for,
)

pytestmark = pytest.mark.slow

LONG = dict(
    train={"steps": 200, "global_batch_size": 32, "seed": 3},
    checkpoint={"every": 100, "keep": 3},
    sample={"every": 1000},
)


def rank_pid(job, rank: int) -> int:
    return json.loads((job / "ranks" / f"{rank}.json").read_text())["pid"]


def test_a_stopped_rank_is_found_with_every_stack_and_torchrun_restarts_the_job_bitwise(tmp_path):
    spec = tiny_spec(tmp_path, **LONG, resources={"processes": 2, "launcher": "torchrun", "threads_per_process": 1})
    settings = ["--set", "resources.hang_timeout_s=10", "--set", "resources.max_restarts=1"]
    reference = orch("submit", str(spec), *settings, root=tmp_path / "reference")
    assert reference.returncode == 0, log_text(only_job(tmp_path / "reference"))

    root = tmp_path / "runs"
    run = start_orch("submit", str(spec), *settings, root=root)
    job = wait_for(lambda: next((p for p in root.glob("*") if (p / "state.json").exists()), None), what="the job")
    wait_for(lambda: state(job).get("checkpoint_step") == 100, timeout=120, what="the checkpoint at step 100")
    stopped = rank_pid(job, 1)
    os.kill(stopped, signal.SIGSTOP)  # rank 1 hangs; rank 0 waits for it in the next all-reduce
    hung_at = time.monotonic()
    try:
        wait_for(lambda: "hang: no progress" in log_text(job), timeout=60, what="the watchdog")
        detected = time.monotonic() - hung_at
        # The stalled rank comes back (a node out of a long stall): it meets torchrun's stop at once instead of after
        # torchrun's 30 s SIGTERM grace, which a stopped process cannot answer.
        os.kill(stopped, signal.SIGCONT)
        assert run.wait(timeout=240) == 0, log_text(job)
    finally:
        try:
            os.kill(stopped, signal.SIGKILL)
        except ProcessLookupError:
            pass
        run.kill()
    assert 10 <= detected < 30, detected
    log = log_text(job)
    assert "Thread 0x" in log and "most recent call first" in log, "rank 0's stacks (faulthandler) are in the log"
    assert state(job)["state"] == "succeeded" and state(job)["restarts"] == 1, state(job)
    assert "resuming from step-0000100" in log or "step-0000100" in log
    model, ema = final_weights(job)
    reference_model, reference_ema = final_weights(only_job(tmp_path / "reference"))
    assert_bitwise_equal(model, reference_model)
    assert_bitwise_equal(ema, reference_ema)


def test_a_crashed_run_is_started_again_by_the_supervisor_and_counted(tmp_path):
    spec = tiny_spec(tmp_path, **LONG, resources={"processes": 1, "threads_per_process": 1})
    root = tmp_path / "runs"
    run = start_orch("submit", str(spec), "--set", "resources.max_restarts=2", root=root)
    job = wait_for(lambda: next((p for p in root.glob("*") if (p / "state.json").exists()), None), what="the job")
    wait_for(lambda: state(job).get("checkpoint_step") == 100, timeout=120, what="the checkpoint at step 100")
    os.kill(rank_pid(job, 0), signal.SIGKILL)  # the rank crashes; its supervisor lives on
    assert run.wait(timeout=240) == 0, log_text(job)
    record = state(job)
    assert record["state"] == "succeeded" and record["restarts"] == 1 and record["attempts"] == 2, record
    assert "=== restart 1 after:" in log_text(job)
    status = orch("status", job.name, "--json", root=root)
    assert json.loads(status.stdout)["restarts"] == 1


def test_a_cancelled_job_stays_cancelled_although_torchrun_has_restarts_left(tmp_path):
    root = tmp_path / "runs"
    spec = tiny_spec(
        tmp_path,
        train={"steps": 100000},
        checkpoint={"every": 100000},
        sample={"every": 100000},
        resources={"processes": 2, "launcher": "torchrun", "threads_per_process": 1, "max_restarts": 2},
    )
    assert orch("submit", str(spec), "--detach", root=root).returncode == 0
    job = only_job(root)
    wait_for(lambda: state(job)["step"] >= 2, timeout=120, what="training to start")
    cancelled = orch("cancel", job.name, root=root, check=True)
    assert "cancelled" in cancelled.stdout
    record = state(job)
    assert record["state"] == "cancelled" and record["restarts"] == 0 and record["attempts"] == 1, record
    assert record["checkpoint_step"] == record["step"]
    assert "TORCHELASTIC_RESTART_COUNT" not in log_text(job) and "restarts left" not in log_text(job)
