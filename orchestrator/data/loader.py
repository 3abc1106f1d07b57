"""Training data: the sources, and a batch stream whose position can be saved and resumed exactly.

The stream does not rely on any global RNG: the order of epoch e is a permutation seeded by
(seed, e), split across ranks, so a resume at (epoch, batch) continues with the very batch the
interrupted run would have drawn next — also across epoch boundaries, which skipping batches of a
fresh loader gets wrong (accelerate#2016). Horizontal flips are decided per (seed, epoch, sample)
for the same reason, so they are identical with any number of DataLoader workers.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from orchestrator.data.bad_samples import BadSample, replace_bad
from orchestrator.data.imagefolder import DataError, scan_image_folder
from orchestrator.specs.job import DataSpec


@dataclass(frozen=True)
class DataPosition:
    """The next batch to train on: its epoch and its index within the epoch."""

    epoch: int = 0
    batch: int = 0


# ---------------------------------------------------------------------------------------------
# Sources: map (index, flip) -> (image in [-1, 1] of shape (C, H, W), label)
# ---------------------------------------------------------------------------------------------


class DigitsDataset(Dataset):
    """scikit-learn's 8x8 handwritten digits (grey, 10 classes), resized to the resolution."""

    def __init__(self, resolution: int):
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = torch.from_numpy(digits.images).float().unsqueeze(1) / 16.0  # (N, 1, 8, 8) in [0, 1]
        if resolution != 8:
            images = F.interpolate(
                images, size=(resolution, resolution), mode="bilinear", antialias=True, align_corners=False
            )
        self.images = images.clamp(0, 1) * 2 - 1  # (N, 1, R, R) in [-1, 1]
        self.labels = torch.from_numpy(digits.target).long()
        self.classes = tuple(str(d) for d in range(10))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key: tuple[int, bool]) -> tuple[torch.Tensor, torch.Tensor]:
        index, flip = key
        image = self.images[index]
        return (image.flip(-1) if flip else image), self.labels[index]


class ImageDataset(Dataset):
    """Images read (and decoded) per sample while training: one that cannot be read fails the job, or with
    data.on_bad_sample skip becomes a BadSample that collate_images replaces in its batch."""

    skip_bad: bool = False

    def unreadable(self, reason: str) -> BadSample:
        if not self.skip_bad:
            raise DataError(reason)
        return BadSample(reason)


def collate_images(samples: list) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]:
    """(images (B, C, H, W), labels (B,), reasons of the samples replaced) of one micro batch."""
    samples, replaced = replace_bad(samples)
    return torch.stack([image for image, _ in samples]), torch.stack([label for _, label in samples]), replaced


class ImageFolderDataset(ImageDataset):
    """One sub-folder of images per class; ADM-style centre crop to the resolution."""

    def __init__(self, root: Path, resolution: int, channels: int, crop: str = "center_crop"):
        index = scan_image_folder(root)
        self.items = index.items
        self.classes = index.classes
        self.resolution, self.crop = resolution, crop
        self.mode = "L" if channels == 1 else "RGB"

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: tuple[int, bool]) -> tuple[torch.Tensor, torch.Tensor]:
        index, flip = key
        path, label = self.items[index]
        try:
            with Image.open(path) as image:
                image = square(image.convert(self.mode), self.resolution, self.crop)
        except OSError as err:
            return self.unreadable(f"cannot read image {path}: {err}")
        return _to_tensor(image, self.resolution, flip), torch.tensor(label)


def center_crop(image: Image.Image, resolution: int) -> Image.Image:
    """Centre crop of guided-diffusion (ADM): halve with a box filter while large, bicubic to size, crop."""
    while min(image.size) >= 2 * resolution:
        image = image.resize(tuple(side // 2 for side in image.size), resample=Image.BOX)
    scale = resolution / min(image.size)
    image = image.resize(tuple(round(side * scale) for side in image.size), resample=Image.BICUBIC)
    left = (image.size[0] - resolution) // 2
    top = (image.size[1] - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution))


def square(image: Image.Image, resolution: int, crop: str = "center_crop") -> Image.Image:
    """The image as resolution x resolution: ADM's centre crop, or `resize`, the whole image stretched to the square
    (bilinear with PIL's antialiasing, what torchvision's Resize((R, R)) does to a PIL image)."""
    if crop == "resize":
        return image.resize((resolution, resolution), resample=Image.BILINEAR)
    return center_crop(image, resolution)


class HubImageDataset(ImageDataset):
    """The images (and class labels) of a Hugging Face `datasets` split, read by index from its memory-mapped cache."""

    def __init__(self, data: DataSpec):
        from orchestrator.data import hub

        columns = hub.check(data)
        rows = hub.open_dataset(hub.source_of(data))
        self.images = hub.undecoded(rows.select_columns([columns.image]), columns.image)
        self.image_column = columns.image
        self.labels = list(rows[columns.label]) if columns.label else [0] * len(rows)
        self.classes = tuple(columns.class_names or (str(c) for c in range(max(self.labels) + 1)))
        self.resolution, self.crop = data.resolution, data.crop
        self.mode = "L" if data.num_channels == 1 else "RGB"
        self.what = f"dataset {hub.source_of(data).describe()}"
        self.fingerprint = getattr(rows, "_fingerprint", None)  # datasets' hash of the content and its transforms

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key: tuple[int, bool]) -> tuple[torch.Tensor, torch.Tensor]:
        from orchestrator.data import hub

        index, flip = key
        try:
            with Image.open(io.BytesIO(hub.image_bytes(self.images[index][self.image_column]) or b"")) as image:
                image = square(image.convert(self.mode), self.resolution, self.crop)
        except Exception as err:  # PIL raises many types for corrupt data; a training sample must not be guessed
            return self.unreadable(
                f"row {index} of {self.what} is not a readable image ({type(err).__name__}: {err}); fix or drop it "
                "(`orch prepare` skips and counts such rows)"
            )
        return _to_tensor(image, self.resolution, flip), torch.tensor(self.labels[index])


def _to_tensor(image: Image.Image, resolution: int, flip: bool) -> torch.Tensor:
    """A PIL image -> (C, H, W) in [-1, 1], mirrored on request."""
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0  # (H, W) or (H, W, 3) in [-1, 1]
    tensor = torch.from_numpy(array).reshape(resolution, resolution, -1).permute(2, 0, 1)  # (C, H, W)
    return (tensor.flip(-1) if flip else tensor).contiguous()


def build_dataset(data: DataSpec) -> DigitsDataset | ImageFolderDataset | HubImageDataset:
    if data.source == "digits":
        return DigitsDataset(data.resolution)
    if data.source == "hf_dataset":
        dataset = HubImageDataset(data)
    else:
        dataset = ImageFolderDataset(Path(data.path), data.resolution, data.num_channels, data.crop)
    dataset.skip_bad = data.on_bad_sample == "skip"
    return dataset


# ---------------------------------------------------------------------------------------------
# The resumable stream
# ---------------------------------------------------------------------------------------------


class EpochBatches:
    """Endless batches of (index, flip) keys for one rank, starting at a DataPosition.

    Written here rather than taken from torch's DistributedSampler because that sampler can only
    start at the beginning of an epoch.
    """

    def __init__(
        self,
        num_samples: int,
        micro_batch: int,
        rank: int,
        world_size: int,
        seed: int,
        hflip: bool,
        start: DataPosition,
    ):
        self.num_samples = num_samples
        self.micro_batch = micro_batch
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.hflip = hflip
        self.start = start
        self.batches_per_epoch = num_samples // (micro_batch * world_size)
        if self.batches_per_epoch == 0:
            raise DataError(
                f"the dataset has {num_samples} images, fewer than one global batch "
                f"({micro_batch} x {world_size} ranks); lower train.global_batch_size or add data"
            )

    def epoch_keys(self, epoch: int) -> list[list[tuple[int, bool]]]:
        """The batches of this rank in one epoch."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(self.num_samples, generator=generator)
        flips = (
            torch.rand(self.num_samples, generator=generator) < 0.5
            if self.hflip
            else torch.zeros(self.num_samples, dtype=torch.bool)
        )
        used = self.batches_per_epoch * self.micro_batch * self.world_size
        mine = order[:used][self.rank :: self.world_size]  # rank-strided, as DistributedSampler does
        keys = [(int(i), bool(flips[i])) for i in mine]
        return [keys[b * self.micro_batch : (b + 1) * self.micro_batch] for b in range(self.batches_per_epoch)]

    def __iter__(self):
        epoch, batch = self.start.epoch, self.start.batch
        while True:
            for keys in self.epoch_keys(epoch)[batch:]:
                yield keys
            epoch, batch = epoch + 1, 0

    def advance(self, position: DataPosition) -> DataPosition:
        """The position after consuming the batch at `position`."""
        if position.batch + 1 < self.batches_per_epoch:
            return DataPosition(position.epoch, position.batch + 1)
        return DataPosition(position.epoch + 1, 0)


class BatchStream:
    """Iterator of (images, labels) micro batches that knows the position of the next one; `replaced` collects the
    reasons of the unreadable samples replaced since the trainer last took them (data.on_bad_sample skip)."""

    def __init__(self, dataset: Dataset, batches: EpochBatches, num_workers: int, seed: int, pin_memory: bool = False):
        self.batches = batches
        self.position = batches.start
        self.replaced: list[str] = []
        loader = DataLoader(
            dataset,
            batch_sampler=batches,
            collate_fn=collate_images,
            num_workers=num_workers,
            pin_memory=pin_memory,
            persistent_workers=num_workers > 0,
            generator=torch.Generator().manual_seed(seed),  # keeps loader start-up off the global RNG
        )
        self._iterator = iter(loader)

    def close(self) -> None:
        """Stop the DataLoader workers now (dropping the iterator shuts them down)."""
        self._iterator = None

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels, replaced = next(self._iterator)
        self.replaced.extend(replaced)
        self.position = self.batches.advance(self.position)
        return images, labels
