"""Loading weights into a network by exact key match: init_from, sampling and export share this."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from orchestrator.errors import UserError


class WeightsMismatch(UserError):
    """A weights file whose keys or shapes do not match the network the spec builds."""


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors, or from a torch .pt/.pth (tensors only, on the CPU; a checkpoint
    dict holding `ema` or `model` gives that entry, EMA first, as published DiT checkpoints are EMA weights)."""
    if not path.is_file():
        raise WeightsMismatch(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        return load_file(str(path), device="cpu")
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("ema", "model", "state_dict"):
        if isinstance(state.get(key), dict):
            return state[key]
    return state


def load_weights(model: torch.nn.Module, path: Path) -> None:
    """Load weights strictly; WeightsMismatch lists missing, unexpected and mis-shaped keys instead of a traceback."""
    state = read_weights(path)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshaped = sorted(k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape))
    if missing or unexpected or misshaped:

        def listing(name: str, keys: list[str]) -> str:
            return f"{len(keys)} {name} ({', '.join(keys[:10])}{', ...' if len(keys) > 10 else ''})" if keys else ""

        parts = [
            p
            for p in (
                listing("missing", missing),
                listing("unexpected", unexpected),
                listing("of another shape", misshaped),
            )
            if p
        ]
        raise WeightsMismatch(f"{path} does not fit the model the spec builds: keys " + "; ".join(parts))
    model.load_state_dict(state)
