"""Does the demo model draw the digit it is asked for? A classifier trained on the real digits
judges samples from a job's EMA weights, per sampler and guidance scale.

    .venv/bin/python bench/demo_quality.py runs/<dit-digits job>   [--per-class 50]

Prints the share of samples the classifier recognises as the requested class (chance: 10 %).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors.torch import load_file
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.svm import SVC

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.diffusion import make_noise_scheduler, sample  # noqa: E402
from orchestrator.components.model import build_model  # noqa: E402
from orchestrator.components.model_input import pixel_input  # noqa: E402
from orchestrator.jobs.directory import JobDir  # noqa: E402
from orchestrator.specs.job import spec_from_dict  # noqa: E402


def digit_classifier() -> tuple[SVC, float]:
    """An RBF SVM on the 8x8 digits; returns it and its held-out accuracy on real digits."""
    digits = load_digits()
    x = digits.images.reshape(len(digits.images), -1) / 16.0
    x_train, x_test, y_train, y_test = train_test_split(x, digits.target, test_size=0.25, random_state=0)
    classifier = SVC(gamma=0.05 * 16, C=10).fit(x_train, y_train)
    return classifier, classifier.score(x_test, y_test)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("job_dir")
    parser.add_argument("--per-class", type=int, default=50)
    args = parser.parse_args()
    job = JobDir(args.job_dir)
    spec = spec_from_dict(yaml.safe_load(job.spec_file.read_text()))
    assert spec.data.source == "digits" and spec.data.resolution == 8, "this bench judges 8x8 digits models"
    checkpoint = job.latest_checkpoint()
    model = build_model(spec, pixel_input(spec, num_classes=10))
    model.load_state_dict(load_file(checkpoint / "ema.safetensors"))
    model.eval()
    classifier, real_accuracy = digit_classifier()
    print(f"job {job.id}, {checkpoint.name}; classifier accuracy on held-out real digits: {real_accuracy:.1%}")
    scheduler = make_noise_scheduler(
        spec.diffusion.num_train_timesteps,
        spec.diffusion.beta_schedule,
        spec.diffusion.beta_start,
        spec.diffusion.beta_end,
    )
    labels = torch.arange(10).repeat_interleave(args.per_class)
    for sampler, steps, guidance in (("ddpm", 1000, 1.0), ("ddim", 50, 1.0), ("ddim", 50, 2.0), ("ddim", 50, 4.0)):
        start = time.perf_counter()
        images = sample(
            model,
            labels,
            (1, 8, 8),
            scheduler,
            sampler=sampler,
            num_steps=steps,
            guidance_scale=guidance,
            null_label=10,
            generator=torch.Generator().manual_seed(0),
            clip_denoised=True,
        )
        seconds = time.perf_counter() - start
        pixels = ((images.clamp(-1, 1) + 1) / 2).reshape(len(labels), -1).numpy()
        accuracy = float(np.mean(classifier.predict(pixels) == labels.numpy()))
        print(
            f"{sampler}-{steps:<5} guidance {guidance:>3}: {accuracy:6.1%} recognised as the requested digit "
            f"({len(labels)} samples, {seconds:.1f} s)"
        )


if __name__ == "__main__":
    main()
