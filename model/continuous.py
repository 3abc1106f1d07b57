"""Variance-preserving diffusion in continuous time: the training loss and its two samplers.

x_t = alpha(t) x0 + sigma(t) eps for t ~ U(0, 1), with alpha(t)^2 the cosine schedule of Nichol & Dhariwal (2021),
alpha(t)^2 = f(t) / f(0), f(t) = cos^2((t + s) / (1 + s) * pi / 2), s = 0.008, and sigma(t)^2 = 1 - alpha(t)^2. The
network is conditioned on the noise level through t x time_scale (the scale of its timestep embedding) and predicts
x0 (`sample`), the noise (`epsilon`) or v = alpha eps - sigma x0 (`v_prediction`, Salimans & Ho 2022). Training
times are kept in [T_MIN, T_MAX], where neither alpha nor sigma vanishes.

Samplers run from t = T_MAX to 0 on N evenly spaced times: `ddim`, the deterministic step x_s = alpha_s x0_hat +
sigma_s eps_hat (Song et al. 2021, eta 0), and `ddpm`, the ancestral step that draws x_s from q(x_s | x_t, x0_hat)
(Kingma et al. 2021, Eq. 3 and appendix A). diffusers' schedulers are discrete (a table of betas), so these few
lines are written here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

CONTINUOUS_SAMPLERS = ("ddim", "ddpm")
PREDICTIONS = ("sample", "epsilon", "v_prediction")
T_MIN, T_MAX = 1e-4, 0.9999
COSINE_OFFSET = 0.008


@dataclass(frozen=True)
class ContinuousVP:
    """The continuous-time VP process of a job: what the network predicts and the time scale it sees."""

    prediction: str = "sample"
    time_scale: int = 1000  # the network's timestep input is t * this

    def __post_init__(self):
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {self.prediction!r} ({', '.join(PREDICTIONS)})")

    @staticmethod
    def alpha_sigma(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """alpha(t) and sigma(t) of the cosine schedule, float64 for the samplers' ratios."""
        t = t.double()
        f = torch.cos((t + COSINE_OFFSET) / (1 + COSINE_OFFSET) * math.pi / 2) ** 2
        f0 = math.cos(COSINE_OFFSET / (1 + COSINE_OFFSET) * math.pi / 2) ** 2
        alpha_bar = (f / f0).clamp(0, 1)
        return alpha_bar.sqrt(), (1 - alpha_bar).sqrt()

    def predict_x0_eps(self, prediction: torch.Tensor, x_t: torch.Tensor, alpha, sigma):
        """(x0, eps) implied by the network's prediction at (x_t, alpha, sigma)."""
        if self.prediction == "sample":
            x0 = prediction
            return x0, (x_t - alpha * x0) / sigma
        if self.prediction == "epsilon":
            eps = prediction
            return (x_t - sigma * eps) / alpha, eps
        v = prediction  # alpha^2 + sigma^2 = 1
        return alpha * x_t - sigma * v, sigma * x_t + alpha * v


def continuous_loss(
    model: nn.Module,
    x0: torch.Tensor,
    y,
    process: ContinuousVP,
    generator: torch.Generator | None = None,
    snr_gamma: float | None = None,
) -> torch.Tensor:
    """MSE between the prediction and its target at t ~ U(T_MIN, T_MAX), float32; snr_gamma weights each sample by
    min-SNR-gamma in the form of the target, as model.diffusion.diffusion_loss does."""
    n = x0.shape[0]
    t = T_MIN + (T_MAX - T_MIN) * torch.rand(n, device=x0.device, generator=generator)  # (N,)
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    alpha, sigma = (v.float().view(n, 1, 1, 1) for v in ContinuousVP.alpha_sigma(t))
    x_t = (alpha * x0.float() + sigma * noise.float()).to(x0.dtype)
    prediction = model(x_t, t * process.time_scale, y).float()
    if prediction.shape[1] != x0.shape[1]:
        raise ValueError(f"the model returned {prediction.shape[1]} channels for {x0.shape[1]}-channel inputs")
    target = {"sample": x0.float(), "epsilon": noise.float(), "v_prediction": alpha * noise - sigma * x0.float()}[
        process.prediction
    ]
    if snr_gamma is None:
        return F.mse_loss(prediction, target)
    snr = (alpha**2 / sigma**2).view(n)
    clipped = snr.clamp(max=snr_gamma)
    weight = {"epsilon": clipped / snr, "v_prediction": clipped / (snr + 1), "sample": clipped}[process.prediction]
    return (weight * (prediction - target).pow(2).mean(dim=(1, 2, 3))).mean()


def _noise_like(x: torch.Tensor, generator) -> torch.Tensor:
    """Noise of x's shape from one generator, or one per sample (a list): the same draws on any batch split."""
    if isinstance(generator, list):
        return torch.stack([torch.randn(x.shape[1:], generator=g, device=g.device) for g in generator]).to(x.device)
    return torch.randn(x.shape, generator=generator, device=x.device)


@torch.no_grad()
def continuous_sample(
    model: nn.Module,
    labels,
    x: torch.Tensor,
    process: ContinuousVP,
    sampler: str,
    num_steps: int,
    guidance_scale: float = 1.0,
    generator=None,
    clip_denoised: bool = False,
    progress: Callable[[int, int], None] | None = None,
    on_prediction: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, int], None] | None = None,
) -> torch.Tensor:
    """From noise x (N, C, H, W) at t = T_MAX to t = 0 in num_steps steps; on_prediction(i, t, x_t, x0_hat, total)
    sees each step's x0 estimate (clipped to [-1, 1] first when clip_denoised, as pixel-space samplers do). With
    guidance, `labels` holds the conditional and the null half (model.diffusion.sample appends the null condition)."""
    if sampler not in CONTINUOUS_SAMPLERS:
        raise ValueError(
            f"sampler {sampler!r} does not sample a continuous-time model ({', '.join(CONTINUOUS_SAMPLERS)})"
        )
    n = x.shape[0]
    guided = guidance_scale != 1
    times = torch.linspace(T_MAX, 0, num_steps + 1, dtype=torch.float64, device=x.device)
    for i in range(num_steps):
        t, s = times[i], times[i + 1]
        x_in = torch.cat([x, x]) if guided else x
        t_in = (t * process.time_scale).float().expand(x_in.shape[0])
        out = model.forward_with_cfg(x_in, t_in, labels, guidance_scale) if guided else model(x_in, t_in, labels)
        alpha_t, sigma_t = ContinuousVP.alpha_sigma(t)
        alpha_s, sigma_s = ContinuousVP.alpha_sigma(s)
        x0_hat, eps_hat = process.predict_x0_eps(out[:n].double(), x.double(), alpha_t, sigma_t)
        if clip_denoised:
            x0_hat = x0_hat.clamp(-1, 1)
            eps_hat = (x.double() - alpha_t * x0_hat) / sigma_t
        if on_prediction is not None:
            on_prediction(i, t, x, x0_hat.to(x.dtype), num_steps)
        if sampler == "ddim" or i == num_steps - 1:  # the last step lands on x0_hat (sigma_s = 0)
            x = (alpha_s * x0_hat + sigma_s * eps_hat).to(x.dtype)
        else:
            alpha_ts = alpha_t / alpha_s
            var_ts = sigma_t**2 - alpha_ts**2 * sigma_s**2
            mean = (alpha_ts * sigma_s**2 / sigma_t**2) * x.double() + (alpha_s * var_ts / sigma_t**2) * x0_hat
            std = (var_ts * sigma_s**2 / sigma_t**2).sqrt()
            x = (mean + std * _noise_like(x, generator).double()).to(x.dtype)
        if progress is not None:
            progress(i + 1, num_steps)
    return x
