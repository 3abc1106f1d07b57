"""Converter between the official-layout DiT and diffusers' DiTTransformer2DModel."""

import pytest
import torch
from diffusers import DiTTransformer2DModel
from diffusers.models.embeddings import get_2d_sincos_pos_embed as diffusers_sincos

from model.convert import diffusers_state_dict, from_diffusers, to_diffusers
from model.dit import DiT

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

# sample_size 8, patch 2, 2 layers, 2 heads of dim 16, 10 classes.
TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=10)


def random_dit(**overrides) -> DiT:
    """A tiny DiT whose every trainable weight is random (nothing zero), in eval mode."""
    torch.manual_seed(0)
    model = DiT(**{**TINY, **overrides})
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "adaLN_modulation" in name or name.startswith("final_layer.linear"):
                param.normal_(std=0.2)
            elif param.requires_grad:
                param.add_(torch.randn_like(param) * 0.02)
    return model.eval()


def inputs(n: int = 6):
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(n, 4, 8, 8, generator=generator)
    t = torch.tensor([0, 1, 10, 100, 500, 999])[:n]
    y = torch.randint(0, 10, (n,), generator=generator)
    return x, t, y


def use_official_timestep_features(transformer: DiTTransformer2DModel) -> None:
    """Give diffusers' timestep features the official frequencies 10000^(-i / half) (shift 0 instead of its 1)."""
    for block in transformer.transformer_blocks:
        assert block.norm1.emb.time_proj.downscale_freq_shift == 1
        block.norm1.emb.time_proj.downscale_freq_shift = 0


@pytest.mark.parametrize("learn_sigma", [True, False])
@pytest.mark.parametrize("class_dropout_prob", [0.1, 0.0])
def test_round_trip_through_diffusers_gives_a_bit_identical_state_dict(learn_sigma, class_dropout_prob):
    model = random_dit(learn_sigma=learn_sigma, class_dropout_prob=class_dropout_prob)
    back = from_diffusers(to_diffusers(model), class_dropout_prob=class_dropout_prob)
    ours, theirs = model.state_dict(), back.state_dict()
    assert list(ours) == list(theirs)
    for name in ours:
        assert ours[name].dtype == theirs[name].dtype and torch.equal(ours[name], theirs[name]), name
    assert [p.requires_grad for p in model.parameters()] == [p.requires_grad for p in back.parameters()]
    assert (back.learn_sigma, back.num_classes, back.y_embedder.dropout_prob) == (learn_sigma, 10, class_dropout_prob)


@pytest.mark.parametrize("learn_sigma", [True, False])
def test_converted_model_gives_our_outputs_once_its_timestep_features_use_the_official_shift(learn_sigma):
    model = random_dit(learn_sigma=learn_sigma)
    transformer = to_diffusers(model).eval()
    assert transformer.config.out_channels == (8 if learn_sigma else 4)
    x, t, y = inputs()
    with torch.no_grad():
        ours = model(x, t, y)
        unpatched = transformer(x, timestep=t, class_labels=y).sample
        use_official_timestep_features(transformer)
        patched = transformer(x, timestep=t, class_labels=y).sample
    assert patched.shape == ours.shape == (6, 8 if learn_sigma else 4, 8, 8)
    assert (patched - ours).abs().max() <= 1e-6  # measured here: 0 (bitwise equal) on CPU, float32

    # Unpatched: equal at t = 0 (every feature is cos 0 or sin 0), then a small difference growing with t.
    relative = (unpatched - ours).flatten(1).norm(dim=1) / ours.flatten(1).norm(dim=1)  # (N,)
    assert relative[0] <= 1e-6
    assert (relative[1:] > 1e-6).all() and (relative[1:].diff() > 0).all()
    assert relative.max() < 0.05


def test_label_table_null_row_and_every_block_copy_of_the_embedders():
    model = random_dit(class_dropout_prob=0.0)
    state = to_diffusers(model).state_dict()
    table = state["transformer_blocks.1.norm1.emb.class_embedder.embedding_table.weight"]
    assert (
        table.shape == (11, 32)
        and torch.equal(table[:10], model.y_embedder.embedding_table.weight)
        and not table[10].any()
    )
    for i in range(2):
        emb = f"transformer_blocks.{i}.norm1.emb."
        assert torch.equal(state[emb + "timestep_embedder.linear_1.weight"], model.t_embedder.mlp[0].weight)
        assert torch.equal(state[emb + "timestep_embedder.linear_2.bias"], model.t_embedder.mlp[2].bias)
    assert set(diffusers_state_dict(model)) == set(state)


def test_from_diffusers_refuses_drifted_embedder_copies_unless_told():
    transformer = to_diffusers(random_dit())
    with torch.no_grad():
        transformer.transformer_blocks[1].norm1.emb.timestep_embedder.linear_1.bias.add_(0.1)
    with pytest.raises(ValueError, match="block 1's copy of the timestep/label embedders differs"):
        from_diffusers(transformer)
    model = from_diffusers(transformer, strict=False)
    assert torch.equal(
        model.t_embedder.mlp[0].bias, transformer.transformer_blocks[0].norm1.emb.timestep_embedder.linear_1.bias
    )


def test_conversion_copies_weights_and_leaves_the_global_rng_alone():
    model = random_dit()
    state = torch.get_rng_state()
    transformer = to_diffusers(model)
    back = from_diffusers(transformer)
    assert torch.equal(torch.get_rng_state(), state)
    before = model.blocks[0].attn.qkv.weight.clone()
    with torch.no_grad():
        transformer.transformer_blocks[0].attn1.to_q.weight.zero_()
        back.blocks[0].attn.qkv.weight.zero_()
    assert torch.equal(model.blocks[0].attn.qkv.weight, before)


def test_diffusers_position_table_is_ours_to_float_precision():
    ours = random_dit().pos_embed[0]  # (16, 32)
    theirs = diffusers_sincos(32, 4, base_size=4)  # as diffusers' PatchEmbed builds it for sample_size 8, patch 2
    assert torch.allclose(theirs.float(), ours, atol=1e-6)


def test_saved_diffusers_model_loads_back_bit_identically(tmp_path):
    model = random_dit()
    to_diffusers(model).save_pretrained(tmp_path)
    back = from_diffusers(DiTTransformer2DModel.from_pretrained(tmp_path))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), back.state_dict().values()))


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"conditioning": "cross_attention"}, "conditioning='cross_attention'"),
        ({"conditioning": "in_context"}, "conditioning='in_context'"),
        ({"condition": "text", "text_dim": 16}, "condition='text'"),
        ({"condition": "none"}, "condition='none'"),
        ({"ffn": "conv"}, "ffn='conv'"),
        ({"pos_embed": "learned"}, "pos_embed='learned'"),
        ({"mlp_ratio": 2.0}, "mlp_ratio=2"),
    ],
)
def test_only_the_official_layout_converts(overrides, message):
    with pytest.raises(ValueError, match=message):
        to_diffusers(DiT(**{**TINY, **overrides}))


def test_adaln_variant_converts_as_it_shares_the_official_architecture():
    model = random_dit(conditioning="adaln")
    assert torch.equal(
        from_diffusers(to_diffusers(model)).blocks[1].adaLN_modulation[1].weight,
        model.blocks[1].adaLN_modulation[1].weight,
    )
