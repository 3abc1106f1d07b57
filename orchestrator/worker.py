"""The entry point of every rank: `python -m orchestrator.worker JOB_DIR`, under any launcher.

It reads the job directory (resolved spec, plan), trains, and tells the job's state how it ended;
the supervisor turns that and the exit code into the job's final state.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import sys
from functools import partial
from typing import NoReturn

import yaml

from orchestrator.errors import UserError
from orchestrator.jobs.directory import EXIT_PREEMPTED, EXIT_USER_ERROR, JobDir
from orchestrator.specs.job import device_precision_refusal, spec_from_dict
from orchestrator.train.signals import die_with_launcher

log = logging.getLogger("orchestrator.worker")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m orchestrator.worker JOB_DIR", file=sys.stderr)
        return EXIT_USER_ERROR
    die_with_launcher()  # no rank outlives its launcher (a killed supervisor or torchrun leaves no orphans)
    job = JobDir(args[0])
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        force=True,
        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # its per-file save messages drown ours
    spec = spec_from_dict(yaml.safe_load(job.spec_file.read_text()), source=str(job.spec_file))
    plan = json.loads(job.plan_file.read_text())

    import torch

    torch.set_num_threads(threads_per_rank(plan["threads_per_process"]))
    if plan.get("cpus"):  # a share of the machine (a sweep's side-by-side trial): say which
        cores = ",".join(map(str, sorted(os.sched_getaffinity(0))))
        gpus = os.environ.get("CUDA_VISIBLE_DEVICES")
        log.info("this job's share of the machine: CPU core(s) %s%s", cores, f", GPU(s) {gpus}" if gpus else "")
    from orchestrator.jobs.supervisor import register_rank

    register_rank(job, rank)
    restart, max_restarts = torchrun_restarts()
    elastic_restart = restart > 0  # torchrun restarted every rank
    slurm_run = os.environ.get("ORCH_SLURM_RESTART_COUNT")  # set by the sbatch script: 0, then 1, 2... after requeues
    if slurm_run is not None and rank == 0:
        _record_slurm_start(job, elastic_restart, restarted=elastic_restart or int(slurm_run) > 0, plan=plan)
    elif elastic_restart and rank == 0:
        job.update(restarts=job.read().restarts + 1, attempts=job.read().attempts + 1, stop_reason=None)
    code = _train(job, spec, plan, rank)
    restarts_left = max_restarts - restart
    if slurm_run is not None and rank == 0:
        if code != 0 and restarts_left > 0:  # the job goes on: the restarted run records its start
            log.warning(
                "this run failed (exit %d): torchrun starts the ranks again (%d restart(s) left)", code, restarts_left
            )
        else:
            from orchestrator.jobs.supervisor import record_end

            record_end(job, code)  # no supervisor under Slurm: rank 0 records how this run ended
    return code


def torchrun_restarts() -> tuple[int, int]:
    """(restarts so far, the most there may be) of torchrun's elastic agent for this rank; (0, 0) outside torchrun."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")), int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0"))


def resolve_device(planned: str) -> str:
    """The device this rank trains on: the plan's, or for `auto` (launcher slurm, where the host that
    submitted could not see the nodes' GPUs) CUDA if this node's allocation gives it one, else the CPU."""
    if planned != "auto":
        return planned
    import socket

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    log.info(
        "device auto resolved on %s: %s (%d GPU(s) visible)", socket.gethostname(), device, torch.cuda.device_count()
    )
    return device


def threads_per_rank(planned: int | None) -> int:
    """torch's threads for this rank: the plan's, or (None: launcher slurm) this node's allocated CPUs
    (SLURM_CPUS_PER_TASK, else the CPUs this process may run on) shared by the node's ranks, at least 1;
    the same count the sbatch script exported as OMP_NUM_THREADS."""
    if planned is not None:
        return planned
    cpus = os.environ.get("SLURM_CPUS_PER_TASK", "")
    total = int(cpus) if cpus.isdigit() else len(os.sched_getaffinity(0))
    ranks = int(os.environ.get("LOCAL_WORLD_SIZE") or 1)
    threads = max(1, total // max(1, ranks))
    log.info("%d thread(s) per rank: %d allocated CPU(s) / %d rank(s) on this node", threads, total, ranks)
    return threads


def _record_slurm_start(job: JobDir, elastic: bool, restarted: bool, plan: dict) -> None:
    """Mark the job running for this Slurm run: a requeued one (after a preemption, time limit or lost node) or one
    torchrun restarted in the same allocation (resources.max_restarts) counts as a restart."""
    import time

    from orchestrator.jobs.directory import JobState

    previous = job.read()
    if previous.state == JobState.RUNNING and not elastic:  # the previous run was killed before it recorded its end
        job.transition(JobState.FAILED, ended_at=time.time(), message="the previous Slurm run ended unrecorded")
    restarts = previous.restarts + int(restarted)
    log.info(
        "Slurm job %s, run %d (restarts after the first: %d)", os.environ.get("SLURM_JOB_ID"), restarts + 1, restarts
    )
    record = job.update if job.read().state == JobState.RUNNING else partial(job.transition, JobState.RUNNING)
    record(
        started_at=time.time(),
        ended_at=None,
        exit_code=None,
        message="",
        stop_reason=None,
        cancel_requested=previous.cancel_requested if previous.state == JobState.QUEUED else False,
        attempts=previous.attempts + 1,
        restarts=restarts,
        launcher="slurm",
        world_size=plan["world_size"],
    )


def _train(job: JobDir, spec, plan: dict, rank: int) -> int:
    from orchestrator.train.engine import TrainingDiverged
    from orchestrator.train.loop import train

    try:
        device = resolve_device(plan["device"])
        refusal = device_precision_refusal(device, spec.train.mixed_precision)  # device auto on a node without a GPU
        if refusal:
            raise UserError(f"{refusal} (this node has no GPU), or ask for GPUs with resources.gpus_per_node")
        outcome = train(spec, job, device, plan["tracking_uri"])
    except UserError as err:
        log.error("%s", err)
        if rank == 0:
            job.update(stop_reason=f"error: {err}")
        return EXIT_USER_ERROR
    except TrainingDiverged as err:
        log.error("training stopped: %s", err)
        if rank == 0:
            job.update(stop_reason=f"error: {err}")
        return 1
    except Exception as err:
        log.exception("training failed")
        if rank == 0:
            job.update(stop_reason=f"error: {type(err).__name__}: {err}")
        return 1
    if outcome.finished:
        if rank == 0:
            job.update(stop_reason="finished")
        return 0
    if rank == 0:
        job.update(stop_reason=f"preempted: {outcome.stop_signal} at step {outcome.step}")
    # A stop is final: torchrun would start ranks that exit non-zero again while it has restarts (max_restarts). The
    # state records the stop; under Slurm torchrun got the signal too and ends the step non-zero (the script requeues).
    return 0 if torchrun_restarts()[1] > 0 else EXIT_PREEMPTED


def exit_without_teardown(code: int) -> NoReturn:
    """End a rank whose work and records are complete without the interpreter's teardown.

    Finalising torch's distributed objects at interpreter exit can abort a rank that has finished
    (gloo threads still holding tensors: pytorch/pytorch#190489 and #179291). Seen here as "terminate
    called without an active exception" right after a job's last checkpoint, which torchrun turns into a
    failed job. The atexit handlers (inductor's compile workers, logging) still run; nothing after them does.
    """
    atexit._run_exitfuncs()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_without_teardown(main())
