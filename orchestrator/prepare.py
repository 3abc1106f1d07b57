"""`orch prepare`: encode images (and captions) once into webdataset shards of VAE latents.

The library behind `orch prepare SPEC`, and a rank entry point: `python -m orchestrator.prepare SPEC`
reads RANK / WORLD_SIZE / LOCAL_RANK (or Slurm's SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID) and does
that rank's share; the ranks never talk to each other. The layout written is orchestrator/data/shardformat.py.

One rank, top to bottom:
  1. scan the inputs into one deterministic list (sorted files, table rows in order, tar members in
     order); shard k is inputs [k*S, (k+1)*S), and rank r owns the shards with k % world_size == r;
  2. load the VAE (and the text encoder when the inputs have captions) and check the resolution: a
     model that cannot be loaded, or a resolution it cannot encode, stops here, before any image;
  3. claim the output folder (prepare.json records what it holds; a different spec or input list is
     refused, so a restart can never mix two preparations);
  4. for every owned shard without its record shard-k.json: read / download and decode images on a
     thread pool while the VAE encodes the previous batch; skip (counted by reason) what cannot be
     used; write shard-k.tar.tmp, fsync, rename, then shard-k.json the same way;
  5. the rank that finds every shard's record present writes index.json: only complete datasets get one.

Resuming is re-running: a shard is done when its record exists, and a killed rank leaves at most one
shard-k.tar.tmp / .json.tmp behind, which the next run of that rank deletes and redoes. Because the
input -> shard map depends only on the input list and shard_size, a restart on any number of ranks
writes every sample exactly once.
"""

from __future__ import annotations

import argparse
import csv
import fcntl
import hashlib
import http.client
import io
import json
import logging
import math
import os
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image, ImageOps
from webdataset.tariterators import base_plus_ext

from orchestrator.components import vae as vae_loader
from orchestrator.components.device import use_tf32
from orchestrator.components.text import encode_texts, load_text_encoder
from orchestrator.components.vae import require_local_folder
from orchestrator.data import hub, shardformat
from orchestrator.data.imagefolder import IMAGE_EXTENSIONS
from orchestrator.data.loader import square
from orchestrator.errors import UserError
from orchestrator.files import fsync_dir, write_atomic
from orchestrator.specs.base import MAX_CLASSES
from orchestrator.specs.prepare import ImageSpec, InputSpec, PrepareSpec, VaeSpec, load_prepare_spec

log = logging.getLogger("orchestrator.prepare")

SKIP_REASONS = ("unreadable", "download_failed", "too_small")
MANIFEST_FILE = "prepare.json"  # what this output folder holds, so a restart with another spec is refused
CAPTIONS_FILE = "captions.jsonl"
WEBDATASET_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # preference order within one sample
USER_AGENT = "orch-prepare/1 (+urllib)"
EXIT_USER_ERROR = 2


class PrepareError(UserError):
    """Inputs, models or an output folder that `orch prepare` cannot use; the message names the fix."""


# ---------------------------------------------------------------------------------------------
# Inputs: one deterministic list that every rank and every restart agrees on
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InputItem:
    source: str
    """What the sample's json records: the path relative to the folder, the URL, or `SHARD.tar:KEY`."""
    location: str | None
    """Where the image bytes are: a file path, a URL, or the .tar holding them (None: the sample has no image)."""
    label: int | None = None
    caption: str | None = None
    span: tuple[int, int] | None = None
    """(offset, size) of the image bytes inside the .tar, for webdataset inputs."""
    data: bytes | None = None
    """The encoded image itself, for rows of a streamed hf_dataset (read once, in order)."""


@dataclass(frozen=True)
class Inputs:
    items: list[InputItem]
    class_names: list[str] | None
    num_classes: int | None
    has_captions: bool
    description: str  # "image_folder:/data/cats", for the index
    rows: object | None = None  # hf_dataset: the datasets.Dataset whose row int(item.location) holds the image
    image_column: str | None = None  # hf_dataset: its column of undecoded images

    def identity(self) -> dict:
        """What a restart must find again: the number of inputs and a hash of the list (sources, labels, captions)."""
        h = hashlib.sha256()
        for item in self.items:
            h.update(f"{item.source}\t{item.label}\t{item.caption}\n".encode())
        return {"num_inputs": len(self.items), "inputs_digest": h.hexdigest()}


def scan_inputs(spec: InputSpec) -> Inputs:
    """The sorted input list of a folder, table or webdataset; PrepareError if it is missing, empty or malformed."""
    path = Path(spec.path)
    if not path.exists() and spec.source != "hf_dataset":  # a hf_dataset path may be a Hub name
        raise PrepareError(f"input.path {path} does not exist")
    scan = {
        "image_folder": _scan_image_folder,
        "table": _scan_table,
        "webdataset": _scan_webdataset,
        "hf_dataset": _scan_hf_dataset,
    }[spec.source]
    inputs = scan(spec, path)
    if not inputs.items:
        raise PrepareError(f"input.path {path} holds no inputs ({spec.source}); point it at the data")
    return inputs


def _scan_image_folder(spec: InputSpec, root: Path) -> Inputs:
    if not root.is_dir():
        raise PrepareError(f"input.path {root} is not a folder (input.source image_folder)")
    files = [
        p.relative_to(root)
        for p in root.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS
        and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    ]
    if not files:
        raise PrepareError(f"input.path {root} has no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    class_names = sorted({rel.parts[0] for rel in files if len(rel.parts) > 1}) if spec.classes else []
    if class_names and any(len(rel.parts) == 1 for rel in files):
        loose = next(rel for rel in files if len(rel.parts) == 1)
        raise PrepareError(
            f"{root} has images both in class sub-folders and directly inside (e.g. {loose}); "
            "move them into class folders, or set input.classes: false for no labels"
        )
    labels = {name: index for index, name in enumerate(class_names)}
    files.sort(key=lambda rel: (labels.get(rel.parts[0], 0) if class_names else 0, rel.as_posix()))
    captions = _folder_captions(root, files)
    items = [
        InputItem(
            source=rel.as_posix(),
            location=str(root / rel),
            label=labels[rel.parts[0]] if class_names else None,
            caption=captions.get(rel.as_posix()),
        )
        for rel in files
    ]
    has_captions = any(item.caption is not None for item in items)
    return Inputs(items, class_names or None, len(class_names) or None, has_captions, f"image_folder:{root}")


def _folder_captions(root: Path, files: list[Path]) -> dict[str, str]:
    """Captions by relative path, from captions.jsonl or a .txt beside each image (empty: no captions)."""
    captions: dict[str, str] = {}
    table = root / CAPTIONS_FILE
    if table.exists():
        for number, line in enumerate(table.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                captions[Path(row["file"]).as_posix()] = str(row["caption"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise PrepareError(
                    f'{table} line {number} is not a JSON object with "file" and "caption"; fix or remove it'
                ) from None
        unknown = set(captions) - {rel.as_posix() for rel in files}
        if unknown:
            log.warning(
                "%s names %d file(s) that are not images in %s (e.g. %s); their captions are unused",
                table,
                len(unknown),
                root,
                min(unknown),
            )
    for rel in files:
        beside = (root / rel).with_suffix(".txt")
        if rel.as_posix() not in captions and beside.is_file():
            captions[rel.as_posix()] = beside.read_text(encoding="utf-8").strip()
    return captions


def _scan_table(spec: InputSpec, path: Path) -> Inputs:
    rows = _read_table(path)
    if not rows:
        raise PrepareError(f"table {path} has no rows")
    columns = list(rows[0])
    if spec.url_column not in columns:
        raise PrepareError(
            f"table {path} has no column {spec.url_column!r} (columns: {', '.join(map(str, columns))}); name the URL "
            "column with input.url_column"
        )
    has_captions = spec.caption_column in columns
    labels, class_names = (
        _table_labels([row.get(spec.label_column) for row in rows], path)
        if spec.label_column in columns
        else ([None] * len(rows), None)
    )
    items = [
        InputItem(
            source=str(row[spec.url_column] or ""),
            location=str(row[spec.url_column] or "") or None,
            label=label,
            caption=_text(row.get(spec.caption_column)) if has_captions else None,
        )
        for row, label in zip(rows, labels)
    ]
    num_classes = len(class_names) if class_names else (max(labels) + 1 if labels[0] is not None else None)
    return Inputs(items, class_names, num_classes, has_captions, f"table:{path}")


def _read_table(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist()
        if suffix == ".csv":
            with open(path, newline="", encoding="utf-8") as handle:
                return list(csv.DictReader(handle))
        rows = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip():
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise PrepareError(f"table {path} line {number} is not a JSON object")
                rows.append(row)
        return rows
    except (OSError, ValueError, UnicodeDecodeError, RecursionError) as err:  # json, pyarrow: ValueErrors
        raise PrepareError(f"cannot read table {path}: {str(err)[:300]}") from None


def _table_labels(values: list, path: Path) -> tuple[list[int], list[str] | None]:
    """Integer labels as they are; names as indices into their sorted list."""
    if any(v is None or v == "" for v in values):
        row = next(i for i, v in enumerate(values) if v is None or v == "")
        raise PrepareError(
            f"table {path} row {row + 1} has no label while others do; give every row one, or drop the column"
        )
    if all(
        isinstance(v, int) and not isinstance(v, bool) or isinstance(v, str) and v.strip().isdigit() for v in values
    ):
        labels = [int(v) for v in values]
        beyond = next((row for row, label in enumerate(labels) if not 0 <= label < MAX_CLASSES), None)
        if beyond is not None:
            raise PrepareError(
                f"table {path} row {beyond + 1} has label {labels[beyond]}; integer labels are class indices 0 to "
                f"{MAX_CLASSES - 1} (or give class names as text)"
            )
        return labels, None
    names = sorted({str(v) for v in values})
    return [names.index(str(v)) for v in values], names


def _text(value) -> str | None:
    """A caption cell; empty cells (None, "", NaN from pandas-written tables) are no caption."""
    if value is None or (isinstance(value, float) and math.isnan(value)) or str(value).strip() == "":
        return None
    return str(value)


def _scan_webdataset(spec: InputSpec, path: Path) -> Inputs:
    tars = [path] if path.is_file() else sorted(path.glob("*.tar"))
    if not tars:
        raise PrepareError(f"input.path {path} has no .tar shards (input.source webdataset)")
    items: list[InputItem] = []
    for tar_path in tars:
        try:
            with tarfile.open(tar_path, "r:") as tar:  # uncompressed only: images are read by byte offset later
                samples: dict[str, dict[str, tarfile.TarInfo]] = {}
                for member in tar:
                    key, ext = base_plus_ext(member.name)  # webdataset's own rule: the key ends at the first dot
                    if member.isfile() and key is not None:
                        samples.setdefault(key, {})[ext.lower()] = member
                for key, members in samples.items():  # insertion order: the order in the tar
                    image = next((members[e] for e in WEBDATASET_IMAGE_EXTENSIONS if e in members), None)
                    label = members.get("cls")
                    caption = members.get("txt")
                    items.append(
                        InputItem(
                            source=f"{tar_path.name}:{key}",
                            location=str(tar_path) if image else None,
                            label=_read_label(tar, label, tar_path, key) if label else None,
                            caption=tar.extractfile(caption).read().decode("utf-8", "replace").strip()
                            if caption
                            else None,
                            span=(image.offset_data, image.size) if image else None,
                        )
                    )
        except tarfile.ReadError as err:
            raise PrepareError(
                f"{tar_path} is not an uncompressed tar ({err}); webdataset inputs are read from plain .tar shards"
            ) from None
    with_labels = sum(item.label is not None for item in items)
    if 0 < with_labels < len(items):
        missing = next(item for item in items if item.label is None)
        raise PrepareError(
            f"sample {missing.source} has no cls while {with_labels} others do; give every sample one, or none"
        )
    has_captions = any(item.caption is not None for item in items)
    num_classes = max(item.label for item in items) + 1 if with_labels else None
    return Inputs(items, None, num_classes, has_captions, f"webdataset:{path}")


def _scan_hf_dataset(spec: InputSpec, path: Path) -> Inputs:
    """Every row of the split, in the dataset's order; images stay in the memory-mapped dataset until a worker reads
    them. (Streaming datasets are not scanned: prepare reads them in order, see _prepare_stream.)"""
    source = hub.source_of(spec)
    data = hub.open_dataset(source)
    columns = hub.columns_of(spec, data.features, f"dataset {source.describe()}")
    labels = list(data[columns.label]) if columns.label else [None] * len(data)
    captions = [_text(c) for c in data[columns.caption]] if columns.caption else [None] * len(data)
    urls = [str(u or "") or None for u in data[columns.url]] if columns.url else None
    items = [
        InputItem(source=str(i), location=urls[i] if urls else str(i), label=label, caption=caption)
        for i, (label, caption) in enumerate(zip(labels, captions))
    ]
    num_classes = len(columns.class_names) if columns.class_names else _max_label(labels)
    return Inputs(
        items,
        columns.class_names,
        num_classes,
        any(c is not None for c in captions),
        f"hf_dataset:{source.describe()}",
        rows=hub.undecoded(data.select_columns([columns.image]), columns.image) if columns.image else None,
        image_column=columns.image,
    )


def _max_label(labels: list) -> int | None:
    known = [label for label in labels if label is not None]
    return max(known) + 1 if known else None


def _read_label(tar: tarfile.TarFile, member: tarfile.TarInfo, tar_path: Path, key: str) -> int:
    text = tar.extractfile(member).read().decode("ascii", "replace").strip()
    try:
        return int(text)
    except ValueError:
        raise PrepareError(f"{tar_path}: {key}.cls is {text!r}, not an integer class") from None


# ---------------------------------------------------------------------------------------------
# One input -> pixels, or a counted skip
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Skip:
    reason: str  # one of SKIP_REASONS
    detail: str


class _Skipped(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.skip = Skip(reason, detail)


def load_pixels(
    item: InputItem, image: ImageSpec, input_spec: InputSpec, rows=None, image_column: str | None = None
) -> np.ndarray | Skip:
    """One input as (H, W, 3) uint8 (ADM centre crop or resize), or why it is skipped. Never raises for bad data."""
    try:
        data = _read_bytes(item, input_spec, rows, image_column)
        try:
            with Image.open(io.BytesIO(data)) as opened:
                opened.load()
                picture = ImageOps.exif_transpose(opened).convert("RGB")  # phone photos keep their rotation in EXIF
        except (
            Exception
        ) as err:  # PIL's decoders raise a zoo of types on corrupt data (OSError, SyntaxError, struct.error, ...)
            raise _Skipped("unreadable", f"{type(err).__name__}: {err}") from None
        if min(picture.size) < image.resolution and not image.upscale_small:
            raise _Skipped(
                "too_small", f"{picture.size[0]}x{picture.size[1]} is below {image.resolution} px on the short side"
            )
        return np.asarray(square(picture, image.resolution, image.crop), dtype=np.uint8)  # (H, W, 3)
    except _Skipped as skipped:
        return skipped.skip


def _read_bytes(item: InputItem, input_spec: InputSpec, rows=None, image_column: str | None = None) -> bytes:
    from_urls = input_spec.source == "table" or (
        input_spec.source == "hf_dataset" and "url_column" in input_spec.model_fields_set
    )
    if item.location is None:
        raise _Skipped("download_failed" if from_urls else "unreadable", "no image (empty URL, cell or image member)")
    if from_urls:
        return _download(item.location, input_spec.download_timeout, input_spec.download_retries)
    try:
        if item.data is not None:
            return item.data
        if rows is not None:
            data = hub.image_bytes(rows[int(item.location)][image_column])
            if data is None:
                raise _Skipped("unreadable", "no image (empty cell)")
            return data
        if item.span is None:
            return Path(item.location).read_bytes()
        offset, size = item.span
        with open(item.location, "rb") as handle:  # a handle per read: threads never share a file position
            return os.pread(handle.fileno(), size, offset)
    except OSError as err:
        raise _Skipped("unreadable", f"{type(err).__name__}: {err}") from None


def _download(url: str, timeout: float, retries: int) -> bytes:
    """The body at url; a retry after transient failures (timeouts, resets, 5xx), none after a 4xx."""
    problem = ""
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(0.5 * attempt)
        try:
            request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.read()
        except urllib.error.HTTPError as err:
            if 400 <= err.code < 500:
                raise _Skipped("download_failed", f"HTTP {err.code} {err.reason}") from None
            problem = f"HTTP {err.code} {err.reason}"
        except ValueError as err:  # not a URL at all: retrying cannot help
            raise _Skipped("download_failed", str(err)) from None
        except (urllib.error.URLError, http.client.HTTPException, OSError) as err:  # timeouts are OSErrors
            problem = f"{type(err).__name__}: {getattr(err, 'reason', err)}"
    raise _Skipped("download_failed", f"{problem} (after {retries + 1} attempt(s))")


# ---------------------------------------------------------------------------------------------
# Encoders: the VAE and the text encoder, loaded and checked before any image is read
# ---------------------------------------------------------------------------------------------


@dataclass
class Encoders:
    vae: torch.nn.Module
    dtype: torch.dtype
    device: str
    latent_shape: list[int]  # (C, h, w) of one latent
    scaling_factor: float
    text: object | None = None  # a SentenceTransformer, when captions are encoded
    text_dim: int | None = None
    max_text_tokens: int | None = None


def resolve_device(choice: str, local_rank: int) -> str:
    """`cuda:LOCAL_RANK` for auto/cuda when a GPU is visible, else cpu; PrepareError for cuda without one."""
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return "cpu"
    if not torch.cuda.is_available():
        raise PrepareError("resources.device is cuda but no GPU is visible to torch; use device: auto or cpu")
    use_tf32(True)  # the encoders' fp32 matmuls and convolutions on TF32 tensor cores
    return f"cuda:{local_rank % torch.cuda.device_count()}"


def load_encoders(spec: PrepareSpec, device: str, captions: bool) -> Encoders:
    """The VAE (and the text encoder when captions are encoded), checked against the spec."""
    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[spec.vae.dtype]
    if dtype == torch.float16 and device == "cpu":
        raise PrepareError("vae.dtype float16 needs a GPU and none is used here; use float32 or bfloat16 on the CPU")
    vae = load_vae(spec.vae, device, dtype)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    resolution = spec.image.resolution
    if resolution % factor:
        raise PrepareError(
            f"image.resolution {resolution} is not a multiple of the VAE's downsampling factor {factor} "
            f"({spec.vae.name} halves {len(vae.config.block_out_channels) - 1} times); use e.g. "
            f"{max(factor, resolution // factor * factor)}"
        )
    encoders = Encoders(
        vae=vae,
        dtype=dtype,
        device=device,
        scaling_factor=float(vae.config.scaling_factor),
        latent_shape=[vae.config.latent_channels, resolution // factor, resolution // factor],
    )
    if captions and spec.text.enabled:
        encoders.text, encoders.text_dim, encoders.max_text_tokens = load_text_encoder(spec.text, device)
    return encoders


def load_vae(vae_spec: VaeSpec, device: str, dtype: torch.dtype) -> torch.nn.Module:
    require_local_folder(vae_spec.name, "vae.name")
    # the one loader training and sampling decode with
    return vae_loader.load_vae(vae_spec.name, device, dtype, subfolder=vae_spec.subfolder)


@torch.inference_mode()
def encode_images(encoders: Encoders, pixels: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N, 2, C, h, w) float16: mean and std of the VAE's latent distribution, unscaled."""
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (N, 3, H, W) in [-1, 1]
    posterior = encoders.vae.encode(x.to(encoders.device, encoders.dtype)).latent_dist
    latents = torch.stack([posterior.mean, posterior.std], dim=1)  # (N, 2, C, h, w)
    return latents.float().cpu().numpy().astype(np.float16)


# ---------------------------------------------------------------------------------------------
# Shards: who writes which, atomically, and the index once all exist
# ---------------------------------------------------------------------------------------------


def shard_ranges(num_inputs: int, shard_size: int) -> list[range]:
    """Input indices of every shard: shard k holds [k*S, (k+1)*S)."""
    return [range(start, min(start + shard_size, num_inputs)) for start in range(0, num_inputs, shard_size)]


def shards_of_rank(num_shards: int, rank: int, world_size: int) -> list[int]:
    return list(range(rank, num_shards, world_size))


def shard_path(out: Path, k: int) -> Path:
    return out / shardformat.SHARD_PATTERN.format(k)


def record_path(out: Path, k: int) -> Path:
    return shard_path(out, k).with_suffix(".json")


def _tmp(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


def claim_output(out: Path, spec: PrepareSpec, identity: dict, rank: int) -> None:
    """Create the output folder, or check that it holds this very preparation (same spec, same inputs: `identity`)."""
    manifest = {"spec": spec.data_fields(), **identity}
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise PrepareError(f"cannot create output.path {out}: {err.strerror}") from None
    path = out / MANIFEST_FILE
    if not path.exists():
        # every rank claims before it writes a shard
        if (out / shardformat.INDEX_FILE).exists() or any(out.glob("shard-*.tar")):
            raise PrepareError(
                f"{out} holds shards that this preparation did not write ({MANIFEST_FILE} is missing); use a new "
                "output.path"
            )
        tmp = out / f".{MANIFEST_FILE}.{rank}.tmp"  # each rank its own temporary: they may all arrive at once
        tmp.write_text(json.dumps(manifest, indent=2) + "\n")
        os.replace(tmp, path)
        return
    found = json.loads(path.read_text())
    if found != manifest:
        before, after = _flat(found.get("spec", {})), _flat(manifest["spec"])
        changes = [
            f"{key}: {before.get(key)!r} -> {after.get(key)!r}"
            for key in sorted(set(before) | set(after))
            if before.get(key) != after.get(key)
        ]
        if {k: v for k, v in found.items() if k != "spec"} != identity:
            changes.append(
                f"the input list ({found.get('num_inputs')} -> {manifest.get('num_inputs')} inputs, or their order, "
                "labels or captions; for a stream: its files or columns)"
            )
        raise PrepareError(
            f"{out} holds a preparation started with other settings ({'; '.join(changes)}); "
            "continue it with the original spec and inputs, or use a new output.path (or delete the folder) to start "
            "over"
        )


def _flat(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        flat.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return flat


def write_index_if_complete(
    out: Path, num_shards: int, spec: PrepareSpec, inputs: Inputs, encoders: Encoders
) -> Path | None:
    """Write index.json when every shard's record exists (else None); any rank may call it, any number of times."""
    with open(out / ".index.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two ranks finishing together would otherwise share index.json.tmp
        records = []
        for k in range(num_shards):
            path = record_path(out, k)
            if not path.exists():
                return None
            records.append(json.loads(path.read_text()))
        for record in records:
            if record["num_samples"] and not (out / record["shard"]).exists():
                raise PrepareError(
                    f"{out / record['shard']} is missing though its record exists; delete "
                    f"{record_path(out, record['index']).name} and run again"
                )
        skipped = Counter()
        for record in records:
            skipped.update(record["skipped"])
        index = shardformat.DatasetIndex(
            num_samples=sum(r["num_samples"] for r in records),
            shards=[  # empty shards are left out
                shardformat.ShardRecord(r["shard"], r["num_samples"], bytes=(out / r["shard"]).stat().st_size)
                for r in records
                if r["num_samples"]
            ],
            latent_shape=encoders.latent_shape,
            latent_dtype="float16",
            scaling_factor=encoders.scaling_factor,
            vae=spec.vae.name,
            resolution=spec.image.resolution,
            source=inputs.description,
            flip=spec.image.flip,
            crop=spec.image.crop,
            num_classes=inputs.num_classes,
            class_names=inputs.class_names,
            text_encoder=spec.text.encoder if encoders.text is not None else None,
            text_dim=encoders.text_dim,
            max_text_tokens=encoders.max_text_tokens,
            skipped={reason: skipped[reason] for reason in SKIP_REASONS if skipped[reason]},
        )
        return index.write(out)


def _write_shard(
    out: Path,
    k: int,
    items: list[tuple[int, InputItem]],
    inputs: Inputs,
    spec: PrepareSpec,
    encoders: Encoders,
    pool: ThreadPoolExecutor,
    advance,
    extra: dict | None = None,
) -> dict:
    """Encode one shard's inputs (index, item) into shard-k.tar (atomically) and its record shard-k.json (with `extra`
    fields); returns the record."""
    batch = spec.resources.batch_size
    chunks = [items[start : start + batch] for start in range(0, len(items), batch)]

    def submit(chunk) -> list[Future]:
        return [
            pool.submit(load_pixels, item, spec.image, spec.input, inputs.rows, inputs.image_column)
            for _, item in chunk
        ]

    skips: list[dict] = []
    num_samples = 0
    tar_path = shard_path(out, k)
    with open(_tmp(tar_path), "wb") as handle:
        writer = wds.TarWriter(handle, mtime=0)  # a fixed mtime: two runs' shards differ only where their contents do
        pending: list[Future] = submit(chunks[0]) if chunks else []
        for c, chunk in enumerate(chunks):
            loaded = [future.result() for future in pending]
            pending = submit(chunks[c + 1]) if c + 1 < len(chunks) else []  # read the next batch while this one encodes
            kept = []
            for (i, item), result in zip(chunk, loaded):
                if isinstance(result, Skip):
                    skips.append({"input": i, "source": item.source, "reason": result.reason, "detail": result.detail})
                else:
                    kept.append((i, item, result))
            if kept:
                num_samples += _encode_and_write(writer, kept, spec, encoders)
            advance(len(chunk))
        writer.close()  # ends the tar; the handle is ours to flush and close
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(_tmp(tar_path), tar_path)
    fsync_dir(out)
    record = {
        "shard": tar_path.name,
        "index": k,
        "inputs": [items[0][0], items[-1][0] + 1] if items else [0, 0],
        "num_samples": num_samples,
        "skipped": dict(Counter(s["reason"] for s in skips)),
        "skips": skips,
        **(extra or {}),
    }
    write_atomic(record_path(out, k), json.dumps(record, indent=2) + "\n", tmp=_tmp(record_path(out, k)))
    return record


def _encode_and_write(
    writer: wds.TarWriter, kept: list[tuple[int, InputItem, np.ndarray]], spec: PrepareSpec, encoders: Encoders
) -> int:
    pixels = np.stack([p for _, _, p in kept])  # (N, H, W, 3)
    flip = spec.image.flip
    if flip:
        pixels = np.concatenate([pixels, pixels[:, :, ::-1]])  # (2N, H, W, 3): the flipped copies follow
    latents = encode_images(encoders, np.ascontiguousarray(pixels))  # (N or 2N, 2, C, h, w)
    captioned = [item.caption for _, item, _ in kept if item.caption is not None]
    embeddings = iter(encode_texts(encoders.text, captioned) if encoders.text is not None and captioned else [])
    written = 0
    for j, (i, item, _) in enumerate(kept):
        text = next(embeddings) if encoders.text is not None and item.caption is not None else None  # (D,), (L, D)
        for flipped in (False, True) if flip else (False,):
            sample = {
                "__key__": f"{i:09d}-flip" if flipped else f"{i:09d}",
                shardformat.LATENT_MEMBER: latents[j + len(kept) if flipped else j],
                shardformat.INFO_MEMBER: {"source": item.source, "flipped": flipped},
            }
            if item.label is not None:
                sample[shardformat.LABEL_MEMBER] = item.label
            if item.caption is not None:
                sample[shardformat.CAPTION_MEMBER] = item.caption
            if text is not None:
                sample[shardformat.TEXT_POOLED_MEMBER], sample[shardformat.TEXT_TOKENS_MEMBER] = text
            writer.write(sample)
            written += 1
    return written


# ---------------------------------------------------------------------------------------------
# The run of one rank
# ---------------------------------------------------------------------------------------------


@dataclass
class PrepareResult:
    shards_written: list[int] = field(default_factory=list)  # shards this call encoded
    shards_done_before: list[int] = field(default_factory=list)  # this rank's shards a previous run had finished
    samples: int = 0  # samples written by this call
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> inputs skipped by this call
    device: str = "cpu"
    seconds: float = 0.0
    index: Path | None = None  # index.json, when this call completed the dataset


def prepare(
    spec: PrepareSpec, rank: int = 0, world_size: int = 1, local_rank: int = 0, progress: bool = False
) -> PrepareResult:
    """Encode this rank's unfinished shards; write index.json if that completes the dataset."""
    if not 0 <= rank < world_size:
        raise PrepareError(f"RANK {rank} is not in 0..{world_size - 1} (WORLD_SIZE {world_size})")
    started = time.perf_counter()
    out = Path(spec.output.path)
    if spec.input.streaming:
        return _prepare_stream(spec, out, resolve_device(spec.resources.device, local_rank), started, progress)
    inputs = scan_inputs(spec.input)
    device = resolve_device(spec.resources.device, local_rank)
    encoders = load_encoders(spec, device, captions=inputs.has_captions)
    claim_output(out, spec, inputs.identity(), rank)

    ranges = shard_ranges(len(inputs.items), spec.output.shard_size)
    mine = shards_of_rank(len(ranges), rank, world_size)
    for k in mine:  # what a killed run of this rank left half-written; other ranks' files are theirs
        for leftover in (_tmp(shard_path(out, k)), _tmp(record_path(out, k))):
            leftover.unlink(missing_ok=True)
    result = PrepareResult(device=device, shards_done_before=[k for k in mine if record_path(out, k).exists()])
    todo = [k for k in mine if k not in result.shards_done_before]
    log.info(
        "rank %d/%d: %d inputs in %d shards; %d of mine to do (%d done before) on %s",
        rank,
        world_size,
        len(inputs.items),
        len(ranges),
        len(todo),
        len(result.shards_done_before),
        device,
    )

    skipped = Counter()
    bar = _progress_bar() if progress else nullcontext()
    with bar, ThreadPoolExecutor(spec.resources.workers, thread_name_prefix="prepare-read") as pool:
        task = bar.add_task(f"rank {rank}/{world_size}", total=sum(len(ranges[k]) for k in todo)) if progress else None
        advance = (lambda n: bar.advance(task, n)) if progress else (lambda n: None)
        for k in todo:
            items = [(i, inputs.items[i]) for i in ranges[k]]
            record = _write_shard(out, k, items, inputs, spec, encoders, pool, advance)
            result.shards_written.append(k)
            result.samples += record["num_samples"]
            skipped.update(record["skipped"])
            log.debug("shard %d: %d samples, skipped %s", k, record["num_samples"], record["skipped"] or "none")
    result.skipped = dict(skipped)
    result.index = write_index_if_complete(out, len(ranges), spec, inputs, encoders)
    result.seconds = time.perf_counter() - started
    return result


def _prepare_stream(spec: PrepareSpec, out: Path, device: str, started: float, progress: bool) -> PrepareResult:
    """A streamed hf_dataset, on one process: shard k is rows [k*S, (k+1)*S) of the stream, as for a list.

    The stream cannot be listed up front, so each shard's record keeps the stream's position after it
    (datasets' IterableDataset.state_dict: the source file and the row within it) and whether it was the
    last. A restart loads the position of the last finished shard and reads on from there: no row is
    read past, none twice into the output (the half-written shard a kill left is redone from its start).
    Chosen over re-reading and skipping the finished rows, which costs as much reading as the work done.
    """
    source = hub.source_of(spec.input)
    stream = hub.open_dataset(source, streaming=True)
    columns = hub.columns_of(spec.input, stream.features, f"dataset {source.describe()}")
    encoders = load_encoders(spec, device, captions=columns.caption is not None)
    identity = {"stream": f"hf_dataset:{source.describe()}", "columns": repr(columns), "n_shards": stream.n_shards}
    claim_output(out, spec, identity, rank=0)
    size = spec.output.shard_size
    for k in range(10**9):  # what a killed run left half-written
        _tmp(shard_path(out, k)).unlink(missing_ok=True)
        _tmp(record_path(out, k)).unlink(missing_ok=True)
        if not record_path(out, k).exists():
            break
    records = []
    while record_path(out, len(records)).exists():
        records.append(json.loads(record_path(out, len(records)).read_text()))
    result = PrepareResult(device=device, shards_done_before=list(range(len(records))))
    rows = hub.undecoded(stream, columns.image)
    if records:
        rows.load_state_dict(records[-1]["stream_state"])
    log.info(
        "streaming %s: %d shard(s) done before; reading on from row %d",
        source.describe(),
        len(records),
        records[-1]["inputs"][1] if records else 0,
    )

    def item(n: int, row: dict) -> InputItem:
        url = str(row[columns.url] or "") or None if columns.url else None
        data = hub.image_bytes(row[columns.image]) if columns.image else None
        return InputItem(
            source=str(n),
            location=url if columns.url else ("stream" if data is not None else None),
            label=row[columns.label] if columns.label else None,
            caption=_text(row[columns.caption]) if columns.caption else None,
            data=data,
        )

    skipped = Counter()
    finished = bool(records) and records[-1]["last"]
    inputs = Inputs([], columns.class_names, None, columns.caption is not None, f"hf_dataset:{source.describe()}")
    bar = _progress_bar() if progress else nullcontext()
    with bar, ThreadPoolExecutor(spec.resources.workers, thread_name_prefix="prepare-read") as pool:
        task = bar.add_task("stream", total=None) if progress else None
        advance = (lambda n: bar.advance(task, n)) if progress else (lambda n: None)
        iterator = iter(rows)
        peeked = []
        first = records[-1]["inputs"][1] if records else 0
        while not finished:
            chunk = peeked + list(islice(iterator, size - len(peeked)))
            state = rows.state_dict()  # the position after this shard's rows, before the look-ahead row
            peeked = list(islice(iterator, 1))
            finished = not peeked
            if not chunk and records:  # the stream ended exactly after the last recorded shard
                raise PrepareError(f"{out}: the stream has no rows after shard {len(records) - 1}, which was not last")
            if not chunk:
                raise PrepareError(f"input dataset {source.describe()} has no rows")
            items = [(first + j, item(first + j, row)) for j, row in enumerate(chunk)]
            labels = [it.label for _, it in items if it.label is not None]
            extra = {"stream_state": state, "last": finished, "max_label": max(labels) if labels else None}
            record = _write_shard(out, len(records), items, inputs, spec, encoders, pool, advance, extra)
            records.append(record)
            result.shards_written.append(record["index"])
            result.samples += record["num_samples"]
            skipped.update(record["skipped"])
            first += len(chunk)
    labels = [r["max_label"] for r in records if r.get("max_label") is not None]
    num_classes = len(columns.class_names) if columns.class_names else (max(labels) + 1 if labels else None)
    inputs = Inputs([], columns.class_names, num_classes, inputs.has_captions, inputs.description)
    result.skipped = dict(skipped)
    result.index = write_index_if_complete(out, len(records), spec, inputs, encoders)
    result.seconds = time.perf_counter() - started
    return result


def _progress_bar():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("inputs"), TimeRemainingColumn()
    )


def rank_from_environment() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's variables, else Slurm's, else a single rank."""
    env = os.environ
    rank = int(env.get("RANK", env.get("SLURM_PROCID", "0")))
    world_size = int(env.get("WORLD_SIZE", env.get("SLURM_NTASKS", "1")))
    local_rank = int(env.get("LOCAL_RANK", env.get("SLURM_LOCALID", "0")))
    return rank, world_size, local_rank


def run_local(spec_file: str | Path, overrides: list[str] | tuple[str, ...] = (), processes: int = 1) -> int:
    """What `orch prepare` runs: one rank in this process, or `processes` rank processes on this machine; the exit
    code."""
    if processes == 1:
        return main([str(spec_file), *[f"--set={o}" for o in overrides]])
    command = [sys.executable, "-m", "orchestrator.prepare", str(spec_file), *[f"--set={o}" for o in overrides]]
    # Ranks sharing the CPU cores each get their share of threads: oversubscribed, they run many times slower.
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, len(os.sched_getaffinity(0)) // processes))
    ranks = [
        subprocess.Popen(
            command,
            env={
                **os.environ,
                "RANK": str(r),
                "WORLD_SIZE": str(processes),
                "LOCAL_RANK": str(r),
                "OMP_NUM_THREADS": threads,
            },
        )
        for r in range(processes)
    ]
    try:
        codes = [p.wait() for p in ranks]
    except KeyboardInterrupt:  # Ctrl-C reaches the ranks too; wait so none is left behind
        codes = [p.wait() for p in ranks]
    return next((code for code in codes if code), 0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m orchestrator.prepare",
        description="Encode images (and captions) into latent shards; one rank of `orch prepare`.",
    )
    parser.add_argument("spec", help="the prepare spec (YAML, kind: prepare)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY.PATH=VALUE",
        help="override a spec field (repeatable)",
    )
    args = parser.parse_args(argv)
    rank, world_size, local_rank = rank_from_environment()
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format=f"%(asctime)s [prepare rank {rank}] %(levelname)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        spec = load_prepare_spec(args.spec, args.overrides)
        if spec.resources.threads:
            torch.set_num_threads(spec.resources.threads)
        result = prepare(spec, rank, world_size, local_rank, progress=rank == 0)
    except UserError as err:
        print(f"orch prepare: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    skipped = ", ".join(f"{reason} {n}" for reason, n in result.skipped.items()) or "none"
    log.info(
        "rank %d/%d: %d shard(s) written (%d done before), %d samples, skipped: %s, %.1f s on %s%s",
        rank,
        world_size,
        len(result.shards_written),
        len(result.shards_done_before),
        result.samples,
        skipped,
        result.seconds,
        result.device,
        f"; dataset complete: {result.index}"
        if result.index
        else "; index.json follows once every rank's shards are done (the last rank writes it)",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
