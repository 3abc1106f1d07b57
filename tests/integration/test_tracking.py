"""MlflowTracker against a real MLflow server: what is logged reads back, resumes append, outages never block
training."""

import logging
import threading
import time

import pytest
from mlflow import MlflowClient
from PIL import Image

from orchestrator import tracking
from orchestrator.specs.job import spec_from_dict
from orchestrator.tracking import (
    MlflowTracker,
    NullTracker,
    Tracker,
    TrackingError,
    check_tracking_reachable,
    default_artifact_location,
    default_tracking_uri,
    resolve_tracking_uri,
)
from orchestrator.train.run_tracking import SystemMetrics
from tests.mlflow_server import free_port


def wait_for(condition, timeout: float, what: str):
    """Poll `condition` every 0.2 s until it returns something truthy; fail naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


def metric_steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    """The steps at which metric `key` was recorded in the run, in order."""
    return sorted(metric.step for metric in client.get_metric_history(run_id, key))


def test_params_tags_metrics_and_images_read_back_through_mlflow_client(mlflow_server):
    tracker = MlflowTracker.start(mlflow_server.uri, "readback", "run-1", tags={"orch.job_id": "j1"})
    many_params = {f"p{index:03d}": index for index in range(250)}  # more than one log_batch may carry
    tracker.log_params({**many_params, "long": "x" * 7000, "lr": 3e-4})
    tracker.set_tags({"orch.spec_hash": "abc123"})
    for step in (10, 20, 30):
        tracker.log_metrics({"loss": 1.0 / step, "lr": 3e-4}, step=step)
    tracker.log_image(Image.new("RGB", (16, 16), "red"), key="samples", step=10)
    tracker.log_text("model: dit\n", "spec.yaml")
    tracker.close(timeout=20)
    assert tracker.dropped == 0

    client = MlflowClient(mlflow_server.uri)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "run-1"
    assert run.data.params["p249"] == "249" and len(run.data.params) == 252
    assert run.data.params["lr"] == "0.0003"
    assert run.data.params["long"] == "x" * tracking.MAX_PARAM_VAL_LENGTH
    assert run.data.tags["orch.job_id"] == "j1" and run.data.tags["orch.spec_hash"] == "abc123"
    history = client.get_metric_history(tracker.run_id, "loss")
    assert [(metric.step, metric.value) for metric in history] == [(10, 0.1), (20, 0.05), (30, 1 / 30)]
    assert [item.path for item in client.list_artifacts(tracker.run_id, "samples")] == ["samples/step_0000010.png"]
    card_files = [item.path for item in client.list_artifacts(tracker.run_id, "images")]
    assert any(path.startswith("images/samples+step+10+") and path.endswith(".png") for path in card_files)
    assert "spec.yaml" in [item.path for item in client.list_artifacts(tracker.run_id)]


def test_resumed_run_keeps_appending_to_the_same_run(mlflow_server, caplog):
    first = MlflowTracker.start(mlflow_server.uri, "resume", "job-j2")
    first.log_params({"lr": 1e-3})
    first.log_metrics({"loss": 1.0}, step=1)
    first.log_metrics({"loss": 0.9}, step=2)
    first.close(status="KILLED", timeout=20)

    resumed = MlflowTracker.start(
        mlflow_server.uri, "resume", "job-j2", run_id=first.run_id, tags={"orch.resumes": "1"}
    )
    client = MlflowClient(mlflow_server.uri)
    assert client.get_run(first.run_id).info.status == "RUNNING"
    resumed.log_params({"lr": 1e-3})  # the same value again is accepted
    resumed.log_params({"lr": 2e-3})  # a changed value is refused by MLflow: dropped at once, not retried
    resumed.log_metrics({"loss": 0.8}, step=3)
    started = time.monotonic()
    resumed.close(timeout=20)

    assert time.monotonic() - started < 5
    assert resumed.run_id == first.run_id and resumed.dropped == 1
    assert "MLflow refused it" in caplog.text
    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["orch.resumes"] == "1"
    assert metric_steps(client, first.run_id, "loss") == [1, 2, 3]
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_logging_never_blocks_while_the_server_is_down_and_catches_up_after(mlflow_server, caplog):
    caplog.set_level(logging.INFO, logger=tracking.__name__)
    survivor = MlflowTracker.start(mlflow_server.uri, "outage", "survivor")  # default retry_for: 120 s
    quitter = MlflowTracker.start(mlflow_server.uri, "outage", "quitter", queue_size=3)  # closed during the outage
    forgetter = MlflowTracker.start(mlflow_server.uri, "outage", "forgetter", retry_for=1.0)  # gives up after 1 s
    trackers = (survivor, quitter, forgetter)
    survivor.log_metrics({"loss": 1.0}, step=1)
    client = MlflowClient(mlflow_server.uri)
    wait_for(lambda: metric_steps(client, survivor.run_id, "loss") == [1], 10, "step 1 before the outage")
    # MLflow's system-metrics monitor of a job's node, sampling every 0.5 s into its own run
    watched = MlflowTracker.start(mlflow_server.uri, "outage", "watched")
    system = SystemMetrics.start(
        spec_from_dict({"name": "w", "train": {"steps": 1}, "tracking": {"system_metrics_every_s": 0.5}}),
        mlflow_server.uri,
        watched.run_id,
        0,
        False,
    )
    cpu = "system/node0/cpu_utilization_percentage"
    wait_for(lambda: metric_steps(client, watched.run_id, cpu), 15, "system metrics before the outage")

    mlflow_server.stop()
    try:
        # MLflow's monitor stops for good at the first request the server does not answer; no new one starts yet
        wait_for(lambda: not system.monitor._process.is_alive(), 15, "the system-metrics monitor to stop")
        time.sleep(0.6)  # past revive()'s once-a-sampling-interval guard
        assert not system.revive()
        call_seconds = []
        for step in range(2, 7):
            for tracker in trackers:
                started = time.monotonic()
                tracker.log_metrics({"loss": 1.0 / step}, step=step)
                tracker.log_image(Image.new("L", (8, 8)), key="samples", step=step)
                call_seconds.append(time.monotonic() - started)
        assert max(call_seconds) < 0.1, f"log calls blocked during the outage: {call_seconds}"
        wait_for(lambda: caplog.text.count("is unreachable") == 3, 10, "one unreachable warning per tracker")
        assert "queue of 3 unsent items is full" in caplog.text

        # All 15 items the forgetter queued during the outage are given up once it has lasted over 1 s.
        wait_for(lambda: forgetter.dropped == 15, 10, "the forgetter giving up its outage items")

        started = time.monotonic()
        quitter.close(timeout=2)  # its items are still being retried: close gives up on time
        assert time.monotonic() - started < 2.5
        assert quitter.dropped >= 15  # what overflowed its 3-item queue, and what close() had no time to send

        # A finished job closes the survivor while the server is away: it waits out the outage past its timeout.
        closing = threading.Thread(target=survivor.close, kwargs={"timeout": 2, "outlast_outage": True})
        closing.start()
        closing.join(timeout=4)
        assert closing.is_alive(), "close(outlast_outage=True) gave up while the outage was shorter than retry_for"
        assert "still unreachable; waiting up to" in caplog.text
    finally:
        if not mlflow_server.running:
            mlflow_server.start()

    # The survivor's retries (RETRY_FOR_S = 120 s) outlast the restart (6-12 s here): nothing it logged is lost.
    closing.join(timeout=60)
    assert not closing.is_alive(), "the survivor's close() did not return once the server was back"
    assert metric_steps(client, survivor.run_id, "loss") == [1, 2, 3, 4, 5, 6]
    forgetter.log_metrics({"loss": 0.1}, step=7)  # after giving up, what is logged once the server is back is sent
    forgetter.close(timeout=20)
    assert survivor.dropped == 0 and forgetter.dropped == 15
    assert caplog.text.count("is reachable again") == 2
    assert client.get_run(survivor.run_id).info.status == "FINISHED"
    assert client.get_run(quitter.run_id).info.status == "RUNNING"  # it could not say FINISHED: the server was down
    assert metric_steps(client, forgetter.run_id, "loss") == [7]
    # the system metrics go on in a new monitor once the server answers, their steps after the last ones logged
    before = max(metric_steps(client, watched.run_id, cpu))
    wait_for(system.revive, 15, "a new system-metrics monitor")
    wait_for(lambda: max(metric_steps(client, watched.run_id, cpu)) > before, 15, "system metrics after the outage")
    steps = metric_steps(client, watched.run_id, cpu)
    assert steps == sorted(set(steps)), steps  # no step logged twice
    system.close()
    watched.close(timeout=20)
    sample_files = [item.path for item in client.list_artifacts(survivor.run_id, "samples")]
    assert sample_files == [f"samples/step_{step:07d}.png" for step in range(2, 7)]


def test_start_raises_tracking_error_for_a_dead_server():
    with pytest.raises(TrackingError, match="could not create MLflow run"):
        MlflowTracker.start(f"http://127.0.0.1:{free_port()}", "nowhere", "run")


def test_local_sqlite_store_keeps_artifacts_under_the_root_not_the_working_directory(tmp_path, monkeypatch):
    root = tmp_path / "orch-root"
    uri = default_tracking_uri(root)
    assert uri == f"sqlite:///{root.resolve()}/mlflow.db"
    root.mkdir()
    monkeypatch.chdir(tmp_path)
    tracker = MlflowTracker.start(uri, "local", "run", artifact_location=default_artifact_location(root))
    tracker.log_text("hello", "notes/hello.txt")
    tracker.close(timeout=20)
    assert (root / "mlartifacts").is_dir()
    assert list((root / "mlartifacts").rglob("hello.txt"))
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "mlartifacts").exists()


def test_check_tracking_reachable_names_the_uri_and_the_fix(mlflow_server, tmp_path):
    assert check_tracking_reachable(mlflow_server.uri) is None
    dead = f"http://127.0.0.1:{free_port()}"
    reason = check_tracking_reachable(dead, timeout=2)
    assert reason is not None and dead in reason and "start it" in reason
    assert check_tracking_reachable(default_tracking_uri(tmp_path / "new" / "folder")) is None
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    unwritable = f"sqlite:///{blocker}/sub/mlflow.db"
    reason = check_tracking_reachable(unwritable)
    assert reason is not None and unwritable in reason and "is a file" in reason
    assert check_tracking_reachable("postgresql://db/mlflow") is None


def test_tracking_uri_resolution_prefers_spec_then_environment_then_default(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(None, tmp_path) == default_tracking_uri(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    assert resolve_tracking_uri(None, tmp_path) == "http://env:5000"
    assert resolve_tracking_uri("http://spec:5000", tmp_path) == "http://spec:5000"
    assert default_artifact_location(tmp_path) == (tmp_path.resolve() / "mlartifacts").as_uri()


def test_null_tracker_and_mlflow_tracker_share_the_tracker_interface():
    null: Tracker = NullTracker()
    null.log_metrics({"loss": 1.0}, step=1)
    null.close()
    assert null.run_id is None
    interface = [name for name in vars(Tracker) if not name.startswith("_")]
    assert all(callable(getattr(MlflowTracker, name)) for name in interface if name != "run_id")


def test_hard_coded_limits_match_the_installed_mlflow():
    from mlflow.utils import validation

    assert tracking.MAX_PARAMS_TAGS_PER_BATCH == validation.MAX_PARAMS_TAGS_PER_BATCH
    assert tracking.MAX_METRICS_PER_BATCH == validation.MAX_METRICS_PER_BATCH
    assert tracking.MAX_PARAM_VAL_LENGTH == validation.MAX_PARAM_VAL_LENGTH
    assert tracking.MAX_TAG_VAL_LENGTH == validation.MAX_TAG_VAL_LENGTH
