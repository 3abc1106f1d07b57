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
    for name, value in (
        ("micro_batch_size", micro_batch_size),
        ("grad_accum_steps", grad_accum_steps),
        ("world_size", world_size),
        ("reduce_bucket_size", reduce_bucket_size),
        ("allgather_bucket_size", allgather_bucket_size),
    ):
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
        # torch's AdamW (DeepSpeed's would compile cpu_adam); CPU Adam with offload
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 62,
        "wall_clock_breakdown": False,
    }
    return lay_over(config, user_config) if user_config else config


def offloaded(config: Mapping) -> list[str]:
    """What a DeepSpeed config keeps in CPU memory: "optimizer" and/or "weights"."""
    zero = config.get("zero_optimization", {})
    return [
        what
        for what, key in (("optimizer", "offload_optimizer"), ("weights", "offload_param"))
        if zero.get(key, {}).get("device", "none") != "none"
    ]


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
        if value != expected:  # 1 and 1.0 are the same value
            problems.append(
                f"{'.'.join(path)} is {value!r} but the spec gives {expected!r} ({owner}); set it in the spec, or "
                'write "auto"'
            )
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


# ---------------------------------------------------------------------------------------------
# The `deepspeed` launcher: a hostfile, ssh (pdsh) to every host, one launcher per host
# ---------------------------------------------------------------------------------------------


def deepspeed_command(
    python: str,
    entry: Sequence[str],
    hostfile: str,
    env_file: str,
    master_addr: str,
    master_port: int,
    ssh_port: int | None = None,
    threads: int | None = None,
) -> LaunchCommand:
    """DeepSpeed's runner starting the module in `entry` on every host of `hostfile` (its slots: ranks per host).

    One host runs locally; several are started through pdsh over ssh from this machine, each with
    DeepSpeed's per-host launcher (`deepspeed.launcher.launch`, node rank = the host's line). Only the
    variables in `env_file` (DeepSpeed's DS_ENV_FILE) and a few prefixes (PYTHON*, MLFLOW*, UCX*)
    reach the other hosts. `--no_local_rank`: the entry reads LOCAL_RANK from its environment.
    """
    entry = check_entry(entry, module_only=True)
    check_positive("master_port", master_port)
    if ssh_port is not None:
        check_positive("ssh_port", ssh_port)
    if not master_addr:
        raise ValueError("master_addr is empty; pass the host name or address of node 0")
    argv = [
        python,
        "-u",
        "-m",
        "deepspeed.launcher.runner",
        "--hostfile",
        hostfile,
        "--master_addr",
        master_addr,
        "--master_port",
        str(master_port),
    ]
    if ssh_port is not None:
        argv += ["--ssh_port", str(ssh_port)]
    argv += ["--no_local_rank", "--module", *entry[1:]]
    return LaunchCommand(argv=tuple(argv), env={**thread_env(threads), "DS_ENV_FILE": env_file})


def hostfile_text(hosts: Sequence[str], slots: int) -> str:
    """A DeepSpeed hostfile: `HOST slots=N` per host, node 0 first."""
    check_positive("slots", slots)
    if not hosts:
        raise ValueError("the hostfile needs at least one host")
    for host in hosts:
        if not host or any(c.isspace() for c in host) or host.startswith("#"):
            raise ValueError(f"{host!r} is not a host name")
    return "".join(f"{host} slots={slots}\n" for host in hosts)


def parse_hostfile(text: str) -> dict[str, int]:
    """Hosts and their slots from hostfile text (`HOST slots=N`, # comments), in order; ValueError on a bad line."""
    hosts: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].startswith("slots=") or not parts[1][6:].isdigit() or int(parts[1][6:]) < 1:
            raise ValueError(f"line {number} should read `HOST slots=N`, got {line!r}")
        if parts[0] in hosts:
            raise ValueError(f"line {number} lists {parts[0]} again")
        hosts[parts[0]] = int(parts[1][6:])
    if not hosts:
        raise ValueError("it lists no host")
    return hosts


def env_file_text(env: Mapping[str, str]) -> str:
    """DS_ENV_FILE's text: `NAME=value` lines (DeepSpeed's runner splits at the first '=' and quotes the value; it
    cannot read a blank line)."""
    lines = []
    for name, value in env.items():
        if not name.isidentifier() or "\n" in value:
            raise ValueError(f"cannot pass {name}={value!r} to the other hosts")
        lines.append(f"{name}={value}")
    return "\n".join(lines) + ("\n" if lines else "")
