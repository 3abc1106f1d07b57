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
    page = f"{mlflow_server.uri}/#/experiments/{parent.info.experiment_id}/runs/{parent.info.run_id}"
    assert status["mlflow_parent_run_page"] == page + "?workflowType=machine_learning"  # model-training view
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


def test_side_by_side_trials_on_their_own_cores_survive_the_death_of_the_sweep_and_a_trial(tmp_path):
    """Two trials run side by side, each on its own share of the machine's cores. The sweep's process and one trial's
    processes are SIGKILLed together, as a dying node would; `orch sweep resume` follows the other trial, resumes the
    killed one from its newest checkpoint on its own share, and the sweep finishes."""
    import os
    import signal

    from tests.helpers import kill_job_processes, log_text

    spec = sweep_spec(
        tmp_path,
        train={"steps": 300},
        checkpoint={"every": 40, "keep": 1},
        resources={"processes": 1, "threads_per_process": None},  # threads follow the share
    )
    root = tmp_path / "runs"
    started = orch(
        "sweep", str(spec), "--grid", "train.learning_rate=1e-3,2e-3", "--max-parallel", "2", "--name", "k", "--detach",
        root=root,
    )  # fmt: skip
    assert started.returncode == 0, started.stderr
    first, second = root / "k-t000", root / "k-t001"
    wait_for(
        lambda: (first / "state.json").is_file() and (state(first).get("checkpoint_step") or 0) >= 40,
        timeout=120,
        what="trial 0's first checkpoint",
    )
    assert (second / "state.json").is_file() and state(second)["state"] in ("queued", "running")  # side by side
    cores = sorted(os.sched_getaffinity(0))
    shares = [json.loads((job / "plan.json").read_text())["cpus"] for job in (first, second)]
    if len(cores) >= 2:  # disjoint halves of the cores, one thread per core each
        half = len(cores) // 2
        assert shares == [cores[:half], cores[half : 2 * half]], shares
        assert json.loads((first / "plan.json").read_text())["threads_per_process"] == half
    sweep_state = json.loads((root / "sweeps" / "k" / "state.json").read_text())
    os.kill(sweep_state["pid"], signal.SIGKILL)
    kill_job_processes(first)
    killed_at = state(first)["checkpoint_step"]
    supervisor = state(first)["supervisor_pid"]
    wait_for(
        lambda: not any(Path(f"/proc/{pid}").exists() for pid in (sweep_state["pid"], supervisor)),
        timeout=30,
        what="the killed processes to be gone",
    )

    vanished = json.loads(cli("sweep", "status", "k", "--json", root=root).output)
    assert vanished["state"] == "failed" and "orch sweep resume k" in vanished["message"], vanished
    resumed = orch("sweep", "resume", "k", root=root)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "k-t000): was failed; resuming it" in resumed.stdout, resumed.stdout
    assert "k-t001): running; following it" in resumed.stdout or "k-t001): succeeded; following it" in resumed.stdout
    assert "2 completed, 0 failed, 0 pruned of 2" in resumed.stdout, resumed.stdout

    record = state(first)
    assert record["state"] == "succeeded" and record["step"] == 300 and record["attempts"] == 2, record
    text = log_text(first)
    assert f"resumed from step-{killed_at:07d}" in text
    if shares[0]:  # the resumed run is on the same share of the machine
        core_list = ",".join(map(str, shares[0]))
        assert text.count(f"this job's share of the machine: CPU core(s) {core_list}") == 2, text[-3000:]
    status = json.loads(cli("sweep", "status", "k", "--json", root=root).output)
    assert status["state"] == "finished" and [row["job"] for row in status["trials"]] == ["k-t000", "k-t001"]
    assert [row["state"] for row in status["trials"]] == ["complete", "complete"]
    assert status["trials"][0]["objective"] == pytest.approx(record["loss"])


def test_the_median_pruner_stops_a_trial_whose_logged_loss_trails_the_earlier_trials(tmp_path):
    """Trial 0 learns (lr 3e-3); trial 1 barely moves (lr 1e-7) on the same batches and noise, so past the warm-up its
    logged loss is above trial 0's at the same step: Optuna's MedianPruner stops it, its job checkpoints (cancelled,
    resumable), and the sweep records it pruned."""
    spec = sweep_spec(tmp_path, train={"steps": 400}, checkpoint={"every": 1000, "keep": 1})
    sweep_file = tmp_path / "prune.yaml"
    sweep_file.write_text(
        f"kind: sweep\nname: p\nspec: {spec.name}\nspace:\n  train.learning_rate: {{grid: [1.0e-7, 3.0e-3]}}\n"
        "objective: {metric: loss}\npruner: median\npruner_warmup_steps: 20\n"
    )
    root = tmp_path / "runs"
    result = orch("sweep", str(sweep_file), root=root)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "trial 0 (p-t000): train.learning_rate=0.003: started" in result.stdout  # GridSampler's order (seed 0)
    assert "1 completed, 0 failed, 1 pruned of 2" in result.stdout, result.stdout

    status = json.loads(cli("sweep", "status", "p", "--json", root=root).output)
    assert [row["state"] for row in status["trials"]] == ["complete", "pruned"]
    pruned = root / "p-t001"
    record = state(pruned)
    assert record["state"] == "cancelled" and record["checkpoint_step"] == record["step"] < 400, record
    pruned_at = int(result.stdout.split("p-t001): pruned at step ")[1].split()[0])
    assert 20 <= pruned_at < 400 and pruned_at % 2 == 0  # past the warm-up, at a logged step (log_every 2)
    # what the pruner compared: both trials' losses at that step, as their jobs logged them
    losses = {
        job: dict(json.loads(line).values() for line in (root / job / "logs" / "loss.jsonl").read_text().splitlines())
        for job in ("p-t000", "p-t001")
    }
    assert losses["p-t001"][pruned_at] > losses["p-t000"][pruned_at]


def test_a_joined_process_draws_trials_of_the_same_study_and_its_trials_are_taken_over_when_it_dies(tmp_path):
    """`orch sweep join` runs trials of a running sweep beside the sweep's own process (as on a second node: same
    study, same job root); no more trials start than the sweep has. SIGKILLed with its trial's processes, the joined
    process's trial is taken over by the sweep's own process, which resumes it from its checkpoint."""
    import os
    import signal
    import socket

    from tests.helpers import kill_job_processes, log_text, start_orch

    spec = sweep_spec(tmp_path, train={"steps": 300}, checkpoint={"every": 40, "keep": 1})
    root = tmp_path / "runs"
    grid = "train.learning_rate=1e-3,2e-3,3e-3,4e-3"
    started = orch("sweep", str(spec), "--grid", grid, "--name", "j", "--detach", root=root)
    assert started.returncode == 0, started.stderr
    wait_for(lambda: (root / "j-t000" / "state.json").is_file(), timeout=60, what="the sweep's first trial")
    joined = start_orch("sweep", "join", "j", root=root)
    joined_worker = f"{socket.gethostname()}-{joined.pid}"

    def joined_trial() -> Path | None:
        """The job of the first trial the joined process started, once it has checkpointed."""
        rows = json.loads(cli("sweep", "status", "j", "--json", root=root).output)["trials"]
        jobs = [root / row["job"] for row in rows if row["worker"] == joined_worker]
        if jobs and (jobs[0] / "state.json").is_file() and (state(jobs[0]).get("checkpoint_step") or 0) >= 40:
            return jobs[0]
        return None

    second = wait_for(joined_trial, timeout=120, interval=0.5, what="the joined process's trial to checkpoint")
    os.killpg(joined.pid, signal.SIGKILL)
    kill_job_processes(second)
    joined.wait(timeout=30)
    killed_at = state(second)["checkpoint_step"]

    def sweep_state() -> str:
        return json.loads(cli("sweep", "status", "j", "--json", root=root).output)["state"]

    wait_for(lambda: sweep_state() != "running", timeout=300, what="the sweep to end")
    status = json.loads(cli("sweep", "status", "j", "--json", root=root).output)
    assert status["state"] == "finished", status
    assert [row["state"] for row in status["trials"]] == ["complete"] * 4, status["trials"]
    workers = {row["job"]: row["worker"] for row in status["trials"]}
    sweep_worker = f"{socket.gethostname()}-{json.loads((root / 'sweeps' / 'j' / 'state.json').read_text())['pid']}"
    assert workers["j-t000"] == sweep_worker and workers[second.name] == joined_worker
    assert sorted(p.name for p in jobs_under(root)) == ["j-t000", "j-t001", "j-t002", "j-t003"]  # no fifth trial
    sweep_log = (root / "sweeps" / "j" / "sweep.log").read_text()
    assert f"({second.name}): was failed; resuming it" in sweep_log, sweep_log
    record = state(second)
    assert record["state"] == "succeeded" and record["step"] == 300 and record["attempts"] == 2, record
    assert f"resumed from step-{killed_at:07d}" in log_text(second)
    late = cli("sweep", "join", "j", root=root)  # nothing left to draw: one message, nothing started
    assert late.exit_code == 2 and "sweep j is finished, not running" in late.stderr, late.stderr
