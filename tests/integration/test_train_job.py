"""A job from spec to trained model, through the real `orch` command and real training processes."""

import json
import subprocess
import sys

import pytest
from PIL import Image
from safetensors.torch import load_file

from tests.helpers import log_text, only_job, orch, state, tiny_spec

pytestmark = pytest.mark.slow


def test_submit_trains_checkpoints_and_records_the_job(tmp_path):
    root = tmp_path / "runs"
    spec = tiny_spec(tmp_path, checkpoint={"every": 2, "keep": 2})
    result = orch("submit", str(spec), "--set", "train.steps=6", root=root)
    job = only_job(root)
    assert result.returncode == 0, result.stderr + log_text(job)
    record = state(job)
    assert record["state"] == "succeeded" and record["step"] == 6 and record["exit_code"] == 0
    assert record["loss"] is not None and record["samples_per_sec"] > 0

    checkpoints = sorted(p.name for p in (job / "checkpoints").iterdir() if p.is_dir())
    assert checkpoints == ["step-0000004", "step-0000006"]  # keep: 2
    assert (job / "checkpoints" / "latest").read_text().strip() == "step-0000006"
    newest = job / "checkpoints" / "step-0000006"
    for name in (
        "model.safetensors",
        "ema.safetensors",
        "optimizer.bin",
        "random_states_0.pkl",
        "trainer_state.json",
        "spec.yaml",
    ):
        assert (newest / name).is_file(), name
    trainer_state = json.loads((newest / "trainer_state.json").read_text())
    assert trainer_state["step"] == 6 and trainer_state["ema_num_updates"] == 6
    assert (trainer_state["epoch"], trainer_state["batch_in_epoch"]) == (
        0,
        6,
    )  # 1797 digits // 32 = 56 batches per epoch

    model, ema = load_file(newest / "model.safetensors"), load_file(newest / "ema.safetensors")
    assert "blocks.0.adaLN_modulation.1.weight" in model and set(model) <= set(ema)
    assert not all(model[k].equal(ema[k]) for k in model), "EMA weights never moved away from the model's"
    assert "train:\n  steps: 6" in (job / "spec.yaml").read_text()  # the resolved spec, override applied

    listed = json.loads(orch("list", "--json", root=root, check=True).stdout)
    assert [j["id"] for j in listed] == [job.name] and listed[0]["state"] == "succeeded"
    status = json.loads(orch("status", job.name, "--json", root=root, check=True).stdout)
    assert status["checkpoint"] == str(newest) and status["dir"] == str(job)
    assert "succeeded" in orch("list", root=root, check=True).stdout


def test_bf16_on_cpu_trains_with_finite_loss(tmp_path):
    root = tmp_path / "runs"
    result = orch("submit", str(tiny_spec(tmp_path, train={"mixed_precision": "bf16", "steps": 3})), root=root)
    job = only_job(root)
    assert result.returncode == 0, log_text(job)
    assert 0 < state(job)["loss"] < 10


def test_gradient_accumulation_splits_the_global_batch(tmp_path):
    root = tmp_path / "runs"
    result = orch("submit", str(tiny_spec(tmp_path, train={"grad_accum_steps": 2, "steps": 2})), root=root)
    job = only_job(root)
    assert result.returncode == 0, log_text(job)
    plan = json.loads((job / "plan.json").read_text())
    assert (plan["micro_batch_size"], plan["grad_accum_steps"], plan["global_batch_size"]) == (16, 2, 32)


def test_image_folder_source_trains_on_class_folders(tmp_path):
    for label, colour in (("cats", (200, 120, 40)), ("dogs", (40, 90, 200))):
        folder = tmp_path / "images" / label
        folder.mkdir(parents=True)
        for i in range(20):
            Image.new("RGB", (24 + i, 16), colour).save(folder / f"{i}.png")
    root = tmp_path / "runs"
    spec = tiny_spec(
        tmp_path,
        data={
            "source": "image_folder",
            "path": str(tmp_path / "images"),
            "resolution": 8,
            "hflip": True,
            "num_workers": 2,
        },
        sample={"classes": [0, 1]},
        train={"steps": 2, "global_batch_size": 8},
    )
    result = orch("submit", str(spec), root=root)
    job = only_job(root)
    assert result.returncode == 0, log_text(job)
    ema = load_file(job / "checkpoints" / "step-0000002" / "ema.safetensors")
    assert ema["x_embedder.proj.weight"].shape[1] == 3  # RGB in
    assert ema["y_embedder.embedding_table.weight"].shape[0] == 3  # 2 classes + the null class


def test_missing_data_is_refused_before_anything_is_created(tmp_path):
    root = tmp_path / "runs"
    spec = tiny_spec(tmp_path, data={"source": "image_folder", "path": str(tmp_path / "nowhere")})
    result = orch("submit", str(spec), root=root)
    assert result.returncode == 2
    assert "data.path" in result.stderr and "does not exist" in result.stderr and "Traceback" not in result.stderr
    assert not root.exists() or not any(root.iterdir())


def test_bad_spec_exits_2_with_one_message_and_creates_nothing(tmp_path):
    root = tmp_path / "runs"
    spec = tmp_path / "bad.yaml"
    spec.write_text("name: bad\ntrain:\n  steps: 5\n  lerning_rate: 1e-3\n")
    result = orch("submit", str(spec), root=root)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "line 4: train.lerning_rate: unknown key; did you mean 'learning_rate'?" in result.stderr
    assert not root.exists()
    assert orch("validate", str(spec), root=root).returncode == 2


def test_dry_run_prints_the_plan_and_creates_nothing(tmp_path):
    root = tmp_path / "runs"
    result = orch(
        "submit", str(tiny_spec(tmp_path)), "--dry-run", "--set", "resources.processes=2", root=root, check=True
    )
    assert "torch.distributed.run" in result.stdout and "--nproc_per_node 2" in result.stdout
    assert "16 per rank x 2 rank(s)" in result.stdout
    assert "nothing was created" in result.stdout and not root.exists()


def test_detached_job_returns_at_once_and_logs_follow_until_it_ends(tmp_path):
    root = tmp_path / "runs"
    submitted = orch("submit", str(tiny_spec(tmp_path, train={"steps": 4})), "--detach", root=root, check=True)
    job = only_job(root)
    assert job.name in submitted.stdout and "orch logs" in submitted.stdout
    followed = orch("logs", job.name, "--follow", root=root, check=True)
    assert "training steps 0..4" in followed.stdout and "checkpoint step-0000004" in followed.stdout
    assert state(job)["state"] == "succeeded"


def test_a_rank_that_sees_the_wrong_world_size_stops_with_a_clear_error(tmp_path):
    # What a launcher that silently starts lone processes would produce (e.g. `accelerate launch --cpu --num_processes
    # 2`).
    from orchestrator.jobs.directory import JobDir, new_job_id
    from orchestrator.jobs.plan import make_plan
    from orchestrator.jobs.supervisor import write_plan
    from orchestrator.specs.job import load_spec

    root = tmp_path / "runs"
    spec = load_spec(tiny_spec(tmp_path), ["resources.processes=2"])
    job = JobDir.create(root, new_job_id(spec.name), spec.name, spec.to_yaml(), spec.train.steps)
    write_plan(job, make_plan(spec, job.path, root))
    lone = subprocess.run(
        [sys.executable, "-m", "orchestrator.worker", str(job.path)], capture_output=True, text=True, timeout=120
    )
    assert lone.returncode == 2
    assert "rank 0 sees a world of 1 process(es) but the plan has 2" in lone.stderr
    assert state(job.path)["stop_reason"].startswith("error: rank 0 sees a world of 1")


def test_what_cannot_run_here_is_refused_at_submit_and_listed_by_plan(tmp_path):
    root = tmp_path / "runs"
    spec = str(tiny_spec(tmp_path))
    refused = orch("submit", spec, "--set", "train.mixed_precision=fp16", root=root)
    assert refused.returncode == 2 and "fp16 needs a GPU; on CPU use bf16" in refused.stderr
    assert not root.exists()
    planned = orch("plan", spec, "--set", "resources.device=cuda", root=root, check=True)
    assert "problem" in planned.stdout and "no NVIDIA GPU is visible" in planned.stdout
    unwritable = orch("--root", "/proc/orch-cannot-write-here", "submit", spec, root=root)
    assert unwritable.returncode == 2 and "cannot write the job root" in unwritable.stderr


@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_two_ranks_train_together_under_either_launcher(tmp_path, launcher):
    root = tmp_path / "runs"
    spec = tiny_spec(tmp_path, train={"steps": 2}, resources={"launcher": launcher, "processes": 2})
    result = orch("submit", str(spec), root=root)
    job = only_job(root)
    assert result.returncode == 0, log_text(job)
    assert state(job)["world_size"] == 2 and state(job)["launcher"] == launcher
    log = log_text(job)
    assert "[rank 0]" in log and "[rank 1]" in log and "micro batch 16 x 2 rank(s)" in log
    assert (job / "checkpoints" / "step-0000002" / "random_states_1.pkl").is_file()  # every rank's RNG state
