"""`orch`: the command line. It only registers commands; each one calls library functions.

Nothing heavy is imported at module level: `orch --help`, `orch list` and `orch status` never load
torch, mlflow or pydantic. Errors a user can cause print one message and exit with code 2.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from pathlib import Path

import click

from orchestrator.errors import UserError
from orchestrator.jobs.directory import ACTIVE_STATES, JobDir, JobError, JobState, find_job, list_jobs, resolve_root

USER_ERROR = 2
set_option = click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY.PATH=VALUE",
    help="Override a spec field (repeatable); beats the YAML file.",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")


def checkpoint_option(all_of_them: bool = False):
    """--checkpoint: which of a job's checkpoints a command reads (`all` where it can take several)."""
    choices = "latest, best (by the job's evaluations), " + ("all, " if all_of_them else "") + "step-N or N"
    return click.option(
        "--checkpoint", "which", default="latest", show_default=True, help=f"Which checkpoint: {choices}."
    )


def user_errors(command):
    """Print user-caused errors as one line and exit 2, without a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except UserError as err:
            _fail(str(err))

    return wrapper


def _fail(message: str):
    click.echo(f"orch: error: {message}", err=True)
    sys.exit(USER_ERROR)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--root",
    envvar="ORCH_ROOT",
    type=click.Path(file_okay=False),
    help="Folder of job directories [env ORCH_ROOT; default ./runs].",
)
@click.pass_context
def cli(ctx: click.Context, root: str | None) -> None:
    """orch: train diffusion models from declarative job specs.

    \b
    orch submit jobs/dit_digits.yaml        validate, record and run a job
    orch resume                              continue the newest unfinished job exactly
    orch list / status / logs / cancel       follow and control jobs
    orch ui                                  review runs in the MLflow UI
    """
    ctx.obj = resolve_root(root)


# ---- specs ---------------------------------------------------------------------------------


@cli.command()
@click.argument("spec_file", type=click.Path())
@set_option
@user_errors
def validate(spec_file: str, overrides: tuple[str, ...]) -> None:
    """Check a job spec (or a `kind: prepare` spec); create nothing. (Whether it can run here: `orch plan`.)"""
    from orchestrator.jobs.evaluations import evaluation_problems
    from orchestrator.jobs.plan import PlanError, check_data
    from orchestrator.specs.job import load_spec, spec_kind

    if spec_kind(spec_file) == "prepare":
        from orchestrator.specs.prepare import load_prepare_spec

        prepare_spec = load_prepare_spec(spec_file, overrides)
        if prepare_spec.input.source == "hf_dataset":  # here, not at the first image: offline nodes, typos in columns
            from orchestrator.data import hub

            hub.check(prepare_spec.input, streaming=prepare_spec.input.streaming)
        click.echo(
            f"{spec_file}: valid — prepare {prepare_spec.input.source} {prepare_spec.input.path} -> "
            f"{prepare_spec.output.path}"
        )
        return
    spec = load_spec(spec_file, overrides)
    click.echo(
        f"{spec_file}: valid — job {spec.name!r}, {spec.train.steps} steps, {spec.model.arch} on {spec.data.source}"
    )
    try:
        check_data(spec)
    except PlanError as err:
        click.secho(f"warning: {err} (submit needs it)", fg="yellow", err=True)
    problems = evaluation_problems(spec)  # weights and references: found before a job starts, never at step 10,000
    if problems:
        raise UserError(f"{spec_file}: the evaluation cannot run: " + "; ".join(problems))


@cli.command()
@click.option("--markdown", is_flag=True, help="Print the field reference as Markdown tables instead.")
def schema(markdown: bool) -> None:
    """Print the spec's JSON Schema (point a YAML editor at it for autocompletion)."""
    from orchestrator.specs.job import json_schema, reference_markdown

    click.echo(reference_markdown() if markdown else json.dumps(json_schema(), indent=2))


@cli.command()
@click.argument("spec_file", type=click.Path())
@set_option
@click.pass_obj
@user_errors
def plan(root: Path, spec_file: str, overrides: tuple[str, ...]) -> None:
    """Print what a spec would run: launcher, world size, batch split, the exact command."""
    _print_plan(*_plan(root, spec_file, overrides))


def _plan(root: Path, spec_file: str, overrides):
    from orchestrator.jobs.directory import new_job_id
    from orchestrator.jobs.plan import make_plan
    from orchestrator.specs.job import load_spec

    spec = load_spec(spec_file, overrides)
    job_id = new_job_id(spec.name)
    return spec, job_id, make_plan(spec, (root / job_id).resolve(), root.resolve())


def _print_plan(spec, job_id, the_plan) -> None:
    click.echo(f"job             {job_id} ({spec.train.steps} steps)")
    for line in the_plan.describe():
        click.echo(line)


# ---- running -------------------------------------------------------------------------------


@cli.command()
@click.argument("spec_file", type=click.Path())
@set_option
@click.option("--detach", "-d", is_flag=True, help="Return at once with the job id; the job runs in the background.")
@click.option("--dry-run", is_flag=True, help="Print the plan and create nothing.")
@click.pass_obj
@user_errors
def submit(root: Path, spec_file: str, overrides: tuple[str, ...], detach: bool, dry_run: bool) -> None:
    """Validate a spec, record a job and run it."""
    from orchestrator.jobs.plan import require_runnable
    from orchestrator.jobs.supervisor import write_plan

    spec, job_id, the_plan = _plan(root, spec_file, overrides)
    if dry_run:
        _print_plan(spec, job_id, the_plan)
        click.echo("dry run: nothing was created")
        return
    require_runnable(the_plan)

    from orchestrator.jobs.submission import keep_user_files

    job = JobDir.create(root, job_id, spec.name, spec.to_yaml(), spec.train.steps)
    keep_user_files(job, spec)
    write_plan(job, the_plan)
    click.echo(f"job {job.id}  ({job.path})")
    _start(job, detach)


@cli.command()
@click.argument("job_ref", required=False)
@set_option
@click.option("--allow-spec-change", is_flag=True, help="Accept --set changes to the job's spec (they are printed).")
@click.option("--detach", "-d", is_flag=True, help="Return at once; the job runs in the background.")
@click.pass_obj
@user_errors
def resume(root: Path, job_ref: str | None, overrides: tuple[str, ...], allow_spec_change: bool, detach: bool) -> None:
    """Continue a job (default: the newest unfinished one) from its newest checkpoint."""
    from orchestrator.jobs.plan import make_plan, require_runnable
    from orchestrator.jobs.submission import keep_user_files
    from orchestrator.jobs.supervisor import write_plan
    from orchestrator.specs.job import parse_spec, spec_changes

    job = find_job(root, job_ref, unfinished=True)
    record = job.status()
    if record.state in ACTIVE_STATES:
        raise JobError(
            f"job {job.id} is {record.state.value} (supervisor pid {record.supervisor_pid}); `orch cancel {job.id}` "
            "stops it first"
        )
    current = parse_spec(job.spec_file.read_text(), source=str(job.spec_file))
    spec = parse_spec(job.spec_file.read_text(), source=str(job.spec_file), overrides=overrides)
    changes = spec_changes(current, spec)
    if changes and not allow_spec_change:
        raise JobError(
            f"the overrides change job {job.id}'s spec:\n  "
            + "\n  ".join(changes)
            + "\nadd --allow-spec-change to resume with them"
        )
    if record.state == JobState.SUCCEEDED and record.step >= spec.train.steps:
        raise JobError(
            f"job {job.id} already finished its {record.step} steps; to train on: orch resume {job.id} --set "
            "train.steps=N --allow-spec-change"
        )
    the_plan = make_plan(spec, job.path, job.root)
    require_runnable(the_plan)
    if changes:
        kept = job.archive_spec()
        job.write_spec(spec.to_yaml())
        keep_user_files(job, spec)
        job.update(total_steps=spec.train.steps)
        click.echo(f"spec changed (previous kept as {kept.name}):\n  " + "\n  ".join(changes))
    write_plan(job, the_plan)
    checkpoint = job.latest_checkpoint()
    click.echo(f"job {job.id}: resuming from {checkpoint.name if checkpoint else 'the start (no checkpoint yet)'}")
    _start(job, detach)


@cli.command()
@click.argument("job_ref")
@click.option(
    "--node-rank",
    type=int,
    required=True,
    help="This machine's node number, 1..nodes-1 (node 0 runs `orch submit` / `orch resume`).",
)
@click.pass_obj
@user_errors
def join(root: Path, job_ref: str, node_rank: int) -> None:
    """Run this node's ranks of a multi-node job (the job directory must be on a shared filesystem)."""
    from orchestrator.jobs.supervisor import run_node

    job = find_job(root, job_ref)
    click.echo(f"job {job.id}: node {node_rank} joining; logs: {job.logs_dir / f'node-{node_rank}.log'}")
    code = run_node(job, node_rank)
    click.echo(f"job {job.id}: node {node_rank} ended with exit code {code}")
    sys.exit(code)


def _start(job: JobDir, detach: bool) -> None:
    from orchestrator.jobs.supervisor import exit_code_for, run

    plan = json.loads(job.plan_file.read_text())
    if plan["launcher"] == "slurm":
        _submit_to_slurm(job, plan)
        return

    if not detach:
        record = run(job, progress=True)
        _print_outcome(record)
        sys.exit(exit_code_for(record.state))
    from orchestrator.jobs.submission import start_detached

    start_detached(job)
    click.echo(f"detached: `orch status {job.id}`, `orch logs {job.id} --follow`, `orch cancel {job.id}`")


def _submit_to_slurm(job: JobDir, plan: dict) -> None:
    """Write the job's sbatch script and submit it; Slurm runs (and requeues) it from here on."""
    from orchestrator.jobs.submission import submit_to_slurm

    slurm_job_id = submit_to_slurm(job)
    click.echo(f"submitted to Slurm as job {slurm_job_id}; output in {job.logs_dir / f'slurm-{slurm_job_id}.out'}")
    click.echo(f"`orch status {job.id}`, `orch logs {job.id} --follow`, `orch cancel {job.id}`")


def _print_outcome(record) -> None:
    colour = {"succeeded": "green", "preempted": "yellow"}.get(record.state.value, "red")
    click.secho(
        f"{record.id}: {record.state.value} — {record.message}", fg=colour, err=record.state != JobState.SUCCEEDED
    )
    if record.mlflow_run_id:
        click.echo(f"MLflow run {_run_page_text(record.mlflow_uri, record.mlflow_experiment_id, record.mlflow_run_id)}")


def _run_page_text(uri: str, experiment_id: str | None, run_id: str) -> str:
    """A run's page in the MLflow UI (model-training view), and for a local store that `orch ui` serves it."""
    from orchestrator.tracking import run_page, served_by_orch_ui

    page = run_page(uri, experiment_id, run_id)
    return f"{page}  (`orch ui` serves {uri})" if served_by_orch_ui(uri) else page


@cli.command()
@click.argument("job_ref")
@click.option("--wait/--no-wait", default=True, help="Wait until the job has checkpointed and stopped.")
@click.option("--timeout", default=600.0, show_default=True, help="Seconds to wait.")
@click.pass_obj
@user_errors
def cancel(root: Path, job_ref: str, wait: bool, timeout: float) -> None:
    """Stop a job: it writes a checkpoint, then stops (resumable with `orch resume`)."""
    job = find_job(root, job_ref)
    record = job.status()
    if record.state not in ACTIVE_STATES:
        click.echo(f"job {job.id} is not running ({record.state.value}); nothing to cancel")
        return
    from orchestrator.jobs.submission import request_cancel

    request_cancel(job, record)
    if not wait:
        click.echo(f"job {job.id}: cancel requested")
        return
    deadline = time.time() + timeout
    while (job.is_locked() or job.status().state in ACTIVE_STATES) and time.time() < deadline:
        time.sleep(0.2)
    record = job.status()
    click.echo(f"job {job.id}: {record.state.value} — {record.message}")


# ---- sweeps --------------------------------------------------------------------------------


class _SweepGroup(click.Group):
    """`orch sweep SPEC ...` is `orch sweep run SPEC ...`; `status`, `cancel` and `resume` are its other commands."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ctx.help_option_names:
            args = ["run", *args]
        return super().parse_args(ctx, args)


@cli.group(cls=_SweepGroup)
def sweep() -> None:
    """Hyperparameter sweeps on Optuna: every trial an ordinary job, all of them child runs of one MLflow run.

    \b
    orch sweep SPEC --grid train.learning_rate=1e-4,3e-4 --grid model.depth=4,8
    orch sweep SWEEP.yaml                      a `kind: sweep` file (grid, choice, loguniform; grid, random, tpe)
    orch sweep status NAME / cancel NAME / resume NAME
    """


@sweep.command(name="run")
@click.argument("spec_file", type=click.Path())
@click.option("--grid", "grids", multiple=True, metavar="KEY=V1,V2,...", help="A grid axis (repeatable).")
@click.option("--choice", "choices", multiple=True, metavar="KEY=V1,V2,...", help="A categorical axis (repeatable).")
@click.option("--loguniform", "loguniforms", multiple=True, metavar="KEY=LOW,HIGH", help="A log-uniform axis.")
@click.option("--method", type=click.Choice(["grid", "random", "tpe"]), help="[default: the file's, else grid]")
@click.option("--trials", type=int, help="Trials to run [default: the grid's size; required for random and tpe].")
@click.option("--objective", help="Metric to optimise: loss or an eval metric, e.g. eval/fd_digits [default: loss].")
@click.option("--direction", type=click.Choice(["minimize", "maximize"]), help="[default: by the metric]")
@click.option("--name", help="The sweep's name [default: <job name>-sweep-<time>].")
@click.option("--storage", help="Optuna storage URL [default: sqlite in the sweep's folder].")
@click.option("--max-parallel", type=int, help="Trials running at once [default: 1].")
@click.option("--pruner", type=click.Choice(["none", "median"]), help="Stop bad trials early [default: none].")
@set_option
@click.option("--detach", "-d", is_flag=True, help="Return at once; the sweep runs in the background.")
@click.pass_obj
@user_errors
def sweep_run(root: Path, spec_file: str, grids, choices, loguniforms, overrides, detach, **options) -> None:
    """Run a sweep: check every trial's spec, then run the trials as jobs (`orch sweep SPEC` for short)."""
    from orchestrator.specs.sweep import sweep_from_command
    from orchestrator.sweeps import runner

    axes = [("grid", g) for g in grids] + [("choice", c) for c in choices] + [("loguniform", u) for u in loguniforms]
    the_sweep, base_text = sweep_from_command(spec_file, axes, overrides, **options)
    sweep_dir = runner.create_sweep(root, the_sweep, base_text)
    click.echo(
        f"sweep {the_sweep.name}: {the_sweep.n_trials} trial(s), {the_sweep.method}, "
        f"{the_sweep.objective.resolved_direction} {the_sweep.objective.key}; folder {sweep_dir.path}"
    )
    _run_sweep(sweep_dir, detach)


@sweep.command(name="resume")
@click.argument("name")
@click.option("--detach", "-d", is_flag=True, help="Return at once; the sweep runs in the background.")
@click.pass_obj
@user_errors
def sweep_resume(root: Path, name: str, detach: bool) -> None:
    """Continue a sweep whose process stopped: follow its running trials, restart vanished ones, start the rest."""
    from orchestrator.sweeps.directory import find_sweep

    sweep_dir = find_sweep(root, name)
    if sweep_dir.status().state == "finished":
        raise UserError(f"sweep {name} has finished; `orch sweep status {name}` shows its trials")
    _run_sweep(sweep_dir, detach)


@sweep.command(name="join")
@click.argument("name")
@click.option("--max-parallel", type=click.IntRange(1), help="Trials this process runs at once [default: the sweep's].")
@click.pass_obj
@user_errors
def sweep_join(root: Path, name: str, max_parallel: int | None) -> None:
    """Run trials of a running sweep from this machine too (it shares the job root and the sweep's storage)."""
    from orchestrator.sweeps.directory import find_sweep
    from orchestrator.sweeps.runner import join_sweep

    join_sweep(find_sweep(root, name), max_parallel=max_parallel, echo=click.echo)


def _run_sweep(sweep_dir, detach: bool) -> None:
    from orchestrator.sweeps import runner

    if detach:
        runner.start_detached(sweep_dir)
        click.echo(f"detached: `orch sweep status {sweep_dir.name}`, `orch sweep cancel {sweep_dir.name}`")
        return
    record = runner.run_sweep(sweep_dir, echo=click.echo)
    sys.exit(0 if record.state == "finished" and "0 completed" not in record.message else 1)


@sweep.command(name="status")
@click.argument("name")
@json_option
@click.pass_obj
@user_errors
def sweep_status(root: Path, name: str, as_json: bool) -> None:
    """A sweep's trials: overrides, state, step, objective; the best marked."""
    from orchestrator.sweeps.directory import find_sweep
    from orchestrator.sweeps.runner import trial_rows
    from orchestrator.tracking import run_page

    the_sweep, record, rows = trial_rows(find_sweep(root, name))
    key = the_sweep.objective.key
    if as_json:
        facts = {
            "name": record.name,
            "state": record.state,
            "message": record.message,
            "method": the_sweep.method,
            "objective": key,
            "direction": the_sweep.objective.resolved_direction,
            "n_trials": record.n_trials,
            "storage": record.storage,
            "mlflow_parent_run_id": record.parent_run_id,
            "mlflow_parent_run_page": (
                run_page(record.tracking_uri, record.experiment_id, record.parent_run_id)
                if record.parent_run_id
                else None
            ),
            "trials": rows,
        }
        click.echo(json.dumps(facts, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    title = (
        f"sweep {record.name}: {record.state} — {the_sweep.method}, {len(rows)}/{record.n_trials} trial(s), "
        f"{the_sweep.objective.resolved_direction} {key}"
    )
    table = Table(title=title, title_justify="left")
    for column in ("trial", "job", "overrides", "state", "step", key, "best"):
        table.add_column(column)
    colours = {**STATE_COLOURS, "complete": "green", "fail": "red", "pruned": "yellow"}
    for row in rows:
        step = f"{row['step']}/{row['total_steps']}" if row["step"] is not None else "-"
        table.add_row(
            str(row["trial"]),
            row["job"],
            " ".join(row["overrides"]),
            f"[{colours.get(row['state'], 'white')}]{row['state']}[/]",
            step,
            f"{row['objective']:.6g}" if row["objective"] is not None else "-",
            "*" if row["best"] else "",
        )
    Console().print(table)
    if record.parent_run_id:
        click.echo(
            f"MLflow parent run {_run_page_text(record.tracking_uri, record.experiment_id, record.parent_run_id)}"
        )
    if record.message:
        click.echo(record.message)


@sweep.command(name="cancel")
@click.argument("name")
@click.option("--wait/--no-wait", default=True, help="Wait until the running trials have checkpointed and stopped.")
@click.pass_obj
@user_errors
def sweep_cancel(root: Path, name: str, wait: bool) -> None:
    """Stop a sweep: running trials checkpoint and stop (resumable jobs), no new trial starts."""
    from orchestrator.sweeps.directory import ACTIVE, find_sweep
    from orchestrator.sweeps.runner import cancel_sweep

    sweep_dir = find_sweep(root, name)
    record = sweep_dir.status()
    if record.state != ACTIVE and record.state != "failed":
        click.echo(f"sweep {name} is not running ({record.state}); nothing to cancel")
        return
    cancel_sweep(sweep_dir, wait=wait, echo=click.echo)
    record = sweep_dir.status()
    click.echo(f"sweep {name}: {record.state if wait else 'cancel requested'} — {record.message}")


# ---- data ----------------------------------------------------------------------------------


@cli.command()
@click.argument("spec_file", type=click.Path())
@set_option
@user_errors
def prepare(spec_file: str, overrides: tuple[str, ...]) -> None:
    """Encode images (and captions) into latent shards for training; run it again to continue after a stop."""
    from orchestrator.specs.prepare import load_prepare_spec

    spec = load_prepare_spec(spec_file, overrides)  # fails fast, without torch
    if spec.input.source == "hf_dataset":  # once, before the ranks: a missing dataset or column is one message
        from orchestrator.data import hub

        hub.check(spec.input, streaming=spec.input.streaming)  # and a local copy's cache is built once, not per rank
    from orchestrator.prepare import run_local

    sys.exit(run_local(spec_file, overrides, spec.resources.processes))


# ---- using trained models ------------------------------------------------------------------


@cli.command()
@click.argument("ref", metavar="JOB_OR_CHECKPOINT")
@click.option("--num", default=8, show_default=True, help="Images per class (or in all, without classes).")
@click.option(
    "--class", "classes", multiple=True, type=int, help="Class to draw (repeatable) [default: the grid's classes]."
)
@click.option("--prompt", "prompts", multiple=True, help="Caption to draw (repeatable; text-conditioned models).")
@click.option(
    "--sampler",
    type=click.Choice(["ddpm", "ddim", "dpm_solver++", "euler", "heun"]),
    help="[default: the spec's sample.sampler]",
)
@click.option("--steps", type=int, help="Denoising steps [default: the spec's sample.steps].")
@click.option("--guidance", type=float, help="Classifier-free guidance scale [default: the spec's].")
@click.option("--seed", default=0, show_default=True, help="The same seed gives the same images.")
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False),
    required=True,
    help="Folder for one PNG per image and grid.png.",
)
@checkpoint_option()
@click.option("--no-ema", is_flag=True, help="Use the raw weights instead of the EMA weights.")
@click.option(
    "--progression",
    is_flag=True,
    help="Also save progression.png: the x0 prediction across the timesteps (sample.progression frames a row, else 8).",
)
@click.option("--batch-size", default=64, show_default=True)
@click.pass_obj
@user_errors
def sample(
    root: Path,
    ref,
    num,
    classes,
    prompts,
    sampler,
    steps,
    guidance,
    seed,
    out_dir,
    which,
    no_ema,
    progression,
    batch_size,
) -> None:
    """Draw images from a job's newest checkpoint (or a checkpoint directory), EMA weights by default."""
    from rich.progress import Progress

    from orchestrator.jobs.checkpoints import resolve_checkpoint

    spec, checkpoint = resolve_checkpoint(ref, root, which)  # before torch: a wrong name is answered at once
    condition = spec.model.condition
    if prompts and condition != "text":
        raise UserError(
            "--prompt needs a text-conditioned model; this one is conditioned on "
            f"{condition}{': use --class' if condition == 'class' else ''}"
        )
    if classes and condition != "class":
        raise UserError(
            "--class needs a class-conditional model; this one is conditioned on "
            f"{condition}{': use --prompt' if condition == 'text' else ''}"
        )
    if condition == "text" and not prompts:
        raise UserError("this model is text-conditioned: give the captions to draw with --prompt (repeatable)")
    from orchestrator.trained import sampling

    model = sampling.load_model(spec, checkpoint, ema=not no_ema)
    model_input = sampling.model_input_of(spec, checkpoint, ema=not no_ema)
    text = None
    if condition == "text":
        text = sampling.encode_prompts(model_input, [p for p in prompts for _ in range(num)])
        labels, tags, rows = (
            [0] * (len(prompts) * num),
            [f"prompt{j}" for j in range(len(prompts)) for _ in range(num)],
            len(prompts),
        )
    else:
        grid_classes = list(classes) or list(spec.sample.classes or range(min(10, sampling.num_classes_of(model))))
        labels, tags, rows = [c for c in grid_classes for _ in range(num)], None, len(grid_classes)
    sampler, steps = sampler or spec.sample.sampler, steps or spec.sample.steps
    guidance = spec.sample.guidance_scale if guidance is None else guidance
    with Progress(transient=True) as bar:
        task = bar.add_task(f"{sampler}-{steps}", total=None)
        images = sampling.sample_images(
            model,
            spec,
            labels,
            sampler=sampler,
            steps=steps,
            guidance=guidance,
            seed=seed,
            batch_size=batch_size,
            progress=lambda done, total: bar.update(task, completed=done, total=total),
            model_input=model_input,
            text=text,
        )
    sampling.write_outputs(images, labels, Path(out_dir), rows=rows, tags=tags)
    if text is not None:
        (Path(out_dir) / "prompts.txt").write_text("".join(f"prompt{j}: {p}\n" for j, p in enumerate(prompts)))
    click.echo(
        f"{len(labels)} images from {checkpoint} ({'raw' if no_ema else 'EMA'} weights, {sampler}-{steps}, guidance "
        f"{guidance}, seed {seed}) -> {out_dir}"
    )
    if progression:
        from orchestrator.specs.job import FINAL_PROGRESSION_FRAMES

        first = list(range(0, len(labels), num))  # the first image of every row
        frames = min(spec.sample.progression or FINAL_PROGRESSION_FRAMES, steps)  # as the job's own strips
        strip = sampling.progression_strip(
            model,
            spec,
            [labels[i] for i in first],
            sampler=sampler,
            steps=steps,
            guidance=guidance,
            seed=seed,
            model_input=model_input,
            text=None if text is None else {k: v[first] for k, v in text.items()},
            frames=frames,
        )
        strip.save(Path(out_dir) / "progression.png")
        click.echo(f"progression ({frames} x0 predictions a row): {Path(out_dir) / 'progression.png'}")
    click.echo(f"grid: {Path(out_dir) / 'grid.png'}")


@cli.command()
@click.argument("ref", metavar="JOB_OR_CHECKPOINT")
@click.option(
    "--format", "fmt", type=click.Choice(["safetensors", "diffusers"]), default="safetensors", show_default=True
)
@click.option("--out", "out_dir", type=click.Path(file_okay=False), help="Folder to export into.")
@click.option(
    "--to-mlflow",
    is_flag=True,
    help="Log the model (weights, spec, a loader: an MLflow pyfunc) into the job's MLflow run, or a new run if it has "
    "none.",
)
@click.option("--register-as", metavar="NAME", help="With --to-mlflow: register it as a new version of this model.")
@checkpoint_option()
@click.option("--no-ema", is_flag=True, help="Export the raw weights instead of the EMA weights.")
@click.pass_obj
@user_errors
def export(root: Path, ref, fmt, out_dir, to_mlflow, register_as, which, no_ema) -> None:
    """Export a job's model: .safetensors and its spec or a diffusers directory (--out), or to MLflow (--to-mlflow)."""
    from orchestrator.jobs.checkpoints import resolve_checkpoint

    if not out_dir and not to_mlflow:
        raise UserError("give --out DIR (files) or --to-mlflow (the job's MLflow run), or both")
    if register_as is not None and not to_mlflow:
        raise UserError("--register-as registers what --to-mlflow logs: add --to-mlflow")
    if register_as is not None:
        from orchestrator.specs.job import check_registered_model_name

        check_registered_model_name(register_as)
    spec, checkpoint = resolve_checkpoint(ref, root, which)  # before torch: a wrong name is answered at once
    kind = "raw" if no_ema else "EMA"
    target = _mlflow_target(spec, checkpoint, root) if to_mlflow else None  # an unreachable server: before torch
    if out_dir:
        from orchestrator.trained import export as exporting

        write = exporting.export_diffusers if fmt == "diffusers" else exporting.export_safetensors
        write(spec, checkpoint, Path(out_dir), ema=not no_ema)
        click.echo(f"exported {checkpoint} ({kind} weights) as {fmt} -> {out_dir}")
    if target is not None:
        from orchestrator.trained.mlflow_model import export_to_mlflow

        uri, run_id, run_name, artifact_location = target
        logged_to, info = export_to_mlflow(
            checkpoint,
            uri,
            run_id,
            spec.tracking.experiment,
            run_name,
            artifact_location,
            register_as=register_as,
            ema=not no_ema,
        )
        where = f"MLflow run {logged_to}" + ("" if run_id else " (new: the job had none)")
        click.echo(f"logged {checkpoint} ({kind} weights) to {where} at {uri} as {info.model_uri}")
        if register_as:
            click.echo(f"registered as {register_as} version {info.registered_model_version}")


def _mlflow_target(spec, checkpoint: Path, root: Path) -> tuple[str, str | None, str, str | None]:
    """Where `orch export --to-mlflow` logs: (tracking URI, the job's run id or None, the name of a new run, the
    artifact location of a new experiment); UserError if the server cannot be reached."""
    from orchestrator.layout import JOB_STATE_FILE
    from orchestrator.tracking import check_tracking_reachable, default_artifact_location, resolve_tracking_uri

    job_dir = checkpoint.parent.parent  # <job>/checkpoints/step-N
    record = JobDir(job_dir).read() if (job_dir / JOB_STATE_FILE).is_file() else None
    store_root = job_dir.parent if record is not None else root.resolve()
    if record is not None and record.mlflow_run_id and record.mlflow_uri:
        uri, run_id = record.mlflow_uri, record.mlflow_run_id
    else:
        uri, run_id = resolve_tracking_uri(spec.tracking.uri, store_root), None
    problem = check_tracking_reachable(uri)
    if problem:
        raise UserError(f"{problem}; the model was not logged")
    artifact_location = default_artifact_location(store_root) if uri.startswith("sqlite:") else None
    return uri, run_id, job_dir.name if record is not None else spec.name, artifact_location


@cli.command(name="eval")
@click.argument("ref", metavar="JOB")
@checkpoint_option(all_of_them=True)
@click.option("--num", type=int, help="Samples per checkpoint [default: the spec's eval.num_samples].")
@click.option(
    "--metrics",
    help="Comma-separated: fid, kid, fd_dinov2, precision_recall, fd_digits, digit_accuracy [default: eval.metrics].",
)
@click.option(
    "--reference",
    type=click.Path(),
    help="Real images to compare with: an ADM .npz reference batch or an image folder [default: eval.reference].",
)
@click.option(
    "--sampler",
    type=click.Choice(["ddpm", "ddim", "dpm_solver++", "euler", "heun"]),
    help="[default: eval.sampler, else sample.sampler]",
)
@click.option("--steps", type=int, help="Denoising steps [default: eval.steps, else sample.steps].")
@click.option("--guidance", type=float, help="Classifier-free guidance scale [default: eval's, else sample's].")
@click.option("--write-npz", is_flag=True, help="Also write the samples as eval/samples-step-N.npz (ADM layout).")
@click.option("--device", help="cuda or cpu [default: cuda if visible].")
@click.pass_obj
@user_errors
def evaluate(root: Path, ref, which, num, metrics, reference, sampler, steps, guidance, write_npz, device) -> None:
    """Evaluate a job's checkpoints (EMA weights) as its in-loop evaluation does, in this process: figures in
    eval/offline-step-N.json and in the job's MLflow run at each checkpoint's step."""
    from orchestrator.jobs.checkpoints import resolve_checkpoints
    from orchestrator.jobs.evaluations import evaluation_problems, offline_spec
    from orchestrator.tracking import TrackingError, log_to_run

    chosen = resolve_checkpoints(ref, root, which)  # before torch is imported: a wrong name is answered at once
    job = find_job(root, ref)
    names = tuple(name.strip() for name in metrics.split(",") if name.strip()) if metrics else None
    overrides = {
        "num_samples": num,
        "metrics": list(names) if names else None,
        "reference": str(Path(reference).resolve()) if reference else None,
        "sampler": sampler,
        "steps": steps,
        "guidance_scale": guidance,
    }
    spec = offline_spec(chosen[-1][0], overrides)
    problems = evaluation_problems(spec)
    if problems:
        raise UserError("; ".join(problems))
    from orchestrator.trained.evaluation import evaluate_checkpoints

    record = job.status()

    def report(evaluated) -> None:
        if evaluated.error is not None:
            click.secho(f"step {evaluated.step}: evaluation failed: {evaluated.error}", fg="red")
            return
        figures = ", ".join(f"{key} {value:.4g}" for key, value in evaluated.metrics.items())
        click.echo(f"step {evaluated.step}: {figures}")
        if record.mlflow_run_id and record.mlflow_uri:
            try:
                log_to_run(record.mlflow_uri, record.mlflow_run_id, evaluated.metrics, evaluated.step)
            except TrackingError as err:
                click.secho(f"  not logged to MLflow: {err}", fg="yellow")

    records = evaluate_checkpoints(spec, [path for _, path in chosen], job.path, write_npz, device, report)
    click.echo(
        f"{len(records)} checkpoint(s) evaluated with {spec.eval.num_samples} samples; figures in {job.path}/eval"
    )
    if any(r.error is not None for r in records):
        sys.exit(1)


# ---- looking at jobs -----------------------------------------------------------------------

STATE_COLOURS = {
    "queued": "cyan",
    "running": "blue",
    "succeeded": "green",
    "failed": "red",
    "cancelled": "magenta",
    "preempted": "yellow",
}


def _facts(job: JobDir) -> dict:
    from orchestrator.tracking import run_page

    record = job.status()
    facts = record.to_json()
    facts["dir"] = str(job.path)
    facts["mlflow_run_page"] = (
        run_page(record.mlflow_uri, record.mlflow_experiment_id, record.mlflow_run_id)
        if record.mlflow_run_id and record.mlflow_uri
        else None
    )
    return facts


@cli.command(name="list")
@json_option
@click.pass_obj
@user_errors
def list_(root: Path, as_json: bool) -> None:
    """All jobs under the root, oldest first."""
    facts = [_facts(job) for job in list_jobs(root)]
    if as_json:
        click.echo(json.dumps(facts, indent=2))
        return
    if not facts:
        click.echo(f"no jobs under {root}")
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"jobs in {root}", title_justify="left")
    for column in ("job", "state", "step", "loss", "checkpoint", "started", "MLflow run"):
        table.add_column(column)
    for f in facts:
        table.add_row(
            f["id"],
            f"[{STATE_COLOURS[f['state']]}]{f['state']}[/]",
            f"{f['step']}/{f['total_steps']}",
            f"{f['loss']:.4f}" if f["loss"] is not None else "-",
            f"step {f['checkpoint_step']}" if f["checkpoint_step"] is not None else "-",
            time.strftime("%m-%d %H:%M", time.localtime(f["started_at"])) if f["started_at"] else "-",
            (f["mlflow_run_id"] or "-")[:12],
        )
    Console().print(table)


@cli.command()
@click.argument("job_ref", required=False)
@json_option
@click.pass_obj
@user_errors
def status(root: Path, job_ref: str | None, as_json: bool) -> None:
    """One job's state, progress, newest checkpoint and MLflow run (default: the newest job)."""
    facts = _facts(find_job(root, job_ref))
    if as_json:
        click.echo(json.dumps(facts, indent=2))
        return
    click.secho(f"{facts['id']}: {facts['state']}", fg=STATE_COLOURS[facts["state"]], bold=True)
    rows = [
        ("dir", facts["dir"]),
        ("step", f"{facts['step']}/{facts['total_steps']}"),
        ("loss", f"{facts['loss']:.4f}" if facts["loss"] is not None else "-"),
        ("samples/s", f"{facts['samples_per_sec']:.1f}" if facts["samples_per_sec"] else "-"),
        ("checkpoint", facts["checkpoint"] or "-"),
        ("best", _best_text(facts)),
        ("launcher", f"{facts['launcher'] or '-'} ({facts['world_size']} rank(s)), attempt {facts['attempts']}"),
        ("restarts", str(facts["restarts"])),
    ]
    if facts["bad_samples"]:
        rows.append(("bad data", f"{facts['bad_samples']} unreadable sample(s) replaced (see the job log)"))
    if facts["checkpoint_failures"]:
        rows.append(("not saved", f"{facts['checkpoint_failures']} checkpoint(s): {facts['checkpoint_error']}"))
    rows += [
        (
            "MLflow run",
            _run_page_text(facts["mlflow_uri"], facts["mlflow_experiment_id"], facts["mlflow_run_id"])
            if facts["mlflow_run_id"] and facts["mlflow_uri"]
            else "-",
        ),
        ("message", facts["message"] or "-"),
    ]
    for key, value in rows:
        click.echo(f"  {key:<11} {value}")


def _best_text(facts: dict) -> str:
    """The best evaluated checkpoint, as `orch status` shows it."""
    if facts.get("best_step") is None:
        return "-"
    return f"step {facts['best_step']} ({facts['best_metric']} {facts['best_value']:.4g})"


@cli.command()
@click.argument("job_ref", required=False)
@click.option("--follow", "-f", is_flag=True, help="Keep printing new lines until the job stops.")
@click.pass_obj
@user_errors
def logs(root: Path, job_ref: str | None, follow: bool) -> None:
    """Print a job's log (everything its processes wrote)."""
    job = find_job(root, job_ref)
    if not job.log_file.exists():
        raise JobError(f"job {job.id} has no log yet")
    with open(job.log_file, "rb") as handle:
        while True:
            chunk = handle.read()
            if chunk:
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
            elif not follow or job.status().state not in ACTIVE_STATES:
                break
            else:
                time.sleep(0.3)


@cli.command()
@click.option("--port", default=5000, show_default=True)
@click.option("--uri", help="Tracking store to browse [default: the jobs' store under the root].")
@click.pass_obj
def ui(root: Path, port: int, uri: str | None) -> None:
    """Start the MLflow UI on 127.0.0.1 for the store the jobs log to."""
    from orchestrator.tracking import resolve_tracking_uri, run_page

    store = resolve_tracking_uri(uri, root.resolve())
    click.echo(f"MLflow UI for {store} at http://127.0.0.1:{port}  (Ctrl-C stops it)")
    newest = next(
        (r for r in reversed([job.read() for job in list_jobs(root)]) if r.mlflow_uri == store and r.mlflow_run_id),
        None,
    )
    if newest is not None:  # the address opens MLflow 3's model-training view, not its GenAI one
        click.echo(
            f"newest run ({newest.id}): {run_page(store, newest.mlflow_experiment_id, newest.mlflow_run_id, port)}"
        )
    os.execvp(
        sys.executable,
        [
            sys.executable,
            "-m",
            "mlflow",
            "ui",
            "--backend-store-uri",
            store,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
    )


def main() -> None:
    cli(prog_name="orch")


if __name__ == "__main__":  # python -m orchestrator.cli: where no `orch` script is installed (a bare GPU node)
    main()
