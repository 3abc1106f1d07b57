"""Two "nodes" on one machine: `orch submit` runs node 0, `orch join --node-rank 1` a separate launch of
node 1; their ranks meet through torchrun's c10d rendezvous on 127.0.0.1 and train as one job."""

import json

import pytest
from mlflow import MlflowClient

from tests.helpers import log_text, only_job, orch, state, tiny_spec, wait_for
from tests.mlflow_server import free_port

pytestmark = pytest.mark.slow


def test_two_separate_launches_train_together_log_one_run_and_checkpoint_once(tmp_path):
    root = tmp_path / "runs"
    endpoint = f"127.0.0.1:{free_port()}"
    spec = tiny_spec(
        tmp_path,
        "twonode",
        train={"steps": 4},
        checkpoint={"every": 2},
        tracking={"enabled": True, "log_every": 1},
        resources={"processes": 1, "nodes": 2, "rdzv_endpoint": endpoint},
    )
    plan = orch("plan", str(spec), root=root)
    assert plan.returncode == 0, plan.stderr
    assert "2 (1 process(es) x 2 node(s))" in plan.stdout and "orch join JOB --node-rank 1 runs it" in plan.stdout
    assert plan.stdout.count(f"--rdzv_endpoint {endpoint}") == 2

    assert orch("submit", str(spec), "--detach", root=root).returncode == 0
    job = only_job(root)
    joined = orch("join", job.name, "--node-rank", "1", root=root, timeout=240)
    assert joined.returncode == 0, joined.stdout + joined.stderr + (job / "logs" / "node-1.log").read_text()
    wait_for(lambda: state(job)["state"] != "running", timeout=60, what="node 0 to finish")
    record = state(job)
    assert record["state"] == "succeeded" and record["world_size"] == 2, record["message"] + log_text(job)

    checkpoints = sorted(p.name for p in (job / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert checkpoints == ["step-0000002", "step-0000004"]  # once per step, not once per node
    trainer_state = json.loads((job / "checkpoints" / "step-0000004" / "trainer_state.json").read_text())
    assert trainer_state["world_size"] == 2

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    (experiment,) = [e for e in client.search_experiments() if e.name == "orch"] or client.search_experiments()[:1]
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1 and runs[0].data.tags["orch.world_size"] == "2"
    run_id = runs[0].info.run_id
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [1, 2, 3, 4]
    # Each node's own figures, gathered from its ranks by rank 0: memory and the time it waited for data.
    for step in (1, 2, 3, 4):
        node_memory = [
            next(m.value for m in client.get_metric_history(run_id, f"node{n}/peak_memory_gb") if m.step == step)
            for n in (0, 1)
        ]
        assert all(0.05 < memory < 20 for memory in node_memory), node_memory  # a CPU rank's peak resident set, in GB
        overall = next(m.value for m in client.get_metric_history(run_id, "peak_memory_gb") if m.step == step)
        assert overall == max(node_memory)
    assert len(client.get_metric_history(run_id, "node1/data_wait_s")) == 4 and not client.get_metric_history(
        run_id, "node2/data_wait_s"
    )


def test_a_multi_node_spec_without_a_meeting_point_is_refused(tmp_path):
    spec = tiny_spec(tmp_path, "nomeet", resources={"processes": 1, "nodes": 2})
    result = orch("validate", str(spec), root=tmp_path / "runs")
    assert result.returncode == 2 and "2 nodes need resources.rdzv_endpoint: HOST:PORT of node 0" in result.stderr
    joined = orch("join", "nosuchjob", "--node-rank", "1", root=tmp_path / "runs")
    assert joined.returncode == 2 and "Traceback" not in joined.stderr
