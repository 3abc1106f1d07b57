"""The supervisor of one run of a job: no daemon, one process per running job.

It holds the job's run lock for as long as the run lasts (so a second `orch resume` is refused and a
vanished run is noticed), starts exactly the planned command in its own process group, forwards
stop signals to the ranks (which checkpoint and leave), and records how the run ended.

It runs in the foreground of `orch submit` / `orch resume` (with a progress bar), or detached as
`python -m orchestrator.jobs.supervisor JOB_DIR` for `--detach`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from orchestrator.jobs.directory import EXIT_PREEMPTED, JobDir, JobError, JobRecord, JobState
from orchestrator.jobs.plan import Plan

POLL_S = 0.5
FORWARDED = {
    signal.SIGINT: signal.SIGINT,
    signal.SIGTERM: signal.SIGTERM,
    signal.SIGUSR1: signal.SIGUSR1,
    signal.SIGHUP: signal.SIGTERM,
}


def write_plan(job: JobDir, plan: Plan) -> None:
    """Record the plan the supervisor will run (and the worker reads: device, threads, tracking)."""
    data = {field.name: getattr(plan, field.name) for field in dataclasses.fields(plan)}
    data["command"] = {"argv": list(plan.command.argv), "env": dict(plan.command.env)}
    data["node_commands"] = [{"argv": list(c.argv), "env": dict(c.env)} for c in plan.node_commands]
    job.plan_file.write_text(json.dumps(data, indent=2))


def write_launch_files(plan: dict) -> None:
    """The files the planned command reads (a hostfile, an sbatch script), written before it runs."""
    from orchestrator.files import write_atomic

    for path, text in plan.get("launch_files", ()):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(Path(path), text)


def exit_code_for(state: JobState) -> int:
    return {JobState.SUCCEEDED: 0, JobState.PREEMPTED: EXIT_PREEMPTED}.get(state, 1)


def run(job: JobDir, progress: bool) -> JobRecord:
    """Run the job's planned command to its end and record the outcome; JobError if it is already running."""
    lock = job.try_lock_run()
    if lock is None:
        record = job.read()
        raise JobError(
            f"job {job.id} is already running (supervisor pid {record.supervisor_pid}); `orch cancel {job.id}` stops it"
        )
    try:
        plan = json.loads(job.plan_file.read_text())
        previous = job.read()
        if previous.state == JobState.RUNNING:  # we hold the lock, so that run is gone
            previous = job.transition(JobState.FAILED, ended_at=time.time(), message="its processes vanished")
        job.transition(
            JobState.RUNNING,
            started_at=time.time(),
            ended_at=None,
            supervisor_pid=os.getpid(),
            launcher_pid=None,
            exit_code=None,
            message="",
            stop_reason=None,
            cancel_requested=False,
            attempts=previous.attempts + 1,
            launcher=plan["launcher"],
            world_size=plan["world_size"],
        )
        write_launch_files(plan)
        if plan.get("cpus"):  # this job's share of the machine (a sweep's side-by-side trial): the ranks inherit it
            os.sched_setaffinity(0, plan["cpus"])
        restarts_left = max_restarts(job) if plan["launcher"] in SUPERVISOR_RESTARTS else 0
        attempt = previous.attempts + 1
        while True:
            returncode = _launch_and_wait(job, plan, attempt, progress)
            record = record_end(job, returncode)
            if restarts_left == 0 or not restartable(record, returncode):
                return record
            restarts_left -= 1
            attempt += 1
            job.transition(
                JobState.RUNNING,
                ended_at=None,
                exit_code=None,
                message="",
                stop_reason=None,
                attempts=attempt,
                restarts=record.restarts + 1,
            )
            with open(job.log_file, "ab") as log:
                log.write(f"\n=== restart {record.restarts + 1} after: {record.message}\n".encode())
    finally:
        lock.close()


# Launchers whose restarts the supervisor makes (torchrun makes its own: --max-restarts; Slurm requeues).
SUPERVISOR_RESTARTS = ("local", "deepspeed")


def max_restarts(job: JobDir) -> int:
    """resources.max_restarts of the job's spec."""
    import yaml

    from orchestrator.specs.job import spec_from_dict

    return spec_from_dict(yaml.safe_load(job.spec_file.read_text()), str(job.spec_file)).resources.max_restarts


def restartable(record: JobRecord, returncode: int) -> bool:
    """A failed run that another run from the newest checkpoint can get past: not a spec or data error (exit code 2),
    not a loss or weights that are not finite (the same steps would give them again)."""
    from orchestrator.jobs.directory import EXIT_USER_ERROR

    diverged = (record.stop_reason or "").startswith(("error: loss not finite", "error: the weights are not finite"))
    return record.state == JobState.FAILED and returncode != EXIT_USER_ERROR and not diverged


def _launch_and_wait(job: JobDir, plan: dict, attempt: int, progress: bool) -> int:
    """Start the planned command in its own process group, its output into the job's log; its exit code."""
    clear_rank_registry(job)
    with open(job.log_file, "ab") as log:
        command = " ".join(plan["command"]["argv"])
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} attempt {attempt}: {command}\n".encode())
        log.flush()
        process = subprocess.Popen(
            plan["command"]["argv"],
            env={**os.environ, **plan["command"]["env"]},
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    job.update(launcher_pid=process.pid)
    forwarder = _SignalForwarder(process, _rank_finder(job, plan["launcher"], process))
    try:
        _wait(job, process, progress)
    finally:
        forwarder.restore()
    return process.returncode


def run_node(job: JobDir, node_rank: int) -> int:
    """Run node `node_rank`'s part of a multi-node job in the foreground (its ranks join node 0's through the
    rendezvous); returns the launcher's exit code. Node 0's supervisor alone records the job's state."""
    if not job.plan_file.is_file():
        raise JobError(
            f"job {job.id} has no {job.plan_file.name} yet: node 0 writes it when it starts the job (`orch submit` or "
            "`orch resume` there); join after that"
        )
    plan = json.loads(job.plan_file.read_text())
    if plan["launcher"] == "deepspeed":
        raise JobError(
            f"job {job.id} runs through launcher deepspeed, which starts every host itself over ssh: there is nothing "
            "to join"
        )
    commands = plan.get("node_commands") or [plan["command"]]
    if not 1 <= node_rank < len(commands):
        raise JobError(
            f"job {job.id} runs on {len(commands)} node(s): --node-rank must be 1..{len(commands) - 1} (node 0 is "
            "`orch submit`/`orch resume`)"
        )
    command = commands[node_rank]
    with open(job.logs_dir / f"node-{node_rank}.log", "ab") as log:
        log.write(
            f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} node {node_rank}: {' '.join(command['argv'])}\n".encode()
        )
        log.flush()
        process = subprocess.Popen(
            command["argv"],
            env={**os.environ, **command["env"]},
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    forwarder = _SignalForwarder(process, lambda: children_of(process.pid))
    try:
        return process.wait()
    finally:
        forwarder.restore()


def _wait(job: JobDir, process: subprocess.Popen, progress: bool) -> None:
    if not progress:
        process.wait()
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("{task.fields[speed]} img/s"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    )
    record = job.read()
    with Progress(*columns, transient=False) as bar:
        task = bar.add_task(job.id, total=record.total_steps or None, completed=record.step, loss="-", speed="-")
        while process.poll() is None:
            record = job.read()
            bar.update(
                task,
                completed=record.step,
                total=record.total_steps or None,
                loss=f"{record.loss:.4f}" if record.loss is not None else "-",
                speed=f"{record.samples_per_sec:.0f}" if record.samples_per_sec else "-",
            )
            time.sleep(POLL_S)
        record = job.read()
        bar.update(task, completed=record.step)


def record_end(job: JobDir, returncode: int) -> JobRecord:
    """The job's final state for a run that exited with `returncode`, from what rank 0 recorded (stop_reason,
    cancel)."""
    record = job.read()
    reason = record.stop_reason or ""
    checkpoint = f"checkpoint {Path(record.checkpoint).name}" if record.checkpoint else "no checkpoint yet"
    if returncode == 0 and reason == "finished":
        state, message = JobState.SUCCEEDED, f"finished {record.step} steps; {checkpoint}"
    elif record.cancel_requested:
        state, message = JobState.CANCELLED, f"cancelled at step {record.step}; {checkpoint}"
    elif reason.startswith("preempted"):
        state, message = JobState.PREEMPTED, f"{reason}; {checkpoint}; `orch resume {job.id}` continues"
    else:
        why = reason.removeprefix("error: ") if reason else f"the launched processes exited with code {returncode}"
        state, message = JobState.FAILED, f"{why}; {checkpoint}; logs: {job.log_file}"
    return job.transition(state, ended_at=time.time(), exit_code=returncode, message=message)


def _rank_finder(job: JobDir, launcher: str, process: subprocess.Popen):
    """How to find the rank processes a stop signal goes to, by launcher (a function returning pids)."""
    if launcher == "local":
        return lambda: [process.pid]  # the launched process is the rank
    if launcher == "deepspeed":
        # Its ranks hang below sshd (pdsh), not below us: those on this host recorded themselves. The stop
        # is agreed by all ranks at the next step, so signalling this host's ranks stops every host's.
        return lambda: local_ranks(job)
    # Ranks only: a launcher such as torchrun would answer SIGTERM by killing its ranks after 30 s,
    # and SIGUSR1 would kill the launcher itself; DataLoader workers must not see it either.
    return lambda: children_of(process.pid)


class _SignalForwarder:
    """Passes stop signals on to the rank processes; a second Ctrl-C kills the run without a checkpoint."""

    def __init__(self, process: subprocess.Popen, rank_pids):
        self.process = process
        self.rank_pids = rank_pids
        self.interrupts = 0
        self.previous = {signum: signal.signal(signum, self._forward) for signum in FORWARDED}

    def _forward(self, signum: int, frame) -> None:
        if signum == signal.SIGINT:
            self.interrupts += 1
            if self.interrupts > 1:
                print("\nsecond interrupt: killing the job without a checkpoint", file=sys.stderr)
                for pid in self.rank_pids():
                    _kill(pid, signal.SIGKILL)
                _kill_group(self.process.pid, signal.SIGKILL)
                return
            print(
                "\ninterrupt: the job writes a checkpoint and stops (Ctrl-C again to kill it at once)", file=sys.stderr
            )
        pids = self.rank_pids()
        if not pids and self.process.poll() is None:
            # No rank has started yet (the deepspeed runner is still connecting): its runner stops them all.
            _kill(self.process.pid, signal.SIGTERM)
        for pid in pids:
            _kill(pid, FORWARDED[signum])

    def restore(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


def register_rank(job: JobDir, rank: int) -> None:
    """Record this rank's host and pid for the current run (every rank calls it at its start)."""
    import socket

    from orchestrator.files import write_atomic

    job.ranks_dir.mkdir(exist_ok=True)
    write_atomic(job.ranks_dir / f"{rank}.json", json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))


def clear_rank_registry(job: JobDir) -> None:
    for entry in job.ranks_dir.glob("*.json"):
        entry.unlink(missing_ok=True)


def local_ranks(job: JobDir) -> list[int]:
    """Pids of the job's ranks running on this host (from the registry, checked against /proc: a pid may be reused)."""
    import socket

    host, pids = socket.gethostname(), []
    for entry in job.ranks_dir.glob("*.json"):
        try:
            record = json.loads(entry.read_text())
            command = Path(f"/proc/{record['pid']}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError, KeyError):
            continue
        if record.get("host") == host and b"orchestrator.worker" in command and str(job.path).encode() in command:
            pids.append(int(record["pid"]))
    return pids


def children_of(pid: int) -> list[int]:
    """Direct child processes of pid (from /proc)."""
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid:
            children.append(int(entry.name))
    return children


def _kill(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _kill_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        pass


def main() -> int:
    """Detached entry point: python -m orchestrator.jobs.supervisor JOB_DIR."""
    job = JobDir(sys.argv[1])
    try:
        record = run(job, progress=False)
    except JobError as err:
        print(f"orch: {err}", file=sys.stderr)
        return 2
    return exit_code_for(record.state)


if __name__ == "__main__":
    sys.exit(main())
