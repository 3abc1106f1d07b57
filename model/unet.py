"""DDPM U-Net (Ho et al., 2020) with diffusers-style blocks, conditioned on a timestep and optionally a class label.

A down path of ResNet blocks (with self-attention where asked) that halves the resolution where
down_sample says, mid blocks at the lowest resolution, and an up path that mirrors the down path,
concatenating each down block's output (before its downsampling) as a skip. The blocks are written
here, not taken from diffusers: its ResnetBlock2D / Attention / Down- and UpBlock2D carry many options
unused here and a skip per layer, where this design keeps one skip per block and restores each skip's
exact size (so 28 -> 14 -> 7 -> 4 and back works). Sections: embedders, ResNet and attention blocks,
down / mid / up blocks, the model, argument checks.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import dit

#################################################################################
#                      Embedders: timesteps, class labels                       #
#################################################################################


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features (N, dim) of possibly fractional timesteps t (N,): sines, then cosines (Ho et al. 2020)."""
    half = dim // 2
    # (dim/2,)
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None, :]  # (N, dim/2)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)  # (N, dim)


class TimestepEmbedder(nn.Module):
    """Map timesteps to time_emb_dim vectors: sinusoidal features, then Linear-SiLU-Linear."""

    def __init__(self, time_emb_dim: int):
        super().__init__()
        self.time_emb_dim = time_emb_dim
        self.mlp = nn.Sequential(
            nn.Linear(time_emb_dim, time_emb_dim), nn.SiLU(), nn.Linear(time_emb_dim, time_emb_dim)
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, self.time_emb_dim))  # (N, D_t)


class LabelEmbedder(dit.LabelEmbedder):
    """DiT's label embedder (dropout to a null class, the same RNG use) with a null row always present:
    row `num_classes`, the null class of classifier-free guidance."""

    def __init__(self, num_classes: int, time_emb_dim: int, dropout_prob: float):
        nn.Module.__init__(self)
        self.embedding_table = nn.Embedding(num_classes + 1, time_emb_dim)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob


#################################################################################
#                         ResNet and attention blocks                           #
#################################################################################


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv, plus the projected time embedding, then GroupNorm-SiLU-dropout-conv, around a residual."""

    def __init__(self, in_channels: int, out_channels: int, time_emb_dim: int, dropout: float, norm_groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(norm_groups, in_channels, eps=1e-6)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.time_emb_proj = nn.Linear(time_emb_dim, out_channels)
        self.norm2 = nn.GroupNorm(norm_groups, out_channels, eps=1e-6)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        # A 1x1 convolution matches the residual's channels when they change (Ho et al. use a "nin" shortcut).
        self.conv_shortcut = (
            nn.Conv2d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else nn.Identity()
        )

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (N, C_out, H, W)
        h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]  # (N, C_out, H, W), one shift per channel
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))  # (N, C_out, H, W)
        return self.conv_shortcut(x) + h  # (N, C_out, H, W)


class AttentionBlock(nn.Module):
    """GroupNorm, then multi-head self-attention over the H * W positions, around a residual."""

    def __init__(self, channels: int, num_heads: int, norm_groups: int):
        super().__init__()
        assert channels % num_heads == 0, f"{channels} channels must be divisible by num_heads {num_heads}"
        self.num_heads = num_heads
        self.group_norm = nn.GroupNorm(norm_groups, channels, eps=1e-6)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        tokens = self.group_norm(x).flatten(2).transpose(1, 2)  # (N, HW, C)
        q, k, v = (
            proj(tokens).view(n, h * w, self.num_heads, c // self.num_heads).transpose(1, 2)
            for proj in (self.to_q, self.to_k, self.to_v)
        )  # 3 x (N, heads, HW, C/heads)
        out = F.scaled_dot_product_attention(q, k, v)  # (N, heads, HW, C/heads)
        out = self.to_out(out.transpose(1, 2).reshape(n, h * w, c))  # (N, HW, C)
        return x + out.transpose(1, 2).reshape(n, c, h, w)  # (N, C, H, W)


class Downsample(nn.Module):
    """Halve the resolution with a stride-2 3x3 convolution: H -> ceil(H / 2), so odd sizes shrink too."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)  # (N, C, ceil(H/2), ceil(W/2))


class Upsample(nn.Module):
    """Nearest-neighbour upsampling to a given size (the skip's: 7 -> 14, 4 -> 7), then a 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        x = F.interpolate(x, size=tuple(size), mode="nearest")  # (N, C, H', W')
        return self.conv(x)  # (N, C, H', W')


#################################################################################
#                             Down, mid and up blocks                           #
#################################################################################


class DownBlock(nn.Module):
    """num_layers ResNet blocks (each followed by attention if asked), then an optional downsample; returns (output,
    skip)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        time_emb_dim: int,
        num_layers: int,
        attention: bool,
        down_sample: bool,
        num_heads: int,
        dropout: float,
        norm_groups: int,
    ):
        super().__init__()
        self.resnets = nn.ModuleList(
            [
                ResnetBlock(in_channels if i == 0 else out_channels, out_channels, time_emb_dim, dropout, norm_groups)
                for i in range(num_layers)
            ]
        )
        self.attentions = nn.ModuleList(
            [AttentionBlock(out_channels, num_heads, norm_groups) for _ in range(num_layers)] if attention else []
        )
        self.downsampler = Downsample(out_channels) if down_sample else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)  # (N, C_out, H, W)
            if self.attentions:
                x = self.attentions[i](x)  # (N, C_out, H, W)
        skip = x  # (N, C_out, H, W)
        if self.downsampler is not None:
            x = self.downsampler(x)  # (N, C_out, ceil(H/2), ceil(W/2))
        return x, skip


class MidBlock(nn.Module):
    """A ResNet block, then num_layers pairs of attention and ResNet block, at the lowest resolution."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        time_emb_dim: int,
        num_layers: int,
        num_heads: int,
        dropout: float,
        norm_groups: int,
    ):
        super().__init__()
        self.resnets = nn.ModuleList(
            [
                ResnetBlock(in_channels if i == 0 else out_channels, out_channels, time_emb_dim, dropout, norm_groups)
                for i in range(num_layers + 1)
            ]
        )
        self.attentions = nn.ModuleList(
            [AttentionBlock(out_channels, num_heads, norm_groups) for _ in range(num_layers)]
        )

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x, temb)  # (N, C_out, H, W)
        for attention, resnet in zip(self.attentions, self.resnets[1:]):
            x = resnet(attention(x), temb)  # (N, C_out, H, W)
        return x


class UpBlock(nn.Module):
    """The mirror of a DownBlock: optional upsample to the skip's size, concatenation with the skip, then ResNet (+
    attention) blocks."""

    def __init__(
        self,
        in_channels: int,
        skip_channels: int,
        out_channels: int,
        time_emb_dim: int,
        num_layers: int,
        attention: bool,
        up_sample: bool,
        num_heads: int,
        dropout: float,
        norm_groups: int,
    ):
        super().__init__()
        self.upsampler = Upsample(in_channels) if up_sample else None
        self.resnets = nn.ModuleList(
            [
                ResnetBlock(
                    in_channels + skip_channels if i == 0 else out_channels,
                    out_channels,
                    time_emb_dim,
                    dropout,
                    norm_groups,
                )
                for i in range(num_layers)
            ]
        )
        self.attentions = nn.ModuleList(
            [AttentionBlock(out_channels, num_heads, norm_groups) for _ in range(num_layers)] if attention else []
        )

    def forward(self, x: torch.Tensor, skip: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        if self.upsampler is not None:
            x = self.upsampler(x, skip.shape[-2:])  # (N, C_in, H_skip, W_skip)
        assert x.shape[-2:] == skip.shape[-2:], (
            f"up block input {tuple(x.shape)} does not match its skip {tuple(skip.shape)}"
        )
        x = torch.cat([x, skip], dim=1)  # (N, C_in + C_skip, H, W)
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)  # (N, C_out, H, W)
            if self.attentions:
                x = self.attentions[i](x)  # (N, C_out, H, W)
        return x


#################################################################################
#                                   The model                                   #
#################################################################################


class UNet(nn.Module):
    """DDPM U-Net predicting from noisy images, timesteps and (optionally) class labels the output (N, C_out, H, W)."""

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int | None = None,
        down_channels: Sequence[int] = (32, 64, 128, 256),
        mid_channels: Sequence[int] = (256, 256, 128),
        down_sample: Sequence[bool] = (True, True, False),
        num_down_layers: int = 2,
        num_mid_layers: int = 2,
        num_up_layers: int = 2,
        num_heads: int = 4,
        time_emb_dim: int = 128,
        attention: bool | Sequence[bool] = (False, True, True),
        num_classes: int | None = None,
        class_dropout_prob: float = 0.1,
        dropout: float = 0.0,
        norm_groups: int = 8,
    ):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        down_channels, mid_channels, down_sample = (
            tuple(down_channels),
            tuple(mid_channels),
            tuple(bool(d) for d in down_sample),
        )
        num_levels = len(down_channels) - 1
        attention = (
            (bool(attention),) * max(num_levels, 0)
            if isinstance(attention, bool)
            else tuple(bool(a) for a in attention)
        )
        _check_config(
            in_channels,
            out_channels,
            down_channels,
            mid_channels,
            down_sample,
            num_down_layers,
            num_mid_layers,
            num_up_layers,
            num_heads,
            time_emb_dim,
            attention,
            num_classes,
            class_dropout_prob,
            dropout,
            norm_groups,
        )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.learn_sigma = out_channels == 2 * in_channels
        self.num_classes = num_classes
        self.down_channels, self.mid_channels, self.down_sample, self.attention = (
            down_channels,
            mid_channels,
            down_sample,
            attention,
        )

        self.conv_in = nn.Conv2d(in_channels, down_channels[0], kernel_size=3, padding=1)
        self.t_embedder = TimestepEmbedder(time_emb_dim)
        self.y_embedder = (
            LabelEmbedder(num_classes, time_emb_dim, class_dropout_prob) if num_classes is not None else None
        )
        block_args = dict(time_emb_dim=time_emb_dim, num_heads=num_heads, dropout=dropout, norm_groups=norm_groups)
        self.down_blocks = nn.ModuleList(
            [
                DownBlock(
                    down_channels[i],
                    down_channels[i + 1],
                    num_layers=num_down_layers,
                    attention=attention[i],
                    down_sample=down_sample[i],
                    **block_args,
                )
                for i in range(num_levels)
            ]
        )
        self.activation_checkpointing = False  # recompute each block in backward (dit.run_block); set by the trainer
        self.mid_blocks = nn.ModuleList(
            [
                MidBlock(mid_channels[j], mid_channels[j + 1], num_layers=num_mid_layers, **block_args)
                for j in range(len(mid_channels) - 1)
            ]
        )
        # Deepest first, in the order they run: up block k mirrors down block L - 1 - k and takes its skip.
        self.up_blocks = nn.ModuleList(
            [
                UpBlock(
                    mid_channels[-1] if i == num_levels - 1 else down_channels[i + 1],
                    down_channels[i + 1],
                    down_channels[i],
                    num_layers=num_up_layers,
                    attention=attention[i],
                    up_sample=down_sample[i],
                    **block_args,
                )
                for i in reversed(range(num_levels))
            ]
        )
        self.norm_out = nn.GroupNorm(norm_groups, down_channels[0], eps=1e-6)
        self.conv_out = nn.Conv2d(down_channels[0], out_channels, kernel_size=3, padding=1)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """PyTorch's default init, except zeros on the last layer of every residual branch and on the output (Ho et al.
        2020)."""
        for module in self.modules():
            if isinstance(module, ResnetBlock):
                nn.init.zeros_(module.conv2.weight)
                nn.init.zeros_(module.conv2.bias)
            elif isinstance(module, AttentionBlock):
                nn.init.zeros_(module.to_out.weight)
                nn.init.zeros_(module.to_out.bias)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Predict from noisy inputs x (N, C, H, W), timesteps t (N,) and labels y (N,) the output (N, C_out, H, W).

        An unconditional U-Net (num_classes=None) ignores y, so samplers can pass labels to any model.
        """
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"U-Net input has shape {tuple(x.shape)}; this model takes (N, {self.in_channels}, H, W)")
        temb = self.t_embedder(t)  # (N, D_t)
        if self.y_embedder is not None:
            if y is None:
                raise ValueError(
                    f"this U-Net is class-conditional (num_classes={self.num_classes}): pass labels y (N,), "
                    f"with {self.num_classes} as the null class"
                )
            temb = temb + self.y_embedder(y, self.training)  # (N, D_t)

        h = self.conv_in(x)  # (N, C_0, H, W)
        skips = []
        checkpointed = self.activation_checkpointing
        for block in self.down_blocks:
            # (N, C_{i+1}, H_{i+1}, W_{i+1}), skip (N, C_{i+1}, H_i, W_i)
            h, skip = dit.run_block(block, checkpointed, h, temb)
            skips.append(skip)
        for block in self.mid_blocks:
            h = dit.run_block(block, checkpointed, h, temb)  # (N, M_{j+1}, H_L, W_L)
        for block in self.up_blocks:
            h = dit.run_block(block, checkpointed, h, skips.pop(), temb)  # (N, C_i, H_i, W_i)
        assert not skips, f"{len(skips)} skip connections left unused"
        return self.conv_out(F.silu(self.norm_out(h)))  # (N, C_out, H, W)

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float) -> torch.Tensor:
        """Classifier-free guidance in one batch: x, t, y hold the conditional half, then the unconditional (null-label)
        half.

        Guidance applies to the first in_channels predicted channels; learned-sigma channels come from
        the conditional half. Both halves of the output are the guided one (DiT's contract).
        """
        if self.y_embedder is None:
            raise ValueError(
                "forward_with_cfg needs a class-conditional U-Net (num_classes set); this one is unconditional"
            )
        if x.shape[0] % 2:
            raise ValueError(
                f"forward_with_cfg needs an even batch (conditional half, then unconditional half), got {x.shape[0]}"
            )
        half = x[: x.shape[0] // 2]  # (N/2, C, H, W)
        out = self.forward(torch.cat([half, half], dim=0), t, y)  # (N, C_out, H, W)
        eps, rest = out[:, : self.in_channels], out[:, self.in_channels :]  # (N, C, H, W), (N, C_out - C, H, W)
        cond_eps, uncond_eps = eps.chunk(2, dim=0)  # 2 x (N/2, C, H, W)
        guided = uncond_eps + cfg_scale * (cond_eps - uncond_eps)  # (N/2, C, H, W)
        guided_half = torch.cat([guided, rest[: half.shape[0]]], dim=1)  # (N/2, C_out, H, W)
        return torch.cat([guided_half, guided_half], dim=0)  # (N, C_out, H, W)


#################################################################################
#                                 Argument checks                               #
#################################################################################


def _check_config(
    in_channels,
    out_channels,
    down_channels,
    mid_channels,
    down_sample,
    num_down_layers,
    num_mid_layers,
    num_up_layers,
    num_heads,
    time_emb_dim,
    attention,
    num_classes,
    class_dropout_prob,
    dropout,
    norm_groups,
) -> None:
    """Raise ValueError, saying what is expected, for a U-Net that cannot be built."""
    for name, value in (
        ("in_channels", in_channels),
        ("out_channels", out_channels),
        ("num_down_layers", num_down_layers),
        ("num_up_layers", num_up_layers),
        ("num_heads", num_heads),
        ("norm_groups", norm_groups),
    ):
        if value < 1:
            raise ValueError(f"U-Net {name} must be a positive integer, got {value}")
    if num_mid_layers < 0:
        raise ValueError(f"U-Net num_mid_layers must be >= 0, got {num_mid_layers}")
    if time_emb_dim < 2 or time_emb_dim % 2:
        raise ValueError(f"U-Net time_emb_dim must be an even number >= 2 (sine and cosine halves), got {time_emb_dim}")
    if len(down_channels) < 2:
        raise ValueError(
            f"U-Net down_channels needs at least 2 entries (one down block per consecutive pair), got {down_channels}"
        )
    if len(down_sample) != len(down_channels) - 1:
        raise ValueError(
            f"U-Net down_sample has {len(down_sample)} entries; expected len(down_channels) - 1 = "
            f"{len(down_channels) - 1}, one per down block"
        )
    if len(attention) != len(down_channels) - 1:
        raise ValueError(
            f"U-Net attention has {len(attention)} entries; expected a bool or len(down_channels) - 1 = "
            f"{len(down_channels) - 1}, one per down block"
        )
    if len(mid_channels) < 2:
        raise ValueError(
            f"U-Net mid_channels needs at least 2 entries (one mid block per consecutive pair), got {mid_channels}"
        )
    if mid_channels[0] != down_channels[-1]:
        raise ValueError(
            f"U-Net mid_channels[0] is {mid_channels[0]}; expected down_channels[-1] = {down_channels[-1]}, "
            "the channels the down path ends with"
        )
    for name, channels in (("down_channels", down_channels), ("mid_channels", mid_channels)):
        for c in channels:
            if c < 1 or c % norm_groups:
                raise ValueError(
                    f"U-Net {name} entry {c} is not a positive multiple of norm_groups={norm_groups}, as GroupNorm "
                    "needs"
                )
    attended = {down_channels[i + 1] for i, a in enumerate(attention) if a} | {
        down_channels[i] for i, a in enumerate(attention) if a
    }
    if num_mid_layers:
        attended |= set(mid_channels[1:])
    for c in sorted(attended):
        if c % num_heads:
            raise ValueError(
                f"U-Net num_heads={num_heads} does not divide {c}, the channels of an attention block; "
                "pick a head count that divides every attended width"
            )
    if num_classes is not None and num_classes < 1:
        raise ValueError(f"U-Net num_classes must be a positive integer or None (unconditional), got {num_classes}")
    if not 0 <= class_dropout_prob < 1:
        raise ValueError(f"U-Net class_dropout_prob must be in [0, 1), got {class_dropout_prob}")
    if not 0 <= dropout < 1:
        raise ValueError(f"U-Net dropout must be in [0, 1), got {dropout}")
