"""An evaluation of a network's samples (the `eval` section), the same in the training loop and in `orch eval`:
every rank draws its share of the samples, seeded by sample index, reads them with the feature networks, and rank 0
computes the metrics from everyone's features against the reference set's.

Sample i (0 <= i < num_samples) is drawn by rank i mod world_size, of class i mod num_classes, from noise seeded by
(eval.seed, i): the same images on any number of ranks, in the loop or offline. The evaluation uses its own
generators and runs between steps, whose global RNG is reseeded from (seed, step, rank) at every step, so a job with
evaluation trains exactly as the same job without it.

`Ranks` is what an evaluation needs of the processes it runs on: the training engine in the loop, SingleProcess in
`orch eval`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from model.diffusion import sample
from orchestrator.components.model_input import ModelInput
from orchestrator.components.sampler import SamplerSettings, indexed_noise
from orchestrator.errors import UserError
from orchestrator.evaluation.digits import digit_features_and_predictions, digits_images, load_digit_classifier
from orchestrator.evaluation.features import FeatureNetwork, load_feature_network, quantise_like_png
from orchestrator.evaluation.metrics import FeatureStats, frechet_distance, kernel_distance, precision_recall
from orchestrator.evaluation.reference import (
    ReferenceSet,
    cache_file,
    load_cached_features,
    reference_set,
    save_cached_features,
    spread,
)
from orchestrator.evaluation.weights import METRIC_NETWORK, weights_path
from orchestrator.specs.job import PRECISION_RECALL_K, JobSpec

log = logging.getLogger(__name__)

DIGIT_METRICS = ("fd_digits", "digit_accuracy")
KID_SUBSETS, KID_SUBSET_SIZE = 100, 1000  # torch-fidelity's defaults


class Ranks(Protocol):
    rank: int
    world_size: int
    is_main: bool
    device: torch.device

    def any(self, flag: bool) -> bool: ...

    def gather_to_main(self, value): ...

    def autocast(self): ...


class SingleProcess:
    """The Ranks of an evaluation in this process alone (`orch eval`), in the job's training precision."""

    rank, world_size, is_main = 0, 1, True

    def __init__(self, device: torch.device, mixed_precision: str):
        self.device = device
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)

    def any(self, flag: bool) -> bool:
        return flag

    def gather_to_main(self, value):
        return [value]

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)


@dataclass
class EvaluationResult:
    """What rank 0 learns from an evaluation: its metrics, or why it failed."""

    metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    seconds: float = 0.0


class EvaluationFailed(Exception):
    """An evaluation that cannot give figures (samples with NaN, a feature network out of memory)."""


class Evaluator:
    """What an evaluation needs, made once (on every rank): the feature networks and the reference features, so that a
    missing piece stops the job at its start, not hours in (a UserError)."""

    def __init__(
        self,
        spec: JobSpec,
        model_input: ModelInput,
        ranks: Ranks,
        num_samples: int | None = None,
        metrics: tuple[str, ...] | None = None,
        keep_samples: bool = False,
    ):
        """num_samples and metrics override the spec's (`orch eval --num --metrics`); keep_samples keeps this rank's
        samples of the last run as uint8 (N, H, W, 3) in `samples` and their classes in `sample_labels`."""
        e = spec.eval
        self.spec, self.model_input, self.ranks = spec, model_input, ranks
        self.metrics = tuple(metrics or e.metrics)
        self.num_samples = num_samples or e.num_samples
        self.settings = SamplerSettings.of(spec, model_input, e.sampler, e.steps, e.guidance_scale)
        self.indices = list(range(ranks.rank, self.num_samples, ranks.world_size))  # this rank's share
        classes = model_input.num_classes if spec.model.condition == "class" else 1
        self.labels = torch.tensor([i % classes for i in self.indices], dtype=torch.long)
        self.keep_samples = keep_samples
        self.samples: np.ndarray | None = None
        self.sample_labels = self.labels.numpy()
        self.vae = None
        if model_input.latent is not None:
            from orchestrator.components.vae import load_vae

            self.vae = load_vae(model_input.latent.vae, ranks.device)
        weights_dir = Path(e.weights_dir) if e.weights_dir else None
        networks = sorted({METRIC_NETWORK[m] for m in self.metrics if m not in DIGIT_METRICS})
        self.networks: dict[str, FeatureNetwork] = {
            name: load_feature_network(name, weights_dir, "cpu") for name in networks
        }
        self.classifier = load_digit_classifier()[0] if set(DIGIT_METRICS) & set(self.metrics) else None
        # the real images' features: rank 0 alone computes the metrics
        self.reference: dict[str, np.ndarray | None] = {}
        self.reference_stats: dict[str, FeatureStats] = {}
        if self.classifier is not None and ranks.is_main:
            real, _ = digit_features_and_predictions(self.classifier, digits_images()[0])
            self.reference["digits"] = real
            self.reference_stats["digits"] = FeatureStats.of(real)
        if self.networks:
            references = reference_set(spec)
            for name, network in self.networks.items():
                key = f"{name}:{_weights_identity(weights_path(name, weights_dir))}"
                self.reference[name] = self._reference_features(references, network, key)
            if ranks.is_main:
                self._reference_statistics(references)

    # ---- reference -------------------------------------------------------------------------------
    def _reference_features(self, references: ReferenceSet, network: FeatureNetwork, key: str) -> np.ndarray | None:
        """The reference set's features in `network` on rank 0 (None elsewhere): from the cache, else computed by all
        ranks (each its share) and cached."""
        path = cache_file(references, key)
        cached = load_cached_features(path) if self.ranks.is_main else None
        if not self.ranks.any(self.ranks.is_main and cached is None):
            return cached
        began = time.perf_counter()
        mine = list(range(self.ranks.rank, references.count, self.ranks.world_size))
        features = []
        with self._networks_on_device():
            for start in range(0, len(mine), self.spec.eval.batch_size):
                pixels = references.read(mine[start : start + self.spec.eval.batch_size])  # uint8 (B, H, W, C)
                images = torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2).float() / 127.5 - 1
                features.append(network.features(images))
        empty = np.zeros((0, network.dim))
        everyone = self.ranks.gather_to_main((np.asarray(mine, dtype=np.int64), _stack(features, empty)))
        if not self.ranks.is_main:
            return None
        order = np.argsort(np.concatenate([share[0] for share in everyone]))
        result = np.concatenate([share[1] for share in everyone])[order].astype(np.float32)
        save_cached_features(path, result, references.description)
        log.info(
            "reference features of %s in %s: %d images in %.1f s, cached in %s",
            references.description,
            network.network,
            len(result),
            time.perf_counter() - began,
            path,
        )
        return result

    def _reference_statistics(self, references: ReferenceSet) -> None:
        for name in self.networks:
            self.reference_stats[name] = FeatureStats.of(self.reference[name])
        if references.inception_stats is not None and "inception" in self.networks:
            self.reference_stats["inception"] = references.inception_stats  # the published statistics, as they are
        if "precision_recall" in self.metrics and references.count < self.num_samples:
            raise UserError(
                f"eval.metrics precision_recall compares sets of one size, and {self.num_samples} samples exceed the "
                f"{references.count} images of {references.description}: lower eval.num_samples"
            )

    @contextlib.contextmanager
    def _networks_on_device(self):
        """The feature networks on the rank's device while they work, on the host between evaluations: DINOv2-L's
        1.2 GB are not taken from training on a GPU."""
        for network in self.networks.values():
            network.module.to(self.ranks.device)
        try:
            yield
        finally:
            if self.ranks.device.type != "cpu":
                for network in self.networks.values():
                    network.module.to("cpu")

    # ---- evaluation ------------------------------------------------------------------------------
    @torch.no_grad()
    def run(self, model: torch.nn.Module, step: int) -> EvaluationResult | None:
        """The metrics of `model` (the EMA weights) on rank 0, or why they could not be computed (None on the
        other ranks). A failure on any rank fails the evaluation, not the job. Every rank calls it (collectives)."""
        began = time.perf_counter()
        mine, error = None, None
        try:
            with self._networks_on_device():
                mine = self._features_of_my_share(model)
        except Exception as err:  # out of memory, NaN samples: this evaluation has no figures; training goes on
            if isinstance(err, EvaluationFailed):
                log.error("rank %d: evaluation at step %d failed: %s", self.ranks.rank, step, err)
            else:
                log.exception("rank %d: evaluation at step %d failed", self.ranks.rank, step)
            error = (
                f"rank {self.ranks.rank}: {type(err).__name__}: {str(err).strip().splitlines()[0] if str(err) else ''}"
            )
        failed = self.ranks.any(mine is None)
        everyone = self.ranks.gather_to_main(error if failed else mine)
        if not self.ranks.is_main:
            return None
        if failed:
            reasons = [reason for reason in everyone if isinstance(reason, str)]
            return EvaluationResult(error="; ".join(reasons) or "failed", seconds=time.perf_counter() - began)
        try:
            metrics = self._metrics(everyone)
        except (EvaluationFailed, ValueError, np.linalg.LinAlgError) as err:
            return EvaluationResult(error=f"{type(err).__name__}: {err}", seconds=time.perf_counter() - began)
        seconds = time.perf_counter() - began
        metrics["eval/seconds"] = seconds
        return EvaluationResult(metrics=metrics, seconds=seconds)

    def _metrics(self, everyone: list) -> dict[str, float]:
        order = np.argsort(np.concatenate([share[0] for share in everyone]))  # sample order, any number of ranks
        features = {name: np.concatenate([share[1][name] for share in everyone])[order] for name in everyone[0][1]}
        metrics = {}
        for metric in self.metrics:
            if metric == "fd_digits":
                metrics["eval/fd_digits"] = frechet_distance(
                    FeatureStats.of(features["digits"]), self.reference_stats["digits"]
                )
            elif metric == "digit_accuracy":
                correct = np.concatenate([share[2] for share in everyone])[order]
                metrics["eval/digit_accuracy"] = float(correct.mean())
            elif metric in ("fid", "fd_dinov2"):
                network = METRIC_NETWORK[metric]
                metrics[f"eval/{metric}"] = frechet_distance(
                    FeatureStats.of(features[network]), self.reference_stats[network]
                )
            elif metric == "kid":
                kid = kernel_distance(
                    features["inception"], self.reference["inception"], KID_SUBSETS, KID_SUBSET_SIZE, seed=0
                )
                metrics["eval/kid"], metrics["eval/kid_std"] = kid.mean, kid.std
            elif metric == "precision_recall":
                real = self.reference["inception"]
                real = real[spread(len(real), self.num_samples)]  # sets of one size (Kynkaanniemi et al. 2019)
                precision, recall = precision_recall(real, features["inception"], k=PRECISION_RECALL_K)
                metrics["eval/precision"], metrics["eval/recall"] = precision, recall
        bad = [key for key, value in metrics.items() if not np.isfinite(value)]
        if bad:
            raise EvaluationFailed(f"{', '.join(bad)} came out as NaN or infinite")
        return metrics

    def _features_of_my_share(self, model: torch.nn.Module) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
        """(sample indices, their features by network, whether the digit classifier read each as its class) of this
        rank's samples."""
        device = self.ranks.device
        noise, generators = indexed_noise(self.spec.eval.seed, self.indices, self.settings.image_shape)
        batch = self.spec.eval.batch_size
        features = {name: [] for name in self.networks}
        if self.classifier is not None:
            features["digits"] = []
        correct, kept = [], []
        was_training = model.training
        model.eval()
        try:
            for start in range(0, len(self.indices), batch):
                end = min(start + batch, len(self.indices))
                labels = self.labels[start:end].to(device)
                with self.ranks.autocast():
                    x = sample(
                        model,
                        labels,
                        noise=noise[start:end].to(device),
                        generator=generators[start:end] if self.settings.sampler == "ddpm" else None,
                        **self.settings.reverse_process_args(),
                    )  # (B, C, H, W): pixels in [-1, 1], or latents
                images = x.float() if self.vae is None else self._decode(x)
                if not torch.isfinite(images).all():
                    raise EvaluationFailed("the samples hold NaN or infinite values (have the EMA weights diverged?)")
                if self.keep_samples:
                    pixels = quantise_like_png(images).expand(-1, 3, -1, -1)  # grey repeated: the ADM layout is RGB
                    kept.append(pixels.permute(0, 2, 3, 1).cpu().numpy())
                for name, network in self.networks.items():
                    features[name].append(network.features(images, batch_size=min(batch, 64)))
                if self.classifier is not None:
                    feats, predicted = digit_features_and_predictions(self.classifier, images.cpu())
                    features["digits"].append(feats)
                    correct.append(predicted == labels.cpu().numpy())
        finally:
            model.train(was_training)
        if self.keep_samples:
            self.samples = _stack(kept, np.zeros((0, 1, 1, 3), dtype=np.uint8))
        widths = {name: network.dim for name, network in self.networks.items()} | {"digits": 128}
        return (
            np.asarray(self.indices, dtype=np.int64),
            {name: _stack(rows, np.zeros((0, widths[name]))) for name, rows in features.items()},
            _stack(correct, np.zeros(0, dtype=bool)),
        )

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        from orchestrator.components.vae import decode

        return decode(self.vae, latents.float(), self.model_input.latent.scaling_factor)


def _stack(rows: list[np.ndarray], empty: np.ndarray) -> np.ndarray:
    return np.concatenate(rows) if rows else empty


def _weights_identity(path: Path) -> str:
    """What tells one weights file (or directory) from another in a cache key: its names, sizes and times."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return ";".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)
