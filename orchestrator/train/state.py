"""Checkpoints: directories written atomically, holding everything a bitwise-exact resume needs.

    checkpoints/step-0000500/
        model.safetensors        model weights               (accelerate save_state)
        optimizer.bin            AdamW state                 (accelerate save_state)
        random_states_<r>.pkl    every rank's RNG states     (accelerate save_state)
        scaler.pt                fp16 grad scaler, if any    (accelerate save_state)
        ema.safetensors          EMA weights (what sampling and export use)
        trainer_state.json       step, data position, EMA update count, LR schedule, spec digest
        spec.yaml                the resolved spec the checkpoint was trained with
    checkpoints/latest           name of the newest complete checkpoint

Every rank writes into `step-N.tmp/`; rank 0 then fsyncs it and renames it to `step-N/`, so a
crash or a full disk mid-write never leaves a half checkpoint where a complete one is expected.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from safetensors.torch import load_file, save_file

from orchestrator.components.model_input import ModelInput
from orchestrator.errors import UserError
from orchestrator.files import fsync_dir
from orchestrator.jobs.directory import latest_checkpoint
from orchestrator.layout import EMA_FILE, LATEST_POINTER, SPEC_FILE, TRAINER_STATE, checkpoint_name
from orchestrator.train.engine import Engine

log = logging.getLogger(__name__)


class CheckpointError(UserError):
    """A checkpoint could not be written; the previous one is intact."""


@dataclass
class TrainerState:
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    ema_num_updates: int = 0
    world_size: int = 1
    spec_digest: str = ""
    lr_scheduler: dict = field(default_factory=dict)
    saved_at: float = 0.0


def save_checkpoint(
    engine: Engine,
    directory: Path,
    state: TrainerState,
    ema_weights: dict,
    spec_yaml: str,
    keep: int,
    model_input: ModelInput,
    keep_steps: frozenset[int] = frozenset(),
) -> Path:
    """Write checkpoint `step-N` (every rank calls this); returns its path or raises CheckpointError. The `keep`
    newest checkpoints and those of `keep_steps` (the best by an evaluation) stay; older ones are removed."""
    final = directory / checkpoint_name(state.step)
    tmp = directory / f"{final.name}.tmp"
    if engine.is_main and tmp.exists():
        shutil.rmtree(tmp)  # left by a crash mid-write
    previous = latest_checkpoint(directory)
    # The next checkpoint takes what the newest one takes (same model, same optimizer), checked by rank 0 before
    # writing, so a full disk or quota costs no half-written attempt; 5% more for the logs and grids written meanwhile.
    needed = folder_bytes(previous) if engine.is_main and previous is not None else 0
    free = shutil.disk_usage(directory).free if engine.is_main else 0
    no_room = needed > 0 and free < needed * 1.05
    if engine.any(no_room):
        raise CheckpointError(_not_written(final, directory, "No space left on device", previous, needed, free))
    engine.barrier()
    error = None
    try:
        engine.save_state(str(tmp))
        if engine.is_main:
            save_file(
                {name: tensor.detach().cpu().contiguous() for name, tensor in ema_weights.items()}, str(tmp / EMA_FILE)
            )  # to the host only to be written
            state.saved_at = time.time()
            (tmp / TRAINER_STATE).write_text(json.dumps(asdict(state), indent=2))
            (tmp / SPEC_FILE).write_text(spec_yaml)
            model_input.write(tmp)  # what sampling and export build the network for, without the data
    except (OSError, RuntimeError) as err:  # torch.save reports a full disk as a RuntimeError
        error = err
    if engine.any(error is not None):
        cause, free = "another rank failed to write its part", 0
        if engine.is_main:
            written = folder_bytes(tmp) if tmp.exists() else 0
            shutil.rmtree(tmp, ignore_errors=True)
            cause, free = _cause(error, directory), shutil.disk_usage(directory).free
            needed = needed or written  # without an earlier checkpoint: at least what was written before it failed
        raise CheckpointError(_not_written(final, directory, cause, previous, needed, free))
    if engine.is_main:
        _fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(final)  # the same step written again (a resume that stopped before training)
        os.replace(tmp, final)
        fsync_dir(directory)
        _write_pointer(directory, final.name)
        prune_checkpoints(directory, keep, keep_steps)
    engine.barrier()
    return final


def load_checkpoint(engine: Engine, path: Path) -> tuple[TrainerState, dict]:
    """Restore model, optimizer, scaler and RNG states into the engine; return the trainer state and EMA weights."""
    state_file = path / TRAINER_STATE
    if not state_file.is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint (no {TRAINER_STATE})")
    engine.load_state(str(path))
    state = TrainerState(**json.loads(state_file.read_text()))
    ema_weights = load_file(str(path / EMA_FILE), device="cpu")
    return state, ema_weights


def _cause(error: Exception | None, directory: Path) -> str:
    """Why a write failed, in words: a full disk is named as such whatever exception reported it."""
    if error is None:
        return "another rank failed to write its part"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    if shutil.disk_usage(directory).free < 1 << 20:
        return "No space left on device"
    return f"{type(error).__name__}: {error}"


def _not_written(final: Path, directory: Path, cause: str, previous: Path | None, needed: int, free: int) -> str:
    """The message of a checkpoint that was not written: the cause, the bytes it needs, what is intact, the fix."""
    if previous is not None and needed:
        size = f"; it needs about {_mb(needed)} (the size of {previous.name}) and {_mb(free)} are free"
    elif needed:
        size = f"; it needs more than the {_mb(needed)} written before the failure and {_mb(free)} are free"
    else:
        size = ""
    kept = f"the previous checkpoint {previous.name} is intact" if previous else "there is no earlier checkpoint"
    return (
        f"checkpoint {final.name} could not be written ({cause}) in {directory}{size}; {kept}. Free space there (or "
        "lower checkpoint.keep), then `orch resume`"
    )


def _mb(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


def folder_bytes(folder: Path) -> int:
    """Bytes of the files under `folder`."""
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def _write_pointer(directory: Path, name: str) -> None:
    tmp = directory / f".{LATEST_POINTER}.tmp"
    with open(tmp, "w") as handle:
        handle.write(name + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, directory / LATEST_POINTER)
    fsync_dir(directory)


def prune_checkpoints(directory: Path, keep: int, keep_steps: frozenset[int]) -> None:
    """Remove the complete checkpoints older than the `keep` newest, except those of `keep_steps` (rank 0 only)."""
    complete = sorted(p for p in directory.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))
    kept = {directory / checkpoint_name(step) for step in keep_steps}
    for old in complete[:-keep]:
        if old not in kept:
            shutil.rmtree(old, ignore_errors=True)


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    fsync_dir(root)
