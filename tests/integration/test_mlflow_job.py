"""A job against a real MLflow server on 127.0.0.1: one run per job across resumes, grids by step,
and training that goes on while the server is away."""

import json
import os
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
    run_id = state(job)["mlflow_run_id"]
    assert run_id and f"MLflow run {run_id}" in first.stdout

    resumed = orch("resume", job.name, "--set", "train.steps=6", "--allow-spec-change", root=root)
    assert resumed.returncode == 0, resumed.stderr + log_text(job)
    assert state(job)["mlflow_run_id"] == run_id  # the same run, appended to

    client = MlflowClient(mlflow_server.uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == job.name
    assert client.get_experiment(run.info.experiment_id).name == "orch-tests"
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


def test_default_store_is_local_next_to_the_jobs_and_orch_ui_serves_it(tmp_path):
    root = tmp_path / "runs"
    spec = tiny_spec(tmp_path, train={"steps": 2}, tracking={"enabled": True, "log_every": 1})
    result = orch("submit", str(spec), root=root, env={"MLFLOW_TRACKING_URI": ""})
    job = only_job(root)
    assert result.returncode == 0, log_text(job)
    assert (root / "mlflow.db").is_file()
    run_id = state(job)["mlflow_run_id"]
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    assert client.get_metric_history(run_id, "loss")
    assert client.get_run(run_id).info.artifact_uri.startswith(f"file://{root.resolve() / 'mlartifacts'}")
    assert any((root / "mlartifacts").rglob("step_0000002.png"))

    port = free_port()
    ui = subprocess.Popen(
        [ORCH, "--root", str(root), "ui", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_for(lambda: answers_health(f"http://127.0.0.1:{port}"), timeout=90, interval=0.5, what="orch ui to answer")
        with urllib.request.urlopen(
            f"http://127.0.0.1:{port}/api/2.0/mlflow/runs/get?run_id={run_id}", timeout=10
        ) as answer:
            assert json.loads(answer.read())["run"]["info"]["run_id"] == run_id
    finally:
        os.killpg(ui.pid, signal.SIGTERM)
        ui.wait(timeout=30)
