"""In-loop evaluation (the `eval` section) through `orch submit`: every rank draws its share, rank 0 writes the
figures, and a job with evaluation trains bit for bit as the same job without it."""

import json

import pytest

from tests.helpers import assert_bitwise_equal, final_weights, log_text, only_job, orch, tiny_spec

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
        assert record["eval/fd_digits"] > 0 and 0 <= record["eval/digit_accuracy"] <= 1
        assert record["eval/seconds"] > 0
    assert "evaluation of step 4: eval/fd_digits" in log_text(job)
    assert not (only_job(tmp_path / "without") / "eval").exists()

    model, ema = final_weights(job)
    plain_model, plain_ema = final_weights(only_job(tmp_path / "without"))
    assert_bitwise_equal(model, plain_model)
    assert_bitwise_equal(ema, plain_ema)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["eval.every=2", "data.source=image_folder", "data.path=/nonexistent"], "read digits"),
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
