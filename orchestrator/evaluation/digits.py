"""A feature network for the digits demo: a small classifier of scikit-learn's 8x8 digits, trained once on their
labelled images and cached, so the CPU demo can report a sample-quality figure that needs no download.

What MNIST diffusion papers do with LeNet features: the Fréchet distance in the classifier's penultimate layer
(128 features) between generated and real digits, and the classifier's accuracy on class-conditional samples
("is a sample of class k recognised as k?"). The figures mean something for 8x8 digits only; FID proper needs
Inception-v3 on real photographs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from orchestrator.evaluation.weights import default_cache_dir

VERSION = 1  # bump when the network or its training changes: cached weights of another version are not used
SIDE = 8  # the classifier's input side; other resolutions are resized to it
TRAIN_SEED = 0
HELD_OUT_EVERY = 5  # every 5th image is held out to measure the classifier's own accuracy (360 of 1797)


class DigitClassifier(nn.Module):
    """Two 3x3 convolutions, a 2x2 max-pool, 128 features, 10 logits; images (N, 1, 8, 8) in [-1, 1]."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.features_layer = nn.Linear(64 * 4 * 4, 128)
        self.head = nn.Linear(128, 10)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(images))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # (N, 64, 4, 4)
        return F.relu(self.features_layer(x.flatten(1)))  # (N, 128)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))  # (N, 10)


def digits_images() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits as the training data gives them at 8 px: (N, 1, 8, 8) in [-1, 1], labels (N,)."""
    from orchestrator.data.loader import DigitsDataset

    digits = DigitsDataset(SIDE)
    return digits.images, digits.labels


def held_out_mask(count: int) -> torch.Tensor:
    return torch.arange(count) % HELD_OUT_EVERY == 0


def train_digit_classifier(epochs: int = 15) -> tuple[DigitClassifier, float]:
    """The classifier trained from TRAIN_SEED on 4/5 of the digits, and its accuracy on the other fifth."""
    images, labels = digits_images()
    held_out = held_out_mask(len(labels))
    generator = torch.Generator().manual_seed(TRAIN_SEED)
    with torch.random.fork_rng(devices=[]):  # the caller's RNG (a training job's) is left as it was
        torch.manual_seed(TRAIN_SEED)
        model = DigitClassifier()
        optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
        x, y = images[~held_out], labels[~held_out]
        for _ in range(epochs):
            order = torch.randperm(len(y), generator=generator)
            for batch in order.split(64):
                # small shifts and noise, so that imperfect samples are still read as the digit they show
                inputs = x[batch] + 0.1 * torch.randn(x[batch].shape, generator=generator)
                loss = F.cross_entropy(model(inputs.clamp(-1, 1)), y[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
    model.eval().requires_grad_(False)
    with torch.no_grad():
        accuracy = (model(images[held_out]).argmax(1) == labels[held_out]).float().mean().item()
    return model, accuracy


def load_digit_classifier(cache_dir: Path | None = None) -> tuple[DigitClassifier, float]:
    """The cached classifier and its held-out accuracy; trained (a few seconds on a CPU) and cached on first use."""
    from safetensors.torch import load_file, save_file

    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    weights, record = folder / f"digit-classifier-v{VERSION}.safetensors", folder / f"digit-classifier-v{VERSION}.json"
    if weights.is_file() and record.is_file():
        model = DigitClassifier()
        model.load_state_dict(load_file(str(weights)))
        return model.eval().requires_grad_(False), json.loads(record.read_text())["held_out_accuracy"]
    model, accuracy = train_digit_classifier()
    folder.mkdir(parents=True, exist_ok=True)
    tmp = weights.with_name(f".{weights.name}.{os.getpid()}.tmp")
    save_file(model.state_dict(), str(tmp))
    os.replace(tmp, weights)  # several ranks may train it at once: each writes whole files, the last one stays
    record.write_text(json.dumps({"held_out_accuracy": accuracy, "version": VERSION}))
    return model, accuracy


@torch.no_grad()
def digit_features_and_predictions(
    model: DigitClassifier, images: torch.Tensor, batch_size: int = 512
) -> tuple[np.ndarray, np.ndarray]:
    """Features (N, 128) float64 and predicted classes (N,) of grey images (N, 1, H, W) in [-1, 1], resized to 8x8."""
    if images.ndim != 4 or images.shape[1] != 1:
        raise ValueError(f"the digit classifier reads grey images (N, 1, H, W), got {tuple(images.shape)}")
    device = next(model.parameters()).device
    features, predictions = [], []
    for chunk in images.split(batch_size):
        chunk = chunk.to(device, torch.float32).clamp(-1, 1)
        if chunk.shape[-1] != SIDE or chunk.shape[-2] != SIDE:
            chunk = F.interpolate(chunk, size=(SIDE, SIDE), mode="area")
        feats = model.features(chunk)
        features.append(feats.double().cpu())
        predictions.append(model.head(feats).argmax(1).cpu())
    return torch.cat(features).numpy(), torch.cat(predictions).numpy()
