"""The sweep spec: axes from the command line and from a `kind: sweep` file, and every trial's spec checked up front."""

from __future__ import annotations

import pytest
import yaml

from orchestrator.specs.base import SpecError
from orchestrator.specs.sweep import check_trials, combinations, sweep_from_command

JOB = {"name": "j", "model": {"hidden_size": 32, "depth": 2, "num_heads": 2}, "train": {"steps": 4}}


def write(tmp_path, name, data) -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_a_sweep_file_with_every_kind_of_axis_draws_with_tpe(tmp_path):
    write(tmp_path, "job.yaml", JOB)
    sweep_file = {
        "kind": "sweep",
        "name": "s",
        "spec": "job.yaml",
        "method": "tpe",
        "trials": 6,
        "space": {
            "train.learning_rate": {"loguniform": ["1e-4", 1e-2]},
            "model.depth": {"choice": [2, 4]},
            "ema.decay": {"grid": ["9.9e-1", 0.999]},
        },
        "objective": {"metric": "digit_accuracy"},
    }
    sweep, base_text = sweep_from_command(write(tmp_path, "sweep.yaml", sweep_file), [("grid", "train.steps=2,3")])
    assert sweep.n_trials == 6 and sweep.objective.key == "eval/digit_accuracy"
    assert sweep.objective.resolved_direction == "maximize"
    assert sweep.space["ema.decay"].grid == [0.99, 0.999]  # YAML 1.1 reads 9.9e-1 as a string; a sweep means the number
    assert len(combinations(sweep)) == 2 * 2 * 2 * 2  # loguniform at both ends
    with pytest.raises(SpecError, match="never evaluates"):
        check_trials(sweep, base_text)


def test_every_trial_spec_is_built_and_each_bad_one_named(tmp_path):
    spec = write(tmp_path, "job.yaml", JOB)
    sweep, base_text = sweep_from_command(spec, [("grid", "model.preset=DiT-S/2,null"), ("grid", "train.steps=1,2")])
    assert sweep.name.startswith("j-sweep-") and sweep.n_trials == 4
    with pytest.raises(SpecError) as caught:
        check_trials(sweep, base_text)
    message = str(caught.value)
    assert "2 of the trials cannot run" in message and "depth=2 contradicts preset DiT-S/2" in message


@pytest.mark.parametrize(
    "axes, options, message",
    [
        ([("loguniform", "train.learning_rate=1e-4,1e-2")], {}, "method grid tries every combination"),
        ([("choice", "model.depth=2,4")], {"method": "tpe"}, "set trials"),
        ([("loguniform", "train.learning_rate=1e-2,1e-4")], {"method": "random", "trials": 2}, "0 < low < high"),
        ([("grid", "train.steps=1")], {"objective": "eval/nonsense"}, "is not a metric jobs log"),
    ],
)
def test_impossible_sweeps_are_refused(tmp_path, axes, options, message):
    with pytest.raises(SpecError, match=message):
        sweep_from_command(write(tmp_path, "job.yaml", JOB), axes, **options)


def test_side_by_side_trials_get_disjoint_gpus_and_cores_of_one_machine():
    from orchestrator.jobs.plan import Placement
    from orchestrator.sweeps.runner import machine_shares

    eight = tuple(str(i) for i in range(8))
    cores = tuple(range(32))
    # 8 GPUs, trials of 2 ranks, 3 at once: GPUs 0-1, 2-3, 4-5 and a quarter of the cores each (a share per GPU pair)
    assert machine_shares(3, 2, eight, cores) == [
        Placement(gpus=("0", "1"), cpus=tuple(range(0, 8))),
        Placement(gpus=("2", "3"), cpus=tuple(range(8, 16))),
        Placement(gpus=("4", "5"), cpus=tuple(range(16, 24))),
    ]
    assert len(machine_shares(8, 2, eight, cores)) == 4  # no more trials than the GPUs fit
    assert machine_shares(4, 8, eight, cores) == [None]  # one trial takes the whole machine: one at a time
    assert machine_shares(2, 4, eight[:5], cores) == [None]  # 5 GPUs: only one share of 4 fits
    uuids = ("GPU-a", "GPU-b")  # CUDA_VISIBLE_DEVICES may name GPUs by UUID
    assert [share.gpus for share in machine_shares(2, 1, uuids, (0, 1))] == [("GPU-a",), ("GPU-b",)]
    # on CPU the cores split evenly; more trials than cores share the whole machine
    assert machine_shares(2, 1, None, (0, 1, 2, 3, 4)) == [Placement(None, (0, 1)), Placement(None, (2, 3))]
    assert machine_shares(3, 1, None, (0, 1)) == [None, None, None]


def test_a_placed_plan_runs_its_ranks_on_its_share_only(tmp_path):
    from orchestrator.jobs.plan import Placement, make_plan
    from orchestrator.specs.job import spec_from_dict
    from tests.helpers import tiny_spec

    spec = spec_from_dict(
        yaml.safe_load(tiny_spec(tmp_path, resources={"processes": 2, "threads_per_process": None}).read_text()), "tiny"
    )
    plan = make_plan(spec, tmp_path / "runs" / "j", tmp_path / "runs", placement=Placement(gpus=None, cpus=(1,)))
    assert plan.cpus == (1,) and plan.threads_per_process == 1 and plan.launcher == "torchrun"
    assert "CUDA_VISIBLE_DEVICES" not in plan.command.env
    assert any("cpu cores       1 (this job's share" in line for line in plan.describe())
    gpu_share = Placement(gpus=("2", "3"), cpus=(4, 5, 6, 7))
    gpu_plan = make_plan(spec, tmp_path / "runs" / "k", tmp_path / "runs", placement=gpu_share)
    # what the ranks see on a GPU machine: only their share's GPUs
    assert gpu_plan.command.env["CUDA_VISIBLE_DEVICES"] == "2,3" and gpu_plan.threads_per_process == 2
    assert all(c.env["CUDA_VISIBLE_DEVICES"] == "2,3" for c in gpu_plan.node_commands)
