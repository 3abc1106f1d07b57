"""A sweep's folder: the one owner of its paths and its state (no optuna, no torch: `orch sweep status` and
`cancel` find a sweep in milliseconds).

    runs/sweeps/<name>/
        sweep.yaml       the resolved sweep spec
        base_spec.yaml   the job spec every trial starts from (the sweep's `set` applied)
        state.json       SweepRecord below, rewritten atomically under state.lock
        run.lock         flock-held by the sweep's process while it runs (released when it dies, however it dies)
        optuna.db        Optuna's study (the default storage; a database URL puts it elsewhere)
        sweep.log        what a detached sweep prints
        ask.lock         flock-held while a process asks Optuna for a trial (the count of trials stays exact)
        workers/<id>.lock  flock-held by each live process running trials (the sweep's own, and `orch sweep join`s);
                         a trial's Optuna attribute `worker` names its process, so a trial whose process died is
                         found and taken over

The trials are ordinary jobs beside the other jobs of the root: `<root>/<name>-tNNN/`.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

from orchestrator.errors import UserError
from orchestrator.files import is_locked, locked, try_lock, write_atomic

SWEEPS_DIR = "sweeps"
ACTIVE = "running"
ENDED = ("finished", "cancelled", "failed")


class SweepError(UserError):
    """A sweep-level mistake the user can fix (unknown sweep, name in use, storage that cannot be opened)."""


@dataclass
class SweepRecord:
    """What state.json holds; the sweep's process owns it while it runs."""

    name: str
    state: str = ACTIVE  # running -> finished | cancelled | failed (its process vanished); resume: back to running
    created_at: float = 0.0
    started_at: float | None = None
    ended_at: float | None = None
    pid: int | None = None
    storage: str = ""
    n_trials: int = 0
    parent_run_id: str | None = None
    tracking_uri: str | None = None
    experiment: str | None = None
    experiment_id: str | None = None
    cancel_requested: bool = False
    message: str = ""

    @classmethod
    def from_json(cls, data: dict) -> SweepRecord:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


class SweepDir:
    """Every path of one sweep, and the only code that reads or writes its state."""

    def __init__(self, path: str | Path):
        self.path = Path(path).resolve()

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def root(self) -> Path:
        """The job root the trials are created in."""
        return self.path.parent.parent

    @property
    def spec_file(self) -> Path:
        return self.path / "sweep.yaml"

    @property
    def base_spec_file(self) -> Path:
        return self.path / "base_spec.yaml"

    @property
    def state_file(self) -> Path:
        return self.path / "state.json"

    @property
    def log_file(self) -> Path:
        return self.path / "sweep.log"

    def default_storage(self) -> str:
        return f"sqlite:///{self.path / 'optuna.db'}"

    def trial_job_id(self, number: int) -> str:
        return f"{self.name}-t{number:03d}"

    @classmethod
    def create(cls, root: Path, name: str, sweep_yaml: str, base_yaml: str) -> SweepDir:
        """A fresh sweep folder holding its specs and a running state; SweepError if the name is taken."""
        sweep = cls(sweep_path(root, name))
        try:
            sweep.path.mkdir(parents=True)
        except FileExistsError:
            raise name_in_use(root, name) from None
        except OSError as err:
            raise SweepError(f"cannot create the sweep folder {sweep.path}: {err.strerror}") from None
        write_atomic(sweep.spec_file, sweep_yaml)
        write_atomic(sweep.base_spec_file, base_yaml)
        sweep._save(SweepRecord(name=name, created_at=time.time()))
        return sweep

    def read(self) -> SweepRecord:
        try:
            return SweepRecord.from_json(json.loads(self.state_file.read_text()))
        except FileNotFoundError:
            raise SweepError(f"{self.path} is not a sweep folder (no state.json)") from None

    def _locked(self):
        return locked(self.path / "state.lock")

    def update(self, **fields) -> SweepRecord:
        with self._locked():
            record = self.read()
            for key, value in fields.items():
                assert hasattr(record, key), f"SweepRecord has no field {key}"
                setattr(record, key, value)
            self._save(record)
        return record

    def _save(self, record: SweepRecord) -> None:
        write_atomic(self.state_file, json.dumps(dataclasses.asdict(record), indent=2))

    def status(self) -> SweepRecord:
        """The state with liveness checked: a running sweep whose process is gone is recorded as failed."""
        record = self.read()
        if record.state != ACTIVE or self.is_locked():
            return record
        if record.started_at is None and time.time() - record.created_at < 60:
            return record  # its process may still be starting
        with self._locked():
            current = self.read()
            if current.state == ACTIVE and not self.is_locked():
                current.state = "failed"
                current.ended_at = time.time()
                current.message = (
                    f"the sweep's process vanished; `orch sweep resume {self.name}` continues it (running trials go on)"
                )
                self._save(current)
            return current

    def asking(self):
        """Held while a trial is asked for: one process at a time counts the trials and adds one."""
        return locked(self.path / "ask.lock")

    def _worker_lock(self, worker: str) -> Path:
        folder = self.path / "workers"
        folder.mkdir(exist_ok=True)
        return folder / f"{worker}.lock"

    def try_lock_worker(self, worker: str):
        """Take a worker's lock (one's own, or that of a dead worker whose trials are taken over), or None if a live
        process holds it. Keep the returned file open."""
        return try_lock(self._worker_lock(worker))

    def try_lock_run(self):
        """Take the run lock, or None if a live process holds it. Keep the returned file open."""
        return try_lock(self.path / "run.lock")

    def is_locked(self) -> bool:
        return is_locked(self.path / "run.lock")


def sweep_path(root: Path, name: str) -> Path:
    return Path(root) / SWEEPS_DIR / name


def name_in_use(root: Path, name: str) -> SweepError:
    return SweepError(
        f"a sweep named {name!r} already exists under {Path(root) / SWEEPS_DIR}; choose another --name, or `orch sweep "
        f"status {name}` / `orch sweep resume {name}`"
    )


def find_sweep(root: Path, name: str) -> SweepDir:
    """A sweep by name (or its folder); SweepError naming the sweeps there are otherwise."""
    if (Path(name) / "state.json").is_file() and (Path(name) / "sweep.yaml").is_file():
        return SweepDir(name)
    path = sweep_path(root, name)
    if (path / "state.json").is_file():
        return SweepDir(path)
    known = sorted(p.name for p in (Path(root) / SWEEPS_DIR).glob("*") if (p / "state.json").is_file())
    listed = f" (sweeps there: {', '.join(known)})" if known else ""
    raise SweepError(f"no sweep {name!r} under {Path(root) / SWEEPS_DIR}{listed}")
