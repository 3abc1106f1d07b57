"""EMA of model weights: it moves, warms up, skips, converges, and survives a save and load."""

import pytest
import torch
import torch.nn as nn

from model.ema import EMA


def small_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))


def params(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def perturb(model: nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator))


def test_shadow_is_a_frozen_float32_eval_copy():
    model = small_model().bfloat16()
    ema = EMA(model)
    assert ema.module is not model and not ema.module.training
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in ema.module.parameters())
    assert all(p.requires_grad for p in model.parameters()) and model.training  # the model is left as it was
    with torch.no_grad():
        model[0].weight.add_(1)
    assert not torch.equal(ema.module[0].weight, model[0].weight.float())


def test_decay_warms_up_as_k_diffusion_with_inv_gamma_one():
    ema = EMA(small_model(), decay=0.9999, warmup_power=0.75)
    assert ema.decay_at(0) == 0.0  # the first update copies the model
    assert ema.decay_at(1) == pytest.approx(1 - 2**-0.75)
    assert ema.decay_at(9) == pytest.approx(1 - 10**-0.75)
    assert ema.decay_at(10_000) == pytest.approx(0.999, abs=1e-6)  # k-diffusion: power 3/4 reaches 0.999 at 10K
    assert ema.decay_at(10**9) == 0.9999  # capped at decay
    assert EMA(small_model(), decay=0.99, warmup_power=0).decay_at(0) == 0.99


def test_weights_move_toward_the_model_by_the_scheduled_decay():
    model = small_model()
    ema = EMA(model, decay=0.9, warmup_power=0)
    before = params(ema.module)
    perturb(model, seed=1)
    ema.update(model, step=1)
    after, target = params(ema.module), params(model)
    for name in before:
        assert not torch.equal(after[name], before[name]), name
        torch.testing.assert_close(after[name], 0.9 * before[name] + 0.1 * target[name])
    assert ema.num_updates == 1


def test_first_warmed_up_update_copies_the_model_and_buffers():
    model = small_model()
    ema = EMA(model)
    perturb(model, seed=2)
    model(torch.randn(16, 4))  # train mode: BatchNorm running statistics change
    ema.update(model, step=1)
    for (name, shadow), source in zip(ema.module.state_dict().items(), model.state_dict().values()):
        assert torch.equal(shadow, source.to(shadow.dtype)), name


def test_update_every_skips_the_steps_in_between():
    model = small_model()
    ema = EMA(model, decay=0.5, warmup_power=0, update_every=3)
    start = params(ema.module)
    perturb(model, seed=3)
    for step in (1, 2, 4, 5):
        ema.update(model, step)
    assert ema.num_updates == 0
    assert all(torch.equal(p, start[name]) for name, p in params(ema.module).items())
    ema.update(model, 3)
    ema.update(model, 6)
    assert ema.num_updates == 2


def test_ema_of_a_constant_model_converges_to_it():
    model = small_model()
    ema = EMA(model, decay=0.9, warmup_power=0)
    perturb(model, seed=4)
    for step in range(1, 301):
        ema.update(model, step)
    for name, p in params(model).items():
        torch.testing.assert_close(ema.module.get_parameter(name), p, atol=1e-6, rtol=0)


def test_state_dict_round_trip_continues_identically():
    model = small_model()
    ema = EMA(model, decay=0.99)
    for step in range(1, 6):
        perturb(model, seed=step)
        ema.update(model, step)
    state = ema.state_dict()
    assert state["num_updates"] == 5 and set(state["weights"]) == set(model.state_dict())

    restored = EMA(small_model(seed=9), decay=0.99)
    restored.load_state_dict(state)
    assert restored.num_updates == 5
    perturb(model, seed=6)
    ema.update(model, 6)
    restored.update(model, 6)
    for name, p in params(ema.module).items():
        assert torch.equal(restored.module.get_parameter(name), p), name


def test_copy_to_loads_the_averaged_weights_into_a_model():
    model = small_model()
    ema = EMA(model, decay=0.9, warmup_power=0)
    perturb(model, seed=5)
    ema.update(model, 1)
    target = small_model(seed=7).bfloat16()
    ema.copy_to(target)
    for name, p in params(ema.module).items():
        assert torch.equal(target.get_parameter(name), p.bfloat16()), name


def test_update_from_a_low_precision_model_keeps_the_shadow_float32():
    model = small_model().bfloat16()
    ema = EMA(model, decay=0.5, warmup_power=0)
    perturb(model, seed=8)
    ema.update(model, 1)
    assert all(p.dtype == torch.float32 for p in ema.module.parameters())


def test_update_rejects_a_model_with_other_parameters():
    ema = EMA(small_model())
    with pytest.raises(ValueError, match="pass the unwrapped model"):
        ema.update(nn.Linear(4, 2), step=1)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"decay": 1.0}, r"decay must be in \[0, 1\), got 1.0"),
        ({"decay": -0.1}, r"decay must be in \[0, 1\)"),
        ({"update_every": 0}, "update_every must be an integer >= 1, got 0"),
        ({"warmup_power": -1.0}, "warmup_power must be >= 0"),
    ],
)
def test_impossible_settings_raise_value_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EMA(small_model(), **kwargs)
