"""In-loop evaluation of the EMA weights (the `eval` section): every rank draws its share of the samples, seeded by
sample index, reads them with the feature network, and rank 0 computes the metrics from everyone's features.

Sample i (0 <= i < num_samples) is drawn by rank i mod world_size, of class i mod num_classes, from noise seeded by
(eval.seed, i): the same images on any number of ranks. The evaluation uses its own generators and runs between
steps, whose global RNG is reseeded from (seed, step, rank) at every step, so a job with evaluation trains exactly
as the same job without it.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from model.diffusion import sample
from orchestrator.components.model_input import ModelInput
from orchestrator.components.sampler import SamplerSettings, indexed_noise
from orchestrator.evaluation.digits import digit_features_and_predictions, digits_images, load_digit_classifier
from orchestrator.evaluation.metrics import FeatureStats, frechet_distance
from orchestrator.specs.job import JobSpec
from orchestrator.train.engine import Engine

log = logging.getLogger(__name__)


class Evaluator:
    """What an evaluation needs, made once at the start of the job (on every rank): the feature network and the
    real data's statistics, so that a missing piece stops the job at once, not hours in."""

    def __init__(self, spec: JobSpec, model_input: ModelInput, engine: Engine):
        e = spec.eval
        self.spec, self.model_input, self.engine = spec, model_input, engine
        self.settings = SamplerSettings.of(spec, model_input, e.sampler, e.steps, e.guidance_scale)
        self.indices = list(range(engine.rank, e.num_samples, engine.world_size))  # this rank's share
        classes = model_input.num_classes if spec.model.condition == "class" else 1
        self.labels = torch.tensor([i % classes for i in self.indices], dtype=torch.long)
        self.classifier, accuracy = load_digit_classifier()  # every rank reads its own samples with it
        self.reference = None  # the real digits' statistics: rank 0 alone computes the metrics
        if engine.is_main:
            log.info("digit classifier for evaluation: held-out accuracy %.4f", accuracy)
            real, _ = digit_features_and_predictions(self.classifier, digits_images()[0])
            self.reference = FeatureStats.of(real)

    @torch.no_grad()
    def run(self, ema_model: torch.nn.Module, step: int) -> dict[str, float] | None:
        """The metrics of the EMA weights at `step` on rank 0 (None on the others, and where the evaluation failed:
        it is logged and training goes on). Every rank calls it (collectives)."""
        began = time.perf_counter()
        mine = None
        try:
            mine = self._features_of_my_share(ema_model)
        except Exception:
            log.exception("rank %d: evaluation at step %d failed; training goes on without it", self.engine.rank, step)
        if self.engine.any(mine is None):
            return None
        everyone = self.engine.gather_to_main(mine)
        if not self.engine.is_main:
            return None
        indices = np.concatenate([share[0] for share in everyone])
        order = np.argsort(indices)  # sample order, whatever the number of ranks
        features = np.concatenate([share[1] for share in everyone])[order]
        correct = np.concatenate([share[2] for share in everyone])[order]
        metrics = {}
        if "fd_digits" in self.spec.eval.metrics:
            metrics["eval/fd_digits"] = frechet_distance(FeatureStats.of(features), self.reference)
        if "digit_accuracy" in self.spec.eval.metrics:
            metrics["eval/digit_accuracy"] = float(correct.mean())
        metrics["eval/seconds"] = time.perf_counter() - began
        return metrics

    def _features_of_my_share(self, ema_model: torch.nn.Module) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(sample indices, their features, whether the classifier read each as its class) of this rank's samples."""
        device = self.engine.device
        noise, generators = indexed_noise(self.spec.eval.seed, self.indices, self.settings.image_shape)
        batch = self.spec.eval.batch_size
        features, correct = [], []
        was_training = ema_model.training
        ema_model.eval()
        try:
            for start in range(0, len(self.indices), batch):
                end = min(start + batch, len(self.indices))
                labels = self.labels[start:end].to(device)
                with self.engine.autocast():
                    images = sample(
                        ema_model,
                        labels,
                        noise=noise[start:end].to(device),
                        generator=generators[start:end] if self.settings.sampler == "ddpm" else None,
                        **self.settings.reverse_process_args(),
                    )  # (B, C, H, W) in [-1, 1]
                feats, predicted = digit_features_and_predictions(self.classifier, images.float().cpu())
                features.append(feats)
                correct.append(predicted == labels.cpu().numpy())
        finally:
            ema_model.train(was_training)
        empty = np.zeros((0, 128))
        return (
            np.asarray(self.indices, dtype=np.int64),
            np.concatenate(features) if features else empty,
            np.concatenate(correct) if correct else np.zeros(0, dtype=bool),
        )
