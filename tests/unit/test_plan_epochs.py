"""`orch plan`'s data line (samples, steps per epoch as the training stream draws them, epochs) and its 8 x A100 time
line, for every source; hf_dataset classes in the planner's checks."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from orchestrator.data.loader import DataPosition, EpochBatches
from orchestrator.jobs import estimate
from orchestrator.jobs.plan import DIGITS_SAMPLES, check_data, make_plan, steps_per_epoch
from orchestrator.specs.job import load_spec
from tests.helpers import orch, tiny_spec


def plan_of(tmp_path: Path, **sections):
    """The spec tiny_spec writes with these sections, and its plan (made in-process)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    spec = load_spec(tiny_spec(tmp_path, **sections))
    return spec, make_plan(spec, tmp_path / "runs" / "job", tmp_path / "runs")


def line(plan, label: str) -> str:
    """The text of the plan line that starts with `label`."""
    (found,) = [text[16:] for text in plan.describe() if text.startswith(label)]
    return found


def drawn_steps_per_epoch(num_samples: int, micro_batch: int, world_size: int, grad_accum_steps: int) -> Fraction:
    """Optimizer steps in one epoch of what the training stream really yields: every rank's EpochBatches of epoch 0."""
    per_rank = [
        len(EpochBatches(num_samples, micro_batch, rank, world_size, 7, False, DataPosition()).epoch_keys(0))
        for rank in range(world_size)
    ]
    assert len(set(per_rank)) == 1, per_rank  # DDP steps together: every rank draws as many
    return Fraction(per_rank[0], grad_accum_steps)


def write_image_folder(root: Path, counts: dict[str, int]) -> Path:
    for name, count in counts.items():
        (root / name).mkdir(parents=True)
        for k in range(count):
            Image.fromarray(np.full((12, 10, 3), 20 * k, np.uint8)).save(root / name / f"{k}.png")
    return root


def test_the_digits_data_line_counts_1797_samples_and_the_steps_the_stream_draws(tmp_path):
    from orchestrator.data.loader import DigitsDataset

    assert DIGITS_SAMPLES == len(DigitsDataset(8))
    spec, plan = plan_of(tmp_path, train={"steps": 600, "global_batch_size": 32})
    per_epoch = drawn_steps_per_epoch(DIGITS_SAMPLES, spec.micro_batch_size, 1, 1)
    assert per_epoch == steps_per_epoch(DIGITS_SAMPLES, 32, 1, 1) == 56  # floor(1797 / 32)
    assert line(plan, "data").startswith(
        "1,797 samples (scikit-learn's digits); 56 steps per epoch at global batch 32 (floor, as the training stream "
        "draws: 1,792 samples per epoch, the other 5 left out at random); 600 steps = 10.7 epochs"
    )


@pytest.mark.parametrize(
    "samples, micro, world, accum",
    [(1797, 32, 1, 1), (1797, 16, 2, 1), (1797, 8, 2, 4), (1000, 64, 1, 2), (13, 2, 3, 1), (13, 4, 1, 3)],
)
def test_steps_per_epoch_are_what_epoch_batches_draw_under_ranks_and_accumulation(samples, micro, world, accum):
    assert steps_per_epoch(samples, micro, world, accum) == drawn_steps_per_epoch(samples, micro, world, accum)


def test_a_planned_split_over_ranks_and_accumulation_counts_the_same_steps(tmp_path):
    spec, plan = plan_of(
        tmp_path,
        train={"steps": 300, "global_batch_size": 128, "grad_accum_steps": 4},
        resources={"processes": 2, "threads_per_process": 1},
    )
    assert (spec.micro_batch_size, spec.resources.world_size) == (16, 2)
    per_epoch = drawn_steps_per_epoch(DIGITS_SAMPLES, 16, 2, 4)  # 56 micro batches per rank, 4 per step
    assert per_epoch == 14
    assert "; 14 steps per epoch at global batch 128 (" in line(plan, "data")
    assert line(plan, "data").endswith("; 300 steps = 21.4 epochs")


def test_an_image_folder_counts_its_images_and_matches_the_stream(tmp_path):
    from orchestrator.data.loader import ImageFolderDataset

    folder = write_image_folder(tmp_path / "pets", {"cat": 7, "dog": 6})
    data = {"source": "image_folder", "path": str(folder), "resolution": 8}
    spec, plan = plan_of(tmp_path, data=data, train={"steps": 9, "global_batch_size": 4})
    samples = len(ImageFolderDataset(folder, 8, 3))
    assert samples == 13
    assert drawn_steps_per_epoch(samples, 4, 1, 1) == 3
    assert line(plan, "data") == (
        f"13 samples (image_folder {folder}); 3 steps per epoch at global batch 4 (floor, as the training stream "
        "draws: 12 samples per epoch, the other 1 left out at random); 9 steps = 3 epochs"
    )
    assert plan.problems == ()


def test_missing_data_is_said_in_the_data_line_and_the_plan_prints_the_rest(tmp_path):
    data = {"source": "image_folder", "path": str(tmp_path / "absent"), "resolution": 8}
    _, plan = plan_of(tmp_path, data=data, train={"steps": 10, "global_batch_size": 8})
    assert line(plan, "data") == (
        f"image_folder {tmp_path / 'absent'}: not readable here (see the problem below); 10 steps x global batch 8 = "
        "80 samples drawn: divide by the dataset's size for epochs"
    )
    assert any("does not exist" in problem for problem in plan.problems)
    assert " on 8 x A100: " in line(plan, "time (8xA100)")  # pixels: the network's input is the spec's, data or not


def test_fewer_samples_than_a_global_batch_are_said_and_refused_before_the_job_is_created(tmp_path):
    folder = write_image_folder(tmp_path / "few", {"cat": 3})
    _, plan = plan_of(tmp_path, data={"source": "image_folder", "path": str(folder)}, train={"global_batch_size": 8})
    assert "fewer than one global batch" in line(plan, "data")
    # a problem of the plan: `orch submit` refuses (exit 2) instead of starting a job the stream fails at once
    assert plan.problems == (
        f"image_folder {folder} has 3 sample(s), fewer than one global batch (8 per rank x 1 rank(s)): lower "
        "train.global_batch_size or add data",
    )


def test_prepared_shards_count_the_index_and_epoch_0_of_the_shard_stream(tmp_path):
    from orchestrator.data.shards import ShardStream
    from tests.unit.test_shards import write_dataset

    folder = write_dataset(tmp_path / "latents", sizes=(7, 5, 6, 4, 8))  # 30 latents of 4x4x4
    spec, plan = plan_of(
        tmp_path,
        model={"patch_size": 2, "hidden_size": 32, "depth": 2, "num_heads": 2},
        data={"source": "webdataset", "path": str(folder), "resolution": 32, "num_workers": 2},
        train={"steps": 20, "global_batch_size": 4},
        sample={"every": 3, "sampler": "ddim", "steps": 5, "per_class": 2, "classes": [0]},
    )
    stream = ShardStream(folder, micro_batch=4, seed=spec.train.seed, num_workers=2)
    batches = stream.batches_in_epoch(0)
    stream.close()
    assert line(plan, "data").startswith(
        f"30 samples (prepared shards {folder}); {batches} steps per epoch at global batch 4 (floor, as the shard "
        f"stream draws epoch 0: {4 * batches} samples"
    )
    assert line(plan, "data").endswith(f"; 20 steps = {20 / batches:.1f} epochs")
    assert "input assumed" not in line(plan, "time (8xA100)")  # the index gives the latents' shape


def test_a_dit_plan_prints_the_8xa100_time_by_the_estimate_formula(tmp_path):
    spec, plan = plan_of(
        tmp_path,
        model={"patch_size": 2, "hidden_size": 384, "depth": 12, "num_heads": 6},  # DiT-S/2 on 32x32 grey pixels
        data={"source": "digits", "resolution": 32},
        train={"steps": 400_000, "global_batch_size": 256, "mixed_precision": "bf16"},
        resources={"processes": 1, "threads_per_process": 1, "device": "cpu"},
    )
    macs = estimate.dit_forward_macs(12, 384, 2, 1, 32, spec.model.learn_sigma)
    minutes = 3 * 2 * macs * 256 * 400_000 / (8 * 312e12 * 0.35) / 60  # FLOPs / (8 GPUs x bf16 peak x 35 % MFU)
    assert 1 < minutes < 90
    time = line(plan, "time (8xA100)")
    assert time.startswith(
        f"~{minutes:.0f} min on 8 x A100: {3 * 2 * macs / 1e9:.3g} GFLOPs per image (3 passes x 2 x "
    )
    assert time.endswith(
        "(bf16 peak 312 TFLOP/s at an assumed 35% MFU; training steps only; formula, not a measurement)"
    )
    fp32 = plan_of(tmp_path / "fp32", train={"mixed_precision": "no"}, resources={"tf32": False})[1]
    assert "(fp32 peak 19.5 TFLOP/s" in line(fp32, "time (8xA100)")
    checkpointed = plan_of(tmp_path / "ckpt", resources={"activation_checkpointing": True})[1]
    assert "(4 passes (checkpointed) x 2 x " in line(checkpointed, "time (8xA100)")


def test_a_latent_job_without_its_index_assumes_sd_vae_latents_and_the_unet_has_no_time(tmp_path):
    data = {"source": "webdataset", "path": str(tmp_path / "not-prepared"), "resolution": 256}
    spec, plan = plan_of(tmp_path, data=data, train={"steps": 1000, "global_batch_size": 256})
    assert "input assumed 4x32x32, an SD-VAE's latents of 256 px" in line(plan, "time (8xA100)")
    assert ": not readable here" in line(plan, "data")
    unet = {
        "arch": "unet",
        "unet": {
            "down_channels": [8, 16],
            "mid_channels": [16, 8],
            "down_sample": [True],
            "num_down_layers": 1,
            "num_mid_layers": 1,
            "num_up_layers": 1,
            "num_heads": 2,
            "time_emb_dim": 16,
            "norm_groups": 4,
        },
    }
    spec_file = tiny_spec(tmp_path)
    raw = yaml.safe_load(spec_file.read_text())
    spec_file.write_text(yaml.safe_dump({**raw, "model": unet}))  # in place of the DiT's fields, not merged
    plan = make_plan(load_spec(spec_file), tmp_path / "runs" / "unet", tmp_path / "runs")
    assert line(plan, "time (8xA100)") == "the formula covers DiT only (estimate.py counts no U-Net FLOPs)"


# ---- hf_dataset ---------------------------------------------------------------------------------


def save_hf_dataset(folder: Path, labels: list[int], class_names: list[str] | None) -> Path:
    """A tiny local `datasets` dataset (save_to_disk) of 10x12 RGB images with a ClassLabel or integer label."""
    import datasets

    label = datasets.ClassLabel(names=class_names) if class_names else datasets.Value("int64")
    features = datasets.Features({"image": datasets.Image(), "label": label})
    images = [Image.fromarray(np.full((12, 10, 3), 9 * k, np.uint8)) for k in range(len(labels))]
    datasets.Dataset.from_dict({"image": images, "label": labels}, features=features).save_to_disk(str(folder))
    return folder


def hub_spec(tmp_path: Path, folder: Path, **model):
    data = {"source": "hf_dataset", "path": str(folder), "resolution": 8}
    train = {"steps": 10, "global_batch_size": 4}
    return plan_of(tmp_path, data=data, train=train, model={**TINY_MODEL, **model}, sample={"classes": [0, 1]})


TINY_MODEL = {"patch_size": 4, "hidden_size": 32, "depth": 2, "num_heads": 2}


def test_a_hf_dataset_counts_its_rows_and_its_class_label_names(tmp_path):
    from orchestrator.jobs.plan import _input_shape

    folder = save_hf_dataset(tmp_path / "saved", [0, 1, 0, 1, 0, 1, 0, 1, 0, 1], ["cat", "dog", "fox"])
    spec, plan = hub_spec(tmp_path, folder)
    assert line(plan, "data") == (
        f"10 samples (hf_dataset {folder} (split train)); 2 steps per epoch at global batch 4 (floor, as the "
        "training stream draws: 8 samples per epoch, the other 2 left out at random); 10 steps = 5 epochs"
    )
    assert _input_shape(spec)[2] == 3  # the ClassLabel's names, used or not
    assert plan.problems == ()
    too_few = hub_spec(tmp_path / "two", folder, num_classes=2)[1]
    assert any("model.num_classes is 2 but" in p and "has 3 classes" in p for p in too_few.problems)


def test_integer_labels_give_max_plus_one_classes_and_only_a_class_model_reads_them(tmp_path):
    from orchestrator.jobs.plan import PlanError, _input_shape

    folder = save_hf_dataset(tmp_path / "ints", [0, 4, 2, 1, 0], None)
    spec, plan = hub_spec(tmp_path, folder)
    assert _input_shape(spec)[2] == 5
    with pytest.raises(PlanError, match="model.num_classes is 4 but .* has 5 classes"):
        check_data(hub_spec(tmp_path / "four", folder, num_classes=4)[0])
    unconditional, plan = hub_spec(tmp_path / "none", folder, condition="none", class_dropout=0.0)
    assert _input_shape(unconditional)[2] == 1 and plan.problems == ()


def test_orch_plan_of_an_unreachable_hf_dataset_prints_everything_and_the_problem(tmp_path):
    spec_file = tiny_spec(
        tmp_path, data={"source": "hf_dataset", "path": "nobody/no-such-dataset-here", "resolution": 8}
    )
    planned = orch("plan", str(spec_file), root=tmp_path / "runs", env={"HF_HUB_OFFLINE": "1"}, timeout=60)
    assert planned.returncode == 0, planned.stderr
    out = planned.stdout
    assert "data            hf_dataset nobody/no-such-dataset-here: not readable here (see the problem below)" in out
    assert "time (8xA100)   under 1 s on 8 x A100: " in out and "command         " in out
    assert "problem         dataset nobody/no-such-dataset-here" in out
