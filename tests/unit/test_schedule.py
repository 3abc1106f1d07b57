"""What a training step takes from its number alone (orchestrator/train/schedule.py): the learning-rate
factor of the warmup and the decay schedules, and the per-step, per-rank RNG seed.

Expected values are derived by hand from the spec's documentation (orchestrator/specs/job.py, TrainSpec):
a linear warmup, then constant, or a cosine / linear decay to min_lr_ratio x peak.
"""

import math
import os
import subprocess
import sys

import pytest
import torch

from orchestrator.specs.job import spec_from_dict
from orchestrator.train.schedule import lr_factor, step_seed

SCHEDULES = ("constant", "cosine", "linear")


def spec(steps: int, warmup: int = 0, schedule: str = "constant", min_lr_ratio: float = 0.0):
    return spec_from_dict(
        {
            "name": "sched",
            "train": {"steps": steps, "warmup_steps": warmup, "lr_schedule": schedule, "min_lr_ratio": min_lr_ratio},
        }
    )


# ---------------------------------------------------------------------------------------------
# lr_factor
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_warmup_ramps_linearly_and_reaches_the_peak_at_its_last_step(schedule):
    s = spec(steps=20, warmup=4, schedule=schedule, min_lr_ratio=0.3)
    ramp = [lr_factor(step, s) for step in range(4)]
    assert ramp == pytest.approx([0.25, 0.5, 0.75, 1.0])  # equal increments of 1/warmup, the first update not at 0
    assert all(b - a == pytest.approx(0.25) for a, b in zip(ramp, ramp[1:]))
    assert lr_factor(3, s) == 1.0  # the last warmup step trains at the peak rate


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_without_warmup_the_first_step_is_at_the_peak(schedule):
    assert lr_factor(0, spec(steps=10, warmup=0, schedule=schedule, min_lr_ratio=0.2)) == pytest.approx(1.0)


def test_constant_schedule_stays_at_the_peak_and_ignores_min_lr_ratio():
    s = spec(steps=10, warmup=3, schedule="constant", min_lr_ratio=0.5)
    assert [lr_factor(step, s) for step in range(3, 11)] == [1.0] * 8


@pytest.mark.parametrize("min_lr", [0.0, 0.1, 0.5])
def test_cosine_starts_at_the_peak_after_warmup_passes_the_mean_halfway_and_ends_at_the_floor(min_lr):
    steps, warmup = 13, 2  # updates 2..12 decay over 10 steps: the middle is step 2 + 5, the last (12) at the floor
    s = spec(steps=steps, warmup=warmup, schedule="cosine", min_lr_ratio=min_lr)
    assert lr_factor(warmup, s) == pytest.approx(1.0)  # right after the warmup: the peak, no jump down
    assert lr_factor(warmup + 5, s) == pytest.approx((1 + min_lr) / 2)  # cos(pi / 2) = 0
    # a quarter of the way: min + (1 - min) * (1 + cos(pi / 4)) / 2
    quarter = min_lr + (1 - min_lr) * (1 + math.sqrt(0.5)) / 2
    assert lr_factor(warmup + 2.5, s) == pytest.approx(quarter)
    assert lr_factor(steps - 1, s) == pytest.approx(min_lr)  # the last update trains at the floor
    assert lr_factor(steps, s) == pytest.approx(min_lr)  # and the rate stays there (LambdaLR's value after it)


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_decay_reaches_min_lr_ratio_at_the_last_training_step(schedule):
    s = spec(steps=6, warmup=2, schedule=schedule, min_lr_ratio=0.1)
    assert lr_factor(5, s) == pytest.approx(0.1)


@pytest.mark.parametrize("min_lr", [0.0, 0.25])
def test_linear_decays_by_equal_steps_from_the_peak_to_the_floor(min_lr):
    steps, warmup = 11, 2  # updates 2..10: 8 equal drops from the peak to the floor at the last update
    s = spec(steps=steps, warmup=warmup, schedule="linear", min_lr_ratio=min_lr)
    values = [lr_factor(step, s) for step in range(warmup, steps)]
    assert values[0] == pytest.approx(1.0) and values[-1] == pytest.approx(min_lr)
    drop = (1 - min_lr) / (steps - 1 - warmup)
    assert [a - b for a, b in zip(values, values[1:])] == pytest.approx([drop] * (steps - 1 - warmup))
    assert lr_factor(warmup + 4, s) == pytest.approx((1 + min_lr) / 2)  # halfway of 8 decay steps


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("min_lr", [0.0, 0.05, 0.5, 1.0])
def test_after_warmup_the_factor_never_rises_and_never_drops_below_the_floor(schedule, min_lr):
    steps, warmup = 50, 7
    s = spec(steps=steps, warmup=warmup, schedule=schedule, min_lr_ratio=min_lr)
    values = [lr_factor(step, s) for step in range(warmup, steps + 1)]
    assert all(min_lr - 1e-12 <= v <= 1.0 + 1e-12 for v in values)
    assert all(b <= a + 1e-12 for a, b in zip(values, values[1:]))  # monotone non-increasing
    if min_lr == 1.0:  # a floor at the peak: no decay at all
        assert values == pytest.approx([1.0] * len(values))


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_warmup_as_long_as_training_is_all_ramp_and_does_not_divide_by_zero(schedule):
    s = spec(steps=4, warmup=4, schedule=schedule)
    assert [lr_factor(step, s) for step in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lr_factor(4, s) == pytest.approx(1.0)  # what LambdaLR computes after the last update: no ZeroDivisionError


def test_each_update_runs_at_the_factor_of_its_0_based_step():
    """As the trainer wires it (orchestrator/train/loop.py): LambdaLR(lr_factor), one scheduler.step() per update."""
    peak, steps = 0.1, 6
    s = spec(steps=steps, warmup=2, schedule="cosine", min_lr_ratio=0.1)
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=peak)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, s))
    used = []
    for _ in range(steps):
        used.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert used == pytest.approx([peak * lr_factor(k, s) for k in range(steps)])
    assert used[0] == pytest.approx(peak / 2)  # the first update of a 2-step warmup is at half the peak, not at 0


# ---------------------------------------------------------------------------------------------
# step_seed
# ---------------------------------------------------------------------------------------------


def test_step_seed_is_deterministic_and_an_int():
    assert step_seed(7, 123, 3) == step_seed(7, 123, 3)
    assert type(step_seed(7, 123, 3)) is int


def test_step_seed_is_the_same_in_another_interpreter_whatever_its_hash_seed():
    """A resumed job runs in a new process: its seeds must not depend on Python's salted hash()."""
    code = "from orchestrator.train.schedule import step_seed; print(step_seed(7, 123, 3), step_seed(0, 0, 0))"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env, timeout=60
    ).stdout
    assert out.split() == [str(step_seed(7, 123, 3)), str(step_seed(0, 0, 0))]


def test_step_seed_differs_for_every_seed_step_and_rank():
    seeds = [step_seed(seed, step, rank) for seed in (0, 1, 42) for step in range(300) for rank in range(8)]
    assert len(set(seeds)) == len(seeds)


def test_step_seed_is_not_symmetric_in_its_arguments():
    """A sum or xor of the arguments would give step 1 of rank 2 the noise of step 2 of rank 1."""
    assert step_seed(0, 1, 2) != step_seed(0, 2, 1)
    assert step_seed(1, 2, 0) != step_seed(2, 1, 0)
    assert step_seed(3, 0, 0) != step_seed(0, 3, 0) != step_seed(0, 0, 3)


@pytest.mark.parametrize("seed", [0, 1, -5, 2**40, 2**70])
def test_step_seed_is_a_non_negative_int63_that_torch_accepts(seed):
    values = [step_seed(seed, step, rank) for step in range(200) for rank in range(4)]
    assert all(0 <= v < 2**63 for v in values)
    for v in values[:20]:
        torch.manual_seed(v)
        torch.Generator().manual_seed(v)


def test_step_seed_gives_different_noise_on_different_ranks():
    torch.manual_seed(step_seed(7, 10, 0))
    a = torch.randn(8)
    torch.manual_seed(step_seed(7, 10, 1))
    b = torch.randn(8)
    torch.manual_seed(step_seed(7, 10, 0))
    assert torch.equal(torch.randn(8), a) and not torch.equal(a, b)
