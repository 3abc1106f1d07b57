"""The job's MLflow run, opened on global rank 0: parameters, spec and tags on the first attempt, reopened on resume."""

from __future__ import annotations

import logging
import socket
import subprocess
from pathlib import Path

from orchestrator.jobs.directory import JobDir
from orchestrator.specs.job import JobSpec
from orchestrator.tracking import NullTracker, Tracker, default_artifact_location
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
    job.update(mlflow_run_id=tracker.run_id, mlflow_uri=uri)
    return tracker


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
