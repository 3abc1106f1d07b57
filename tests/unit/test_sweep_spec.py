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
