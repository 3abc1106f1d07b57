"""The sweep spec: a job spec, a search space over its fields, how to search it, and what to optimise.

A spec of its own kind (`kind: sweep` at the top), or built from `orch sweep SPEC --grid K=V1,V2 ...`. Every trial
is an ordinary job whose spec is the base spec with the trial's values applied as `--set` overrides; the trials'
specs are built with the job spec's own validator before any trial starts (`trial_specs`). Nothing here imports
torch or optuna.

    kind: sweep
    name: lr-sweep
    spec: dit_digits.yaml                 # relative to this file
    set: [train.steps=500]                # applied to every trial
    method: grid                          # grid, random or tpe
    space:
      train.learning_rate: {grid: [1e-4, 3e-4]}
      model.preset: {choice: [DiT-S/2, DiT-B/2]}
      ema.decay: {loguniform: [0.99, 0.9999]}   # random / tpe only
    objective: {metric: eval/fd_digits}   # or loss (the final window's); direction from the metric
"""

from __future__ import annotations

import itertools
import json
import re
import time
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, field_validator, model_validator

from orchestrator.specs.base import Section, SpecError, load_yaml_with_lines, parse_override, validate_tree
from orchestrator.specs.job import ALIASES, EVAL_METRIC_KEYS, HIGHER_IS_BETTER, JobSpec, parse_spec

SWEEP_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
MAX_CHECKED_TRIALS = 4096  # grid points (and choice combinations) whose specs are built before a sweep starts
TRAINING_OBJECTIVES = ("loss",)  # what every job reports besides its evaluations (the last logged window's loss)
Scalar = str | int | float | bool | None
EXPONENT = re.compile(r"^[-+]?[0-9]+(\.[0-9]*)?[eE][-+]?[0-9]+$")


class AxisSpec(Section):
    """One field of the search space: exactly one of grid, choice or loguniform."""

    grid: list[Scalar] | None = None
    """Values tried in every combination with the other grid axes (method grid), or drawn like choice otherwise."""
    choice: list[Scalar] | None = None
    """Values the sampler picks from (method grid: tried like grid)."""
    loguniform: tuple[float, float] | None = None
    """[low, high], drawn log-uniformly (method random or tpe)."""

    @field_validator("grid", "choice", mode="before")
    @classmethod
    def _exponents_are_numbers(cls, values: Any) -> Any:
        """`1e-4` is a string to YAML 1.1 (it wants `1.0e-4`); a sweep over it means the number."""
        if not isinstance(values, list):
            return values
        return [float(v) if isinstance(v, str) and EXPONENT.match(v.strip()) else v for v in values]

    @model_validator(mode="after")
    def _one_kind(self) -> AxisSpec:
        given = [kind for kind in ("grid", "choice", "loguniform") if getattr(self, kind) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of grid, choice, loguniform (got {', '.join(given) or 'none'})")
        values = self.values
        if values is not None and not values:
            raise ValueError(f"the {given[0]} is empty: give at least one value")
        if self.loguniform is not None:
            low, high = self.loguniform
            if not 0 < low < high:
                raise ValueError(f"loguniform needs 0 < low < high, got [{low}, {high}]")
        return self

    @property
    def values(self) -> list[Scalar] | None:
        """The discrete values of a grid or choice axis; None for a continuous one."""
        return self.grid if self.grid is not None else self.choice

    def describe(self) -> str:
        if self.loguniform is not None:
            return f"loguniform({self.loguniform[0]:g}, {self.loguniform[1]:g})"
        kind = "grid" if self.grid is not None else "choice"
        return f"{kind}({', '.join(str(v) for v in self.values)})"


class ObjectiveSpec(Section):
    metric: str = "loss"
    """What a trial is scored by: `loss` (the last logged window's training loss) or an evaluation metric the job logs
    (`eval/fd_digits`, `eval/fid`, ...; the value at the job's last evaluation)."""
    direction: Literal["minimize", "maximize"] | None = None
    """Empty: maximize accuracy, precision and recall, minimize everything else."""

    @model_validator(mode="after")
    def _known_metric(self) -> ObjectiveSpec:
        known = [*TRAINING_OBJECTIVES, *(k for keys in EVAL_METRIC_KEYS.values() for k in keys)]
        if self.key not in known:
            raise ValueError(f"objective.metric {self.metric!r} is not a metric jobs log; choose one of {known}")
        return self

    @property
    def key(self) -> str:
        """The metric's MLflow key (`fid` is accepted for `eval/fid`)."""
        if self.metric in TRAINING_OBJECTIVES or self.metric.startswith("eval/"):
            return self.metric
        return f"eval/{self.metric}"

    @property
    def resolved_direction(self) -> str:
        return self.direction or ("maximize" if self.key in HIGHER_IS_BETTER else "minimize")


class SweepSpec(Section):
    kind: Literal["sweep"] = "sweep"
    """Marks a sweep spec."""
    name: str = Field(pattern=SWEEP_NAME_PATTERN)
    """The sweep's name: its folder `<root>/sweeps/<name>/`, its Optuna study, its MLflow parent run; trial jobs are
    `<name>-tNNN`."""
    description: str = ""
    """Free text: the parent run's description in MLflow."""
    spec: str
    """The job spec every trial starts from (relative paths: relative to the sweep file)."""
    set: list[str] = []
    """`KEY.PATH=VALUE` overrides applied to every trial, before the trial's own values."""
    method: Literal["grid", "random", "tpe"] = "grid"
    """`grid`: every combination of the grid and choice axes (Optuna's GridSampler); `random` (RandomSampler) or
    `tpe` (TPESampler, Bergstra et al. 2011): `trials` draws."""
    trials: int | None = Field(None, ge=1)
    """Trials to run; empty: the grid's size (method grid; required otherwise)."""
    space: dict[str, AxisSpec]
    """The fields searched, by dotted spec path."""
    objective: ObjectiveSpec = ObjectiveSpec()
    storage: str | None = None
    """Optuna's storage: empty is sqlite in the sweep's folder; a database URL (postgresql://, mysql://) lets the
    sweep be resumed from another machine."""
    max_parallel: int = Field(1, ge=1)
    """Trials running at once (on one machine they share it; with launcher slurm, jobs queued at once)."""
    pruner: Literal["none", "median"] = "none"
    """`median`: stop a trial whose intermediate objective (each evaluation; for loss each logged window) is worse
    than the median of earlier trials at the same step (Optuna's MedianPruner)."""
    pruner_warmup_steps: int = Field(0, ge=0)
    """Steps of a trial before the pruner may stop it."""
    seed: int = 0
    """Seed of the sampler."""

    @model_validator(mode="after")
    def _searchable(self) -> SweepSpec:
        if not self.space:
            raise ValueError("the search space is empty: give at least one axis (--grid KEY=V1,V2 or `space:`)")
        continuous = [key for key, axis in self.space.items() if axis.loguniform is not None]
        if self.method == "grid" and continuous:
            raise ValueError(
                f"method grid tries every combination of values; {', '.join(continuous)} is loguniform: use method "
                "random or tpe, or give grid values"
            )
        if self.method != "grid" and self.trials is None:
            raise ValueError(f"method {self.method} draws `trials` trials: set trials (--trials N)")
        return self

    @property
    def grid_size(self) -> int:
        size = 1
        for axis in self.space.values():
            size *= len(axis.values or ())
        return size

    @property
    def n_trials(self) -> int:
        if self.method == "grid":
            return min(self.trials or self.grid_size, self.grid_size)
        return self.trials

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json", exclude_none=True), sort_keys=False)


def override_text(key: str, value: Scalar) -> str:
    """A trial's value as a `--set` override (JSON is YAML: strings stay strings, numbers numbers)."""
    return f"{key}={json.dumps(value)}"


def trial_overrides(params: dict[str, Scalar]) -> list[str]:
    """The `--set` overrides of a trial's parameters, in a stable order."""
    return [override_text(key, params[key]) for key in sorted(params)]


def parse_axis_option(option: str, kind: str) -> tuple[str, AxisSpec]:
    """`KEY=V1,V2,...` of --grid / --choice, or `KEY=LOW,HIGH` of --loguniform: the key and its axis (each value read
    as YAML, as --set reads it)."""
    key, sep, text = option.partition("=")
    if not sep or not key.strip():
        example = f"--{kind} train.learning_rate=1e-4,3e-4"
        raise SpecError(f"--{kind} {option!r}: expected KEY.PATH=V1,V2,..., e.g. {example}")
    values = [parse_override(f"x={part.strip()}")[1] for part in text.split(",") if part.strip()]
    if not values:
        raise SpecError(f"--{kind} {option}: the values are empty; give at least one, e.g. {key}=1e-4,3e-4")
    path, _ = parse_override(f"{key.strip()}=0", ALIASES)
    try:
        axis = AxisSpec(**{kind: values})
    except ValueError as err:
        raise SpecError(f"--{kind} {option}: {_first_message(err)}") from None
    return ".".join(path), axis


def _first_message(err: ValueError) -> str:
    errors = getattr(err, "errors", None)
    if callable(errors):
        first = errors()[0]
        return first["msg"].removeprefix("Value error, ")
    return str(err)


def load_sweep_file(path: str | Path) -> dict[str, Any]:
    """The raw mapping of a `kind: sweep` file, with `spec` resolved relative to it."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise SpecError(f"cannot read sweep spec {path}: {err.strerror}") from None
    raw, _ = load_yaml_with_lines(text, str(path), empty_hint="it needs `kind: sweep`, `name`, `spec` and `space`")
    if isinstance(raw.get("spec"), str) and not Path(raw["spec"]).is_absolute():
        raw["spec"] = str((path.parent / raw["spec"]).resolve())
    return raw


def build_sweep(raw: dict[str, Any], source: str) -> SweepSpec:
    """Validate a sweep's raw mapping into a SweepSpec; SpecError naming every problem."""
    return validate_tree(SweepSpec, raw, source, {})


def read_base(sweep: SweepSpec) -> str:
    """The text of the job spec file the trials start from (kept in the sweep's folder: a resume reads that copy)."""
    try:
        return Path(sweep.spec).read_text()
    except OSError as err:
        raise SpecError(f"sweep {sweep.name}: cannot read the job spec {sweep.spec}: {err.strerror}") from None


def trial_spec(sweep: SweepSpec, base_text: str, params: dict[str, Scalar], label: str | None = None) -> JobSpec:
    """The spec of one trial: the job spec file's text with the sweep's `set` and the trial's values as `--set`
    overrides, validated as `orch submit --set` validates (relative paths: relative to the spec file). With no
    params: the sweep's base spec."""
    if spec_kind_of_text(base_text) != "job":
        raise SpecError(f"sweep {sweep.name}: {sweep.spec} is not a job spec (it has a `kind:` of its own)")
    overrides = [*sweep.set, *trial_overrides(params)]
    return parse_spec(
        base_text, source=label or sweep.spec, overrides=overrides, base_dir=Path(sweep.spec).resolve().parent
    )


def spec_kind_of_text(text: str) -> str:
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError:
        return "job"  # parse_spec says where
    return raw.get("kind", "job") if isinstance(raw, dict) else "job"


def combinations(sweep: SweepSpec) -> list[dict[str, Scalar]]:
    """Every combination of the discrete axes' values with the continuous axes at their two ends: the trials whose
    specs are checked before a sweep starts (the first MAX_CHECKED_TRIALS of them)."""
    keys = sorted(sweep.space)
    choices = [sweep.space[k].values or list(sweep.space[k].loguniform) for k in keys]
    return [dict(zip(keys, values)) for values in itertools.islice(itertools.product(*choices), MAX_CHECKED_TRIALS)]


def check_trials(sweep: SweepSpec, base_text: str) -> list[JobSpec]:
    """Build every trial's spec (see `combinations`) with the job spec's validator and check that each logs the
    objective; one SpecError naming every bad combination, before any trial starts."""
    problems, specs = [], []
    for params in combinations(sweep):
        label = " ".join(trial_overrides(params))
        try:
            spec = trial_spec(sweep, base_text, params, f"trial {label}")
        except SpecError as err:
            lines = str(err).splitlines()
            detail = "; ".join(line.strip() for line in lines[1:]) or lines[0]
            problems.append(f"{label}: {detail}")
            continue
        missing = objective_problem(sweep, spec)
        if missing:
            problems.append(f"{label}: {missing}")
        specs.append(spec)
    if problems:
        shown = problems[:10] + ([f"... and {len(problems) - 10} more"] if len(problems) > 10 else [])
        raise SpecError(
            f"sweep {sweep.name}: {len(problems)} of the trials cannot run (no trial was started)\n  "
            + "\n  ".join(shown)
        )
    return specs


def objective_problem(sweep: SweepSpec, spec: JobSpec) -> str | None:
    """Why a trial's job would never log the sweep's objective, or None."""
    key = sweep.objective.key
    if key in TRAINING_OBJECTIVES:
        return None
    if spec.eval.every is None:
        return f"objective {key} is an evaluation metric, but the job never evaluates: set eval.every and eval.metrics"
    if key not in spec.eval.metric_keys:
        logged = ", ".join(spec.eval.metric_keys) or "nothing"
        return f"objective {key} is not logged: eval.metrics {', '.join(spec.eval.metrics)} log {logged}"
    return None


def sweep_from_command(
    spec_file: str,
    axes: list[tuple[str, str]],
    overrides: tuple[str, ...] = (),
    **options,
) -> tuple[SweepSpec, str]:
    """The sweep `orch sweep SPEC` describes: SPEC is a job spec (then --grid / --choice / --loguniform make the
    space) or a `kind: sweep` file (whose space they extend); `options` (name, method, trials, storage,
    max_parallel, pruner, objective, direction) given as not None override the file's. The sweep and the job spec's
    text."""
    path = Path(spec_file)
    from orchestrator.specs.job import spec_kind

    if spec_kind(path) == "sweep":
        raw, source = load_sweep_file(path), str(path)
    else:
        if not path.is_file():
            raise SpecError(f"cannot read spec {path}: no such file")
        raw, source = {"spec": str(path.resolve())}, "orch sweep"
    space = dict(raw.get("space") or {})
    for kind, option in axes:
        key, axis = parse_axis_option(option, kind)
        space[key] = axis.model_dump(exclude_none=True)
    raw["space"] = space
    raw["set"] = [*(raw.get("set") or []), *overrides]
    objective = dict(raw.get("objective") or {})
    for key, value in (("metric", options.pop("objective", None)), ("direction", options.pop("direction", None))):
        if value is not None:
            objective[key] = value
    if objective:
        raw["objective"] = objective
    raw.update({key: value for key, value in options.items() if value is not None})
    if "name" not in raw and isinstance(raw.get("spec"), str):
        try:
            job_name = (yaml.safe_load(Path(raw["spec"]).read_text()) or {}).get("name") or "sweep"
        except (OSError, yaml.YAMLError, AttributeError):
            job_name = "sweep"
        raw["name"] = f"{job_name}-sweep-{time.strftime('%Y%m%d-%H%M%S')}"[:64]
    sweep = build_sweep(raw, source)
    return sweep, read_base(sweep)
