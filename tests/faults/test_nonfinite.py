"""A NaN loss, injected for real into one rank's backward pass: every rank skips that update, the job goes on, and
a loss that stays NaN stops the job as failed without ever checkpointing non-finite weights."""

import pytest
import torch

from tests.helpers import assert_bitwise_equal, final_weights, log_text, only_job, orch, state, tiny_spec

pytestmark = pytest.mark.slow


def test_a_nan_on_one_rank_skips_that_update_on_every_rank_and_training_goes_on(tmp_path):
    spec = tiny_spec(
        tmp_path,
        train={"steps": 7},
        checkpoint={"every": 1, "keep": 10},
        sample={"every": 100},
        resources={"processes": 2, "threads_per_process": 1},
    )
    root = tmp_path / "runs"
    # updates 3 and 4 (0-based) see a NaN loss on rank 1 only; DDP's all-reduce spreads it to rank 0's gradients
    result = orch("submit", str(spec), root=root, env={"ORCH_FAULT_NONFINITE_STEPS": "3-4", "ORCH_FAULT_RANK": "1"})
    job = only_job(root)
    assert result.returncode == 0 and state(job)["state"] == "succeeded", log_text(job)
    log = log_text(job)
    assert "step 3: gradients not finite" in log and "step 4: gradients not finite" in log
    before, after = final_weights(job, "step-0000003"), final_weights(job, "step-0000005")
    assert_bitwise_equal(before[0], after[0])  # neither the weights...
    assert_bitwise_equal(before[1], after[1])  # ...nor the EMA moved in the skipped updates
    moved = final_weights(job, "step-0000006")[0]
    assert any(not moved[k].equal(after[0][k]) for k in moved), "the update after them is applied again"
    assert all(torch.isfinite(t).all() for t in final_weights(job)[0].values())


def test_a_loss_that_stays_nan_stops_the_job_with_its_first_step_and_no_bad_checkpoint(tmp_path):
    spec = tiny_spec(
        tmp_path,
        train={"steps": 40, "max_nonfinite_steps": 3},
        checkpoint={"every": 1, "keep": 50},
        sample={"every": 100},
    )
    root = tmp_path / "runs"
    result = orch("submit", str(spec), root=root, env={"ORCH_FAULT_NONFINITE_STEPS": "2-1000"})
    job = only_job(root)
    assert result.returncode != 0 and state(job)["state"] == "failed"
    assert "loss not finite since step 2 (3 updates in a row skipped" in state(job)["message"], state(job)["message"]
    assert "Traceback" not in log_text(job)
    written = sorted(p.name for p in (job / "checkpoints").glob("step-*"))
    assert written[-1] <= "step-0000005", written  # the skipped steps left the weights as they were at step 2
    for name in written:
        model, ema = final_weights(job, name)
        assert all(torch.isfinite(t).all() for t in [*model.values(), *ema.values()]), name
    status = orch("status", job.name, root=root)
    assert "loss not finite since step 2" in status.stdout
