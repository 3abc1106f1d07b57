"""Turning sample tensors into PNG-ready grids."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8."""
    scaled = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return scaled.permute(0, 2, 3, 1).numpy()


def make_grid(images: torch.Tensor, rows: int, min_side: int = 512, pad: int = 1) -> Image.Image:
    """A grid of `rows` rows, upscaled (nearest) so small images stay visible in the MLflow UI."""
    pixels = to_uint8(images)  # (N, H, W, C)
    n, h, w, c = pixels.shape
    cols = -(-n // rows)
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, cols)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        grid[top : top + h, left : left + w] = pixels[i]
    image = Image.fromarray(grid[..., 0] if c == 1 else grid)
    scale = max(1, -(-min_side // max(image.size)))
    return image.resize((image.size[0] * scale, image.size[1] * scale), Image.NEAREST) if scale > 1 else image
