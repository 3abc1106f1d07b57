"""`orch eval`: the evaluation of a job's checkpoints after (or beside) training, in this process, with the code of
the in-loop evaluation (orchestrator/evaluation/evaluator.py): same checkpoint, seed and sample count, same figures.

Each evaluated checkpoint gets eval/offline-step-N.json in the job directory and its metrics in the job's MLflow run
at the checkpoint's step, beside the in-loop ones; write_npz also writes the samples in the ADM suite's layout
(`arr_0` uint8 N x H x W x 3, `arr_1` the class labels) for users who evaluate with it.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from orchestrator.evaluation.evaluator import EvaluationResult, Evaluator, SingleProcess
from orchestrator.jobs.evaluations import EvaluationRecord
from orchestrator.layout import EVAL_DIR, TRAINER_STATE, checkpoint_name
from orchestrator.specs.job import JobSpec
from orchestrator.trained.sampling import default_device, load_model, model_input_of

log = logging.getLogger(__name__)


def checkpoint_step(checkpoint: Path) -> int:
    """The training step a checkpoint directory was written at."""
    return int(json.loads((checkpoint / TRAINER_STATE).read_text())["step"])


def evaluate_checkpoints(
    spec: JobSpec,
    checkpoints: list[Path],
    job_path: Path,
    write_npz: bool = False,
    device: str | None = None,
    report: Callable[[EvaluationRecord], None] = lambda record: None,
) -> list[EvaluationRecord]:
    """Evaluate the EMA weights of each checkpoint (all of one job, evaluated under `spec`); each record is written
    to the job directory and handed to `report` as soon as it is known."""
    device = torch.device(device or default_device())
    ranks = SingleProcess(device, spec.train.mixed_precision)
    evaluator = None
    records = []
    for checkpoint in checkpoints:
        model = load_model(spec, checkpoint, ema=True, device=device)
        if evaluator is None:  # the feature networks and reference features, once for all checkpoints
            evaluator = Evaluator(spec, model_input_of(spec, checkpoint), ranks, keep_samples=write_npz)
        step = checkpoint_step(checkpoint)
        result: EvaluationResult = evaluator.run(model, step)
        settings = evaluator.settings
        record = EvaluationRecord(
            step=step,
            source="offline",
            metrics=result.metrics,
            num_samples=evaluator.num_samples,
            sampler=settings.sampler,
            sampler_steps=settings.steps,
            guidance_scale=settings.guidance_scale,
            seed=spec.eval.seed,
            error=result.error,
        )
        record.write(job_path)
        if write_npz and result.error is None:
            _write_adm_npz(samples_file(job_path, step), evaluator)
        records.append(record)
        report(record)
        del model
    return records


def _write_adm_npz(path: Path, evaluator: Evaluator) -> None:
    """The samples as the ADM suite reads them: arr_0 uint8 (N, H, W, 3) in sample order, arr_1 their labels."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
    np.savez(tmp, arr_0=evaluator.samples, arr_1=evaluator.sample_labels)
    os.replace(tmp, path)
    log.info("samples written to %s", path)


def samples_file(job_path: Path, step: int) -> Path:
    return job_path / EVAL_DIR / f"samples-{checkpoint_name(step)}.npz"
