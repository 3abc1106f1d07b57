"""Diffusion math: the noise scheduler factory, the training loss, and the samplers' wiring."""

import pytest
import torch
import torch.nn as nn
from diffusers import DDPMScheduler

from model.diffusion import diffusion_loss, make_noise_scheduler, sample
from model.dit import DiT

SHAPE = (2, 4, 4)


class PointOracle(nn.Module):
    """The exact denoiser when the data of label k is the single point points[k].

    For q(x_t | x_0 = x*), eps = (x_t - sqrt(abar_t) x*) / sqrt(1 - abar_t) exactly; v and x_0 follow.
    With learn_sigma it appends junk channels that the loss and the samplers must ignore.
    """

    def __init__(
        self,
        scheduler: DDPMScheduler,
        points: torch.Tensor,
        prediction_type: str = "epsilon",
        learn_sigma: bool = False,
    ):
        super().__init__()
        self.register_buffer("alphas_cumprod", scheduler.alphas_cumprod.clone().double())
        self.register_buffer("points", points)  # (K, C, H, W)
        self.prediction_type = prediction_type
        self.learn_sigma = learn_sigma
        self.in_channels = points.shape[1]

    def forward(self, x, t, y):
        abar = self.alphas_cumprod[t.long()].view(-1, 1, 1, 1)  # (N, 1, 1, 1)
        x_star = self.points[y].double()  # (N, C, H, W)
        eps = (x.double() - abar.sqrt() * x_star) / (1 - abar).sqrt()  # (N, C, H, W)
        out = {"epsilon": eps, "sample": x_star, "v_prediction": abar.sqrt() * eps - (1 - abar).sqrt() * x_star}[
            self.prediction_type
        ]
        if self.learn_sigma:
            out = torch.cat([out, torch.full_like(out, 1e3)], dim=1)  # (N, 2C, H, W)
        return out.to(x.dtype)

    # The guidance arithmetic under test is DiT's own, applied to this oracle's forward.
    forward_with_cfg = DiT.forward_with_cfg


def points(*values: float) -> torch.Tensor:
    """One constant image per label, e.g. points(0.3, -0.2): label 0 -> 0.3 everywhere, label 1 -> -0.2."""
    return torch.stack([torch.full(SHAPE, v) for v in values]) + 0.1 * torch.linspace(-1, 1, SHAPE[-1])


def tiny_dit(**overrides) -> DiT:
    torch.manual_seed(0)
    return DiT(
        **{
            **dict(input_size=4, patch_size=2, in_channels=2, hidden_size=32, depth=2, num_heads=2, num_classes=3),
            **overrides,
        }
    )


def batch(n: int = 8, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand((n, *SHAPE), generator=generator) * 2 - 1, torch.randint(0, 3, (n,), generator=generator)


# --- the noise scheduler --------------------------------------------------------------------------


def test_noise_scheduler_is_a_non_clipping_ddpm_scheduler_with_the_given_betas():
    scheduler = make_noise_scheduler(500, "linear", 2e-4, 0.03)
    assert isinstance(scheduler, DDPMScheduler)
    assert scheduler.config.clip_sample is False
    assert scheduler.config.num_train_timesteps == 500
    assert scheduler.betas[0].item() == pytest.approx(2e-4) and scheduler.betas[-1].item() == pytest.approx(0.03)
    cosine = make_noise_scheduler(beta_schedule="squaredcos_cap_v2")
    assert cosine.alphas_cumprod[0] > 0.9999 and cosine.alphas_cumprod[-1] < 1e-4


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            {"beta_schedule": "cosine"},
            "unknown beta_schedule 'cosine' \\(valid: linear, scaled_linear, squaredcos_cap_v2\\)",
        ),
        ({"prediction_type": "eps"}, "unknown prediction_type 'eps'"),
        ({"num_train_timesteps": 1}, "at least 2"),
        ({"beta_start": 0.1, "beta_end": 0.01}, "beta_start <= beta_end"),
    ],
)
def test_noise_scheduler_rejects_unknown_settings_with_the_valid_ones(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_noise_scheduler(**kwargs)


# --- the training loss ----------------------------------------------------------------------------


class Recorder(nn.Module):
    """Predicts zeros and remembers what it was called with."""

    def forward(self, x, t, y):
        self.seen = (x, t, y)
        return torch.zeros_like(x)


def test_loss_noises_x0_at_uniform_timesteps_and_regresses_the_noise():
    scheduler = make_noise_scheduler(100)
    x0, y = batch(n=64)
    model = Recorder()
    loss = diffusion_loss(model, x0, y, scheduler, generator=torch.Generator().manual_seed(1))

    replay = torch.Generator().manual_seed(1)
    t = torch.randint(0, 100, (64,), generator=replay)
    noise = torch.randn(x0.shape, generator=replay)
    abar = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t, seen_t, seen_y = model.seen
    assert torch.equal(seen_t, t) and torch.equal(seen_y, y)
    assert torch.allclose(x_t, abar.sqrt() * x0 + (1 - abar).sqrt() * noise, atol=1e-6)
    assert loss.item() == pytest.approx(noise.pow(2).mean().item(), rel=1e-5)


def test_loss_timesteps_cover_the_whole_training_range():
    scheduler = make_noise_scheduler(10)
    x0, y = batch(n=256)
    model = Recorder()
    diffusion_loss(model, x0, y, scheduler, generator=torch.Generator().manual_seed(2))
    assert set(model.seen[1].tolist()) == set(range(10))


def test_loss_is_a_finite_scalar_and_gradients_flow():
    model = tiny_dit()
    x0, y = batch()
    loss = diffusion_loss(model, x0, y, make_noise_scheduler(), generator=torch.Generator().manual_seed(0))
    assert loss.shape == () and torch.isfinite(loss)
    loss.backward()
    assert model.final_layer.linear.weight.grad.abs().sum() > 0


def test_loss_is_reproducible_with_the_same_generator_and_differs_with_another():
    model, scheduler = tiny_dit().eval(), make_noise_scheduler()
    x0, y = batch()
    nn.init.normal_(model.final_layer.linear.weight, std=0.1)

    def loss(seed: int) -> torch.Tensor:
        return diffusion_loss(model, x0, y, scheduler, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(loss(3), loss(3))
    assert not torch.equal(loss(3), loss(4))
    torch.manual_seed(5)
    first = diffusion_loss(model, x0, y, scheduler)
    torch.manual_seed(5)
    assert torch.equal(diffusion_loss(model, x0, y, scheduler), first)  # without a generator: the global RNG


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("learn_sigma", [False, True])
def test_loss_vanishes_for_the_exact_denoiser_and_ignores_learned_sigma_channels(prediction_type, learn_sigma):
    scheduler = make_noise_scheduler(prediction_type=prediction_type)
    data = points(0.5, -0.5, 0.0)
    oracle = PointOracle(scheduler, data, prediction_type, learn_sigma)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    loss = diffusion_loss(oracle, data[y], y, scheduler, generator=torch.Generator().manual_seed(0))
    assert loss.item() < 1e-8


def test_loss_is_float32_when_the_model_predicts_in_bfloat16():
    scheduler = make_noise_scheduler()
    oracle = PointOracle(scheduler, points(0.5))

    class HalfPrecision(nn.Module):
        def forward(self, x, t, y):
            return oracle(x, t, y).bfloat16()

    y = torch.zeros(4, dtype=torch.long)
    loss = diffusion_loss(HalfPrecision(), points(0.5)[y], y, scheduler, generator=torch.Generator().manual_seed(0))
    assert loss.dtype == torch.float32 and loss.item() < 1e-3


# --- sampling -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sampler, num_steps, beta_schedule",
    [
        ("ddpm", 1000, "linear"),
        ("ddim", 50, "linear"),
        ("ddim", 50, "squaredcos_cap_v2"),
        ("ddpm", 100, "squaredcos_cap_v2"),
    ],
)
@pytest.mark.parametrize("learn_sigma", [False, True])
def test_samplers_return_the_data_point_under_the_exact_denoiser(sampler, num_steps, beta_schedule, learn_sigma):
    scheduler = make_noise_scheduler(beta_schedule=beta_schedule)
    data = points(0.7, -0.4)
    oracle = PointOracle(scheduler, data, learn_sigma=learn_sigma)
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
    assert images.shape == (4, *SHAPE)
    torch.testing.assert_close(images, data[labels], atol=1e-4, rtol=0)


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_ddim_follows_the_schedulers_prediction_type(prediction_type):
    scheduler = make_noise_scheduler(prediction_type=prediction_type)
    data = points(0.3)
    labels = torch.zeros(2, dtype=torch.long)
    images = sample(
        PointOracle(scheduler, data, prediction_type), labels, SHAPE, scheduler, sampler="ddim", num_steps=20
    )
    torch.testing.assert_close(images, data[labels], atol=1e-4, rtol=0)


@pytest.mark.parametrize("scale", [1.0, 2.0, 3.0])
def test_guidance_extrapolates_from_the_null_class_towards_the_label(scale):
    # Label 0's data is a, the null class's is b: guided eps is exactly the oracle of b + s (a - b).
    scheduler = make_noise_scheduler()
    a, b = 0.2, -0.1
    oracle = PointOracle(scheduler, points(a, b), learn_sigma=True)
    labels = torch.zeros(3, dtype=torch.long)
    images = sample(oracle, labels, SHAPE, scheduler, sampler="ddim", num_steps=50, guidance_scale=scale, null_label=1)
    expected = points(b)[0] + scale * (points(a)[0] - points(b)[0])
    torch.testing.assert_close(images, expected.expand(3, *SHAPE), atol=1e-4, rtol=0)


def test_pixel_samples_are_clamped_to_the_data_range_and_latents_are_left_as_they_are():
    scheduler = make_noise_scheduler()

    def draw(clip_denoised: bool) -> torch.Tensor:
        return sample(
            PointOracle(scheduler, points(3.0)),
            torch.zeros(2, dtype=torch.long),
            SHAPE,
            scheduler,
            sampler="ddim",
            num_steps=10,
            clip_denoised=clip_denoised,
        )

    assert torch.equal(draw(clip_denoised=True), torch.ones(2, *SHAPE))  # pixels live in [-1, 1]
    latents = draw(clip_denoised=False)  # the data point itself (3.0 and a small ramp), unbounded
    torch.testing.assert_close(latents, points(3.0).expand(2, *SHAPE), atol=1e-3, rtol=0)


def test_ddpm_sampling_depends_only_on_the_generator():
    scheduler = make_noise_scheduler(100)
    model = tiny_dit().eval()
    nn.init.normal_(model.final_layer.linear.weight, std=0.1)
    labels = torch.tensor([0, 1, 2])

    def draw(seed: int) -> torch.Tensor:
        return sample(
            model, labels, SHAPE, scheduler, sampler="ddpm", num_steps=20, generator=torch.Generator().manual_seed(seed)
        )

    torch.manual_seed(0)
    first = draw(7)
    torch.manual_seed(1)  # the global RNG plays no part
    assert torch.equal(draw(7), first)
    assert not torch.equal(draw(8), first)


def test_fixed_noise_fixes_ddim_samples_and_matches_the_generators_own_draw():
    scheduler = make_noise_scheduler(100)
    model = tiny_dit().eval()
    nn.init.normal_(model.final_layer.linear.weight, std=0.1)
    labels = torch.tensor([0, 1, 2])
    noise = torch.randn((3, *SHAPE), generator=torch.Generator().manual_seed(9))
    with_noise = sample(
        model,
        labels,
        SHAPE,
        scheduler,
        sampler="ddim",
        num_steps=10,
        noise=noise,
        generator=torch.Generator().manual_seed(1),
    )
    from_generator = sample(
        model, labels, SHAPE, scheduler, sampler="ddim", num_steps=10, generator=torch.Generator().manual_seed(9)
    )
    assert torch.equal(with_noise, from_generator)
    # caller's noise untouched
    assert torch.equal(noise, torch.randn((3, *SHAPE), generator=torch.Generator().manual_seed(9)))


def test_sampling_reports_progress_keeps_the_models_mode_and_builds_no_graph():
    scheduler = make_noise_scheduler(100)
    model = tiny_dit().train()
    calls = []
    images = sample(
        model,
        torch.tensor([0, 1]),
        SHAPE,
        scheduler,
        sampler="ddim",
        num_steps=7,
        progress=lambda i, n: calls.append((i, n)),
    )
    assert calls == [(i, 7) for i in range(1, 8)]
    assert model.training and not images.requires_grad


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"sampler": "euler"}, "sampler 'euler' does not sample a DDPM model"),
        ({"guidance_scale": 2.0}, "needs null_label"),
        ({"noise": torch.zeros(3, *SHAPE)}, "noise has shape"),
        ({"num_steps": 0}, "num_steps must be between 1 and num_train_timesteps=1000"),
    ],
)
def test_sample_rejects_impossible_requests(kwargs, message):
    scheduler = make_noise_scheduler()
    with pytest.raises(ValueError, match=message):
        sample(PointOracle(scheduler, points(0.0)), torch.zeros(2, dtype=torch.long), SHAPE, scheduler, **kwargs)
