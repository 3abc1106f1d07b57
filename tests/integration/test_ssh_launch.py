"""launcher: deepspeed, ssh-style multi-node: DeepSpeed's runner starts both "nodes" (`localhost` and
`127.0.0.1`, one rank each) through pdsh over a private sshd on loopback; they train as one job, stop
together on a signal with a checkpoint, and `orch resume` continues bitwise exactly."""

import os
import signal
from pathlib import Path

import pytest

from tests.helpers import (
    assert_bitwise_equal,
    final_weights,
    log_text,
    only_job,
    orch,
    start_orch,
    state,
    tiny_spec,
    wait_for,
)
from tests.ssh_server import HOSTS, started_ssh_server

pytestmark = pytest.mark.slow
STEPS = 60


@pytest.fixture(scope="module")
def sshd():
    yield from started_ssh_server()


def ssh_spec(tmp_path: Path, port: int) -> Path:
    return tiny_spec(
        tmp_path,
        "sshjob",
        train={"steps": STEPS, "global_batch_size": 32, "seed": 11},
        checkpoint={"every": 100000},
        sample={"every": 100000},
        resources={
            "launcher": "deepspeed",
            "hosts": list(HOSTS),
            "ssh_port": port,
            "processes": 1,
            "threads_per_process": 1,
        },
    )


def worker_processes(job: Path) -> list[int]:
    """Processes still running a rank of this job (on this machine: both "nodes")."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            command = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if b"orchestrator.worker" in command and str(job).encode() in command:
            found.append(int(entry.name))
    return found


def test_two_hosts_over_ssh_train_as_one_job_stop_together_and_resume_exactly(tmp_path, sshd):
    spec = ssh_spec(tmp_path, sshd.port)
    plan = orch("plan", str(spec), root=tmp_path / "plan", env=sshd.env)
    assert plan.returncode == 0, plan.stderr
    assert "world size      2 (1 process(es) x 2 node(s))" in plan.stdout
    assert "deepspeed.launcher.runner" in plan.stdout and f"--ssh_port {sshd.port}" in plan.stdout
    assert "node 1          127.0.0.1: 1 rank(s), started over ssh" in plan.stdout

    reference_root = tmp_path / "reference"
    done = orch("submit", str(spec), root=reference_root, env=sshd.env, timeout=600)
    reference = only_job(reference_root)
    assert done.returncode == 0, done.stderr + log_text(reference)
    record = state(reference)
    assert record["state"] == "succeeded" and record["world_size"] == 2 and record["step"] == STEPS
    log = log_text(reference)
    assert "127.0.0.1: " in log and "localhost: " in log, "pdsh prefixes each host's output: both were started over ssh"
    assert "127.0.0.1 slots=1" in (reference / "deepspeed" / "hostfile").read_text()
    assert "OMP_NUM_THREADS=1" in (reference / "deepspeed" / "env").read_text()
    assert not worker_processes(reference)

    # SIGTERM to `orch submit` (what a scheduler or a terminal sends): the ranks on both hosts checkpoint and stop.
    root = tmp_path / "stopped"
    foreground = start_orch("submit", str(spec), root=root, env=sshd.env)
    job = wait_for(lambda: next(iter(root.glob("sshjob-*/state.json")), None), timeout=60, what="the job").parent
    wait_for(lambda: state(job)["step"] >= 5, timeout=180, what="both hosts to train")
    foreground.send_signal(signal.SIGTERM)
    out, err = foreground.communicate(timeout=180)
    record = state(job)
    assert record["state"] == "preempted" and record["step"] < STEPS, (record, err, log_text(job)[-3000:])
    assert record["checkpoint_step"] == record["step"]
    wait_for(lambda: not worker_processes(job), timeout=60, what="every rank on both hosts to exit")

    resumed = orch("resume", job.name, root=root, env=sshd.env, timeout=600)
    assert resumed.returncode == 0, resumed.stderr + log_text(job)
    assert state(job)["state"] == "succeeded"
    model, ema = final_weights(job)
    reference_model, reference_ema = final_weights(reference)
    assert_bitwise_equal(model, reference_model)
    assert_bitwise_equal(ema, reference_ema)

    joined = orch("join", job.name, "--node-rank", "1", root=root)
    assert joined.returncode == 2 and "nothing to join" in joined.stderr


def test_ssh_launch_problems_are_refused_with_the_fix(tmp_path):
    spec = tiny_spec(tmp_path, resources={"launcher": "deepspeed", "nodes": 2, "processes": 1})
    refused = orch("plan", str(spec), root=tmp_path / "jobs")
    assert refused.returncode == 2 and "needs their names: resources.hosts" in refused.stderr
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=8\nnode1 slots=8\nnode2 slots=8\n")
    spec = tiny_spec(
        tmp_path,
        resources={"launcher": "deepspeed", "hostfile": str(hostfile), "nodes": 2, "processes": 1},
        train={"steps": 6, "global_batch_size": 32},
    )
    planned = orch("plan", str(spec), root=tmp_path / "jobs", env={"PATH": os.path.dirname(os.__file__)})
    assert "lists 3 host(s) with [8] slot(s) but the spec has nodes 2 x processes 1" in planned.stdout
    assert "pdsh is not on the PATH" in planned.stdout
    spec = tiny_spec(tmp_path, resources={"launcher": "torchrun", "hosts": ["a", "b"], "rdzv_endpoint": "a:29400"})
    assert "configure launcher: deepspeed" in orch("plan", str(spec), root=tmp_path / "jobs").stderr
