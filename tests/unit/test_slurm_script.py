"""launch/slurm.py: generated sbatch scripts against saved expected files, bash's parser, and fake Slurm commands."""

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch.slurm import time_limit_seconds
from tests.helpers import sbatch_from

EXPECTED_DIR = Path(__file__).parent / "launch_expected"
ENTRY = ("-m", "orchestrator.worker", "/runs/dit_cats-1")
REQUIRED = {
    "job_name": "dit_cats",
    "script_path": "/runs/dit_cats-1/slurm/job.sbatch",
    "logs_dir": "/runs/dit_cats-1/logs",
}

# Set UPDATE_EXPECTED=1 to rewrite the expected files from the code (then review the diff).
CASES = {
    "slurm_two_nodes_eight_gpus": lambda: sbatch_from(
        **REQUIRED,
        python="python",
        entry=ENTRY,
        nodes=2,
        gpus_per_node=8,
        cpus_per_task=64,
        mem="256G",
        partition="gpu",
        account="proj42",
        qos="normal",
        constraint="a100&ib",
        time_limit="1-00:00:00",
        signal_seconds=300,
        sbatch_extra=["--exclusive", "--mail-type=END,FAIL"],
        setup=["module load cuda/12.4", "source /opt/venvs/orch/bin/activate"],
        env={"NCCL_DEBUG": "WARN"},
        workdir="/runs/dit_cats-1",
    ),
    "slurm_one_node_cpu": lambda: sbatch_from(
        **REQUIRED,
        python="/opt/venvs/orch/bin/python",
        entry=ENTRY,
        processes_per_node=2,
        cpus_per_task=2,
        threads=1,
        time_limit=30,
        signal_seconds=60,
        rdzv_port=29400,
        requeue=False,
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_sbatch_script_matches_saved_expected_file(case):
    script = CASES[case]().script
    expected_file = EXPECTED_DIR / f"{case}.txt"
    if os.environ.get("UPDATE_EXPECTED") == "1":
        expected_file.write_text(script)
    assert script == expected_file.read_text(), f"{case}: regenerate with UPDATE_EXPECTED=1 if intended"


@pytest.mark.parametrize("case", sorted(CASES))
def test_bash_parses_the_generated_script(case, tmp_path):
    path = tmp_path / "job.sbatch"
    path.write_text(CASES[case]().script)
    result = subprocess.run(["bash", "-n", str(path)], check=False, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_sbatch_argv_submits_the_script_and_prints_only_the_job_id():
    assert CASES["slurm_one_node_cpu"]().argv == ("sbatch", "--parsable", "/runs/dit_cats-1/slurm/job.sbatch")


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_step_command_is_accepted_by_torchruns_own_parser(case):
    from torch.distributed.run import get_args_parser

    script = CASES[case]().script
    command_line = script.split("--kill-on-bad-exit=1 \\\n", 1)[1].split("\n", 1)[0].removesuffix(" &")
    argv = shlex.split(command_line)
    assert argv[1:3] == ["-m", "torch.distributed.run"]
    args = get_args_parser().parse_args(argv[3:])
    assert (args.module, args.training_script, args.training_script_args) == (
        True,
        "orchestrator.worker",
        ["/runs/dit_cats-1"],
    )
    assert (args.rdzv_backend, args.rdzv_endpoint, args.rdzv_id) == ("c10d", "$ORCH_RDZV_ENDPOINT", "$SLURM_JOB_ID")
    assert args.nproc_per_node == ("8" if case == "slurm_two_nodes_eight_gpus" else "2")


def test_gpus_and_signal_lines_follow_the_values():
    cpu = CASES["slurm_one_node_cpu"]().script
    gpu = CASES["slurm_two_nodes_eight_gpus"]().script
    assert "--gpus-per-node" not in cpu
    assert "#SBATCH --gpus-per-node=8\n" in gpu
    assert "#SBATCH --signal=B:USR1@60\n" in cpu and "#SBATCH --no-requeue\n" in cpu and "scontrol requeue" not in cpu
    assert "#SBATCH --signal=B:USR1@300\n" in gpu and "#SBATCH --requeue\n" in gpu and "scontrol requeue" in gpu
    assert 'export ORCH_SLURM_RESTART_COUNT="${SLURM_RESTART_COUNT:-0}"' in cpu


def run_thread_lines(script: str, env: dict) -> str:
    """OMP_NUM_THREADS / MKL_NUM_THREADS as the script's thread lines leave them, run by bash."""
    thread_lines = [
        line
        for line in script.splitlines()
        if line.startswith(("orch_threads=", '[ "$orch_threads"', "export OMP_", "export MKL_"))
    ]
    probe = "\n".join([*thread_lines, 'echo "$OMP_NUM_THREADS $MKL_NUM_THREADS"'])
    clean = {
        k: v for k, v in os.environ.items() if k not in ("SLURM_CPUS_PER_TASK", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
    }
    result = subprocess.run(["bash", "-c", probe], env={**clean, **env}, capture_output=True, text=True, check=True)
    return result.stdout.splitlines()[-1]


def test_threads_per_rank_are_computed_from_the_allocation_on_the_node():
    gpu = CASES["slurm_two_nodes_eight_gpus"]().script  # threads not given: from SLURM_CPUS_PER_TASK
    assert run_thread_lines(gpu, {"SLURM_CPUS_PER_TASK": "64"}) == "8 8"
    assert run_thread_lines(gpu, {"SLURM_CPUS_PER_TASK": "48"}) == "6 6"
    assert run_thread_lines(gpu, {"SLURM_CPUS_PER_TASK": "4"}) == "1 1"  # fewer CPUs than ranks: still 1 each
    fallback = max(1, len(os.sched_getaffinity(0)) // 8)  # no --cpus-per-task: the CPUs the shell may use (nproc)
    assert run_thread_lines(gpu, {}) == f"{fallback} {fallback}"
    cpu = CASES["slurm_one_node_cpu"]().script  # threads=1 given: pinned, not computed
    assert "orch_threads" not in cpu and "export OMP_NUM_THREADS=1\n" in cpu
    assert run_thread_lines(cpu, {"SLURM_CPUS_PER_TASK": "64"}) == "1 1"


def test_memory_is_asked_for_only_when_given():
    assert "#SBATCH --mem=256G\n" in CASES["slurm_two_nodes_eight_gpus"]().script
    assert "--mem" not in CASES["slurm_one_node_cpu"]().script  # None: the partition's default


@pytest.mark.parametrize(
    "text, seconds",
    [("90", 5400), ("90:30", 5430), ("01:30:00", 5400), ("2-0", 172800), ("1-12:30", 131400), ("1-00:00:01", 86401)],
)
def test_time_limit_is_read_as_sbatch_reads_it(text, seconds):
    assert time_limit_seconds(text) == seconds


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"job_name": "dit cats"}, "job_name 'dit cats' cannot go into an #SBATCH line"),
        ({"logs_dir": "/runs/my logs"}, "logs_dir"),
        ({"logs_dir": "/runs/%u/logs"}, "must not contain '%'"),
        ({"nodes": 0}, "nodes must be a whole number of at least 1"),
        ({"gpus_per_node": -1}, "gpus_per_node must be a whole number of at least 0"),
        ({"gpus_per_node": 8, "processes_per_node": 4}, "one rank per GPU"),
        ({"cpus_per_task": 0}, "cpus_per_task"),
        ({"mem": "256 GB"}, "mem '256 GB' cannot go into an #SBATCH line"),
        ({"mem": "1.5G"}, "megabytes, or a size with a K, M, G or T suffix"),
        ({"sbatch_extra": ["--mem=64G"]}, "sets what the field mem sets"),
        ({"mem": "64G", "sbatch_extra": ["--mem-per-gpu=8G"]}, r"and mem \(64G\) both set the memory"),
        ({"partition": "gpu a100"}, "partition"),
        ({"constraint": "a100 & ib"}, "constraint"),
        ({"time_limit": "one hour"}, "time_limit 'one hour' is not a Slurm time limit"),
        ({"time_limit": 0}, "not a Slurm time limit above zero"),
        ({"time_limit": "1:00:00:00"}, "not a Slurm time limit"),
        (
            {"time_limit": 2, "signal_seconds": 120},
            r"signal_seconds \(120\) must be shorter than time_limit \(2 = 120 s\)",
        ),
        ({"signal_seconds": 0}, "signal_seconds must be a whole number of at least 1"),
        ({"signal_seconds": 70000}, "at most 65535"),
        ({"sbatch_extra": ["-N 2"]}, "must be one long option starting with '--'"),
        ({"sbatch_extra": ["mail-type=END"]}, "starting with '--'"),
        ({"sbatch_extra": ["--time=10"]}, "sets what the field time_limit sets"),
        ({"sbatch_extra": ["--nodes=4"]}, "sets what the field nodes sets"),
        ({"setup": ["module load a\nmodule load b"]}, "must be one shell line"),
        ({"env": {"BAD-NAME": "1"}}, "not a shell variable name"),
        ({"rdzv_port": 0}, "rdzv_port must be in 1..65535"),
        ({"entry": ()}, "entry command is empty"),
        ({"entry": ("worker.py",)}, "must start with '-m MODULE'"),
        ({"step_command": ()}, "step_command is empty"),
    ],
)
def test_impossible_slurm_values_raise_value_error_naming_the_field(changes, message):
    values = {**REQUIRED, "entry": ENTRY, **changes}
    with pytest.raises(ValueError, match=message):
        sbatch_from(**values)


# --- the batch shell's own logic, run by bash with stand-ins for srun, scontrol and scancel -----------

FAKE_SRUN = """#!/bin/bash
# srun stand-in: drop srun's options, run the command once, as one node would.
while [[ "$1" == --* ]]; do shift; done
exec "$@"
"""
FAKE_SCONTROL = """#!/bin/bash
# scontrol stand-in: two node names; requeue requests are only recorded.
if [ "$1 $2" = "show hostnames" ]; then printf 'node-a\\nnode-b\\n'; exit 0; fi
echo "scontrol $*" >> "$FAKE_SLURM_LOG"
"""
FAKE_SCANCEL = """#!/bin/bash
# scancel stand-in: `scancel --signal=SIG JOB` signals the step's process, as Slurm does.
echo "scancel $*" >> "$FAKE_SLURM_LOG"
kill -s "${1#--signal=}" "$(cat "$STEP_PID_FILE")"
"""
STEP_PROBE = """
import os, signal, sys, time
def stop(signum, frame):
    with open(os.environ["STEP_REPORT"], "a") as f:
        f.write(f"got {signal.Signals(signum).name}\\n")
    sys.exit(75)
signal.signal(signal.SIGUSR1, stop)
with open(os.environ["STEP_REPORT"], "a") as f:
    f.write(f"restart={os.environ['ORCH_SLURM_RESTART_COUNT']} endpoint={os.environ['ORCH_RDZV_ENDPOINT']}\\n")
with open(os.environ["STEP_PID_FILE"], "w") as f:
    f.write(str(os.getpid()))
time.sleep(float(sys.argv[1]))
sys.exit(int(sys.argv[2]))
"""


def run_with_fake_slurm(tmp_path: Path, sleep_s: float, exit_code: int, env_extra: dict, send_usr1: bool):
    """Run a generated script under bash with fake Slurm commands; return (exit status, report, fake log)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL), ("scancel", FAKE_SCANCEL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    job = sbatch_from(
        **REQUIRED, step_command=(sys.executable, "-c", STEP_PROBE, str(sleep_s), str(exit_code)), rdzv_port=29400
    )
    script = tmp_path / "job.sbatch"
    script.write_text(job.script)
    report, pid_file, fake_log = tmp_path / "report.txt", tmp_path / "step.pid", tmp_path / "fake_slurm.log"
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": "node-[a-b]",
        "STEP_REPORT": str(report),
        "STEP_PID_FILE": str(pid_file),
        "FAKE_SLURM_LOG": str(fake_log),
    }
    env.pop("SLURM_RESTART_COUNT", None)
    env.update(env_extra)
    shell = subprocess.Popen(
        ["bash", str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    if send_usr1:
        deadline = time.monotonic() + 10
        while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
            time.sleep(0.05)
        shell.send_signal(signal.SIGUSR1)  # what --signal=B:USR1 does: the batch shell only
    output, _ = shell.communicate(timeout=30)
    log = fake_log.read_text() if fake_log.exists() else ""
    return shell.returncode, report.read_text(), log, output


def test_batch_shell_passes_the_steps_exit_status_and_restart_count_through(tmp_path):
    status, report, log, output = run_with_fake_slurm(tmp_path, 0, 3, {}, send_usr1=False)
    assert status == 3, output
    assert report == "restart=0 endpoint=node-a:29400\n"  # SLURM_RESTART_COUNT unset on a first run reads 0
    assert log == ""  # no signal forwarded, no requeue


def test_batch_shell_reads_slurms_restart_count(tmp_path):
    _, report, _, _ = run_with_fake_slurm(tmp_path, 0, 0, {"SLURM_RESTART_COUNT": "2"}, send_usr1=False)
    assert report.startswith("restart=2 ")


def test_batch_shell_forwards_usr1_to_the_step_then_requeues_the_job(tmp_path):
    status, report, log, output = run_with_fake_slurm(tmp_path, 60, 0, {}, send_usr1=True)
    assert report.splitlines()[-1] == "got SIGUSR1", output
    assert status == 75, output  # the step's own status, not the 138 of the interrupted `wait`
    assert log.splitlines() == ["scancel --signal=USR1 4242", "scontrol requeue 4242"]
