"""The sample grids a job draws while it trains: fixed noise, fixed conditions, so steps are comparable."""

from __future__ import annotations

import logging

import torch
from PIL import Image

from model.diffusion import X0Progression, sample
from orchestrator.components.images import make_grid
from orchestrator.components.model_input import ModelInput
from orchestrator.components.sampler import SamplerSettings
from orchestrator.data.imagefolder import DataError
from orchestrator.specs.job import FINAL_PROGRESSION_FRAMES, JobSpec

log = logging.getLogger(__name__)

UNCONDITIONAL_STRIP_ROWS = 8  # rows of an unconditional model's strip: its grid's first images


class GridMaker:
    """Sample grids from fixed noise and fixed conditions (one row per class or caption), so steps are comparable.

    Latent models: the grid is decoded through the dataset's VAE (loaded on first use, on rank 0 only);
    text models draw the captions of the dataset's first samples, from their stored embeddings.
    """

    def __init__(self, spec: JobSpec, model_input: ModelInput, device: torch.device):
        s = spec.sample
        self.spec, self.model_input, self.device = s, model_input, device
        self.condition_kind = spec.model.condition
        if self.condition_kind == "text":
            # R captions; text dict of (R, ...) tensors
            captions, conditions = first_captions(spec.data.path, count=s.text_rows)
            log.info("grid rows: %s", "; ".join(repr(c) for c in captions))
            self.rows = len(captions)
            self.conditions = {k: v.repeat_interleave(s.per_class, 0).to(device) for k, v in conditions.items()}
            # (N,) unused by a text model
            self.labels = torch.zeros(self.rows * s.per_class, dtype=torch.long, device=device)
        else:
            classes = s.classes if s.classes is not None else list(range(min(10, model_input.num_classes)))
            self.rows = len(classes)
            self.labels = torch.tensor([c for c in classes for _ in range(s.per_class)], device=device)  # (N,)
            self.conditions = self.labels
        if self.condition_kind == "none":  # rows mean nothing: the strip shows the grid's first few images
            self.strip_rows = torch.arange(min(len(self.labels), UNCONDITIONAL_STRIP_ROWS), device=device)  # (R,)
        else:  # the first image of each row
            self.strip_rows = torch.arange(self.rows, device=device) * s.per_class  # (R,)
        generator = torch.Generator().manual_seed(s.seed)
        self.noise = torch.randn((len(self.labels), *model_input.shape), generator=generator).to(device)  # (N, C, H, W)
        self.settings = SamplerSettings.of(spec, model_input)  # spec.sample's sampler, steps and guidance
        self._vae = None
        # now, not at the first grid hours in: a VAE that cannot load stops the job at once
        if model_input.latent is not None:
            from orchestrator.components.vae import load_vae

            self._vae = load_vae(model_input.latent.vae, device)

    def _settings(self) -> dict:
        generator = torch.Generator(device=self.noise.device).manual_seed(self.spec.seed + 1)
        return dict(self.settings.reverse_process_args(), generator=generator)

    def _to_images(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels as they are; latents decoded through the VAE, (N, C, H, W) in [-1, 1]."""
        latent = self.model_input.latent
        if latent is None:
            return x
        from orchestrator.components.vae import decode

        return decode(self._vae, x, latent.scaling_factor)

    def progression_frames(self, final: bool) -> int:
        """Frames of the x0 progression strip drawn with a grid: sample.progression with every grid, else 8 (fewer
        with fewer sampler steps) with the grid at the end of training; 0: no strip."""
        if self.spec.progression:
            return self.spec.progression
        return min(FINAL_PROGRESSION_FRAMES, self.spec.steps) if final and self.spec.steps >= 2 else 0

    @torch.no_grad()
    def draw(self, ema_model: torch.nn.Module, final: bool = False) -> dict[str, Image.Image]:
        """The grid (rows of classes or captions, columns of fixed noise) under `samples`; with a progression (see
        progression_frames) also, under `progression`, the x0 prediction at evenly spaced steps of the same reverse
        process of each row's first image (an unconditional model's first 8 images), one row each. The recording
        only reads: the grid is the same without it."""
        frames = self.progression_frames(final)
        recorder = X0Progression(frames, keep=self.strip_rows) if frames else None
        x = sample(ema_model, self.conditions, noise=self.noise, on_x0=recorder, **self._settings())  # (N, C, H, W)
        grids = {"samples": make_grid(self._to_images(x), rows=self.rows)}
        if recorder is not None:
            strip = recorder.strip(x)  # (R, K, C, H, W)
            grids["progression"] = make_grid(self._to_images(strip.flatten(0, 1)), rows=len(self.strip_rows))
        return grids


def first_captions(path: str, count: int) -> tuple[list[str], dict[str, torch.Tensor]]:
    """The captions and stored text embeddings of the first `count` captioned samples of a prepared dataset."""
    from orchestrator.data.shardformat import CAPTION_MEMBER
    from orchestrator.data.shards import collate, decode_sample, open_shards, read_shard

    shards = open_shards(path)
    captions, samples = [], []
    for url, expected in zip(shards.urls, shards.counts):
        for raw in read_shard(url, expected):
            if CAPTION_MEMBER in raw and len(samples) < count:
                captions.append(raw[CAPTION_MEMBER].decode("utf-8"))
                samples.append(decode_sample(raw, url, shards.index, seed=0, epoch=0))
        if len(samples) == count:
            break
    if not samples:
        raise DataError(f"{path} holds no captioned sample to draw the grid of a text model from")
    batch = collate(samples, shards.index)
    return captions, {"tokens": batch.text_tokens, "mask": batch.text_mask, "pooled": batch.text_pooled}
