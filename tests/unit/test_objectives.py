"""The objectives beside DDPM: rectified flow (model/flow.py) and continuous-time VP (model/continuous.py), each with a
loss and samplers that are exact on a model known in closed form; min-SNR weighting, the OneCycle schedule, and what
the spec refuses."""

import math

import pytest
import torch
from torch import nn

from model.continuous import ContinuousVP, continuous_loss
from model.diffusion import diffusion_loss, make_noise_scheduler, sample
from model.flow import FlowMatching, flow_loss
from orchestrator.specs.base import SpecError
from orchestrator.specs.job import parse_spec
from orchestrator.train.schedule import one_cycle_factor


class KnownTarget(nn.Module):
    """The exact velocity towards one fixed image c: on x_t = (1 - t) c + t eps, v = eps - c = (x_t - c) / t, where
    t is the network's time input divided by the training scale."""

    def __init__(self, target: torch.Tensor, scale: int = 1000):
        super().__init__()
        self.target, self.scale = target, scale

    def forward(self, x, t, y):
        sigma = (t.float() / self.scale).view(-1, 1, 1, 1)
        return (x - self.target) / sigma

    def forward_with_cfg(self, x, t, y, guidance_scale):
        return self.forward(x, t, y)


def test_training_times_follow_the_chosen_distribution_and_the_shift():
    generator = torch.Generator().manual_seed(0)
    uniform = FlowMatching(timestep_sampling="uniform").draw_t(20000, torch.device("cpu"), generator)
    logit_normal = FlowMatching().draw_t(20000, torch.device("cpu"), generator)
    shifted = FlowMatching(shift=3.0).draw_t(20000, torch.device("cpu"), generator)
    for t in (uniform, logit_normal, shifted):
        assert 0 < t.min() and t.max() < 1
    assert abs(uniform.mean() - 0.5) < 0.01 and abs(uniform.std() - 1 / math.sqrt(12)) < 0.01
    assert abs(logit_normal.median() - 0.5) < 0.01 and logit_normal.std() < uniform.std()  # mass mid-path
    assert abs(shifted.median() - 0.75) < 0.01  # SD3's shift 3 moves t = 0.5 to 3 * 0.5 / (1 + 2 * 0.5) = 0.75
    assert FlowMatching(shift=3.0).shifted(torch.tensor([0.0, 0.5, 1.0])).tolist() == [0.0, 0.75, 1.0]


def test_the_loss_is_zero_for_the_exact_velocity_and_positive_otherwise():
    target = torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    x0 = target.expand(8, -1, -1, -1)
    flow = FlowMatching()
    torch.manual_seed(0)
    assert flow_loss(KnownTarget(target), x0, None, flow) < 1e-9
    assert flow_loss(KnownTarget(target + 0.1), x0, None, flow) > 1e-3


@pytest.mark.parametrize("sampler", ["euler", "heun"])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_the_samplers_integrate_a_known_velocity_field_to_its_image(sampler, shift):
    target = torch.rand(1, 1, 4, 4, generator=torch.Generator().manual_seed(2)) * 2 - 1
    labels = torch.zeros(3, dtype=torch.long)
    images = sample(
        KnownTarget(target),
        labels,
        (1, 4, 4),
        FlowMatching(shift=shift),
        sampler=sampler,
        num_steps=5,
        generator=torch.Generator().manual_seed(3),
    )
    torch.testing.assert_close(images, target.expand(3, -1, -1, -1), atol=1e-5, rtol=0)  # straight paths: exact


def test_a_ddpm_sampler_is_refused_for_a_flow_and_a_flow_sampler_for_ddpm():
    model, labels = KnownTarget(torch.zeros(1, 1, 4, 4)), torch.zeros(1, dtype=torch.long)
    with pytest.raises(ValueError, match="does not sample a flow-matching model"):
        sample(model, labels, (1, 4, 4), FlowMatching(), sampler="ddim", num_steps=5)
    with pytest.raises(ValueError, match="does not sample a DDPM model"):
        sample(model, labels, (1, 4, 4), make_noise_scheduler(100), sampler="euler", num_steps=5)


class Constant(nn.Module):
    def __init__(self, value: float):
        super().__init__()
        self.value = value

    def forward(self, x, t, y):
        return torch.full_like(x, self.value)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
def test_min_snr_weights_each_sample_by_its_clipped_snr_in_the_form_of_the_target(prediction):
    scheduler = make_noise_scheduler(100, "squaredcos_cap_v2", prediction_type=prediction)
    x0 = torch.randn(16, 1, 4, 4, generator=torch.Generator().manual_seed(4))
    model, gamma = Constant(0.3), 5.0

    def run(**weighting):
        return diffusion_loss(model, x0, None, scheduler, generator=torch.Generator().manual_seed(5), **weighting)

    generator = torch.Generator().manual_seed(5)  # the draws diffusion_loss makes, made again
    t = torch.randint(0, 100, (16,), generator=generator)
    noise = torch.randn(x0.shape, generator=generator)
    target = {"epsilon": noise, "sample": x0, "v_prediction": scheduler.get_velocity(x0, noise, t)}[prediction]
    per_sample = (0.3 - target).pow(2).mean(dim=(1, 2, 3))
    alpha_bar = scheduler.alphas_cumprod[t]
    snr = alpha_bar / (1 - alpha_bar)
    clipped = snr.clamp(max=gamma)
    weight = {"epsilon": clipped / snr, "v_prediction": clipped / (snr + 1), "sample": clipped}[prediction]
    torch.testing.assert_close(run(snr_gamma=gamma), (weight * per_sample).mean())
    torch.testing.assert_close(run(), per_sample.mean())


@pytest.mark.parametrize("anneal", ["cos", "linear"])
def test_one_cycle_is_torchs_one_cycle_lr_step_by_step(anneal):
    from orchestrator.specs.job import OneCycleSpec

    cycle = OneCycleSpec(pct_start=0.25, div_factor=10.0, final_div_factor=100.0, anneal=anneal)
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    reference = torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=2.0,
        total_steps=40,
        pct_start=0.25,
        div_factor=10.0,
        final_div_factor=100.0,
        anneal_strategy=anneal,
        cycle_momentum=False,
    )
    for step in range(40):
        assert one_cycle_factor(step, 40, cycle) * 2.0 == pytest.approx(optimizer.param_groups[0]["lr"], rel=1e-9)
        optimizer.step()
        reference.step()


def flow_spec(text: str):
    return parse_spec("name: flow\n" + text + ("" if "train:" in text else "\ntrain: {steps: 10}"))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("diffusion: {objective: flow, beta_schedule: squaredcos_cap_v2}", "beta_schedule belong(s) to objective ddpm"),
        ("diffusion: {objective: flow, prediction: sample}", "prediction belong(s) to objective ddpm"),
        ("diffusion: {shift: 3}", "shift belong(s) to objective flow"),
        ("diffusion: {objective: flow, logit_std: 0}", "logit_std"),
        ("diffusion: {objective: flow, shift: -1}", "shift"),
        ("diffusion: {objective: flow, timestep_sampling: uniform, logit_mean: 1}", "shape timestep_sampling"),
        ("diffusion: {objective: flow}\nsample: {sampler: ddim}", "sample.sampler ddim does not sample objective flow"),
        ("sample: {sampler: euler}", "sample.sampler euler does not sample objective ddpm"),
        ("diffusion: {objective: flow}\nmodel: {learn_sigma: true}", "objective flow has none"),
        ("train: {steps: 10, lr_schedule: one_cycle, warmup_steps: 5}", "remove train.warmup_steps"),
        ("train: {steps: 10, lr_schedule: one_cycle, one_cycle: {pct_start: 1.5}}", "pct_start"),
        ("train: {steps: 10, one_cycle: {div_factor: 10}}", "set lr_schedule: one_cycle"),
        ("diffusion: {min_snr_gamma: 5, loss: hybrid}\nmodel: {learn_sigma: true}", "hybrid loss keeps"),
    ],
)
def test_fields_that_do_not_fit_the_objective_or_schedule_are_refused(text, message):
    with pytest.raises(SpecError, match=message.replace("(", r"\(").replace(")", r"\)")):
        flow_spec(text)


def test_a_flow_spec_samples_with_euler_unless_told_and_round_trips():
    import yaml

    from orchestrator.specs.job import spec_from_dict

    spec = flow_spec("diffusion: {objective: flow, shift: 2}")
    assert spec.sample.sampler == "euler" and spec.diffusion.samplers == ("euler", "heun")
    assert spec_from_dict(yaml.safe_load(spec.to_yaml())) == spec


class KnownImage(nn.Module):
    """The exact continuous-time VP prediction for one fixed image c, in the form `prediction` asks for."""

    def __init__(self, target: torch.Tensor, prediction: str, scale: int = 1000):
        super().__init__()
        self.target, self.prediction, self.scale = target, prediction, scale

    def forward(self, x, t, y):
        alpha, sigma = (v.float().view(-1, 1, 1, 1) for v in ContinuousVP.alpha_sigma(t / self.scale))
        eps = (x - alpha * self.target) / sigma
        return {"sample": self.target.expand_as(x), "epsilon": eps, "v_prediction": alpha * eps - sigma * self.target}[
            self.prediction
        ]

    def forward_with_cfg(self, x, t, y, guidance_scale):
        return self.forward(x, t, y)


@pytest.mark.parametrize("prediction", ["sample", "epsilon", "v_prediction"])
def test_continuous_vp_loss_is_zero_for_the_exact_prediction(prediction):
    target = torch.rand(1, 1, 4, 4, generator=torch.Generator().manual_seed(6)) * 2 - 1
    x0 = target.expand(8, -1, -1, -1)
    process = ContinuousVP(prediction=prediction)
    torch.manual_seed(0)
    assert continuous_loss(KnownImage(target, prediction), x0, None, process) < 1e-8
    assert continuous_loss(KnownImage(target + 0.2, prediction), x0, None, process) > 1e-4
    weighted = continuous_loss(KnownImage(target, prediction), x0, None, process, snr_gamma=5.0)
    assert weighted < 1e-6


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
@pytest.mark.parametrize("prediction", ["sample", "epsilon", "v_prediction"])
def test_continuous_samplers_land_on_the_image_an_exact_model_predicts(sampler, prediction):
    target = torch.rand(1, 1, 4, 4, generator=torch.Generator().manual_seed(7)) * 2 - 1
    labels = torch.zeros(3, dtype=torch.long)
    images = sample(
        KnownImage(target, prediction),
        labels,
        (1, 4, 4),
        ContinuousVP(prediction=prediction),
        sampler=sampler,
        num_steps=6,
        generator=torch.Generator().manual_seed(8),
    )
    torch.testing.assert_close(images, target.expand(3, -1, -1, -1), atol=1e-4, rtol=0)


def test_the_continuous_objective_predicts_x0_unless_told_and_refuses_ddpm_fields_and_other_samplers():
    spec = flow_spec("diffusion: {objective: continuous}")
    assert spec.diffusion.prediction == "sample" and spec.sample.sampler == "ddim"
    assert flow_spec("diffusion: {objective: continuous, prediction: v_prediction}").diffusion.prediction == (
        "v_prediction"
    )
    for text, message in [
        ("diffusion: {objective: continuous, beta_schedule: scaled_linear}", "objective continuous has the cosine"),
        ("diffusion: {objective: continuous}\nsample: {sampler: dpm_solver++}", "does not sample objective continuous"),
        ("diffusion: {objective: continuous, shift: 2}", "belong(s) to objective flow"),
    ]:
        with pytest.raises(SpecError, match=message.replace("(", r"\(").replace(")", r"\)")):
            flow_spec(text)


MODELS = {
    "dit adaln_zero": "model: {patch_size: 4, hidden_size: 32, depth: 1, num_heads: 2, class_dropout: 0.1}",
    "dit in_context conv ffn": (
        "model: {patch_size: 4, hidden_size: 32, depth: 1, num_heads: 2, class_dropout: 0.1, "
        "conditioning: in_context, ffn: conv}"
    ),
    "dit cross_attention": (
        "model: {patch_size: 4, hidden_size: 32, depth: 1, num_heads: 2, class_dropout: 0.1, "
        "conditioning: cross_attention}"
    ),
    "unet": (
        "model: {arch: unet, class_dropout: 0.1, unet: {down_channels: [8, 16], mid_channels: [16, 8], "
        "down_sample: [true], num_down_layers: 1, num_mid_layers: 1, num_up_layers: 1, num_heads: 2, "
        "time_emb_dim: 16, norm_groups: 4}}"
    ),
}
OBJECTIVES = {
    "flow": ("diffusion: {objective: flow, shift: 2}", "euler"),
    "continuous": ("diffusion: {objective: continuous}", "ddpm"),
}


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("model_name", MODELS)
def test_every_network_trains_and_samples_with_guidance_under_every_objective(model_name, objective):
    from model.diffusion import training_loss
    from orchestrator.components.model import build_model, make_diffusion
    from orchestrator.components.model_input import pixel_input

    diffusion, sampler = OBJECTIVES[objective]
    spec = flow_spec(f"{MODELS[model_name]}\n{diffusion}\ndata: {{source: digits, resolution: 8}}")
    torch.manual_seed(0)
    model = build_model(spec, pixel_input(spec, 10))
    process = make_diffusion(spec)
    x0, labels = torch.rand(4, 1, 8, 8) * 2 - 1, torch.tensor([0, 1, 2, 3])
    loss = training_loss(model, x0, labels, process, snr_gamma=5.0 if objective == "continuous" else None)
    loss.backward()
    assert torch.isfinite(loss) and any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    model.eval()
    images = sample(model, labels, (1, 8, 8), process, sampler=sampler, num_steps=3, guidance_scale=2.0, null_label=10)
    assert images.shape == (4, 1, 8, 8) and torch.isfinite(images).all()
