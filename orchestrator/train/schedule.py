"""What a training step takes from its number alone: the learning-rate factor and the seed of its RNG."""

from __future__ import annotations

import hashlib
import math

from orchestrator.specs.job import JobSpec


def lr_factor(step: int, spec: JobSpec) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based): warmup, then the schedule."""
    t = spec.train
    if step < t.warmup_steps:
        return (step + 1) / t.warmup_steps
    if t.lr_schedule == "constant":
        return 1.0
    progress = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if t.lr_schedule == "cosine" else 1 - progress
    return t.min_lr_ratio + (1 - t.min_lr_ratio) * decay


def step_seed(seed: int, step: int, rank: int) -> int:
    """A seed for the global RNG at one step of one rank."""
    digest = hashlib.blake2b(f"{seed}:{step}:{rank}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1
