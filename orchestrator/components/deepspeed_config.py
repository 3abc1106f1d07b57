"""The DeepSpeed config a ZeRO job trains with, from its spec: what `orch plan` shows and what the ranks run."""

from __future__ import annotations

from orchestrator.errors import UserError
from orchestrator.specs.job import JobSpec


class DeepSpeedConfigError(UserError):
    """resources.deepspeed (or its config_file) cannot make a config for this spec."""


def deepspeed_config_of(spec: JobSpec, device: str) -> dict:
    """The DeepSpeed config a ZeRO job trains with (the spec's, with resources.deepspeed.config_file laid over it);
    DeepSpeedConfigError for a user file that cannot be read or contradicts the spec."""
    from launch.deepspeed import deepspeed_config, read_user_config

    r, ds = spec.resources, spec.resources.deepspeed
    user_config = None
    if ds.config_file:
        try:
            user_config = read_user_config(ds.config_file)
        except ValueError as err:
            raise DeepSpeedConfigError(f"resources.deepspeed.config_file: {err}") from None
    try:
        return deepspeed_config(
            int(r.strategy[-1]),
            spec.train.mixed_precision,
            spec.micro_batch_size,
            spec.train.grad_accum_steps,
            r.world_size,
            spec.train.grad_clip,
            offload_optimizer=ds.offload_optimizer,
            offload_params=ds.offload_params,
            pin_memory=device == "cuda",
            reduce_bucket_size=ds.reduce_bucket_size,
            allgather_bucket_size=ds.allgather_bucket_size,
            overlap_comm=ds.overlap_comm,
            user_config=user_config,
        )
    except ValueError as err:
        raise DeepSpeedConfigError(
            f"resources.deepspeed.config_file {ds.config_file}: {err}" if user_config else f"resources.deepspeed: {err}"
        ) from None
