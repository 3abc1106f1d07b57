"""Slurm: an sbatch script that runs one torchrun per node through srun, survives time limits and requeues.

`sbatch_job(...)` is a pure function from plain values (a SlurmAllocation, a NodeStep) to the script's text and the
`sbatch` command
that submits it; nothing here runs Slurm. The script it writes:

- asks for N nodes with one task per node (the task is torchrun, which starts the ranks of its node);
- puts stdout and stderr of every run of the job into one `<logs>/slurm-<jobid>.out`, appended to
  across requeues (`--open-mode=append`);
- is requeueable (`--requeue`) and asks Slurm for SIGUSR1 `signal_seconds` before the time limit,
  sent to the batch shell only (`--signal=B:USR1@N`); the shell passes the signal on to the ranks,
  which checkpoint and stop, and then requeues the job itself so it continues from that checkpoint;
- exports ORCH_SLURM_RESTART_COUNT (0 on the first run; Slurm leaves SLURM_RESTART_COUNT unset then);
- unless told a thread count, exports OMP_NUM_THREADS / MKL_NUM_THREADS computed on the node from the
  allocation: the task's CPUs (SLURM_CPUS_PER_TASK) shared by the node's ranks.
"""

import posixpath
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from launch.torchrun import torchrun_command

# srun runs the command below once per node; these stand in for values only the running job knows
# (the first node's name, the job id) and become shell expansions when the script is written.
_ENDPOINT_TOKEN = "orch-rdzv-endpoint:1"
_JOB_ID_TOKEN = "orch-slurm-job-id"
_SHELL_EXPANSIONS = {_ENDPOINT_TOKEN: '"$ORCH_RDZV_ENDPOINT"', _JOB_ID_TOKEN: '"$SLURM_JOB_ID"'}

# Slurm sends the time-limit signal at a time given in seconds, 0..65535 (sbatch --signal).
MAX_SIGNAL_SECONDS = 65535

# torchrun passes these on to its ranks and waits for them (torch >= 2.9, pytorch#160690: the
# `--signals-to-handle` flag, read from PET_SIGNALS_TO_HANDLE). Left out, SIGUSR1 kills torchrun
# itself; its orphaned ranks then run on outside Slurm's process tracking (proctrack/linuxproc) or
# are killed with the step (proctrack/cgroup).
TORCHRUN_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"

# The batch shell's parts, in order (the srun line goes between FORWARD_SIGNALS and WAIT_FOR_STEP).
RESTART_COUNT = """\
# Slurm leaves SLURM_RESTART_COUNT unset on the first run; the worker reads 0, 1, 2...
export ORCH_SLURM_RESTART_COUNT="${SLURM_RESTART_COUNT:-0}"
echo "orch: Slurm job $SLURM_JOB_ID, run $ORCH_SLURM_RESTART_COUNT, on $SLURM_JOB_NODELIST, $(date -u +%FT%TZ)"
"""
TORCHRUN_SIGNAL_HANDLING = """\
# torchrun passes these signals on to its ranks and waits for them; SIGUSR1 would otherwise kill it.
export PET_SIGNALS_TO_HANDLE={signals}
# ...and gives the ranks the whole warning period to checkpoint before it sends SIGKILL.
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT={seconds}
"""
ALLOCATION_THREADS = """\
# Threads per rank from the allocation: the task's CPUs (--cpus-per-task; else those this shell may use)
# shared by the node's {ranks} rank(s), at least 1. torchrun's ranks inherit them (unset, torchrun would set 1).
orch_threads=$(( ${{SLURM_CPUS_PER_TASK:-$(nproc)}} / {ranks} ))
[ "$orch_threads" -ge 1 ] || orch_threads=1
export OMP_NUM_THREADS="$orch_threads" MKL_NUM_THREADS="$orch_threads"
"""
RENDEZVOUS = """
# torchrun's c10d rendezvous lives on the first node of the allocation; every node's torchrun
# meets there under the job id (--node_rank is ignored with c10d: the rendezvous assigns ranks).
head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export ORCH_RDZV_ENDPOINT="$head_node:{port}"
"""
FORWARD_SIGNALS = """
# Slurm sends the time-limit warning (--signal=B:USR1) and `scancel --batch` signals to this shell
# only: the srun step below runs elsewhere (under slurmstepd on each node) and does not get them.
# So trap them and pass them on with `scancel --signal`, which reaches every task of the job's steps
# but not this shell. (A TERM sent to srun itself would make srun kill the step at once.) When Slurm
# itself cancels, requeues or preempts the job, every task already got the TERM and scancel would retry
# for minutes on the ending job: `timeout` keeps this shell from outliving its step for that long.
# bash runs a trap only between commands, so srun runs in the background and the shell waits for it.
got_usr1=0
interrupted=0
forward() { interrupted=1; timeout 10 scancel --signal="$1" "$SLURM_JOB_ID" 2>/dev/null || true; }
trap 'got_usr1=1; forward USR1' USR1
trap 'forward TERM' TERM

"""
WAIT_FOR_STEP = """\
step_pid=$!
# A trapped signal ends `wait` early (status > 128); wait again until the step itself has ended.
while :; do
    interrupted=0
    wait "$step_pid"
    status=$?
    [ "$interrupted" = 1 ] || break
done
trap - USR1 TERM  # the step has ended: nothing left to pass a signal on to
"""
REQUEUE_AFTER_WARNING = """
# The ranks stopped on the time-limit warning (with a checkpoint): requeue, so the job continues
# from it rather than being killed at the limit. A step that finished (status 0) is not rerun.
if [ "$got_usr1" = 1 ] && [ "$status" != 0 ]; then
    echo "orch: stopped on the time-limit warning (exit $status); requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
fi
"""

# #SBATCH options this module writes itself, with the argument of sbatch_job that sets each.
MANAGED_OPTIONS = {
    "job-name": "job_name",
    "nodes": "nodes",
    "ntasks": "nodes",
    "ntasks-per-node": "nodes",
    "gpus-per-node": "gpus_per_node",
    "gpus": "gpus_per_node",
    "gres": "gpus_per_node",
    "cpus-per-task": "cpus_per_task",
    "mem": "mem",
    "partition": "partition",
    "account": "account",
    "qos": "qos",
    "constraint": "constraint",
    "time": "time_limit",
    "signal": "signal_seconds",
    "requeue": "requeue",
    "no-requeue": "requeue",
    "open-mode": "logs_dir",
    "output": "logs_dir",
    "error": "logs_dir",
    "chdir": "workdir",
}

# Values written into #SBATCH lines: sbatch splits those lines at whitespace and does not honour quotes
# (a job name "a b" became "a"), so whitespace, quotes and newlines are refused.
_NAME = re.compile(r"[A-Za-z0-9_.+-]+")
_LIST = re.compile(r"[A-Za-z0-9_.,+-]+")  # partition, account, qos: names, comma-separated
_SBATCH_VALUE = re.compile(r"[^\s'\"\\]+")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_MEMORY = re.compile(r"\d+[KMGTkmgt]?")  # sbatch --mem: a size, in megabytes unless suffixed
_TIME_LIMIT = re.compile(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?")


@dataclass(frozen=True)
class SbatchJob:
    """The text of an sbatch script, and the command that submits it once written to `script_path`."""

    script: str
    argv: tuple[str, ...]


@dataclass(frozen=True)
class SlurmAllocation:
    """What the job asks Slurm for, and how it meets its time limit (the `#SBATCH` lines), checked when made.

    nodes, gpus_per_node: the allocation; one rank per GPU, or `processes_per_node` ranks on CPU (default 1).
    cpus_per_task: CPUs for each node's task (torchrun and all its ranks); None leaves Slurm's default
        (often 1 CPU, which torchrun and all its ranks would then share).
    mem: memory per node (`--mem`), Slurm's format: a whole number in megabytes or with a K, M, G or T
        suffix (`256G`); `0` asks for all of each node's memory (refused by some sites); None leaves the
        partition's default.
    partition, account, qos, constraint: passed through to sbatch when given.
    time_limit: Slurm's format (`MM`, `HH:MM:SS`, `D-HH:MM`...) or whole minutes; None uses the partition's.
    signal_seconds: SIGUSR1 comes this long before the time limit (Slurm may send it up to 60 s earlier).
    requeue: `--requeue`, and requeue the job after the ranks stopped on the time-limit warning.
    """

    nodes: int = 1
    gpus_per_node: int = 0
    processes_per_node: int | None = None
    cpus_per_task: int | None = None
    mem: str | None = None
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    time_limit: str | int | None = None
    signal_seconds: int = 120
    requeue: bool = True

    def __post_init__(self) -> None:
        check_at_least("nodes", self.nodes, 1)
        check_at_least("gpus_per_node", self.gpus_per_node, 0)
        if self.processes_per_node is None:
            object.__setattr__(self, "processes_per_node", self.gpus_per_node or 1)
        check_at_least("processes_per_node", self.processes_per_node, 1)
        if self.gpus_per_node and self.processes_per_node != self.gpus_per_node:
            raise ValueError(
                f"processes_per_node ({self.processes_per_node}) must equal gpus_per_node ({self.gpus_per_node}): one "
                "rank per GPU; "
                "leave processes_per_node unset on GPU nodes"
            )
        if self.cpus_per_task is not None:
            check_at_least("cpus_per_task", self.cpus_per_task, 1)
        if self.mem is not None:
            check_sbatch_value(
                "mem", self.mem, _MEMORY, "Slurm's format: megabytes, or a size with a K, M, G or T suffix, e.g. 256G"
            )
        for name, value in (("partition", self.partition), ("account", self.account), ("qos", self.qos)):
            if value is not None:
                check_sbatch_value(name, value, _LIST, "names separated by commas, no spaces")
        if self.constraint is not None:
            check_sbatch_value("constraint", self.constraint, _SBATCH_VALUE, "e.g. 'a100&ib' without spaces or quotes")
        time_text = self.time_text
        check_at_least("signal_seconds", self.signal_seconds, 1)
        if self.signal_seconds > MAX_SIGNAL_SECONDS:
            raise ValueError(
                f"signal_seconds must be at most {MAX_SIGNAL_SECONDS} (Slurm's limit), got {self.signal_seconds}"
            )
        if time_text is not None and self.signal_seconds >= time_limit_seconds(time_text):
            raise ValueError(
                f"signal_seconds ({self.signal_seconds}) must be shorter than time_limit ({time_text} = "
                f"{time_limit_seconds(time_text)} s), or the warning comes as soon as the job starts; lower "
                "signal_seconds"
            )

    @property
    def time_text(self) -> str | None:
        """The time limit as sbatch reads it (None: the partition's)."""
        return normalise_time_limit(self.time_limit)


@dataclass(frozen=True)
class NodeStep:
    """What runs on every node of the job, checked when made.

    python, entry: the interpreter on the nodes and the rank's module, e.g. ('-m', 'orchestrator.worker', JOB_DIR).
    setup: shell lines run first (module loads, venv activation); the job stops if one fails.
    env: variables exported before the launch.
    threads: OMP_NUM_THREADS / MKL_NUM_THREADS per rank; None computes them in the script from the
        allocation: $SLURM_CPUS_PER_TASK (else `nproc`) // processes_per_node, at least 1.
    rdzv_port: torchrun's rendezvous port on the first node; None picks 20000 + job id mod 10000, so
        two jobs that share a node do not both take 29400.
    step_command: runs instead of torchrun on every node (tests inject a small probe here).
    max_restarts: torchrun's --max-restarts on every node: a failed rank restarts the ranks of all nodes in the same
        allocation (the elastic agents meet again at the rendezvous); a failed node ends the step, and Slurm itself
        requeues the job when it lost the node (`--requeue`).
    """

    python: str = "python"
    entry: Sequence[str] = ()
    setup: Sequence[str] = ()
    env: Mapping[str, str] | None = None
    threads: int | None = None
    rdzv_port: int | None = None
    step_command: Sequence[str] | None = None
    max_restarts: int = 0

    def __post_init__(self) -> None:
        check_at_least("max_restarts", self.max_restarts, 0)
        if self.rdzv_port is not None and not 1 <= self.rdzv_port <= 65535:
            raise ValueError(f"rdzv_port must be in 1..65535, got {self.rdzv_port}")
        for line in self.setup:
            check_setup_line(line)
        if self.step_command is not None and not self.step_command:
            raise ValueError("step_command is empty; pass None to run torchrun, or the command each node runs")


def sbatch_job(
    *,
    job_name: str,
    script_path: str,
    logs_dir: str,
    allocation: SlurmAllocation | None = None,
    step: NodeStep | None = None,
    sbatch_extra: Sequence[str] = (),
    workdir: str | None = None,
) -> SbatchJob:
    """An sbatch script running `python -m torch.distributed.run ... ENTRY` on every node of the job.

    job_name: the Slurm job name (letters, digits, `_ . + -`).
    script_path: where the caller writes `script` before running `argv` (`sbatch --parsable PATH`,
        which prints just the job id, or `id;cluster` on a federation).
    logs_dir: folder of `slurm-<jobid>.out` (stdout and stderr of every run); it must exist before
        the job starts, since Slurm does not create it and loses the output otherwise.
    allocation: what the job asks Slurm for (default: one node, one CPU rank); step: what each node runs (default:
        `python` with no entry).
    sbatch_extra: further options, one per `#SBATCH` line, each starting with `--`.
    workdir: the job's working directory (`--chdir`); None keeps sbatch's (where it is run).
    """
    a = allocation or SlurmAllocation()
    step = step or NodeStep()
    check_sbatch_value("job_name", job_name, _NAME, "e.g. dit_cats")
    check_sbatch_value("logs_dir", logs_dir, _SBATCH_VALUE, "a path without whitespace or quotes")
    if "%" in logs_dir:
        raise ValueError(f"logs_dir must not contain '%' (Slurm reads it as a file-name pattern), got {logs_dir!r}")
    if workdir is not None:
        check_sbatch_value("workdir", workdir, _SBATCH_VALUE, "a path without whitespace or quotes")
    time_text = a.time_text
    extra_lines = [check_sbatch_extra(option) for option in sbatch_extra]
    for option in extra_lines:
        if a.mem is not None and option.split("=", 1)[0] in ("--mem-per-cpu", "--mem-per-gpu"):
            raise ValueError(
                f"sbatch_extra entry {option!r} and mem ({a.mem}) both set the memory; sbatch takes only one of them"
            )
    setup_lines = list(step.setup)

    if step.step_command is None:
        command = torchrun_command(
            step.python,
            step.entry,
            nproc_per_node=a.processes_per_node,
            nnodes=a.nodes,
            rdzv_endpoint=_ENDPOINT_TOKEN,
            rdzv_id=_JOB_ID_TOKEN,
            max_restarts=step.max_restarts,
            threads=step.threads,
        )
        step_argv, exports = command.argv, {**command.env, **(step.env or {})}
    else:
        step_argv, exports = tuple(step.step_command), dict(step.env or {})
    for name in exports:
        if not _ENV_NAME.fullmatch(name):
            raise ValueError(f"env name {name!r} is not a shell variable name (letters, digits, _, no leading digit)")

    log_file = posixpath.join(logs_dir, "slurm-%j.out")  # %j: the job id, the same across requeues
    sbatch_lines = [f"--job-name={job_name}", f"--nodes={a.nodes}", "--ntasks-per-node=1"]
    if a.gpus_per_node:
        sbatch_lines.append(f"--gpus-per-node={a.gpus_per_node}")
    if a.cpus_per_task is not None:
        sbatch_lines.append(f"--cpus-per-task={a.cpus_per_task}")
    if a.mem is not None:
        sbatch_lines.append(f"--mem={a.mem}")
    for option, value in (
        ("partition", a.partition),
        ("account", a.account),
        ("qos", a.qos),
        ("constraint", a.constraint),
        ("time", time_text),
        ("chdir", workdir),
    ):
        if value is not None:
            sbatch_lines.append(f"--{option}={value}")
    sbatch_lines += [f"--output={log_file}", f"--error={log_file}", "--open-mode=append"]
    sbatch_lines.append("--requeue" if a.requeue else "--no-requeue")
    sbatch_lines.append(f"--signal=B:USR1@{a.signal_seconds}")
    sbatch_lines += extra_lines

    submit = ("sbatch", "--parsable", script_path)  # --parsable: sbatch prints only the job id
    srun_argv = ["srun", f"--nodes={a.nodes}", "--ntasks-per-node=1"]
    if a.cpus_per_task is not None:
        # Since Slurm 22.05 srun no longer inherits sbatch's --cpus-per-task: without it the node's
        # torchrun and all its ranks would share one CPU.
        srun_argv.append(f"--cpus-per-task={a.cpus_per_task}")
    srun_argv.append("--kill-on-bad-exit=1")  # one node failing ends the step on every node
    step_words = [_SHELL_EXPANSIONS.get(word) or shlex.quote(word) for word in step_argv]

    lines = [
        "#!/bin/bash",
        f"# Generated by orch (launch/slurm.py) for job {job_name}; submitted as: {shlex.join(submit)}",
    ]
    lines += [f"#SBATCH {line}" for line in sbatch_lines]
    lines.append("")
    if setup_lines:
        lines += [
            "# Set-up from the spec; a failing line stops the job here, not later in a confusing launch.",
            "set -e",
        ]
        lines += [*setup_lines, "set +e", ""]
    lines += RESTART_COUNT.splitlines()
    if step.step_command is None:
        lines += TORCHRUN_SIGNAL_HANDLING.format(signals=TORCHRUN_SIGNALS, seconds=a.signal_seconds).splitlines()
        if step.threads is None:
            lines += ALLOCATION_THREADS.format(ranks=a.processes_per_node).splitlines()
    lines += [f"export {name}={shlex.quote(value)}" for name, value in exports.items()]
    port = str(step.rdzv_port) if step.rdzv_port is not None else "$((20000 + SLURM_JOB_ID % 10000))"
    lines += RENDEZVOUS.format(port=port).splitlines()
    lines += [*FORWARD_SIGNALS.splitlines(), shlex.join(srun_argv) + " \\", "    " + " ".join(step_words) + " &"]
    lines += WAIT_FOR_STEP.splitlines()
    if a.requeue:
        lines += REQUEUE_AFTER_WARNING.splitlines()
    lines.append('exit "$status"')
    return SbatchJob(script="\n".join(lines) + "\n", argv=submit)


def normalise_time_limit(time_limit: str | int | None) -> str | None:
    """The time limit as sbatch reads it: whole minutes become `MM`, Slurm's formats pass through checked."""
    if time_limit is None:
        return None
    text = str(time_limit).strip()  # True, 1.5 or "1h" fail the pattern below
    if not _TIME_LIMIT.fullmatch(text) or time_limit_seconds(text) == 0:
        raise ValueError(
            f"time_limit {time_limit!r} is not a Slurm time limit above zero; write minutes (90), "
            "HH:MM:SS (01:30:00) or D-HH:MM:SS (1-12:00:00)"
        )
    return text


def time_limit_seconds(text: str) -> int:
    """Seconds in a Slurm time limit: M, M:S, H:M:S, D-H, D-H:M or D-H:M:S (sbatch's own reading)."""
    match = _TIME_LIMIT.fullmatch(text)
    if match is None:
        raise ValueError(f"not a Slurm time limit: {text!r}")
    days, first, second, third = match.groups()
    numbers = [int(first), *(int(part) for part in (second, third) if part is not None)]
    if days is not None:  # after "D-" the fields are hours[:minutes[:seconds]]
        hours, minutes, seconds = (numbers + [0, 0])[:3]
        return ((int(days) * 24 + hours) * 60 + minutes) * 60 + seconds
    if len(numbers) == 3:
        hours, minutes, seconds = numbers
    else:  # minutes[:seconds]
        hours, (minutes, seconds) = 0, (numbers + [0])[:2]
    return (hours * 60 + minutes) * 60 + seconds


def check_sbatch_value(field: str, value: str, pattern: re.Pattern, hint: str) -> None:
    """Raise ValueError unless `value` fits `pattern` (what an #SBATCH line can carry)."""
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise ValueError(f"{field} {value!r} cannot go into an #SBATCH line; use {hint}")


def check_sbatch_extra(option: str) -> str:
    """One extra `#SBATCH` option, checked: `--name[=value]`, one line, not one this module writes."""
    if not isinstance(option, str) or not option.startswith("--") or not _SBATCH_VALUE.fullmatch(option):
        raise ValueError(
            f"sbatch_extra entry {option!r} must be one long option starting with '--' without spaces or quotes, "
            "e.g. '--mail-type=END' or '--exclusive'"
        )
    name = option[2:].split("=", 1)[0]
    if name in MANAGED_OPTIONS:
        raise ValueError(
            f"sbatch_extra entry {option!r} sets what the field {MANAGED_OPTIONS[name]} sets; use that field instead"
        )
    return option


def check_setup_line(line: str) -> str:
    """One set-up shell line, checked to be a single line."""
    if not isinstance(line, str) or "\n" in line or "\r" in line:
        raise ValueError(f"setup entry {line!r} must be one shell line; give several lines as several entries")
    return line


def check_at_least(name: str, value: int, minimum: int) -> None:
    """Raise ValueError unless `value` is an int of at least `minimum`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be a whole number of at least {minimum}, got {value!r}")
