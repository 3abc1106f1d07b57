"""Strategy settings at job level: ZeRO-3 with the optimizer and the weights offloaded to CPU memory, activation
checkpointing, and a user's own DeepSpeed JSON, through `orch submit` / `orch resume` on 2 ranks over gloo."""

import json

import pytest

from tests.faults.test_resume import RESUME_SPEC
from tests.helpers import final_weights, kill_after_checkpoint_then_resume, log_text, only_job, orch, tiny_spec

pytestmark = pytest.mark.slow

TWO_RANKS = ["--set", "resources.processes=2", "--set", "resources.threads_per_process=1"]


def test_zero3_offloaded_and_checkpointed_trains_like_ddp_keeps_its_deepspeed_json_and_resumes_bitwise(tmp_path):
    user_json = tmp_path / "my_deepspeed.json"
    user_json.write_text(json.dumps({"train_batch_size": "auto", "zero_optimization": {"reduce_bucket_size": 4321, "stage3_prefetch_bucket_size": 5000}}))
    spec = tiny_spec(tmp_path, **RESUME_SPEC)
    zero = [*TWO_RANKS, "--set", "resources.strategy=zero3", "--set", "resources.deepspeed.offload_optimizer=true",
            "--set", "resources.deepspeed.offload_params=true", "--set", "resources.activation_checkpointing=true",
            "--set", f"resources.deepspeed.config_file={user_json}"]

    planned = orch("plan", str(spec), *zero, root=tmp_path / "plan")
    assert planned.returncode == 0, planned.stderr
    assert "ZeRO-3, offload optimizer + weights, reduce bucket 4,321" in planned.stdout and "activation checkpointing on" in planned.stdout
    assert "offloaded to CPU memory" in planned.stdout and "checkpointed" in planned.stdout  # the memory estimate follows the settings

    def edit_the_users_file(job):
        # The job keeps the JSON it was submitted with: an edit (here, one that contradicts the spec) does not reach it.
        copy = job / "deepspeed_user.json"
        assert json.loads(copy.read_text())["zero_optimization"]["reduce_bucket_size"] == 4321
        assert str(copy) in (job / "spec.yaml").read_text()
        user_json.write_text(json.dumps({"train_batch_size": 999}))

    job, _ = kill_after_checkpoint_then_resume(tmp_path, spec, zero, kill_at=10, total=14, before_resume=edit_the_users_file)
    log = log_text(job)
    assert "DeepSpeed ZeRO-3: optimizer DeepSpeedCPUAdam offloaded to CPU, weights offloaded to CPU, reduce bucket 4321 elements" in log, log[-3000:]
    assert (job / "checkpoints" / "step-0000014" / "pytorch_model").is_dir()  # DeepSpeed's own shards, inside our layout

    # fp32: the same model as plain DDP without offload or checkpointing (DeepSpeed's CPU Adam is AdamW, the LR schedule applies).
    ddp = orch("submit", str(spec), *TWO_RANKS, root=tmp_path / "ddp")
    assert ddp.returncode == 0, log_text(only_job(tmp_path / "ddp"))
    (zero_model, _), (ddp_model, _) = final_weights(job), final_weights(only_job(tmp_path / "ddp"))
    difference = sum((zero_model[k] - ddp_model[k]).square().sum() for k in ddp_model) ** 0.5
    size = sum(ddp_model[k].square().sum() for k in ddp_model) ** 0.5
    assert difference / size < 1e-5, f"ZeRO-3 with offload departs from DDP by {difference / size:.2e} of the weights' norm"

    sampled = orch("sample", job.name, "--num", "1", "--steps", "2", "--out", str(tmp_path / "samples"), root=tmp_path / "killed")
    assert sampled.returncode == 0 and (tmp_path / "samples" / "grid.png").is_file(), sampled.stderr


def test_a_deepspeed_json_that_contradicts_the_spec_is_refused_before_anything_runs(tmp_path):
    user_json = tmp_path / "ds.json"
    user_json.write_text(json.dumps({"gradient_accumulation_steps": 4, "optimizer": {"type": "Adam"}}))
    spec = tiny_spec(tmp_path, resources={"processes": 2, "threads_per_process": 1, "strategy": "zero2", "deepspeed": {"config_file": str(user_json)}})
    planned = orch("plan", str(spec), root=tmp_path / "jobs")
    assert "gradient_accumulation_steps is 4 but the spec gives 1 (train.grad_accum_steps)" in planned.stdout
    assert "'optimizer': the optimizer is orch's AdamW" in planned.stdout
    submitted = orch("submit", str(spec), root=tmp_path / "jobs")
    assert submitted.returncode == 2 and "resources.deepspeed.config_file" in submitted.stderr and "Traceback" not in submitted.stderr
    assert not (tmp_path / "jobs").exists() or not any((tmp_path / "jobs").iterdir()), "a refused spec records no job"
    user_json.write_text("{not json")
    assert "is not valid JSON" in orch("plan", str(spec), root=tmp_path / "jobs").stdout
