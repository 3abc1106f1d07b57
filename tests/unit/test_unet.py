"""The DDPM U-Net: shapes at MNIST and CIFAR sizes, argument checks, conditioning, skips, training."""

import pytest
import torch
import torch.nn as nn

from model.diffusion import diffusion_loss, make_noise_scheduler
from model.unet import UNet

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

# The default topology (28 -> 14 -> 7, attention on the two lower levels), at toy widths.
TINY = dict(
    down_channels=(8, 16, 16, 32),
    mid_channels=(32, 32, 16),
    down_sample=(True, True, False),
    num_down_layers=1,
    num_mid_layers=1,
    num_up_layers=1,
    num_heads=2,
    time_emb_dim=16,
    attention=(False, True, True),
    norm_groups=4,
)


def tiny_unet(**overrides) -> UNet:
    torch.manual_seed(0)
    return UNet(**{**TINY, **overrides})


def randomize(model: nn.Module) -> nn.Module:
    """Undo the zero init of the output layers, so that every input can change the output."""
    torch.manual_seed(1)
    for name, parameter in model.named_parameters():
        if parameter.dim() > 1 and not parameter.abs().sum():
            nn.init.normal_(parameter, std=0.05)
    return model


# --- shapes -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [28, 32])
@pytest.mark.parametrize("num_classes", [None, 10])
def test_output_has_the_input_shape_at_mnist_and_cifar_sizes(size, num_classes):
    model = tiny_unet(in_channels=3, num_classes=num_classes).eval()
    x = torch.randn(2, 3, size, size)
    out = model(x, torch.tensor([0, 999]), torch.tensor([1, 9]) if num_classes else None)
    assert out.shape == (2, 3, size, size)


def test_learned_sigma_doubles_the_output_channels():
    model = tiny_unet(in_channels=2, out_channels=4)
    assert model.learn_sigma and model(torch.randn(2, 2, 28, 28), torch.tensor([3, 4])).shape == (2, 4, 28, 28)


@pytest.mark.parametrize("size, skip_sizes", [(28, [28, 14, 7]), (32, [32, 16, 8])])
def test_default_unet_halves_twice_and_keeps_the_lowest_level(size, skip_sizes):
    model = UNet(num_classes=10).eval()
    seen = []
    for block in model.down_blocks:
        block.register_forward_hook(lambda module, args, output: seen.append(output[1].shape[-1]))
    with torch.no_grad():
        out = model(torch.randn(1, 1, size, size), torch.tensor([10]), torch.tensor([3]))
    assert out.shape == (1, 1, size, size)
    assert seen == skip_sizes


@pytest.mark.parametrize("size", [28, 27, 9])
def test_odd_sizes_come_back_to_the_skips_size(size):
    # 28 -> 14 -> 7 -> 4 and 27 -> 14 -> 7 -> 4: each up block upsamples to its skip's exact size.
    model = tiny_unet(down_sample=(True, True, True))
    assert model(torch.randn(2, 1, size, size), torch.tensor([1, 2])).shape == (2, 1, size, size)


# --- argument checks --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"down_sample": (True, True)}, "down_sample has 2 entries; expected len\\(down_channels\\) - 1 = 3"),
        ({"attention": (True,)}, "attention has 1 entries; expected a bool or len\\(down_channels\\) - 1 = 3"),
        ({"mid_channels": (32,)}, "mid_channels needs at least 2 entries"),
        ({"mid_channels": (16, 16)}, "mid_channels\\[0\\] is 16; expected down_channels\\[-1\\] = 32"),
        ({"down_channels": (8,), "down_sample": (), "attention": ()}, "down_channels needs at least 2 entries"),
        ({"down_channels": (8, 16, 18, 32)}, "down_channels entry 18 is not a positive multiple of norm_groups=4"),
        ({"mid_channels": (32, 30)}, "mid_channels entry 30 is not a positive multiple of norm_groups=4"),
        ({"num_heads": 3}, "num_heads=3 does not divide 16"),
        ({"time_emb_dim": 15}, "time_emb_dim must be an even number"),
        ({"num_down_layers": 0}, "num_down_layers must be a positive integer"),
        ({"num_classes": 0}, "num_classes must be a positive integer or None"),
        ({"class_dropout_prob": 1.0}, "class_dropout_prob must be in \\[0, 1\\)"),
    ],
)
def test_impossible_configs_raise_value_errors_that_say_what_is_expected(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_unet(**overrides)


def test_attention_may_be_one_bool_for_every_level():
    model = tiny_unet(attention=False)
    assert model.attention == (False, False, False)
    assert not any(len(block.attentions) for block in [*model.down_blocks, *model.up_blocks])


def test_forward_rejects_wrong_channels_and_missing_labels():
    with pytest.raises(ValueError, match="takes \\(N, 1, H, W\\)"):
        tiny_unet()(torch.randn(2, 3, 28, 28), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="class-conditional \\(num_classes=10\\): pass labels"):
        tiny_unet(num_classes=10)(torch.randn(2, 1, 28, 28), torch.tensor([1, 2]))


# --- conditioning -----------------------------------------------------------------------------------


def test_zero_init_makes_the_output_start_at_zero():
    out = tiny_unet(num_classes=3)(torch.randn(2, 1, 28, 28), torch.tensor([5, 6]), torch.tensor([0, 1]))
    assert not out.abs().sum()


def test_time_conditioning_is_used():
    model = randomize(tiny_unet()).eval()
    x = torch.randn(1, 1, 28, 28).expand(2, -1, -1, -1)
    out = model(x, torch.tensor([10, 900]))
    assert (out[0] - out[1]).abs().max() > 1e-3
    model(x, torch.tensor([10, 900])).pow(2).sum().backward()
    assert model.t_embedder.mlp[0].weight.grad.abs().sum() > 0


def test_unconditional_unet_ignores_labels():
    model = randomize(tiny_unet()).eval()
    x, t = torch.randn(2, 1, 28, 28), torch.tensor([3, 4])
    assert torch.equal(model(x, t, torch.tensor([0, 1])), model(x, t))


def test_label_dropout_in_training_swaps_labels_for_the_null_class_from_the_global_rng():
    model = randomize(tiny_unet(num_classes=3, class_dropout_prob=0.5))
    x, t, y = (
        torch.randn(16, 1, 28, 28),
        torch.arange(16),
        torch.randint(0, 3, (16,), generator=torch.Generator().manual_seed(0)),
    )
    torch.manual_seed(7)
    dropped = torch.rand(16) < 0.5
    torch.manual_seed(7)
    trained = model.train()(x, t, y)
    expected = model.eval()(x, t, torch.where(dropped, 3, y))  # label 3 is the null row
    assert 0 < dropped.sum() < 16
    torch.testing.assert_close(trained, expected)
    assert (model(x, t, y) - expected)[~dropped].abs().max() == 0 and (model(x, t, y) - expected)[
        dropped
    ].abs().max() > 0


def test_forward_with_cfg_guides_the_prediction_and_keeps_conditional_sigma():
    model = randomize(tiny_unet(num_classes=3, out_channels=2)).eval()
    x, t = torch.randn(2, 1, 28, 28), torch.tensor([50, 50, 50, 50])
    x_in, y = torch.cat([x, x]), torch.tensor([0, 1, 3, 3])
    out = model.forward_with_cfg(x_in, t, y, 4.0)
    cond, uncond = model(x, t[:2], y[:2]), model(x, t[:2], y[2:])
    torch.testing.assert_close(out[:2, :1], uncond[:, :1] + 4.0 * (cond[:, :1] - uncond[:, :1]))
    torch.testing.assert_close(out[:2, 1:], cond[:, 1:])
    assert torch.equal(out[:2], out[2:])
    with pytest.raises(ValueError, match="needs a class-conditional U-Net"):
        tiny_unet().forward_with_cfg(x_in, t, y, 4.0)


# --- skips and training -----------------------------------------------------------------------------


def test_every_down_block_hands_exactly_one_skip_to_its_mirror_up_block():
    model = tiny_unet(num_classes=3)
    produced, consumed = [], []
    for block in model.down_blocks:
        block.register_forward_hook(lambda module, args, output: produced.append(output[1]))
    for block in model.up_blocks:
        block.register_forward_pre_hook(lambda module, args: consumed.append(args[1]))
    model(torch.randn(2, 1, 28, 28), torch.tensor([1, 2]), torch.tensor([0, 1]))
    assert len(produced) == len(consumed) == len(model.down_blocks) == 3
    assert all(skip is mirror for skip, mirror in zip(produced, reversed(consumed)))
    first_resnets = [block.resnets[0].conv1.in_channels for block in model.up_blocks]
    assert first_resnets == [16 + 32, 16 + 16, 16 + 16]  # (mid out or previous up out) + skip channels


def test_backward_reaches_every_parameter():
    model = randomize(tiny_unet(num_classes=3, class_dropout_prob=0.0)).train()
    out = model(torch.randn(4, 1, 28, 28), torch.tensor([1, 200, 500, 999]), torch.tensor([0, 1, 2, 3]))
    out.pow(2).mean().backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name


def test_a_tiny_unet_overfits_one_batch():
    model = tiny_unet(
        down_channels=(8, 16, 16),
        mid_channels=(16, 16),
        down_sample=(True, False),
        attention=(False, True),
        num_classes=2,
    )
    generator = torch.Generator().manual_seed(0)
    x0, y = torch.rand((8, 1, 16, 16), generator=generator) * 2 - 1, torch.randint(0, 2, (8,), generator=generator)
    scheduler = make_noise_scheduler(100)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(100):
        # the same t and noise: one batch
        loss = diffusion_loss(model, x0, y, scheduler, generator=torch.Generator().manual_seed(0))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 5, f"loss went from {losses[0]:.3f} to {losses[-1]:.3f}"


def test_activation_checkpointing_recomputes_the_blocks_and_changes_no_gradient():
    model = randomize(tiny_unet(num_classes=3, class_dropout_prob=0.0)).train()
    generator = torch.Generator().manual_seed(3)
    x, t, y = torch.randn(2, 1, 16, 16, generator=generator), torch.tensor([3, 70]), torch.tensor([0, 2])

    def run():
        model.zero_grad(set_to_none=True)
        loss = model(x, t, y).square().mean()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain_loss, plain_grads = run()
    blocks = [*model.down_blocks, *model.mid_blocks, *model.up_blocks]
    calls = []
    hooks = [block.register_forward_pre_hook(lambda module, args: calls.append(module)) for block in blocks]
    model.activation_checkpointing = True
    loss, grads = run()
    for hook in hooks:
        hook.remove()
    assert len(calls) == 2 * len(blocks)
    assert loss.equal(plain_loss) and grads.keys() == plain_grads.keys()
    assert all(grads[n].equal(plain_grads[n]) for n in grads)
