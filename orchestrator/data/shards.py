"""Training batches streamed from prepared latent shards (`orch prepare`), resumable at any micro batch.

The determinism contract. The micro batches of rank r are a pure function of

    (shard list, their sample counts in index.json, seed, epoch, rank, world_size, num_workers,
     micro_batch, shuffle_buffer)

and of nothing else: no global RNG, no process timing, no pid. A stream started at DataPosition(e, b)
therefore yields exactly the batches an uninterrupted stream yields from there (same samples, same
order, same noise). Change any input above (resume on another world size, other data.num_workers, a
re-prepared dataset) and the order is a different, still valid, one.

How epoch e is laid out; all of it is computed from index.json alone, alike in every process:
1. The shards are permuted by (seed, e) and dealt to the ranks (rank r takes every world_size-th, as
   webdataset's split_by_node does), then within a rank to its DataLoader workers (every
   num_workers-th, as split_by_worker; num_workers 0 is one worker inside the training process).
2. A worker reads its shards in that order through a shuffle buffer of `shuffle_buffer` samples, its
   RNG seeded by (seed, e, rank, worker), and cuts the result into micro batches; it drops its last
   partial batch.
3. The rank's batches are its workers' batches taken round robin (worker 0's first, worker 1's
   first, ..., worker 0's second, ...; a worker that has run out is passed over). Each batch carries
   its (epoch, worker, index); the training process puts what the DataLoader returns into this order
   (which holds back at most num_workers - 1 batches, after a resume inside an epoch) and checks it.
4. Every rank must step together (DDP hangs on a batch one rank lacks), so each rank takes only the
   first `min over ranks` batches of the epoch; a rank that could fill more drops them (logged).
5. A sample's latent is (mean + std * noise) * scaling_factor with noise from a generator seeded by
   (seed, e, sample key): the same on any rank, worker or resume, and new in every epoch.

The cost of starting at DataPosition(e, b): no latent is decoded for the skipped batches. The worker
replays its shuffle on (shard, index) pairs made from the counts (pure Python, about a microsecond a
sample), opens only the shards that still hold a sample of the batches to come, and passes over the
other samples in those shards (tar bytes read, not decoded): typically about `shuffle_buffer` plus one
shard's samples per worker are read in vain (more, rarely, when a sample lingered in the buffer).

Everything torch, numpy or webdataset is imported inside the functions that need it, so that the
planner can call `check_dataset` (which reads index.json only) without importing torch.
"""

from __future__ import annotations

import hashlib
import logging
import random
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.data.bad_samples import BadSample, replace_bad
from orchestrator.data.imagefolder import DataError
from orchestrator.data.shardformat import (
    INDEX_FILE,
    LABEL_MEMBER,
    LATENT_MEMBER,
    TEXT_POOLED_MEMBER,
    TEXT_TOKENS_MEMBER,
    DatasetIndex,
)

if TYPE_CHECKING:
    import torch

    from orchestrator.data.loader import DataPosition

log = logging.getLogger(__name__)


class ShardError(DataError):
    """A prepared shard dataset is damaged, does not match its index.json, or cannot feed the job."""


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from (seed, purpose, epoch, ...): stable across Python, numpy and torch versions."""
    digest = hashlib.blake2b(":".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


# ---------------------------------------------------------------------------------------------
# The shards: a folder, or a list / brace pattern of URLs with the index.json that describes them
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardSet:
    """The shards a stream reads, with their sample counts from index.json (shard j is urls[j])."""

    urls: tuple[str, ...]
    counts: tuple[int, ...]
    index: DatasetIndex
    index_path: str


def open_shards(source: str | Path | Sequence[str | Path], index: str | Path | None = None) -> ShardSet:
    """The shards of a prepared dataset folder, or of a URL list / brace pattern ("d/shard-{000000..000009}.tar").

    Counts come from index.json: for a folder its own; for URLs the one given as `index` (a folder or
    the index.json file) or else the one next to the first URL, which must then be a local path. Every
    URL must name (by file name) a shard listed there; a subset of them is fine.
    """
    if isinstance(source, (str, Path)) and Path(source).is_dir():
        folder = Path(source)
        index_folder = _index_folder(index) if index is not None else folder
        record = _read_index(index_folder)
        urls = tuple(str(folder / shard.name) for shard in record.shards)
        return ShardSet(urls, tuple(s.num_samples for s in record.shards), record, str(index_folder / INDEX_FILE))

    urls = _expand_urls(source)
    if not urls:
        raise ShardError(f"the shard list {source!r} names no shards")
    folder = _index_folder(index) if index is not None else _folder_of(urls[0])
    record = _read_index(folder)
    counts_by_name = {shard.name: shard.num_samples for shard in record.shards}
    counts = []
    for url in urls:
        name = url.rstrip("/").rsplit("/", 1)[-1]
        if name not in counts_by_name:
            raise ShardError(
                f"shard {url} is not listed in {folder / INDEX_FILE}; give the index.json of the dataset it belongs to "
                "(index=...)"
            )
        counts.append(counts_by_name[name])
    if len(set(urls)) != len(urls):
        raise ShardError(f"the shard list {source!r} names some shards twice")
    return ShardSet(tuple(urls), tuple(counts), record, str(folder / INDEX_FILE))


def _expand_urls(source: str | Path | Sequence[str | Path]) -> list[str]:
    if isinstance(source, (str, Path)):
        from webdataset.shardlists import expand_urls

        return expand_urls(str(source))  # "a::b", ${VAR} and {000..009}, as wds.WebDataset reads them
    return [str(url) for url in source]


def _index_folder(index: str | Path) -> Path:
    path = Path(index)
    return path.parent if path.name == INDEX_FILE or path.suffix == ".json" else path


def _folder_of(url: str) -> Path:
    path = url.removeprefix("file:")
    if "://" in path or path.startswith("pipe:"):
        raise ShardError(
            f"cannot find the index.json of remote shards such as {url}: copy it locally and pass index=PATH"
        )
    return Path(path).parent


def _read_index(folder: Path) -> DatasetIndex:
    try:
        return DatasetIndex.read(folder)
    except ValueError as err:
        raise ShardError(str(err)) from None


# ---------------------------------------------------------------------------------------------
# The plan of one epoch: which worker of which rank reads which shards, and how many batches
# (pure Python, from the counts alone)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EpochPlan:
    """Which shards each worker of each rank reads in one epoch, and how many micro batches it yields."""

    epoch: int
    micro_batch: int
    shards: tuple[tuple[tuple[int, ...], ...], ...]
    """[rank][worker] -> shard numbers (into ShardSet.urls) in reading order."""
    samples: tuple[tuple[int, ...], ...]
    """[rank][worker] -> samples in those shards."""
    batches: int
    """Micro batches every rank yields this epoch: the fewest any rank can fill."""
    kept: tuple[tuple[int, ...], ...]
    """[rank][worker] -> micro batches the worker yields (its share of its rank's first `batches`)."""

    def fillable(self, rank: int) -> int:
        """Micro batches the rank could fill (each worker drops its last partial batch)."""
        return sum(n // self.micro_batch for n in self.samples[rank])

    def dropped(self, rank: int) -> int:
        """Micro batches the rank could fill but drops so that every rank yields `batches`."""
        return self.fillable(rank) - self.batches

    def order(self, rank: int) -> list[tuple[int, int]]:
        """(worker, index within the worker) of the rank's batches in the order the rank yields them."""
        return _round_robin(self.kept[rank], self.batches)


def plan_epoch(
    counts: Sequence[int], epoch: int, *, seed: int, world_size: int, num_workers: int, micro_batch: int
) -> EpochPlan:
    """The layout of one epoch (see the module docstring); ShardError if a worker gets no shard or a rank no batch."""
    readers = max(1, num_workers)  # num_workers 0: one reader, inside the training process
    if len(counts) < world_size * readers:
        raise ShardError(
            f"{len(counts)} shard(s) cannot feed {world_size} rank(s) x {readers} DataLoader worker(s): every worker "
            "needs a shard of its own each epoch. Prepare more, smaller shards (a smaller shard size in `orch "
            "prepare`) "
            f"or lower data.num_workers to at most {max(1, len(counts) // world_size)}"
        )
    order = list(range(len(counts)))
    random.Random(derive_seed(seed, "shards", epoch)).shuffle(order)
    # Dealt by hand, as wds.split_by_node / split_by_worker would: those read this process's rank and worker
    # from torch, but every process needs every rank's share to count the batches all ranks can fill.
    shards = tuple(
        tuple(tuple(order[rank::world_size][worker::readers]) for worker in range(readers))
        for rank in range(world_size)
    )
    samples = tuple(tuple(sum(counts[j] for j in mine) for mine in per_rank) for per_rank in shards)
    fillable = [sum(n // micro_batch for n in per_rank) for per_rank in samples]
    batches = min(fillable)
    if batches == 0:
        rank = fillable.index(0)
        raise ShardError(
            f"epoch {epoch}: rank {rank} can fill no micro batch of {micro_batch} (its {readers} worker(s) hold "
            f"{list(samples[rank])} samples and each drops its last partial batch): lower the micro batch "
            f"(train.global_batch_size), use fewer workers or ranks, or add data"
        )
    kept = []
    for per_rank in samples:
        taken = _round_robin([n // micro_batch for n in per_rank], batches)
        kept.append(tuple(sum(1 for w, _ in taken if w == worker) for worker in range(readers)))
    return EpochPlan(epoch, micro_batch, shards, samples, batches, tuple(kept))


def _round_robin(lengths: Sequence[int], total: int) -> list[tuple[int, int]]:
    """The first `total` of (worker, k) taken round robin over workers with lengths[worker] items each."""
    taken: list[tuple[int, int]] = []
    k = 0
    while len(taken) < total:
        for worker, length in enumerate(lengths):
            if k < length and len(taken) < total:
                taken.append((worker, k))
        k += 1
    return taken


def buffer_shuffle(items: Sequence[Any], size: int, rng: random.Random) -> list[Any]:
    """The order a shuffle buffer of `size` gives to items read in order (size 1: unchanged).

    Written here rather than taken from webdataset's `shuffle` so that a library upgrade cannot change
    the order a checkpoint's data position refers to; it needs only Python's `random`, whose
    seeded integer sequence is stable across versions.
    """
    buffer: list[Any] = []
    out: list[Any] = []
    for item in items:
        buffer.append(item)
        if len(buffer) == size:  # full: hand out a random one; it was read at most size - 1 items ago
            pick = rng.randrange(size)
            buffer[pick], buffer[-1] = buffer[-1], buffer[pick]
            out.append(buffer.pop())
    rng.shuffle(buffer)
    return out + buffer


def worker_sample_order(
    plan: EpochPlan, counts: Sequence[int], rank: int, worker: int, seed: int, shuffle_buffer: int
) -> list[tuple[int, int]]:
    """(shard, index in shard) of every sample the worker yields in the plan's epoch, in order."""
    stream = [(j, i) for j in plan.shards[rank][worker] for i in range(counts[j])]
    rng = random.Random(derive_seed(seed, "buffer", plan.epoch, rank, worker))
    return buffer_shuffle(stream, shuffle_buffer, rng)[: plan.kept[rank][worker] * plan.micro_batch]


# ---------------------------------------------------------------------------------------------
# The check the planner runs before any process starts (index.json only, no torch)
# ---------------------------------------------------------------------------------------------


def check_dataset(
    folder: str | Path,
    expected_channels: int,
    expected_size: int,
    *,
    world_size: int = 1,
    num_workers: int = 0,
    micro_batch_size: int | None = None,
    condition: str | None = None,
) -> list[str]:
    """Problems that keep a prepared dataset from feeding a model of (expected_channels, expected_size^2) latents; [] if
    none.

    Reads index.json and looks for the shard files, nothing more. With world_size / num_workers /
    micro_batch_size / condition ("class", "text" or "none") it also checks that the shards can be
    split over the ranks' workers and that the dataset carries the condition.
    """
    folder = _index_folder(folder)
    try:
        index = DatasetIndex.read(folder)
    except ValueError as err:
        return [str(err)]
    problems = []
    shape = list(index.latent_shape)
    if len(shape) != 3:
        problems.append(f"{folder / INDEX_FILE}: latent_shape {shape} is not (channels, height, width)")
    else:
        channels, height, width = shape
        if channels != expected_channels:
            problems.append(
                f"the latents in {folder} have {channels} channels but the model expects {expected_channels}: "
                f"set data.channels to {channels}, or prepare the data with the VAE the model is meant for"
            )
        if (height, width) != (expected_size, expected_size):
            problems.append(
                f"the latents in {folder} are {height}x{width} but the model expects {expected_size}x{expected_size}: "
                f"set the input size to {height}, or prepare the images at another resolution (these were "
                f"{index.resolution} px)"
            )
    if index.latent_dtype not in ("float16", "float32"):
        problems.append(f"{folder / INDEX_FILE}: latent_dtype {index.latent_dtype!r} is not float16 or float32")
    if not index.shards:
        problems.append(f"{folder} holds no shards (index.json lists none); run `orch prepare` on inputs with images")
    listed = sum(shard.num_samples for shard in index.shards)
    if listed != index.num_samples:
        problems.append(
            f"{folder / INDEX_FILE} says {index.num_samples} samples but its shards add up to {listed}: it is damaged, "
            "run `orch prepare` again"
        )
    missing = [shard.name for shard in index.shards if not (folder / shard.name).is_file()]
    resized = [
        f"{shard.name} ({(folder / shard.name).stat().st_size} bytes, written as {shard.bytes})"
        for shard in index.shards
        if shard.bytes is not None
        and (folder / shard.name).is_file()
        and (folder / shard.name).stat().st_size != shard.bytes
    ]
    if resized:
        more = " ..." if len(resized) > 3 else ""
        problems.append(
            f"{len(resized)} shard(s) in {folder} are truncated or were replaced since `orch prepare` wrote them: "
            f"{', '.join(resized[:3])}{more}; run `orch prepare` again"
        )
    if missing:
        more = " ..." if len(missing) > 5 else ""
        problems.append(
            f"{len(missing)} shard(s) listed in {folder / INDEX_FILE} are missing: {', '.join(missing[:5])}{more}"
        )
    if condition == "class" and not index.num_classes:
        problems.append(
            f"the model is class-conditional but {folder} has no class labels (its inputs had no classes): use "
            "model.condition none, or prepare labelled inputs"
        )
    if condition == "text" and not index.text_dim:
        problems.append(
            f"the model is text-conditional but {folder} has no text embeddings: prepare the data with captions and a "
            "text encoder"
        )
    readers = max(1, num_workers)
    if index.shards and len(index.shards) < world_size * readers:
        problems.append(
            f"{len(index.shards)} shard(s) cannot feed {world_size} rank(s) x {readers} DataLoader worker(s) (every "
            "worker needs a shard): "
            "prepare more, smaller shards or lower data.num_workers to at most "
            f"{max(1, len(index.shards) // world_size)}"
        )
    if micro_batch_size and listed < micro_batch_size * world_size:
        problems.append(
            f"{folder} holds {listed} samples, fewer than one micro batch ({micro_batch_size}) on each of {world_size} "
            "rank(s)"
        )
    return problems


# ---------------------------------------------------------------------------------------------
# Samples and batches
# ---------------------------------------------------------------------------------------------


@dataclass
class LatentBatch:
    """One micro batch of latents with their conditions (float32 tensors on the CPU until `.to(device)`)."""

    latents: torch.Tensor  # (B, C, h, w) float32: (mean + std * noise) * scaling_factor
    labels: torch.Tensor  # (B,) int64 class labels; -1 where the dataset has no classes
    keys: tuple[str, ...]  # the samples' keys, for logs and tests
    text_pooled: torch.Tensor | None = None  # (B, D) float32, zeros where has_text is False
    text_tokens: torch.Tensor | None = None  # (B, L, D) float32, L = max_text_tokens, zero padded
    text_mask: torch.Tensor | None = None  # (B, L) bool, True = a real token
    has_text: torch.Tensor | None = None  # (B,) bool: the sample has a caption (else train it as a dropped caption)
    replaced: tuple[str, ...] = ()  # why each unreadable sample replaced in this batch was (data.on_bad_sample skip)

    def condition(self, kind: str) -> torch.Tensor | dict[str, torch.Tensor] | None:
        """The `y` a DiT of model.condition `kind` takes: labels, a text dict (tokens, mask, pooled) or None."""
        if kind == "class":
            return self.labels
        if kind == "text":
            if self.text_tokens is None:
                raise ShardError("the model is text-conditional but this dataset has no text embeddings")
            return {"tokens": self.text_tokens, "mask": self.text_mask, "pooled": self.text_pooled}
        return None

    def to(self, device: Any, non_blocking: bool = False) -> LatentBatch:
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> LatentBatch:
        """Called by torch's DataLoader when pin_memory=True."""
        return self._map(lambda t: t.pin_memory())

    def _map(self, f) -> LatentBatch:
        fields = {
            name: getattr(self, name)
            for name in ("latents", "labels", "text_pooled", "text_tokens", "text_mask", "has_text")
        }
        return LatentBatch(
            keys=self.keys,
            replaced=self.replaced,
            **{name: None if value is None else f(value) for name, value in fields.items()},
        )


def decode_sample(raw: dict[str, Any], url: str, index: DatasetIndex, seed: int, epoch: int) -> dict[str, Any]:
    """One raw webdataset sample (member bytes) -> latent (C, h, w) float32, label and text; ShardError naming shard and
    sample."""
    import numpy as np
    import torch

    # webdataset's decoders by extension: .npy (numpy refuses pickles), cls
    from webdataset.autodecode import basichandlers

    key = raw["__key__"]
    where = f"shard {url}, sample {key}"
    if LATENT_MEMBER not in raw:
        members = ", ".join(sorted(k for k in raw if not k.startswith("__")))
        raise ShardError(
            f"{where} has no {LATENT_MEMBER} (members: {members}); the shard is damaged, run `orch prepare` again"
        )
    try:
        moments = basichandlers(LATENT_MEMBER, raw[LATENT_MEMBER])  # (2, C, h, w) float16: mean and std
    except Exception as err:  # numpy's errors for a damaged .npy vary (ValueError, EOFError, ...)
        raise ShardError(f"{where}: {LATENT_MEMBER} is not a readable .npy ({err}); the shard is damaged") from None
    expected = (2, *index.latent_shape)
    if moments.shape != expected or moments.dtype.kind != "f":
        raise ShardError(
            f"{where}: {LATENT_MEMBER} is {moments.dtype} {tuple(moments.shape)}, but index.json says "
            f"{index.latent_dtype} {expected} (mean and std)"
        )
    mean, std = torch.from_numpy(moments.astype(np.float32))  # (C, h, w) each
    generator = torch.Generator().manual_seed(derive_seed(seed, "noise", epoch, key))
    noise = torch.randn(mean.shape, generator=generator)  # (C, h, w)
    sample = {"key": key, "latent": (mean + std * noise) * index.scaling_factor, "label": -1}

    if index.num_classes:
        if LABEL_MEMBER not in raw:
            raise ShardError(
                f"{where} has no class label ({LABEL_MEMBER}) although index.json lists {index.num_classes} classes"
            )
        try:
            label = basichandlers(LABEL_MEMBER, raw[LABEL_MEMBER])
        except ValueError:
            raise ShardError(f"{where}: class label {raw[LABEL_MEMBER][:20]!r} is not an integer") from None
        if not 0 <= label < index.num_classes:
            raise ShardError(f"{where}: class label {label} is outside 0..{index.num_classes - 1}")
        sample["label"] = label

    if index.text_dim:
        present = [m for m in (TEXT_POOLED_MEMBER, TEXT_TOKENS_MEMBER) if m in raw]
        if len(present) == 1:
            raise ShardError(f"{where} has {present[0]} but not the other text embedding")
        if present:
            pooled = basichandlers(TEXT_POOLED_MEMBER, raw[TEXT_POOLED_MEMBER])  # (D,)
            tokens = basichandlers(TEXT_TOKENS_MEMBER, raw[TEXT_TOKENS_MEMBER])  # (L, D)
            limit = index.max_text_tokens or tokens.shape[0]
            if (
                pooled.shape != (index.text_dim,)
                or tokens.ndim != 2
                or tokens.shape[1] != index.text_dim
                or not 1 <= tokens.shape[0] <= limit
            ):
                raise ShardError(
                    f"{where}: text embeddings of shape {tuple(pooled.shape)} and {tuple(tokens.shape)}; index.json "
                    "says "
                    f"({index.text_dim},) and (L <= {index.max_text_tokens}, {index.text_dim})"
                )
            sample["text"] = (torch.from_numpy(pooled.astype(np.float32)), torch.from_numpy(tokens.astype(np.float32)))
    return sample


def collate(samples: list[dict[str, Any] | BadSample], index: DatasetIndex) -> LatentBatch:
    """Stack decoded samples into a LatentBatch (unreadable ones replaced); text tokens padded to
    index.max_text_tokens."""
    import torch

    samples, replaced = replace_bad(samples)
    batch = LatentBatch(
        latents=torch.stack([s["latent"] for s in samples]),  # (B, C, h, w)
        labels=torch.tensor([s["label"] for s in samples], dtype=torch.int64),  # (B,)
        keys=tuple(s["key"] for s in samples),
        replaced=replaced,
    )
    if index.text_dim:
        texts = [s.get("text") for s in samples]
        length = index.max_text_tokens or max((t[1].shape[0] for t in texts if t is not None), default=1)
        batch.text_pooled = torch.zeros(len(samples), index.text_dim)  # (B, D)
        batch.text_tokens = torch.zeros(len(samples), length, index.text_dim)  # (B, L, D)
        batch.text_mask = torch.zeros(len(samples), length, dtype=torch.bool)  # (B, L)
        batch.has_text = torch.tensor([t is not None for t in texts])  # (B,)
        for n, text in enumerate(texts):
            if text is not None:
                pooled, tokens = text  # (D,), (L_n, D)
                batch.text_pooled[n] = pooled
                batch.text_tokens[n, : tokens.shape[0]] = tokens
                batch.text_mask[n, : tokens.shape[0]] = True
    return batch


def read_shard(url: str, expected: int) -> Iterator[dict[str, Any]]:
    """The raw samples of one shard in order (webdataset's tar reader); ShardError if damaged or not `expected` long."""
    import webdataset as wds

    count, last = 0, None
    try:
        for raw in wds.tarfile_samples([{"url": url}]):  # raises on a damaged tar (handler: reraise)
            if count == expected:
                raise ShardError(
                    f"shard {url} holds more samples than the {expected} its index.json lists (at sample "
                    f"{raw['__key__']}): "
                    "the shard and the index disagree, run `orch prepare` again"
                )
            last = raw["__key__"]
            count += 1
            yield raw
    except ShardError:
        raise
    except (tarfile.TarError, OSError, EOFError, ValueError) as err:
        # webdataset appends " @ <file object>"
        reason = str(err.args[0]).split(" @ ")[0] if err.args else type(err).__name__
        after = f"after sample {last}" if last is not None else "before its first sample"
        raise ShardError(
            f"shard {url} is damaged or unreadable {after} (sample {count + 1} of {expected}): {reason}; run `orch "
            "prepare` again"
        ) from None
    if count < expected:
        raise ShardError(
            f"shard {url} ends after {count} samples (last {last}) but index.json lists {expected}: "
            "the shard is truncated or was replaced; run `orch prepare` again"
        )


# ---------------------------------------------------------------------------------------------
# One worker's batches of one epoch
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StreamConfig:
    """Everything that decides the batches (see the module docstring), picklable into DataLoader workers."""

    shards: ShardSet
    seed: int
    world_size: int
    num_workers: int
    micro_batch: int
    shuffle_buffer: int
    skip_bad: bool = False  # data.on_bad_sample skip: unreadable samples are replaced in their batch, not fatal

    def plan(self, epoch: int) -> EpochPlan:
        return plan_epoch(
            self.shards.counts,
            epoch,
            seed=self.seed,
            world_size=self.world_size,
            num_workers=self.num_workers,
            micro_batch=self.micro_batch,
        )


@dataclass(frozen=True)
class _Failure:
    """A ShardError met in a DataLoader worker, passed to the training process as data so that it is raised
    there with its own message (torch would re-raise it wrapped in the worker's traceback text)."""

    message: str


def worker_batches(
    config: StreamConfig, epoch: int, rank: int, worker: int, first: int
) -> Iterator[tuple[tuple[int, int, int], Any]]:
    """Batches first, first + 1, ... of one worker in one epoch, each as ((epoch, worker, k), LatentBatch or
    _Failure)."""
    k = first
    try:
        plan = config.plan(epoch)
        size, counts, urls = config.micro_batch, config.shards.counts, config.shards.urls
        wanted = worker_sample_order(plan, counts, rank, worker, config.seed, config.shuffle_buffer)[first * size :]
        wanted_set = set(wanted)
        shards_needed = {j for j, _ in wanted}
        pending: dict[tuple[int, int], dict | BadSample] = {}  # read, wanted, not yet batched: ~shuffle_buffer samples
        done, samples = 0, []

        def decoded(item: tuple[int, int]) -> dict | BadSample:
            raw = pending.pop(item)
            if isinstance(raw, BadSample):
                return raw
            try:
                return decode_sample(raw, urls[item[0]], config.shards.index, config.seed, epoch)
            except ShardError as err:
                if not config.skip_bad:
                    raise
                return BadSample(str(err))

        def ready() -> Iterator[tuple[tuple[int, int, int], LatentBatch]]:
            """The batches that the samples read so far complete, in the wanted order."""
            nonlocal done, k, samples
            while done < len(wanted) and wanted[done] in pending:
                samples.append(decoded(wanted[done]))
                done += 1
                if len(samples) == size:
                    yield (epoch, worker, k), collate(samples, config.shards.index)
                    k, samples = k + 1, []

        for j in plan.shards[rank][worker]:
            if done == len(wanted):
                break
            if j not in shards_needed:  # the cheap skip: none of its samples is in the batches to come
                continue
            read = 0
            try:
                for raw in read_shard(urls[j], counts[j]):
                    if (j, read) in wanted_set:
                        pending[(j, read)] = raw
                    read += 1
                    yield from ready()
                    if done == len(wanted):
                        break
            except ShardError as err:
                if not config.skip_bad:
                    raise
                for i in range(read, counts[j]):  # what the damage hides: every wanted sample not yet read
                    if (j, i) in wanted_set:
                        pending[(j, i)] = BadSample(str(err))
                yield from ready()
        assert done == len(wanted) and not samples, (
            f"worker {worker} of rank {rank} made {done} of {len(wanted)} samples in epoch {epoch}"
        )
    except DataError as err:  # a ShardError, or a batch of which no sample could be read
        yield (epoch, worker, k), _Failure(str(err))


def _identity(x):
    return x


class _RankEpochs:
    """What each DataLoader worker iterates: its batches of one epoch per `iter()`.

    A plain class registered as a torch IterableDataset (not a subclass) so that importing this module
    does not import torch. The DataLoader keeps its workers (persistent_workers) and calls `iter()` on
    their copy of this object once per epoch, so each copy counts its epochs itself; the stream checks
    the epoch in every batch's tag, so a miscount cannot pass unnoticed.
    """

    def __init__(self, config: StreamConfig, rank: int, start_epoch: int, start_batch: int):
        self.config, self.rank = config, rank
        self.start_epoch, self.start_batch = start_epoch, start_batch
        self.iterations = 0

    def __iter__(self):
        from torch.utils.data import get_worker_info

        worker = get_worker_info().id
        epoch = self.start_epoch + self.iterations
        first = 0
        if self.iterations == 0:  # resuming inside an epoch: this worker's share of the batches already taken
            first = sum(1 for w, _ in self.config.plan(epoch).order(self.rank)[: self.start_batch] if w == worker)
        self.iterations += 1
        return worker_batches(self.config, epoch, self.rank, worker, first)


# ---------------------------------------------------------------------------------------------
# The stream the trainer pulls from
# ---------------------------------------------------------------------------------------------


class ShardStream:
    """Endless micro batches (LatentBatch) of one rank over prepared latent shards; `position` is the next one's.

    Starting at DataPosition(e, b) yields exactly what an uninterrupted stream yields from there (see the
    module docstring for the contract and the cost of the skip).
    """

    def __init__(
        self,
        source: ShardSet | str | Path | Sequence[str | Path],
        *,
        micro_batch: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        num_workers: int = 0,
        shuffle_buffer: int = 1000,
        start: DataPosition | None = None,
        index: str | Path | None = None,
        pin_memory: bool = False,
        skip_bad: bool = False,
    ):
        import torch
        from torch.utils.data import DataLoader, IterableDataset

        from orchestrator.data.loader import DataPosition

        if micro_batch < 1 or shuffle_buffer < 1 or num_workers < 0 or not 0 <= rank < world_size:
            raise ValueError(
                f"bad stream settings: micro_batch={micro_batch}, shuffle_buffer={shuffle_buffer}, "
                f"num_workers={num_workers}, rank={rank} of {world_size}"
            )
        shards = source if isinstance(source, ShardSet) else open_shards(source, index)
        self.config = StreamConfig(shards, seed, world_size, num_workers, micro_batch, shuffle_buffer, skip_bad)
        self.rank = rank
        self.replaced: list[str] = []  # reasons of the unreadable samples replaced since the trainer last took them
        self._position_type = DataPosition
        start = start or DataPosition()
        plan = self.config.plan(start.epoch)  # fails here, before training, if the shards cannot feed the workers
        if start.batch >= plan.batches:
            log.warning(
                "data position (epoch %d, batch %d) is past the %d batches of that epoch with these settings (another "
                "world size or worker count?): starting at epoch %d instead",
                start.epoch,
                start.batch,
                plan.batches,
                start.epoch + 1,
            )
            start = DataPosition(start.epoch + 1, 0)
        self.position: DataPosition = start
        self._plan = plan
        self._batches: Iterator[LatentBatch] | None = None
        self._loader = None
        self._closed = False
        if num_workers > 0:
            IterableDataset.register(_RankEpochs)
            self._loader = DataLoader(
                _RankEpochs(self.config, rank, start.epoch, start.batch),
                batch_size=None,  # the workers batch
                num_workers=num_workers,
                persistent_workers=True,  # each worker's copy of _RankEpochs counts the epochs
                in_order=True,  # round robin over the workers, close to EpochPlan.order: little to hold back
                collate_fn=_identity,
                pin_memory=pin_memory,
                generator=torch.Generator().manual_seed(seed),  # keeps loader start-up off the global RNG
            )

    @property
    def index(self) -> DatasetIndex:
        return self.config.shards.index

    def batches_in_epoch(self, epoch: int) -> int:
        """Micro batches every rank yields in `epoch`."""
        return self._plan.batches if epoch == self._plan.epoch else self.config.plan(epoch).batches

    def __iter__(self) -> ShardStream:
        return self

    def __next__(self) -> LatentBatch:
        if self._closed:
            raise RuntimeError("the stream is closed (or failed): make a new one at its position")
        if self._batches is None:
            self._batches = self._epoch(self.position.epoch, self.position.batch)
        try:
            batch = next(self._batches)
        except BaseException:
            # Stop the workers now: freed later by the cycle collector (a traceback holds this stream), torch's
            # DataLoader waits 5 s per worker, as the queues it signals them through may be closed first.
            self.close()
            raise
        self.replaced.extend(batch.replaced)
        epoch, index = self.position.epoch, self.position.batch
        if index + 1 < self._plan.batches:
            self.position = self._position_type(epoch, index + 1)
        else:
            finished = next(self._batches, None)  # runs the end-of-epoch check in _epoch
            assert finished is None, f"epoch {epoch} yielded more than its {self._plan.batches} batches"
            self._batches = None
            self.position = self._position_type(epoch + 1, 0)
        return batch

    def _epoch(self, epoch: int, first: int) -> Iterator[LatentBatch]:
        """The rank's batches first.. of one epoch, checked against the plan."""
        self._plan = plan = self.config.plan(epoch)
        if plan.dropped(self.rank):
            log.info(
                "epoch %d: %d micro batches on every rank; rank %d drops %d more it could fill, so that all ranks "
                "step together",
                epoch,
                plan.batches,
                self.rank,
                plan.dropped(self.rank),
            )
        if self._loader is None:
            source = worker_batches(self.config, epoch, self.rank, 0, first)
        else:
            source = iter(self._loader)  # the workers start their next epoch (or the first at the start position)
        # The DataLoader returns its workers' batches round robin from worker 0, also after a resume inside
        # an epoch, where the plan continues with another worker: hold the batches that come early.
        early: dict[tuple[int, int], LatentBatch] = {}
        for worker, k in plan.order(self.rank)[first:]:
            while (worker, k) not in early:
                item = next(source, None)
                assert item is not None, f"epoch {epoch} of rank {self.rank} ended before batch {k} of worker {worker}"
                (tag_epoch, tag_worker, tag_k), payload = item
                if isinstance(payload, _Failure):
                    del source  # the traceback keeps this frame: let close() free the workers (see __next__)
                    raise ShardError(payload.message)
                assert tag_epoch == epoch, f"a worker sent a batch of epoch {tag_epoch} in epoch {epoch}"
                early[(tag_worker, tag_k)] = payload
                assert len(early) <= 2 * max(1, self.config.num_workers), (
                    f"{len(early)} batches wait for batch {k} of worker {worker}: not round robin"
                )
            yield early.pop((worker, k))
        assert not early and next(source, None) is None, (
            f"epoch {epoch} of rank {self.rank} has more batches than its plan"
        )

    def close(self) -> None:
        """Stop the DataLoader workers (also done when the stream is garbage collected)."""
        self._closed = True
        self._batches = None
        self._loader = None

    def __enter__(self) -> ShardStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ClassPairs:
    """(latents, labels) micro batches of a ShardStream: the (images, labels) the class-conditional trainer takes."""

    def __init__(self, stream: ShardStream):
        self.stream = stream

    @property
    def position(self) -> DataPosition:
        return self.stream.position

    def __iter__(self) -> ClassPairs:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        batch = next(self.stream)
        return batch.latents, batch.labels  # (B, C, h, w) float32, (B,) int64
