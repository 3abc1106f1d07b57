"""The batch split of a plan (orchestrator/jobs/plan.py, orchestrator/specs/job.py): global batch = micro batch x
ranks (nodes x processes) x grad_accum_steps, a split that does not divide is refused when the spec is read, with the
multiple to use, and `orch plan` prints the split that training will use.

Expected micro batches are worked out by hand: global_batch_size / (nodes x processes x grad_accum_steps).
"""

from itertools import islice
from pathlib import Path

import pytest
import yaml

from orchestrator.data.loader import DataPosition, EpochBatches
from orchestrator.jobs import plan as plan_module
from orchestrator.jobs.plan import make_plan
from orchestrator.specs.job import SpecError, parse_spec, spec_from_dict
from tests.helpers import tiny_spec


@pytest.fixture(autouse=True)
def no_gpu_here(monkeypatch):
    """The same plan on any test machine: no GPU visible, whatever this host has."""
    monkeypatch.setattr(plan_module, "gpu_visible", lambda *args: False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")


def raw_spec(tmp_path: Path, global_batch: int, grad_accum: int = 1, **resources) -> dict:
    raw = yaml.safe_load(tiny_spec(tmp_path).read_text())
    raw["train"].update(global_batch_size=global_batch, grad_accum_steps=grad_accum)
    raw["resources"] = {
        "device": "cpu",
        "threads_per_process": 1,
        **resources,
    }  # replaced, not merged: gpus_per_node sets processes
    return raw


def plan_of(tmp_path: Path, global_batch: int, grad_accum: int = 1, **resources):
    spec = spec_from_dict(raw_spec(tmp_path, global_batch, grad_accum, **resources))
    root = tmp_path / "runs"
    return spec, make_plan(spec, root / "tiny-1", root, python="/opt/venv/bin/python")


MULTI_NODE = {"rdzv_endpoint": "node0.cluster:29400"}

SPLITS = [  # global batch, nodes, processes per node, grad accumulation -> micro batch (by hand)
    (32, 1, 1, 1, 32),
    (32, 1, 2, 1, 16),
    (32, 1, 2, 4, 4),
    (48, 2, 3, 2, 4),  # 6 ranks
    (8, 2, 2, 2, 1),  # the smallest: one image per rank per micro step
    (96, 1, 4, 3, 8),
]


@pytest.mark.parametrize("global_batch, nodes, processes, grad_accum, micro", SPLITS)
def test_plan_splits_the_global_batch_over_ranks_and_accumulation(
    tmp_path, global_batch, nodes, processes, grad_accum, micro
):
    extra = MULTI_NODE if nodes > 1 else {}
    spec, plan = plan_of(tmp_path, global_batch, grad_accum, nodes=nodes, processes=processes, **extra)
    assert plan.problems == ()
    assert plan.world_size == nodes * processes and plan.processes_per_node == processes
    assert (plan.micro_batch_size, plan.grad_accum_steps, plan.global_batch_size) == (micro, grad_accum, global_batch)
    assert plan.micro_batch_size * plan.world_size * plan.grad_accum_steps == plan.global_batch_size
    assert spec.micro_batch_size == micro  # what the trainer hands its data stream
    lines = plan.describe()
    assert (
        f"batch           {global_batch} global = {micro} per rank x {nodes * processes} rank(s) x {grad_accum} "
        "accumulation step(s)" in lines
    )
    assert f"world size      {nodes * processes} ({processes} process(es) x {nodes} node(s))" in lines
    assert any(f"(micro batch {micro})" in line for line in plan.estimate)  # activation memory is per micro batch
    assert plan.launcher == ("local" if nodes * processes == 1 else "torchrun")


def test_gpus_per_node_sets_the_ranks_per_node_of_the_split(tmp_path):
    _, plan = plan_of(tmp_path, 64, 2, launcher="slurm", nodes=2, gpus_per_node=4, device="cuda")
    assert plan.processes_per_node == 4 and plan.world_size == 8
    assert (plan.micro_batch_size, plan.grad_accum_steps) == (4, 2)  # 64 / (2 nodes x 4 GPUs x 2)


@pytest.mark.parametrize(
    "global_batch, nodes, processes, grad_accum, multiple",
    [
        (30, 1, 4, 1, 4),  # 30 images over 4 ranks
        (32, 1, 2, 3, 6),  # divides the ranks, not ranks x accumulation
        (4, 1, 2, 4, 8),  # smaller than one image per rank per micro step
        (48, 2, 2, 5, 20),  # 2 nodes x 2 ranks x 5
        (33, 1, 1, 2, 2),  # one rank, odd batch, accumulation 2
    ],
)
def test_a_global_batch_that_does_not_split_is_refused_with_the_multiple_to_use(
    tmp_path, global_batch, nodes, processes, grad_accum, multiple
):
    extra = MULTI_NODE if nodes > 1 else {}
    with pytest.raises(SpecError) as caught:
        plan_of(tmp_path, global_batch, grad_accum, nodes=nodes, processes=processes, **extra)
    message = str(caught.value)
    assert (
        f"train.global_batch_size {global_batch} does not split over {nodes * processes} rank(s) x {grad_accum} "
        "accumulation step(s)" in message
    )
    assert f"use a multiple of {multiple}" in message


def test_a_split_refused_through_overrides_names_the_setting_and_the_multiple():
    base = "name: t\ntrain: {steps: 10, global_batch_size: 64}\nresources: {launcher: torchrun}\n"
    assert parse_spec(base, overrides=["resources.processes=4", "train.grad_accum_steps=2"]).micro_batch_size == 8
    with pytest.raises(
        SpecError, match=r"does not split over 4 rank\(s\) x 3 accumulation step\(s\); use a multiple of 12"
    ):
        parse_spec(base, overrides=["resources.processes=4", "train.grad_accum_steps=3"])


@pytest.mark.parametrize("global_batch, processes, grad_accum", [(32, 2, 4), (48, 3, 2), (24, 1, 3)])
def test_one_optimizer_step_trains_on_exactly_the_global_batch_of_distinct_images(
    tmp_path, global_batch, processes, grad_accum
):
    """What the plan promises is what the ranks draw: grad_accum micro batches each, global_batch images in all."""
    spec, plan = plan_of(tmp_path, global_batch, grad_accum, processes=processes)
    per_step = []
    for rank in range(plan.world_size):
        stream = EpochBatches(500, spec.micro_batch_size, rank, plan.world_size, spec.train.seed, False, DataPosition())
        for batch in islice(iter(stream), grad_accum):  # the first optimizer step of this rank
            assert len(batch) == plan.micro_batch_size
            per_step.extend(index for index, _ in batch)
    assert len(per_step) == len(set(per_step)) == global_batch
