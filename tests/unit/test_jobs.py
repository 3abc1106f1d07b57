"""The job directory: creation, state transitions, liveness, lookup."""

import subprocess
import sys
import time

import pytest

from orchestrator.jobs.directory import JobDir, JobError, JobState, find_job, latest_checkpoint, list_jobs


def make_job(root, name="t"):
    from orchestrator.jobs.directory import new_job_id

    return JobDir.create(root, new_job_id(name), name, "name: t\n", total_steps=10)


def test_new_job_has_spec_state_logs_and_checkpoint_folders(tmp_path):
    job = make_job(tmp_path)
    assert job.spec_file.read_text() == "name: t\n"
    assert job.read().state == JobState.QUEUED and job.read().total_steps == 10
    assert job.logs_dir.is_dir() and job.checkpoints_dir.is_dir()


def test_unwritable_root_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(JobError, match="cannot write the job root"):
        make_job(blocker / "runs")


def test_only_documented_transitions_are_allowed(tmp_path):
    job = make_job(tmp_path)
    job.transition(JobState.RUNNING)
    job.transition(JobState.PREEMPTED)
    job.transition(JobState.RUNNING)
    with pytest.raises(AssertionError, match="running -> queued"):
        job.transition(JobState.QUEUED)


def test_running_job_whose_supervisor_vanished_shows_as_failed(tmp_path):
    job = make_job(tmp_path)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import fcntl,time; f=open({str(job.path / 'run.lock')!r},'a'); fcntl.flock(f, fcntl.LOCK_EX); "
            "print('x', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
    )
    holder.stdout.readline()
    job.transition(JobState.RUNNING, supervisor_pid=holder.pid)
    assert job.status().state == JobState.RUNNING and job.is_locked()
    holder.kill()
    holder.wait()
    record = job.status()
    assert record.state == JobState.FAILED and "vanished" in record.message
    assert job.read().state == JobState.FAILED  # recorded, not only shown


def test_second_run_lock_is_refused_while_held(tmp_path):
    job = make_job(tmp_path)
    first = job.try_lock_run()
    assert first is not None
    assert job.try_lock_run() is None
    first.close()
    assert job.try_lock_run() is not None


def test_find_job_by_id_prefix_path_and_newest_unfinished(tmp_path):
    a = make_job(tmp_path, "alpha")
    time.sleep(0.01)
    b = make_job(tmp_path, "beta")
    b.transition(JobState.RUNNING)
    b.transition(JobState.SUCCEEDED)
    assert find_job(tmp_path, "alpha").id == a.id
    assert find_job(tmp_path, str(b.path)).id == b.id
    assert find_job(tmp_path, None).id == b.id
    assert find_job(tmp_path, None, unfinished=True).id == a.id
    assert [j.id for j in list_jobs(tmp_path)] == [a.id, b.id]
    with pytest.raises(JobError, match="no job 'gamma'"):
        find_job(tmp_path, "gamma")


def test_latest_checkpoint_skips_incomplete_directories(tmp_path):
    (tmp_path / "step-0000010").mkdir()
    (tmp_path / "step-0000010" / "trainer_state.json").write_text("{}")
    (tmp_path / "step-0000020.tmp").mkdir()  # a crash mid-write
    (tmp_path / "step-0000030").mkdir()  # no trainer state: not complete
    assert latest_checkpoint(tmp_path).name == "step-0000010"
    assert latest_checkpoint(tmp_path / "missing") is None
