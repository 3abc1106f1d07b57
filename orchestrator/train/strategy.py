"""resources.strategy turned into the Engine a rank trains with."""

from __future__ import annotations

from orchestrator.specs.job import JobSpec
from orchestrator.train.engine import Engine


def make_engine(spec: JobSpec, device: str) -> Engine:
    """accelerate's DDP, torch FSDP2, or DeepSpeed ZeRO (resources.strategy) with the config `orch plan` described."""
    r, t = spec.resources, spec.train
    if r.strategy == "ddp":
        from orchestrator.train.ddp import DdpEngine

        return DdpEngine(
            device,
            t.mixed_precision,
            r.world_size,
            r.collective_timeout_s,
            bucket_mb=r.ddp.bucket_mb,
            rank0_timeout_s=r.rank0_timeout_s,
        )
    if r.strategy == "fsdp":
        from orchestrator.train.fsdp import FsdpEngine

        return FsdpEngine(
            device, t.mixed_precision, r.world_size, r.collective_timeout_s, rank0_timeout_s=r.rank0_timeout_s
        )
    from orchestrator.components.deepspeed_config import deepspeed_config_of
    from orchestrator.train.zero import ZeroEngine

    return ZeroEngine(
        device,
        t.mixed_precision,
        r.world_size,
        r.collective_timeout_s,
        config=deepspeed_config_of(spec, device),
        rank0_timeout_s=r.rank0_timeout_s,
    )
