"""What a user names as a checkpoint (a job id or id prefix, a job directory, a checkpoint directory, a
weights file) turned into a checkpoint directory and its spec, without torch: `orch sample` and `orch export`
answer a mistyped name at once, before they load any network.
"""

from __future__ import annotations

from pathlib import Path

from orchestrator.errors import UserError
from orchestrator.jobs.directory import JobDir, find_job, shown_ref
from orchestrator.jobs.evaluations import best_checkpoint
from orchestrator.layout import EMA_FILE, JOB_STATE_FILE, MODEL_FILE, SPEC_FILE, TRAINER_STATE, checkpoint_name
from orchestrator.specs.base import SpecError, load_yaml, read_spec_text
from orchestrator.specs.job import JobSpec, spec_from_dict


class CheckpointNotFound(UserError):
    """No usable checkpoint where the user pointed (no job, no complete checkpoint, or a file missing)."""


def resolve_checkpoint(ref: str, root: Path, which: str | None = None) -> tuple[JobSpec, Path]:
    """The spec and directory of a checkpoint: `ref` is a job (id, unique id prefix or job directory),
    whose newest complete checkpoint is taken (or the one `which` names: step-N, N, best, latest), or a checkpoint
    directory. The spec is the checkpoint's own."""
    if which is not None and which != "latest":
        (chosen,) = resolve_checkpoints(ref, root, which, allow_all=False)
        return chosen
    path = Path(ref)
    if _is_dir(path) and not (path / JOB_STATE_FILE).is_file():
        return _read_spec(_checkpoint_dir(path)), path.resolve()
    if path.is_file():
        raise CheckpointNotFound(
            f"{ref} is a file; give a job id, a job directory or a checkpoint directory (runs/<job>/checkpoints/step-N)"
        )
    if not path.exists() and "/" in ref:
        raise CheckpointNotFound(
            f"{ref} does not exist; give a job id (`orch list` shows them), a job directory or a checkpoint directory"
        )
    job = find_job(root, ref)
    checkpoint = job.latest_checkpoint()
    if checkpoint is None:
        raise CheckpointNotFound(_no_checkpoint_message(job))
    return _read_spec(checkpoint), checkpoint


def resolve_checkpoints(ref: str, root: Path, which: str, allow_all: bool = True) -> list[tuple[JobSpec, Path]]:
    """The checkpoints of job `ref` that `which` names: `latest`, `best` (by its evaluations), `step-N` or `N`, or
    (allow_all) `all` of them, oldest first."""
    if which == "latest":
        return [resolve_checkpoint(ref, root)]
    path = Path(ref)
    if _is_dir(path) and not (path / JOB_STATE_FILE).is_file():
        raise CheckpointNotFound(
            f"--checkpoint {which} picks among a job's checkpoints and {ref} is a checkpoint directory; give the job"
        )
    job = find_job(root, ref)
    complete = sorted(p for p in job.checkpoints_dir.glob("step-*") if (p / TRAINER_STATE).is_file())
    if which == "best":
        return [_with_spec(best_checkpoint(job.path, _read_spec(job.path)).path)]
    if which == "all" and allow_all:
        if not complete:
            raise CheckpointNotFound(_no_checkpoint_message(job))
        return [_with_spec(p) for p in complete]
    step = which.removeprefix("step-")
    if not step.isdigit():
        choices = "latest, best, all, step-N or N" if allow_all else "latest, best, step-N or N"
        raise CheckpointNotFound(f"--checkpoint {which} is not a checkpoint name; give {choices}")
    chosen = job.checkpoints_dir / checkpoint_name(int(step))
    if chosen not in complete:
        have = ", ".join(p.name for p in complete) or "none yet"
        raise CheckpointNotFound(f"job {job.id} has no complete checkpoint {chosen.name}; it has {have}")
    return [_with_spec(chosen)]


def _is_dir(path: Path) -> bool:
    """Whether `path` is a directory; CheckpointNotFound where the filesystem cannot even look (a name too long)."""
    try:
        return path.is_dir()
    except OSError as err:
        raise CheckpointNotFound(
            f"{shown_ref(str(path))}: {err.strerror}; give a job id, a job directory or a checkpoint directory"
        ) from None


def _with_spec(checkpoint: Path) -> tuple[JobSpec, Path]:
    return _read_spec(checkpoint), checkpoint


def _checkpoint_dir(path: Path) -> Path:
    """`path` if it is a usable checkpoint directory, else CheckpointNotFound saying what it lacks."""
    if path.name.endswith(".tmp"):
        raise CheckpointNotFound(
            f"{path} is a checkpoint whose writing never finished; use the job, or a complete step-N directory beside "
            "it"
        )
    if path.name == "checkpoints":
        raise CheckpointNotFound(
            f"{path} is a job's checkpoints folder; give the job ({path.parent}) or one of its step-N directories"
        )
    if not (path / SPEC_FILE).is_file() or not any((path / name).is_file() for name in (EMA_FILE, MODEL_FILE)):
        raise CheckpointNotFound(
            f"{path} is neither a job directory (no {JOB_STATE_FILE}) nor a checkpoint directory ({SPEC_FILE} with "
            f"{EMA_FILE} "
            f"or {MODEL_FILE}); give a job id, a job directory or a runs/<job>/checkpoints/step-N directory"
        )
    return path


def _no_checkpoint_message(job: JobDir) -> str:
    record = job.status()
    return (
        f"job {job.id} has no complete checkpoint yet ({record.state.value} at step {record.step}); one is written "
        "every "
        f"checkpoint.every steps, at the end and on preemption: wait for it, or `orch resume {job.id}` if the job "
        "stopped"
    )


def _read_spec(checkpoint: Path) -> JobSpec:
    spec_file = checkpoint / SPEC_FILE
    if not spec_file.is_file():
        raise CheckpointNotFound(f"{checkpoint} has no {SPEC_FILE}; it is not a checkpoint of orch")
    try:
        raw = load_yaml(read_spec_text(spec_file), str(spec_file))  # UTF-8, bounded: a damaged file is a message
    except SpecError as err:
        raise CheckpointNotFound(f"{spec_file} is not a spec orch wrote ({err}); the checkpoint is damaged") from None
    if not isinstance(raw, dict):
        raise CheckpointNotFound(f"{spec_file} is not a spec (a YAML mapping); the checkpoint is damaged")
    return spec_from_dict(raw, source=str(spec_file))


def weights_file(checkpoint: Path, ema: bool = True) -> Path:
    """The weights to load: `checkpoint` itself if it is a .safetensors file, else its EMA (or raw) weights file."""
    if checkpoint.is_file():
        if checkpoint.suffix != ".safetensors":
            raise CheckpointNotFound(f"{checkpoint} is not a .safetensors file or a checkpoint directory")
        return checkpoint
    name = EMA_FILE if ema else MODEL_FILE
    path = checkpoint / name
    if not path.is_file():
        other = MODEL_FILE if ema else EMA_FILE
        hint = (
            f"; its {'raw' if ema else 'EMA'} weights ({other}) are there: "
            f"{'pass --no-ema' if ema else 'leave out --no-ema'}"
            if (checkpoint / other).is_file()
            else ""
        )
        raise CheckpointNotFound(f"{checkpoint} has no {name} ({'EMA' if ema else 'raw'} weights){hint}")
    return path
