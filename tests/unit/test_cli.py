"""The command line: fast paths stay light, user errors are one line with exit code 2."""

import json

import pytest

from orchestrator.jobs.directory import JobDir, JobState, new_job_id
from tests.helpers import heavy_modules_loaded, orch


@pytest.fixture
def root_with_a_job(tmp_path):
    job = JobDir.create(tmp_path, new_job_id("demo"), "demo", "name: demo\n", total_steps=10)
    job.transition(JobState.RUNNING)
    job.update(
        step=10,
        loss=0.25,
        checkpoint=str(job.checkpoints_dir / "step-0000010"),
        checkpoint_step=10,
        mlflow_run_id="abc",
    )
    job.transition(JobState.SUCCEEDED, message="finished 10 steps")
    return tmp_path, job


@pytest.mark.parametrize("command", [["--help"], ["list"], ["status"], ["list", "--json"], ["status", "--json"]])
def test_fast_commands_import_no_torch_mlflow_or_pydantic(root_with_a_job, command):
    root, _ = root_with_a_job
    args = ["--root", str(root), *command] if command != ["--help"] else command
    assert heavy_modules_loaded(args) == []


@pytest.mark.parametrize("command", ["sample", "export"])
def test_a_mistyped_job_for_sample_or_export_is_answered_before_torch_loads(tmp_path, command):
    args = ["--root", str(tmp_path), command, "no-such-job", "--out", str(tmp_path / "out")]
    assert not {"torch", "diffusers"} & set(heavy_modules_loaded(args))
    result = orch(*args[2:], root=tmp_path)
    assert result.returncode == 2 and result.stderr.startswith("orch: error: no job 'no-such-job'")


def test_status_json_gives_the_facts_scripts_need(root_with_a_job):
    root, job = root_with_a_job
    facts = json.loads(orch("status", job.id, "--json", root=root, check=True).stdout)
    assert facts["id"] == job.id and facts["state"] == "succeeded" and facts["dir"] == str(job.path)
    assert facts["step"] == 10 and facts["checkpoint"].endswith("step-0000010") and facts["mlflow_run_id"] == "abc"
    human = orch("status", job.id, root=root, check=True).stdout
    assert "succeeded" in human and "step-0000010" in human


@pytest.mark.parametrize(
    "args, message",
    [
        (["status", "nope"], "no job 'nope'"),
        (["validate", "/does/not/exist.yaml"], "cannot read spec"),
        (["logs", "nope"], "no job 'nope'"),
        (["resume"], "no unfinished job"),
    ],
)
def test_user_errors_are_one_line_exit_2_without_traceback(tmp_path, args, message):
    result = orch(*args, root=tmp_path / "empty")
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert result.stderr.startswith("orch: error:")


def test_schema_prints_json_schema(tmp_path):
    schema = json.loads(orch("schema", root=tmp_path, check=True).stdout)
    assert schema["title"] == "orch job spec" and "train" in schema["properties"]
