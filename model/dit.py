"""Class-conditional Diffusion Transformer with adaLN-Zero blocks (Peebles & Xie, 2023).

Parameter names follow the published checkpoints of facebookresearch/DiT, so their state dicts load
as they are. Sections: helpers, embedders, attention and MLP, DiT block and final layer, the model,
2-D sin-cos position embedding, named configs.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Apply a per-sample affine modulation (N, D) to every token of x (N, T, D)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


#################################################################################
#                  Embedders: image patches, timesteps, class labels            #
#################################################################################


class PatchEmbed(nn.Module):
    """Cut an image into non-overlapping p x p patches and project each to a D-dim token."""

    def __init__(self, input_size: int, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.input_size = input_size
        self.patch_size = patch_size
        self.grid_size = input_size // patch_size
        self.num_patches = self.grid_size**2
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)  # (N, D, H/p, W/p)
        return x.flatten(2).transpose(1, 2)  # (N, T, D), tokens in row-major order


class TimestepEmbedder(nn.Module):
    """Map scalar timesteps to D-dim vectors: sinusoidal features, then Linear-SiLU-Linear."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        """Sinusoidal features (N, dim) of possibly fractional timesteps t (N,): cosines, then sines."""
        half = dim // 2
        exponents = torch.arange(half, dtype=torch.float32, device=t.device) / half  # (dim/2,)
        freqs = torch.exp(-math.log(max_period) * exponents)  # (dim/2,), from 1 down to ~1/max_period
        angles = t.float()[:, None] * freqs[None, :]  # (N, dim/2)
        embedding = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)  # (N, 2 * (dim/2))
        if dim % 2:
            embedding = F.pad(embedding, (0, 1))  # (N, dim)
        return embedding

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        features = self.timestep_embedding(t, self.frequency_embedding_size)  # (N, 256)
        return self.mlp(features)  # (N, D)


class LabelEmbedder(nn.Module):
    """Map class labels to D-dim vectors; in training, drop labels to a null class for classifier-free guidance."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        has_null_class = dropout_prob > 0
        # Row `num_classes` (present only when labels can be dropped) is the null class.
        self.embedding_table = nn.Embedding(num_classes + int(has_null_class), hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Replace labels by the null class: at random with dropout_prob, or where force_drop_ids == 1."""
        if force_drop_ids is None:
            # Drawn on the CPU from the global RNG: the same decisions whatever the device, and
            # reproducible after torch.manual_seed (the trainer reseeds it every step).
            drop = (torch.rand(labels.shape[0]) < self.dropout_prob).to(labels.device)  # (N,)
        else:
            drop = force_drop_ids == 1  # (N,)
        return torch.where(drop, self.num_classes, labels)  # (N,)

    def forward(self, labels: torch.Tensor, train: bool, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)  # (N,)
        return self.embedding_table(labels)  # (N, D)


#################################################################################
#                           Attention and feed-forward                          #
#################################################################################


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (timm's layout, without timm)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        assert dim % num_heads == 0, f"width {dim} must be divisible by num_heads {num_heads}"
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        qkv = self.qkv(x).reshape(n, t, 3, self.num_heads, self.head_dim)  # (N, T, 3, H, Dh)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (N, H, T, Dh)
        x = F.scaled_dot_product_attention(q, k, v)  # (N, H, T, Dh), softmax(q k^T / sqrt(Dh)) v
        x = x.transpose(1, 2).reshape(n, t, d)  # (N, T, D)
        return self.proj(x)  # (N, T, D)


class Mlp(nn.Module):
    """Two-layer feed-forward network with tanh-approximated GELU."""

    def __init__(self, in_features: int, hidden_features: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features, bias=True)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features, in_features, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))  # (N, T, D)


#################################################################################
#                         DiT block and final layer                             #
#################################################################################


class DiTBlock(nn.Module):
    """Transformer block whose norms are modulated, and whose branches are gated, by the condition (adaLN-Zero)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads=num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        modulation = self.adaLN_modulation(c)  # (N, 6D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation.chunk(6, dim=1)  # 6 x (N, D)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))  # (N, T, D)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))  # (N, T, D)
        return x


class FinalLayer(nn.Module):
    """Modulated norm, then a linear map from each token to its patch of output channels."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)  # 2 x (N, D)
        x = modulate(self.norm_final(x), shift, scale)  # (N, T, D)
        return self.linear(x)  # (N, T, p * p * out_channels)


#################################################################################
#                                   The model                                   #
#################################################################################


class DiT(nn.Module):
    """Diffusion model with a Transformer backbone, conditioned on a timestep and a class label."""

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
    ):
        super().__init__()
        _check_sizes(input_size, patch_size, in_channels, hidden_size, depth, num_heads, mlp_ratio, class_dropout_prob, num_classes)
        self.input_size = input_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.learn_sigma = learn_sigma
        self.num_heads = num_heads
        self.num_classes = num_classes

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        # Fixed 2-D sin-cos embedding; a frozen Parameter (not a buffer) so state dicts match the published ones.
        self.pos_embed = nn.Parameter(torch.zeros(1, self.x_embedder.num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio=mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Initialise as the paper: xavier linears, frozen sin-cos positions, zeroed adaLN and output layers."""

        def xavier_linear(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(xavier_linear)

        pos_embed = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], self.x_embedder.grid_size)  # (T, D)
        self.pos_embed.data.copy_(torch.from_numpy(pos_embed).float().unsqueeze(0))  # (1, T, D)

        # The patch projection is a linear map of each flattened patch: initialise it as one.
        conv_weight = self.x_embedder.proj.weight.data  # (D, C, p, p)
        nn.init.xavier_uniform_(conv_weight.view(conv_weight.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)

        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)

        # adaLN-Zero: every block starts as the identity ...
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        # ... and the model's output starts at exactly zero.
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """Reassemble tokens (N, T, p * p * C_out) into images (N, C_out, H, W)."""
        c, p = self.out_channels, self.patch_size
        h = w = self.x_embedder.grid_size
        assert h * w == x.shape[1], f"got {x.shape[1]} tokens, expected a {h}x{w} grid"
        x = x.reshape(x.shape[0], h, w, p, p, c)  # (N, h, w, p, p, C_out)
        x = x.permute(0, 5, 1, 3, 2, 4)  # (N, C_out, h, p, w, p)
        return x.reshape(x.shape[0], c, h * p, w * p)  # (N, C_out, H, W)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Predict from noisy inputs x (N, C, H, W), timesteps t (N,) and labels y (N,) the output (N, C_out, H, W)."""
        expected = (self.in_channels, self.input_size, self.input_size)
        if tuple(x.shape[1:]) != expected:
            raise ValueError(f"DiT input has shape {tuple(x.shape)}; this model takes (N, {', '.join(map(str, expected))})")
        x = self.x_embedder(x) + self.pos_embed  # (N, T, D), T = H * W / p ** 2
        t = self.t_embedder(t)  # (N, D)
        y = self.y_embedder(y, self.training)  # (N, D)
        c = t + y  # (N, D)
        for block in self.blocks:
            x = block(x, c)  # (N, T, D)
        x = self.final_layer(x, c)  # (N, T, p * p * C_out)
        return self.unpatchify(x)  # (N, C_out, H, W)

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float) -> torch.Tensor:
        """Classifier-free guidance in one batch: x, t, y hold the conditional half, then the unconditional (null-label) half.

        Guidance applies to all `in_channels` predicted channels (the official code guides only the first
        three); learned-sigma channels come from the conditional half. Both halves of the output are the guided one.
        """
        if x.shape[0] % 2:
            raise ValueError(f"forward_with_cfg needs an even batch (conditional half, then unconditional half), got {x.shape[0]}")
        half = x[: x.shape[0] // 2]  # (N/2, C, H, W)
        combined = torch.cat([half, half], dim=0)  # (N, C, H, W)
        out = self.forward(combined, t, y)  # (N, C_out, H, W)
        eps, rest = out[:, : self.in_channels], out[:, self.in_channels :]  # (N, C, H, W), (N, C_out - C, H, W)
        cond_eps, uncond_eps = eps.chunk(2, dim=0)  # 2 x (N/2, C, H, W)
        guided = uncond_eps + cfg_scale * (cond_eps - uncond_eps)  # (N/2, C, H, W)
        cond_rest = rest[: half.shape[0]]  # (N/2, C_out - C, H, W)
        guided_half = torch.cat([guided, cond_rest], dim=1)  # (N/2, C_out, H, W)
        return torch.cat([guided_half, guided_half], dim=0)  # (N, C_out, H, W)


def _check_sizes(input_size, patch_size, in_channels, hidden_size, depth, num_heads, mlp_ratio, class_dropout_prob, num_classes) -> None:
    """Raise ValueError for a DiT shape that cannot be built."""
    for name, value in (("input_size", input_size), ("patch_size", patch_size), ("in_channels", in_channels),
                        ("hidden_size", hidden_size), ("depth", depth), ("num_heads", num_heads), ("num_classes", num_classes)):
        if value < 1:
            raise ValueError(f"DiT {name} must be a positive integer, got {value}")
    if input_size % patch_size:
        raise ValueError(f"DiT input_size {input_size} is not divisible by patch_size {patch_size}; pick a patch size that divides it")
    if hidden_size % num_heads:
        raise ValueError(f"DiT hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
    if hidden_size % 4:
        raise ValueError(f"DiT hidden_size {hidden_size} must be a multiple of 4 (the 2-D sin-cos position embedding needs it)")
    if mlp_ratio <= 0:
        raise ValueError(f"DiT mlp_ratio must be positive, got {mlp_ratio}")
    if not 0 <= class_dropout_prob < 1:
        raise ValueError(f"DiT class_dropout_prob must be in [0, 1), got {class_dropout_prob}")


#################################################################################
#                     2-D sine-cosine position embedding                        #
#################################################################################
# As in MAE (He et al., 2022): half of the channels encode the column, half the row.


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> np.ndarray:
    """Fixed position embedding (grid_size ** 2, embed_dim) of a square grid, tokens in row-major order."""
    if embed_dim % 4:
        raise ValueError(f"embed_dim must be a multiple of 4 for a 2-D sin-cos embedding, got {embed_dim}")
    rows, cols = np.meshgrid(np.arange(grid_size, dtype=np.float32), np.arange(grid_size, dtype=np.float32), indexing="ij")
    emb_cols = get_1d_sincos_pos_embed(embed_dim // 2, cols.reshape(-1))  # (T, D/2)
    emb_rows = get_1d_sincos_pos_embed(embed_dim // 2, rows.reshape(-1))  # (T, D/2)
    return np.concatenate([emb_cols, emb_rows], axis=1)  # (T, D)


def get_1d_sincos_pos_embed(embed_dim: int, positions: np.ndarray) -> np.ndarray:
    """Sines, then cosines, of positions (M,) at embed_dim / 2 geometric frequencies: (M, embed_dim)."""
    assert embed_dim % 2 == 0, f"embed_dim {embed_dim} must be even"
    omega = 1.0 / 10000 ** (np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2))  # (D/2,)
    angles = np.outer(positions.reshape(-1), omega)  # (M, D/2)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)  # (M, D)


#################################################################################
#                                 Named configs                                 #
#################################################################################
# Table 1 of the paper: model sizes S, B, L, XL; a name "DiT-XL/2" adds the patch size.

DIT_SIZES: dict[str, dict] = {
    "S": {"depth": 12, "hidden_size": 384, "num_heads": 6},
    "B": {"depth": 12, "hidden_size": 768, "num_heads": 12},
    "L": {"depth": 24, "hidden_size": 1024, "num_heads": 16},
    "XL": {"depth": 28, "hidden_size": 1152, "num_heads": 16},
}


def DiT_XL_2(**kwargs) -> DiT:
    return DiT(**DIT_SIZES["XL"], patch_size=2, **kwargs)


def DiT_XL_4(**kwargs) -> DiT:
    return DiT(**DIT_SIZES["XL"], patch_size=4, **kwargs)


def DiT_XL_8(**kwargs) -> DiT:
    return DiT(**DIT_SIZES["XL"], patch_size=8, **kwargs)


def DiT_L_2(**kwargs) -> DiT:
    return DiT(**DIT_SIZES["L"], patch_size=2, **kwargs)


def DiT_L_4(**kwargs) -> DiT:
    return DiT(**DIT_SIZES["L"], patch_size=4, **kwargs)


def DiT_L_8(**kwargs) -> DiT:
    return DiT(**DIT_SIZES["L"], patch_size=8, **kwargs)


def DiT_B_2(**kwargs) -> DiT:
    return DiT(**DIT_SIZES["B"], patch_size=2, **kwargs)


def DiT_B_4(**kwargs) -> DiT:
    return DiT(**DIT_SIZES["B"], patch_size=4, **kwargs)


def DiT_B_8(**kwargs) -> DiT:
    return DiT(**DIT_SIZES["B"], patch_size=8, **kwargs)


def DiT_S_2(**kwargs) -> DiT:
    return DiT(**DIT_SIZES["S"], patch_size=2, **kwargs)


def DiT_S_4(**kwargs) -> DiT:
    return DiT(**DIT_SIZES["S"], patch_size=4, **kwargs)


def DiT_S_8(**kwargs) -> DiT:
    return DiT(**DIT_SIZES["S"], patch_size=8, **kwargs)


DiT_models = {
    "DiT-XL/2": DiT_XL_2, "DiT-XL/4": DiT_XL_4, "DiT-XL/8": DiT_XL_8,
    "DiT-L/2": DiT_L_2, "DiT-L/4": DiT_L_4, "DiT-L/8": DiT_L_8,
    "DiT-B/2": DiT_B_2, "DiT-B/4": DiT_B_4, "DiT-B/8": DiT_B_8,
    "DiT-S/2": DiT_S_2, "DiT-S/4": DiT_S_4, "DiT-S/8": DiT_S_8,
}
