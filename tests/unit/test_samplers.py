"""Samplers across schedules and prediction types, DPM-Solver++, the progression strip, learned variance, the hybrid
loss."""

import math

import pytest
import torch
import torch.nn as nn
from diffusers import DDPMScheduler

from model.continuous import ContinuousVP
from model.diffusion import (
    BETA_SCHEDULES,
    PREDICTION_TYPES,
    X0Progression,
    diffusion_loss,
    discretized_gaussian_log_likelihood,
    hybrid_loss,
    make_noise_scheduler,
    normal_kl,
    sample,
    sample_progression,
    variational_bound,
)
from model.flow import FlowMatching
from tests.unit.test_diffusion import SHAPE, PointOracle, points


class WithSigma(nn.Module):
    """A model's prediction with a constant v (learned-sigma channel) appended."""

    def __init__(self, model: nn.Module, v: float):
        super().__init__()
        self.model, self.v = model, v

    def forward(self, x, t, y):
        out = self.model(x, t, y)  # (N, C, H, W)
        return torch.cat([out, torch.full_like(out, self.v)], dim=1)  # (N, 2C, H, W)


class Shrinker(nn.Module):
    """A deterministic, inexact denoiser: eps = 0.5 x_t. Its samples depend on every detail of the sampler."""

    def forward(self, x, t, y):
        return 0.5 * x


class Recorder(nn.Module):
    """Predicts eps = k x_t (so x0 = (1 - sigma_t k) x_t / alpha_t) and remembers the timesteps it saw."""

    def __init__(self, k: float):
        super().__init__()
        self.k, self.timesteps = k, []

    def forward(self, x, t, y):
        self.timesteps.append(int(t[0]))
        return self.k * x


# --- every sampler, schedule and prediction type under the exact denoiser --------------------------


@pytest.mark.parametrize("beta_schedule", BETA_SCHEDULES)
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("sampler, num_steps", [("dpm_solver++", 20), ("ddim", 20), ("ddpm", 50)])
def test_samplers_return_the_data_point_for_every_schedule_and_prediction_type(
    sampler, num_steps, prediction_type, beta_schedule
):
    scheduler = make_noise_scheduler(beta_schedule=beta_schedule, prediction_type=prediction_type)
    data = points(0.7, -0.4)
    oracle = PointOracle(scheduler, data, prediction_type, learn_sigma=True)  # sigma channels: junk DDPM must clamp
    labels = torch.tensor([0, 1, 1, 0])
    images = sample(
        oracle,
        labels,
        SHAPE,
        scheduler,
        sampler=sampler,
        num_steps=num_steps,
        generator=torch.Generator().manual_seed(0),
    )
    torch.testing.assert_close(images, data[labels], atol=1e-4, rtol=0)


@pytest.mark.parametrize("beta_schedule", BETA_SCHEDULES)
@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_loss_vanishes_for_the_exact_denoiser_under_every_schedule(prediction_type, beta_schedule):
    scheduler = make_noise_scheduler(beta_schedule=beta_schedule, prediction_type=prediction_type)
    data = points(0.5, -0.5, 0.0)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    loss = diffusion_loss(
        PointOracle(scheduler, data, prediction_type), data[y], y, scheduler, generator=torch.Generator().manual_seed(0)
    )
    assert loss.item() < 1e-8


def test_every_schedule_decreases_alpha_bar_from_near_one_to_near_zero():
    for beta_schedule in BETA_SCHEDULES:
        alpha_bar = make_noise_scheduler(beta_schedule=beta_schedule).alphas_cumprod
        assert (alpha_bar[1:] < alpha_bar[:-1]).all() and alpha_bar[0] > 0.998 and alpha_bar[-1] < 0.01, beta_schedule


def test_dpm_solver_is_deterministic_and_follows_guidance():
    scheduler = make_noise_scheduler()
    a, b = 0.2, -0.1
    oracle = PointOracle(scheduler, points(a, b), learn_sigma=True)
    labels = torch.zeros(3, dtype=torch.long)
    images = sample(
        oracle, labels, SHAPE, scheduler, sampler="dpm_solver++", num_steps=15, guidance_scale=2.0, null_label=1
    )
    expected = points(b)[0] + 2.0 * (points(a)[0] - points(b)[0])
    torch.testing.assert_close(images, expected.expand(3, *SHAPE), atol=1e-4, rtol=0)
    noise = torch.randn((3, *SHAPE), generator=torch.Generator().manual_seed(0))
    first = sample(Shrinker(), labels, SHAPE, scheduler, sampler="dpm_solver++", num_steps=10, noise=noise)
    assert torch.equal(
        first, sample(Shrinker(), labels, SHAPE, scheduler, sampler="dpm_solver++", num_steps=10, noise=noise)
    )


def test_dpm_solver_clip_denoised_clips_each_x0_estimate():
    # Two steps of DPM-Solver++ are two first-order steps (DPM-Solver++(1), Lu et al. 2022), the last onto sigma = 0:
    # x_1 = (sigma_1 / sigma_T) x_T + alpha_1 (1 - exp(-h)) x0_T, then the sample is x0_1. Written out, with eps = 1.5
    # x_t.
    scheduler = make_noise_scheduler(beta_schedule="squaredcos_cap_v2")
    noise = 3 * torch.randn((2, *SHAPE), generator=torch.Generator().manual_seed(0))
    labels = torch.zeros(2, dtype=torch.long)
    recorder = Recorder(1.5)
    clipped = sample(
        recorder, labels, SHAPE, scheduler, sampler="dpm_solver++", num_steps=2, noise=noise, clip_denoised=True
    )
    unclipped = sample(
        Recorder(1.5), labels, SHAPE, scheduler, sampler="dpm_solver++", num_steps=2, noise=noise, clip_denoised=False
    )

    alpha_bar = scheduler.alphas_cumprod.double()
    alpha_t, alpha_1 = alpha_bar[recorder.timesteps].sqrt().tolist()
    sigma_t, sigma_1 = (1 - alpha_bar[recorder.timesteps]).sqrt().tolist()
    exp_minus_h = (alpha_t / sigma_t) / (alpha_1 / sigma_1)

    def by_hand(clip) -> torch.Tensor:
        x_t = noise.double()
        x0_t = clip((1 - 1.5 * sigma_t) * x_t / alpha_t)
        x_1 = (sigma_1 / sigma_t) * x_t + alpha_1 * (1 - exp_minus_h) * x0_t
        return clip((1 - 1.5 * sigma_1) * x_1 / alpha_1).clamp(-1, 1).float()

    torch.testing.assert_close(clipped, by_hand(lambda x0: x0.clamp(-1, 1)), atol=1e-4, rtol=0)
    torch.testing.assert_close(unclipped, by_hand(lambda x0: x0), atol=1e-4, rtol=0)
    assert (clipped - unclipped).abs().max() > 0.05


# --- the progression strip --------------------------------------------------------------------------


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm_solver++"])
def test_progression_frames_are_x0_estimates_and_the_last_is_the_sample(sampler):
    scheduler = make_noise_scheduler(beta_schedule="squaredcos_cap_v2")
    labels = torch.tensor([0, 1, 2])
    calls = []
    strip = sample_progression(
        Shrinker(),
        labels,
        SHAPE,
        scheduler,
        sampler=sampler,
        num_steps=20,
        num_frames=5,
        generator=torch.Generator().manual_seed(3),
        progress=lambda i, n: calls.append(i),
    )
    images = sample(
        Shrinker(), labels, SHAPE, scheduler, sampler=sampler, num_steps=20, generator=torch.Generator().manual_seed(3)
    )
    assert strip.shape == (3, 5, *SHAPE)
    assert torch.equal(strip[:, -1], images)
    assert calls == list(range(1, 21))
    assert not torch.allclose(strip[:, 0], strip[:, -1])


def test_progression_of_the_exact_denoiser_shows_the_data_point_in_every_frame():
    scheduler = make_noise_scheduler(prediction_type="v_prediction")
    data = points(0.6, -0.3)
    labels = torch.tensor([1, 0])
    strip = sample_progression(
        PointOracle(scheduler, data, "v_prediction"),
        labels,
        SHAPE,
        scheduler,
        sampler="ddim",
        num_steps=10,
        num_frames=10,
    )
    torch.testing.assert_close(strip, data[labels].unsqueeze(1).expand(2, 10, *SHAPE), atol=1e-3, rtol=0)


@pytest.mark.parametrize("num_frames", [1, 11])
def test_progression_rejects_more_frames_than_steps(num_frames):
    scheduler = make_noise_scheduler()
    with pytest.raises(ValueError, match="num_frames must be between 2 and the number of sampler steps \\(10\\)"):
        sample_progression(
            Shrinker(),
            torch.zeros(1, dtype=torch.long),
            SHAPE,
            scheduler,
            sampler="ddim",
            num_steps=10,
            num_frames=num_frames,
        )


# Every objective with every sampler: (process, sampler, clip_denoised); the ancestral ones draw from a generator.
EVERY_SAMPLER = [
    (make_noise_scheduler(100, beta_schedule="squaredcos_cap_v2"), "ddpm", True),
    (make_noise_scheduler(100, prediction_type="v_prediction"), "ddim", False),
    (make_noise_scheduler(100, prediction_type="sample"), "dpm_solver++", True),
    (FlowMatching(shift=3.0), "euler", False),
    (FlowMatching(), "heun", True),
    (ContinuousVP(prediction="epsilon", time_scale=100), "ddim", False),
    (ContinuousVP(time_scale=100), "ddpm", True),
]
SAMPLER_IDS = [f"{type(process).__name__}-{sampler}" for process, sampler, _ in EVERY_SAMPLER]


def draw(process, sampler: str, clip_denoised: bool, on_x0=None) -> torch.Tensor:
    """Five steps of the Shrinker (its output is eps, v, x0 or the velocity, as the process reads it) for 3 labels."""
    return sample(
        Shrinker(),
        torch.tensor([0, 1, 2]),
        SHAPE,
        process,
        sampler=sampler,
        num_steps=5,
        generator=torch.Generator().manual_seed(3),
        clip_denoised=clip_denoised,
        on_x0=on_x0,
    )


@pytest.mark.parametrize("process, sampler, clip_denoised", EVERY_SAMPLER, ids=SAMPLER_IDS)
def test_the_x0_prediction_of_the_last_step_is_the_sample_under_every_objective_and_sampler(
    process, sampler, clip_denoised
):
    # The last step of every sampler lands where its x0 prediction is the sample: DDPM and DDIM step to alpha_bar = 1
    # (the posterior mean's x_t coefficient is 0 at t = 0), DPM-Solver++ to sigma = 0, the flow's Euler (and Heun's
    # last, first-order, step) from sigma_min to 0 along x_t - sigma v, the continuous samplers to alpha = 1, sigma = 0.
    # The samplers compute that last step in their own arithmetic, so it is equal up to float32 rounding: bitwise here
    # for all but DDPM's ancestral step, whose x0 coefficient beta_0 / (1 - alpha_bar_0) is 1 within an ulp.
    seen = []
    images = draw(process, sampler, clip_denoised, on_x0=lambda i, total, x0: seen.append((i, total, x0)))
    i, total, last_x0 = seen[-1]
    assert [step for step, _, _ in seen] == list(range(total)) and i == total - 1
    assert total == (9 if sampler == "heun" else 5)  # Heun calls the network twice per step but the last
    torch.testing.assert_close(last_x0, images, atol=1e-5, rtol=0)
    assert not torch.allclose(seen[0][2], images, atol=1e-2)  # the first x0 prediction is still far from the sample
    if clip_denoised:
        assert all(x0.abs().max() <= 1 for _, _, x0 in seen)


@pytest.mark.parametrize("process, sampler, clip_denoised", EVERY_SAMPLER, ids=SAMPLER_IDS)
def test_recording_the_x0_predictions_leaves_the_samples_bitwise_unchanged(process, sampler, clip_denoised):
    recorder = X0Progression(3, keep=torch.tensor([0, 2]))
    recorded = draw(process, sampler, clip_denoised, on_x0=recorder)
    assert torch.equal(recorded, draw(process, sampler, clip_denoised))
    strip = recorder.strip(recorded)
    assert strip.shape == (2, 3, *SHAPE) and torch.equal(strip[:, -1], recorded[[0, 2]])
    assert recorder.steps == ([0, 4, 8] if sampler == "heun" else [0, 2, 4])  # the first and the last among them


# --- learned variance in DDPM sampling --------------------------------------------------------------


def ddpm_by_hand(
    model: nn.Module, variance_type: str, scheduler: DDPMScheduler, num_steps: int, seed: int
) -> torch.Tensor:
    """Ancestral sampling with one of diffusers' fixed variances, written out."""
    generator = torch.Generator().manual_seed(seed)
    steps = DDPMScheduler.from_config(scheduler.config, variance_type=variance_type)
    steps.set_timesteps(num_steps)
    x = torch.randn((2, *SHAPE), generator=generator)
    for t in steps.timesteps:
        x = steps.step(model(x, t.expand(2), None), t, x, generator=generator).prev_sample
    return x  # the sampler clamps only with clip_denoised (pixel space)


@pytest.mark.parametrize("v, variance_type", [(-1.0, "fixed_small"), (1.0, "fixed_large"), (7.0, "fixed_large")])
def test_ddpm_samples_with_the_learned_variance_between_beta_tilde_and_beta(v, variance_type):
    # v = -1 is the posterior variance beta-tilde_t, v = +1 is beta_t; v beyond [-1, 1] is clamped.
    scheduler = make_noise_scheduler(100)
    labels = torch.zeros(2, dtype=torch.long)
    learned = sample(
        WithSigma(Shrinker(), v),
        labels,
        SHAPE,
        scheduler,
        sampler="ddpm",
        num_steps=25,
        generator=torch.Generator().manual_seed(4),
    )
    torch.testing.assert_close(
        learned, ddpm_by_hand(Shrinker(), variance_type, scheduler, 25, seed=4), atol=1e-4, rtol=0
    )


def test_learned_variance_changes_ddpm_samples_but_not_the_deterministic_samplers():
    scheduler = make_noise_scheduler(100)
    labels = torch.zeros(2, dtype=torch.long)

    def draw(model, sampler):
        return sample(
            model, labels, SHAPE, scheduler, sampler=sampler, num_steps=25, generator=torch.Generator().manual_seed(5)
        )

    assert not torch.allclose(
        draw(WithSigma(Shrinker(), -1.0), "ddpm"), draw(WithSigma(Shrinker(), 1.0), "ddpm"), atol=1e-3
    )
    for sampler in ("ddim", "dpm_solver++"):
        assert torch.equal(draw(WithSigma(Shrinker(), -1.0), sampler), draw(WithSigma(Shrinker(), 1.0), sampler))
        assert torch.equal(draw(WithSigma(Shrinker(), 1.0), sampler), draw(Shrinker(), sampler))


def test_samplers_reject_a_model_with_the_wrong_channel_count():
    class Tripler(nn.Module):
        def forward(self, x, t, y):
            return torch.cat([x, x, x], dim=1)

    scheduler = make_noise_scheduler()
    with pytest.raises(ValueError, match="returned 6 channels for 2-channel images; expected 2 or 4"):
        sample(Tripler(), torch.zeros(1, dtype=torch.long), SHAPE, scheduler, sampler="ddim", num_steps=2)


# --- the hybrid loss --------------------------------------------------------------------------------


def noised(scheduler, t: torch.Tensor, seed: int = 0):
    """Data points, the labels that pick them, and x_t drawn from q(x_t | x_0) at timesteps t."""
    data = points(0.5, -0.2, 0.8)
    labels = torch.arange(len(t)) % 3
    x0 = data[labels]
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    return data, labels, x0, scheduler.add_noise(x0, noise, t)


@pytest.mark.parametrize("beta_schedule", BETA_SCHEDULES)
def test_vlb_is_finite_at_every_timestep_even_for_wild_outputs(beta_schedule):
    scheduler = make_noise_scheduler(beta_schedule=beta_schedule)
    t = torch.tensor([0, 1, 2, 10, 500, 998, 999, 0])
    _, _, x0, x_t = noised(scheduler, t)
    generator = torch.Generator().manual_seed(1)
    for scale in (0.1, 1.0, 30.0):
        prediction = scale * torch.randn(x0.shape, generator=generator)
        v = scale * torch.randn(x0.shape, generator=generator)
        vlb = variational_bound(prediction, v, x0, x_t, t, scheduler)
        assert vlb.shape == (8,) and torch.isfinite(vlb).all() and (vlb >= -1e-6).all()


def test_vlb_reaches_its_minimum_zero_at_the_exact_posterior():
    # For t > 0, L_t is a KL: zero with the exact mean and v = -1 (variance beta-tilde_t), larger elsewhere, flat at the
    # minimum.
    scheduler = make_noise_scheduler()
    t = torch.tensor([1, 2, 10, 100, 400, 700, 900, 998])
    data, labels, x0, x_t = noised(scheduler, t)
    eps = PointOracle(scheduler, data)(x_t, t, labels)
    v = torch.full_like(x0, -1.0, requires_grad=True)
    at_minimum = variational_bound(eps, v, x0, x_t, t, scheduler)
    at_minimum.sum().backward()
    assert at_minimum.abs().max() < 1e-5
    assert v.grad.abs().max() < 1e-4
    for other in (-0.5, 0.0, 1.0):
        elsewhere = variational_bound(eps, torch.full_like(x0, other), x0, x_t, t, scheduler)
        assert (elsewhere >= at_minimum - 1e-7).all()
        assert (elsewhere[:4] > at_minimum[:4] + 1e-6).all()  # late t: beta-tilde_t ~ beta_t, so v hardly matters
    wrong_mean = variational_bound(eps + 0.1, v.detach(), x0, x_t, t, scheduler)
    assert (wrong_mean > at_minimum + 1e-6).all()


def test_vlb_at_v_plus_one_is_the_kl_from_beta_tilde_to_beta():
    # Exact mean, model variance beta_t: KL = (log(beta / beta~) + beta~ / beta - 1) / 2 nats per dimension.
    scheduler = make_noise_scheduler()
    t = torch.tensor([1, 5, 50, 300])
    data, labels, x0, x_t = noised(scheduler, t)
    eps = PointOracle(scheduler, data)(x_t, t, labels)
    alpha_bar = scheduler.alphas_cumprod.double()
    beta = 1 - alpha_bar[t] / alpha_bar[t - 1]
    beta_tilde = beta * (1 - alpha_bar[t - 1]) / (1 - alpha_bar[t])
    expected = 0.5 * (torch.log(beta / beta_tilde) + beta_tilde / beta - 1) / math.log(2)
    torch.testing.assert_close(
        variational_bound(eps, torch.ones_like(x0), x0, x_t, t, scheduler).double(), expected, rtol=1e-3, atol=1e-6
    )


def test_vlb_at_t0_is_the_discretized_decoder_nll():
    scheduler = make_noise_scheduler()
    t = torch.zeros(3, dtype=torch.long)
    data, labels, x0, x_t = noised(scheduler, t)
    eps = PointOracle(scheduler, data)(x_t, t, labels)
    v = torch.zeros_like(x0)
    alpha_bar = scheduler.alphas_cumprod.double()
    beta_0 = 1 - alpha_bar[0]
    beta_tilde_1 = (1 - alpha_bar[1] / alpha_bar[0]) * (1 - alpha_bar[0]) / (1 - alpha_bar[1])
    log_scale = 0.25 * (torch.log(beta_0) + torch.log(beta_tilde_1))  # half the log variance at v = 0
    expected = -discretized_gaussian_log_likelihood(x0, x0, torch.full_like(x0, log_scale.item())).flatten(1).mean(
        1
    ) / math.log(2)
    torch.testing.assert_close(variational_bound(eps, v, x0, x_t, t, scheduler), expected, atol=1e-4, rtol=1e-4)


def test_discretized_likelihood_is_a_distribution_over_the_256_levels():
    levels = torch.linspace(-1, 1, 256)  # (256,)
    for mean, log_scale in (
        (0.0, math.log(0.5)),
        (0.93, math.log(0.01)),
        (-1.2, math.log(0.003)),
        (0.3, math.log(5.0)),
    ):
        log_p = discretized_gaussian_log_likelihood(
            levels, torch.full_like(levels, mean), torch.full_like(levels, log_scale)
        )
        assert torch.isfinite(log_p).all() and log_p.exp().sum().item() == pytest.approx(1.0, abs=1e-4)
    narrow = discretized_gaussian_log_likelihood(
        torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([math.log(1e-4)])
    )
    assert narrow.item() == pytest.approx(0.0, abs=1e-6)  # a spike on the level holds all the mass


def test_normal_kl_is_zero_for_equal_gaussians_and_matches_the_closed_form():
    m, lv = torch.tensor([0.3]), torch.tensor([-1.0])
    assert normal_kl(m, lv, m, lv).item() == 0
    expected = 0.5 * (0.5 + math.exp(-1.0) / math.exp(-0.5) + 0.4**2 / math.exp(-0.5) - 1)
    assert normal_kl(m, lv, m + 0.4, lv + 0.5).item() == pytest.approx(expected, rel=1e-6)


class Constant(nn.Module):
    """Returns a learnable output, whatever the input: gradients land on `out` directly."""

    def __init__(self, out: torch.Tensor):
        super().__init__()
        self.out = nn.Parameter(out)

    def forward(self, x, t, y):
        return self.out


def test_hybrid_loss_adds_lambda_T_vlb_and_its_vlb_trains_only_the_sigma_channels():
    scheduler = make_noise_scheduler(200)
    x0 = points(0.5, -0.5)[[0, 1, 0, 1]]
    y = torch.tensor([0, 1, 0, 1])
    model = Constant(0.3 * torch.randn((4, 4, 4, 4), generator=torch.Generator().manual_seed(0)))

    simple = diffusion_loss(model, x0, y, scheduler, generator=torch.Generator().manual_seed(2))
    hybrid = hybrid_loss(model, x0, y, scheduler, generator=torch.Generator().manual_seed(2))
    replay = torch.Generator().manual_seed(2)
    t = torch.randint(0, 200, (4,), generator=replay)
    x_t = scheduler.add_noise(x0, torch.randn(x0.shape, generator=replay), t)
    vlb = variational_bound(model.out[:, :2], model.out[:, 2:], x0, x_t, t, scheduler)
    torch.testing.assert_close(hybrid, simple + 1e-3 * 200 * vlb.mean())

    (grad_simple,) = torch.autograd.grad(simple, model.out, retain_graph=True)
    (grad_vlb_part,) = torch.autograd.grad(hybrid - simple, model.out)
    assert not grad_simple[:, 2:].abs().sum() and grad_simple[:, :2].abs().sum() > 0  # L_simple: prediction only
    # L_vlb: sigma only (stop-gradient)
    assert not grad_vlb_part[:, :2].abs().sum() and grad_vlb_part[:, 2:].abs().sum() > 0


def test_hybrid_loss_trains_a_learned_sigma_unet_and_needs_its_sigma_channels():
    from model.unet import UNet

    scheduler = make_noise_scheduler(100)
    torch.manual_seed(0)
    unet = UNet(
        in_channels=2,
        out_channels=4,
        down_channels=(8, 8),
        mid_channels=(8, 8),
        down_sample=(True,),
        num_down_layers=1,
        num_mid_layers=0,
        num_up_layers=1,
        time_emb_dim=8,
        attention=False,
        num_classes=3,
        norm_groups=4,
    )
    x0, y = points(0.5, -0.5, 0.0), torch.tensor([0, 1, 2])
    loss = hybrid_loss(unet, x0, y, scheduler, generator=torch.Generator().manual_seed(0))
    assert loss.shape == () and torch.isfinite(loss)
    loss.backward()
    assert unet.conv_out.weight.grad[2:].abs().sum() > 0
    with pytest.raises(ValueError, match="hybrid loss needs a learned-sigma model: 4 output channels"):
        hybrid_loss(PointOracle(scheduler, x0), x0, y, scheduler)
    with pytest.raises(ValueError, match="vlb_weight > 0"):
        hybrid_loss(unet, x0, y, scheduler, vlb_weight=0.0)
