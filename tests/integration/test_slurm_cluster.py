"""Scripts from launch/slurm.py on a real single-machine Slurm: logs, the time-limit warning, requeues, torchrun.

Three jobs are submitted together at the start (they mostly sleep, so they share the 2 cores) and
each test follows one of them:
- `probe`: a small Python step; the test requeues it with `scontrol requeue`, then sends TERM to its
  batch shell only (`scancel --batch`), which must pass it on to the step.
- `warned`: 1-minute time limit and `--signal=B:USR1@50`: the real warning from slurmctld (not a
  hand-sent signal) reaches the step, which stops, and the batch shell requeues the job itself.
- `torchrun`: the real torchrun command with 2 CPU ranks; USR1 sent to the batch shell with
  `scancel --batch --signal=USR1` (standing in for the warning) must reach both ranks, torchrun must
  survive it and wait for their (fake, 2-second) checkpoint, and the job must requeue itself.
Then a fresh cluster is started and stopped with a job running, to show that nothing outlives it.
"""

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.helpers import sbatch_from
from tests.slurm_cluster import SlurmCluster, started_cluster

pytestmark = pytest.mark.slow
WAIT_S = 90  # longest wait for any one event; a requeued job runs again after ~12 s here

STEP_PROBE = """
import json, os, signal, sys, time
report = sys.argv[1]
def write(line):
    with open(report, "a") as f:
        f.write(line + "\\n")
def stop(signum, frame):
    write(f"got {signal.Signals(signum).name}")
    sys.exit(75)
signal.signal(signal.SIGUSR1, stop)
signal.signal(signal.SIGTERM, stop)
write(json.dumps({name: os.environ.get(name) for name in
                  ("ORCH_SLURM_RESTART_COUNT", "SLURM_RESTART_COUNT", "SLURM_JOB_ID", "ORCH_RDZV_ENDPOINT")}))
time.sleep(600)
"""

TORCH_PROBE = """
import os, signal, sys, time
import torch
import torch.distributed as dist

path = os.path.join(sys.argv[1], f"rank{os.environ['RANK']}.txt")
def write(line):
    with open(path, "a") as f:
        f.write(line + "\\n")
def checkpoint_and_stop(signum, frame):
    signal.signal(signum, signal.SIG_IGN)  # torchrun passes the signal on too: one is enough
    write("got SIGUSR1")
    time.sleep(2)  # a checkpoint, which torchrun must wait for rather than die of the signal
    write("checkpoint done")
    os._exit(75)
signal.signal(signal.SIGUSR1, checkpoint_and_stop)
dist.init_process_group("gloo")
total = torch.ones(1)
dist.all_reduce(total)
write(f"restart={os.environ['ORCH_SLURM_RESTART_COUNT']} world={dist.get_world_size()} sum={total.item():.0f}")
time.sleep(600)
"""


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def wait_for_line(path: Path, wanted: str, timeout: float = WAIT_S, after: int = 0) -> float:
    """Wait until a line of `path` (past its first `after` lines) contains `wanted`; returns the seconds waited."""
    started = time.monotonic()
    SlurmCluster.wait_for(lambda: any(wanted in line for line in lines(path)[after:]), f"{wanted!r} in {path}", timeout)
    return time.monotonic() - started


@pytest.fixture(scope="module")
def cluster():
    """A private Slurm for this module (skips with the reason where none can start)."""
    yield from started_cluster()


@pytest.fixture(scope="module")
def jobs(cluster, tmp_path_factory):
    """The three jobs, written by sbatch_job and submitted at once; their folders and ids."""
    root = tmp_path_factory.mktemp("slurm_jobs")
    (root / "torch_probe.py").write_text(TORCH_PROBE)
    submitted = {}
    for name, values in {
        "probe": {
            "time_limit": 10,
            "step_command": (sys.executable, "-c", STEP_PROBE, str(root / "probe" / "report.txt")),
        },
        "warned": {
            "time_limit": 1,
            "signal_seconds": 50,
            "step_command": (sys.executable, "-c", STEP_PROBE, str(root / "warned" / "report.txt")),
        },
        "torchrun": {
            "time_limit": 10,
            "python": sys.executable,
            "entry": ("-m", "torch_probe", str(root / "torchrun")),
            "processes_per_node": 2,
            "cpus_per_task": 2,
            "threads": 1,
            "env": {"PYTHONPATH": str(root)},
        },
    }.items():
        folder = root / name
        (folder / "logs").mkdir(parents=True)  # Slurm does not create the log folder
        job = sbatch_from(
            job_name=f"orch_{name}",
            script_path=str(folder / "job.sbatch"),
            logs_dir=str(folder / "logs"),
            workdir=str(root),
            **{"cpus_per_task": 1, "signal_seconds": 30, **values},
        )
        (folder / "job.sbatch").write_text(job.script)
        assert job.argv[:2] == ("sbatch", "--parsable")
        submitted[name] = (folder, cluster.run(*job.argv).stdout.strip())
    return submitted


def test_job_runs_its_step_and_writes_its_log_into_the_logs_folder(cluster, jobs):
    folder, job_id = jobs["probe"]
    wait_for_line(folder / "report.txt", "ORCH_SLURM_RESTART_COUNT")
    first = json.loads(lines(folder / "report.txt")[0])
    assert first == {
        "ORCH_SLURM_RESTART_COUNT": "0",
        "SLURM_RESTART_COUNT": None,
        "SLURM_JOB_ID": job_id,
        "ORCH_RDZV_ENDPOINT": f"localhost:{20000 + int(job_id) % 10000}",
    }
    assert cluster.state(job_id) == "RUNNING"
    assert [path.name for path in (folder / "logs").iterdir()] == [f"slurm-{job_id}.out"]
    assert f"orch: Slurm job {job_id}, run 0, on localhost" in (folder / "logs" / f"slurm-{job_id}.out").read_text()


def test_scontrol_requeue_runs_the_job_again_with_restart_count_1(cluster, jobs):
    folder, job_id = jobs["probe"]
    wait_for_line(folder / "report.txt", "ORCH_SLURM_RESTART_COUNT")
    cluster.requeue(job_id)
    waited = wait_for_line(folder / "report.txt", '"ORCH_SLURM_RESTART_COUNT": "1"')
    print(f"requeued job ran again after {waited:.1f} s")
    report = lines(folder / "report.txt")
    assert report[1] == "got SIGTERM"  # the requeue stopped the first run with SIGTERM, as preemption does
    assert json.loads(report[2])["SLURM_RESTART_COUNT"] == "1"
    assert cluster.job(job_id)["Restarts"] == "1"
    log = (folder / "logs" / f"slurm-{job_id}.out").read_text()
    assert "run 0, on localhost" in log and "run 1, on localhost" in log  # --open-mode=append kept run 0


def test_term_sent_to_the_batch_shell_only_reaches_the_step(cluster, jobs):
    folder, job_id = jobs["probe"]
    wait_for_line(folder / "report.txt", '"ORCH_SLURM_RESTART_COUNT": "1"')
    seen = len(lines(folder / "report.txt"))
    cluster.cancel(job_id, signal_name="TERM", batch=True)  # Slurm alone would not pass it to the step
    wait_for_line(folder / "report.txt", "got SIGTERM", timeout=20, after=seen)
    job = SlurmCluster.wait_for(
        lambda: (job := cluster.job(job_id))["JobState"] != "RUNNING" and job, "the job to end", 30
    )
    assert (job["JobState"], job["ExitCode"]) == ("FAILED", "75:0")  # the step's own exit status


def test_time_limit_warning_reaches_the_step_and_the_job_requeues_itself(cluster, jobs):
    folder, job_id = jobs["warned"]
    waited = wait_for_line(folder / "report.txt", "got SIGUSR1")
    print(f"time-limit warning (limit 60 s, --signal=B:USR1@50) seen {waited:.1f} s into the test")
    wait_for_line(folder / "report.txt", '"ORCH_SLURM_RESTART_COUNT": "1"')
    log = (folder / "logs" / f"slurm-{job_id}.out").read_text()
    assert f"stopped on the time-limit warning (exit 75); requeueing job {job_id}" in log
    assert cluster.job(job_id)["Restarts"] == "1"
    cluster.cancel(job_id)


def test_usr1_reaches_every_torchrun_rank_which_checkpoints_before_the_job_requeues(cluster, jobs):
    folder, job_id = jobs["torchrun"]
    ranks = [folder / "rank0.txt", folder / "rank1.txt"]
    for path in ranks:
        wait_for_line(path, "restart=0")
    assert all(lines(path)[0] == "restart=0 world=2 sum=2" for path in ranks)
    cluster.cancel(job_id, signal_name="USR1", batch=True)  # what --signal=B:USR1@N sends
    for path in ranks:
        wait_for_line(path, "restart=1")
    log = (folder / "logs" / f"slurm-{job_id}.out").read_text()
    for path in ranks:
        assert lines(path) == [
            "restart=0 world=2 sum=2",
            "got SIGUSR1",
            "checkpoint done",
            "restart=1 world=2 sum=2",
        ], log
    # torchrun itself handled USR1 (PET_SIGNALS_TO_HANDLE) and waited for its ranks; without that it dies of
    # the signal ("task 0: User defined signal 1") and its ranks, orphaned, escape Slurm's process tracking.
    assert "closing signal SIGUSR1" in log and "User defined signal" not in log, log
    assert f"requeueing job {job_id}" in log
    cluster.cancel(job_id)


def test_stopping_the_cluster_leaves_no_daemon_or_job_process(cluster):
    # A second cluster (the module's one skips this test where Slurm cannot start), stopped mid-job.
    second = SlurmCluster(Path(tempfile.mkdtemp(prefix="orch-slurm-")))
    try:
        second.start()
        script = second.root / "sleep.sbatch"
        script.write_text(
            sbatch_from(
                job_name="orch_sleep", script_path=str(script), logs_dir=str(second.root), step_command=("sleep", "600")
            ).script
        )
        second.submit(script)
        second.wait_for(
            lambda: any("sleep 600" in command for _, command in second.leftover_processes()),
            "the job's step to run",
            30,
        )
        killed = second.stop()
    finally:
        second.stop()
        shutil.rmtree(second.root, ignore_errors=True)
    assert killed == []  # the orderly stop (cancel jobs, then the daemons) left nothing to kill
    assert second.leftover_processes() == []
