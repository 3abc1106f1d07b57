"""Sampling from a trained job: find its checkpoint, load the model, draw images, write them out.

The library behind `orch sample JOB_OR_CHECKPOINT`. Everything is read from the checkpoint itself
(its spec.yaml and weights), so it works without the training data on disk.

Determinism. Image i of a call gets its own CPU generator, seeded from (seed, i) only; its initial
noise is the first draw of that generator and, for `ddpm`, every later step's noise comes from the
same generator (diffusers' schedulers take one generator per sample). So image i is a function of
(weights, spec, seed, i, labels[i], sampler, steps, guidance) and nothing else:
- the same seed gives the same images, whatever the batch size, and for every sampler;
- image i does not depend on how many images are drawn or on the other labels (a call with labels
  [3, 5] and one with [3, 7, 1] share their first image);
- it is the same on every device up to the device's float arithmetic (the noise is drawn on the
  CPU), but not the same as the training run's MLflow grids, which draw their noise differently.
"Same" means bitwise on one machine with the same torch and thread count: tested for batch sizes
3 and 64 on CPU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from PIL import Image
from safetensors import SafetensorError, safe_open

import model.diffusion as diffusion_math
from orchestrator.components.device import use_tf32
from orchestrator.components.images import make_grid, to_uint8
from orchestrator.components.model import build_model
from orchestrator.components.model_input import ModelInput, classes_to_build, pixel_input
from orchestrator.components.sampler import SamplerSettings, image_seed, initial_noise
from orchestrator.components.weights import WeightsMismatch, load_weights
from orchestrator.errors import UserError
from orchestrator.jobs.checkpoints import CheckpointNotFound, resolve_checkpoint, weights_file
from orchestrator.specs.job import JobSpec

__all__ = [
    "CheckpointNotFound",
    "SamplingError",
    "WeightsMismatch",
    "default_device",
    "image_seed",
    "initial_noise",
    "load_model",
    "load_weights",
    "num_classes_of",
    "progression_frames",
    "progression_strip",
    "resolve_checkpoint",
    "sample_images",
    "weights_file",
    "write_outputs",
]

LABEL_TABLE = "y_embedder.embedding_table.weight"  # (classes [+ 1 null row], D) in the DiT and the U-Net


class SamplingError(UserError):
    """Sampling settings the model cannot honour (a label out of range, guidance without a null class, ...)."""


def default_device() -> str:
    """ "cuda" when a GPU is visible, else "cpu"."""
    return "cuda" if torch.cuda.is_available() else "cpu"


# ---------------------------------------------------------------------------------------------
# Loading a model (finding its checkpoint: orchestrator.jobs.checkpoints)
# ---------------------------------------------------------------------------------------------


def _num_classes_in(weights: Path, spec: JobSpec) -> int:
    """The number of classes of the weights' label table (its rows, less the null row when there is one)."""
    m = spec.model
    if m.condition == "none":
        return classes_to_build(spec, None)  # the network ignores labels; any positive number builds it
    try:
        with safe_open(str(weights), framework="pt") as handle:
            if LABEL_TABLE not in handle.keys():
                raise WeightsMismatch(
                    f"{weights} has no label table ({LABEL_TABLE}), but its spec says model.condition: class"
                )
            rows = handle.get_slice(LABEL_TABLE).get_shape()[0]
    except SafetensorError as err:
        raise WeightsMismatch(
            f"cannot read {weights} as safetensors ({err}); the file is damaged or not a weights file"
        ) from None
    has_null_row = m.arch == "unet" or m.class_dropout > 0  # the U-Net's table always has one
    num_classes = rows - int(has_null_row)
    if m.num_classes is not None and m.num_classes != num_classes:
        raise WeightsMismatch(
            f"{weights} has a label table of {num_classes} classes; its spec says model.num_classes: {m.num_classes}"
        )
    return num_classes


def model_input_of(spec: JobSpec, checkpoint: Path, ema: bool = True) -> ModelInput:
    """What the network takes: the checkpoint's model_input.json (also read beside a .safetensors file), else
    pixel space with the classes of the weights' label table (checkpoints written before the record existed)."""
    checkpoint = Path(checkpoint)
    recorded = ModelInput.read(checkpoint.parent if checkpoint.is_file() else checkpoint)
    if recorded is not None:
        return recorded
    if spec.data.latent:
        raise CheckpointNotFound(
            f"{checkpoint} has no model_input.json, which a latent-space model needs (its VAE and latent shape)"
        )
    return pixel_input(spec, _num_classes_in(weights_file(checkpoint, ema), spec))


def load_model(
    spec: JobSpec, checkpoint: Path, ema: bool = True, device: str | torch.device | None = None
) -> torch.nn.Module:
    """The network of `spec` with a checkpoint's EMA (or, ema=False, raw) weights, in eval mode, on `device`
    (default: cuda if visible, else cpu). `checkpoint` is a checkpoint directory or a .safetensors file."""
    weights = weights_file(Path(checkpoint), ema)
    with torch.random.fork_rng(devices=[]):  # building draws an init from the global RNG: leave the caller's alone
        model = build_model(spec, model_input_of(spec, checkpoint, ema))
    load_weights(model, weights)
    device = torch.device(device or default_device())
    if device.type == "cuda":
        use_tf32(spec.resources.tf32)  # as the job trained
    return model.to(device).eval()


def num_classes_of(model: torch.nn.Module) -> int:
    """The classes a model draws (labels 0..n-1; n is also its null label); 1 for an unconditional model, whose labels
    are ignored."""
    return getattr(model, "num_classes", None) or 1


def _has_null_class(model: torch.nn.Module, spec: JobSpec) -> bool:
    """Whether the model learnt an unconditional prediction (a null class or caption trained by dropout)."""
    return (
        spec.model.condition in ("class", "text")
        and spec.model.class_dropout > 0
        and getattr(model, "y_embedder", None) is not None
    )


# ---------------------------------------------------------------------------------------------
# Drawing images
# ---------------------------------------------------------------------------------------------


def _settings(
    model: torch.nn.Module,
    spec: JobSpec,
    labels: list[int],
    sampler: str | None,
    steps: int | None,
    guidance: float | None,
    model_input: ModelInput | None,
) -> tuple[SamplerSettings, ModelInput]:
    """The sampler settings (the spec's `sample` section under the given ones), checked against the model
    (SamplingError)."""
    model_input = model_input or pixel_input(spec, num_classes_of(model))
    settings = SamplerSettings.of(spec, model_input, sampler, steps, guidance, null_label=num_classes_of(model))
    samplers = spec.diffusion.samplers
    if settings.sampler not in samplers:
        raise SamplingError(
            f"sampler {settings.sampler} does not sample this model (objective {spec.diffusion.objective}): use "
            f"{', '.join(samplers)}"
        )
    timesteps = spec.diffusion.num_train_timesteps
    if not 1 <= settings.steps <= timesteps:
        raise SamplingError(
            f"steps must be between 1 and the model's diffusion.num_train_timesteps ({timesteps}), got {settings.steps}"
        )
    if settings.guidance_scale != 1 and not _has_null_class(model, spec):
        raise SamplingError(
            f"guidance {settings.guidance_scale} needs a class- or text-conditioned model trained with "
            "model.class_dropout > 0 "
            "(a null class or caption); use guidance 1"
        )
    num_classes = num_classes_of(model)
    if spec.model.condition == "class":
        bad = sorted({label for label in labels if not 0 <= label < num_classes})
        if bad:
            raise SamplingError(
                f"class(es) {', '.join(map(str, bad))} out of range: this model has classes 0..{num_classes - 1}"
            )
    return settings, model_input


_VAES: dict[tuple[str, str], torch.nn.Module] = {}  # (name, device) -> the loaded VAE, kept for the next call


def _to_images(x: torch.Tensor, model_input: ModelInput) -> torch.Tensor:
    """Pixels as they are; latents (N, C, h, w) decoded through the model's VAE to (N, 3, H, W) in [-1, 1]."""
    latent = model_input.latent
    if latent is None:
        return x
    from orchestrator.components.vae import decode, load_vae

    key = (latent.vae, str(x.device))
    if key not in _VAES:
        _VAES[key] = load_vae(latent.vae, x.device)
    return decode(_VAES[key], x, latent.scaling_factor)


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def sample_images(
    model: torch.nn.Module,
    spec: JobSpec,
    labels: list[int],
    sampler: str | None = None,
    steps: int | None = None,
    guidance: float | None = None,
    seed: int = 0,
    batch_size: int = 64,
    progress: Callable[[int, int], None] | None = None,
    device: str | torch.device | None = None,
    model_input: ModelInput | None = None,
    text: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Draw one image per label (or per caption of `text`, from `encode_prompts`), (N, C, H, W) float32 on the CPU in
    [-1, 1], in batches of batch_size.

    sampler, steps and guidance default to the spec's `sample` section. The model runs in eval mode
    (restored after) on `device` (default: where its weights are). progress(done, total) counts
    denoising steps over all batches. model_input (from `model_input_of`; default: the spec's pixel
    images) says what the network denoises: latents are decoded through its VAE. See the module
    docstring for what the seed fixes.
    """
    if batch_size < 1:
        raise SamplingError(f"batch size must be at least 1, got {batch_size}")
    settings, model_input = _settings(model, spec, labels, sampler, steps, guidance, model_input)
    device = torch.device(device) if device is not None else _model_device(model)
    model = model.to(device)
    count = len(labels)
    noise, generators = initial_noise(seed, count, settings.image_shape)  # (N, C, H, W) on the CPU, N generators
    starts = list(range(0, count, batch_size))
    out: list[torch.Tensor] = []
    was_training = model.training
    model.eval()  # label dropout off: samples drawn in train mode are near chance
    try:
        for b, start in enumerate(starts):
            end = min(start + batch_size, count)
            report = (
                None if progress is None else (lambda done, total, b=b: progress(b * total + done, len(starts) * total))
            )
            images = diffusion_math.sample(
                model,
                _condition(labels, text, start, end, device),  # labels (B,) or a text dict of (B, ...)
                noise=noise[start:end],  # (B, C, H, W)
                # One CPU generator per image: DDPM's step noise of image i comes from image i's own stream.
                generator=generators[start:end] if settings.sampler == "ddpm" else None,
                progress=report,
                **settings.reverse_process_args(),
            )  # (B, C, H, W)
            out.append(_to_images(images, model_input).float().cpu())
    finally:
        model.train(was_training)
    if not out:
        return torch.zeros(0, *model_input.image_shape)
    return torch.cat(out)  # (N, C, H, W)


def _condition(
    labels: list[int], text: dict[str, torch.Tensor] | None, start: int, end: int, device
) -> torch.Tensor | dict[str, torch.Tensor]:
    """The model's `y` for images start..end: class labels, or the rows of a text condition."""
    if text is not None:
        return {k: v[start:end].to(device) for k, v in text.items()}
    return torch.tensor(labels[start:end], dtype=torch.long, device=device)  # (B,)


def encode_prompts(model_input: ModelInput, prompts: list[str]) -> dict[str, torch.Tensor]:
    """Text conditions for prompts: embedded by the encoder that embedded the training captions, kept at the
    shards' float16 precision and padded as the trainer pads them: tokens (N, L, D), mask (N, L), pooled (N, D)."""
    if model_input.text_encoder is None or model_input.text_dim is None:
        raise SamplingError("this model is not text-conditioned: use --class (or nothing, for an unconditional model)")
    from orchestrator.components.text import encode_texts, load_text_encoder
    from orchestrator.specs.prepare import TextSpec

    encoder, _, _ = load_text_encoder(
        TextSpec(encoder=model_input.text_encoder, max_tokens=model_input.text_tokens), "cpu"
    )
    n, length, dim = len(prompts), model_input.text_tokens, model_input.text_dim
    text = {
        "tokens": torch.zeros(n, length, dim),
        "mask": torch.zeros(n, length, dtype=torch.bool),
        "pooled": torch.zeros(n, dim),
    }
    for i, (pooled, tokens) in enumerate(encode_texts(encoder, prompts)):  # (D,), (L_i, D) float16
        tokens = torch.from_numpy(tokens[:length].astype("float32"))
        text["tokens"][i, : len(tokens)] = tokens
        text["mask"][i, : len(tokens)] = True
        text["pooled"][i] = torch.from_numpy(pooled.astype("float32"))
    return text


def write_outputs(
    images: torch.Tensor, labels: list[int], out_dir: Path, rows: int, tags: list[str] | None = None
) -> list[Path]:
    """Write one PNG per image (`0000_class3.png`, or `0000_<tag>.png` with tags, at the images' own
    resolution) and `grid.png` (`rows` rows, upscaled); return the paths, grid last. Files of the same
    names are overwritten."""
    tags = tags or [f"class{label}" for label in labels]
    if len(labels) != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {len(labels)} labels")
    if not 1 <= rows <= max(1, len(labels)):
        raise SamplingError(f"the grid needs between 1 and {len(labels)} rows, got {rows}")
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SamplingError(f"cannot create the output folder {out_dir}: {err.strerror}") from None
    pixels = to_uint8(images)  # (N, H, W, C) uint8
    written = []
    for i, (image, tag) in enumerate(zip(pixels, tags)):
        path = out_dir / f"{i:04d}_{tag}.png"
        Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(path)
        written.append(path)
    if len(labels):
        grid = out_dir / "grid.png"
        make_grid(images, rows=rows).save(grid)
        written.append(grid)
    return written


# ---------------------------------------------------------------------------------------------
# Denoising progression
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def progression_frames(
    model: torch.nn.Module,
    spec: JobSpec,
    labels: list[int],
    sampler: str | None = None,
    steps: int | None = None,
    guidance: float | None = None,
    seed: int = 0,
    frames: int = 8,
    device: str | torch.device | None = None,
    model_input: ModelInput | None = None,
    text: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """The x0 prediction of each image at `frames` evenly spaced steps, (N, K, C, H, W) on the CPU in [-1, 1].

    Same seeding as sample_images: frames[:, -1] equals sample_images(...) with the same arguments.
    """
    progression = diffusion_math.sample_progression
    if not labels:
        raise SamplingError("a progression needs at least one label")
    settings, model_input = _settings(model, spec, labels, sampler, steps, guidance, model_input)
    if settings.steps < 2:
        raise SamplingError(f"a progression needs at least 2 sampler steps, got {settings.steps}")
    device = torch.device(device) if device is not None else _model_device(model)
    model = model.to(device)
    noise, generators = initial_noise(seed, len(labels), settings.image_shape)  # (N, C, H, W), N generators
    was_training = model.training
    model.eval()
    try:
        strip = progression(
            model,
            _condition(labels, text, 0, len(labels), device),
            noise=noise,
            generator=generators if settings.sampler == "ddpm" else None,
            num_frames=min(frames, settings.steps),
            **settings.reverse_process_args(),
        )  # (N, K, C, H, W)
    finally:
        model.train(was_training)
    n, k = strip.shape[:2]
    images = _to_images(strip.flatten(0, 1), model_input)  # (N * K, C', H', W'): latents decoded
    return images.unflatten(0, (n, k)).float().cpu()


def progression_strip(model: torch.nn.Module, spec: JobSpec, labels: list[int], **options) -> Image.Image:
    """An image of x0 predictions across the timesteps: one row per label, one column per frame (noise to sample)."""
    # (N, K, C, H, W); options as progression_frames takes them
    strip = progression_frames(model, spec, labels, **options)
    return make_grid(strip.flatten(0, 1), rows=len(labels))  # rows of K frames
