"""The plan of a `launcher: slurm` job made on a login node without a GPU: device, GPUs, CPUs, memory and
threads come from the spec and the allocation, never from the host that submits (orchestrator/jobs/plan.py,
orchestrator/worker.py)."""

from pathlib import Path

import pytest

from orchestrator.jobs import plan as plan_module
from orchestrator.jobs.plan import gpu_visible, make_plan
from orchestrator.specs.job import SpecError, parse_spec

JOB = Path("/runs/dit_slurm-1")
SPEC = """\
name: dit_slurm
data: {source: digits, resolution: 8, num_workers: 4}
train: {steps: 10, global_batch_size: 256}
tracking: {enabled: false}
resources: {launcher: slurm, nodes: 4, gpus_per_node: 8, device: cuda}
"""


@pytest.fixture
def login_node(monkeypatch):
    """This host as a GPU-less Slurm login node, whatever the machine running the tests has."""
    monkeypatch.setattr(plan_module, "gpu_visible", lambda *args: False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")


def plan_of(overrides=(), text=SPEC):
    return make_plan(
        parse_spec(text, overrides=list(overrides)), JOB, Path("/runs"), python="/opt/venvs/orch/bin/python"
    )


def own_problems(plan) -> list[str]:
    """The plan's problems other than sbatch missing from this test machine's PATH."""
    return [p for p in plan.problems if "needs sbatch on the PATH" not in p]


def test_slurm_cuda_job_planned_on_a_gpu_less_login_node_asks_the_nodes_for_gpus_and_cpus(login_node):
    plan = plan_of()
    assert own_problems(plan) == []  # no "no NVIDIA GPU is visible here": the GPUs are on the compute nodes
    script = plan.sbatch_script
    assert plan.device == "cuda" and "#SBATCH --gpus-per-node=8\n" in script
    assert "#SBATCH --cpus-per-task=48\n" in script  # 8 ranks x (4 loader workers + 2)
    assert "srun --nodes=4 --ntasks-per-node=1 --cpus-per-task=48 --kill-on-bad-exit=1" in script
    assert "orch_threads=$(( ${SLURM_CPUS_PER_TASK:-$(nproc)} / 8 ))" in script
    assert 'export OMP_NUM_THREADS="$orch_threads" MKL_NUM_THREADS="$orch_threads"' in script
    assert "export OMP_NUM_THREADS=1" not in script  # not this login node's cores / 8
    assert plan.threads_per_process is None  # the worker computes it on the node
    assert "--mem" not in script  # the partition's default unless resources.slurm.mem is set
    lines = plan.describe()
    assert lines[0] == "launcher        slurm on cuda, strategy ddp"
    assert "threads         6 per process on the compute node (the allocation's 48 CPUs per node / 8 rank(s))" in lines


def test_slurm_auto_device_stays_auto_and_is_resolved_by_the_worker_on_the_node(login_node):
    import torch

    from orchestrator.worker import resolve_device

    plan = plan_of(["resources.device=auto"])
    assert own_problems(plan) == [] and plan.device == "auto"
    assert "#SBATCH --gpus-per-node=8\n" in plan.sbatch_script  # gpus_per_node set: asked for; the node decides
    assert plan.describe()[0] == "launcher        slurm on auto (resolved on the compute node), strategy ddp"
    assert "TF32 on a GPU node, fp32 on a CPU node" in plan.compute
    assert resolve_device(plan.device) == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == "cpu" and resolve_device("cuda") == "cuda"  # a decided device is kept

    cpu_ranks = plan_of(text=SPEC.replace("gpus_per_node: 8, device: cuda", "processes: 2"))
    # no gpus_per_node: none asked for
    assert cpu_ranks.device == "auto" and "--gpus-per-node" not in cpu_ranks.sbatch_script
    assert "#SBATCH --cpus-per-task=12\n" in cpu_ranks.sbatch_script


def test_slurm_cpu_device_asks_for_no_gpu(login_node):
    plan = plan_of(text=SPEC.replace("gpus_per_node: 8, device: cuda", "processes: 4, device: cpu"))
    assert own_problems(plan) == [] and plan.device == "cpu" and "--gpus-per-node" not in plan.sbatch_script


def test_fp16_is_left_to_the_node_for_device_auto_and_refused_for_device_cpu(login_node):
    assert own_problems(plan_of(["resources.device=auto", "train.mixed_precision=fp16"])) == []
    cpu = plan_of(
        ["train.mixed_precision=fp16"], text=SPEC.replace("gpus_per_node: 8, device: cuda", "processes: 2, device: cpu")
    )
    assert any("fp16 needs a GPU" in p for p in cpu.problems)


def test_the_worker_refuses_fp16_when_auto_finds_no_gpu_on_its_node(monkeypatch):
    from orchestrator import worker
    from orchestrator.jobs.directory import EXIT_USER_ERROR

    monkeypatch.setattr(worker, "resolve_device", lambda planned: "cpu")  # a node whose allocation has no GPU
    spec = parse_spec(SPEC, overrides=["resources.device=auto", "train.mixed_precision=fp16"])
    assert worker._train(None, spec, {"device": "auto", "tracking_uri": None}, rank=1) == EXIT_USER_ERROR


def test_explicit_cpus_threads_and_memory_are_kept(login_node):
    plan = plan_of(["resources.slurm.cpus_per_task=96", "resources.threads_per_process=3", "resources.slurm.mem=480G"])
    script = plan.sbatch_script
    assert "#SBATCH --cpus-per-task=96\n" in script and "--cpus-per-task=96 --kill-on-bad-exit=1" in script
    assert "#SBATCH --mem=480G\n" in script
    assert plan.threads_per_process == 3 and "export OMP_NUM_THREADS=3\n" in script and "orch_threads" not in script


@pytest.mark.parametrize("value, read", [("256G", "256G"), ("64000", "64000"), ("0", "0"), ("512m", "512m")])
def test_slurm_memory_takes_slurms_sizes(value, read):
    assert parse_spec(SPEC, overrides=[f"resources.slurm.mem={value}"]).resources.slurm.mem == read


@pytest.mark.parametrize("value", ["256GB", "1.5G", "lots", "-1"])
def test_slurm_memory_in_another_format_is_refused(value):
    with pytest.raises(SpecError, match="is not a Slurm memory size"):
        parse_spec(SPEC, overrides=[f"resources.slurm.mem={value}"])


def test_threads_per_rank_come_from_the_allocation_unless_planned(monkeypatch):
    import os

    from orchestrator.worker import threads_per_rank

    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "48")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert threads_per_rank(None) == 6 and threads_per_rank(3) == 3
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "4")
    assert threads_per_rank(None) == 1
    monkeypatch.delenv("SLURM_CPUS_PER_TASK")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert threads_per_rank(None) == len(os.sched_getaffinity(0))


def test_gpu_visible_reads_proc_device_nodes_and_wsl(tmp_path, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev" / "nvidiactl").touch()
    (tmp_path / "dev" / "nvidia-uvm").touch()
    assert not gpu_visible(tmp_path)  # the driver's control nodes are not a GPU
    (tmp_path / "dev" / "nvidia0").touch()
    assert gpu_visible(tmp_path)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    assert not gpu_visible(tmp_path)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert not gpu_visible(tmp_path)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")

    wsl = tmp_path / "wsl"
    (wsl / "dev").mkdir(parents=True)
    (wsl / "dev" / "dxg").touch()
    assert gpu_visible(wsl)

    proc = tmp_path / "proc_only"
    (proc / "proc" / "driver" / "nvidia" / "gpus" / "0000:01:00.0").mkdir(parents=True)
    assert gpu_visible(proc)
    assert not gpu_visible(tmp_path / "empty")


def test_a_local_job_with_more_ranks_than_this_node_has_gpus_is_refused_at_plan(tmp_path, monkeypatch):
    from orchestrator.jobs.plan import visible_gpu_count

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    for bus in ("0000:01:00.0", "0000:02:00.0"):
        (tmp_path / "proc" / "driver" / "nvidia" / "gpus" / bus).mkdir(parents=True)
    assert visible_gpu_count(tmp_path) == 2
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert visible_gpu_count(tmp_path) == 1
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert visible_gpu_count(tmp_path / "no-gpu") == 0

    monkeypatch.setattr(plan_module, "gpu_visible", lambda *args: True)
    monkeypatch.setattr(plan_module, "visible_gpu_count", lambda: 2)
    local = (
        "name: four\ndata: {source: digits, resolution: 8}\n"
        "train: {steps: 10, global_batch_size: 64}\ntracking: {enabled: false}\n"
    )
    problems = plan_of(["resources.gpus_per_node=4", "resources.launcher=torchrun"], text=local).problems
    assert any("4 ranks per node, one per GPU, but this node shows 2 GPU(s)" in p for p in problems), problems
    assert not any(
        "GPU" in p for p in plan_of(["resources.gpus_per_node=2", "resources.launcher=torchrun"], text=local).problems
    )
