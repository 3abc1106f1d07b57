"""Samples found unreadable while training (data.on_bad_sample skip): replaced in their batch, counted, named.

A replaced sample takes the place of the next readable sample of the same micro batch, so batch shapes stay fixed
and the replacement is a function of the data alone: a resumed run replaces exactly what the uninterrupted one did.
No torch here: the shard workers and the image datasets share it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from orchestrator.data.imagefolder import DataError


@dataclass(frozen=True)
class BadSample:
    """A sample that could not be read, and why (the message names the file, shard or row)."""

    reason: str


def replace_bad(samples: list[Any]) -> tuple[list[Any], tuple[str, ...]]:
    """The batch with each BadSample replaced by the next readable sample (cyclically), and the reasons replaced."""
    reasons = tuple(sample.reason for sample in samples if isinstance(sample, BadSample))
    if not reasons:
        return samples, ()
    good = [n for n, sample in enumerate(samples) if not isinstance(sample, BadSample)]
    if not good:
        raise DataError(
            f"every sample of a micro batch is unreadable ({len(samples)}, the first: {reasons[0]}); the data is "
            "damaged beyond what data.on_bad_sample skip replaces: fix it (`orch prepare` again for shards)"
        )
    filled = [
        sample if not isinstance(sample, BadSample) else samples[next((g for g in good if g > n), good[0])]
        for n, sample in enumerate(samples)
    ]
    return filled, reasons
