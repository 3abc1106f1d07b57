"""A job against a real MLflow server on 127.0.0.1: one run per job across resumes, grids by step,
and training that goes on while the server is away."""

import json
import logging
import os
import shutil
import signal
import subprocess
import urllib.request

import pytest
from mlflow import MlflowClient
from PIL import Image

from tests.helpers import ORCH, log_text, only_job, orch, state, tiny_spec, wait_for
from tests.mlflow_server import answers_health, free_port

pytestmark = pytest.mark.slow


def artifact_paths(client: MlflowClient, run_id: str, folder: str | None = None) -> set[str]:
    paths = set()
    for item in client.list_artifacts(run_id, folder):
        paths |= artifact_paths(client, run_id, item.path) if item.is_dir else {item.path}
    return paths


def test_job_logs_one_run_with_params_metrics_and_grids_and_resume_appends(tmp_path, mlflow_server):
    root = tmp_path / "runs"
    spec = tiny_spec(
        tmp_path,
        train={"steps": 4},
        checkpoint={"every": 2},
        sample={"every": 2},
        tracking={"enabled": True, "uri": mlflow_server.uri, "experiment": "orch-tests", "log_every": 1},
    )
    # sample.progression: the x0 strip with every grid, 4 of the 5 sampler steps (not square: rows vs columns show)
    first = orch("submit", str(spec), "--set", "sample.progression=4", root=root)
    job = only_job(root)
    assert first.returncode == 0, first.stderr + log_text(job)
    run_id, experiment_id = state(job)["mlflow_run_id"], state(job)["mlflow_experiment_id"]
    # the printed link opens the run in MLflow 3's model-training view (a bare link opens the GenAI one)
    page = f"{mlflow_server.uri}/#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"
    assert run_id and f"MLflow run {page}" in first.stdout, first.stdout
    assert json.loads(orch("status", job.name, "--json", root=root).stdout)["mlflow_run_page"] == page

    resumed = orch("resume", job.name, "--set", "train.steps=6", "--allow-spec-change", root=root)
    assert resumed.returncode == 0, resumed.stderr + log_text(job)
    assert state(job)["mlflow_run_id"] == run_id  # the same run, appended to

    client = MlflowClient(mlflow_server.uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == job.name
    assert (
        client.get_experiment(run.info.experiment_id).name == "orch-tests" and run.info.experiment_id == experiment_id
    )
    assert run.data.params["train.learning_rate"] == "0.001" and run.data.params["model.depth"] == "2"
    tags = run.data.tags
    assert tags["orch.job_id"] == job.name and tags["orch.launcher"] == "local" and tags["orch.world_size"] == "1"
    assert tags["orch.attempt"] == "2" and len(tags["orch.git_commit"]) >= 7 and tags["orch.host"]
    for metric in (
        "loss",
        "lr",
        "grad_norm",
        "samples_per_sec",
        "samples_per_sec_per_node",
        "step_time_s",
        "peak_memory_gb",
    ):
        assert [m.step for m in client.get_metric_history(run_id, metric)] == [1, 2, 3, 4, 5, 6], metric
    assert len(runs := client.search_runs([run.info.experiment_id])) == 1, runs

    artifacts = artifact_paths(client, run_id)
    assert {"samples/step_0000002.png", "samples/step_0000004.png", "samples/step_0000006.png"} <= artifacts
    strips = {f"progression/step_000000{step}.png" for step in (2, 4, 6)}
    assert strips <= artifacts  # with every grid, the resumed attempt's included
    strip = Image.open(client.download_artifacts(run_id, "progression/step_0000002.png", str(tmp_path)))
    # 3 grid rows (classes 0, 1, 2) x 4 steps of 8-px digits, 1-px gaps, upscaled x14 to reach 512 px
    assert strip.size == (14 * (4 * 9 + 1), 14 * (3 * 9 + 1)) and strip.mode == "L"
    assert "spec.yaml" in artifacts and any(p.startswith("spec.attempt-2") for p in artifacts)
    assert any(p.startswith("images/") for p in artifacts)  # the step-slider image card


def test_training_goes_on_while_the_tracking_server_is_away_and_the_run_waits_for_it(tmp_path, mlflow_server):
    root = tmp_path / "runs"
    spec = tiny_spec(
        tmp_path,
        train={"steps": 60},
        checkpoint={"every": 20},
        sample={"every": 1000},
        tracking={"enabled": True, "uri": mlflow_server.uri, "log_every": 1},
    )
    # Slow the steps a little so the outage begins mid-run: a bigger batch.
    assert orch("submit", str(spec), "--set", "train.global_batch_size=512", "--detach", root=root).returncode == 0
    job = only_job(root)
    wait_for(lambda: state(job)["step"] >= 3, timeout=120, what="training to start")
    mlflow_server.stop()
    # Training goes on to the end; the finished job then waits for the server (an outage under retry_for).
    wait_for(
        lambda: "still unreachable; waiting up to" in log_text(job),
        timeout=180,
        what="training to end during the outage",
    )
    record = state(job)
    assert record["step"] == 60 and record["checkpoint_step"] == 60 and record["state"] == "running", record
    mlflow_server.start()
    wait_for(lambda: state(job)["state"] not in ("queued", "running"), timeout=240, what="the job to end")
    record = state(job)
    assert record["state"] == "succeeded", log_text(job)
    log = log_text(job)
    assert "is unreachable" in log and "is reachable again" in log and "never sent" not in log, log[-3000:]
    client = MlflowClient(mlflow_server.uri)
    assert {m.step for m in client.get_metric_history(record["mlflow_run_id"], "loss")} == set(range(1, 61)), (
        "metrics logged in the outage were lost"
    )
    assert client.get_run(record["mlflow_run_id"]).info.status == "FINISHED"


def test_unreachable_tracking_server_is_refused_at_submit(tmp_path):
    root = tmp_path / "runs"
    spec = tiny_spec(tmp_path, tracking={"enabled": True, "uri": f"http://127.0.0.1:{free_port()}"})
    result = orch("submit", str(spec), root=root)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "127.0.0.1" in result.stderr and "tracking.enabled: false" in result.stderr
    assert not root.exists() or not any(root.iterdir())


@pytest.fixture(scope="module")
def default_store_job(tmp_path_factory):
    """A 2-step job tracked to the default store (SQLite by the jobs), its model logged and registered at its end."""
    tmp_path = tmp_path_factory.mktemp("default-store")
    root = tmp_path / "runs"
    tracking = {"enabled": True, "log_every": 1, "register_as": "tiny-digits"}
    spec = tiny_spec(tmp_path, train={"steps": 2}, tracking=tracking)
    result = orch("submit", str(spec), root=root, env={"MLFLOW_TRACKING_URI": ""})
    job = only_job(root)
    assert result.returncode == 0, log_text(job)
    return root, job


def test_default_store_is_local_next_to_the_jobs_and_orch_ui_serves_it(default_store_job):
    root, job = default_store_job
    assert (root / "mlflow.db").is_file()
    run_id = state(job)["mlflow_run_id"]
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    assert client.get_metric_history(run_id, "loss")
    assert client.get_run(run_id).info.artifact_uri.startswith(f"file://{root.resolve() / 'mlartifacts'}")
    assert any((root / "mlartifacts").rglob("step_0000002.png"))

    port = free_port()
    printed = root.parent / "orch-ui.out"
    with open(printed, "wb") as out:
        ui = subprocess.Popen(
            [ORCH, "--root", str(root), "ui", "--port", str(port)],
            stdout=out,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
    try:
        wait_for(lambda: answers_health(f"http://127.0.0.1:{port}"), timeout=90, interval=0.5, what="orch ui to answer")
        experiment_id = client.get_run(run_id).info.experiment_id
        page = f"http://127.0.0.1:{port}/#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"
        assert f"newest run ({job.name}): {page}" in printed.read_text()
        with urllib.request.urlopen(
            f"http://127.0.0.1:{port}/api/2.0/mlflow/runs/get?run_id={run_id}", timeout=10
        ) as answer:
            assert json.loads(answer.read())["run"]["info"]["run_id"] == run_id
    finally:
        os.killpg(ui.pid, signal.SIGTERM)
        ui.wait(timeout=30)


def test_a_finished_job_logs_its_ema_model_whose_predict_draws_what_orch_sample_draws(default_store_job, monkeypatch):
    import mlflow
    import numpy as np
    import pandas as pd

    from orchestrator.components.images import to_uint8
    from orchestrator.trained import sampling

    root, job = default_store_job
    uri, run_id = f"sqlite:///{root / 'mlflow.db'}", state(job)["mlflow_run_id"]
    assert "trained model step-0000002 logged to MLflow run" in log_text(job)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    logged = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
    images = logged.predict(pd.DataFrame({"class": [3, 5], "seed": 11, "steps": 4}))
    assert images.shape == (2, 8, 8, 1) and images.dtype == np.uint8

    spec, checkpoint = sampling.resolve_checkpoint(job.name, root)
    model = sampling.load_model(spec, checkpoint, device="cpu")
    drawn = to_uint8(sampling.sample_images(model, spec, [3, 5], steps=4, seed=11))  # as `orch sample` draws them
    assert np.array_equal(images, drawn)
    repeated = logged.predict({"class": [5], "n": [2], "seed": [11], "steps": [4]})  # `--class 5 --num 2`
    assert np.array_equal(repeated, to_uint8(sampling.sample_images(model, spec, [5, 5], steps=4, seed=11)))
    with pytest.raises(mlflow.exceptions.MlflowException, match="out of range: this model has classes 0..9"):
        logged.predict(pd.DataFrame({"class": [10]}))

    version = MlflowClient(uri).get_model_version("tiny-digits", "1")  # tracking.register_as
    assert version.run_id == run_id and version.status == "READY"


def test_orch_export_to_mlflow_registers_a_version_that_draws_like_the_run_model(default_store_job, monkeypatch):
    import mlflow
    import numpy as np

    root, job = default_store_job
    uri, run_id = f"sqlite:///{root / 'mlflow.db'}", state(job)["mlflow_run_id"]
    result = orch("export", job.name, "--to-mlflow", "--register-as", "tiny-exported", root=root)
    assert result.returncode == 0, result.stderr
    assert f"to MLflow run {run_id}" in result.stdout and "registered as tiny-exported version 1" in result.stdout
    version = MlflowClient(uri).get_model_version("tiny-exported", "1")
    assert version.run_id == run_id and version.status == "READY"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    rows = {"class": [0, 7], "seed": [3, 3], "steps": [2, 2]}
    exported = mlflow.pyfunc.load_model("models:/tiny-exported/1").predict(rows)
    at_the_end = mlflow.pyfunc.load_model("models:/tiny-digits/1").predict(rows)
    assert np.array_equal(exported, at_the_end)


def test_orch_export_to_mlflow_with_the_server_away_is_exit_2(default_store_job, tmp_path):
    root, job = default_store_job
    checkpoint = tmp_path / "step-0000002"  # outside its job: logged to MLFLOW_TRACKING_URI's server, in a new run
    shutil.copytree(job / "checkpoints" / "step-0000002", checkpoint)
    away = f"http://127.0.0.1:{free_port()}"
    result = orch("export", str(checkpoint), "--to-mlflow", root=root, env={"MLFLOW_TRACKING_URI": away})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"MLflow tracking server {away} is not reachable" in result.stderr and "not logged" in result.stderr


def test_a_model_that_cannot_be_logged_is_a_warning_never_a_failed_job(default_store_job, caplog):
    import yaml

    from orchestrator.jobs.directory import JobDir
    from orchestrator.specs.job import spec_from_dict
    from orchestrator.train.run_tracking import log_trained_model

    root, job = default_store_job
    spec = spec_from_dict(yaml.safe_load((job / "spec.yaml").read_text()))
    # a name the registry refuses (the spec check is bypassed): the model is logged, its registration fails
    refused = spec.model_copy(update={"tracking": spec.tracking.model_copy(update={"register_as": "a:b"})})

    class Tracker:
        uri, run_id, reachable = f"sqlite:///{root / 'mlflow.db'}", state(job)["mlflow_run_id"], True

    away = Tracker()
    away.reachable = False  # close() waited for the server in vain: not tried again
    with caplog.at_level(logging.WARNING):
        log_trained_model(spec, JobDir(job), away, step=2)
        log_trained_model(refused, JobDir(job), Tracker(), step=2)
    warnings = [r.getMessage() for r in caplog.records if "trained model was not logged" in r.getMessage()]
    assert len(warnings) == 2 and all(f"orch export {job.name} --to-mlflow" in w for w in warnings), warnings
    assert "unreachable" in warnings[0] and "a:b" in warnings[1]
    assert "MLFLOW_TRACKING_URI" not in os.environ and "MLFLOW_EXPERIMENT_ID" not in os.environ  # left as they were
