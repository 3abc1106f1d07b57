"""How a model is sampled, as one typed value: the sampler, its steps and guidance, and what they run on.

Training's sample grids and `orch sample` (and the coming evaluation) build it once, from the spec's `sample`
section with any caller's choices over it, and hand it to model.diffusion's `sample` / `sample_progression`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from orchestrator.components.model import make_diffusion
from orchestrator.components.model_input import ModelInput
from orchestrator.specs.job import JobSpec


@dataclass(frozen=True)
class SamplerSettings:
    sampler: str  # ddpm, ddim or dpm_solver++ (model.diffusion.SAMPLERS)
    steps: int  # denoising steps
    guidance_scale: float  # classifier-free guidance; 1 is none
    null_label: int  # the label of the null class (the number of classes), used when guidance_scale != 1
    image_shape: tuple[int, int, int]  # (C, H, W) of what the network denoises: pixels or latents
    clip_denoised: bool  # pixel space: every x0 estimate is clipped to [-1, 1]; latents are not bounded
    noise_scheduler: Any  # the spec's forward process (a diffusers DDPMScheduler)

    @classmethod
    def of(
        cls,
        spec: JobSpec,
        model_input: ModelInput,
        sampler: str | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        null_label: int | None = None,
    ) -> SamplerSettings:
        """spec.sample's settings, with the given ones (not None) over them, for a network on model_input (whose
        number of classes is the null label unless the loaded network says otherwise)."""
        s = spec.sample
        return cls(
            sampler=sampler or s.sampler,
            steps=s.steps if steps is None else steps,
            guidance_scale=s.guidance_scale if guidance is None else guidance,
            null_label=model_input.num_classes if null_label is None else null_label,
            image_shape=model_input.shape,
            clip_denoised=model_input.latent is None,
            noise_scheduler=make_diffusion(spec),
        )

    def reverse_process_args(self) -> dict[str, Any]:
        """The keyword arguments of model.diffusion.sample and sample_progression these settings fill."""
        return dict(
            sampler=self.sampler,
            num_steps=self.steps,
            guidance_scale=self.guidance_scale,
            null_label=self.null_label,
            image_shape=self.image_shape,
            clip_denoised=self.clip_denoised,
            noise_scheduler=self.noise_scheduler,
        )


def image_seed(seed: int, index: int) -> int:
    """The seed of image `index` of a call with `seed`: independent of the batch size and of the other images."""
    digest = hashlib.blake2b(f"orch-sample:{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def initial_noise(
    seed: int, count: int, image_shape: tuple[int, int, int]
) -> tuple[torch.Tensor, list[torch.Generator]]:
    """The initial noise (count, C, H, W) of images 0..count-1 of a call with `seed` (on the CPU), and each
    image's generator after that draw (where DDPM's step noise continues)."""
    return indexed_noise(seed, range(count), image_shape)


def indexed_noise(
    seed: int, indices: Sequence[int], image_shape: tuple[int, int, int]
) -> tuple[torch.Tensor, list[torch.Generator]]:
    """initial_noise of the images `indices` only (a rank's share of an evaluation: the same noise on any number of
    ranks)."""
    generators = [torch.Generator().manual_seed(image_seed(seed, i)) for i in indices]
    noise = [torch.randn(image_shape, generator=g) for g in generators]  # count x (C, H, W)
    return (torch.stack(noise) if noise else torch.zeros(0, *image_shape)), generators
