"""Diffusion Transformer (Peebles & Xie, 2023): class-conditional adaLN-Zero DiT, and its variants.

The default configuration is the published model: its parameter names follow the checkpoints of
facebookresearch/DiT, so their state dicts load as they are. Constructor options give the variants
of the paper's section 3.2 and a few more: conditioning by adaLN (with or without zero init), by
cross-attention or in context; a class label, a text embedding or nothing as the condition; an MLP
or a depthwise-convolutional feed-forward network; fixed or learned position embeddings; dropout in
the attention and feed-forward outputs.
Sections: helpers, embedders, attention and feed-forward, blocks and final layer, the model, 2-D
sin-cos position embedding, named configs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from model.sizes import DIT_SIZES

CONDITIONINGS = ("adaln_zero", "adaln", "cross_attention", "in_context")
CONDITIONS = ("class", "text", "none")
FFNS = ("mlp", "conv")
POS_EMBEDS = ("sincos", "learned")
TEXT_KEYS = ("tokens", "mask", "pooled")

# What `y` may be: class labels (N,); text embeddings (N, text_dim) or (N, L, text_dim), or a dict with
# keys from TEXT_KEYS; None when condition="none".
Condition = torch.Tensor | Mapping[str, torch.Tensor] | None


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Apply a per-sample affine modulation (N, D) to every token of x (N, T, D)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


#################################################################################
#              Embedders: image patches, timesteps, class labels, text          #
#################################################################################


def run_block(block: nn.Module, checkpointed: bool, *args):
    """block(*args), or recomputed in backward instead of keeping its activations (activation checkpointing).

    torch's non-reentrant checkpoint: same values and gradients, it keeps only the block's inputs and
    works under DDP and DeepSpeed ZeRO; it applies only where gradients are being recorded.
    """
    if checkpointed and torch.is_grad_enabled():
        from torch.utils.checkpoint import checkpoint

        return checkpoint(block, *args, use_reentrant=False)
    return block(*args)


BLOCK_LISTS = ("blocks", "down_blocks", "mid_blocks", "up_blocks")  # DiT's and the U-Net's block lists


def blocks_of(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a DiT or U-Net (the units run_block may recompute, FSDP shards and compile_blocks
    compiles)."""
    return [block for name in BLOCK_LISTS for block in getattr(model, name, ())]


def compile_blocks(model: nn.Module) -> int:
    """torch.compile every block in place (state-dict names unchanged); returns how many.

    Per block rather than the whole model: blocks of one shape share a compiled graph, so compiling
    costs one block's time, and DDP's / FSDP's per-block gradient hooks still fire as each block's
    backward ends, keeping communication overlapped with the rest of the backward pass. Static
    shapes: a job's batch shape does not change, and inductor fails on the U-Net's blocks with
    dynamic shapes (torch 2.13). Every block is one entry of the same code's cache (Module._call_impl),
    so the recompile limit (default 8) is raised to the number of blocks: the U-Net's blocks differ.
    """
    import torch._dynamo

    blocks = blocks_of(model)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, len(blocks))
    for block in blocks:
        block.compile(dynamic=False)
    return len(blocks)


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


class TextEmbedder(nn.Module):
    """Project precomputed text-encoder embeddings to D-dim condition tokens; in training, drop captions to a learned
    null caption.

    Input `y`: a pooled sentence embedding (N, text_dim) (one token), a token sequence (N, L, text_dim)
    with L <= max_tokens, or a dict with "tokens" (N, L, text_dim) and/or "pooled" (N, text_dim), and
    optionally "mask" (N, L) (True / 1 = real token, False / 0 = padding). The pooled vector, when not
    given, is the mean of the real tokens. The null caption is one learned D-dim token (the sequence
    becomes that token followed by padding) and is also the pooled vector of a dropped caption.
    """

    def __init__(self, text_dim: int, hidden_size: int, max_tokens: int, dropout_prob: float):
        super().__init__()
        self.text_dim = text_dim
        self.max_tokens = max_tokens
        self.dropout_prob = dropout_prob
        self.proj = nn.Linear(text_dim, hidden_size, bias=True)
        # Present only when captions can be dropped, as the null row of LabelEmbedder.
        self.null_embedding = nn.Parameter(torch.zeros(1, hidden_size)) if dropout_prob > 0 else None

    def parse(self, y: Condition) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Check y and return token embeddings (N, L, text_dim), a bool mask (N, L), and the pooled input (N, text_dim)
        or None."""
        if isinstance(y, Mapping):
            unknown = set(y) - set(TEXT_KEYS)
            if unknown or not ({"tokens", "pooled"} & set(y)):
                raise ValueError(
                    f"text condition dict has keys {sorted(y)}; valid keys are {', '.join(TEXT_KEYS)} with 'tokens' or "
                    "'pooled' present"
                )
            tokens, mask, pooled = y.get("tokens"), y.get("mask"), y.get("pooled")
        elif isinstance(y, torch.Tensor) and y.ndim == 2:
            tokens, mask, pooled = None, None, y
        elif isinstance(y, torch.Tensor) and y.ndim == 3:
            tokens, mask, pooled = y, None, None
        else:
            got = f"a tensor of shape {tuple(y.shape)}" if isinstance(y, torch.Tensor) else type(y).__name__
            raise ValueError(
                f"text condition must be a float tensor (N, {self.text_dim}) or (N, L, {self.text_dim}), or a dict "
                f"with keys {', '.join(TEXT_KEYS)}; got {got}"
            )
        if pooled is not None and (pooled.ndim != 2 or pooled.shape[-1] != self.text_dim):
            raise ValueError(f"pooled text embedding has shape {tuple(pooled.shape)}; expected (N, {self.text_dim})")
        if tokens is None:
            tokens = pooled[:, None]  # (N, 1, text_dim)
            if mask is not None:
                raise ValueError("a text 'mask' needs 'tokens'")
        if tokens.ndim != 3 or tokens.shape[-1] != self.text_dim or not 1 <= tokens.shape[1] <= self.max_tokens:
            raise ValueError(
                f"text tokens have shape {tuple(tokens.shape)}; expected (N, L, {self.text_dim}) with 1 <= L <= "
                f"text_tokens={self.max_tokens}"
            )
        if mask is None:
            mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)  # (N, L)
        elif tuple(mask.shape) != tuple(tokens.shape[:2]):
            raise ValueError(
                f"text mask has shape {tuple(mask.shape)}; expected {tuple(tokens.shape[:2])}, one entry per token"
            )
        return tokens, mask.bool(), pooled

    def forward(
        self, y: Condition, train: bool, force_drop_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return condition tokens (N, L, D), their mask (N, L) and a pooled condition vector (N, D)."""
        tokens, mask, pooled = self.parse(y)  # (N, L, text_dim), (N, L), (N, text_dim) or None
        tokens = self.proj(tokens)  # (N, L, D)
        if pooled is None:
            weights = mask.to(tokens.dtype).unsqueeze(-1)  # (N, L, 1)
            pooled = (tokens * weights).sum(1) / weights.sum(1).clamp(min=1)  # (N, D), mean of the real tokens
        else:
            pooled = self.proj(pooled)  # (N, D)
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            if self.null_embedding is None:
                raise ValueError("this DiT has no null caption (class_dropout_prob=0): captions cannot be dropped")
            n, length = mask.shape
            if force_drop_ids is None:
                # From the global CPU RNG, as LabelEmbedder.token_drop: reproducible after torch.manual_seed.
                drop = (torch.rand(n) < self.dropout_prob).to(tokens.device)  # (N,)
            else:
                drop = force_drop_ids.to(tokens.device) == 1  # (N,)
            first = torch.arange(length, device=tokens.device) == 0  # (L,)
            null = self.null_embedding.to(tokens.dtype)  # (1, D)
            # (L, D): the null token, then padding
            null_tokens = torch.where(first[:, None], null, torch.zeros_like(null))
            tokens = torch.where(drop[:, None, None], null_tokens, tokens)  # (N, L, D)
            mask = torch.where(drop[:, None], first, mask)  # (N, L)
            pooled = torch.where(drop[:, None], null, pooled)  # (N, D)
        return tokens, mask, pooled


#################################################################################
#                           Attention and feed-forward                          #
#################################################################################


def dropout_layer(p: float) -> nn.Module:
    """nn.Dropout(p), or nn.Identity() for p = 0 (the published DiT: no layer, the same outputs bitwise); neither holds
    parameters, so state dicts are the same either way."""
    return nn.Dropout(p) if p > 0 else nn.Identity()


def _key_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    """A key mask (N, S), True = attend, as an SDPA mask (N, 1, 1, S) broadcast over heads and queries."""
    return None if mask is None else mask[:, None, None, :]


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (timm's layout, without timm); proj_drop: dropout on the
    output projection, as timm's."""

    def __init__(self, dim: int, num_heads: int, proj_drop: float = 0.0):
        super().__init__()
        assert dim % num_heads == 0, f"width {dim} must be divisible by num_heads {num_heads}"
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)
        self.proj_drop = dropout_layer(proj_drop)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Attend from every token of x (N, T, D) to the tokens where the key mask (N, T) is True (all if None)."""
        n, t, d = x.shape
        qkv = self.qkv(x).reshape(n, t, 3, self.num_heads, self.head_dim)  # (N, T, 3, H, Dh)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (N, H, T, Dh)
        # (N, H, T, Dh), softmax(q k^T / sqrt(Dh)) v
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=_key_mask(mask))
        x = x.transpose(1, 2).reshape(n, t, d)  # (N, T, D)
        return self.proj_drop(self.proj(x))  # (N, T, D)


class CrossAttention(nn.Module):
    """Multi-head attention from image tokens (queries) to condition tokens (keys and values); proj_drop as
    Attention's."""

    def __init__(self, dim: int, num_heads: int, proj_drop: float = 0.0):
        super().__init__()
        assert dim % num_heads == 0, f"width {dim} must be divisible by num_heads {num_heads}"
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim, bias=True)
        self.kv = nn.Linear(dim, 2 * dim, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)
        self.proj_drop = dropout_layer(proj_drop)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        n, t, d = x.shape
        s = context.shape[1]
        q = self.q(x).reshape(n, t, self.num_heads, self.head_dim).transpose(1, 2)  # (N, H, T, Dh)
        kv = self.kv(context).reshape(n, s, 2, self.num_heads, self.head_dim)  # (N, S, 2, H, Dh)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # 2 x (N, H, S, Dh)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=_key_mask(mask))  # (N, H, T, Dh)
        x = x.transpose(1, 2).reshape(n, t, d)  # (N, T, D)
        return self.proj_drop(self.proj(x))  # (N, T, D)


class Mlp(nn.Module):
    """Two-layer feed-forward network with tanh-approximated GELU; drop: dropout after the activation and after fc2,
    as timm's Mlp (drop1, drop2)."""

    def __init__(self, in_features: int, hidden_features: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features, bias=True)
        self.act = nn.GELU(approximate="tanh")
        self.drop1 = dropout_layer(drop)
        self.fc2 = nn.Linear(hidden_features, in_features, bias=True)
        self.drop2 = dropout_layer(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop1(self.act(self.fc1(x)))  # (N, T, F)
        return self.drop2(self.fc2(x))  # (N, T, D)


class ConvMlp(nn.Module):
    """Feed-forward network with a 3x3 depthwise convolution over the patch grid (LocalViT, Li et al. 2021).

    1x1 expand (fc1), 3x3 depthwise conv, GELU, 1x1 project (fc2); LocalViT also puts a norm and an
    activation after the expansion, left out here so that the block stays a drop-in for Mlp. The
    first `num_prefix_tokens` tokens (in-context condition tokens) have no place on the grid: they
    go through fc1, GELU and fc2 only, with the same weights. drop: dropout after the GELU and after
    fc2, as Mlp's.
    """

    def __init__(self, in_features: int, hidden_features: int, grid_size: int, drop: float = 0.0):
        super().__init__()
        self.grid_size = grid_size
        self.fc1 = nn.Linear(in_features, hidden_features, bias=True)
        self.dwconv = nn.Conv2d(
            hidden_features, hidden_features, kernel_size=3, padding=1, groups=hidden_features, bias=True
        )
        self.act = nn.GELU(approximate="tanh")
        self.drop1 = dropout_layer(drop)
        self.fc2 = nn.Linear(hidden_features, in_features, bias=True)
        self.drop2 = dropout_layer(drop)

    def forward(self, x: torch.Tensor, num_prefix_tokens: int = 0) -> torch.Tensor:
        x = self.fc1(x)  # (N, S + T, F)
        prefix, patches = x[:, :num_prefix_tokens], x[:, num_prefix_tokens:]  # (N, S, F), (N, T, F)
        n, t, f = patches.shape
        assert t == self.grid_size**2, f"got {t} patch tokens, expected a {self.grid_size}x{self.grid_size} grid"
        grid = patches.transpose(1, 2).reshape(n, f, self.grid_size, self.grid_size)  # (N, F, h, w), row-major tokens
        patches = self.dwconv(grid).flatten(2).transpose(1, 2)  # (N, T, F)
        x = torch.cat([prefix, patches], dim=1)  # (N, S + T, F)
        x = self.drop1(self.act(x))  # (N, S + T, F)
        return self.drop2(self.fc2(x))  # (N, S + T, D)


def make_ffn(ffn: str, hidden_size: int, mlp_ratio: float, grid_size: int | None, drop: float = 0.0) -> nn.Module:
    """The feed-forward network of a block: "mlp" or "conv" (needs the patch grid size), with dropout `drop`."""
    hidden_features = int(hidden_size * mlp_ratio)
    if ffn == "mlp":
        return Mlp(hidden_size, hidden_features, drop=drop)
    if ffn == "conv":
        assert grid_size is not None, "a conv FFN needs the patch grid size"
        return ConvMlp(hidden_size, hidden_features, grid_size, drop=drop)
    raise ValueError(f"unknown ffn {ffn!r} (valid: {', '.join(FFNS)})")


#################################################################################
#                         DiT blocks and final layer                            #
#################################################################################


class DiTBlock(nn.Module):
    """Transformer block whose norms are modulated, and whose branches are gated, by the condition (adaLN-Zero)."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        ffn: str = "mlp",
        grid_size: int | None = None,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads=num_heads, proj_drop=dropout)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = make_ffn(ffn, hidden_size, mlp_ratio, grid_size, drop=dropout)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        modulation = self.adaLN_modulation(c)  # (N, 6D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation.chunk(6, dim=1)  # 6 x (N, D)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))  # (N, T, D)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))  # (N, T, D)
        return x


class CrossAttentionBlock(nn.Module):
    """Pre-norm transformer block: self-attention, cross-attention to the condition tokens, feed-forward."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        ffn: str = "mlp",
        grid_size: int | None = None,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=True, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads=num_heads, proj_drop=dropout)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=True, eps=1e-6)
        self.cross_attn = CrossAttention(hidden_size, num_heads=num_heads, proj_drop=dropout)
        self.norm3 = nn.LayerNorm(hidden_size, elementwise_affine=True, eps=1e-6)
        self.mlp = make_ffn(ffn, hidden_size, mlp_ratio, grid_size, drop=dropout)

    def forward(self, x: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))  # (N, T, D)
        x = x + self.cross_attn(self.norm2(x), context, context_mask)  # (N, T, D)
        x = x + self.mlp(self.norm3(x))  # (N, T, D)
        return x


class InContextBlock(nn.Module):
    """Plain pre-norm transformer block over condition tokens followed by patch tokens."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        ffn: str = "mlp",
        grid_size: int | None = None,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=True, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads=num_heads, proj_drop=dropout)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=True, eps=1e-6)
        self.mlp = make_ffn(ffn, hidden_size, mlp_ratio, grid_size, drop=dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, num_prefix_tokens: int) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), mask)  # (N, S + T, D)
        h = self.norm2(x)  # (N, S + T, D)
        h = self.mlp(h, num_prefix_tokens) if isinstance(self.mlp, ConvMlp) else self.mlp(h)  # (N, S + T, D)
        return x + h  # (N, S + T, D)


class FinalLayer(nn.Module):
    """Modulated norm, then a linear map from each token to its patch of output channels.

    modulated=False: a plain LayerNorm with affine parameters and no adaLN (in-context conditioning).
    """

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, modulated: bool = True):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=not modulated, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        if modulated:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))
        else:
            self.adaLN_modulation = None

    def forward(self, x: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        if self.adaLN_modulation is None:
            return self.linear(self.norm_final(x))  # (N, T, p * p * out_channels)
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)  # 2 x (N, D)
        x = modulate(self.norm_final(x), shift, scale)  # (N, T, D)
        return self.linear(x)  # (N, T, p * p * out_channels)


#################################################################################
#                                   The model                                   #
#################################################################################


class DiT(nn.Module):
    """Diffusion model with a Transformer backbone, conditioned on a timestep and a class label, a text or nothing.

    Variants (the defaults are the published DiT):
    - conditioning: "adaln_zero" (c = t_emb + cond_emb modulates and gates every block, gates and
      modulation zero-initialised); "adaln" (the same blocks, modulation initialised like every other
      linear: xavier-uniform, zero bias); "cross_attention" (pre-norm blocks with affine LayerNorms:
      self-attention, cross-attention to the condition tokens [t_emb, class token or text tokens],
      MLP; the final layer stays adaLN-modulated by c = t_emb + pooled condition, the choice of the
      paper's cross-attention variant, which keeps one global path for the timestep); "in_context"
      (the condition tokens [t_emb, class token or text tokens] are put before the patch tokens,
      plain pre-norm blocks, the condition tokens are dropped after the last block and the final
      layer is an affine LayerNorm + linear with no adaLN: the condition enters only in context).
    - condition: "class" (y: labels (N,), null class `num_classes`), "text" (y: precomputed text
      embeddings, see TextEmbedder; projected by a Linear(text_dim, D), dropped to a learned null
      caption with probability class_dropout_prob in training), "none" (y is ignored, so loss and
      sampling code may pass dataset labels unchanged; classifier-free guidance is refused).
    - ffn: "mlp" or "conv" (ConvMlp: a 3x3 depthwise conv over the patch grid between the 1x1s).
    - pos_embed: "sincos" (fixed, a frozen Parameter) or "learned" (trainable, initialised from the
      same sin-cos table, so that training starts from the fixed model). Condition tokens in context
      or in the cross-attention carry no position embedding.
    - dropout: in training, dropout on the output of every attention (self and cross) and
      feed-forward sublayer, where timm's Attention (proj_drop) and Mlp (drop1 after the activation,
      drop2 after fc2) put it; 0, the paper's, adds no layer (outputs and state dict unchanged).
    The output layer is zero-initialised in every variant: the model's output starts at zero.
    """

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
        conditioning: str = "adaln_zero",
        condition: str = "class",
        ffn: str = "mlp",
        pos_embed: str = "sincos",
        text_dim: int | None = None,
        text_tokens: int = 77,
        dropout: float = 0.0,
    ):
        super().__init__()
        _check_sizes(
            input_size,
            patch_size,
            in_channels,
            hidden_size,
            depth,
            num_heads,
            mlp_ratio,
            class_dropout_prob,
            num_classes,
            dropout,
        )
        _check_variant(conditioning, condition, ffn, pos_embed, text_dim, text_tokens)
        self.input_size = input_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.learn_sigma = learn_sigma
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.conditioning = conditioning
        self.condition = condition
        self.ffn = ffn
        self.pos_embed_type = pos_embed
        self.text_dim = text_dim
        self.text_tokens = text_tokens
        self.dropout = dropout

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        if condition == "class":
            self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        elif condition == "text":
            self.y_embedder = TextEmbedder(text_dim, hidden_size, text_tokens, class_dropout_prob)
        else:
            self.y_embedder = None
        # Sin-cos: fixed, a frozen Parameter (not a buffer) so state dicts match the published ones. Learned: trainable.
        self.pos_embed = nn.Parameter(
            torch.zeros(1, self.x_embedder.num_patches, hidden_size), requires_grad=pos_embed == "learned"
        )
        block_class = {
            "adaln_zero": DiTBlock,
            "adaln": DiTBlock,
            "cross_attention": CrossAttentionBlock,
            "in_context": InContextBlock,
        }[conditioning]
        grid_size = self.x_embedder.grid_size
        self.activation_checkpointing = False  # recompute each block in backward (run_block); set by the trainer
        self.blocks = nn.ModuleList(
            [
                block_class(hidden_size, num_heads, mlp_ratio=mlp_ratio, ffn=ffn, grid_size=grid_size, dropout=dropout)
                for _ in range(depth)
            ]
        )
        self.final_layer = FinalLayer(
            hidden_size, patch_size, self.out_channels, modulated=conditioning != "in_context"
        )
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Initialise as the paper: xavier linears, sin-cos positions, zeroed adaLN (adaln_zero) and output layers."""

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

        if isinstance(self.y_embedder, LabelEmbedder):
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        elif isinstance(self.y_embedder, TextEmbedder) and self.y_embedder.null_embedding is not None:
            nn.init.normal_(self.y_embedder.null_embedding, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)

        zero_modulation = self.conditioning != "adaln"
        # adaLN-Zero: every block starts as the identity ...
        if self.conditioning == "adaln_zero":
            for block in self.blocks:
                nn.init.zeros_(block.adaLN_modulation[-1].weight)
                nn.init.zeros_(block.adaLN_modulation[-1].bias)
        # ... and the model's output starts at exactly zero.
        if self.final_layer.adaLN_modulation is not None and zero_modulation:
            nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
            nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    @property
    def has_null_condition(self) -> bool:
        """Whether a null condition (null class or null caption) exists, as classifier-free guidance needs."""
        if isinstance(self.y_embedder, LabelEmbedder):
            return self.y_embedder.dropout_prob > 0
        return isinstance(self.y_embedder, TextEmbedder) and self.y_embedder.null_embedding is not None

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """Reassemble tokens (N, T, p * p * C_out) into images (N, C_out, H, W)."""
        c, p = self.out_channels, self.patch_size
        h = w = self.x_embedder.grid_size
        assert h * w == x.shape[1], f"got {x.shape[1]} tokens, expected a {h}x{w} grid"
        x = x.reshape(x.shape[0], h, w, p, p, c)  # (N, h, w, p, p, C_out)
        x = x.permute(0, 5, 1, 3, 2, 4)  # (N, C_out, h, p, w, p)
        return x.reshape(x.shape[0], c, h * p, w * p)  # (N, C_out, H, W)

    def embed_condition(
        self, y: Condition, n: int, force_drop_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Condition tokens (N, L, D), their key mask (N, L) or None (all real), and the pooled condition (N, D) or
        None."""
        if self.condition == "none":
            return self.pos_embed.new_zeros(n, 0, self.pos_embed.shape[-1]), None, None  # (N, 0, D)
        if force_drop_ids is not None and not self.has_null_condition:
            raise ValueError("force_drop_ids needs a null condition, which this DiT lacks (class_dropout_prob=0)")
        if y is None:
            raise ValueError(
                f"DiT(condition={self.condition!r}) needs y: "
                + ("labels (N,)" if self.condition == "class" else "text embeddings")
            )
        if self.condition == "class":
            pooled = self.y_embedder(y, self.training, force_drop_ids)  # (N, D)
            return pooled.unsqueeze(1), None, pooled  # (N, 1, D), None, (N, D)
        return self.y_embedder(y, self.training, force_drop_ids)  # (N, L, D), (N, L), (N, D)

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, y: Condition = None, force_drop_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Predict from noisy inputs x (N, C, H, W), timesteps t (N,) and condition y the output (N, C_out, H, W).

        y: labels (N,) for condition="class", text embeddings (see TextEmbedder) for "text", ignored for
        "none". force_drop_ids (N,): 1 where the null condition (null class or null caption) replaces y.
        """
        expected = (self.in_channels, self.input_size, self.input_size)
        if tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"DiT input has shape {tuple(x.shape)}; this model takes (N, {', '.join(map(str, expected))})"
            )
        x = self.x_embedder(x) + self.pos_embed  # (N, T, D), T = H * W / p ** 2
        t = self.t_embedder(t)  # (N, D)
        # (N, L, D), (N, L) or None, (N, D) or None
        tokens, mask, pooled = self.embed_condition(y, x.shape[0], force_drop_ids)
        c = t if pooled is None else t + pooled  # (N, D)
        if self.conditioning in ("adaln_zero", "adaln"):
            for block in self.blocks:
                x = run_block(block, self.activation_checkpointing, x, c)  # (N, T, D)
        elif self.conditioning == "cross_attention":
            context = torch.cat([t.unsqueeze(1), tokens], dim=1)  # (N, 1 + L, D)
            context_mask = None if mask is None else F.pad(mask, (1, 0), value=True)  # (N, 1 + L)
            for block in self.blocks:
                x = run_block(block, self.activation_checkpointing, x, context, context_mask)  # (N, T, D)
        else:  # in_context
            prefix = torch.cat([t.unsqueeze(1), tokens], dim=1)  # (N, S, D), S = 1 + L
            s = prefix.shape[1]
            x = torch.cat([prefix, x], dim=1)  # (N, S + T, D)
            seq_mask = None if mask is None else F.pad(mask, (1, x.shape[1] - s), value=True)  # (N, S + T)
            for block in self.blocks:
                x = run_block(block, self.activation_checkpointing, x, seq_mask, s)  # (N, S + T, D)
            x = x[:, s:]  # (N, T, D), condition tokens dropped
        x = self.final_layer(x, c)  # (N, T, p * p * C_out)
        return self.unpatchify(x)  # (N, C_out, H, W)

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, y: Condition, cfg_scale: float) -> torch.Tensor:
        """Classifier-free guidance in one batch: x, t, y hold the conditional half, then the unconditional half.

        Class: the second half of y holds null labels (`num_classes`), as the official code. Text: the
        second half of y is replaced by the learned null caption (its content is ignored; repeating
        the captions is fine). Guidance applies to all `in_channels` predicted channels (the official
        code guides only the first three); learned-sigma channels come from the conditional half.
        Both halves of the output are the guided one. condition="none" has nothing to guide: ValueError.
        """
        condition = getattr(self, "condition", "class")  # models that borrow this method are class-conditional
        if condition == "none":
            raise ValueError("classifier-free guidance needs a condition; this DiT has condition='none'")
        if x.shape[0] % 2:
            raise ValueError(
                f"forward_with_cfg needs an even batch (conditional half, then unconditional half), got {x.shape[0]}"
            )
        half = x[: x.shape[0] // 2]  # (N/2, C, H, W)
        combined = torch.cat([half, half], dim=0)  # (N, C, H, W)
        if condition == "text":
            drop = (torch.arange(x.shape[0], device=x.device) >= half.shape[0]).long()  # (N,), 1 in the second half
            out = self.forward(combined, t, y, force_drop_ids=drop)  # (N, C_out, H, W)
        else:
            out = self.forward(combined, t, y)  # (N, C_out, H, W)
        eps, rest = out[:, : self.in_channels], out[:, self.in_channels :]  # (N, C, H, W), (N, C_out - C, H, W)
        cond_eps, uncond_eps = eps.chunk(2, dim=0)  # 2 x (N/2, C, H, W)
        guided = uncond_eps + cfg_scale * (cond_eps - uncond_eps)  # (N/2, C, H, W)
        cond_rest = rest[: half.shape[0]]  # (N/2, C_out - C, H, W)
        guided_half = torch.cat([guided, cond_rest], dim=1)  # (N/2, C_out, H, W)
        return torch.cat([guided_half, guided_half], dim=0)  # (N, C_out, H, W)


def _check_sizes(
    input_size,
    patch_size,
    in_channels,
    hidden_size,
    depth,
    num_heads,
    mlp_ratio,
    class_dropout_prob,
    num_classes,
    dropout,
) -> None:
    """Raise ValueError for a DiT shape that cannot be built."""
    for name, value in (
        ("input_size", input_size),
        ("patch_size", patch_size),
        ("in_channels", in_channels),
        ("hidden_size", hidden_size),
        ("depth", depth),
        ("num_heads", num_heads),
        ("num_classes", num_classes),
    ):
        if value < 1:
            raise ValueError(f"DiT {name} must be a positive integer, got {value}")
    if input_size % patch_size:
        raise ValueError(
            f"DiT input_size {input_size} is not divisible by patch_size {patch_size}; pick a patch size that divides "
            "it"
        )
    if hidden_size % num_heads:
        raise ValueError(f"DiT hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
    if hidden_size % 4:
        raise ValueError(
            f"DiT hidden_size {hidden_size} must be a multiple of 4 (the 2-D sin-cos position embedding needs it)"
        )
    if mlp_ratio <= 0:
        raise ValueError(f"DiT mlp_ratio must be positive, got {mlp_ratio}")
    if not 0 <= class_dropout_prob < 1:
        raise ValueError(f"DiT class_dropout_prob must be in [0, 1), got {class_dropout_prob}")
    if not 0 <= dropout < 1:
        raise ValueError(f"DiT dropout must be in [0, 1), got {dropout}")


def _check_variant(conditioning, condition, ffn, pos_embed, text_dim, text_tokens) -> None:
    """Raise ValueError for an unknown variant name or a combination that cannot be built."""
    for name, value, valid in (
        ("conditioning", conditioning, CONDITIONINGS),
        ("condition", condition, CONDITIONS),
        ("ffn", ffn, FFNS),
        ("pos_embed", pos_embed, POS_EMBEDS),
    ):
        if value not in valid:
            raise ValueError(f"DiT {name} {value!r} is unknown (valid: {', '.join(valid)})")
    if condition == "text":
        if text_dim is None or text_dim < 1:
            raise ValueError(
                "DiT condition='text' needs text_dim, the width of the text embeddings (a positive integer), got "
                f"{text_dim}"
            )
        if text_tokens < 1:
            raise ValueError(f"DiT text_tokens must be a positive integer, got {text_tokens}")
    elif text_dim is not None:
        raise ValueError(f"DiT text_dim={text_dim} is only used with condition='text', not condition={condition!r}")


#################################################################################
#                     2-D sine-cosine position embedding                        #
#################################################################################
# As in MAE (He et al., 2022): half of the channels encode the column, half the row.


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> np.ndarray:
    """Fixed position embedding (grid_size ** 2, embed_dim) of a square grid, tokens in row-major order."""
    if embed_dim % 4:
        raise ValueError(f"embed_dim must be a multiple of 4 for a 2-D sin-cos embedding, got {embed_dim}")
    rows, cols = np.meshgrid(
        np.arange(grid_size, dtype=np.float32), np.arange(grid_size, dtype=np.float32), indexing="ij"
    )
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
# Table 1 of the paper: model sizes S, B, L, XL (model/sizes.py); a name "DiT-XL/2" adds the patch size.


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
    "DiT-XL/2": DiT_XL_2,
    "DiT-XL/4": DiT_XL_4,
    "DiT-XL/8": DiT_XL_8,
    "DiT-L/2": DiT_L_2,
    "DiT-L/4": DiT_L_4,
    "DiT-L/8": DiT_L_8,
    "DiT-B/2": DiT_B_2,
    "DiT-B/4": DiT_B_4,
    "DiT-B/8": DiT_B_8,
    "DiT-S/2": DiT_S_2,
    "DiT-S/4": DiT_S_4,
    "DiT-S/8": DiT_S_8,
}
