"""model.dropout: dropout on the DiT's attention and feed-forward outputs (timm's places), in training only; the U-Net's
ResNet-block dropout; carried by the spec, build_model and the diffusers converter."""

import itertools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from model.convert import from_diffusers, to_diffusers
from model.dit import CONDITIONINGS, FFNS, Attention, ConvMlp, CrossAttention, DiT, Mlp
from orchestrator.components.model import build_model
from orchestrator.components.model_input import ModelInput
from orchestrator.specs.job import SpecError, parse_spec

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=10)
TEXT_DIM = 24


def tiny_dit(**overrides) -> DiT:
    kwargs = {**TINY, **overrides}
    if kwargs.get("condition") == "text":
        kwargs = {"text_dim": TEXT_DIM, "text_tokens": 6, **kwargs}
    torch.manual_seed(0)
    return DiT(**kwargs)


def perturb(model: nn.Module) -> nn.Module:
    """Noise on every trainable weight, so that zero-initialised layers hide no path."""
    torch.manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.1)
    return model


def inputs(condition: str = "class", n: int = 4):
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(n, 4, 8, 8, generator=generator)
    t = torch.randint(0, 1000, (n,), generator=generator)
    y = torch.randint(0, 10, (n,), generator=generator) if condition == "class" else torch.randn(n, 3, TEXT_DIM)
    return x, t, y


VARIANTS = list(itertools.product(CONDITIONINGS, FFNS))


@pytest.mark.parametrize("conditioning, ffn", VARIANTS)
def test_dropout_zero_adds_no_layer_and_changes_no_weight_name_or_output_bit(conditioning, ffn):
    plain = perturb(tiny_dit(conditioning=conditioning, ffn=ffn))
    zero = perturb(tiny_dit(conditioning=conditioning, ffn=ffn, dropout=0.0))
    assert not any(isinstance(module, nn.Dropout) for module in zero.modules())
    assert list(zero.state_dict()) == list(plain.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(zero.state_dict().values(), plain.state_dict().values()))
    x, t, y = inputs()
    for train in (True, False):
        torch.manual_seed(3)  # the same label dropout in both
        expected = plain.train(train)(x, t, y)
        torch.manual_seed(3)
        assert torch.equal(zero.train(train)(x, t, y), expected)


@pytest.mark.parametrize("conditioning, ffn", VARIANTS)
def test_dropout_changes_training_outputs_only_and_eval_equals_the_dropout_free_model(conditioning, ffn):
    model = perturb(tiny_dit(conditioning=conditioning, ffn=ffn, class_dropout_prob=0.0, dropout=0.1))
    plain = tiny_dit(conditioning=conditioning, ffn=ffn, class_dropout_prob=0.0)
    assert list(model.state_dict()) == list(plain.state_dict()), "dropout holds no weights"
    plain.load_state_dict(model.state_dict())
    x, t, y = inputs()
    model.train()
    first, second = model(x, t, y), model(x, t, y)
    assert not torch.allclose(first, second)
    torch.manual_seed(4)
    again = model(x, t, y)
    torch.manual_seed(4)
    assert torch.equal(model(x, t, y), again), "masks come from the global RNG: reproducible after manual_seed"
    model.eval()
    assert torch.equal(model(x, t, y), model(x, t, y))
    assert torch.equal(model(x, t, y), plain.eval()(x, t, y))


def test_dropout_sits_after_the_attention_projections_and_after_the_ffn_activation_and_fc2():
    torch.manual_seed(0)
    p, x, context = 0.3, torch.randn(2, 16, 8), torch.randn(2, 3, 8)

    def same_as(module: nn.Module, reference, *args) -> None:
        torch.manual_seed(5)
        out = module.train()(*args)
        torch.manual_seed(5)
        assert torch.equal(out, reference(*args))  # the same draws in the same order: the same places
        assert not torch.equal(out, module.eval()(*args))

    def drop(h: torch.Tensor) -> torch.Tensor:
        return F.dropout(h, p, training=True)

    mlp = Mlp(8, 16, drop=p)
    same_as(mlp, lambda h: drop(mlp.fc2(drop(mlp.act(mlp.fc1(h))))), x)

    conv = ConvMlp(8, 16, grid_size=4, drop=p)

    def conv_reference(h: torch.Tensor) -> torch.Tensor:
        h = conv.fc1(h).transpose(1, 2).reshape(2, 16, 4, 4)  # (N, F, h, w)
        h = conv.dwconv(h).flatten(2).transpose(1, 2)  # (N, T, F)
        return drop(conv.fc2(drop(conv.act(h))))

    same_as(conv, conv_reference, x)

    # Attention draws nothing before its output projection: dropout of the eval output (proj of the attention).
    attn = Attention(8, num_heads=2, proj_drop=p)
    same_as(attn, lambda h: drop(attn.eval()(h)), x)
    cross = CrossAttention(8, num_heads=2, proj_drop=p)
    same_as(cross, lambda h, c: drop(cross.eval()(h, c)), x, context)


@pytest.mark.parametrize("conditioning", CONDITIONINGS)
def test_every_block_of_every_conditioning_has_dropout_in_each_sublayer(conditioning):
    model = tiny_dit(conditioning=conditioning, dropout=0.1)
    for block in model.blocks:
        sublayers = [block.attn.proj_drop, block.mlp.drop1, block.mlp.drop2]
        if conditioning == "cross_attention":
            sublayers.append(block.cross_attn.proj_drop)
        assert all(isinstance(layer, nn.Dropout) and layer.p == 0.1 for layer in sublayers)
    expected = len(model.blocks) * (4 if conditioning == "cross_attention" else 3)
    assert sum(isinstance(module, nn.Dropout) for module in model.modules()) == expected


@pytest.mark.parametrize(
    "conditioning, condition, ffn",
    [(c, "class", f) for c, f in VARIANTS] + [(c, "text", "conv") for c in CONDITIONINGS],
)
def test_every_variant_trains_with_dropout(conditioning, condition, ffn):
    model = perturb(tiny_dit(conditioning=conditioning, condition=condition, ffn=ffn, dropout=0.1)).train()
    x, t, y = inputs(condition)
    out = model(x, t, y)
    assert out.shape == (4, 8, 8, 8) and torch.isfinite(out).all()
    F.mse_loss(out, torch.randn_like(out)).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("conditioning", ["adaln_zero", "cross_attention"])
def test_activation_checkpointing_replays_the_same_dropout_masks(conditioning):
    model = perturb(tiny_dit(conditioning=conditioning, ffn="conv", dropout=0.2)).train()
    x, t, y = inputs()

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        torch.manual_seed(6)
        loss = model(x, t, y).square().mean()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    plain_loss, plain_grads = loss_and_grads()
    model.activation_checkpointing = True
    loss, grads = loss_and_grads()
    assert loss.equal(plain_loss) and all(a.equal(b) for a, b in zip(grads, plain_grads))


@pytest.mark.parametrize("dropout", [1.0, -0.1])
def test_dit_refuses_a_dropout_outside_zero_to_one(dropout):
    with pytest.raises(ValueError, match=r"DiT dropout must be in \[0, 1\)"):
        tiny_dit(dropout=dropout)


# --- spec, build_model, diffusers ------------------------------------------------------------------


def spec_text(model: str) -> str:
    return f"name: tiny\ntrain: {{steps: 10}}\nmodel: {model}\n"


def test_spec_accepts_a_dropout_in_zero_to_one_and_refuses_others_naming_the_field():
    assert parse_spec(spec_text("{}")).model.dropout == 0.0
    assert parse_spec(spec_text("{dropout: 0.1}")).model.dropout == 0.1
    for bad in ("1.0", "-0.1"):
        with pytest.raises(SpecError, match=r"model\.dropout"):
            parse_spec(spec_text(f"{{dropout: {bad}}}"))


def test_build_model_gives_the_dit_and_the_unet_the_spec_dropout():
    model_input = ModelInput(channels=1, size=8, num_classes=10)
    spec = parse_spec(spec_text("{dropout: 0.1, hidden_size: 32, depth: 1, num_heads: 2, ffn: conv}"))
    dit = build_model(spec, model_input)
    assert dit.dropout == 0.1 and dit.blocks[0].mlp.drop2.p == 0.1
    unet = build_model(
        parse_spec(spec_text("{arch: unet, dropout: 0.1}")), ModelInput(channels=1, size=28, num_classes=10)
    )
    assert {module.p for module in unet.modules() if isinstance(module, nn.Dropout)} == {0.1}
    dit = build_model(parse_spec(spec_text("{hidden_size: 32, depth: 1, num_heads: 2}")), model_input)
    assert dit.dropout == 0.0 and not any(isinstance(module, nn.Dropout) for module in dit.modules())


def test_diffusers_conversion_carries_the_dropout_both_ways():
    model = perturb(tiny_dit(dropout=0.1)).eval()
    transformer = to_diffusers(model)
    assert transformer.config.dropout == 0.1
    assert from_diffusers(transformer).dropout == 0.1
    assert to_diffusers(tiny_dit()).config.dropout == 0.0
