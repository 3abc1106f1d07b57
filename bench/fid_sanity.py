"""The Fréchet distance behind orch's evaluation, checked on real data: orch's formula against pytorch-fid's
(scipy's matrix square root) on the same features, and the digits' FD between two halves of the real digits
against the FD between the digits and noise images. Prints the figures; no download.

    .venv/bin/python bench/fid_sanity.py
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import scipy.linalg
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchestrator.evaluation.digits import (  # noqa: E402
    digit_features_and_predictions,
    digits_images,
    load_digit_classifier,
)
from orchestrator.evaluation.metrics import FeatureStats, frechet_distance, kernel_distance  # noqa: E402


def pytorch_fid_formula(a: FeatureStats, b: FeatureStats) -> float:
    diff = a.mean - b.mean
    covmean = scipy.linalg.sqrtm(a.cov @ b.cov)
    return float(diff @ diff + np.trace(a.cov) + np.trace(b.cov) - 2 * np.trace(covmean.real))


def main() -> None:
    with tempfile.TemporaryDirectory() as cache:
        began = time.perf_counter()
        model, accuracy = load_digit_classifier(Path(cache))
        trained_in = time.perf_counter() - began
    images, labels = digits_images()
    features, predictions = digit_features_and_predictions(model, images)
    generator = torch.Generator().manual_seed(0)
    noise, _ = digit_features_and_predictions(model, torch.rand(len(labels), 1, 8, 8, generator=generator) * 2 - 1)
    blurred, _ = digit_features_and_predictions(model, torch.nn.functional.avg_pool2d(images, 3, 1, 1))

    real, half_a, half_b = FeatureStats.of(features), FeatureStats.of(features[::2]), FeatureStats.of(features[1::2])
    print(f"digit classifier: trained in {trained_in:.1f} s, held-out accuracy {accuracy:.4f}")
    print(f"accuracy on all 1797 digits: {(predictions == labels.numpy()).mean():.4f}")
    print(f"FD(digits, half vs half)     {frechet_distance(half_a, half_b):10.3f}")
    print(f"FD(digits, 3x3 blurred)      {frechet_distance(real, FeatureStats.of(blurred)):10.3f}")
    print(f"FD(digits, uniform noise)    {frechet_distance(real, FeatureStats.of(noise)):10.3f}")
    print(f"KID(digits, half vs half)    {kernel_distance(features[::2], features[1::2], subset_size=500).mean:10.5f}")
    print(f"KID(digits, uniform noise)   {kernel_distance(features, noise, subset_size=500).mean:10.5f}")
    worst = 0.0
    rng = np.random.default_rng(0)
    for trial in range(5):  # random halves of the real features and noise: orch's formula vs pytorch-fid's
        order = rng.permutation(len(features))
        for a, b in ((features[order[:900]], features[order[900:]]), (features, noise)):
            sa, sb = FeatureStats.of(a), FeatureStats.of(b)
            ours, theirs = frechet_distance(sa, sb), pytorch_fid_formula(sa, sb)
            worst = max(worst, abs(ours - theirs) / abs(theirs))
    print(f"orch vs pytorch-fid formula, largest relative difference over 10 pairs: {worst:.2e}")


if __name__ == "__main__":
    main()
