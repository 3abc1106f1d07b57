"""Evaluation through the CLI: in the loop (every rank draws its share, rank 0 writes the figures, and a job with
evaluation trains bit for bit as the same job without it), offline (`orch eval` gives the in-loop figures), the best
checkpoints kept, the Inception/DINOv2 metrics on weights written by the test, and an evaluation that fails while
training goes on."""

import json
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import (
    assert_bitwise_equal,
    final_weights,
    log_text,
    only_job,
    orch,
    state,
    tiny_spec,
    write_feature_weights,
)

pytestmark = pytest.mark.slow

TWO_RANKS = ["--set", "resources.processes=2", "--set", "resources.threads_per_process=1"]
EVAL = {"every": 2, "num_samples": 30, "sampler": "ddim", "steps": 5, "batch_size": 8}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One digit-classifier cache for the module's jobs (ORCH_CACHE): it is trained once, by the first job."""
    return {"ORCH_CACHE": str(tmp_path_factory.mktemp("orch_cache"))}


def test_two_ranks_evaluate_between_steps_without_changing_the_training(tmp_path, cache):
    spec = tiny_spec(tmp_path, train={"steps": 4}, eval=EVAL)
    evaluated = orch("submit", str(spec), *TWO_RANKS, root=tmp_path / "with", env=cache)
    job = only_job(tmp_path / "with")
    assert evaluated.returncode == 0, evaluated.stderr + log_text(job)
    plain = orch("submit", str(spec), *TWO_RANKS, "--set", "eval.every=null", root=tmp_path / "without", env=cache)
    assert plain.returncode == 0, plain.stderr + log_text(only_job(tmp_path / "without"))

    figures = {p.name: json.loads(p.read_text()) for p in sorted((job / "eval").glob("step-*.json"))}
    assert list(figures) == ["step-0000002.json", "step-0000004.json"]  # every 2 steps, and the last
    for record in figures.values():
        metrics = record["metrics"]
        assert metrics["eval/fd_digits"] > 0 and 0 <= metrics["eval/digit_accuracy"] <= 1
        assert metrics["eval/seconds"] > 0 and record["error"] is None
        assert (record["source"], record["num_samples"], record["sampler"]) == ("in-loop", 30, "ddim")
    assert "evaluation of step 4: eval/fd_digits" in log_text(job)
    assert not (only_job(tmp_path / "without") / "eval").exists()
    never = orch("eval", only_job(tmp_path / "without").name, "--checkpoint", "best", root=tmp_path / "without")
    assert never.returncode == 2 and "does not evaluate" in never.stderr and "Traceback" not in never.stderr

    model, ema = final_weights(job)
    plain_model, plain_ema = final_weights(only_job(tmp_path / "without"))
    assert_bitwise_equal(model, plain_model)
    assert_bitwise_equal(ema, plain_ema)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["eval.every=2", "eval.metrics=[fd_digits]", "data.source=image_folder", "data.path=/x"], "read 8x8 digits"),
        (["eval.every=2", "eval.metrics=[fd_dinov2]"], "8x8 images do not have"),
        (
            ["eval.every=2", "eval.metrics=[precision_recall]", "data.resolution=32", "eval.num_samples=3"],
            "must exceed 3",
        ),
        (["checkpoint.keep_best.metric=fd_digits"], "keep_best ranks checkpoints by evaluations"),
        (["eval.every=2", "checkpoint.keep_best.metric=fid"], "keep_best.metric eval/fid is not evaluated"),
        (["eval.every=2", "model.condition=none"], "digit_accuracy needs a class-conditional model"),
        (["eval.every=2", "eval.steps=5000"], "eval.steps 5000 exceeds diffusion.num_train_timesteps"),
        (["eval.every=2", "eval.metrics=[fid]"], "eval.metrics"),
        (["eval.every=0"], "eval.every"),
    ],
)
def test_an_evaluation_that_cannot_run_is_refused_before_anything_starts(tmp_path, overrides, message):
    spec = tiny_spec(tmp_path)
    refused = orch("validate", str(spec), *[f"--set={o}" for o in overrides], root=tmp_path / "runs")
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert message in refused.stderr and "Traceback" not in refused.stderr


def eval_records(job, prefix="step-"):
    return {
        int(p.stem.split("-")[-1]): json.loads(p.read_text()) for p in sorted((job / "eval").glob(f"{prefix}*.json"))
    }


def test_the_best_checkpoints_are_kept_and_orch_eval_gives_the_in_loop_figures(tmp_path, cache):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec = tiny_spec(
        tmp_path,
        train={"steps": 8},
        checkpoint={"every": 100, "keep": 1, "keep_best": {"metric": "fd_digits", "count": 2}},
        eval={**EVAL, "num_samples": 20},
        tracking={"enabled": True, "uri": uri, "experiment": "eval"},
    )
    done = orch("submit", str(spec), root=tmp_path / "runs", env=cache)
    job = only_job(tmp_path / "runs")
    assert done.returncode == 0, done.stderr + log_text(job)

    in_loop = eval_records(job)
    assert list(in_loop) == [2, 4, 6, 8]
    fd = {step: record["metrics"]["eval/fd_digits"] for step, record in in_loop.items()}
    best_two = sorted(fd, key=fd.get)[:2]
    kept = sorted(int(p.name.removeprefix("step-")) for p in (job / "checkpoints").glob("step-*"))
    assert kept == sorted({8, *best_two})  # the newest (keep: 1) and the two best by eval/fd_digits
    record = state(job)
    assert (record["best_step"], record["best_metric"]) == (best_two[0], "eval/fd_digits")
    assert record["best_value"] == fd[best_two[0]]
    shown = orch("status", job.name, root=tmp_path / "runs")
    assert f"step {best_two[0]} (eval/fd_digits" in shown.stdout

    offline = orch("eval", job.name, "--checkpoint", "all", "--write-npz", root=tmp_path / "runs", env=cache)
    assert offline.returncode == 0, offline.stderr
    for step, record in eval_records(job, "offline-step-").items():
        assert record["source"] == "offline" and step in kept
        for key in ("eval/fd_digits", "eval/digit_accuracy"):  # same checkpoint, seed and count: same figures
            assert record["metrics"][key] == in_loop[step]["metrics"][key], (step, key)
    with np.load(job / "eval" / f"samples-step-{best_two[0]:07d}.npz") as samples:
        assert samples["arr_0"].shape == (20, 8, 8, 3) and samples["arr_0"].dtype == np.uint8
        assert list(samples["arr_1"][:12]) == [*range(10), 0, 1]  # classes take turns

    client = MlflowClient(uri)
    history = client.get_metric_history(state(job)["mlflow_run_id"], "eval/fd_digits")
    logged = sorted((m.step, m.value) for m in history)
    assert [v for s, v in logged if s == best_two[0]] == [fd[best_two[0]]] * 2  # in-loop, then offline, one chart

    best = orch(
        "sample", job.name, "--checkpoint", "best", "--num", "1", "--out", str(tmp_path / "s"), root=tmp_path / "runs"
    )
    assert best.returncode == 0 and f"step-{best_two[0]:07d}" in best.stdout, best.stderr
    gone = orch("export", job.name, "--checkpoint", "3", "--out", str(tmp_path / "e"), root=tmp_path / "runs")
    assert gone.returncode == 2 and "no complete checkpoint step-0000003" in gone.stderr


def test_fid_kid_precision_recall_and_fd_dinov2_on_weights_written_here(tmp_path, cache):
    weights = write_feature_weights(tmp_path / "weights")
    spec = tiny_spec(
        tmp_path,
        model={"patch_size": 8},
        data={"source": "digits", "resolution": 32},
        train={"steps": 2},
        eval={
            **EVAL,
            # Inception-v3 at 299 px is most of this test's time: a few images show the wiring as well as many
            # (more references than samples, so that KID's subsets vary and kid_std is above 0).
            "num_samples": 8,
            "metrics": ["fid", "kid", "precision_recall", "fd_dinov2"],
            "reference_samples": 16,
            "weights_dir": str(weights),
        },
    )
    missing = orch("validate", str(spec), "--set", f"eval.weights_dir={tmp_path / 'nowhere'}", root=tmp_path / "runs")
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    for named in ("weights-inception-2015-12-05-6726825d.pth", "https://github.com/toshas/torch-fidelity", "curl -L"):
        assert named in missing.stderr
    assert "hf download facebook/dinov2-large" in missing.stderr

    done = orch("submit", str(spec), root=tmp_path / "runs", env=cache)
    job = only_job(tmp_path / "runs")
    assert done.returncode == 0, done.stderr + log_text(job)
    metrics = eval_records(job)[2]["metrics"]
    for key in ("eval/fid", "eval/kid", "eval/kid_std", "eval/fd_dinov2"):
        assert metrics[key] > 0, key
    assert 0 <= metrics["eval/precision"] <= 1 and 0 <= metrics["eval/recall"] <= 1
    reference_files = {p: p.stat().st_mtime_ns for p in (Path(cache["ORCH_CACHE"]) / "reference").glob("*.npz")}
    assert {p.name.split("-")[0] for p in reference_files} >= {"inception", "dinov2"}

    offline = orch("eval", job.name, root=tmp_path / "runs", env=cache)
    assert offline.returncode == 0, offline.stderr
    # the job ran on 1 thread, `orch eval` on all: Inception's sums are ordered otherwise, equal to rounding
    again = eval_records(job, "offline-step-")[2]["metrics"]
    assert again.keys() == metrics.keys()
    for key in metrics.keys() - {"eval/seconds"}:
        assert again[key] == pytest.approx(metrics[key], rel=1e-6), key
    assert {p: p.stat().st_mtime_ns for p in reference_files} == reference_files  # read from the cache

    # An ADM reference batch of the same 16 digits whose Inception mean is moved by 1 in every feature: KID (from its
    # images) is the in-loop figure, while FID takes the batch's mu and sigma as they are.
    from orchestrator.data.loader import DigitsDataset
    from orchestrator.evaluation.reference import spread

    digits = DigitsDataset(32).images[spread(1797, 16)]
    pixels = np.clip(np.round((digits.numpy() + 1) * 127.5), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
    (inception_file,) = [p for p in reference_files if p.name.startswith("inception")]
    with np.load(inception_file) as cached_features:
        features = cached_features["features"].astype(np.float64)
    batch = tmp_path / "reference.npz"
    np.savez(batch, arr_0=pixels.repeat(3, axis=3), mu=features.mean(0) + 1.0, sigma=np.cov(features.T))
    # (on one thread, as the job: Inception on both cores of a machine that runs two test files at once is several
    # times slower; the offline evaluation above keeps the other thread count)
    one_thread = {**cache, "OMP_NUM_THREADS": "1"}
    adm = orch("eval", job.name, "--reference", str(batch), root=tmp_path / "runs", env=one_thread)
    assert adm.returncode == 0, adm.stderr
    figures = eval_records(job, "offline-step-")[2]["metrics"]
    assert figures["eval/kid"] == pytest.approx(metrics["eval/kid"], rel=1e-6)
    assert abs(figures["eval/fid"] - metrics["eval/fid"]) > 100


def test_an_evaluation_that_fails_is_recorded_and_training_goes_on(tmp_path, cache):
    diverging = {"learning_rate": 1e30, "grad_clip": None, "warmup_steps": 0, "steps": 4}
    spec = tiny_spec(tmp_path, train=diverging, ema={"decay": 0.0}, eval=EVAL)
    done = orch("submit", str(spec), root=tmp_path / "runs", env=cache)
    job = only_job(tmp_path / "runs")
    assert done.returncode == 0 and state(job)["step"] == 4, done.stderr + log_text(job)
    for record in eval_records(job).values():
        assert record["metrics"] == {} and "NaN" in record["error"]
    assert "failed" in log_text(job) and "training goes on" in log_text(job)
