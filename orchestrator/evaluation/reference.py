"""The real images an evaluation compares samples with, and their features, computed once and cached.

A reference set is one of:
- the job's training data (digits, or an image folder), at most eval.reference_samples images evenly spread over it,
  centre-cropped to the training resolution as training reads them;
- an image folder named by eval.reference (class sub-folders, or images directly in it);
- a reference batch in the ADM suite's .npz layout (Dhariwal & Nichol 2021): `arr_0`, uint8 (N, H, W, 3), and for
  the published ImageNet batches `mu` and `sigma` of its Inception pool features, which FID then uses as they are
  (so the figure is the one the papers computed against the same statistics).

Features are cached as $ORCH_CACHE/reference/<network>-<key>.npz; the key hashes what the set is made of (file
names, sizes and modification times, the count, the resolution) and the feature network's weights file, so new data,
another resolution or other weights compute them afresh. A cluster's data folders are often read-only, hence a cache
of its own rather than files beside the data.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from orchestrator.data.imagefolder import IMAGE_EXTENSIONS, DataError, scan_image_folder
from orchestrator.errors import UserError
from orchestrator.evaluation.metrics import FeatureStats
from orchestrator.evaluation.weights import default_cache_dir
from orchestrator.specs.job import JobSpec


class ReferenceError(UserError):
    """The reference images an evaluation needs are missing, unreadable or do not fit the job."""


# ---------------------------------------------------------------------------------------------
# The ADM suite's reference batches (torch-free: `orch plan` checks them)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AdmBatch:
    """What an ADM-layout .npz holds, read from its array headers without loading the images."""

    path: Path
    count: int
    side: int
    has_inception_stats: bool


def read_adm_batch(path: Path) -> AdmBatch:
    """The header of an ADM reference batch, or ReferenceError saying what is wrong with the file."""
    from numpy.lib import format as npy_format

    if not path.is_file():
        raise ReferenceError(f"eval.reference {path} does not exist")
    try:
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
            if "arr_0.npy" not in names:
                raise ReferenceError(
                    f"eval.reference {path} has no arr_0 (the images of an ADM reference batch: uint8 N x H x W x 3); "
                    f"it holds {', '.join(sorted(n.removesuffix('.npy') for n in names)) or 'nothing'}"
                )
            with archive.open("arr_0.npy") as member:
                version = npy_format.read_magic(member)
                read_header = (
                    npy_format.read_array_header_1_0 if version == (1, 0) else npy_format.read_array_header_2_0
                )
                shape, _, dtype = read_header(member)
    except (zipfile.BadZipFile, OSError, ValueError) as err:
        raise ReferenceError(f"eval.reference {path} is not a readable .npz file ({err})") from None
    if len(shape) != 4 or shape[3] != 3 or shape[1] != shape[2] or dtype != np.uint8:
        raise ReferenceError(
            f"eval.reference {path}: arr_0 is {dtype} {shape}; an ADM reference batch holds uint8 images N x H x W x 3"
        )
    return AdmBatch(path, shape[0], shape[1], {"mu.npy", "sigma.npy"} <= names)


def reference_problems(spec: JobSpec) -> list[str]:
    """What is wrong with eval.reference for this job, checked before it runs (`orch plan`, `orch submit`)."""
    e = spec.eval
    if e.every is None or e.reference is None:
        return []
    path = Path(e.reference)
    if path.suffix != ".npz":
        if not path.is_dir():
            return [f"eval.reference {path} is neither an ADM .npz reference batch nor a folder of images"]
        return []
    try:
        batch = read_adm_batch(path)
    except ReferenceError as err:
        return [str(err)]
    problems = []
    if batch.side != spec.data.resolution:
        problems.append(
            f"eval.reference {path} holds {batch.side}x{batch.side} images and the job draws "
            f"{spec.data.resolution}x{spec.data.resolution}: use the reference batch of the job's resolution"
        )
    if "precision_recall" in e.metrics and e.num_samples > batch.count:
        problems.append(
            f"eval.metrics precision_recall compares sets of one size, and eval.num_samples {e.num_samples} exceeds "
            f"the {batch.count} images of eval.reference {path}: lower eval.num_samples to {batch.count}"
        )
    return problems


# ---------------------------------------------------------------------------------------------
# Reference sets
# ---------------------------------------------------------------------------------------------


@dataclass
class ReferenceSet:
    """Real images to compare with: how many, a key of what they are, and a reader of some of them."""

    description: str
    key: str
    count: int
    read: Callable[[list[int]], np.ndarray]  # indices -> uint8 images (N, H, W, C)
    inception_stats: FeatureStats | None = None  # an ADM batch's own statistics


def reference_set(spec: JobSpec) -> ReferenceSet:
    """The reference set of a job's evaluation (ReferenceError if it cannot be read)."""
    e, data = spec.eval, spec.data
    if e.reference is not None and Path(e.reference).suffix == ".npz":
        return _adm_set(Path(e.reference), spec)
    if e.reference is not None:
        files = _image_files(Path(e.reference))
        return _files_set(files, spec, f"the images of {e.reference}")
    if data.source == "digits":
        from orchestrator.data.loader import DigitsDataset

        digits = DigitsDataset(data.resolution)
        images = np.clip(np.round((digits.images.numpy() + 1) * 127.5), 0, 255).astype(np.uint8)  # as a PNG holds
        chosen = spread(len(images), e.reference_samples)
        pixels = images[chosen].transpose(0, 2, 3, 1)  # (N, H, W, 1)
        return ReferenceSet(
            description=f"the digits ({len(chosen)} images at {data.resolution} px)",
            key=_digest(["digits", data.resolution, len(chosen)]),
            count=len(chosen),
            read=lambda indices: pixels[indices],
        )
    if data.source == "image_folder":
        files = [path for path, _ in scan_image_folder(Path(data.path)).items]
        return _files_set(files, spec, f"the training data ({data.path})")
    if data.source == "hf_dataset":
        from orchestrator.data.loader import HubImageDataset

        dataset = HubImageDataset(data)
        chosen = spread(len(dataset), e.reference_samples)

        def read(indices: list[int]) -> np.ndarray:
            images = [dataset[(chosen[i], False)][0].numpy().transpose(1, 2, 0) for i in indices]  # (H, W, C)
            return np.clip(np.round((np.stack(images) + 1) * 127.5), 0, 255).astype(np.uint8)  # as decoded

        return ReferenceSet(
            description=f"the training data ({dataset.what}): {len(chosen)} of {len(dataset)} images at "
            f"{data.resolution} px",
            key=_digest(["hf_dataset", dataset.what, dataset.fingerprint, data.resolution, data.crop, len(chosen)]),
            count=len(chosen),
            read=read,
        )
    raise ReferenceError("a webdataset source holds latents: set eval.reference to real images")


def training_crop(spec: JobSpec) -> str:
    """How the training images became squares: the spec's data.crop, or for latents what `orch prepare` recorded."""
    if not spec.data.latent:
        return spec.data.crop
    from orchestrator.data.shards import ShardError, open_shards

    try:
        return open_shards(spec.data.path).index.crop
    except (ShardError, ValueError) as err:
        raise ReferenceError(str(err)) from None


def spread(total: int, count: int) -> list[int]:
    """`count` indices (at most `total`) evenly spread over range(total)."""
    count = min(count, total)
    return [i * total // count for i in range(count)]


def _image_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise ReferenceError(f"eval.reference {folder} is neither an ADM .npz reference batch nor a folder of images")
    try:
        return [path for path, _ in scan_image_folder(folder).items]
    except DataError:  # no class sub-folders: the images lie in the folder itself
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise ReferenceError(f"eval.reference {folder} has no images") from None
        return files


def _files_set(files: list[Path], spec: JobSpec, what: str) -> ReferenceSet:
    from orchestrator.data.loader import square

    resolution, mode = spec.data.resolution, "L" if spec.data.num_channels == 1 else "RGB"
    crop = training_crop(spec)  # the real images are cut as the training images were
    chosen = [files[i] for i in spread(len(files), spec.eval.reference_samples)]

    def read(indices: list[int]) -> np.ndarray:
        from PIL import Image

        images = []
        for i in indices:
            try:
                with Image.open(chosen[i]) as image:
                    image = square(image.convert(mode), resolution, crop)
            except OSError as err:
                raise ReferenceError(f"cannot read reference image {chosen[i]}: {err}") from None
            images.append(np.asarray(image, dtype=np.uint8).reshape(resolution, resolution, -1))
        return np.stack(images)

    stamps = []
    for path in chosen:
        stat = path.stat()
        stamps.append([str(path), stat.st_size, stat.st_mtime_ns])
    return ReferenceSet(
        description=f"{what}: {len(chosen)} of {len(files)} images at {resolution} px",
        key=_digest(["files", resolution, mode, stamps] + ([crop] if crop != "center_crop" else [])),
        count=len(chosen),
        read=read,
    )


def _adm_set(path: Path, spec: JobSpec) -> ReferenceSet:
    problems = reference_problems(spec)
    if problems:
        raise ReferenceError("; ".join(problems))
    batch = read_adm_batch(path)
    with np.load(path) as arrays:
        images = arrays["arr_0"]
        stats = None
        if batch.has_inception_stats:
            try:
                stats = FeatureStats(arrays["mu"].astype(np.float64), arrays["sigma"].astype(np.float64), batch.count)
            except ValueError as err:
                raise ReferenceError(f"eval.reference {path}: {err}") from None
            if stats.mean.shape != (2048,) or stats.cov.shape != (2048, 2048):
                raise ReferenceError(
                    f"eval.reference {path}: mu {stats.mean.shape} and sigma {stats.cov.shape} are not statistics of "
                    "Inception-v3's 2048 pool features"
                )
    stat = path.stat()
    return ReferenceSet(
        description=f"the reference batch {path} ({batch.count} images at {batch.side} px)",
        key=_digest(["adm", str(path.resolve()), stat.st_size, stat.st_mtime_ns]),
        count=batch.count,
        read=lambda indices: images[indices],
        inception_stats=stats,
    )


def _digest(parts: list) -> str:
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:20]


# ---------------------------------------------------------------------------------------------
# The cache of reference features
# ---------------------------------------------------------------------------------------------


def cache_file(reference: ReferenceSet, network_key: str, cache_dir: Path | None = None) -> Path:
    """Where the features of `reference` in the network `network_key` (its name and weights) are cached."""
    folder = (cache_dir or default_cache_dir()) / "reference"
    return folder / f"{network_key.split(':')[0]}-{_digest([reference.key, network_key])}.npz"


def load_cached_features(path: Path) -> np.ndarray | None:
    """Cached reference features (N, D), or None if there are none (or the file is damaged)."""
    try:
        with np.load(path) as arrays:
            return arrays["features"]
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        return None


def save_cached_features(path: Path, features: np.ndarray, description: str) -> None:
    """Write the features atomically (several jobs may compute the same reference at once)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
    np.savez(tmp, features=features.astype(np.float32), description=np.asarray(description))
    os.replace(tmp, path)
