"""Convert between this project's DiT (the official layout) and diffusers' `DiTTransformer2DModel`.

The official layout (facebookresearch/DiT) is canonical here; diffusers' layout is an export format.
Checked against diffusers 0.42 (models/transformers/dit_transformer_2d.py, attention.py,
normalization.py, embeddings.py):
- adaLN chunk order is the same: AdaLayerNormZero splits its linear into (shift_msa, scale_msa,
  gate_msa, shift_mlp, scale_mlp, gate_mlp), as DiTBlock does; the final layer's proj_out_1 splits
  into (shift, scale), as FinalLayer's adaLN_modulation does. No permutation needed.
- q, k, v are separate Linears in diffusers (to_q, to_k, to_v): the rows of our fused qkv, in that order.
- diffusers keeps a timestep/label embedder in every block (`norm1.emb`) and its final layer reads
  block 0's; we copy ours into every block, and read block 0's back (refusing, unless strict=False,
  when the copies have drifted apart by training in that layout).
- dropout (training only) is carried as the config's `dropout`; diffusers applies it after the
  attention output projection and after the feed-forward's GELU, as we do, but not after the
  feed-forward's output projection (our drop2, timm's): fine-tuning the export drops less.
- diffusers' label table always has a null row (CombinedTimestepLabelEmbeddings hard-codes dropout
  0.1); a model without one gets a zero row on export, dropped again on import.
- not equal by design: diffusers' timestep features use `downscale_freq_shift=1` (frequencies
  10000^(-i / (half - 1))) where the official ones use 0 (10000^(-i / half)), so the converted
  model's outputs are close to, not equal to, ours. Its sin-cos position table is a non-persistent
  buffer, recomputed by diffusers (equal to ours to ~1e-7) whenever the model is rebuilt; we
  overwrite it with ours on export.
"""

from __future__ import annotations

import torch
from diffusers import DiTTransformer2DModel

from model.dit import DiT, get_2d_sincos_pos_embed

DIFFUSERS_NORM_EPS = 1e-6  # the official DiT's LayerNorm eps; diffusers' default (1e-5) would differ slightly


def to_diffusers(model: DiT) -> DiTTransformer2DModel:
    """A DiTTransformer2DModel with `model`'s weights (copies), on its device and dtype, in `model`'s train/eval
    mode."""
    _check_official_layout(model)
    hidden_size = model.pos_embed.shape[-1]
    with torch.device("meta"):
        transformer = DiTTransformer2DModel(
            num_attention_heads=model.num_heads,
            attention_head_dim=hidden_size // model.num_heads,
            in_channels=model.in_channels,
            out_channels=model.out_channels,
            num_layers=len(model.blocks),
            sample_size=model.input_size,
            patch_size=model.patch_size,
            activation_fn="gelu-approximate",
            num_embeds_ada_norm=model.num_classes,
            norm_type="ada_norm_zero",
            norm_elementwise_affine=False,
            norm_eps=DIFFUSERS_NORM_EPS,
            dropout=model.dropout,
        )
    state = {name: tensor.detach().clone() for name, tensor in diffusers_state_dict(model).items()}
    transformer.load_state_dict(state, strict=True, assign=True)
    transformer.pos_embed.pos_embed = model.pos_embed.detach().clone()  # (1, T, D), non-persistent buffer
    return transformer.train(model.training)


def from_diffusers(transformer: DiTTransformer2DModel, class_dropout_prob: float = 0.1, strict: bool = True) -> DiT:
    """A DiT (official layout) with the transformer's weights (copies), on its device and dtype, in eval mode.

    class_dropout_prob = 0 drops diffusers' null label row (a model trained without label dropout);
    strict=False reads the per-block embedder copies of block 0 even when the others differ.
    Our LayerNorms use eps 1e-6 whatever the transformer's `norm_eps`.
    """
    config = transformer.config
    problems = []
    if config.norm_type != "ada_norm_zero":
        problems.append(f"norm_type={config.norm_type!r} (need 'ada_norm_zero')")
    if config.activation_fn != "gelu-approximate":
        problems.append(f"activation_fn={config.activation_fn!r} (need 'gelu-approximate')")
    if not config.attention_bias:
        problems.append("attention_bias=False (need True)")
    if transformer.out_channels not in (config.in_channels, 2 * config.in_channels):
        problems.append(f"out_channels={transformer.out_channels} (need in_channels or 2 * in_channels)")
    if problems:
        raise ValueError(f"this DiTTransformer2DModel has no official-DiT counterpart: {'; '.join(problems)}")

    state = transformer.state_dict()
    depth = config.num_layers
    if strict:
        for i in range(1, depth):
            prefix, first = f"transformer_blocks.{i}.norm1.emb.", "transformer_blocks.0.norm1.emb."
            drifted = [
                name
                for name in state
                if name.startswith(prefix) and not torch.equal(state[name], state[first + name[len(prefix) :]])
            ]
            if drifted:
                raise ValueError(
                    f"block {i}'s copy of the timestep/label embedders differs from block 0's ({drifted[0]}, ...); "
                    "the official layout has one copy: pass strict=False to keep block 0's, the one diffusers' final "
                    "layer uses"
                )

    with torch.device("meta"):
        model = DiT(
            input_size=config.sample_size,
            patch_size=config.patch_size,
            in_channels=config.in_channels,
            hidden_size=config.num_attention_heads * config.attention_head_dim,
            depth=depth,
            num_heads=config.num_attention_heads,
            mlp_ratio=4.0,
            class_dropout_prob=class_dropout_prob,
            num_classes=config.num_embeds_ada_norm,
            learn_sigma=transformer.out_channels == 2 * config.in_channels,
            dropout=config.dropout,
        )
    ours = official_state_dict(state, depth, has_null_class=class_dropout_prob > 0)
    reference = state["pos_embed.proj.weight"]
    pos_embed = get_2d_sincos_pos_embed(model.pos_embed.shape[-1], model.x_embedder.grid_size)  # (T, D)
    # (1, T, D)
    ours["pos_embed"] = torch.from_numpy(pos_embed).float().unsqueeze(0).to(reference.device, reference.dtype)
    ours = {name: tensor.detach().clone() for name, tensor in ours.items()}
    model.load_state_dict(ours, strict=True, assign=True)
    return model.eval()


def diffusers_state_dict(model: DiT) -> dict[str, torch.Tensor]:
    """`model`'s weights under diffusers' names (views, not copies); the label table gets a null row if it lacks one."""
    _check_official_layout(model)
    ours = model.state_dict()
    table = ours["y_embedder.embedding_table.weight"]  # (K or K + 1, D)
    if table.shape[0] == model.num_classes:
        table = torch.cat([table, table.new_zeros(1, table.shape[1])])  # (K + 1, D), an unused null row
    embedders = {
        "norm1.emb.timestep_embedder.linear_1.weight": ours["t_embedder.mlp.0.weight"],
        "norm1.emb.timestep_embedder.linear_1.bias": ours["t_embedder.mlp.0.bias"],
        "norm1.emb.timestep_embedder.linear_2.weight": ours["t_embedder.mlp.2.weight"],
        "norm1.emb.timestep_embedder.linear_2.bias": ours["t_embedder.mlp.2.bias"],
        "norm1.emb.class_embedder.embedding_table.weight": table,
    }
    state = {
        "pos_embed.proj.weight": ours["x_embedder.proj.weight"],
        "pos_embed.proj.bias": ours["x_embedder.proj.bias"],
    }
    for i in range(len(model.blocks)):
        src, dst = f"blocks.{i}.", f"transformer_blocks.{i}."
        state.update({dst + name: tensor for name, tensor in embedders.items()})
        state[dst + "norm1.linear.weight"] = ours[
            src + "adaLN_modulation.1.weight"
        ]  # same chunk order, see the module docstring
        state[dst + "norm1.linear.bias"] = ours[src + "adaLN_modulation.1.bias"]
        q_w, k_w, v_w = ours[src + "attn.qkv.weight"].chunk(3, dim=0)  # 3 x (D, D)
        q_b, k_b, v_b = ours[src + "attn.qkv.bias"].chunk(3, dim=0)  # 3 x (D,)
        state.update(
            {
                dst + "attn1.to_q.weight": q_w,
                dst + "attn1.to_q.bias": q_b,
                dst + "attn1.to_k.weight": k_w,
                dst + "attn1.to_k.bias": k_b,
                dst + "attn1.to_v.weight": v_w,
                dst + "attn1.to_v.bias": v_b,
            }
        )
        state[dst + "attn1.to_out.0.weight"] = ours[src + "attn.proj.weight"]
        state[dst + "attn1.to_out.0.bias"] = ours[src + "attn.proj.bias"]
        state[dst + "ff.net.0.proj.weight"] = ours[src + "mlp.fc1.weight"]
        state[dst + "ff.net.0.proj.bias"] = ours[src + "mlp.fc1.bias"]
        state[dst + "ff.net.2.weight"] = ours[src + "mlp.fc2.weight"]
        state[dst + "ff.net.2.bias"] = ours[src + "mlp.fc2.bias"]
    state["proj_out_1.weight"] = ours["final_layer.adaLN_modulation.1.weight"]  # (shift, scale) in both
    state["proj_out_1.bias"] = ours["final_layer.adaLN_modulation.1.bias"]
    state["proj_out_2.weight"] = ours["final_layer.linear.weight"]
    state["proj_out_2.bias"] = ours["final_layer.linear.bias"]
    return state


def official_state_dict(
    state: dict[str, torch.Tensor], depth: int, has_null_class: bool = True
) -> dict[str, torch.Tensor]:
    """A diffusers DiT state dict under the official names, without pos_embed (diffusers does not save it); embedders
    from block 0."""
    emb = "transformer_blocks.0.norm1.emb."
    table = state[emb + "class_embedder.embedding_table.weight"]  # (K + 1, D)
    ours = {
        "x_embedder.proj.weight": state["pos_embed.proj.weight"],
        "x_embedder.proj.bias": state["pos_embed.proj.bias"],
        "t_embedder.mlp.0.weight": state[emb + "timestep_embedder.linear_1.weight"],
        "t_embedder.mlp.0.bias": state[emb + "timestep_embedder.linear_1.bias"],
        "t_embedder.mlp.2.weight": state[emb + "timestep_embedder.linear_2.weight"],
        "t_embedder.mlp.2.bias": state[emb + "timestep_embedder.linear_2.bias"],
        "y_embedder.embedding_table.weight": table if has_null_class else table[:-1],
    }
    for i in range(depth):
        src, dst = f"transformer_blocks.{i}.", f"blocks.{i}."
        # (3D, D)
        ours[dst + "attn.qkv.weight"] = torch.cat([state[src + f"attn1.to_{n}.weight"] for n in "qkv"], dim=0)
        ours[dst + "attn.qkv.bias"] = torch.cat([state[src + f"attn1.to_{n}.bias"] for n in "qkv"], dim=0)  # (3D,)
        ours[dst + "attn.proj.weight"] = state[src + "attn1.to_out.0.weight"]
        ours[dst + "attn.proj.bias"] = state[src + "attn1.to_out.0.bias"]
        ours[dst + "mlp.fc1.weight"] = state[src + "ff.net.0.proj.weight"]
        ours[dst + "mlp.fc1.bias"] = state[src + "ff.net.0.proj.bias"]
        ours[dst + "mlp.fc2.weight"] = state[src + "ff.net.2.weight"]
        ours[dst + "mlp.fc2.bias"] = state[src + "ff.net.2.bias"]
        ours[dst + "adaLN_modulation.1.weight"] = state[src + "norm1.linear.weight"]
        ours[dst + "adaLN_modulation.1.bias"] = state[src + "norm1.linear.bias"]
    ours["final_layer.linear.weight"] = state["proj_out_2.weight"]
    ours["final_layer.linear.bias"] = state["proj_out_2.bias"]
    ours["final_layer.adaLN_modulation.1.weight"] = state["proj_out_1.weight"]
    ours["final_layer.adaLN_modulation.1.bias"] = state["proj_out_1.bias"]
    return ours


def _check_official_layout(model: DiT) -> None:
    """Raise ValueError unless `model` has the architecture diffusers' DiTTransformer2DModel implements."""
    variant = {
        "conditioning": model.conditioning,
        "condition": model.condition,
        "ffn": model.ffn,
        "pos_embed": model.pos_embed_type,
    }
    problems = [
        f"{name}={value!r}"
        for name, value in variant.items()
        if value != {"conditioning": "adaln_zero", "condition": "class", "ffn": "mlp", "pos_embed": "sincos"}[name]
    ]
    if model.conditioning == "adaln":  # the same architecture; only the initialisation differs
        problems.remove("conditioning='adaln'")
    hidden_size = model.pos_embed.shape[-1]
    if model.blocks[0].mlp.fc1.out_features != 4 * hidden_size:
        problems.append(
            f"mlp_ratio={model.blocks[0].mlp.fc1.out_features / hidden_size:g} (diffusers' feed-forward is 4x wide)"
        )
    if problems:
        raise ValueError(
            "only the official DiT layout (adaln_zero, class, mlp, sincos, mlp_ratio 4) converts to diffusers; this "
            f"model has {', '.join(problems)}"
        )
