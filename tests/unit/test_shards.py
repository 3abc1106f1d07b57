"""The latent shard stream: epoch layout, exact resume, noise, damaged shards, the planner's check."""

from __future__ import annotations

import multiprocessing
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from orchestrator.data.loader import DataPosition
from orchestrator.data.shardformat import SHARD_PATTERN, DatasetIndex, ShardRecord
from orchestrator.data.shards import (
    ClassPairs,
    ShardError,
    ShardStream,
    check_dataset,
    derive_seed,
    open_shards,
    plan_epoch,
)
from orchestrator.errors import UserError

SIZES = (7, 5, 6, 4, 8)  # uneven on purpose: ranks can fill different numbers of batches
SHAPE = (4, 4, 4)  # (C, h, w) of one latent
SCALE = 0.18215
TEXT_DIM, MAX_TOKENS = 6, 5
SEED = 3


def moments_of(number: int) -> np.ndarray:
    """The (mean, std) a test sample stores: known, so the noise can be recovered from a latent."""
    rng = np.random.default_rng(number)
    mean = rng.standard_normal(SHAPE)
    std = 0.5 + rng.random(SHAPE)
    return np.stack([mean, std]).astype(np.float16)  # (2, C, h, w)


def write_dataset(folder: Path, sizes=SIZES, text: bool = False, classes: int = 10, shape=SHAPE) -> Path:
    """Shards in the exact `orch prepare` layout, written with webdataset's TarWriter, and their index.json."""
    folder.mkdir(parents=True, exist_ok=True)
    records, number = [], 0
    for k, size in enumerate(sizes):
        name = SHARD_PATTERN.format(k)
        with wds.TarWriter(str(folder / name)) as sink:
            for _ in range(size):
                sample = {
                    "__key__": f"{number:09d}",
                    "latent.npy": moments_of(number),
                    "json": {"source": f"img{number}.png", "flipped": False},
                }
                if shape != SHAPE:
                    sample["latent.npy"] = np.zeros((2, *shape), np.float16)
                if classes:
                    sample["cls"] = number % classes
                if text and number % 3:  # every third sample has no caption
                    length = 1 + number % MAX_TOKENS
                    sample["txt"] = f"caption {number}"
                    sample["text_pooled.npy"] = np.full(TEXT_DIM, number, np.float16)
                    sample["text_tokens.npy"] = np.full((length, TEXT_DIM), number, np.float16)
                sink.write(sample)
                number += 1
        (folder / name.replace(".tar", ".json")).write_text(f'{{"samples": {size}, "skipped": {{}}}}\n')
        records.append(ShardRecord(name=name, num_samples=size))
    DatasetIndex(
        num_samples=sum(sizes),
        shards=records,
        latent_shape=list(shape),
        latent_dtype="float16",
        scaling_factor=SCALE,
        vae="tiny-vae",
        resolution=shape[1] * 8,
        source="test",
        flip=False,
        num_classes=classes or None,
        class_names=[str(c) for c in range(classes)] if classes else None,
        text_encoder="minilm" if text else None,
        text_dim=TEXT_DIM if text else None,
        max_text_tokens=MAX_TOKENS if text else None,
    ).write(folder)
    return folder


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("latents"))


def stream(folder, rank=0, world_size=1, workers=0, start=None, **kw) -> ShardStream:
    settings = {"micro_batch": 2, "seed": SEED, "shuffle_buffer": 4}
    return ShardStream(folder, rank=rank, world_size=world_size, num_workers=workers, start=start, **{**settings, **kw})


def take(s: ShardStream, n: int) -> list[tuple[DataPosition, tuple[str, ...], torch.Tensor]]:
    """n batches as (position before the batch, keys, latents)."""
    out = []
    for _ in range(n):
        position = s.position
        batch = next(s)
        out.append((position, batch.keys, batch.latents))
    return out


def two_epochs(folder, rank, world_size, workers) -> list:
    """The first two epochs and one batch of the third, uninterrupted."""
    with stream(folder, rank, world_size, workers) as s:
        n = s.batches_in_epoch(0) + s.batches_in_epoch(1) + 1
        return take(s, n)


LAYOUTS = [(1, 0), (1, 2), (2, 0), (2, 2)]  # (world size, DataLoader workers per rank)


# ---- the layout of an epoch ------------------------------------------------------------------


@pytest.mark.parametrize("world_size,workers", LAYOUTS)
def test_each_sample_is_seen_at_most_once_per_epoch_and_ranks_yield_equally_many_batches(dataset, world_size, workers):
    runs = [two_epochs(dataset, rank, world_size, workers) for rank in range(world_size)]
    for epoch in (0, 1):
        per_rank = [[key for position, keys, _ in run if position.epoch == epoch for key in keys] for run in runs]
        assert len({len(keys) for keys in per_rank}) == 1, "ranks yielded different numbers of samples"
        everything = [key for keys in per_rank for key in keys]
        assert len(everything) == len(set(everything)), f"a sample was seen twice in epoch {epoch}"
        assert len(everything) > 0.5 * sum(SIZES)
    # positions run 0..n-1 in each epoch, then the next epoch starts at 0
    positions = [p for p, _, _ in runs[0]]
    assert positions[0] == DataPosition(0, 0) and positions[-1] == DataPosition(2, 0)
    assert [p.batch for p in positions if p.epoch == 0] == list(range(len([p for p in positions if p.epoch == 0])))


def test_epochs_have_different_orders(dataset):
    run = two_epochs(dataset, 0, 1, 0)
    epoch0 = [k for p, keys, _ in run if p.epoch == 0 for k in keys]
    epoch1 = [k for p, keys, _ in run if p.epoch == 1 for k in keys]
    assert epoch0 != epoch1


def test_ranks_yield_the_same_number_of_batches_and_the_richer_rank_drops_the_rest():
    counts = [100, 1, 1, 1, 3, 2]
    for epoch in range(5):
        plan = plan_epoch(counts, epoch, seed=0, world_size=2, num_workers=1, micro_batch=2)
        assert [len(plan.order(rank)) for rank in (0, 1)] == [plan.batches] * 2
        assert min(plan.dropped(0), plan.dropped(1)) == 0
        assert max(plan.dropped(0), plan.dropped(1)) >= 45  # the rank with the 100-sample shard
        assert plan == plan_epoch(counts, epoch, seed=0, world_size=2, num_workers=1, micro_batch=2)  # deterministic


def test_zero_and_one_worker_give_the_same_stream(dataset):
    a, b = two_epochs(dataset, 0, 1, 0), two_epochs(dataset, 0, 1, 1)
    assert [(p, k) for p, k, _ in a] == [(p, k) for p, k, _ in b]
    assert all(torch.equal(x, y) for (_, _, x), (_, _, y) in zip(a, b))


def test_fewer_shards_than_ranks_times_workers_is_a_clear_error(dataset):
    with pytest.raises(
        ShardError, match=r"5 shard\(s\) cannot feed 2 rank\(s\) x 3 DataLoader worker\(s\).*num_workers to at most 2"
    ):
        stream(dataset, world_size=2, workers=3)


def test_a_micro_batch_no_rank_can_fill_is_a_clear_error(dataset):
    with pytest.raises(ShardError, match="can fill no micro batch of 50"):
        stream(dataset, micro_batch=50)


# ---- exact resume ----------------------------------------------------------------------------


@pytest.mark.parametrize("world_size,workers", LAYOUTS)
def test_resuming_at_every_position_of_two_epochs_equals_the_uninterrupted_stream(dataset, world_size, workers):
    for rank in range(world_size):
        whole = two_epochs(dataset, rank, world_size, workers)
        for start in range(len(whole) - 1):
            position = whole[start][0]
            with stream(dataset, rank, world_size, workers, start=position) as resumed:
                n = min(3, len(whole) - start)  # a few batches, across the epoch boundary near its end
                for (p, keys, latents), (q, keys2, latents2) in zip(whole[start : start + n], take(resumed, n)):
                    assert (p, keys) == (q, keys2), f"rank {rank} resumed at {position}"
                    assert torch.equal(latents, latents2), f"rank {rank} resumed at {position}: other noise"


@pytest.mark.parametrize("world_size,workers", LAYOUTS)
def test_a_stream_resumed_mid_epoch_runs_on_identically_through_the_next_epochs(dataset, world_size, workers):
    rank = world_size - 1
    whole = two_epochs(dataset, rank, world_size, workers)
    middle = len(whole) // 4  # inside epoch 0: the workers must then count epochs 1 and 2 themselves
    with stream(dataset, rank, world_size, workers, start=whole[middle][0]) as resumed:
        rest = take(resumed, len(whole) - middle)
    assert [(p, k) for p, k, _ in rest] == [(p, k) for p, k, _ in whole[middle:]]
    assert all(torch.equal(x, y) for (_, _, x), (_, _, y) in zip(rest, whole[middle:]))


def test_class_pairs_carry_latents_labels_and_the_position(dataset):
    pairs = ClassPairs(stream(dataset))
    latents, labels = next(pairs)
    assert latents.shape == (2, *SHAPE) and latents.dtype == torch.float32
    assert labels.dtype == torch.int64 and pairs.position == DataPosition(0, 1)


# ---- noise -------------------------------------------------------------------------------------


def noise_of(latent: torch.Tensor, key: str) -> torch.Tensor:
    mean, std = torch.from_numpy(moments_of(int(key)).astype(np.float32))
    return (latent / SCALE - mean) / std


def test_latent_is_mean_plus_std_times_noise_seeded_by_seed_epoch_and_key(dataset):
    run = two_epochs(dataset, 0, 1, 0)
    seen: dict[str, list[torch.Tensor]] = {}
    for position, keys, latents in run:
        for key, latent in zip(keys, latents):
            expected = torch.randn(
                SHAPE, generator=torch.Generator().manual_seed(derive_seed(SEED, "noise", position.epoch, key))
            )
            torch.testing.assert_close(noise_of(latent, key), expected, rtol=1e-4, atol=1e-4)
            seen.setdefault(key, []).append(latent)
    twice = [latents for latents in seen.values() if len(latents) >= 2]
    assert twice, "no sample appeared in both epochs"
    assert all(not torch.equal(a, b) for a, b, *_ in twice), "the noise did not change across epochs"


def test_noise_does_not_depend_on_rank_or_workers(dataset):
    alone = {k: x for _, keys, latents in two_epochs(dataset, 0, 1, 0)[:4] for k, x in zip(keys, latents)}
    shared = {
        k: x
        for rank in (0, 1)
        for _, keys, latents in two_epochs(dataset, rank, 2, 2)[:4]
        for k, x in zip(keys, latents)
    }
    common = alone.keys() & shared.keys()
    assert all(torch.equal(alone[k], shared[k]) for k in common)


# ---- text --------------------------------------------------------------------------------------


def test_text_is_padded_to_max_tokens_with_a_mask_and_missing_captions_are_flagged(tmp_path):
    folder = write_dataset(tmp_path / "text", text=True)
    batches = [next(s) for s in [stream(folder, micro_batch=6)] for _ in range(4)]
    for batch in batches:
        assert batch.text_tokens.shape == (6, MAX_TOKENS, TEXT_DIM) and batch.text_mask.shape == (6, MAX_TOKENS)
        assert batch.text_pooled.shape == (6, TEXT_DIM) and batch.has_text.dtype == torch.bool
        for n, key in enumerate(batch.keys):
            number = int(key)
            assert bool(batch.has_text[n]) == bool(number % 3)
            length = (1 + number % MAX_TOKENS) if number % 3 else 0
            assert batch.text_mask[n].tolist() == [True] * length + [False] * (MAX_TOKENS - length)
            assert torch.all(batch.text_tokens[n, :length] == number) and torch.all(batch.text_tokens[n, length:] == 0)
        y = batch.condition("text")
        assert set(y) == {"tokens", "mask", "pooled"}


def test_a_dataset_without_classes_gives_labels_minus_one(tmp_path):
    folder = write_dataset(tmp_path / "plain", classes=0)
    assert torch.all(next(stream(folder)).labels == -1)


# ---- damaged input -----------------------------------------------------------------------------


def copy_dataset(source: Path, target: Path) -> Path:
    target.mkdir()
    for path in source.iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    return target


@pytest.mark.parametrize("workers", [0, 2])
def test_a_tar_cut_inside_a_member_names_the_shard_and_the_sample(dataset, tmp_path, workers):
    folder = copy_dataset(dataset, tmp_path / "cut")
    shard = folder / SHARD_PATTERN.format(2)  # samples 12..17
    with tarfile.open(shard) as tar:
        member = tar.getmember("000000014.latent.npy")
    shard.write_bytes(shard.read_bytes()[: member.offset_data + member.size // 2])
    with pytest.raises(
        ShardError,
        match=r"shard .*shard-000002\.tar is damaged or unreadable after sample 000000013 \(sample 3 of 6\): "
        r"unexpected end of data",
    ) as caught:
        take(stream(folder, workers=workers), 40)
    assert "Traceback" not in str(caught.value)  # raised in the training process with its own message
    assert isinstance(caught.value, UserError)
    deadline = time.time() + 3
    while multiprocessing.active_children() and time.time() < deadline:
        time.sleep(0.05)
    assert not multiprocessing.active_children(), "the failed stream left its DataLoader workers running"


def test_a_tar_cut_between_members_is_caught_by_the_sample_count(dataset, tmp_path):
    folder = copy_dataset(dataset, tmp_path / "short")
    shard = folder / SHARD_PATTERN.format(4)
    with wds.TarWriter(str(shard)) as sink:  # 3 of its 8 samples, a valid but short tar
        for number in range(22, 25):
            sink.write({"__key__": f"{number:09d}", "latent.npy": moments_of(number), "cls": number % 10})
    with pytest.raises(
        ShardError, match=r"shard-000004\.tar ends after 3 samples \(last 000000024\) but index.json lists 8"
    ):
        take(stream(folder), 40)


def test_a_shard_longer_than_its_index_says_is_an_error(dataset, tmp_path):
    folder = copy_dataset(dataset, tmp_path / "long")
    with wds.TarWriter(str(folder / SHARD_PATTERN.format(3))) as sink:  # 5 samples where index.json lists 4
        for number in range(18, 23):
            sink.write({"__key__": f"{number:09d}", "latent.npy": moments_of(number), "cls": number % 10})
    with pytest.raises(
        ShardError,
        match=r"shard-000003\.tar holds more samples than the 4 its index.json lists \(at sample 000000022\)",
    ):
        take(stream(folder), 40)


def test_a_sample_without_latent_names_the_shard_and_the_sample(dataset, tmp_path):
    folder = copy_dataset(dataset, tmp_path / "nolatent")
    shard = folder / SHARD_PATTERN.format(1)
    with wds.TarWriter(str(shard)) as sink:
        for number in range(7, 12):
            sample = {"__key__": f"{number:09d}", "cls": number % 10}
            if number != 9:
                sample["latent.npy"] = moments_of(number)
            sink.write(sample)
    with pytest.raises(ShardError, match=r"shard .*shard-000001\.tar, sample 000000009 has no latent\.npy"):
        take(stream(folder), 40)


def test_a_latent_of_another_shape_than_the_index_says_is_an_error(dataset, tmp_path):
    folder = copy_dataset(dataset, tmp_path / "shape")
    with wds.TarWriter(str(folder / SHARD_PATTERN.format(0))) as sink:
        for number in range(7):
            sink.write({"__key__": f"{number:09d}", "latent.npy": np.zeros((2, 4, 8, 8), np.float16), "cls": 0})
    with pytest.raises(
        ShardError,
        match=r"sample 00000000\d: latent\.npy is float16 \(2, 4, 8, 8\), but index\.json says float16 \(2, 4, 4, 4\)",
    ):
        take(stream(folder), 40)


def cut_shard_2(dataset: Path, target: Path) -> tuple[Path, set[str]]:
    """A copy of the dataset whose shard 2 (samples 12..17) is cut inside sample 14: the keys it hides."""
    folder = copy_dataset(dataset, target)
    shard = folder / SHARD_PATTERN.format(2)
    with tarfile.open(shard) as tar:
        member = tar.getmember("000000014.latent.npy")
    shard.write_bytes(shard.read_bytes()[: member.offset_data + member.size // 2])
    return folder, {f"{number:09d}" for number in range(14, 18)}


@pytest.mark.parametrize("workers", [0, 2])
def test_skip_replaces_what_a_damaged_shard_hides_by_the_next_readable_sample_of_the_batch(dataset, tmp_path, workers):
    folder, hidden = cut_shard_2(dataset, tmp_path / "cut")
    mixed = {"workers": workers, "shuffle_buffer": 32, "micro_batch": 4}  # no micro batch falls wholly in the damage
    with stream(dataset, **mixed) as intact, stream(folder, skip_bad=True, **mixed) as damaged:
        batches = intact.batches_in_epoch(0) + intact.batches_in_epoch(1)
        replaced = 0
        for _ in range(batches):
            expected, got = next(intact), next(damaged)
            keys = list(expected.keys)
            good = [n for n, key in enumerate(keys) if key not in hidden]
            for n, key in enumerate(keys):
                source = n if key not in hidden else next((g for g in good if g > n), good[0])
                assert got.keys[n] == keys[source]
                assert torch.equal(got.latents[n], expected.latents[source])
            assert len(got.replaced) == sum(key in hidden for key in keys)
            assert all("shard-000002.tar is damaged or unreadable after sample 000000013" in r for r in got.replaced)
            replaced += len(got.replaced)
        assert len(damaged.replaced) == replaced >= len(hidden)  # what the plan keeps of them, in two epochs


def test_skip_resumes_mid_epoch_exactly_as_the_uninterrupted_damaged_stream(dataset, tmp_path):
    folder, _ = cut_shard_2(dataset, tmp_path / "cut")
    settings = {"workers": 2, "skip_bad": True, "shuffle_buffer": 32}
    uninterrupted = take(stream(folder, **settings), 12)
    position = uninterrupted[5][0]
    resumed = take(stream(folder, start=position, **settings), 7)
    for (p1, keys1, latents1), (p2, keys2, latents2) in zip(uninterrupted[5:], resumed):
        assert (p1, keys1) == (p2, keys2) and torch.equal(latents1, latents2)


def test_skip_replaces_a_sample_that_does_not_decode_and_fails_when_a_batch_has_no_readable_sample(dataset, tmp_path):
    folder = copy_dataset(dataset, tmp_path / "nolatent")
    with wds.TarWriter(str(folder / SHARD_PATTERN.format(1))) as sink:  # sample 9 lost its latent
        for number in range(7, 12):
            sample = {"__key__": f"{number:09d}", "cls": number % 10}
            if number != 9:
                sample["latent.npy"] = moments_of(number)
            sink.write(sample)
    with stream(folder, skip_bad=True) as s:
        keys = [key for _ in range(s.batches_in_epoch(0)) for key in next(s).keys]
    assert "000000009" not in keys and len(s.replaced) == 1
    assert "shard-000002" not in s.replaced[0] and "sample 000000009 has no latent.npy" in s.replaced[0]

    broken = copy_dataset(dataset, tmp_path / "broken")
    for shard in broken.glob("shard-*.tar"):
        shard.write_bytes(b"not a tar at all" * 64)
    with pytest.raises(UserError, match=r"every sample of a micro batch is unreadable \(2, the first: shard "):
        take(stream(broken, skip_bad=True), 1)


# ---- finding the shards, and the planner's check -----------------------------------------------


def test_a_brace_pattern_reads_the_same_shards_as_the_folder(dataset):
    pattern = str(dataset / "shard-{000000..000004}.tar")
    assert open_shards(pattern).urls == open_shards(dataset).urls
    assert [k for _, k, _ in take(stream(pattern), 5)] == [k for _, k, _ in take(stream(dataset), 5)]
    subset = open_shards([str(dataset / "shard-000001.tar"), str(dataset / "shard-000003.tar")])
    assert subset.counts == (5, 4)
    with pytest.raises(ShardError, match="not listed"):
        open_shards([str(dataset / "other.tar")], index=dataset)


def test_check_dataset_finds_channel_size_shard_and_condition_problems(dataset, tmp_path):
    assert check_dataset(dataset, 4, 4) == []
    assert (
        check_dataset(dataset / "index.json", 4, 4, world_size=2, num_workers=2, micro_batch_size=2, condition="class")
        == []
    )
    problems = check_dataset(dataset, 3, 8)
    assert any("have 4 channels but the model expects 3" in p for p in problems)
    assert any("are 4x4 but the model expects 8x8" in p for p in problems)
    assert any(
        "5 shard(s) cannot feed 2 rank(s) x 4" in p for p in check_dataset(dataset, 4, 4, world_size=2, num_workers=4)
    )
    assert any("no text embeddings" in p for p in check_dataset(dataset, 4, 4, condition="text"))
    assert "not a prepared dataset" in check_dataset(tmp_path, 4, 4)[0]
    gone = copy_dataset(dataset, tmp_path / "gone")
    (gone / SHARD_PATTERN.format(3)).unlink()
    assert any("1 shard(s) listed" in p and "shard-000003.tar" in p for p in check_dataset(gone, 4, 4))


def test_check_dataset_does_not_import_torch(dataset):
    code = (
        "import sys; from orchestrator.data.shards import check_dataset; "
        f"print(check_dataset({str(dataset)!r}, 4, 4)); assert 'torch' not in sys.modules"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[2], check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
