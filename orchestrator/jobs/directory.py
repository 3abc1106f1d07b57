"""The job directory: the one source of truth about a job, and the one owner of its paths and state.

    runs/<job-id>/
        spec.yaml          the resolved spec (overrides applied); history in spec.<n>.yaml
        plan.json          what the last launch ran: command, environment, device, batch split
        state.json         JobRecord below, rewritten atomically under state.lock
        run.lock           flock-held by the job's supervisor while it runs (released by the kernel
                           when that process dies, however it dies)
        logs/job.log       everything the launched processes print
        logs/loss.jsonl    the loss of every logged window ({"step", "loss"} a line; a resumed run appends again
                           from its checkpoint's step, and the newest line of a step counts)
        checkpoints/step-000500/ ... and `latest`, the name of the newest complete one

No torch here: `orch list` and `orch status` read job directories in milliseconds.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from orchestrator.errors import UserError
from orchestrator.files import is_locked, locked, try_lock, write_atomic
from orchestrator.layout import JOB_STATE_FILE, LATEST_POINTER, PLAN_FILE, SPEC_FILE, TRAINER_STATE

DEFAULT_ROOT = "runs"
EXIT_PREEMPTED = 75  # a rank stopped on a signal after writing its checkpoint
EXIT_USER_ERROR = 2


class JobError(UserError):
    """A job-level mistake the user can fix (unknown job, busy job, unwritable root)."""


class JobState(str, Enum):
    """Where a job is in its life. Transitions (anything else is a bug):

    queued    -> running (its supervisor took the run lock), failed (never started)
    running   -> succeeded (all steps done), failed (a process died or raised),
                 preempted (a signal: checkpoint written, resumable), cancelled (`orch cancel`)
    preempted, failed, cancelled, succeeded -> running (`orch resume`)
    """

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    PREEMPTED = "preempted"


TRANSITIONS = {
    JobState.QUEUED: {JobState.RUNNING, JobState.FAILED, JobState.CANCELLED},
    JobState.RUNNING: {JobState.SUCCEEDED, JobState.FAILED, JobState.PREEMPTED, JobState.CANCELLED},
    JobState.PREEMPTED: {JobState.RUNNING, JobState.CANCELLED, JobState.QUEUED},  # QUEUED: resubmitted to Slurm
    JobState.FAILED: {JobState.RUNNING, JobState.CANCELLED, JobState.QUEUED},
    JobState.CANCELLED: {JobState.RUNNING, JobState.QUEUED},
    JobState.SUCCEEDED: {JobState.RUNNING, JobState.QUEUED},
}
ACTIVE_STATES = {JobState.QUEUED, JobState.RUNNING}
NEVER_STARTED_AFTER_S = 60.0


@dataclass
class JobRecord:
    """What state.json holds. The supervisor owns `state`; rank 0 of the training writes progress."""

    id: str
    name: str
    state: JobState = JobState.QUEUED
    created_at: float = 0.0
    started_at: float | None = None
    ended_at: float | None = None
    supervisor_pid: int | None = None
    launcher_pid: int | None = None
    exit_code: int | None = None
    message: str = ""
    step: int = 0
    total_steps: int = 0
    loss: float | None = None
    samples_per_sec: float | None = None
    checkpoint: str | None = None
    checkpoint_step: int | None = None
    best_step: int | None = None  # the best evaluated checkpoint (orchestrator/jobs/evaluations.ranking_metric)
    best_metric: str | None = None
    best_value: float | None = None
    mlflow_run_id: str | None = None
    mlflow_uri: str | None = None
    mlflow_experiment_id: str | None = None
    launcher: str = ""
    world_size: int = 1
    attempts: int = 0
    cancel_requested: bool = False
    stop_reason: str | None = None
    slurm_job_id: str | None = None  # launcher slurm: the job's id in Slurm (the same across requeues)
    restarts: int = 0  # launcher slurm: runs after the first (requeues after preemption, time limit, node failure)
    bad_samples: int = 0  # unreadable samples replaced in the latest run, all ranks (data.on_bad_sample skip)
    checkpoint_failures: int = 0  # checkpoints not written by the latest run (checkpoint.on_write_error continue)
    checkpoint_error: str | None = None  # why the last of them was not written
    sweep: str | None = None  # a sweep's trial: the sweep's name (orchestrator/sweeps/) and the trial's number
    sweep_trial: int | None = None
    mlflow_parent_run_id: str | None = None  # a trial's run is a child of its sweep's run (tag mlflow.parentRunId)

    def to_json(self) -> dict:
        data = dataclasses.asdict(self)
        data["state"] = self.state.value
        return data

    @classmethod
    def from_json(cls, data: dict) -> JobRecord:
        known = {f.name for f in dataclasses.fields(cls)}
        record = cls(**{k: v for k, v in data.items() if k in known})
        record.state = JobState(record.state)
        return record


class JobDir:
    """Every path of one job, and the only code that reads or writes its state."""

    def __init__(self, path: str | Path):
        self.path = Path(path).resolve()

    # ---- paths ----------------------------------------------------------------------------
    @property
    def id(self) -> str:
        return self.path.name

    @property
    def spec_file(self) -> Path:
        return self.path / SPEC_FILE

    @property
    def plan_file(self) -> Path:
        return self.path / PLAN_FILE

    @property
    def state_file(self) -> Path:
        return self.path / JOB_STATE_FILE

    @property
    def logs_dir(self) -> Path:
        return self.path / "logs"

    @property
    def log_file(self) -> Path:
        return self.logs_dir / "job.log"

    @property
    def loss_file(self) -> Path:
        return self.logs_dir / "loss.jsonl"

    def append_loss(self, step: int, loss: float) -> None:
        """Record the loss of the window ending at `step` (rank 0, at every tracking.log_every)."""
        with open(self.loss_file, "a") as handle:
            handle.write(json.dumps({"step": step, "loss": loss}) + "\n")

    def losses(self, offset: int = 0) -> tuple[list[tuple[int, float]], int]:
        """The logged (step, loss) lines from byte `offset` on, in the order written (a resumed run logs its steps
        again: the later line of a step is the newer), and the offset after the last complete line (to read on from)."""
        try:
            with open(self.loss_file, "rb") as handle:
                handle.seek(offset)
                data = handle.read()
        except FileNotFoundError:
            return [], offset
        complete = data[: data.rfind(b"\n") + 1]  # a line being written is read next time
        losses = []
        for line in complete.splitlines():
            try:
                entry = json.loads(line)
                losses.append((int(entry["step"]), float(entry["loss"])))
            except (ValueError, KeyError, TypeError):  # a line cut by a crash
                continue
        return losses, offset + len(complete)

    @property
    def ranks_dir(self) -> Path:
        """Where each rank of the current run records its host and pid (`<rank>.json`), for signals to ranks
        that are not the supervisor's descendants (started over ssh)."""
        return self.path / "ranks"

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / "checkpoints"

    @property
    def root(self) -> Path:
        return self.path.parent

    # ---- creation -------------------------------------------------------------------------
    @classmethod
    def create(cls, root: str | Path, job_id: str, name: str, spec_yaml: str, total_steps: int) -> JobDir:
        """Make a fresh job directory holding the resolved spec and a queued state."""
        root = Path(root)
        try:
            root.mkdir(parents=True, exist_ok=True)
            probe = root / f".write-test-{os.getpid()}"
            probe.write_text("")
            probe.unlink()
        except OSError as err:
            raise JobError(
                f"cannot write the job root {root}: {err.strerror}; pass --root DIR or set ORCH_ROOT to a writable "
                "folder"
            ) from None
        job = cls(root / job_id)
        job.path.mkdir()
        job.logs_dir.mkdir()
        job.checkpoints_dir.mkdir()
        write_atomic(job.spec_file, spec_yaml)
        record = JobRecord(id=job_id, name=name, created_at=time.time(), total_steps=total_steps)
        write_atomic(job.state_file, json.dumps(record.to_json(), indent=2))
        return job

    # ---- state ----------------------------------------------------------------------------
    def read(self) -> JobRecord:
        """The recorded state, as written (see `status()` for the state with liveness checked)."""
        try:
            return JobRecord.from_json(json.loads(self.state_file.read_text()))
        except FileNotFoundError:
            raise JobError(f"{self.path} is not a job directory (no state.json)") from None

    def _locked(self):
        return locked(self.path / "state.lock")

    def update(self, **fields) -> JobRecord:
        """Change recorded fields (not `state`: use transition) atomically."""
        assert "state" not in fields, "state changes go through transition()"
        return self._rewrite(None, fields)

    def transition(self, new: JobState, **fields) -> JobRecord:
        """Move to a new state, checking it is a documented transition."""
        return self._rewrite(new, fields)

    def _rewrite(self, new: JobState | None, fields: dict) -> JobRecord:
        with self._locked():
            record = self.read()
            if new is not None:
                assert new in TRANSITIONS[record.state], (
                    f"job {self.id}: {record.state.value} -> {new.value} is not a valid transition"
                )
                record.state = new
            for key, value in fields.items():
                assert hasattr(record, key), f"JobRecord has no field {key}"
                setattr(record, key, value)
            self._save(record)
        return record

    def _save(self, record: JobRecord) -> None:
        write_atomic(self.state_file, json.dumps(record.to_json(), indent=2))

    def status(self) -> JobRecord:
        """The state with liveness checked: an active job whose supervisor is gone is recorded as failed."""
        record = self.read()
        if record.state not in ACTIVE_STATES or self.is_locked():
            return record
        if record.slurm_job_id is not None:
            return self._slurm_status(record)
        if record.state == JobState.QUEUED and time.time() - record.created_at < NEVER_STARTED_AFTER_S:
            return record  # its supervisor may still be starting
        why = (
            "its processes vanished (killed, or the machine restarted)"
            if record.state == JobState.RUNNING
            else "it never started"
        )
        with self._locked():
            current = self.read()
            if current.state in ACTIVE_STATES and not self.is_locked():
                current.state = JobState.FAILED
                current.ended_at = time.time()
                current.message = f"{why}; `orch resume {self.id}` continues from the newest checkpoint"
                self._save(current)
            return current

    def _slurm_status(self, record: JobRecord) -> JobRecord:
        """An active Slurm job is alive while squeue lists it; once it does not, its last run ended unrecorded."""
        from orchestrator.jobs import slurm_queue as slurm

        if slurm.state(record.slurm_job_id) is not None:
            return record
        with self._locked():
            current = self.read()
            if current.state in ACTIVE_STATES:
                current.state = JobState.FAILED
                current.ended_at = time.time()
                current.message = (
                    f"Slurm job {current.slurm_job_id} ended without recording an outcome (see "
                    f"logs/slurm-{current.slurm_job_id}.out); "
                    f"`orch resume {self.id}` continues from the newest checkpoint"
                )
                self._save(current)
            return current

    # ---- the run lock: held by the supervisor for the job's whole run --------------------
    def try_lock_run(self):
        """Take the run lock, or return None if another live process holds it. Keep the returned file open."""
        return try_lock(self.path / "run.lock")

    def is_locked(self) -> bool:
        return is_locked(self.path / "run.lock")

    # ---- checkpoints ------------------------------------------------------------------------
    def latest_checkpoint(self) -> Path | None:
        """The newest complete checkpoint directory, or None."""
        return latest_checkpoint(self.checkpoints_dir)

    def archive_spec(self) -> Path:
        """Keep the current spec.yaml as spec.<n>.yaml before it is replaced (resume with a changed spec)."""
        n = 1
        while (self.path / f"spec.{n}.yaml").exists():
            n += 1
        target = self.path / f"spec.{n}.yaml"
        target.write_text(self.spec_file.read_text())
        return target

    def write_spec(self, spec_yaml: str) -> None:
        write_atomic(self.spec_file, spec_yaml)


# ---------------------------------------------------------------------------------------------
# Finding jobs
# ---------------------------------------------------------------------------------------------


def new_job_id(name: str) -> str:
    """`<name>-<date>-<time>-<4 hex>`: sorts by submission time, unique without a registry."""
    return f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def resolve_root(root: str | Path | None) -> Path:
    """--root, else $ORCH_ROOT, else ./runs."""
    return Path(root or os.environ.get("ORCH_ROOT") or DEFAULT_ROOT)


def list_jobs(root: Path) -> list[JobDir]:
    """Every job under the root, oldest first."""
    if not root.is_dir():
        return []
    jobs = [JobDir(p) for p in root.iterdir() if (p / JOB_STATE_FILE).is_file()]
    return sorted(jobs, key=lambda job: (job.read().created_at, job.id))


def find_job(root: Path, ref: str | None, *, unfinished: bool = False) -> JobDir:
    """A job by id, unique id prefix or path; with no ref, the newest job (the newest unfinished one if asked)."""
    if ref is not None and not ref.strip():
        raise JobError("the job id is empty; give a job id (`orch list` shows them), or none for the newest job")
    try:
        if ref and (Path(ref) / JOB_STATE_FILE).is_file():
            return JobDir(ref)
    except OSError as err:  # a name too long for the filesystem, a path through a file, ...
        raise JobError(f"no job {shown_ref(ref)}: {err.strerror}; `orch list` shows the jobs") from None
    jobs = list_jobs(root)
    if ref is None:
        if unfinished:
            jobs = [job for job in jobs if job.status().state != JobState.SUCCEEDED]
        if not jobs:
            what = "unfinished job" if unfinished else "job"
            raise JobError(f"no {what} under {root}; `orch list --root DIR` shows another root's jobs")
        return jobs[-1]
    matches = [job for job in jobs if job.id == ref] or [job for job in jobs if job.id.startswith(ref)]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise JobError(f"no job {shown_ref(ref)} under {root}; `orch list` shows the jobs")
    raise JobError(
        f"{shown_ref(ref)} matches {len(matches)} jobs ({', '.join(j.id for j in matches[:5])}); give more of the id"
    )


def shown_ref(ref: str) -> str:
    """A job or checkpoint reference as a message quotes it (cut when long)."""
    return repr(ref) if len(ref) <= 80 else f"{ref[:60]!r}... ({len(ref)} characters)"


def latest_checkpoint(directory: Path) -> Path | None:
    """The newest complete checkpoint: the `latest` pointer, else the highest complete step-N."""
    pointer = directory / LATEST_POINTER
    if pointer.is_file():
        candidate = directory / pointer.read_text().strip()
        if (candidate / TRAINER_STATE).is_file():
            return candidate
    complete = sorted(
        p for p in directory.glob("step-*") if not p.name.endswith(".tmp") and (p / TRAINER_STATE).is_file()
    )
    return complete[-1] if complete else None
