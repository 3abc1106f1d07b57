"""Diffusion math around a denoiser: the noise schedule, the training losses, the samplers.

Schedules and reverse steps are diffusers' (DDPMScheduler, DDIMScheduler, DPMSolverMultistepScheduler);
this module only wires a network to them. The one piece written here is the variational bound of the
hybrid loss (Nichol & Dhariwal 2021), which diffusers does not provide. Sections: the noise scheduler,
the training losses, the variational bound, sampling.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from model.continuous import CONTINUOUS_SAMPLERS, ContinuousVP, continuous_loss, continuous_sample
from model.flow import FLOW_SAMPLERS, FlowMatching, flow_loss, flow_sample

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
SAMPLERS = ("ddpm", "ddim", "dpm_solver++")  # of the DDPM objective; model/flow.py has the flow's


#################################################################################
#                                Noise scheduler                                #
#################################################################################


def make_noise_scheduler(
    num_train_timesteps: int = 1000,
    beta_schedule: str = "linear",
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    prediction_type: str = "epsilon",
) -> DDPMScheduler:
    """The forward process q(x_t | x_0): a DDPMScheduler with the given betas and no sample clipping.

    `linear` is Ho et al. (2020); `squaredcos_cap_v2` the cosine schedule of Nichol & Dhariwal (2021),
    which ignores beta_start and beta_end; `scaled_linear` is linear in sqrt(beta) (Stable Diffusion).
    """
    if beta_schedule not in BETA_SCHEDULES:
        raise ValueError(f"unknown beta_schedule {beta_schedule!r} (valid: {', '.join(BETA_SCHEDULES)})")
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction_type {prediction_type!r} (valid: {', '.join(PREDICTION_TYPES)})")
    if num_train_timesteps < 2:
        raise ValueError(f"num_train_timesteps must be at least 2, got {num_train_timesteps}")
    if beta_schedule != "squaredcos_cap_v2" and not 0 < beta_start <= beta_end < 1:
        raise ValueError(f"betas need 0 < beta_start <= beta_end < 1, got beta_start={beta_start}, beta_end={beta_end}")
    return DDPMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_schedule=beta_schedule,
        beta_start=beta_start,
        beta_end=beta_end,
        prediction_type=prediction_type,
        clip_sample=False,
    )


#################################################################################
#                                Training losses                                #
#################################################################################


def training_loss(
    model: nn.Module,
    x0: torch.Tensor,
    y,
    process: DDPMScheduler | FlowMatching | ContinuousVP,
    vlb_weight: float = 0.0,
    snr_gamma: float | None = None,
) -> torch.Tensor:
    """The loss of a job's objective: flow matching, continuous-time VP, or the DDPM loss."""
    if isinstance(process, FlowMatching):
        return flow_loss(model, x0, y, process)
    if isinstance(process, ContinuousVP):
        return continuous_loss(model, x0, y, process, snr_gamma=snr_gamma)
    return diffusion_loss(model, x0, y, process, vlb_weight=vlb_weight, snr_gamma=snr_gamma)


def diffusion_loss(
    model: nn.Module,
    x0: torch.Tensor,
    y: torch.Tensor,
    noise_scheduler: DDPMScheduler,
    generator: torch.Generator | None = None,
    vlb_weight: float = 0.0,
    snr_gamma: float | None = None,
) -> torch.Tensor:
    """Simple DDPM loss (Ho et al. 2020, Algorithm 1): MSE between the model's prediction and its target at a random t.

    t and the noise come from `generator` (on x0's device) when given, else from the global RNG. The
    target follows the scheduler's prediction_type (epsilon: the noise; v_prediction: the velocity;
    sample: x0). A model with 2C output channels (learned sigma) is scored on its first C; the MSE is
    computed in float32 whatever the autocast dtype. vlb_weight > 0 adds Improved DDPM's variational
    bound on the remaining C channels (see `hybrid_loss`), which then must be there. snr_gamma weights
    each sample by min-SNR-gamma (Hang et al. 2023) in the form of its target: min(SNR, g) / SNR for
    epsilon, min(SNR, g) / (SNR + 1) for v, min(SNR, g) for x0 (the weights that make each the same
    min(SNR, g)-weighted loss on x0).
    """
    if vlb_weight < 0:
        raise ValueError(f"vlb_weight must be >= 0, got {vlb_weight}")
    n, c = x0.shape[:2]
    num_train_timesteps = noise_scheduler.config.num_train_timesteps
    t = torch.randint(0, num_train_timesteps, (n,), device=x0.device, generator=generator)  # (N,)
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)  # (N, C, H, W)
    x_t = noise_scheduler.add_noise(x0, noise, t)  # (N, C, H, W)
    out = model(x_t, t, y)  # (N, C or 2C, H, W)
    if out.shape[1] not in (c, 2 * c):
        raise ValueError(
            f"the model returned {out.shape[1]} channels for {c}-channel inputs; expected {c} or {2 * c} (learned "
            "sigma)"
        )
    if vlb_weight > 0 and out.shape[1] != 2 * c:
        raise ValueError(
            f"the hybrid loss needs a learned-sigma model: {2 * c} output channels (prediction, then v), got "
            f"{out.shape[1]}"
        )
    prediction = out[:, :c].float()  # (N, C, H, W)

    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        target = noise  # (N, C, H, W)
    elif prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(x0, noise, t)  # (N, C, H, W)
    elif prediction_type == "sample":
        target = x0  # (N, C, H, W)
    else:
        raise ValueError(f"unknown prediction_type {prediction_type!r} (valid: {', '.join(PREDICTION_TYPES)})")
    if snr_gamma is None:
        loss = F.mse_loss(prediction, target.float())
    else:
        alpha_bar = noise_scheduler.alphas_cumprod.to(x0.device)[t].float()  # (N,)
        snr = alpha_bar / (1 - alpha_bar)
        clipped = snr.clamp(max=snr_gamma)
        weight = {"epsilon": clipped / snr, "v_prediction": clipped / (snr + 1), "sample": clipped}[prediction_type]
        loss = (weight * (prediction - target.float()).pow(2).mean(dim=(1, 2, 3))).mean()
    if vlb_weight > 0:
        # The stop-gradient on the prediction leaves L_vlb to train the variance alone (Nichol & Dhariwal 2021, Sec.
        # 3.1).
        # (N,), bits per dimension
        vlb = variational_bound(prediction.detach(), out[:, c:], x0, x_t, t, noise_scheduler)
        loss = loss + vlb_weight * num_train_timesteps * vlb.mean()
    return loss


def hybrid_loss(
    model: nn.Module,
    x0: torch.Tensor,
    y: torch.Tensor,
    noise_scheduler: DDPMScheduler,
    generator: torch.Generator | None = None,
    vlb_weight: float = 1e-3,
) -> torch.Tensor:
    """Improved DDPM's L_hybrid = L_simple + lambda * L_vlb for a learned-sigma model (Nichol & Dhariwal 2021, Sec.
    3.1).

    The model returns 2C channels: its prediction (trained by L_simple, as in diffusion_loss) then v,
    whose (v + 1) / 2 interpolates the log variance from log beta-tilde_t to log beta_t (Eq. 15, with
    v in [-1, 1] as the reference code and diffusers' `learned_range`). L_vlb = sum_t L_t is estimated
    as T * L_t at the uniformly drawn t, in bits per dimension, with the model mean computed from the
    detached prediction; lambda = 0.001 is the paper's. t and the noise are drawn exactly as
    diffusion_loss draws them, so with the same generator the two differ by the vlb term alone.
    """
    if vlb_weight <= 0:
        raise ValueError(
            f"hybrid_loss needs vlb_weight > 0 (the paper's lambda is 0.001), got {vlb_weight}; use diffusion_loss for "
            "L_simple alone"
        )
    return diffusion_loss(model, x0, y, noise_scheduler, generator=generator, vlb_weight=vlb_weight)


#################################################################################
#                      Variational bound (Improved DDPM)                        #
#################################################################################
# Timesteps are 0-based as in diffusers: t = 0 here is the paper's t = 1, whose term is the decoder
# NLL L_0 = -log p(x_0 | x_1); every t > 0 gives L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)).


def variational_bound(
    prediction: torch.Tensor,
    v: torch.Tensor,
    x0: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    noise_scheduler: DDPMScheduler,
) -> torch.Tensor:
    """The per-sample term L_t of the variational bound (N,), in bits per dimension (Nichol & Dhariwal 2021, Eqs. 4-6
    and 15).

    prediction (N, C, H, W) follows the scheduler's prediction_type and gives the model mean (Ho et al.
    2020, Eq. 11, through the x0 it implies); v (N, C, H, W) gives the model variance
    exp((v + 1) / 2 * log beta_t + (1 - v) / 2 * log beta-tilde_t). Gradients reach both: detach the
    prediction to train the variance alone, as hybrid_loss does. Computed in float32.
    """
    terms = _posterior_terms(noise_scheduler, t)  # each (N, 1, 1, 1), float32
    prediction, v, x0, x_t = prediction.float(), v.float(), x0.float(), x_t.float()
    x0_hat = _predict_x0(prediction, x_t, terms["alpha_bar"], noise_scheduler.config.prediction_type)  # (N, C, H, W)
    model_mean = terms["coef_x0"] * x0_hat + terms["coef_xt"] * x_t  # (N, C, H, W)
    frac = (v + 1) / 2  # (N, C, H, W), 0 -> beta-tilde_t, 1 -> beta_t
    model_log_var = frac * terms["log_beta"] + (1 - frac) * terms["log_beta_tilde"]  # (N, C, H, W)

    true_mean = terms["coef_x0"] * x0 + terms["coef_xt"] * x_t  # (N, C, H, W)
    kl = normal_kl(true_mean, terms["log_beta_tilde"], model_mean, model_log_var)  # (N, C, H, W), nats
    decoder_nll = -discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var)  # (N, C, H, W), nats
    per_dim = torch.where((t == 0).view(-1, 1, 1, 1), decoder_nll, kl)  # (N, C, H, W)
    return per_dim.flatten(1).mean(dim=1) / math.log(2.0)  # (N,), bits per dimension


def normal_kl(mean1: torch.Tensor, log_var1: torch.Tensor, mean2: torch.Tensor, log_var2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, exp(log_var1)) || N(mean2, exp(log_var2))) of diagonal Gaussians, elementwise, in nats."""
    return 0.5 * (
        log_var2 - log_var1 + torch.exp(log_var1 - log_var2) + (mean1 - mean2) ** 2 * torch.exp(-log_var2) - 1.0
    )


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """log P(x) elementwise, in nats, of 8-bit data scaled to [-1, 1] under N(mean, exp(2 log_scale)) (Ho et al. 2020,
    Eq. 13).

    Each of the 256 levels owns a bin of width 2/255 around it; the outermost bins reach -inf and +inf.
    Probabilities of inner bins are differences of log-CDFs taken in the lower tail, where they do not
    cancel. Data that is not 8-bit (latents) still gets a finite value, which then means less.
    """
    half_bin = 1.0 / 255.0
    inv_std = torch.exp(-log_scale)
    upper = (x - mean + half_bin) * inv_std  # (..), standardised bin edges
    lower = (x - mean - half_bin) * inv_std
    log_below_upper = torch.special.log_ndtr(upper)  # log P(z < upper): the whole lowest bin
    log_above_lower = torch.special.log_ndtr(-lower)  # log P(z > lower): the whole highest bin
    # P(lower < z < upper) = P(a < z < b) with both edges mirrored into the lower tail when the bin lies above the mean.
    flip = lower > 0
    a, b = torch.where(flip, -upper, lower), torch.where(flip, -lower, upper)
    log_b, log_a = torch.special.log_ndtr(b), torch.special.log_ndtr(a)
    log_inner = log_b + torch.log((-torch.expm1(log_a - log_b)).clamp(min=1e-12))  # log(Phi(b) - Phi(a))
    return torch.where(x < -0.999, log_below_upper, torch.where(x > 0.999, log_above_lower, log_inner))


def _posterior_terms(noise_scheduler: DDPMScheduler, t: torch.Tensor) -> dict[str, torch.Tensor]:
    """Coefficients of q(x_{t-1} | x_t, x_0) and the variance bounds at timesteps t (N,), each (N, 1, 1, 1) float32 on
    t's device.

    Built in float64 from alpha_bar, with beta_t = 1 - alpha_bar_t / alpha_bar_{t-1} as diffusers'
    samplers do, so that strided and full schedules agree. beta-tilde_0 = 0, so its log is clipped to
    log beta-tilde_1 at t = 0, as in the reference code of Nichol & Dhariwal.
    """
    table = _posterior_table(noise_scheduler, t.device)
    index = t.detach().long()  # (N,), indexing on t's device: no wait for the GPU
    return {name: values[index].view(-1, 1, 1, 1) for name, values in table.items()}


def _posterior_table(noise_scheduler: DDPMScheduler, device: torch.device) -> dict[str, torch.Tensor]:
    """The per-timestep coefficients of _posterior_terms, (T,) float32 each on `device`, computed once per scheduler and
    device."""
    cache = noise_scheduler.__dict__.setdefault("_orch_posterior_tables", {})
    if device not in cache:
        alpha_bar = noise_scheduler.alphas_cumprod.detach().cpu().double()  # (T,)
        alpha_bar_prev = torch.cat([alpha_bar.new_ones(1), alpha_bar[:-1]])  # (T,)
        beta = 1 - alpha_bar / alpha_bar_prev  # (T,)
        beta_tilde = beta * (1 - alpha_bar_prev) / (1 - alpha_bar)  # (T,), 0 at t = 0
        table = {
            "alpha_bar": alpha_bar,
            "coef_x0": alpha_bar_prev.sqrt() * beta / (1 - alpha_bar),  # (T,), Ho et al. 2020, Eq. 7
            "coef_xt": (1 - beta).sqrt() * (1 - alpha_bar_prev) / (1 - alpha_bar),  # (T,)
            "log_beta": beta.log(),  # (T,)
            "log_beta_tilde": torch.cat([beta_tilde[1:2], beta_tilde[1:]]).log(),  # (T,)
        }
        cache[device] = {name: values.to(device=device, dtype=torch.float32) for name, values in table.items()}
    return cache[device]


def _predict_x0(
    prediction: torch.Tensor, x_t: torch.Tensor, alpha_bar: torch.Tensor | float, prediction_type: str
) -> torch.Tensor:
    """The x0 that a prediction of the given type implies for x_t at noise level alpha_bar."""
    if prediction_type == "epsilon":
        return (x_t - (1 - alpha_bar) ** 0.5 * prediction) / alpha_bar**0.5
    if prediction_type == "v_prediction":
        return alpha_bar**0.5 * x_t - (1 - alpha_bar) ** 0.5 * prediction
    if prediction_type == "sample":
        return prediction
    raise ValueError(f"unknown prediction_type {prediction_type!r} (valid: {', '.join(PREDICTION_TYPES)})")


#################################################################################
#                                    Sampling                                   #
#################################################################################

# diffusers' DPMSolverMultistepScheduler.set_timesteps calls np.array() on a torch tensor, which NumPy 2
# answers with this DeprecationWarning (torch's __array__ lacks the `copy` keyword). It is harmless; it is
# silenced around that one call and by its message only, so `-W error::DeprecationWarning` still sees the rest.
_NUMPY_COPY_WARNING = r"__array__ implementation doesn't accept a copy keyword"


@torch.no_grad()
def sample(
    model: nn.Module,
    labels: torch.Tensor,
    image_shape: tuple[int, int, int],
    noise_scheduler: DDPMScheduler,
    sampler: str = "ddpm",
    num_steps: int | None = None,
    guidance_scale: float = 1.0,
    null_label: int | None = None,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
    progress: Callable[[int, int], None] | None = None,
    clip_denoised: bool = False,
    on_x0: Callable[[int, int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Draw images (N, C, H, W) for labels (N,) by running the reverse process from noise: clipped to [-1, 1] with
    clip_denoised (pixel space), as they come for latents, which are not bounded.

    `ddpm` is ancestral sampling (Ho et al. 2020, Algorithm 2), `ddim` the deterministic DDIM of Song
    et al. (2021) with eta = 0, `dpm_solver++` the deterministic multistep DPM-Solver++(2M) of Lu et
    al. (2022) (diffusers' DPMSolverMultistepScheduler, data prediction, order 2, first order on the
    last step, which lands on sigma = 0). All follow the scheduler's prediction_type. num_steps
    (default: every training timestep) are spaced as the noise scheduler says (diffusers' default
    `leading`): with `trailing` spacing the first DDIM step lands at t = T - 1, where the cosine
    schedule's alpha_bar is ~1e-9 and the x0 estimate explodes (measured on the digits demo: 14 % of
    DDIM-50 samples recognisable with trailing, 82 % with leading). clip_denoised clips each x0
    estimate to [-1, 1], as pixel-space samplers do (Ho et al. 2020): `clip_sample` for DDPM and DDIM,
    and for DPM-Solver++ its dynamic thresholding with sample_max_value = 1, which then reduces to the
    same clip; leave it off for latents. A model with 2C output channels has learned sigma: DDPM then
    samples with the learned variance (diffusers' `learned_range`, Nichol & Dhariwal 2021, Eq. 15),
    v clamped to [-1, 1] so that the variance stays between beta-tilde_t and beta_t; the deterministic
    samplers drop those channels. guidance_scale != 1 batches conditional and `null_label` inputs
    through `model.forward_with_cfg` (Ho & Salimans 2022). The model runs in the mode the caller left
    it in: call `.eval()` first, or label dropout corrupts the conditioning. Randomness comes only from
    `generator` (its device must be labels' device) or from `noise`, fixed initial noise of shape (N, C, H, W).
    on_x0(i, S, x0_hat) sees, at each step i of the S network calls, the x0 that the (guided) prediction implies
    (`predicted_x0`, clipped to [-1, 1] with clip_denoised); it only reads, so the images are the same with it.
    """

    def report_x0(i: int, t: torch.Tensor, x: torch.Tensor, prediction: torch.Tensor, total: int) -> None:
        x0_hat = predicted_x0(noise_scheduler, t, x, prediction)  # (N, C, H, W)
        on_x0(i, total, x0_hat.clamp(-1, 1) if clip_denoised else x0_hat)

    return _reverse_process(
        model,
        labels,
        image_shape,
        noise_scheduler,
        sampler,
        num_steps,
        guidance_scale,
        null_label,
        generator,
        noise,
        progress,
        clip_denoised,
        on_prediction=None if on_x0 is None else report_x0,
    )


def predicted_x0(
    noise_scheduler: DDPMScheduler | FlowMatching | ContinuousVP,
    t: torch.Tensor,
    x_t: torch.Tensor,
    prediction: torch.Tensor,
) -> torch.Tensor:
    """The x0 a sampler step's prediction implies for x_t (N, C, H, W), as _reverse_process's on_prediction hands
    them over: flow matching x_t - t v (x_t = (1 - t) x0 + t eps, v = eps - x0, t in [0, 1]); continuous time the
    sampler's own x0 estimate; DDPM the prediction converted at the timestep's alpha_bar."""
    if isinstance(noise_scheduler, FlowMatching):
        return x_t - t.to(x_t.dtype) * prediction  # t a 0-d tensor on x_t's device: no wait for the GPU
    if isinstance(noise_scheduler, ContinuousVP):
        return prediction
    alpha_bar = noise_scheduler.alphas_cumprod[int(t)].item()
    return _predict_x0(prediction, x_t, alpha_bar, noise_scheduler.config.prediction_type)


@torch.no_grad()
def sample_progression(
    model: nn.Module,
    labels: torch.Tensor,
    image_shape: tuple[int, int, int],
    noise_scheduler: DDPMScheduler,
    sampler: str = "ddpm",
    num_steps: int | None = None,
    guidance_scale: float = 1.0,
    null_label: int | None = None,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
    progress: Callable[[int, int], None] | None = None,
    clip_denoised: bool = False,
    num_frames: int = 8,
) -> torch.Tensor:
    """A denoising progression strip: each sample's x0 prediction at num_frames evenly spaced steps, (N, K, C, H, W) in
    [-1, 1].

    Runs exactly as `sample` with the same arguments (same randomness, same result) and records the frames with an
    `X0Progression`: the last frame is the sample itself, frames[:, -1] == sample(...).
    """
    recorder = X0Progression(num_frames)
    images = sample(
        model,
        labels,
        image_shape,
        noise_scheduler,
        sampler,
        num_steps,
        guidance_scale,
        null_label,
        generator,
        noise,
        progress,
        clip_denoised,
        on_x0=recorder,
    )  # (N, C, H, W)
    return recorder.strip(images)  # (N, K, C, H, W)


class X0Progression:
    """An `on_x0` for `sample` that keeps the x0 prediction of the samples `keep` (all by default) at num_frames evenly
    spaced steps, round(linspace(0, S - 1, K)) of the S network calls: the first and the last among them (the DDPM
    paper's Fig. 6). The last step of every sampler lands on its x0 prediction (alpha_bar = 1, sigma = 0), so
    `strip` puts the sample itself there: the frame then shows exactly what the sample grid shows.
    """

    def __init__(self, num_frames: int, keep: torch.Tensor | None = None):
        self.num_frames, self.keep = num_frames, keep
        self.steps: list[int] = []
        self.frames: list[torch.Tensor] = []  # K - 1 x (R, C, H, W)

    def __call__(self, i: int, total: int, x0_hat: torch.Tensor) -> None:
        if i == 0:
            if not 2 <= self.num_frames <= total:
                raise ValueError(
                    f"num_frames must be between 2 and the number of sampler steps ({total}), got {self.num_frames}"
                )
            self.steps = torch.linspace(0, total - 1, self.num_frames).round().long().tolist()
            self.frames = []
        if i in self.steps[:-1]:
            self.frames.append(x0_hat if self.keep is None else x0_hat[self.keep])  # (R, C, H, W)

    def strip(self, images: torch.Tensor) -> torch.Tensor:
        """(R, K, C, H, W): the kept samples' frames, then their final images (N, C, H, W) as the last frame."""
        assert len(self.frames) == self.num_frames - 1, f"{len(self.frames)} of {self.num_frames - 1} frames recorded"
        last = images if self.keep is None else images[self.keep]  # (R, C, H, W)
        return torch.stack([*self.frames, last], dim=1)  # (R, K, C, H, W)


def _reverse_process(
    model: nn.Module,
    labels: torch.Tensor,
    image_shape: tuple[int, int, int],
    noise_scheduler: DDPMScheduler,
    sampler: str,
    num_steps: int | None,
    guidance_scale: float,
    null_label: int | None,
    generator: torch.Generator | None,
    noise: torch.Tensor | None,
    progress: Callable[[int, int], None] | None,
    clip_denoised: bool,
    on_prediction: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, int], None] | None = None,
) -> torch.Tensor:
    """The loop behind sample; on_prediction(i, t, x_t, prediction, S) sees every step (read `predicted_x0`)."""
    flow = isinstance(noise_scheduler, FlowMatching)
    continuous = isinstance(noise_scheduler, ContinuousVP)
    valid = FLOW_SAMPLERS if flow else CONTINUOUS_SAMPLERS if continuous else SAMPLERS
    if sampler not in valid:
        what = "flow-matching" if flow else "continuous-time" if continuous else "DDPM"
        raise ValueError(f"sampler {sampler!r} does not sample a {what} model (valid: {', '.join(valid)})")
    if isinstance(labels, Mapping):  # a text condition: tensors with a leading batch dimension
        n = next(iter(labels.values())).shape[0]
        device = next(iter(labels.values())).device
    elif labels.ndim != 1:
        raise ValueError(
            f"labels must be a 1-D tensor of class indices (or a text condition dict), got shape {tuple(labels.shape)}"
        )
    else:
        n, device = labels.shape[0], labels.device
    if flow:
        num_train_timesteps = noise_scheduler.num_train_timesteps
    elif continuous:
        num_train_timesteps = noise_scheduler.time_scale
    else:
        num_train_timesteps = noise_scheduler.config.num_train_timesteps
    num_steps = num_train_timesteps if num_steps is None else num_steps
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"num_steps must be between 1 and num_train_timesteps={num_train_timesteps}, got {num_steps}")
    guided = guidance_scale != 1
    if guided and null_label is None:
        raise ValueError(
            f"guidance_scale={guidance_scale} needs null_label (the null class index, usually num_classes)"
        )

    c = image_shape[0]
    shape = (n, *image_shape)
    if noise is None:
        x = torch.randn(shape, generator=generator, device=device)  # (N, C, H, W)
    elif tuple(noise.shape) != shape:
        raise ValueError(
            f"noise has shape {tuple(noise.shape)}; {n} labels of images {tuple(image_shape)} need {shape}"
        )
    else:
        x = noise.to(device=device, dtype=torch.float32)  # (N, C, H, W)

    if guided and isinstance(labels, Mapping):
        labels = {
            k: torch.cat([v, v]) for k, v in labels.items()
        }  # (2N, ...): the model puts its null caption in the second half
    elif guided:
        labels = torch.cat([labels, torch.full_like(labels, null_label)])  # (2N,)
    if flow:
        x = flow_sample(model, labels, x, noise_scheduler, sampler, num_steps, guidance_scale, progress, on_prediction)
        return x.clamp(-1, 1) if clip_denoised else x  # latents are not bounded
    if continuous:
        x = continuous_sample(
            model,
            labels,
            x,
            noise_scheduler,
            sampler,
            num_steps,
            guidance_scale,
            generator,
            clip_denoised,
            progress,
            on_prediction,
        )
        return x.clamp(-1, 1) if clip_denoised else x  # latents are not bounded
    scheduler = _sampler_scheduler(noise_scheduler, sampler, num_steps, device, clip_denoised)
    step_kwargs = {"generator": generator} if sampler == "ddpm" else {"eta": 0.0} if sampler == "ddim" else {}

    timesteps = scheduler.timesteps
    total = len(timesteps)
    for i, t in enumerate(timesteps):
        x_in = torch.cat([x, x]) if guided else x  # (N or 2N, C, H, W)
        t_in = t.expand(x_in.shape[0])  # (N or 2N,)
        if guided:
            out = model.forward_with_cfg(x_in, t_in, labels, guidance_scale)  # (2N, C_out, H, W), halves equal
        else:
            out = model(x_in, t_in, labels)  # (N, C_out, H, W)
        if out.shape[1] not in (c, 2 * c):
            raise ValueError(
                f"the model returned {out.shape[1]} channels for {c}-channel images; expected {c} or {2 * c} (learned "
                "sigma)"
            )
        prediction = out[:n, :c].to(x.dtype)  # (N, C, H, W)
        model_output = prediction  # (N, C, H, W); learned sigma dropped unless DDPM uses it
        if sampler == "ddpm" and out.shape[1] == 2 * c:
            if scheduler.config.variance_type != "learned_range":  # known from the first output: no step taken yet
                scheduler = _sampler_scheduler(
                    noise_scheduler, sampler, num_steps, device, clip_denoised, learned_variance=True
                )
            v = out[:n, c:].to(x.dtype).clamp(-1, 1)  # (N, C, H, W)
            model_output = torch.cat([prediction, v], dim=1)  # (N, 2C, H, W)
        if on_prediction is not None:
            on_prediction(i, t, x, prediction, total)
        x = scheduler.step(model_output, t, x, **step_kwargs).prev_sample  # (N, C, H, W)
        if progress is not None:
            progress(i + 1, total)
    return x.clamp(-1, 1) if clip_denoised else x  # latents are not bounded


def _sampler_scheduler(
    noise_scheduler: DDPMScheduler,
    sampler: str,
    num_steps: int,
    device: torch.device,
    clip_denoised: bool,
    learned_variance: bool = False,
) -> SchedulerMixin:
    """The reverse-step scheduler of `sampler` on the noise scheduler's betas, its num_steps timesteps set on device."""
    config = noise_scheduler.config
    if sampler == "ddpm":
        variance = {"variance_type": "learned_range"} if learned_variance else {}
        scheduler = DDPMScheduler.from_config(config, clip_sample=clip_denoised, clip_sample_range=1.0, **variance)
    elif sampler == "ddim":
        scheduler = DDIMScheduler.from_config(config, clip_sample=clip_denoised, clip_sample_range=1.0)
    else:
        # variance_type None: given learned variance, diffusers' DPM-Solver keeps the first 3 channels
        # (an RGB assumption); we hand it the prediction alone. Spacing as the other samplers (its
        # own default is `linspace`); thresholding with sample_max_value = 1 is a clip to [-1, 1].
        scheduler = DPMSolverMultistepScheduler.from_config(
            config,
            algorithm_type="dpmsolver++",
            solver_order=2,
            thresholding=clip_denoised,
            sample_max_value=1.0,
            variance_type=None,
            timestep_spacing=config.timestep_spacing,
            final_sigmas_type="zero",
            lower_order_final=True,
        )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_NUMPY_COPY_WARNING, category=DeprecationWarning)
        scheduler.set_timesteps(num_steps, device=device)
    return scheduler
