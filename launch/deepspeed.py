"""DeepSpeed: the ZeRO config a job trains with, a user's own DeepSpeed JSON laid over it, and the
`deepspeed` launcher's command line with its hostfile (ssh-style multi-node)."""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from launch import LaunchCommand, check_entry, check_positive, thread_env

ZERO_STAGES = (1, 2, 3)
DEFAULT_BUCKET_SIZE = 500_000_000  # elements: DeepSpeed's default reduce and all-gather bucket size

# Keys whose values the job spec decides (train.* and resources.strategy): a user's JSON may leave them
# out, repeat them, or say "auto"; any other value would train something other than what `plan` printed.
SPEC_OWNED = {
    ("train_batch_size",): "train.global_batch_size",
    ("train_micro_batch_size_per_gpu",): "train.global_batch_size / (world size x train.grad_accum_steps)",
    ("gradient_accumulation_steps",): "train.grad_accum_steps",
    ("gradient_clipping",): "train.grad_clip",
    ("bf16", "enabled"): "train.mixed_precision",
    ("fp16", "enabled"): "train.mixed_precision",
    ("zero_optimization", "stage"): "resources.strategy",
}
REFUSED = {
    "optimizer": "the optimizer is orch's AdamW from train.learning_rate, adam_betas, adam_eps, weight_decay",
    "scheduler": "the learning-rate schedule is train.warmup_steps / lr_schedule",
    "amp": "mixed precision is train.mixed_precision (bf16 through DeepSpeed's bf16 mode)",
}


def deepspeed_config(
    stage: int,
    mixed_precision: str,
    micro_batch_size: int,
    grad_accum_steps: int,
    world_size: int,
    grad_clip: float | None,
    *,
    offload_optimizer: bool = False,
    offload_params: bool = False,
    pin_memory: bool = False,
    reduce_bucket_size: int = DEFAULT_BUCKET_SIZE,
    allgather_bucket_size: int = DEFAULT_BUCKET_SIZE,
    overlap_comm: bool | None = None,
    user_config: Mapping | None = None,
) -> dict:
    """The DeepSpeed config of a ZeRO job: batch split, accumulation, clipping, precision, offload and buckets,
    with `user_config` (a user's DeepSpeed JSON) laid over it; the optimizer is the trainer's, not in here.

    pin_memory: page-locked CPU buffers for offload (CUDA only). ValueError names a bad value or a
    user key that contradicts the spec.
    """
    if stage not in ZERO_STAGES:
        raise ValueError(f"ZeRO stage must be one of {ZERO_STAGES}, got {stage}")
    if mixed_precision not in ("no", "bf16"):
        raise ValueError(f"the DeepSpeed engine trains in fp32 (no) or bf16, got mixed_precision {mixed_precision!r}")
    for name, value in (("micro_batch_size", micro_batch_size), ("grad_accum_steps", grad_accum_steps), ("world_size", world_size),
                        ("reduce_bucket_size", reduce_bucket_size), ("allgather_bucket_size", allgather_bucket_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if offload_params and stage != 3:
        raise ValueError(f"offloading the weights needs ZeRO stage 3, got stage {stage}")
    zero: dict = {"stage": stage, "reduce_bucket_size": reduce_bucket_size}
    if stage < 3:
        zero["allgather_bucket_size"] = allgather_bucket_size
    else:
        # Gathering a 16-bit copy of the whole model at save time is not needed: the engine gathers the
        # fp32 master weights for model.safetensors instead, and checkpoints keep the shards.
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    if overlap_comm is not None:
        zero["overlap_comm"] = overlap_comm
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin_memory}
    if offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": pin_memory}
    config = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum_steps,
        "train_batch_size": micro_batch_size * grad_accum_steps * world_size,
        "gradient_clipping": float(grad_clip or 0.0),  # 0: no clipping (the norm is still measured)
        "zero_optimization": zero,
        "bf16": {"enabled": mixed_precision == "bf16"},
        "fp16": {"enabled": False},
        "zero_allow_untested_optimizer": True,  # torch's AdamW (DeepSpeed's would compile cpu_adam); CPU Adam with offload
        "steps_per_print": 1 << 62,
        "wall_clock_breakdown": False,
    }
    return lay_over(config, user_config) if user_config else config


def read_user_config(path: str | Path) -> dict:
    """A user's DeepSpeed JSON as a dict; ValueError saying what is wrong with the file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path} does not exist")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err.msg} at line {err.lineno} column {err.colno}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} must hold a JSON object (DeepSpeed's config), not a {type(config).__name__}")
    return config


def lay_over(ours: Mapping, theirs: Mapping) -> dict:
    """`theirs` merged into `ours` key by key (nested objects merged, values replaced); ValueError where
    `theirs` contradicts a value the spec owns or sets something the trainer does itself."""
    problems = [f"{key!r}: {why}; remove it from the file" for key, why in REFUSED.items() if key in theirs]
    for path, owner in SPEC_OWNED.items():
        value = _get(theirs, path)
        if value is None or value == "auto":
            continue
        expected = _get(ours, path)
        if value != expected and not (isinstance(value, (int, float)) and not isinstance(value, bool) and value == expected):
            problems.append(f"{'.'.join(path)} is {value!r} but the spec gives {expected!r} ({owner}); set it in the spec, or write \"auto\"")
    if problems:
        raise ValueError("; ".join(problems))
    merged = copy.deepcopy(dict(ours))
    _merge(merged, theirs)
    for path in SPEC_OWNED:  # "auto" means: the spec's value
        if _get(theirs, path) == "auto":
            _set(merged, path, _get(ours, path))
    return merged


def _merge(target: dict, source: Mapping) -> None:
    for key, value in source.items():
        if isinstance(value, Mapping) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        else:
            target[key] = copy.deepcopy(value)


def _get(tree: Mapping, path: tuple[str, ...]):
    for key in path:
        if not isinstance(tree, Mapping) or key not in tree:
            return None
        tree = tree[key]
    return tree


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value
