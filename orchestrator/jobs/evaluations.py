"""A job's evaluations as they lie in its directory, and the best checkpoints they rank (no torch here: `orch status`
and `--checkpoint best` read them instantly).

    runs/<job>/eval/step-N.json          an in-loop evaluation of the EMA weights at step N
    runs/<job>/eval/offline-step-N.json  `orch eval` of checkpoint step-N

Each file is one EvaluationRecord. An evaluation that failed (out of memory, a NaN) has `error` set and no metrics.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from orchestrator.errors import UserError
from orchestrator.evaluation.reference import reference_problems
from orchestrator.evaluation.weights import METRIC_NETWORK, missing_weights_message
from orchestrator.files import write_atomic
from orchestrator.layout import EVAL_DIR, TRAINER_STATE, checkpoint_name
from orchestrator.specs.job import HIGHER_IS_BETTER, JobSpec, spec_from_dict


@dataclass
class EvaluationRecord:
    step: int
    source: str  # "in-loop" or "offline"
    metrics: dict[str, float] = field(default_factory=dict)
    num_samples: int = 0
    sampler: str = ""
    sampler_steps: int = 0
    guidance_scale: float = 1.0
    seed: int = 0
    error: str | None = None  # why the evaluation failed; then metrics is empty

    @property
    def file_name(self) -> str:
        prefix = "offline-" if self.source == "offline" else ""
        return f"{prefix}{checkpoint_name(self.step)}.json"

    def write(self, job_path: Path) -> Path:
        folder = job_path / EVAL_DIR
        folder.mkdir(exist_ok=True)
        path = folder / self.file_name
        write_atomic(path, json.dumps(asdict(self), indent=2))
        return path


def read_evaluations(job_path: Path) -> list[EvaluationRecord]:
    """Every evaluation record of the job, by step (a file that cannot be read as one is skipped)."""
    records = []
    for path in sorted((job_path / EVAL_DIR).glob("*.json")):
        try:
            records.append(EvaluationRecord(**json.loads(path.read_text())))
        except (OSError, ValueError, TypeError):
            continue
    return sorted(records, key=lambda record: (record.step, record.source))


@dataclass(frozen=True)
class RankedCheckpoint:
    step: int
    metric: str
    value: float
    path: Path


def ranking_metric(spec: JobSpec) -> str | None:
    """The metric `best` means: checkpoint.keep_best's, else the first one the evaluations log."""
    if spec.checkpoint.keep_best is not None:
        return spec.checkpoint.keep_best.metric
    keys = [key for key in spec.eval.metric_keys if not key.endswith("_std")]
    return keys[0] if keys and spec.eval.every else None


def best_checkpoints(job_path: Path, metric: str, count: int | None = None) -> list[RankedCheckpoint]:
    """Checkpoints that still exist, best first by `metric` (in-loop and offline evaluations of a step agree; the
    in-loop one is taken where both exist)."""
    by_step: dict[int, float] = {}
    for record in read_evaluations(job_path):
        value = record.metrics.get(metric)
        if value is None or value != value:  # missing, or NaN
            continue
        if record.source == "in-loop" or record.step not in by_step:
            by_step[record.step] = value
    checkpoints = job_path / "checkpoints"
    ranked = [
        RankedCheckpoint(step, metric, value, checkpoints / checkpoint_name(step))
        for step, value in by_step.items()
        if (checkpoints / checkpoint_name(step) / TRAINER_STATE).is_file()
    ]
    ranked.sort(key=lambda c: (-c.value if metric in HIGHER_IS_BETTER else c.value, c.step))
    return ranked[:count] if count is not None else ranked


def steps_to_keep(job_path: Path, spec: JobSpec) -> set[int]:
    """The steps of the checkpoints checkpoint.keep_best protects from pruning."""
    keep_best = spec.checkpoint.keep_best
    if keep_best is None:
        return set()
    return {c.step for c in best_checkpoints(job_path, keep_best.metric, keep_best.count)}


class NoEvaluation(UserError):
    """`--checkpoint best` on a job without a usable evaluation."""


def best_checkpoint(job_path: Path, spec: JobSpec) -> RankedCheckpoint:
    metric = ranking_metric(spec)
    if metric is None:
        raise NoEvaluation(
            f"job {job_path.name} does not evaluate (its spec has no eval.every), so no checkpoint is the best; name "
            "one (--checkpoint step-N), or evaluate them with `orch eval "
            f"{job_path.name} --checkpoint all --metrics ...`"
        )
    ranked = best_checkpoints(job_path, metric, 1)
    if not ranked:
        raise NoEvaluation(
            f"job {job_path.name} has no evaluation of {metric} for a checkpoint that still exists; wait for one "
            f"(every eval.every = {spec.eval.every} steps), or run `orch eval {job_path.name} --checkpoint all`"
        )
    return ranked[0]


def evaluation_problems(spec: JobSpec) -> list[str]:
    """What stops the spec's evaluation on this machine: feature-network weights that are not there, a reference
    batch that is missing or does not fit (checked at `orch validate`/`submit`, never at step 10,000)."""
    if spec.eval.every is None:
        return []
    weights_dir = Path(spec.eval.weights_dir) if spec.eval.weights_dir else None
    networks = sorted({METRIC_NETWORK[m] for m in spec.eval.metrics if m in METRIC_NETWORK})
    missing = [missing_weights_message(network, weights_dir) for network in networks]
    return [message for message in missing if message] + reference_problems(spec)


def offline_spec(spec: JobSpec, overrides: dict) -> JobSpec:
    """The spec `orch eval` evaluates with: the checkpoint's, with the given eval fields (num_samples, metrics,
    reference, sampler, steps, guidance_scale; None keeps the spec's) over its eval section, validated like a spec
    (SpecError, a UserError, when they do not fit the job)."""
    raw = spec.to_dict()
    raw["eval"]["every"] = raw["eval"]["every"] or spec.train.steps  # offline: the section's checks apply
    raw["checkpoint"]["keep_best"] = None  # nothing is pruned offline
    raw["eval"].update({key: value for key, value in overrides.items() if value is not None})
    return spec_from_dict(raw, source="orch eval's options on the job's spec")
