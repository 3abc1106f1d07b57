"""Exponential moving average of a model's weights, with a warmup of the decay."""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
import torch.nn as nn


class EMA:
    """A float32 shadow copy of a model whose weights follow the model's by exponential moving average.

    The decay after k updates is min(decay, 1 - (1 + k) ** -warmup_power): the EMAWarmup schedule of
    k-diffusion (crowsonkb/k-diffusion, `k_diffusion/utils.py`) with inv_gamma=1 and min_value=0, so the
    first update copies the model and early weights are forgotten fast. warmup_power=0 uses `decay`
    throughout. `decay` applies per update: with update_every=k it spans k times as many steps.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup_power: float = 0.75, update_every: int = 1):
        if not 0 <= decay < 1:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        if warmup_power < 0:
            raise ValueError(f"EMA warmup_power must be >= 0 (0 turns the warmup off), got {warmup_power}")
        if update_every < 1:
            raise ValueError(f"EMA update_every must be an integer >= 1, got {update_every}")
        self.decay = decay
        self.warmup_power = warmup_power
        self.update_every = update_every
        self.num_updates = 0
        self.module = copy.deepcopy(model).float().eval().requires_grad_(False)

    def to(self, device: torch.device | str) -> EMA:
        """Place the shadow on `device`: the training device, so that updates and sample grids never cross to the
        host."""
        self.module.to(device)
        return self

    def decay_at(self, num_updates: int) -> float:
        """The decay used by the update that follows `num_updates` earlier ones."""
        if self.warmup_power <= 0:
            return self.decay
        return min(self.decay, 1 - (1 + num_updates) ** -self.warmup_power)

    def update(self, model: nn.Module, step: int) -> None:
        """Move the shadow towards `model` (unwrapped, not DDP) if step % update_every == 0; copy its buffers."""
        self.update_from(dict(model.named_parameters()), dict(model.named_buffers()), step)

    @torch.no_grad()
    def update_from(
        self, parameters: Mapping[str, torch.Tensor], buffers: Mapping[str, torch.Tensor], step: int
    ) -> None:
        """update() from named tensors rather than a module: e.g. the full weights gathered from ZeRO or FSDP shards."""
        if step % self.update_every:
            return
        shadow_params = dict(self.module.named_parameters())
        if shadow_params.keys() != parameters.keys():
            missing, extra = shadow_params.keys() - parameters.keys(), parameters.keys() - shadow_params.keys()
            raise ValueError(
                f"EMA.update got a model with other parameters (missing: {sorted(missing)[:5]}, extra: "
                f"{sorted(extra)[:5]}); pass the unwrapped model the EMA was made from"
            )
        shadows = list(shadow_params.values())
        sources = [_like(parameters[name].detach(), shadow) for name, shadow in shadow_params.items()]
        torch._foreach_lerp_(shadows, sources, 1 - self.decay_at(self.num_updates))

        for name, buffer in self.module.named_buffers():
            buffer.copy_(buffers[name])
        self.num_updates += 1

    def copy_to(self, model: nn.Module) -> None:
        """Load the averaged weights into `model` (cast to its dtypes)."""
        model.load_state_dict(self.module.state_dict())

    def state_dict(self) -> dict:
        """Everything a resume needs: the update count and the averaged weights (where the shadow lives)."""
        return {"num_updates": self.num_updates, "weights": self.module.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Restore what state_dict() returned (weights from any device are copied onto the shadow's)."""
        self.module.load_state_dict(state["weights"])
        self.num_updates = int(state["num_updates"])


def _like(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """`source` on target's device and dtype (no copy when they already match)."""
    return source.to(device=target.device, dtype=target.dtype)
