"""The DiT network: published layout, adaLN-Zero initialisation, attention, label dropout, guidance, configs."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model.dit import DIT_SIZES, DiT, DiT_models, TimestepEmbedder, get_2d_sincos_pos_embed

TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=10)


def tiny_dit(**overrides) -> DiT:
    torch.manual_seed(0)
    return DiT(**{**TINY, **overrides})


def randomize_zero_layers(model: DiT) -> DiT:
    """Give the zero-initialised layers random weights, so outputs depend on every path."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "adaLN_modulation" in name or name.startswith("final_layer.linear"):
                param.normal_(std=0.2)
    return model


def inputs(n: int = 4, channels: int = 4, size: int = 8):
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(n, channels, size, size, generator=generator)
    t = torch.randint(0, 1000, (n,), generator=generator)
    y = torch.randint(0, 10, (n,), generator=generator)
    return x, t, y


def test_state_dict_keys_match_published_dit_layout():
    expected = [
        "pos_embed",
        "x_embedder.proj.weight",
        "x_embedder.proj.bias",
        "t_embedder.mlp.0.weight",
        "t_embedder.mlp.0.bias",
        "t_embedder.mlp.2.weight",
        "t_embedder.mlp.2.bias",
        "y_embedder.embedding_table.weight",
        "blocks.0.attn.qkv.weight",
        "blocks.0.attn.qkv.bias",
        "blocks.0.attn.proj.weight",
        "blocks.0.attn.proj.bias",
        "blocks.0.mlp.fc1.weight",
        "blocks.0.mlp.fc1.bias",
        "blocks.0.mlp.fc2.weight",
        "blocks.0.mlp.fc2.bias",
        "blocks.0.adaLN_modulation.1.weight",
        "blocks.0.adaLN_modulation.1.bias",
        "blocks.1.attn.qkv.weight",
        "blocks.1.attn.qkv.bias",
        "blocks.1.attn.proj.weight",
        "blocks.1.attn.proj.bias",
        "blocks.1.mlp.fc1.weight",
        "blocks.1.mlp.fc1.bias",
        "blocks.1.mlp.fc2.weight",
        "blocks.1.mlp.fc2.bias",
        "blocks.1.adaLN_modulation.1.weight",
        "blocks.1.adaLN_modulation.1.bias",
        "final_layer.linear.weight",
        "final_layer.linear.bias",
        "final_layer.adaLN_modulation.1.weight",
        "final_layer.adaLN_modulation.1.bias",
    ]
    state = tiny_dit().state_dict()
    assert list(state) == expected
    d, p, c = 32, 2, 4
    assert state["pos_embed"].shape == (1, 16, d)
    assert state["x_embedder.proj.weight"].shape == (d, c, p, p)
    assert state["t_embedder.mlp.0.weight"].shape == (d, 256)
    assert state["y_embedder.embedding_table.weight"].shape == (10 + 1, d)
    assert state["blocks.0.attn.qkv.weight"].shape == (3 * d, d)
    assert state["blocks.0.mlp.fc1.weight"].shape == (4 * d, d)
    assert state["blocks.0.adaLN_modulation.1.weight"].shape == (6 * d, d)
    assert state["final_layer.linear.weight"].shape == (p * p * 2 * c, d)
    assert state["final_layer.adaLN_modulation.1.weight"].shape == (2 * d, d)


def test_label_table_has_a_null_row_only_when_labels_can_be_dropped():
    assert tiny_dit(class_dropout_prob=0.1).y_embedder.embedding_table.num_embeddings == 11
    assert tiny_dit(class_dropout_prob=0.0).y_embedder.embedding_table.num_embeddings == 10


def test_output_is_zero_at_initialisation():
    model = tiny_dit().eval()
    x, t, y = inputs()
    assert torch.equal(model(x, t, y), torch.zeros(4, 8, 8, 8))


def test_blocks_start_as_identity_and_initialisation_follows_the_paper():
    model = tiny_dit()
    x, t, y = inputs()
    tokens = model.x_embedder(x) + model.pos_embed
    c = model.t_embedder(t) + model.y_embedder(y, train=False)
    for block in model.blocks:
        assert torch.equal(block(tokens, c), tokens)
    linear_biases = [m.bias for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert all(torch.count_nonzero(b) == 0 for b in linear_biases)
    assert model.y_embedder.embedding_table.weight.std().item() == pytest.approx(0.02, rel=0.3)
    assert model.t_embedder.mlp[0].weight.std().item() == pytest.approx(0.02, rel=0.1)
    # Patch projection: xavier-uniform on the flattened (D, C*p*p) weight, bound sqrt(6 / (fan_in + fan_out)).
    bound = math.sqrt(6 / (4 * 2 * 2 + 32))
    conv = model.x_embedder.proj.weight
    assert conv.abs().max().item() <= bound and conv.abs().max().item() > 0.8 * bound


@pytest.mark.parametrize("learn_sigma, channels", [(True, 8), (False, 4)])
def test_output_shape_has_twice_the_channels_with_learned_sigma(learn_sigma, channels):
    model = randomize_zero_layers(tiny_dit(learn_sigma=learn_sigma)).eval()
    x, t, y = inputs(n=3)
    out = model(x, t, y)
    assert out.shape == (3, channels, 8, 8)
    assert model.out_channels == channels
    assert torch.isfinite(out).all()


def test_timesteps_may_be_integers_or_floats():
    model = randomize_zero_layers(tiny_dit()).eval()
    x, t, y = inputs()
    assert torch.allclose(model(x, t, y), model(x, t.float(), y))


def test_sdpa_attention_equals_naive_softmax_attention():
    model = tiny_dit()
    attn = model.blocks[0].attn
    x = torch.randn(3, 16, 32, generator=torch.Generator().manual_seed(3))
    n, t, d, h = 3, 16, 32, 2
    q, k, v = attn.qkv(x).reshape(n, t, 3, h, d // h).permute(2, 0, 3, 1, 4)  # (N, H, T, Dh) each
    weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d // h), dim=-1)  # (N, H, T, T)
    naive = attn.proj((weights @ v).transpose(1, 2).reshape(n, t, d))
    assert torch.allclose(attn(x), naive, atol=1e-5)


def test_unpatchify_inverts_patchify_order():
    model = tiny_dit(learn_sigma=False)
    images = torch.randn(2, 4, 8, 8)
    p = 2
    # Tokens in row-major patch order, each patch flattened as (p, p, C): the layout the final layer emits.
    tokens = images.reshape(2, 4, 4, p, 4, p).permute(0, 2, 4, 3, 5, 1).reshape(2, 16, p * p * 4)
    assert torch.equal(model.unpatchify(tokens), images)


def test_label_dropout_happens_in_train_mode_never_in_eval_and_is_reproducible():
    embedder = tiny_dit(class_dropout_prob=0.5).y_embedder
    labels = torch.zeros(1000, dtype=torch.long)

    def dropped(train: bool) -> torch.Tensor:
        embedded = embedder(labels, train=train)
        return (embedded == embedder.embedding_table.weight[10]).all(dim=1)

    torch.manual_seed(4)
    first = dropped(train=True)
    assert 400 < first.sum() < 600
    torch.manual_seed(4)
    assert torch.equal(dropped(train=True), first)
    assert not dropped(train=False).any()
    assert torch.equal(
        embedder.token_drop(labels, force_drop_ids=torch.arange(1000) % 2),
        torch.where(torch.arange(1000) % 2 == 1, 10, 0),
    )


def test_model_train_mode_changes_output_only_through_label_dropout():
    model = randomize_zero_layers(tiny_dit(class_dropout_prob=0.5))
    x, t, y = inputs(n=64, size=8)
    model.eval()
    eval_out = model(x, t, y)
    model.train()
    torch.manual_seed(5)
    train_out = model(x, t, y)
    torch.manual_seed(5)
    drop = torch.rand(64) < 0.5
    null_out = model.eval()(x, t, torch.full_like(y, 10))
    assert torch.allclose(train_out[drop], null_out[drop], atol=1e-6)
    assert torch.allclose(train_out[~drop], eval_out[~drop], atol=1e-6)


def test_forward_with_cfg_scale_one_is_conditional_and_scale_s_extrapolates():
    model = randomize_zero_layers(tiny_dit(learn_sigma=True)).eval()
    x, t, y = inputs(n=3)
    null = torch.full_like(y, 10)
    xx, tt, yy = torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null])
    cond, uncond = model(x, t, y), model(x, t, null)

    out = model.forward_with_cfg(xx, tt, yy, cfg_scale=1.0)
    assert out.shape == (6, 8, 8, 8)
    assert torch.allclose(out[:3], cond, atol=1e-5) and torch.equal(out[:3], out[3:])

    out = model.forward_with_cfg(xx, tt, yy, cfg_scale=4.0)
    guided = uncond[:, :4] + 4.0 * (cond[:, :4] - uncond[:, :4])
    assert torch.allclose(out[:3, :4], guided, atol=1e-4)  # every eps channel guided, not only the first 3
    assert torch.allclose(out[:3, 4:], cond[:, 4:], atol=1e-5)  # learned sigma from the conditional half


def test_forward_with_cfg_rejects_an_odd_batch():
    model = tiny_dit()
    x, t, y = inputs(n=3)
    with pytest.raises(ValueError, match="even batch"):
        model.forward_with_cfg(x, t, y, 2.0)


def test_sincos_pos_embed_has_known_values_and_is_not_trainable():
    grid, dim = 4, 32
    pe = get_2d_sincos_pos_embed(dim, grid)
    assert pe.shape == (grid * grid, dim)
    assert np.abs(pe).max() <= 1.0
    # Token (row r, col c) = index r * grid + c: [sin(c w), cos(c w), sin(r w), cos(r w)], w = 10000^(-i / (dim/4)).
    omega = 1.0 / 10000 ** (np.arange(dim // 4) / (dim // 4))
    r, c = 2, 3
    expected = np.concatenate([np.sin(c * omega), np.cos(c * omega), np.sin(r * omega), np.cos(r * omega)])
    assert np.allclose(pe[r * grid + c], expected)
    assert np.allclose(pe[0], np.tile(np.repeat([0.0, 1.0], dim // 4), 2))  # origin: sin 0, cos 0

    model = tiny_dit()
    assert not model.pos_embed.requires_grad
    assert "pos_embed" in dict(model.named_parameters())
    assert torch.allclose(model.pos_embed[0], torch.from_numpy(pe).float())


def test_timestep_embedding_is_cosines_then_sines_of_geometric_frequencies():
    t = torch.tensor([0.0, 10.0])
    emb = TimestepEmbedder.timestep_embedding(t, 8)
    freqs = torch.exp(-math.log(10000) * torch.arange(4) / 4)
    assert torch.allclose(emb[1], torch.cat([torch.cos(10 * freqs), torch.sin(10 * freqs)]))
    assert torch.equal(emb[0], torch.tensor([1.0, 1, 1, 1, 0, 0, 0, 0]))


@pytest.mark.parametrize(
    "name, millions",
    [("DiT-XL/2", 675), ("DiT-L/2", 458), ("DiT-B/2", 130), ("DiT-S/2", 33)],
)
def test_named_configs_have_the_papers_parameter_counts(name, millions):
    # Table 4 of Peebles & Xie (2023): 256x256 images, latents 32x32x4, 1000 classes.
    with torch.device("meta"):
        model = DiT_models[name](input_size=32)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable / 1e6 == pytest.approx(millions, rel=0.01)


def test_registry_names_every_size_and_patch():
    assert set(DiT_models) == {f"DiT-{s}/{p}" for s in ("S", "B", "L", "XL") for p in (2, 4, 8)}
    with torch.device("meta"):
        model = DiT_models["DiT-B/4"](input_size=32)
    assert (len(model.blocks), model.pos_embed.shape[-1], model.num_heads, model.patch_size) == (12, 768, 12, 4)
    assert DIT_SIZES["B"] == {"depth": 12, "hidden_size": 768, "num_heads": 12}


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"input_size": 9, "patch_size": 2}, "input_size 9 is not divisible by patch_size 2"),
        ({"hidden_size": 30, "num_heads": 4}, "hidden_size 30 is not divisible by num_heads 4"),
        ({"hidden_size": 18, "num_heads": 2}, "multiple of 4"),
        ({"class_dropout_prob": 1.0}, r"class_dropout_prob must be in \[0, 1\)"),
        ({"depth": 0}, "depth must be a positive integer"),
    ],
)
def test_impossible_sizes_raise_value_errors_naming_the_numbers(overrides, message):
    with pytest.raises(ValueError, match=message):
        DiT(**{**TINY, **overrides})


def test_wrong_input_shape_raises_a_value_error():
    model = tiny_dit()
    _, t, y = inputs()
    with pytest.raises(ValueError, match=r"this model takes \(N, 4, 8, 8\)"):
        model(torch.randn(4, 4, 16, 16), t, y)


def test_gradients_reach_every_trainable_parameter_once_zero_layers_have_moved():
    model = tiny_dit()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, t, y = inputs()
    # Zero-initialised layers block the gradient until they have moved: output layer, then adaLN, then embedders.
    for _ in range(3):
        optimizer.zero_grad()
        F.mse_loss(model(x, t, y), torch.randn(4, 8, 8, 8)).backward()
        optimizer.step()
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert model.pos_embed.grad is None
