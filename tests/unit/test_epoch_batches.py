"""The resumable batch stream of pixel datasets (orchestrator/data/loader.py): DataPosition, EpochBatches and the
position BatchStream reports for checkpoints.

What training relies on: the ranks draw disjoint batches of the same count (drop-last: a remainder smaller than a
global batch is left out of the epoch), the order depends on (seed, epoch) only, every epoch reshuffles, flips are a
function of (seed, epoch, sample), and a stream started at a saved position continues exactly as the uninterrupted
one would have, across epoch boundaries too.
"""

from dataclasses import FrozenInstanceError
from itertools import islice

import pytest
import torch
from torch.utils.data import Dataset

from orchestrator.data.imagefolder import DataError
from orchestrator.data.loader import BatchStream, DataPosition, EpochBatches


def batches(
    num_samples=50, micro_batch=4, rank=0, world_size=2, seed=0, hflip=False, start=DataPosition()
) -> EpochBatches:
    return EpochBatches(num_samples, micro_batch, rank, world_size, seed, hflip, start)


def take(stream: EpochBatches, n: int) -> list[list[tuple[int, bool]]]:
    return list(islice(iter(stream), n))


def indices(keys) -> list[int]:
    return [index for index, _ in keys]


# ---------------------------------------------------------------------------------------------
# DataPosition
# ---------------------------------------------------------------------------------------------


def test_data_position_starts_at_the_first_batch_of_epoch_0_and_is_an_immutable_value():
    assert DataPosition() == DataPosition(0, 0) == DataPosition(epoch=0, batch=0)
    assert DataPosition(1, 2) != DataPosition(2, 1)
    assert len({DataPosition(1, 2), DataPosition(1, 2)}) == 1  # hashable by value
    with pytest.raises(FrozenInstanceError):
        DataPosition().batch = 3


# ---------------------------------------------------------------------------------------------
# The split over ranks
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_samples, micro_batch, world_size", [(103, 4, 3), (48, 4, 3), (50, 5, 1), (64, 1, 8)])
def test_ranks_get_disjoint_equal_batches_that_cover_the_epoch_but_the_remainder(num_samples, micro_batch, world_size):
    per_rank = [batches(num_samples, micro_batch, rank, world_size, seed=3).epoch_keys(0) for rank in range(world_size)]
    global_batch = micro_batch * world_size
    full = num_samples // global_batch  # drop-last: a partial global batch would leave some rank short
    for keys in per_rank:
        assert len(keys) == full  # every rank steps the same number of times: no rank waits in a collective alone
        assert all(len(batch) == micro_batch for batch in keys)
    seen = [index for keys in per_rank for batch in keys for index in indices(batch)]
    # no sample twice in an epoch, on one rank or across ranks
    assert len(seen) == len(set(seen)) == full * global_batch
    assert set(seen) <= set(range(num_samples))
    assert num_samples - len(seen) == num_samples % global_batch < global_batch  # only the remainder is left out


def test_batches_per_epoch_is_the_number_of_whole_global_batches():
    assert batches(103, 4, world_size=3).batches_per_epoch == 8  # 103 // 12
    assert batches(12, 4, world_size=3).batches_per_epoch == 1  # exactly one global batch is enough


@pytest.mark.parametrize("num_samples, micro_batch, world_size", [(11, 4, 3), (0, 1, 1), (3, 4, 1)])
def test_a_dataset_smaller_than_one_global_batch_is_refused_with_the_fix(num_samples, micro_batch, world_size):
    with pytest.raises(DataError) as caught:
        batches(num_samples, micro_batch, 0, world_size)
    message = str(caught.value)
    assert f"{num_samples} images" in message and f"({micro_batch} x {world_size} ranks)" in message
    assert "global_batch_size" in message


def test_the_images_of_each_global_batch_do_not_depend_on_how_it_is_split_over_ranks():
    """The same global batch of 12 as 1 x 12, 2 x 6, 3 x 4 or 4 x 3: each step sees the same images with the same flips
    (so a run resumed on another number of ranks, with the same global batch, sees the data it would have seen)."""

    def global_batches(micro_batch, world_size, epoch):
        per_rank = [
            batches(100, micro_batch, r, world_size, seed=5, hflip=True).epoch_keys(epoch) for r in range(world_size)
        ]
        return [sorted(key for keys in per_rank for key in keys[b]) for b in range(len(per_rank[0]))]

    for epoch in (0, 1):
        reference = global_batches(12, 1, epoch)
        assert len(reference) == 100 // 12
        for micro_batch, world_size in ((6, 2), (4, 3), (3, 4)):
            assert global_batches(micro_batch, world_size, epoch) == reference


# ---------------------------------------------------------------------------------------------
# Order: a function of (seed, epoch)
# ---------------------------------------------------------------------------------------------


def test_the_order_is_a_function_of_seed_and_epoch_only():
    a = batches(seed=11)
    b = batches(seed=11, start=DataPosition(3, 2))  # another start position does not change what an epoch holds
    torch.manual_seed(0)  # nor does the global RNG
    keys_a = a.epoch_keys(2)
    torch.manual_seed(999)
    torch.rand(10)
    assert b.epoch_keys(2) == keys_a
    assert a.epoch_keys(2) == keys_a  # asking again gives the same
    assert batches(seed=12).epoch_keys(2) != keys_a  # another seed, another order


def test_every_epoch_reshuffles_and_drops_a_different_remainder():
    stream = batches(num_samples=10, micro_batch=2, world_size=2, seed=1)  # 2 global batches of 4: 2 samples left out
    epochs = [[i for batch in stream.epoch_keys(e) for i in indices(batch)] for e in range(30)]
    assert len({tuple(order) for order in epochs}) == 30  # no two epochs in the same order
    left_out = {frozenset(set(range(10)) - set(order)) for order in epochs}
    assert len(left_out) > 1  # not the same images dropped every epoch
    assert set().union(*map(set, epochs)) == set(range(10))  # so every image is trained on


# ---------------------------------------------------------------------------------------------
# Horizontal flips
# ---------------------------------------------------------------------------------------------


def test_without_hflip_nothing_is_flipped():
    stream = batches(num_samples=40, hflip=False)
    assert not any(flip for e in range(3) for batch in stream.epoch_keys(e) for _, flip in batch)


def test_hflip_flips_about_half_and_each_sample_the_same_way_on_any_rank_and_split():
    def flips(micro_batch, world_size, epoch):
        out = {}
        for rank in range(world_size):
            for batch in batches(200, micro_batch, rank, world_size, seed=4, hflip=True).epoch_keys(epoch):
                out.update(batch)
        return out

    reference = flips(10, 2, epoch=0)  # sample index -> flipped
    assert 60 < sum(reference.values()) < 140  # a fair coin per sample over 200 samples
    for micro_batch, world_size in ((20, 1), (5, 4), (8, 5)):
        other = flips(micro_batch, world_size, epoch=0)
        assert {i: other[i] for i in other.keys() & reference.keys()} == {
            i: reference[i] for i in other.keys() & reference.keys()
        }
    assert flips(10, 2, epoch=0) == reference  # deterministic
    next_epoch = flips(10, 2, epoch=1)
    assert any(next_epoch[i] != reference[i] for i in next_epoch.keys() & reference.keys())  # drawn again each epoch


def test_hflip_does_not_change_the_order():
    with_flips = batches(num_samples=60, seed=9, hflip=True).epoch_keys(1)
    without = batches(num_samples=60, seed=9, hflip=False).epoch_keys(1)
    assert [indices(b) for b in with_flips] == [indices(b) for b in without]


# ---------------------------------------------------------------------------------------------
# Positions and resuming
# ---------------------------------------------------------------------------------------------


def test_advance_moves_to_the_next_batch_and_wraps_into_the_next_epoch():
    stream = batches(num_samples=50, micro_batch=4, world_size=2)  # 6 batches per epoch
    assert stream.batches_per_epoch == 6
    assert stream.advance(DataPosition(0, 0)) == DataPosition(0, 1)
    assert stream.advance(DataPosition(2, 4)) == DataPosition(2, 5)
    assert stream.advance(DataPosition(2, 5)) == DataPosition(3, 0)  # the last batch of epoch 2
    position = DataPosition(1, 0)
    for _ in range(6):
        position = stream.advance(position)
    assert position == DataPosition(2, 0)


def test_the_uninterrupted_stream_is_the_epochs_in_sequence():
    stream = batches(num_samples=50, micro_batch=4, rank=1, world_size=2, seed=2, hflip=True)
    assert take(stream, 18) == stream.epoch_keys(0) + stream.epoch_keys(1) + stream.epoch_keys(2)


@pytest.mark.parametrize("rank", [0, 1])
def test_a_stream_started_at_a_saved_position_continues_exactly_as_the_uninterrupted_one(rank):
    def make(start=DataPosition()):
        return batches(num_samples=50, micro_batch=4, rank=rank, world_size=2, seed=8, hflip=True, start=start)

    reference = make()
    uninterrupted = take(reference, 20)  # 3 epochs of 6 batches and a bit
    position = DataPosition()
    for consumed in range(20):  # stop after any batch, mid-epoch or at an epoch's end
        resumed = take(make(position), 20 - consumed)
        assert resumed == uninterrupted[consumed:], f"resumed at {position} after {consumed} batches"
        position = reference.advance(position)
    assert position == DataPosition(3, 2)


def test_a_stream_started_late_does_not_replay_earlier_epochs():
    stream = batches(num_samples=50, micro_batch=4, world_size=2, seed=8, start=DataPosition(5, 3))
    first = take(stream, 4)
    assert first == stream.epoch_keys(5)[3:] + stream.epoch_keys(6)[:1]


class IndexImages(Dataset):
    """A stand-in for the image datasets: (index, flip) -> (a 1x1x2 'image' holding the index, its flip), label
    index."""

    def __len__(self):
        return 30

    def __getitem__(self, key):
        index, flip = key
        return torch.tensor([[[float(index), float(flip)]]]), torch.tensor(index)


def test_batch_stream_reports_the_position_a_resumed_stream_continues_from():
    """The trainer checkpoints BatchStream.position: a stream built from it must go on with the next batch."""

    def make(start):
        return batches(num_samples=30, micro_batch=3, rank=0, world_size=2, seed=6, hflip=True, start=start)

    stream = BatchStream(IndexImages(), make(DataPosition(0, 3)), num_workers=0, seed=6)
    assert stream.position == DataPosition(0, 3)
    drawn = [next(stream) for _ in range(4)]  # 5 batches per epoch: crosses into epoch 1
    assert stream.position == DataPosition(1, 2)
    expected = take(make(DataPosition(0, 3)), 4)
    for (images, labels), keys in zip(drawn, expected):
        assert labels.tolist() == indices(keys)
        assert images[:, 0, 0, 1].bool().tolist() == [flip for _, flip in keys]
    assert take(make(stream.position), 1)[0] == indices_and_flips(next(stream))
    stream.close()


def indices_and_flips(batch) -> list[tuple[int, bool]]:
    images, labels = batch
    return [(int(i), bool(f)) for i, f in zip(labels, images[:, 0, 0, 1])]
