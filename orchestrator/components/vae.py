"""The VAE of latent-space models: loaded by name or folder, offline, for encoding (`orch prepare`) and decoding (grids,
`orch sample`)."""

from __future__ import annotations

from pathlib import Path

import torch

from orchestrator.errors import UserError


class ModelLoadError(UserError):
    """A pretrained model (VAE, text encoder) that cannot be loaded here."""


def load_vae(
    name: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, subfolder: str | None = None
) -> torch.nn.Module:
    """A diffusers AutoencoderKL in eval mode without gradients; ModelLoadError (with the fix) if it is neither on disk
    nor in the HF cache."""
    from diffusers import AutoencoderKL

    try:
        vae = AutoencoderKL.from_pretrained(name, subfolder=subfolder, torch_dtype=dtype)
    except (
        Exception
    ) as err:  # the hub and diffusers raise OSError, ValueError, HF errors...: all mean "cannot load this"
        if name.startswith(("/", "./", "../", "~")):  # a path, not a hub name
            raise ModelLoadError(
                f"cannot load the VAE {name!r}: there is no AutoencoderKL folder (config.json and weights) there; fix "
                "the path"
            ) from None
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelLoadError(
            f"cannot load the VAE {name!r}{f' (subfolder {subfolder})' if subfolder else ''}: {first_line} "
            f"Without network it must already be on disk: download it once with `hf download {name}` where there is "
            "internet "
            "(it lands in the Hugging Face cache), or name a local folder saved with AutoencoderKL.save_pretrained"
        ) from None
    return vae.to(device).eval().requires_grad_(False)


def require_local_folder(name: str, field_name: str) -> None:
    if name.startswith(("/", "./", "../", "~")) and not Path(name).expanduser().is_dir():
        raise ModelLoadError(
            f"{field_name} {name} looks like a local path but is not a folder; fix the path or give a Hugging Face "
            "model name"
        )


def first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


@torch.no_grad()
def decode(vae: torch.nn.Module, latents: torch.Tensor, scaling_factor: float, batch_size: int = 16) -> torch.Tensor:
    """Images (N, 3, H, W) in [-1, 1], float32 on the latents' device, from training-scale latents (N, C, h, w)."""
    dtype = next(vae.parameters()).dtype
    images = [
        vae.decode((chunk / scaling_factor).to(dtype)).sample.float().clamp(-1, 1)  # (B, 3, H, W)
        for chunk in latents.split(batch_size)
    ]
    return torch.cat(images) if images else latents.new_zeros(0, 3, 1, 1)
