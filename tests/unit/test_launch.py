"""launch/: generated commands against saved expected files, against the engines' own parsers, and run for real."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from launch import LaunchCommand
from launch.accelerate import accelerate_command
from launch.deepspeed import deepspeed_command, env_file_text, hostfile_text, parse_hostfile
from launch.local import local_command
from launch.torchrun import torchrun_command

EXPECTED_DIR = Path(__file__).parent / "launch_expected"
PYTHON = "/usr/bin/python3"
ENTRY = ("-m", "orchestrator.worker", "/jobs/j1")

# Set UPDATE_EXPECTED=1 to rewrite the expected files from the code (then review the diff).
CASES = {
    "local": lambda: local_command(PYTHON, ENTRY),
    "local_threads": lambda: local_command(PYTHON, ENTRY, threads=4),
    "torchrun_standalone": lambda: torchrun_command(PYTHON, ENTRY, nproc_per_node=2, threads=1),
    "torchrun_two_nodes": lambda: torchrun_command(
        PYTHON,
        ENTRY,
        nproc_per_node=4,
        nnodes=2,
        node_rank=1,
        rdzv_endpoint="node0.cluster:29400",
        rdzv_id="j1",
        max_restarts=3,
    ),
    "accelerate_cpu_one_process": lambda: accelerate_command(PYTHON, ENTRY, num_processes=1),
    "accelerate_cpu_two_processes": lambda: accelerate_command(PYTHON, ENTRY, num_processes=2, threads=1),
    "accelerate_cpu_two_machines": lambda: accelerate_command(
        PYTHON,
        ENTRY,
        num_processes=4,
        num_machines=2,
        machine_rank=1,
        main_process_ip="10.0.0.1",
        main_process_port=29500,
    ),
    "accelerate_gpu_eight_processes": lambda: accelerate_command(PYTHON, ENTRY, num_processes=8, cpu=False),
    "deepspeed_hostfile_over_ssh": lambda: deepspeed_command(
        PYTHON,
        ENTRY,
        hostfile="/jobs/j1/deepspeed/hostfile",
        env_file="/jobs/j1/deepspeed/env",
        master_addr="node0.cluster",
        master_port=29500,
        ssh_port=2222,
        threads=4,
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_command_matches_saved_expected_file(case):
    shell_line = CASES[case]().shell()
    expected_file = EXPECTED_DIR / f"{case}.txt"
    if os.environ.get("UPDATE_EXPECTED") == "1":
        expected_file.write_text(shell_line + "\n")
    assert shell_line == expected_file.read_text().strip(), f"{case}: regenerate with UPDATE_EXPECTED=1 if intended"


def test_shell_line_quotes_values_and_puts_env_first():
    cmd = LaunchCommand(argv=("python", "-c", "print('a b')"), env={"A": "x y"})
    assert cmd.shell() == "A='x y' python -c 'print('\"'\"'a b'\"'\"')'"


def test_launch_command_env_is_read_only():
    cmd = local_command(PYTHON, ENTRY, threads=2)
    with pytest.raises(TypeError):
        cmd.env["OMP_NUM_THREADS"] = "8"


def test_local_command_is_python_then_entry():
    cmd = local_command(PYTHON, ENTRY, threads=3)
    assert cmd.argv == (PYTHON, *ENTRY)
    assert dict(cmd.env) == {"OMP_NUM_THREADS": "3", "MKL_NUM_THREADS": "3"}


@pytest.mark.parametrize("case", ["torchrun_standalone", "torchrun_two_nodes"])
def test_torchrun_arguments_are_accepted_by_torchruns_own_parser(case):
    from torch.distributed.run import get_args_parser

    cmd = CASES[case]()
    assert cmd.argv[1:3] == ("-m", "torch.distributed.run")
    args = get_args_parser().parse_args(list(cmd.argv[3:]))
    assert args.module is True
    assert args.training_script == "orchestrator.worker"
    assert args.training_script_args == ["/jobs/j1"]
    if case == "torchrun_standalone":
        assert (args.standalone, args.nnodes, args.nproc_per_node) == (True, "1", "2")
    else:
        assert (args.standalone, args.nnodes, args.nproc_per_node, args.node_rank) == (False, "2", "4", 1)
        assert (args.rdzv_backend, args.rdzv_endpoint, args.rdzv_id) == ("c10d", "node0.cluster:29400", "j1")
        assert args.max_restarts == 3


@pytest.mark.parametrize("case", [name for name in sorted(CASES) if name.startswith("accelerate")])
def test_accelerate_arguments_are_accepted_by_accelerates_own_parser(case):
    from accelerate.commands.launch import launch_command_parser

    cmd = CASES[case]()
    assert cmd.argv[1:3] == ("-m", "accelerate.commands.launch")
    args = launch_command_parser().parse_args(list(cmd.argv[3:]))
    assert args.module is True
    assert args.training_script == "orchestrator.worker"
    assert args.training_script_args == ["/jobs/j1"]
    assert (args.mixed_precision, args.dynamo_backend) == ("no", "no")
    assert args.multi_gpu == (args.num_processes > 1)
    assert args.cpu == (args.num_processes == 1)  # --cpu with several processes would start only one
    assert ("ACCELERATE_USE_CPU" in cmd.env) == (case.startswith("accelerate_cpu") and args.num_processes > 1)
    if case == "accelerate_cpu_two_machines":
        assert (args.num_processes, args.num_machines, args.machine_rank) == (4, 2, 1)
        assert (args.main_process_ip, args.main_process_port) == ("10.0.0.1", 29500)


def test_deepspeed_arguments_are_accepted_by_deepspeeds_own_parser():
    from deepspeed.launcher.runner import parse_args

    cmd = CASES["deepspeed_hostfile_over_ssh"]()
    assert cmd.argv[1:4] == ("-u", "-m", "deepspeed.launcher.runner")
    args = parse_args(list(cmd.argv[4:]))
    assert (args.module, args.no_local_rank, args.user_script, args.user_args) == (
        True,
        True,
        "orchestrator.worker",
        ["/jobs/j1"],
    )
    assert (args.hostfile, args.master_addr, args.master_port, args.ssh_port) == (
        "/jobs/j1/deepspeed/hostfile",
        "node0.cluster",
        29500,
        2222,
    )
    assert cmd.env["DS_ENV_FILE"] == "/jobs/j1/deepspeed/env"


def test_hostfile_and_env_file_read_back_as_deepspeed_reads_them():
    from deepspeed.launcher.runner import _parse_hostfile

    text = hostfile_text(["node0", "node1"], slots=8)
    assert dict(_parse_hostfile(text.splitlines())) == {"node0": 8, "node1": 8} == parse_hostfile(text)
    assert parse_hostfile("# cluster A\nnode0 slots=4  # first\n\nnode1 slots=4\n") == {"node0": 4, "node1": 4}
    for bad, message in (
        ("node0\n", "line 1 should read"),
        ("node0 slots=2\nnode0 slots=2\n", "lists node0 again"),
        ("# none\n", "no host"),
    ):
        with pytest.raises(ValueError, match=message):
            parse_hostfile(bad)
    # no blank line: DeepSpeed cannot read one
    assert env_file_text({"OMP_NUM_THREADS": "4", "NOTE": "a b"}) == "OMP_NUM_THREADS=4\nNOTE=a b\n"
    with pytest.raises(ValueError):
        hostfile_text(["node 0"], slots=1)


@pytest.mark.parametrize(
    "make_command, message",
    [
        (lambda: local_command(PYTHON, ()), "entry command is empty"),
        (lambda: local_command(PYTHON, ENTRY, threads=0), "threads per process"),
        (lambda: torchrun_command(PYTHON, ("worker.py",), nproc_per_node=2), "must start with '-m MODULE'"),
        (lambda: torchrun_command(PYTHON, ENTRY, nproc_per_node=0), "nproc_per_node must be at least 1"),
        (lambda: torchrun_command(PYTHON, ENTRY, nproc_per_node=2, nnodes=2), "needs both rdzv_endpoint"),
        (lambda: torchrun_command(PYTHON, ENTRY, 2, nnodes=2, rdzv_endpoint="node0:29400"), "needs both"),
        (lambda: torchrun_command(PYTHON, ENTRY, 2, nnodes=2, rdzv_endpoint="node0", rdzv_id="j1"), "HOST:PORT"),
        (
            lambda: torchrun_command(PYTHON, ENTRY, 2, nnodes=2, node_rank=2, rdzv_endpoint="h:1", rdzv_id="j"),
            "node_rank",
        ),
        (lambda: torchrun_command(PYTHON, ENTRY, 2, max_restarts=-1), "max_restarts"),
        (lambda: accelerate_command(PYTHON, ("worker.py",), num_processes=2), "must start with '-m MODULE'"),
        (lambda: accelerate_command(PYTHON, ENTRY, num_processes=0), "num_processes must be at least 1"),
        (lambda: accelerate_command(PYTHON, ENTRY, num_processes=3, num_machines=2), "multiple of num_machines"),
        (lambda: accelerate_command(PYTHON, ENTRY, num_processes=4, num_machines=2), "needs main_process_ip"),
        (lambda: accelerate_command(PYTHON, ENTRY, 4, num_machines=2, machine_rank=2), "machine_rank"),
        (lambda: accelerate_command(PYTHON, ENTRY, 2, main_process_port=70000), "main_process_port"),
    ],
)
def test_impossible_launch_values_raise_value_error_naming_the_cause(make_command, message):
    with pytest.raises(ValueError, match=message):
        make_command()


TORCH_PROBE = """
import json, os, sys
import torch
import torch.distributed as dist

dist.init_process_group("gloo")
total = torch.ones(1)
dist.all_reduce(total)  # only completes if every rank joined the same group
report = {"RANK": os.environ["RANK"], "WORLD_SIZE": os.environ["WORLD_SIZE"],
          "group_size": dist.get_world_size(), "all_reduce_sum": total.item()}
with open(os.path.join(sys.argv[1], f"rank{dist.get_rank()}.json"), "w") as f:
    json.dump(report, f)
dist.destroy_process_group()
"""

ACCELERATE_PROBE = """
import json, os, sys
import torch
import torch.distributed as dist
from accelerate import Accelerator

accelerator = Accelerator(cpu=True)
total = torch.ones(1)
if dist.is_initialized():
    dist.all_reduce(total)  # only completes if every rank joined the same group
report = {"RANK": os.environ.get("RANK"), "WORLD_SIZE": os.environ.get("WORLD_SIZE"),
          "group_size": dist.get_world_size() if dist.is_initialized() else 1,
          "all_reduce_sum": total.item(), "distributed_type": str(accelerator.distributed_type)}
with open(os.path.join(sys.argv[1], f"rank{accelerator.process_index}.json"), "w") as f:
    json.dump(report, f)
accelerator.end_training()
"""


# Variables a parent launcher may have leaked into the test's environment; they would change the ranks' view.
LEAKY_DIST_VARS = {
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "ACCELERATE_USE_CPU",
}


def run_probe(tmp_path: Path, module: str, source: str, make_command) -> list[dict]:
    """Write the probe module into tmp_path, run the command built for it, and return each rank's report."""
    (tmp_path / f"{module}.py").write_text(source)
    reports_dir = tmp_path / "reports"
    reports_dir.mkdir()
    cmd = make_command(("-m", module, str(reports_dir)))
    env = {name: value for name, value in os.environ.items() if name not in LEAKY_DIST_VARS}
    env.update(cmd.env)
    env["PYTHONPATH"] = str(tmp_path)
    env["HF_HOME"] = str(tmp_path / "hf")  # no accelerate config file of the user's can change the launch
    result = subprocess.run(cmd.argv, check=False, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{cmd.shell()} failed:\n{result.stdout}\n{result.stderr}"
    reports = [json.loads(path.read_text()) for path in sorted(reports_dir.glob("rank*.json"))]
    assert len(reports) == 2, f"{cmd.shell()} started {len(reports)} rank(s), expected 2:\n{result.stderr}"
    return reports


@pytest.mark.slow
def test_torchrun_command_really_starts_two_ranks_that_see_each_other(tmp_path):
    reports = run_probe(
        tmp_path,
        "torch_probe",
        TORCH_PROBE,
        lambda entry: torchrun_command(sys.executable, entry, nproc_per_node=2, threads=1),
    )
    assert sorted(report["RANK"] for report in reports) == ["0", "1"]
    assert all(report["WORLD_SIZE"] == "2" and report["group_size"] == 2 for report in reports)
    assert all(report["all_reduce_sum"] == 2.0 for report in reports)


@pytest.mark.slow
def test_accelerate_command_really_starts_two_cpu_ranks_that_see_each_other(tmp_path):
    reports = run_probe(
        tmp_path,
        "accelerate_probe",
        ACCELERATE_PROBE,
        lambda entry: accelerate_command(sys.executable, entry, num_processes=2, threads=1),
    )
    assert sorted(report["RANK"] for report in reports) == ["0", "1"]
    assert all(report["group_size"] == 2 and report["all_reduce_sum"] == 2.0 for report in reports)
    assert all(report["distributed_type"] == "DistributedType.MULTI_CPU" for report in reports)
