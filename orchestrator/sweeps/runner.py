"""A sweep on Optuna: its samplers pick each trial's values, its storage keeps the study (sqlite in the sweep's folder,
or a database URL), its pruners stop bad trials; what is written here is only the glue to orch's jobs.

Each trial is an ordinary job (`<root>/<sweep>-tNNN/`: own directory, resumable, cancellable, its own MLflow run),
started as `orch submit --detach` starts one (or submitted to Slurm), with the trial's values as `--set` overrides.
The sweep's process asks Optuna for a trial (`study.ask`), starts its job, watches the job's directory (state,
evaluations, logs/loss.jsonl) and tells Optuna how it ended (`study.tell`): the objective's value, failed, or
pruned. Up to `max_parallel` trials run at once, each on a share of this machine of its own (its GPUs and cores:
`machine_shares`; Slurm places its jobs itself). Killed, the sweep leaves its trials running; `orch sweep resume
NAME` finds them by their jobs' directories, waits for them (restarting any whose processes vanished) and goes on.
`orch sweep join NAME` runs trials of the same study from another process or machine; every runner holds a worker
lock and takes over the trials of a runner that died.

In MLflow the sweep is one parent run (its spec, search space, and the best trial so far) and every trial's run is
its child (tag `mlflow.parentRunId`), so the experiment's compare view shows the trials together.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import yaml

from orchestrator.errors import UserError
from orchestrator.jobs import submission
from orchestrator.jobs.directory import ACTIVE_STATES, JobDir, JobRecord, JobState
from orchestrator.jobs.evaluations import read_evaluations
from orchestrator.jobs.plan import (
    PLACEABLE_LAUNCHERS,
    Placement,
    gpu_visible,
    make_plan,
    require_runnable,
    visible_gpu_count,
)
from orchestrator.jobs.submission import keep_user_files, request_cancel, submit_to_slurm
from orchestrator.jobs.supervisor import write_plan
from orchestrator.specs.job import JobSpec, parse_spec
from orchestrator.specs.sweep import SweepSpec, check_trials, trial_overrides, trial_spec
from orchestrator.sweeps.directory import ACTIVE, SweepDir, SweepError, SweepRecord, name_in_use, sweep_path
from orchestrator.tracking import MLFLOW_CLIENT_ENV, default_artifact_location, first_line, resolve_tracking_uri

if TYPE_CHECKING:
    import optuna

log = logging.getLogger(__name__)
POLL_S = 0.5
TAKEOVER_EVERY_S = 5.0  # how often a runner looks for trials whose worker died
CANCEL_WAIT_S = 600.0
Echo = Callable[[str], None]


# ---- creating a sweep: every check before anything starts ---------------------------------------


def create_sweep(root: Path, sweep: SweepSpec, base_text: str) -> SweepDir:
    """Check the sweep (its name, every trial's spec, that the first trial can run here, the storage, the tracking
    server) and record it; SpecError / SweepError / PlanError before any trial starts, leaving nothing behind."""
    root = Path(root)
    if sweep_path(root, sweep.name).exists() or any(root.glob(f"{sweep.name}-t[0-9][0-9][0-9]/state.json")):
        raise name_in_use(root, sweep.name)
    base = trial_spec(sweep, base_text, {})
    specs = check_trials(sweep, base_text)
    require_runnable(make_plan(specs[0], (root / f"{sweep.name}-t000").resolve(), root.resolve()))
    sweep_dir = SweepDir.create(root, sweep.name, sweep.to_yaml(), base_text)
    try:
        storage = sweep.storage or sweep_dir.default_storage()
        open_study(sweep, storage, create=True)
        fields = {"storage": storage, "n_trials": sweep.n_trials}
        if base.tracking.enabled:
            uri = resolve_tracking_uri(base.tracking.uri, sweep_dir.root)
            parent = ParentRun.create(uri, base, sweep, sweep_dir)
            fields.update(
                parent_run_id=parent.run_id,
                tracking_uri=uri,
                experiment=base.tracking.experiment,
                experiment_id=parent.experiment_id,
            )
        sweep_dir.update(**fields)
    except BaseException:
        shutil.rmtree(sweep_dir.path, ignore_errors=True)
        raise
    return sweep_dir


def open_study(sweep: SweepSpec, storage: str, create: bool = False) -> optuna.Study:
    """The sweep's Optuna study with its sampler and pruner (neither is stored: both are made again on every open)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if sweep.method == "grid":
        space = {key: list(axis.values) for key, axis in sweep.space.items()}
        sampler = _GridSampler(space, seed=sweep.seed)
    elif sweep.method == "random":
        sampler = optuna.samplers.RandomSampler(seed=sweep.seed)
    else:
        sampler = optuna.samplers.TPESampler(seed=sweep.seed, n_startup_trials=max(1, min(10, sweep.n_trials // 2)))
    pruner = (
        optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=sweep.pruner_warmup_steps)
        if sweep.pruner == "median"
        else optuna.pruners.NopPruner()
    )
    try:
        if create:
            return optuna.create_study(
                storage=storage,
                study_name=sweep.name,
                direction=sweep.objective.resolved_direction,
                sampler=sampler,
                pruner=pruner,
            )
        return optuna.load_study(storage=storage, study_name=sweep.name, sampler=sampler, pruner=pruner)
    except optuna.exceptions.DuplicatedStudyError:
        raise SweepError(
            f"the Optuna storage {storage} already holds a study named {sweep.name!r}; choose another --name"
        ) from None
    except KeyError:
        raise SweepError(f"the Optuna storage {storage} holds no study {sweep.name!r}") from None
    except Exception as err:  # a malformed URL, a missing driver, a database that refuses: all the user's to fix
        raise SweepError(
            f"the Optuna storage {storage} cannot be opened: {first_line(err)}; give a database URL that this machine "
            "can reach (sqlite:///path.db, postgresql://..., mysql://...) or leave storage empty"
        ) from None


def _grid_sampler_class():
    import optuna

    class GridSampler(optuna.samplers.GridSampler):
        """Optuna's GridSampler for ask-and-tell: its after_trial calls study.stop() once the grid is covered, which
        raises outside study.optimize; the sweep counts its trials itself."""

        def after_trial(self, study, trial, state, values) -> None:
            return None

    return GridSampler


def _GridSampler(space, seed):  # noqa: N802 - a class made lazily (optuna is not imported with this module)
    return _grid_sampler_class()(space, seed=seed)


# ---- the parent run in MLflow -------------------------------------------------------------------


class ParentRun:
    """The sweep's MLflow run: the sweep's spec and search space, each trial's objective, the best trial so far.
    Written synchronously from the sweep's process; a failure after its creation is a warning, never a stop."""

    def __init__(self, uri: str, run_id: str, experiment_id: str | None = None):
        for name, value in MLFLOW_CLIENT_ENV.items():
            os.environ.setdefault(name, value)
        from mlflow import MlflowClient

        self.uri, self.run_id, self.experiment_id = uri, run_id, experiment_id
        self.client = MlflowClient(tracking_uri=uri)

    @classmethod
    def create(cls, uri: str, base: JobSpec, sweep: SweepSpec, sweep_dir: SweepDir) -> ParentRun:
        for name, value in MLFLOW_CLIENT_ENV.items():
            os.environ.setdefault(name, value)
        from mlflow import MlflowClient
        from mlflow.entities import Param

        from orchestrator.tracking import get_or_create_experiment

        client = MlflowClient(tracking_uri=uri)
        axes = ", ".join(f"{key} {axis.describe()}" for key, axis in sorted(sweep.space.items()))
        objective = f"{sweep.objective.resolved_direction} {sweep.objective.key}"
        note = sweep.description or f"Sweep of {base.name} ({sweep.method}, {sweep.n_trials} trials) over {axes}."
        note += f"\n\nObjective: {objective}. Trials are this run's children; sweep folder: {sweep_dir.path}"
        if base.description:
            note += f"\n\n{base.name}: {base.description}"
        tags = {
            "orch.sweep": sweep.name,
            "orch.sweep_dir": str(sweep_dir.path),
            "orch.kind": "sweep",
            "mlflow.note.content": note,
        }
        params = {
            "sweep.method": sweep.method,
            "sweep.trials": sweep.n_trials,
            "sweep.objective": objective,
            "sweep.max_parallel": sweep.max_parallel,
            "sweep.pruner": sweep.pruner,
            "sweep.seed": sweep.seed,
            "sweep.spec": base.name,
            **{f"space.{key}": axis.describe() for key, axis in sweep.space.items()},
            **{f"set.{o.partition('=')[0]}": o.partition("=")[2] for o in sweep.set},
        }
        artifacts = default_artifact_location(sweep_dir.root) if uri.startswith("sqlite:") else None
        try:
            experiment_id = get_or_create_experiment(client, base.tracking.experiment, artifacts)
            run_id = client.create_run(experiment_id, run_name=sweep.name, tags=tags).info.run_id
            client.log_batch(run_id, params=[Param(key, str(value)[:6000]) for key, value in params.items()])
            client.log_text(run_id, sweep.to_yaml(), "sweep.yaml")
            client.log_text(run_id, base.to_yaml(), "spec.yaml")
        except Exception as err:
            raise SweepError(
                f"could not create the sweep's MLflow run in experiment {base.tracking.experiment!r} at {uri}: "
                f"{first_line(err)}; check tracking.uri / MLFLOW_TRACKING_URI (or set tracking.enabled: false)"
            ) from None
        return cls(uri, run_id, experiment_id)

    def _try(self, what: str, call: Callable[[], object]) -> None:
        try:
            call()
        except Exception as err:  # noqa: BLE001 - tracking never stops the sweep
            log.warning("MLflow: could not %s of sweep run %s at %s: %s", what, self.run_id, self.uri, first_line(err))

    def set_status(self, status: str) -> None:
        if status == "RUNNING":
            self._try("reopen", lambda: self.client.update_run(self.run_id, status="RUNNING"))
        else:
            self._try("end", lambda: self.client.set_terminated(self.run_id, status))

    def record(self, key: str, number: int, value: float | None, best: dict | None, finished: int) -> None:
        """A trial's objective (at step = its number) and the best trial so far (tags, and best/<key> at step =
        trials finished)."""
        from mlflow.entities import Metric, RunTag

        now = int(time.time() * 1000)
        metrics = [Metric(key, value, now, number)] if value is not None else []
        tags = []
        if best is not None:
            metrics.append(Metric(f"best/{key}", best["value"], now, finished))
            tags = [RunTag(f"orch.best_{name}", str(best[name])) for name in ("trial", "job", "value", "overrides")]
            if best.get("run_id"):
                tags.append(RunTag("orch.best_run_id", best["run_id"]))
        self._try("log trial results", lambda: self.client.log_batch(self.run_id, metrics=metrics, tags=tags))


# ---- running --------------------------------------------------------------------------------------


@dataclass
class RunningTrial:
    trial: optuna.trial.Trial
    job: JobDir
    reported: set[int] = field(default_factory=set)
    pruned_at: int | None = None
    share: Placement | None = None  # its share of this machine (None: the whole machine)
    holds_share: bool = True  # whether it holds one of this runner's shares (given back when it ends)
    loss_offset: int = 0  # how far logs/loss.jsonl has been read


def load_sweep(sweep_dir: SweepDir) -> tuple[SweepSpec, str]:
    """The recorded sweep spec and base spec text of a sweep folder."""
    sweep = SweepSpec.model_validate(yaml.safe_load(sweep_dir.spec_file.read_text()))
    return sweep, sweep_dir.base_spec_file.read_text()


def run_sweep(sweep_dir: SweepDir, echo: Echo = print) -> SweepRecord:
    """Run (or continue) a sweep until its trials are done or it is cancelled; the ending state."""
    lock = sweep_dir.try_lock_run()
    if lock is None:
        raise SweepError(
            f"sweep {sweep_dir.name} is already running (pid {sweep_dir.read().pid}); `orch sweep cancel "
            f"{sweep_dir.name}` stops it"
        )
    try:
        previous = sweep_dir.read()
        resumed = previous.started_at is not None
        record = sweep_dir.update(
            state=ACTIVE,
            pid=os.getpid(),
            started_at=time.time(),
            ended_at=None,
            message="",
            cancel_requested=previous.cancel_requested and not resumed,
        )
        sweep, base_yaml = load_sweep(sweep_dir)
        study = open_study(sweep, record.storage)
        parent = ParentRun(record.tracking_uri, record.parent_run_id) if record.parent_run_id else None
        if parent is not None and resumed:
            parent.set_status("RUNNING")
        runner = _Runner(sweep_dir, sweep, base_yaml, study, parent, echo, owns_sweep=True)
        state = runner.run()
        summary = runner.summary()
        if parent is not None:
            parent.set_status({"finished": "FINISHED", "cancelled": "KILLED"}.get(state, "FAILED"))
        echo(f"sweep {sweep.name}: {state} — {summary}")
        return sweep_dir.update(state=state, ended_at=time.time(), message=summary)
    finally:
        lock.close()


def join_sweep(sweep_dir: SweepDir, max_parallel: int | None = None, echo: Echo = print) -> int:
    """Run trials of a running sweep from another process (`orch sweep join`, say on another node sharing the job root
    and a database storage): it asks the same study for trials until all are started, runs its own (at most
    `max_parallel` at once on this machine), and ends when they are done; the trials it ran."""
    record = sweep_dir.status()
    if record.state != ACTIVE:
        raise SweepError(
            f"sweep {sweep_dir.name} is {record.state}, not running; `orch sweep resume {sweep_dir.name}` continues it"
        )
    sweep, base_yaml = load_sweep(sweep_dir)
    if max_parallel is not None:
        sweep = sweep.model_copy(update={"max_parallel": max_parallel})
    study = open_study(sweep, record.storage)
    parent = ParentRun(record.tracking_uri, record.parent_run_id) if record.parent_run_id else None
    runner = _Runner(sweep_dir, sweep, base_yaml, study, parent, echo, owns_sweep=False)
    state = runner.run()
    echo(f"sweep {sweep.name}: worker {runner.worker} {state} after {len(runner.ran)} trial(s): {runner.summary()}")
    return len(runner.ran)


class _StopSignals:
    """SIGINT, SIGTERM and SIGHUP ask the sweep to stop: it cancels its running trials (they checkpoint) and ends."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self) -> _StopSignals:
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


class _Runner:
    """One process running a sweep's trials: the sweep's own (`owns_sweep`: it ends when every trial of the study has
    ended, and records the sweep's end) or a joined one (it ends when its own trials have). Each holds a worker lock;
    trials whose worker died are taken over by whichever live runner sees them first."""

    def __init__(
        self, sweep_dir: SweepDir, sweep: SweepSpec, base_yaml: str, study, parent, echo: Echo, owns_sweep: bool
    ):
        self.sweep_dir, self.sweep, self.base_yaml, self.study, self.parent, self.echo = (
            sweep_dir,
            sweep,
            base_yaml,
            study,
            parent,
            echo,
        )
        self.root = sweep_dir.root
        self.key = sweep.objective.key
        self.running: dict[int, RunningTrial] = {}
        self.stop: _StopSignals | None = None
        self.owns_sweep = owns_sweep
        self.worker = f"{socket.gethostname()}-{os.getpid()}"
        self.worker_locks: list = []  # its own, then those of workers taken over (taken by run())
        self.workers_taken_over = {self.worker}
        self.ran: set[int] = set()  # the trials this process started or took over
        self.free_shares: list[Placement | None] = []  # one per trial that may start now (set by run())

    def run(self) -> str:
        """The loop, stopped by SIGINT/SIGTERM/SIGHUP; the worker locks are let go at the end. The ending state."""
        self.worker_locks.append(self.sweep_dir.try_lock_worker(self.worker))
        self.free_shares = trial_shares(self.sweep, check_trials(self.sweep, self.base_yaml))
        if len(self.free_shares) < self.sweep.max_parallel:
            self.echo(
                f"sweep {self.sweep.name}: {len(self.free_shares)} trial(s) at once, not max_parallel "
                f"{self.sweep.max_parallel}: each trial needs GPUs of its own (launcher deepspeed: its runner picks "
                "them, one trial at a time)"
            )
        with _StopSignals() as stop:
            self.stop = stop
            try:
                return self.loop()
            finally:
                self.release()

    def release(self) -> None:
        for lock in self.worker_locks:
            if lock is not None:
                lock.close()

    # -- the loop
    def loop(self) -> str:
        from optuna.trial import TrialState

        next_takeover = 0.0
        while True:
            if (self.stop is not None and self.stop.requested) or self.sweep_dir.read().cancel_requested:
                self.cancel_running()
                return "cancelled"
            if time.time() >= next_takeover:
                self.take_over_orphans()
                next_takeover = time.time() + TAKEOVER_EVERY_S
            self.poll()
            all_started = False
            while self.free_shares:
                trial = self.ask()
                if trial is None:
                    all_started = True
                    break
                self.start_trial(trial)
            if all_started and not self.running:
                # the sweep's own process waits for the trials other processes still run (it may take them over)
                if not self.owns_sweep or not self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                    return "finished"
            time.sleep(POLL_S)

    def ask(self):
        """A new trial of the study for this process, or None once the sweep's trials have all been started (counted
        under the sweep's ask lock, so runners on several machines never start more than `trials`)."""
        with self.sweep_dir.asking():
            if len(self.study.get_trials(deepcopy=False)) >= self.sweep.n_trials:
                return None
            trial = self.study.ask()
            trial.set_user_attr("worker", self.worker)
        return trial

    def start_trial(self, trial) -> None:
        import optuna

        self.ran.add(trial.number)
        params = {}
        for key in sorted(self.sweep.space):
            axis = self.sweep.space[key]
            if axis.loguniform is not None:
                params[key] = trial.suggest_float(key, *axis.loguniform, log=True)
            else:
                params[key] = trial.suggest_categorical(key, axis.values)
        overrides = trial_overrides(params)
        job_id = self.sweep_dir.trial_job_id(trial.number)
        trial.set_user_attr("job_id", job_id)
        trial.set_user_attr("overrides", overrides)
        share = self.free_shares[0]
        try:
            spec = trial_spec(self.sweep, self.base_yaml, params, f"trial {job_id}")
            the_plan = make_plan(spec, (self.root / job_id).resolve(), self.root.resolve(), placement=share)
            require_runnable(the_plan)
        except UserError as err:  # checked for every grid point before the start; drawn values or a changed machine
            trial.set_user_attr("error", str(err))
            self.study.tell(trial, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
            self.echo(f"trial {trial.number} ({' '.join(overrides)}): cannot start: {err}")
            return
        job = JobDir.create(self.root, job_id, spec.name, spec.to_yaml(), spec.train.steps)
        keep_user_files(job, spec)
        write_plan(job, the_plan)
        record = self.sweep_dir.read()
        job.update(sweep=self.sweep.name, sweep_trial=trial.number, mlflow_parent_run_id=record.parent_run_id)
        self._launch(job, the_plan.launcher)
        self.running[trial.number] = RunningTrial(trial, job, share=self.free_shares.pop(0))
        on = f" on {share.describe()}" if share is not None else ""
        self.echo(f"trial {trial.number} ({job_id}): {' '.join(overrides)}: started{on}")

    def _launch(self, job: JobDir, launcher: str) -> None:
        if launcher == "slurm":
            slurm_job_id = submit_to_slurm(job)
            self.echo(f"  {job.id}: Slurm job {slurm_job_id}")
        else:
            submission.start_detached(job)

    def poll(self) -> None:
        for number, running in list(self.running.items()):
            record = running.job.status()
            self._report(running, record)
            if record.state in ACTIVE_STATES:
                continue
            del self.running[number]
            if running.holds_share:
                self.free_shares.append(running.share)
            self._finish(running, record)

    def _report(self, running: RunningTrial, record: JobRecord) -> None:
        """Give Optuna the trial's new intermediate values (the loss of every logged window, read on from where the
        last poll stopped, or every in-loop evaluation): trials report at the same steps, multiples of
        tracking.log_every or eval.every, which is what the median pruner compares. Cancel the trial's job if the
        pruner says so."""
        if self.key == "loss":
            values, running.loss_offset = running.job.losses(running.loss_offset)
        else:
            values = evaluation_values(self.key, running.job)
        for step, value in values:
            if step in running.reported or not math.isfinite(value):
                continue
            running.trial.report(value, step)
            running.reported.add(step)
            if (
                self.sweep.pruner != "none"
                and running.pruned_at is None
                and record.state in ACTIVE_STATES
                and running.trial.should_prune()
            ):
                running.pruned_at = step
                request_cancel(running.job, record)
                self.echo(
                    f"trial {running.trial.number} ({running.job.id}): pruned at step {step} ({self.key} {value:.4g})"
                )

    def _finish(self, running: RunningTrial, record: JobRecord) -> None:
        from optuna.trial import TrialState

        trial, number = running.trial, running.trial.number
        value = None
        if running.pruned_at is not None:
            trial.set_user_attr("outcome", f"pruned at step {running.pruned_at}")
            self.study.tell(trial, state=TrialState.PRUNED, skip_if_finished=True)
            outcome = "pruned"
        elif record.state == JobState.SUCCEEDED:
            value = objective_value(self.key, running.job, record)
            if value is None or not math.isfinite(value):
                trial.set_user_attr("error", f"the job logged no finite {self.key}")
                self.study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
                outcome, value = f"failed: the job logged no finite {self.key}", None
            else:
                self.study.tell(trial, value, skip_if_finished=True)
                outcome = f"{self.key} {value:.6g}"
        else:
            trial.set_user_attr("error", f"job {record.state.value}: {record.message}")
            self.study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
            outcome = f"{record.state.value}: {record.message}"
        best = self.best()
        marker = " (best so far)" if best is not None and best["trial"] == number and value is not None else ""
        self.echo(f"trial {number} ({running.job.id}): {outcome}{marker}")
        if self.parent is not None:
            finished = sum(t.state.is_finished() for t in self.study.get_trials(deepcopy=False))
            self.parent.record(self.key, number, value, best, finished)

    def best(self) -> dict | None:
        """The best completed trial: number, job, value, overrides, MLflow run id."""
        try:
            trial = self.study.best_trial
        except ValueError:  # no completed trial yet
            return None
        job_id = trial.user_attrs.get("job_id", self.sweep_dir.trial_job_id(trial.number))
        run_id = None
        job_path = self.root / job_id
        if (job_path / "state.json").is_file():
            run_id = JobDir(job_path).read().mlflow_run_id
        overrides = " ".join(trial.user_attrs.get("overrides", []))
        return {"trial": trial.number, "job": job_id, "value": trial.value, "overrides": overrides, "run_id": run_id}

    def cancel_running(self) -> None:
        """Cancel every running trial (each checkpoints and stops, resumable as a job); Optuna records it failed."""
        from optuna.trial import TrialState

        if self.running:
            self.echo(f"sweep {self.sweep.name}: cancelling {len(self.running)} running trial(s)")
        for running in self.running.values():
            record = running.job.status()
            if record.state in ACTIVE_STATES:
                request_cancel(running.job, record)
        deadline = time.time() + CANCEL_WAIT_S
        while time.time() < deadline and any(
            r.job.is_locked() or r.job.status().state in ACTIVE_STATES for r in self.running.values()
        ):
            time.sleep(0.2)
        for running in self.running.values():
            record = running.job.status()
            running.trial.set_user_attr("error", f"cancelled with the sweep (job {record.state.value})")
            self.study.tell(running.trial, state=TrialState.FAIL, skip_if_finished=True)
            self.echo(f"trial {running.trial.number} ({running.job.id}): cancelled ({record.state.value})")
        self.running.clear()

    def take_over_orphans(self) -> None:
        """Take over the running trials whose worker died (the sweep's own process before a resume, or a joined one):
        wait for those whose jobs still run, restart those whose processes vanished, record the ones that ended
        meanwhile. Trials with no worker recorded are the sweep's own process's to take."""
        import optuna
        from optuna.trial import TrialState

        for frozen in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if frozen.number in self.running:
                continue
            owner = frozen.user_attrs.get("worker")
            if owner is None:
                if not self.owns_sweep:
                    continue
            elif owner not in self.workers_taken_over:  # this process's own lock reads as held, too
                lock = self.sweep_dir.try_lock_worker(owner)
                if lock is None:  # alive, or another runner took it over
                    continue
                self.worker_locks.append(lock)  # held: the others see that worker's trials as looked after
                self.workers_taken_over.add(owner)
            self.ran.add(frozen.number)
            trial = optuna.trial.Trial(self.study, frozen._trial_id)
            job_path = self.root / self.sweep_dir.trial_job_id(frozen.number)
            if not (job_path / "state.json").is_file():
                trial.set_user_attr("error", "the sweep stopped before the trial's job was created")
                self.study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
                continue
            job = JobDir(job_path)
            record = job.status()
            vanished = record.state in (JobState.FAILED, JobState.PREEMPTED) or (
                record.state == JobState.QUEUED and not job.is_locked() and record.slurm_job_id is None
            )
            held, share = self._claim_share(job, or_any=vanished)
            running = RunningTrial(trial, job, reported=set(frozen.intermediate_values), share=share, holds_share=held)
            self.running[frozen.number] = running
            if not vanished:
                self.echo(f"trial {frozen.number} ({job.id}): {record.state.value}; following it")
                continue
            self.echo(f"trial {frozen.number} ({job.id}): was {record.state.value}; resuming it")
            try:  # planned again here: the trial's worker may have run it on another machine
                spec = parse_spec(job.spec_file.read_text(), source=str(job.spec_file))
                the_plan = make_plan(spec, job.path, job.root, placement=share)
                require_runnable(the_plan)
            except UserError as err:
                del self.running[frozen.number]
                if held:
                    self.free_shares.append(share)
                trial.set_user_attr("error", f"cannot resume: {err}")
                self.study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
                self.echo(f"trial {frozen.number} ({job.id}): cannot resume: {err}")
                continue
            write_plan(job, the_plan)
            self._launch(job, the_plan.launcher)

    def _claim_share(self, job: JobDir, or_any: bool) -> tuple[bool, Placement | None]:
        """The free share a trial's job was planned on (its plan.json's cores and GPUs), taken from the free ones; if
        none matches and `or_any`, the first free one; (False, None) when none is taken (a trial followed from another
        machine, or no share free: it runs on the whole machine)."""
        import json

        plan = json.loads(job.plan_file.read_text()) if job.plan_file.is_file() else {}
        gpus = plan.get("command", {}).get("env", {}).get("CUDA_VISIBLE_DEVICES")
        for share in self.free_shares:
            if (
                share is not None
                and list(share.cpus) == plan.get("cpus")
                and share.gpus == (tuple(gpus.split(",")) if gpus is not None else None)
            ):
                self.free_shares.remove(share)
                return True, share
        if or_any and self.free_shares:
            return True, self.free_shares.pop(0)
        return False, None

    def summary(self) -> str:
        from optuna.trial import TrialState

        trials = self.study.get_trials(deepcopy=False)
        counts = {state: sum(t.state == state for t in trials) for state in TrialState}
        text = (
            f"{counts[TrialState.COMPLETE]} completed, {counts[TrialState.FAIL]} failed, "
            f"{counts[TrialState.PRUNED]} pruned of {self.sweep.n_trials}"
        )
        best = self.best()
        if best is not None:
            text += f"; best: trial {best['trial']} ({best['job']}: {best['overrides']}) {self.key} {best['value']:.6g}"
        return text


# ---- sharing one machine between side-by-side trials --------------------------------------------------


def trial_shares(sweep: SweepSpec, specs: list[JobSpec]) -> list[Placement | None]:
    """The shares of this machine the sweep's trials run on, one per trial that may run at once: launcher slurm (Slurm
    places its jobs) or one trial at a time, `max_parallel` times None (the whole machine); else `machine_shares` of
    the visible GPUs and this process's CPU cores, for trials of as many ranks as the largest trial has."""
    resources = specs[0].resources
    if sweep.max_parallel == 1 or resources.launcher == "slurm":
        return [None] * sweep.max_parallel
    if any(spec.resources.launcher not in ("auto", *PLACEABLE_LAUNCHERS) for spec in specs):
        return [None]  # DeepSpeed's runner picks its GPUs itself: one trial at a time
    on_gpu = resources.device == "cuda" or (resources.device == "auto" and gpu_visible())
    gpus = visible_gpu_names() if on_gpu else None
    cores = tuple(sorted(os.sched_getaffinity(0)))
    return machine_shares(sweep.max_parallel, max(spec.resources.processes for spec in specs), gpus, cores)


def machine_shares(
    parallel: int, ranks: int, gpus: tuple[str, ...] | None, cores: tuple[int, ...]
) -> list[Placement | None]:
    """Split one machine for `parallel` trials of `ranks` ranks each. With GPUs: shares of `ranks` GPUs each (as many as
    the GPUs allow, at most `parallel`; one whole machine if not even one share fits) with the cores split in the same
    proportion. On CPU: the cores split evenly, or `parallel` times the whole machine when there are fewer cores than
    trials."""
    if gpus is not None:
        count = len(gpus) // ranks
        if count <= 1:
            return [None]
        per_share = len(cores) // count
        return [
            Placement(gpus=gpus[i * ranks : (i + 1) * ranks], cpus=cores[i * per_share : (i + 1) * per_share] or cores)
            for i in range(min(parallel, count))
        ]
    if parallel > len(cores):
        return [None] * parallel
    per_share = len(cores) // parallel
    return [Placement(gpus=None, cpus=cores[i * per_share : (i + 1) * per_share]) for i in range(parallel)]


def visible_gpu_names() -> tuple[str, ...]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES names them (indices, or GPU-/MIG- UUIDs)."""
    chosen = os.environ.get("CUDA_VISIBLE_DEVICES")
    if chosen is not None and chosen.strip():
        return tuple(entry.strip() for entry in chosen.split(",") if entry.strip())
    return tuple(str(i) for i in range(visible_gpu_count() or 0))


# ---- what a trial's job reports -------------------------------------------------------------------


def objective_value(key: str, job: JobDir, record: JobRecord) -> float | None:
    """The objective of a finished trial: the last logged loss, or the job's last in-loop evaluation of `key`."""
    if key == "loss":
        return record.loss
    values = evaluation_values(key, job)
    return values[-1][1] if values else None


def evaluation_values(key: str, job: JobDir) -> list[tuple[int, float]]:
    """(step, value) of every in-loop evaluation of `key` so far."""
    return [
        (r.step, float(r.metrics[key]))
        for r in read_evaluations(job.path)
        if r.source == "in-loop" and r.error is None and key in r.metrics
    ]


# ---- cancelling, detaching -------------------------------------------------------------------------


def cancel_sweep(sweep_dir: SweepDir, wait: bool = True, timeout: float = CANCEL_WAIT_S, echo: Echo = print) -> None:
    """Stop a sweep: its running trials checkpoint and stop (each resumable as a job), Optuna records them failed, no
    new trial starts. A sweep whose process is gone (killed) has its still-running trials cancelled from here."""
    sweep_dir.update(cancel_requested=True)
    record = sweep_dir.read()
    if sweep_dir.is_locked():
        if record.pid:
            os.kill(record.pid, signal.SIGTERM)  # its process cancels the running trials
        deadline = time.time() + timeout
        while wait and sweep_dir.is_locked() and time.time() < deadline:
            time.sleep(0.2)
        return
    lock = sweep_dir.try_lock_run()
    if lock is None:  # it started again meanwhile; it will see cancel_requested
        return
    try:
        from optuna.trial import TrialState

        sweep, base_text = load_sweep(sweep_dir)
        study = open_study(sweep, record.storage)
        parent = ParentRun(record.tracking_uri, record.parent_run_id) if record.parent_run_id else None
        runner = _Runner(sweep_dir, sweep, base_text, study, parent, echo, owns_sweep=True)
        import optuna

        for frozen in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            job_path = sweep_dir.root / sweep_dir.trial_job_id(frozen.number)
            if (job_path / "state.json").is_file():
                runner.running[frozen.number] = RunningTrial(
                    optuna.trial.Trial(study, frozen._trial_id), JobDir(job_path)
                )
        runner.cancel_running()
        if parent is not None:
            parent.set_status("KILLED")
        sweep_dir.update(state="cancelled", ended_at=time.time(), message=runner.summary())
    finally:
        lock.close()


def start_detached(sweep_dir: SweepDir) -> None:
    """Run the sweep in the background (`python -m orchestrator.sweeps.runner DIR`, its output in sweep.log)."""
    import subprocess

    with open(sweep_dir.log_file, "ab") as log_file:
        subprocess.Popen(
            [sys.executable, "-m", "orchestrator.sweeps.runner", str(sweep_dir.path)],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.time() + 30
    while time.time() < deadline and not sweep_dir.is_locked() and sweep_dir.read().state == ACTIVE:
        time.sleep(0.05)


# ---- reading a sweep (status) ---------------------------------------------------------------------


def trial_rows(sweep_dir: SweepDir) -> tuple[SweepSpec, SweepRecord, list[dict]]:
    """The sweep, its record, and one row per trial: number, job, overrides, state, step, objective, best."""
    from optuna.trial import TrialState

    sweep, _ = load_sweep(sweep_dir)
    record = sweep_dir.status()
    study = open_study(sweep, record.storage)
    trials = study.get_trials(deepcopy=False)
    best_number = None
    completed = [t for t in trials if t.state == TrialState.COMPLETE]
    if completed:
        pick = min if sweep.objective.resolved_direction == "minimize" else max
        best_number = pick(completed, key=lambda t: t.value).number
    rows = []
    for trial in trials:
        job_id = trial.user_attrs.get("job_id", sweep_dir.trial_job_id(trial.number))
        job_path = sweep_dir.root / job_id
        job_record = JobDir(job_path).status() if (job_path / "state.json").is_file() else None
        state = trial.state.name.lower()
        if trial.state == TrialState.RUNNING and job_record is not None:
            state = job_record.state.value
        value = trial.value
        if value is None and trial.intermediate_values:
            value = trial.intermediate_values[max(trial.intermediate_values)]
        rows.append(
            {
                "trial": trial.number,
                "job": job_id,
                "overrides": trial.user_attrs.get("overrides") or trial_overrides(trial.params),
                "state": state,
                "step": job_record.step if job_record else None,
                "total_steps": job_record.total_steps if job_record else None,
                "objective": value,
                "best": trial.number == best_number,
                "error": trial.user_attrs.get("error"),
                "worker": trial.user_attrs.get("worker"),
                "mlflow_run_id": job_record.mlflow_run_id if job_record else None,
            }
        )
    return sweep, record, rows


def main(argv: list[str] | None = None) -> int:
    """`python -m orchestrator.sweeps.runner SWEEP_DIR`: a detached sweep (`orch sweep --detach`)."""
    args = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    record = run_sweep(SweepDir(args[0]), echo=lambda line: print(line, flush=True))
    return 0 if record.state == "finished" else 1


if __name__ == "__main__":
    sys.exit(main())
