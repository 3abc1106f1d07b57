"""Strategies and their settings at job level, through `orch submit` / `orch resume` on 2 ranks over gloo:
ZeRO-3 with the optimizer and the weights offloaded to CPU memory, activation checkpointing and a user's
own DeepSpeed JSON; FSDP2. Both are held against the same job trained with plain DDP in fp32."""

import json
import shutil
from pathlib import Path

import pytest

from tests.faults.test_resume import RESUME_SPEC
from tests.helpers import (
    assert_bitwise_equal,
    final_weights,
    kill_after_checkpoint_then_resume,
    log_text,
    only_job,
    orch,
    state,
    tiny_spec,
)

pytestmark = pytest.mark.slow

TWO_RANKS = ["--set", "resources.processes=2", "--set", "resources.threads_per_process=1"]


@pytest.fixture(scope="module")
def ddp_reference(tmp_path_factory):
    """RESUME_SPEC trained by DDP in fp32 on 2 ranks: (spec, job directory); the FSDP test continues it to step 17."""
    folder = tmp_path_factory.mktemp("ddp")
    spec = tiny_spec(folder, **RESUME_SPEC)
    done = orch("submit", str(spec), *TWO_RANKS, root=folder / "runs")
    assert done.returncode == 0, log_text(only_job(folder / "runs"))
    return spec, only_job(folder / "runs")


def distance(a: dict, b: dict) -> float:
    """Euclidean distance between two sets of weights, over all their tensors."""
    assert a.keys() == b.keys()
    return float(sum((a[k].double() - b[k].double()).square().sum() for k in b) ** 0.5)


def relative_difference(a: dict, b: dict) -> float:
    return distance(a, b) / float(sum(b[k].double().square().sum() for k in b) ** 0.5)


def resume_a_rewound_copy(root: Path, into: Path, step: int) -> Path:
    """Copy the finished job under `root` into `into`, as it stood after its checkpoint at `step` (later checkpoints
    removed, `latest` and state.json pointing back, as a job that died there leaves them), `orch resume` it to its
    end, and return the copy: its weights must then be bitwise those of the job that never stopped."""
    shutil.copytree(root, into)
    copy = only_job(into)
    for later in (copy / "checkpoints").glob("step-*"):
        if int(later.name.removeprefix("step-")) > step:
            shutil.rmtree(later)
    (copy / "checkpoints" / "latest").write_text(f"step-{step:07d}\n")
    failed = {**state(copy), "state": "failed", "step": step, "checkpoint_step": step}
    (copy / "state.json").write_text(json.dumps(failed))
    resumed = orch("resume", copy.name, root=into)
    assert resumed.returncode == 0 and f"resuming from step-{step:07d}" in resumed.stdout, resumed.stderr + log_text(
        copy
    )
    return copy


def test_zero3_offloaded_and_checkpointed_trains_like_ddp_and_keeps_its_deepspeed_json(tmp_path, ddp_reference):
    user_json = tmp_path / "my_deepspeed.json"
    user_json.write_text(
        json.dumps(
            {
                "train_batch_size": "auto",
                "zero_optimization": {"reduce_bucket_size": 4321, "stage3_prefetch_bucket_size": 5000},
            }
        )
    )
    spec = tiny_spec(tmp_path, **RESUME_SPEC)
    zero = [
        *TWO_RANKS,
        "--set",
        "resources.strategy=zero3",
        "--set",
        "resources.deepspeed.offload_optimizer=true",
        "--set",
        "resources.deepspeed.offload_params=true",
        "--set",
        "resources.activation_checkpointing=true",
        "--set",
        f"resources.deepspeed.config_file={user_json}",
    ]

    planned = orch("plan", str(spec), *zero, root=tmp_path / "plan")
    assert planned.returncode == 0, planned.stderr
    assert (
        "ZeRO-3, offload optimizer + weights, reduce bucket 4,321" in planned.stdout
        and "activation checkpointing on" in planned.stdout
    )
    # the memory estimate follows the settings
    assert "offloaded to CPU memory" in planned.stdout and "checkpointed" in planned.stdout

    root = tmp_path / "runs"
    done = orch("submit", str(spec), *zero, root=root)
    job = only_job(root)
    assert done.returncode == 0, log_text(job)
    # The job keeps a copy of the JSON it was submitted with (what a resume reads), not the user's file.
    copy = job / "deepspeed_user.json"
    assert json.loads(copy.read_text())["zero_optimization"]["reduce_bucket_size"] == 4321
    assert str(copy) in (job / "spec.yaml").read_text()
    log = log_text(job)
    assert (
        "DeepSpeed ZeRO-3: optimizer DeepSpeedCPUAdam offloaded to CPU, weights offloaded to CPU, reduce bucket 4321 "
        "elements" in log
    ), log[-3000:]
    assert (
        job / "checkpoints" / "step-0000014" / "pytorch_model"
    ).is_dir()  # DeepSpeed's own shards, inside our layout

    # fp32: the same model as plain DDP without offload or checkpointing (DeepSpeed's CPU Adam is AdamW, the LR schedule
    # applies). Resume with offload continues but not bitwise (resources.deepspeed.offload_optimizer), so it is not
    # re-measured here; ZeRO-3 resume without offload is bitwise in tests/integration/test_zero.py.
    difference = relative_difference(final_weights(job)[0], final_weights(ddp_reference[1])[0])
    assert difference < 1e-5, f"ZeRO-3 with offload departs from DDP by {difference:.2e} of the weights' norm"

    sampled = orch(
        "sample", job.name, "--num", "1", "--steps", "2", "--out", str(tmp_path / "samples"), root=job.parent
    )
    assert sampled.returncode == 0 and (tmp_path / "samples" / "grid.png").is_file(), sampled.stderr


def test_a_deepspeed_json_that_contradicts_the_spec_is_refused_before_anything_runs(tmp_path):
    user_json = tmp_path / "ds.json"
    user_json.write_text(json.dumps({"gradient_accumulation_steps": 4, "optimizer": {"type": "Adam"}}))
    spec = tiny_spec(
        tmp_path,
        resources={
            "processes": 2,
            "threads_per_process": 1,
            "strategy": "zero2",
            "deepspeed": {"config_file": str(user_json)},
        },
    )
    planned = orch("plan", str(spec), root=tmp_path / "jobs")
    assert "gradient_accumulation_steps is 4 but the spec gives 1 (train.grad_accum_steps)" in planned.stdout
    assert "'optimizer': the optimizer is orch's AdamW" in planned.stdout
    submitted = orch("submit", str(spec), root=tmp_path / "jobs")
    assert (
        submitted.returncode == 2
        and "resources.deepspeed.config_file" in submitted.stderr
        and "Traceback" not in submitted.stderr
    )
    assert not (tmp_path / "jobs").exists() or not any((tmp_path / "jobs").iterdir()), "a refused spec records no job"
    user_json.write_text("{not json")
    assert "is not valid JSON" in orch("plan", str(spec), root=tmp_path / "jobs").stdout


def test_compiled_blocks_train_what_eager_ddp_trains_and_resume_bitwise(tmp_path, ddp_reference):
    spec, ddp = ddp_reference
    compiled = [*TWO_RANKS, "--set", "resources.compile=true"]
    planned = orch("plan", str(spec), *compiled, root=tmp_path / "plan")
    assert "compute         fp32, fp32 matmuls in fp32, torch.compile per block" in planned.stdout, planned.stdout

    root = tmp_path / "runs"
    done = orch("submit", str(spec), *compiled, root=root)
    job = only_job(root)
    assert done.returncode == 0, log_text(job)
    log = log_text(job)
    assert "torch.compile: 2 blocks" in log and "torch.compile: 1 graph(s) compiled, 0 graph break(s)" in log, log[
        -3000:
    ]
    # Inductor fuses and reorders float reductions, and AdamW's normalised updates carry that rounding into
    # the weights (measured: 1.3 % of the last four steps' movement); a wrong compiled gradient would be ~100 %.
    eager_at_14, eager_at_10 = final_weights(ddp, "step-0000014")[0], final_weights(ddp, "step-0000010")[0]
    departure, moved = distance(final_weights(job)[0], eager_at_14), distance(eager_at_14, eager_at_10)
    assert departure < 0.05 * moved, (
        f"the compiled job departs from eager DDP by {departure / moved:.1%} of what steps 11-14 moved it"
    )

    # Resumed from its checkpoint at step 10, compiled again, the job ends bitwise where it did. (Resume after a
    # SIGKILL itself is tested without compile in tests/faults/test_resume.py and, on 2 ranks, in
    # test_the_other_objectives_resume_bitwise_under_sharded_strategies and tests/integration/test_latent_jobs.py.)
    copy = resume_a_rewound_copy(root, tmp_path / "rewound", 10)
    resumed_attempt = log_text(copy).split("=== ")[-1]
    assert "torch.compile: 1 graph(s) compiled, 0 graph break(s)" in resumed_attempt, resumed_attempt[-3000:]
    model, ema = final_weights(job)
    assert_bitwise_equal(final_weights(copy)[0], model)
    assert_bitwise_equal(final_weights(copy)[1], ema)


def test_fsdp_trains_what_ddp_trains_resumes_bitwise_and_continues_on_another_world_size(tmp_path, ddp_reference):
    spec, ddp = ddp_reference
    fsdp = [*TWO_RANKS, "--set", "resources.strategy=fsdp"]
    root = tmp_path / "runs"
    done = orch("submit", str(spec), *fsdp, root=root)
    job = only_job(root)
    assert done.returncode == 0, log_text(job)
    assert (job / "checkpoints" / "step-0000010" / "fsdp" / ".metadata").is_file()  # every rank's shards, by DCP
    model, ema = final_weights(job)
    assert (
        relative_difference(model, final_weights(ddp)[0]) < 1e-6
        and relative_difference(ema, final_weights(ddp)[1]) < 1e-6
    )

    # Resume from the checkpoint at step 10 (a copy of the job that never got further): bitwise the same end.
    copy = resume_a_rewound_copy(root, tmp_path / "rewound", 10)
    assert_bitwise_equal(final_weights(copy)[0], model)
    assert_bitwise_equal(final_weights(copy)[1], ema)

    # On one process: DCP reshards the weights and the AdamW state, so it goes on as DDP's full checkpoint does.
    one = ["--set", "train.steps=17", "--set", "resources.processes=1", "--allow-spec-change"]
    for continued in (job, ddp):
        result = orch("resume", continued.name, *one, root=continued.parent)
        assert result.returncode == 0 and state(continued)["step"] == 17, result.stderr + log_text(continued)
    difference = relative_difference(final_weights(job)[0], final_weights(ddp)[0])
    assert difference < 1e-5, f"the resharded FSDP run departs from DDP's by {difference:.2e} (AdamW state lost?)"

    sampled = orch("sample", job.name, "--num", "1", "--steps", "2", "--out", str(tmp_path / "samples"), root=root)
    assert sampled.returncode == 0 and (tmp_path / "samples" / "grid.png").is_file(), sampled.stderr


def test_fsdp_in_bf16_compiled_and_checkpointed_trains_in_one_process(tmp_path):
    spec = tiny_spec(
        tmp_path,
        train={"mixed_precision": "bf16"},
        resources={"strategy": "fsdp", "activation_checkpointing": True, "compile": True},
    )
    done = orch("submit", str(spec), root=tmp_path / "runs")
    job = only_job(tmp_path / "runs")
    assert done.returncode == 0 and state(job)["state"] == "succeeded", log_text(job)
    # FSDP2's hooks sit outside the compiled blocks
    assert "torch.compile: 1 graph(s) compiled, 0 graph break(s)" in log_text(job)
    model, _ = final_weights(job)
    assert all(tensor.dtype.is_floating_point and tensor.isfinite().all() for tensor in model.values())
    planned = orch("plan", str(spec), root=tmp_path / "runs")
    assert (
        "fsdp            FSDP2, one shard unit per block, bf16 weights, fp32 grad reduction, activation checkpointing "
        "on" in planned.stdout
    )


@pytest.mark.parametrize(
    ("strategy", "objective"),
    [
        ("fsdp", ["diffusion.objective=flow", "diffusion.shift=2", "sample.sampler=euler"]),
    ],
    ids=["fsdp-flow"],
)
def test_the_other_objectives_resume_bitwise_under_sharded_strategies(tmp_path, strategy, objective):
    spec = tiny_spec(tmp_path, **RESUME_SPEC)
    spec.write_text(spec.read_text().replace("beta_schedule: squaredcos_cap_v2", "beta_schedule: linear"))
    chosen = [f"resources.strategy={strategy}", "sample.steps=5", *objective]
    overrides = [*TWO_RANKS, *[arg for o in chosen for arg in ("--set", o)]]
    job, _ = kill_after_checkpoint_then_resume(tmp_path, spec, overrides, kill_at=10, total=14)
    assert state(job)["state"] == "succeeded"
