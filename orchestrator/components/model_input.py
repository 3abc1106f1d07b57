"""What the network sees, fixed once the data is known, and kept with every checkpoint.

A spec says which network to build; the data says the rest: the input's channels and side (pixels,
or a VAE's latents), how many classes, the width and length of caption embeddings, and the VAE that
turns latents back into images. The trainer works this out once, writes it into each checkpoint as
`model_input.json`, and sampling and export read it from there, so they need neither the data nor
the encoders it was prepared with (except the VAE, to decode).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from orchestrator.data.shardformat import DatasetIndex
from orchestrator.layout import MODEL_INPUT_FILE
from orchestrator.specs.job import JobSpec


@dataclass(frozen=True)
class LatentSpace:
    vae: str  # name or path of the diffusers AutoencoderKL that encoded the data (and decodes samples)
    scaling_factor: float  # latents were multiplied by this for training; decoding divides by it
    image_channels: int  # the decoded images' channels (3)
    image_resolution: int  # and side, in pixels


@dataclass(frozen=True)
class ModelInput:
    channels: int  # of what the network denoises (pixels or latents)
    size: int  # its side
    num_classes: int  # labels 0..n-1 (the null class is n); 1 when the model is not class-conditional
    text_dim: int | None = None  # width of the caption embeddings (condition: text)
    text_tokens: int | None = None  # most caption tokens
    text_encoder: str | None = None  # the sentence-transformers model that embedded the captions
    latent: LatentSpace | None = None  # None: pixel space

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one network input."""
        return (self.channels, self.size, self.size)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one output image, after decoding latents."""
        if self.latent is None:
            return self.shape
        return (self.latent.image_channels, self.latent.image_resolution, self.latent.image_resolution)

    def write(self, folder: Path) -> Path:
        path = Path(folder) / MODEL_INPUT_FILE
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")
        return path

    @classmethod
    def read(cls, folder: Path) -> ModelInput | None:
        """The record in `folder`, or None where there is none (checkpoints written before it existed)."""
        path = Path(folder) / MODEL_INPUT_FILE
        if not path.is_file():
            return None
        raw = json.loads(path.read_text())
        latent = raw.pop("latent", None)
        return cls(**raw, latent=LatentSpace(**latent) if latent else None)


def classes_to_build(spec: JobSpec, data_classes: int | None) -> int:
    """The number of classes a network is built with: model.num_classes where the spec sets it, else the data's
    (class folders, digits' 10, the shards' labels), else 1 (a model without labels still builds a table)."""
    return spec.model.num_classes or data_classes or 1


def pixel_input(spec: JobSpec, num_classes: int) -> ModelInput:
    """A network on the spec's pixel images."""
    return ModelInput(channels=spec.data.num_channels, size=spec.data.resolution, num_classes=num_classes)


def latent_input(spec: JobSpec, index: DatasetIndex) -> ModelInput:
    """A network on the latents (and captions) of a prepared dataset."""
    channels, height, width = index.latent_shape
    text = spec.model.condition == "text"
    return ModelInput(
        channels=channels,
        size=height,
        num_classes=classes_to_build(spec, index.num_classes),
        text_dim=index.text_dim if text else None,
        text_tokens=index.max_text_tokens if text else None,
        text_encoder=index.text_encoder if text else None,
        latent=LatentSpace(
            vae=index.vae, scaling_factor=index.scaling_factor, image_channels=3, image_resolution=index.resolution
        ),
    )


def latent_problems(spec: JobSpec, index: DatasetIndex) -> list[str]:
    """Why the spec's model cannot train on a prepared dataset (empty if it can); reads nothing but the index."""
    m, problems = spec.model, []
    channels, height, width = index.latent_shape
    if height != width:
        problems.append(f"the latents are {height}x{width}; the models take square inputs")
    if index.resolution != spec.data.resolution:
        problems.append(
            f"data.resolution is {spec.data.resolution} but the shards hold {index.resolution}-px images encoded to "
            f"{height}x{width}; set data.resolution: {index.resolution}"
        )
    if m.arch == "dit" and height % m.patch_size:
        problems.append(f"model.patch_size {m.patch_size} does not divide the latents' side {height}")
    if m.arch == "unet" and height % 2 ** sum(m.unet.down_sample):
        problems.append(
            f"the latents' side {height} cannot be halved {sum(m.unet.down_sample)} times (model.unet.down_sample)"
        )
    if m.condition == "class" and not index.num_classes:
        problems.append(
            "model.condition is class but the shards have no labels; prepare from class sub-folders or a label column, "
            "or use condition: text / none"
        )
    if m.condition == "class" and m.num_classes is not None and index.num_classes and m.num_classes < index.num_classes:
        problems.append(f"model.num_classes is {m.num_classes} but the shards have {index.num_classes} classes")
    if m.condition == "text" and not index.text_dim:
        problems.append(
            "model.condition is text but the shards hold no caption embeddings; prepare with captions (and a text "
            "encoder)"
        )
    if m.condition == "text" and m.arch != "dit":
        problems.append("model.condition: text needs arch: dit (the U-Net takes class labels)")
    return problems
