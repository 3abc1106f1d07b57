"""The job's MLflow run, opened on global rank 0: parameters, spec and tags on the first attempt, reopened on resume."""

from __future__ import annotations

import logging
import socket
import subprocess
import time
from pathlib import Path

from orchestrator.jobs.directory import JobDir
from orchestrator.specs.job import JobSpec
from orchestrator.tracking import NullTracker, Tracker, default_artifact_location, first_line
from orchestrator.train.engine import Engine

log = logging.getLogger(__name__)


def start_tracker(spec: JobSpec, job: JobDir, engine: Engine, uri: str | None, resumed: bool) -> Tracker:
    """MLflow on global rank 0 (one run per job, reopened on resume); a no-op elsewhere or if it fails."""
    if not engine.is_main or uri is None:
        return NullTracker()
    from orchestrator.tracking import MlflowTracker

    record = job.read()
    tags = {
        "orch.job_id": job.id,
        "orch.git_commit": _git_commit(),
        "orch.host": socket.gethostname(),
        "orch.launcher": record.launcher,
        "orch.world_size": str(engine.world_size),
        "orch.attempt": str(record.attempts),
        "orch.restarts": str(record.restarts),
        "orch.job_dir": str(job.path),
        "mlflow.note.content": run_description(spec, job),  # the run page's Description
    }
    if record.slurm_job_id is not None:
        tags.update({"orch.slurm_job_id": record.slurm_job_id, "orch.slurm_restarts": str(record.restarts)})
    if record.mlflow_parent_run_id is not None:  # a sweep's trial: a child of the sweep's run in the compare view
        tags.update(
            {
                "mlflow.parentRunId": record.mlflow_parent_run_id,
                "orch.sweep": record.sweep or "",
                "orch.sweep_trial": str(record.sweep_trial),
            }
        )
    try:
        tracker = MlflowTracker.start(
            uri,
            spec.tracking.experiment,
            run_name=job.id,
            run_id=record.mlflow_run_id,
            artifact_location=default_artifact_location(job.root) if uri.startswith("sqlite:") else None,
            tags=tags,
        )
    except Exception as err:  # tracking never stops training
        log.warning("MLflow unavailable at %s (%s): training goes on without tracking", uri, err)
        return NullTracker()
    if record.mlflow_run_id is None:
        tracker.log_params(spec.applicable_params())
        tracker.log_text(spec.to_yaml(), "spec.yaml")
    elif resumed:
        tracker.log_text(spec.to_yaml(), f"spec.attempt-{record.attempts}.yaml")
    tracker.set_tags(tags)
    job.update(mlflow_run_id=tracker.run_id, mlflow_uri=uri, mlflow_experiment_id=tracker.experiment_id)
    return tracker


class SystemMetrics:
    """MLflow's own system-metrics monitor (mlflow.system_metrics: CPU, memory, disk, network, and GPU through
    nvidia-ml-py), one per node, run by the node's first rank into the job's run under system/node<k>/: the one
    place where a rank other than global rank 0 writes to MLflow, as only each node can see its own machine."""

    def __init__(self, monitor, spec: JobSpec, uri: str, run_id: str, node: int):
        self.monitor = monitor
        self.spec, self.uri, self.run_id, self.node = spec, uri, run_id, node
        self.next_revival = 0.0  # time.monotonic() before which no new monitor is tried

    @classmethod
    def start(
        cls, spec: JobSpec, uri: str | None, run_id: str | None, node: int, resumed: bool
    ) -> SystemMetrics | None:
        """A started monitor, or None (system metrics off, no run, or MLflow refused: a warning, training goes on)."""
        if uri is None or run_id is None or not spec.tracking.system_metrics:
            return None
        try:
            monitor = _started_monitor(spec, uri, run_id, node, resume_logging=resumed)
        except Exception as err:  # noqa: BLE001 - tracking never stops training
            log.warning("MLflow system metrics unavailable (%s); training goes on", err)
            return None
        return cls(monitor, spec, uri, run_id, node)

    def revive(self) -> bool:
        """Start a new monitor if MLflow's has stopped on its own (it ends for good at the first request the server
        does not answer); its steps go on after the last one logged. Tried at most once a sampling interval; True if
        one was started. Called at each logged window."""
        thread = self.monitor._process  # MLflow 3.17: the sampling thread, None once finished
        if thread is None or thread.is_alive() or time.monotonic() < self.next_revival:
            return False
        self.next_revival = time.monotonic() + self.spec.tracking.system_metrics_every_s
        try:
            from mlflow import MlflowClient

            # asked here first: MLflow's resume_logging reads the last step as 0 when the server does not answer,
            # and the new monitor would log its steps again from 0
            MlflowClient(self.uri).get_run(self.run_id)
            self.monitor = _started_monitor(self.spec, self.uri, self.run_id, self.node, resume_logging=True)
        except Exception:  # noqa: BLE001 - the server is still away: tried again later
            return False
        log.info("MLflow system metrics resumed (the monitor had stopped while the server was unreachable)")
        return True

    def close(self) -> None:
        """Stop sampling and log a last sample (a job shorter than the interval has one too)."""
        try:
            self.monitor.finish()
            self.monitor.collect_metrics()
            self.monitor.publish_metrics(self.monitor.aggregate_metrics())
            self.monitor.mlflow_logger.flush()
        except Exception as err:  # noqa: BLE001 - tracking never stops training
            log.warning("MLflow system metrics: the last sample was not logged (%s)", err)


def _started_monitor(spec: JobSpec, uri: str, run_id: str, node: int, resume_logging: bool):
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(
        run_id,
        sampling_interval=spec.tracking.system_metrics_every_s,
        resume_logging=resume_logging,  # its steps go on after the last ones logged to the run
        node_id=f"node{node}",
        tracking_uri=uri,
    )
    monitor.start()
    return monitor


def log_trained_model(spec: JobSpec, job: JobDir, tracker: Tracker, step: int) -> None:
    """At the end of a finished job, after tracker.close(): the newest checkpoint as the run's MLflow model `model`
    (orchestrator/trained/mlflow_model.py), registered as tracking.register_as if set. Training is done: nothing here
    may fail the job, so every failure is a warning naming `orch export --to-mlflow`, which logs it later. A server
    that close() waited for in vain is not tried again; one that dies meanwhile fails fast (one 5 s request timeout,
    no retries: MLFLOW_CLIENT_ENV)."""
    uri, run_id = getattr(tracker, "uri", None), tracker.run_id
    if not spec.tracking.log_model or uri is None or run_id is None:
        return
    later = f"`orch export {job.id} --to-mlflow` logs it once the server is back"
    if not getattr(tracker, "reachable", True):
        log.warning("the trained model was not logged to MLflow: the server at %s is unreachable; %s", uri, later)
        return
    checkpoint = job.latest_checkpoint()
    if checkpoint is None:
        return
    started = time.monotonic()
    try:
        from orchestrator.trained.mlflow_model import log_model

        info = log_model(checkpoint, uri, run_id, register_as=spec.tracking.register_as, step=step)
    except Exception as err:  # noqa: BLE001 - the job trained; logging its model never fails it
        log.warning("the trained model was not logged to MLflow run %s (%s); %s", run_id, first_line(err), later)
        return
    registered = f", registered as {spec.tracking.register_as} version {info.registered_model_version}"
    log.info(
        "trained model %s logged to MLflow run %s as %s%s (%.1f s)",
        checkpoint.name,
        run_id,
        info.model_uri,
        registered if spec.tracking.register_as else "",
        time.monotonic() - started,
    )


def run_description(spec: JobSpec, job: JobDir) -> str:
    """The run's description in the MLflow UI: the spec's `description`, else what the job trains."""
    model = spec.model.preset or (f"{spec.model.arch} depth {spec.model.depth} width {spec.model.hidden_size}")
    if spec.model.arch == "unet":
        model = "DDPM U-Net"
    summary = (
        f"{model}, {spec.diffusion.objective} objective, {spec.data.source} data, {spec.train.steps} steps "
        f"(orch job {job.id}, {job.path})"
    )
    return f"{spec.description}\n\n{summary}" if spec.description else summary


def _git_commit() -> str:
    """The commit of the orch checkout that runs this job, or 'unknown'."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"
