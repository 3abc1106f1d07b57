"""A trained model as an MLflow model of its job's run: a pyfunc whose `predict` draws images.

Logged by the job itself at the end of a finished job (tracking.log_model, on global rank 0) and by
`orch export JOB --to-mlflow`; registered as a new version of tracking.register_as (or --register-as)
when one is named. What the logged model (artifact path `model` of the run) holds:

    MLmodel, requirements.txt, python_env.yaml        MLflow's: the pyfunc flavor, pinned requirements, signature
    mlflow_entry.py                                   the file MLflow runs to get the OrchPyfunc (no pickle)
    artifacts/checkpoint/ema.safetensors              the checkpoint's EMA weights (model.safetensors: --no-ema)
    artifacts/checkpoint/spec.yaml, model_input.json  the spec and what the network takes: they rebuild the network
    code/orchestrator, code/model, code/launch        orch's code, so the model loads where orch is not installed

A latent model's VAE and a text model's caption encoder stay what the spec names (a Hugging Face id or a
path), loaded when the model draws, as `orch sample` loads them: nothing is downloaded while logging.

The predict contract. `model_input` is a pandas DataFrame (or a dict of columns, or a list of row dicts);
one row asks for images:
    class           int    class-conditional models (required there): the label, 0..K-1
    caption         str    text-conditioned models (required there): the caption
    n               int    images for the row (default 1; required for an unconditional model)
    seed            int    default 0
    steps           int    denoising steps (default: the spec's sample.steps)
    guidance_scale  float  classifier-free guidance (default: the spec's sample.guidance_scale)
    sampler         str    ddpm, ddim, dpm_solver++, euler or heun (default: the spec's sample.sampler)
It returns a numpy uint8 array (N, H, W, C): N = the rows' n summed, in row order (a row's n images one after
another), C = 1 (grey) or 3 (RGB). Rows that share seed, steps, guidance_scale and sampler are drawn as one
`orch sample` call, in row order: the rows `class` 3 and 5 with seed 11 give, bitwise on one machine, the images of
`orch sample JOB --class 3 --class 5 --num 1 --seed 11` (see orchestrator/trained/sampling.py on what fixes them).
The model's signature lists its columns: MLflow drops others (with a warning) and refuses a required one missing or
a column of the wrong type (an integer column with an empty cell included: give every row a value, or none). Inputs
the model cannot honour (a class out of range, guidance without a null class) raise MlflowException
(INVALID_PARAMETER_VALUE: HTTP 400 when served).
The loaded model draws on the GPU when one is visible, as `orch sample` does (CUDA_VISIBLE_DEVICES= keeps it on the
CPU; `loaded.unwrap_python_model().model.to(device)` moves it), 64 images a batch. No load-time model_config: MLflow
takes one only from a model logged with it, and logs it as params of the run, among the job's own.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.types import ColSpec, Schema, TensorSpec

from orchestrator.components.images import to_uint8
from orchestrator.components.model_input import ModelInput
from orchestrator.errors import UserError
from orchestrator.jobs.checkpoints import resolve_checkpoint
from orchestrator.layout import EMA_FILE, MODEL_INPUT_FILE, SPEC_FILE
from orchestrator.specs.base import MAX_CLASSES, MAX_COUNT, MAX_SEED, MAX_TIMESTEPS
from orchestrator.specs.job import JobSpec
from orchestrator.tracking import MLFLOW_CLIENT_ENV, first_line
from orchestrator.trained import sampling

ARTIFACT_PATH = "model"  # the model's name in its run: runs:/<run id>/model
CHECKPOINT_ARTIFACT = "checkpoint"
CODE_PACKAGES = ("orchestrator", "model", "launch")  # orch's code, logged with the model
# What the logged code imports to draw (orch's own dependencies, pinned to the versions that logged it).
REQUIREMENTS = ("torch", "diffusers", "safetensors", "pydantic", "pyyaml", "pillow", "numpy", "pandas", "mlflow")
TEXT_REQUIREMENTS = ("sentence-transformers", "transformers")
OPTIONAL_COLUMNS = {"n": "long", "seed": "long", "steps": "long", "guidance_scale": "double", "sampler": "string"}
CONDITION_COLUMNS = {"class": "class", "text": "caption"}  # spec.model.condition -> the column that conditions


@dataclass(frozen=True)
class Request:
    """One row of predict's input: n images of one label or caption, drawn with these settings."""

    label: int
    caption: str | None
    n: int
    seed: int
    steps: int | None
    guidance: float | None
    sampler: str | None

    @property
    def settings(self) -> tuple:
        """What makes rows one `orch sample` call."""
        return (self.seed, self.steps, self.guidance, self.sampler)


class OrchPyfunc(mlflow.pyfunc.PythonModel):
    """An orch checkpoint as an MLflow pyfunc: predict draws images (the contract: this module's docstring)."""

    def load_context(self, context) -> None:
        """Build the network of the logged spec with the logged weights (on cuda if visible, else the CPU)."""
        folder = Path(context.artifacts[CHECKPOINT_ARTIFACT])
        self.spec, checkpoint = resolve_checkpoint(str(folder), folder)
        ema = (checkpoint / EMA_FILE).is_file()
        self.model = sampling.load_model(self.spec, checkpoint, ema=ema)
        self.model_input = sampling.model_input_of(self.spec, checkpoint, ema)
        self.batch_size = 64

    def predict(self, context, model_input: pd.DataFrame, params=None) -> np.ndarray:
        """Images for the rows of `model_input`: numpy uint8 (N, H, W, C), in row order."""
        try:
            requests = parse_requests(model_input, self.spec.model.condition)
            return draw(self.model, self.spec, self.model_input, requests, self.batch_size)
        except UserError as err:  # a label out of range, guidance without a null class, ...
            raise MlflowException.invalid_parameter_value(str(err)) from None


def parse_requests(model_input, condition: str) -> list[Request]:
    """predict's input as requests; UserError naming the column and row for anything malformed."""
    frame = _frame(model_input)
    wanted = CONDITION_COLUMNS.get(condition)
    for column, needs in CONDITION_COLUMNS.items():
        if needs in frame.columns and column != condition:
            model_kind = "unconditional" if condition == "none" else f"{condition}-conditioned"
            hint = f": give `{wanted}`" if wanted else ": give `n`, the number of images"
            raise UserError(f"column `{needs}` needs a {column}-conditioned model; this one is {model_kind}{hint}")
    if wanted and wanted not in frame.columns:
        raise UserError(f"this model is {condition}-conditioned: give a column `{wanted}` (one image per row)")
    if not wanted and "n" not in frame.columns:
        raise UserError("this model is unconditional: give a column `n`, the number of images")
    unknown = sorted(set(frame.columns) - set(OPTIONAL_COLUMNS) - {wanted})
    if unknown:
        known = ", ".join(sorted({*OPTIONAL_COLUMNS, *([wanted] if wanted else [])}))
        raise UserError(f"unknown column(s) {', '.join(map(str, unknown))}; this model takes {known}")
    requests = []
    for row, values in enumerate(frame.to_dict("records")):
        caption = values.get("caption")
        if condition == "text" and (not isinstance(caption, str) or not caption.strip()):
            raise UserError(f"row {row}: caption must be a non-empty text, got {caption!r}")
        label = _number(values, row, "class", 0, MAX_CLASSES) if condition == "class" else 0
        if label is None:
            raise UserError(f"row {row}: class is empty")
        sampler = values.get("sampler")
        requests.append(
            Request(
                label=label,
                caption=caption if condition == "text" else None,
                n=_number(values, row, "n", 1, MAX_COUNT) or 1,
                seed=_number(values, row, "seed", 0, MAX_SEED) or 0,
                steps=_number(values, row, "steps", 1, MAX_TIMESTEPS),
                guidance=_number(values, row, "guidance_scale", -1e6, 1e6, integer=False),
                sampler=None if _missing(sampler) else str(sampler),
            )
        )
    return requests


def _number(values: dict, row: int, column: str, low: float, high: float, integer: bool = True) -> float | int | None:
    """Row `row`'s value of `column` checked against low..high (None where it is empty)."""
    value = values.get(column)
    if _missing(value):
        return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise UserError(f"row {row}: {column} must be a number, got {value!r}") from None
    if not math.isfinite(x) or not low <= x <= high or (integer and x != int(x)):
        kind = "an integer" if integer else "a number"
        raise UserError(f"row {row}: {column} must be {kind} in {low:g}..{high:g}, got {value!r}")
    return int(x) if integer else x


def _frame(model_input) -> pd.DataFrame:
    if isinstance(model_input, pd.DataFrame):
        return model_input
    if isinstance(model_input, dict):
        scalars = all(np.ndim(v) == 0 for v in model_input.values())
        return pd.DataFrame([model_input] if scalars else model_input)
    if isinstance(model_input, list) and all(isinstance(row, dict) for row in model_input):
        return pd.DataFrame(model_input)
    raise UserError(
        f"give a pandas DataFrame, a dict of columns or a list of row dicts, got {type(model_input).__name__}"
    )


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def draw(model, spec: JobSpec, model_input: ModelInput, requests: list[Request], batch_size: int = 64) -> np.ndarray:
    """The requests' images through sampling.sample_images, one call per distinct settings: (N, H, W, C) uint8."""
    rows = [request for request in requests for _ in range(request.n)]
    c, h, w = model_input.image_shape
    out = np.zeros((len(rows), h, w, c), dtype=np.uint8)
    groups: dict[tuple, list[int]] = {}
    for position, request in enumerate(rows):
        groups.setdefault(request.settings, []).append(position)
    for (seed, steps, guidance, sampler), positions in groups.items():
        chosen = [rows[p] for p in positions]
        text = None
        if spec.model.condition == "text":
            text = sampling.encode_prompts(model_input, [r.caption for r in chosen])
        images = sampling.sample_images(
            model,
            spec,
            [r.label for r in chosen],
            sampler=sampler,
            steps=steps,
            guidance=guidance,
            seed=seed,
            batch_size=batch_size,
            model_input=model_input,
            text=text,
        )  # (B, C, H, W) in [-1, 1]
        out[positions] = to_uint8(images)  # (B, H, W, C)
    return out


# ---------------------------------------------------------------------------------------------
# Logging
# ---------------------------------------------------------------------------------------------


def signature(spec: JobSpec, model_input: ModelInput) -> ModelSignature:
    """The columns this model takes (its condition's required) and the images it returns."""
    condition = CONDITION_COLUMNS.get(spec.model.condition)
    columns = [ColSpec("long" if condition == "class" else "string", condition)] if condition else []
    columns += [ColSpec(kind, name, required=not condition and name == "n") for name, kind in OPTIONAL_COLUMNS.items()]
    c, h, w = model_input.image_shape
    return ModelSignature(inputs=Schema(columns), outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, h, w, c))]))


def requirements(spec: JobSpec) -> list[str]:
    """The pinned pip requirements of the logged code (local version labels such as +cpu dropped)."""
    names = REQUIREMENTS + (TEXT_REQUIREMENTS if spec.model.condition == "text" else ())
    pinned = []
    for name in names:
        try:
            pinned.append(f"{name}=={metadata.version(name).split('+')[0]}")
        except metadata.PackageNotFoundError:
            pinned.append(name)
    return pinned


def _stage_checkpoint(checkpoint: Path, folder: Path, ema: bool) -> Path:
    """The checkpoint's weights (hard-linked where possible), spec.yaml and model_input.json in `folder`."""
    folder.mkdir(parents=True)
    weights = sampling.weights_file(checkpoint, ema)
    for source in (weights, checkpoint / SPEC_FILE, checkpoint / MODEL_INPUT_FILE):
        if not source.is_file():
            continue
        target = folder / source.name
        try:
            os.link(source, target)
        except OSError:  # another filesystem, or no hard links there
            shutil.copyfile(source, target)
    return folder


@contextmanager
def _fluent_defaults(uri: str, experiment_id: str):
    """MLflow's process-wide defaults set to `uri` and `experiment_id` for the block, and put back after (a test's or a
    notebook's process keeps its own): Model.log takes its tracking and registry URI from them, and files a new model
    under the active experiment (else Default), not under its run's. Set through their environment variables, as
    mlflow.set_tracking_uri / set_experiment would also export them."""
    from mlflow.tracking import fluent
    from mlflow.tracking._tracking_service import utils  # mlflow is pinned: its two private globals

    names = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID")
    saved_env = {name: os.environ.get(name) for name in names}
    saved = (utils._tracking_uri, fluent._active_experiment_id)
    utils._tracking_uri, fluent._active_experiment_id = None, None  # unset: the environment decides
    os.environ.update(MLFLOW_TRACKING_URI=uri, MLFLOW_EXPERIMENT_ID=experiment_id)
    try:
        yield
    finally:
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        utils._tracking_uri, fluent._active_experiment_id = saved


def log_model(
    checkpoint: Path,
    uri: str,
    run_id: str,
    register_as: str | None = None,
    ema: bool = True,
    step: int = 0,
    artifact_path: str = ARTIFACT_PATH,
):
    """Log the checkpoint (a step-N directory) as the pyfunc model `artifact_path` of run `run_id` at `uri`, and
    register it as a new version of `register_as` if given; return MLflow's ModelInfo. Errors are MLflow's."""
    for name, value in MLFLOW_CLIENT_ENV.items():  # no minutes-long retries of a server that is away
        os.environ.setdefault(name, value)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # not into the job's log
    spec, checkpoint = resolve_checkpoint(str(checkpoint), Path(checkpoint))
    model_input = sampling.model_input_of(spec, checkpoint, ema)
    experiment_id = mlflow.MlflowClient(tracking_uri=uri).get_run(run_id).info.experiment_id
    with (
        _fluent_defaults(uri, experiment_id),
        tempfile.TemporaryDirectory(prefix="orch-mlflow-model-") as tmp,
        warnings.catch_warnings(),
    ):
        # an input example would make MLflow load the model and draw with it while logging: the signature says it all
        warnings.filterwarnings("ignore", message=".*input example was not provided", category=UserWarning)
        staged = _stage_checkpoint(checkpoint, Path(tmp) / CHECKPOINT_ARTIFACT, ema)
        return Model.log(
            artifact_path=None,
            name=artifact_path,
            flavor=mlflow.pyfunc,
            run_id=run_id,
            python_model=str(Path(__file__).with_name("mlflow_entry.py")),  # models from code: nothing pickled
            artifacts={CHECKPOINT_ARTIFACT: str(staged)},
            code_paths=[str(Path(__import__(package).__file__).parent) for package in CODE_PACKAGES],
            pip_requirements=requirements(spec),
            signature=signature(spec, model_input),
            registered_model_name=register_as,
            await_registration_for=0,  # an OSS registry makes the version READY at once; never wait on another
            step=step,
            metadata={
                "orch.weights": "ema" if ema else "raw",
                "orch.spec_digest": spec.digest(),
                "orch.checkpoint": str(checkpoint),
                "orch.condition": spec.model.condition,
            },
        )


class ModelLogError(UserError):
    """The tracking server refused or could not take the model (`orch export --to-mlflow`: exit 2)."""


def export_to_mlflow(
    checkpoint: Path,
    uri: str,
    run_id: str | None,
    experiment: str,
    run_name: str,
    artifact_location: str | None,
    register_as: str | None = None,
    ema: bool = True,
) -> tuple[str, object]:
    """`orch export --to-mlflow`: log the checkpoint into run `run_id`, or into a new (FINISHED) run `run_name` of
    `experiment` when None; return (the run id, MLflow's ModelInfo). ModelLogError when MLflow fails."""
    for name, value in MLFLOW_CLIENT_ENV.items():
        os.environ.setdefault(name, value)
    from orchestrator.tracking import get_or_create_experiment

    client = mlflow.MlflowClient(tracking_uri=uri)
    created = run_id is None
    step = _checkpoint_step(Path(checkpoint))
    try:
        if run_id is None:
            experiment_id = get_or_create_experiment(client, experiment, artifact_location)
            tags = {"orch.checkpoint": str(checkpoint), "mlflow.note.content": f"orch export of {checkpoint}"}
            run_id = client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id
        info = log_model(checkpoint, uri, run_id, register_as=register_as, ema=ema, step=step)
        if created:
            client.set_terminated(run_id, "FINISHED")
    except (MlflowException, OSError) as err:  # the server away (requests' errors are OSErrors) or refusing
        raise ModelLogError(f"could not log the model to MLflow at {uri}: {first_line(err)}") from None
    return run_id, info


def _checkpoint_step(checkpoint: Path) -> int:
    """The step of a step-N checkpoint directory (0 if its name does not say)."""
    step = checkpoint.name.removeprefix("step-")
    return int(step) if step.isdigit() else 0
