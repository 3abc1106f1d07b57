"""`orch sweep`: trials are ordinary jobs, child runs of the sweep's MLflow run; bad sweeps start nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.helpers import orch, state, tiny_spec, wait_for

pytestmark = pytest.mark.slow


def sweep_spec(tmp_path: Path, uri: str | None = None, **sections) -> Path:
    """The tiny job with one grid at the end (no periodic grids), tracking to `uri` if given."""
    tracking = {
        "enabled": uri is not None,
        "log_every": 2,
        **({"uri": uri, "experiment": "orch-sweeps"} if uri else {}),
    }
    return tiny_spec(
        tmp_path,
        name="swept",
        description="a tiny DiT swept over its learning rate",
        sample={"every": 1000},
        tracking=tracking,
        **sections,
    )


def cli(*args: str, root: Path):
    """The CLI in this process (a sweep's checks and `status` start no job: no interpreter start-up to pay)."""
    from click.testing import CliRunner

    from orchestrator.cli import cli as orch_cli

    return CliRunner().invoke(orch_cli, ["--root", str(root), *args], catch_exceptions=False)


def jobs_under(root: Path) -> list[Path]:
    return [p for p in root.iterdir() if (p / "state.json").is_file()] if root.exists() else []


def test_sweep_runs_trials_as_child_runs_and_records_the_best_and_a_failed_trial(tmp_path, mlflow_server):
    spec = sweep_spec(tmp_path, mlflow_server.uri)
    root = tmp_path / "runs"
    # lr 1e30 makes the loss non-finite at once; max_nonfinite_steps 1 fails that trial's job on its first such step
    result = orch(
        "sweep",
        str(spec),
        "--grid",
        "train.learning_rate=1e-3,1e30",
        "--set",
        "train.max_nonfinite_steps=1",
        "--name",
        "lr",
        root=root,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 trial(s), grid, minimize loss" in result.stdout
    assert "1 completed, 1 failed" in result.stdout, result.stdout
    trial_jobs = sorted(jobs_under(root))
    assert [p.name for p in trial_jobs] == ["lr-t000", "lr-t001"]  # ordinary jobs beside the others

    status = json.loads(cli("sweep", "status", "lr", "--json", root=root).output)
    assert status["state"] == "finished" and len(status["trials"]) == 2
    by_lr = {row["overrides"][0]: row for row in status["trials"]}
    assert by_lr["train.learning_rate=1e+30"]["state"] == "fail"
    assert "loss not finite" in by_lr["train.learning_rate=1e+30"]["error"]
    good = [row for row in status["trials"] if row["state"] == "complete"]
    best = min(good, key=lambda row: row["objective"])
    assert best["best"] and sum(row["best"] for row in status["trials"]) == 1
    assert best["objective"] == pytest.approx(state(root / best["job"])["loss"])
    table = cli("sweep", "status", "lr", root=root).output
    assert "lr-t001" in table and "*" in table and "finished" in table

    client = MlflowClient(mlflow_server.uri)
    parent = client.get_run(status["mlflow_parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.info.run_name == "lr"
    assert parent.data.params["sweep.method"] == "grid"
    assert parent.data.params["space.train.learning_rate"] == "grid(0.001, 1e+30)"
    assert parent.data.tags["orch.best_job"] == best["job"]
    assert parent.data.tags["orch.best_run_id"] == best["mlflow_run_id"]
    assert parent.data.metrics["best/loss"] == pytest.approx(best["objective"])
    assert "a tiny DiT swept" in parent.data.tags["mlflow.note.content"]
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    assert sorted(run.info.run_name for run in children) == ["lr-t000", "lr-t001"]
    statuses = {run.data.params["train.learning_rate"]: run.info.status for run in children}
    assert statuses == {"0.001": "FINISHED", "1e+30": "FAILED"}
    assert all(run.data.tags["orch.sweep"] == "lr" for run in children)
    # the run page reads well: a description, only the fields that apply, opened as model training
    child = children[0]
    assert child.data.tags["mlflow.note.content"].startswith("a tiny DiT swept over its learning rate")
    assert child.data.tags["orch.job_dir"] == str(root / child.info.run_name)
    assert child.data.tags["orch.checkpoint"].startswith(str(root / child.info.run_name / "checkpoints"))
    assert not [key for key in child.data.params if key.startswith(("model.unet.", "resources.slurm.", "eval.num"))]
    assert child.data.params["model.hidden_size"] == "32"
    finished = next(run for run in children if run.info.status == "FINISHED")
    assert "system/node0/cpu_utilization_percentage" in finished.data.metrics  # the System metrics tab
    experiment = client.get_experiment(parent.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"

    again = cli("sweep", str(spec), "--grid", "train.learning_rate=1e-3", "--name", "lr", root=root)
    assert again.exit_code == 2 and "already exists" in again.stderr, again.stderr


def test_sweep_cancel_stops_the_running_trial_with_a_checkpoint_and_starts_no_more(tmp_path):
    spec = sweep_spec(tmp_path, train={"steps": 400}, checkpoint={"every": 1000, "keep": 1})
    root = tmp_path / "runs"
    started = orch("sweep", str(spec), "--grid", "train.learning_rate=1e-3,2e-3", "--name", "c", "--detach", root=root)
    assert started.returncode == 0, started.stderr
    first = root / "c-t000"
    wait_for(lambda: (first / "state.json").is_file() and state(first)["step"] > 0, timeout=120, what="trial 0 steps")
    cancelled = orch("sweep", "cancel", "c", root=root, check=True)
    assert "cancelled" in cancelled.stdout, cancelled.stdout
    record = state(first)
    assert record["state"] == "cancelled" and record["checkpoint_step"] == record["step"] < 400  # resumable
    assert not (root / "c-t001").exists()
    status = json.loads(cli("sweep", "status", "c", "--json", root=root).output)
    assert status["state"] == "cancelled"
    assert [row["state"] for row in status["trials"]] == ["fail"]
    assert "cancelled with the sweep" in status["trials"][0]["error"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--grid", "train.lerning_rate=1e-3,1e-4"], "train.lerning_rate: unknown key; did you mean 'learning_rate'?"),
        (["--grid", "train.steps=4,many"], "train.steps: input should be a valid integer"),
        (["--grid", "train.learning_rate="], "the values are empty"),
        (["--grid", "train.learning_rate=1e-3", "--objective", "eval/fid"], "the job never evaluates"),
        (["--grid", "train.learning_rate=1e-3", "--storage", "nosuchdb://x"], "cannot be opened"),
        (["--loguniform", "train.learning_rate=1e-4,1e-2"], "method grid tries every combination"),
        ([], "the search space is empty"),
    ],
)
def test_bad_sweeps_are_refused_with_one_message_and_start_nothing(tmp_path, args, message):
    spec = sweep_spec(tmp_path)
    root = tmp_path / "runs"
    result = cli("sweep", str(spec), "--name", "bad", *args, root=root)
    assert result.exit_code == 2, result.output + result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert not jobs_under(root) and not (root / "sweeps" / "bad").exists()
