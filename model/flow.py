"""Rectified flow (flow matching with the linear interpolant): the training loss and the ODE samplers.

The forward process is x_t = (1 - t) x0 + t eps for t in [0, 1] (Liu et al. 2022; Lipman et al. 2023), the network
predicts the velocity v = eps - x0 (SiT, Ma et al. 2024; Stable Diffusion 3, Esser et al. 2024), and it sees t on the
scale of its timestep embedding, t * num_train_timesteps, as SD3 and diffusers' flow schedulers give it. Training
draws t uniformly or from a logit-normal (SD3: mean 0, std 1, which weights the middle of the path), optionally moved
towards noise by SD3's time shift t' = s t / (1 + (s - 1) t) for larger images.

Sampling integrates the ODE dx/dt = v from t = 1 (noise) to 0 with diffusers' FlowMatchEulerDiscreteScheduler or
FlowMatchHeunDiscreteScheduler (the same shift); classifier-free guidance mixes the conditional and null velocities.
Only the loss and the time sampling are written here: diffusers has the schedulers but no training-side helper.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

FLOW_SAMPLERS = ("euler", "heun")
TIMESTEP_SAMPLING = ("uniform", "logit_normal")


@dataclass(frozen=True)
class FlowMatching:
    """The flow-matching process of a job: how training draws t, and the time scale the network sees."""

    num_train_timesteps: int = 1000  # the network's timestep input is t * this
    timestep_sampling: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: float = 1.0

    def __post_init__(self):
        if self.timestep_sampling not in TIMESTEP_SAMPLING:
            raise ValueError(f"unknown timestep_sampling {self.timestep_sampling!r} ({', '.join(TIMESTEP_SAMPLING)})")
        if self.logit_std <= 0 or self.shift <= 0 or self.num_train_timesteps < 1:
            raise ValueError("logit_std and shift must be > 0 and num_train_timesteps >= 1")

    def draw_t(self, n: int, device: torch.device, generator: torch.Generator | None = None) -> torch.Tensor:
        """n training times in (0, 1), float32."""
        if self.timestep_sampling == "uniform":
            t = torch.rand(n, device=device, generator=generator)
        else:
            normal = torch.randn(n, device=device, generator=generator)
            t = torch.sigmoid(self.logit_mean + self.logit_std * normal)
        return self.shifted(t)

    def shifted(self, t: torch.Tensor) -> torch.Tensor:
        """SD3's time shift (Esser et al. 2024, Eq. 23): more of the path near noise when shift > 1."""
        if self.shift == 1:
            return t
        return self.shift * t / (1 + (self.shift - 1) * t)


def flow_loss(
    model: nn.Module,
    x0: torch.Tensor,
    y,
    flow: FlowMatching,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Conditional flow matching: MSE between the network's velocity at (x_t, t) and eps - x0, in float32.
    t and the noise come from `generator` (on x0's device) when given, else from the global RNG."""
    n, c = x0.shape[:2]
    t = flow.draw_t(n, x0.device, generator)  # (N,)
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)  # (N, C, H, W)
    t_ = t.view(n, 1, 1, 1).to(x0.dtype)
    x_t = (1 - t_) * x0 + t_ * noise  # (N, C, H, W)
    velocity = model(x_t, t * flow.num_train_timesteps, y)  # (N, C, H, W)
    if velocity.shape[1] != c:
        raise ValueError(f"the model returned {velocity.shape[1]} channels for {c}-channel inputs (flow needs {c})")
    return F.mse_loss(velocity.float(), (noise - x0).float())


def flow_scheduler(flow: FlowMatching, sampler: str, num_steps: int, device: torch.device):
    """diffusers' Euler or Heun flow-matching scheduler with the job's shift, its num_steps set on device."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler

    if sampler not in FLOW_SAMPLERS:
        raise ValueError(f"sampler {sampler!r} does not sample a flow-matching model; use {' or '.join(FLOW_SAMPLERS)}")
    kind = FlowMatchEulerDiscreteScheduler if sampler == "euler" else FlowMatchHeunDiscreteScheduler
    scheduler = kind(num_train_timesteps=flow.num_train_timesteps, shift=flow.shift)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        scheduler.set_timesteps(num_steps, device=device)
    return scheduler


@torch.no_grad()
def flow_sample(
    model: nn.Module,
    labels,
    x: torch.Tensor,
    flow: FlowMatching,
    sampler: str,
    num_steps: int,
    guidance_scale: float = 1.0,
    progress: Callable[[int, int], None] | None = None,
    on_prediction: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, int], None] | None = None,
) -> torch.Tensor:
    """Integrate from the noise x (N, C, H, W) at t = 1 to t = 0 in num_steps steps (Heun: two velocities per step
    but the last); returns the sample (unclamped). on_prediction(i, sigma, x_t, velocity, total) sees every
    velocity; guidance_scale != 1 batches conditional and null inputs through `model.forward_with_cfg`, `labels`
    then holding both halves (model.diffusion.sample appends the null condition)."""
    n = x.shape[0]
    guided = guidance_scale != 1
    scheduler = flow_scheduler(flow, sampler, num_steps, x.device)
    timesteps = scheduler.timesteps
    for i, t in enumerate(timesteps):
        x_in = torch.cat([x, x]) if guided else x
        t_in = t.to(x.dtype).expand(x_in.shape[0])  # sigma * num_train_timesteps
        out = model.forward_with_cfg(x_in, t_in, labels, guidance_scale) if guided else model(x_in, t_in, labels)
        velocity = out[:n].to(x.dtype)  # (N, C, H, W)
        if on_prediction is not None:
            on_prediction(i, t / flow.num_train_timesteps, x, velocity, len(timesteps))
        x = scheduler.step(velocity, t, x).prev_sample
        if progress is not None:
            progress(i + 1, len(timesteps))
    return x
