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
    if t.lr_schedule == "one_cycle":
        return one_cycle_factor(step, t.steps, t.one_cycle)
    # the first update after the warmup trains at the peak, the last (0-based step train.steps - 1) at the floor
    progress = min(1.0, (step - t.warmup_steps) / max(1, t.steps - 1 - t.warmup_steps))
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if t.lr_schedule == "cosine" else 1 - progress
    return t.min_lr_ratio + (1 - t.min_lr_ratio) * decay


def step_seed(seed: int, step: int, rank: int) -> int:
    """A seed for the global RNG at one step of one rank."""
    digest = hashlib.blake2b(f"{seed}:{step}:{rank}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def one_cycle_factor(step: int, total_steps: int, cycle) -> float:
    """torch's OneCycleLR (two phases, three_phase off) as a multiple of max_lr after `step` scheduler steps: from
    1/div_factor up to 1 over pct_start of the steps, then down to 1/(div_factor x final_div_factor) at the last."""
    start = 1 / cycle.div_factor
    end = start / cycle.final_div_factor
    peak_at = float(cycle.pct_start * total_steps) - 1
    last = total_steps - 1
    if step <= peak_at:
        low, high, pct = start, 1.0, step / peak_at if peak_at > 0 else 1.0
    else:
        low, high, pct = 1.0, end, (step - peak_at) / (last - peak_at)
    if cycle.anneal == "cos":
        return high + (low - high) / 2 * (1 + math.cos(math.pi * pct))
    return (high - low) * pct + low
