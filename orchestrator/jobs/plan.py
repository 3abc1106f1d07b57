"""The plan: what a spec will run, decided once and printed by `orch plan` / `submit --dry-run`.

`orch submit` runs exactly the command the plan holds. Checks that need this machine (data on disk,
a GPU for cuda or fp16, a reachable tracking server) are collected as `problems`: `submit` refuses to
start while there are any, `plan` and `--dry-run` print them.

Under launcher slurm this machine is a login node, not where the ranks run: the device and the GPUs
asked for come from the spec alone (`auto` stays `auto` and the worker resolves it on the compute node),
and the threads per rank from the allocation (computed on the node), never from this host's hardware.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

from launch import LaunchCommand
from launch.accelerate import accelerate_command
from launch.local import local_command
from launch.torchrun import torchrun_command
from orchestrator.components.deepspeed_config import DeepSpeedConfigError, deepspeed_config_of
from orchestrator.components.model_input import classes_to_build
from orchestrator.data.imagefolder import DataError, scan_image_folder
from orchestrator.errors import UserError
from orchestrator.jobs.evaluations import evaluation_problems
from orchestrator.specs.job import JobSpec, device_precision_refusal


class PlanError(UserError):
    """The spec is valid but cannot run here (no data, no GPU for fp16, unreachable tracking)."""


# An opened hf_dataset source, (the split as a datasets.Dataset, its checked hub.Columns), or the HubError met.
HubData = tuple[Any, Any] | UserError


def require_runnable(plan: "Plan") -> None:
    """PlanError listing what stops the plan from running on this machine."""
    if plan.problems:
        raise PlanError("cannot start the job:\n  " + "\n  ".join(plan.problems))


@dataclass(frozen=True)
class Placement:
    """The share of this machine one job gets when jobs run side by side on it (a sweep's trials): its GPUs (as
    CUDA_VISIBLE_DEVICES names them; None: no GPU given) and its CPU cores. The launched processes see only these GPUs
    and run on these cores (the supervisor's CPU affinity, which they inherit); threads per rank follow the cores."""

    gpus: tuple[str, ...] | None
    cpus: tuple[int, ...]

    def describe(self) -> str:
        gpus = f"GPU(s) {','.join(self.gpus)}; " if self.gpus is not None else ""
        return f"{gpus}CPU core(s) {','.join(map(str, self.cpus))}"


@dataclass(frozen=True)
class Plan:
    launcher: str
    device: str  # cpu or cuda; "auto" under launcher slurm: resolved by the worker on the compute node
    strategy: str
    world_size: int
    processes_per_node: int
    micro_batch_size: int
    grad_accum_steps: int
    global_batch_size: int
    threads_per_process: int | None  # None under launcher slurm: the allocation's CPUs per rank, computed on the node
    tracking_uri: str | None
    compute: str  # precision, TF32 and torch.compile as they will apply on this device
    command: LaunchCommand  # what `orch submit` runs here, on node 0
    node_commands: tuple[
        LaunchCommand, ...
    ] = ()  # every node's command (node 0's is `command`); `orch join` runs the others
    estimate: tuple[str, ...] = ()  # parameters and memory per rank, computed (orchestrator/jobs/estimate.py)
    strategy_lines: tuple[
        str, ...
    ] = ()  # the strategy's settings as they will apply (e.g. the DeepSpeed config's essentials)
    sbatch_script: str | None = (
        None  # launcher slurm: the script `command` (sbatch) submits, written into the job directory
    )
    launch_files: tuple[
        tuple[str, str], ...
    ] = ()  # (path, text) the command reads, written before it runs (hostfile, sbatch script)
    hosts: tuple[str, ...] = ()  # launcher deepspeed: the hosts it starts over ssh, node 0 first
    problems: tuple[str, ...] = ()
    cpus_per_task: int | None = (
        None  # launcher slurm: the CPUs asked for each node's task (its ranks and their loaders)
    )
    data: str = ""  # samples, steps per epoch and the epochs train.steps cover (data_description)
    time: str = ""  # the whole job's training time on one node of 8 A100s, by formula (time_description)
    cpus: tuple[int, ...] | None = None  # the CPU cores the launched processes run on (a Placement); None: all

    def describe(self) -> list[str]:
        """Human-readable lines, as `orch plan` prints them."""
        device = "auto (resolved on the compute node)" if self.device == "auto" else self.device
        if self.threads_per_process is not None:
            threads = f"{self.threads_per_process} per process"
        else:  # launcher slurm: the sbatch script and the worker compute it from the allocation
            threads = (
                f"{max(1, (self.cpus_per_task or 1) // self.processes_per_node)} per process on the compute node "
                f"(the allocation's {self.cpus_per_task} CPUs per node / {self.processes_per_node} rank(s))"
            )
        return [
            f"launcher        {self.launcher} on {device}, strategy {self.strategy}",
            f"world size      {self.world_size} ({self.processes_per_node} process(es) x "
            f"{self.world_size // self.processes_per_node} node(s))",
            f"batch           {self.global_batch_size} global = {self.micro_batch_size} per rank x {self.world_size} "
            f"rank(s) x {self.grad_accum_steps} accumulation step(s)",
            *([f"data            {self.data}"] if self.data else []),
            f"threads         {threads}",
            *(
                [f"cpu cores       {','.join(map(str, self.cpus))} (this job's share of the machine)"]
                if self.cpus
                else []
            ),
            f"compute         {self.compute}",
            *self.strategy_lines,
            *self.estimate,
            *([f"time (8xA100)   {self.time}"] if self.time else []),
            f"tracking        {self.tracking_uri or 'off'}",
            *(
                [
                    f"command         {self.command.shell()}",
                    *(f"  | {line}" for line in _sbatch_essentials(self.sbatch_script)),
                ]
                if self.sbatch_script
                else [f"command         {self.command.shell()}"]
                if len(self.node_commands) < 2 and not self.hosts
                else [
                    f"command         {self.command.shell()}  (orch submit runs it on node 0)",
                    *(
                        f"node {n:<10} {host}: {self.processes_per_node} rank(s), started over ssh by DeepSpeed's "
                        "runner"
                        for n, host in enumerate(self.hosts)
                    ),
                ]
                if self.hosts
                else [
                    f"node {n:<10} {c.shell()}  "
                    + ("(orch submit runs it)" if n == 0 else f"(orch join JOB --node-rank {n} runs it)")
                    for n, c in enumerate(self.node_commands)
                ]
            ),
            *(f"problem         {problem}" for problem in self.problems),
        ]


def _sbatch_essentials(script: str) -> list[str]:
    """The lines of an sbatch script `orch plan` shows: the #SBATCH options and the srun step (with its continuation
    line)."""
    lines = script.splitlines()
    shown = []
    for i, line in enumerate(lines):
        if line.startswith("#SBATCH") or line.startswith("srun"):
            shown.append(line)
            if line.startswith("srun") and line.endswith("\\") and i + 1 < len(lines):
                shown.append(lines[i + 1])
    return shown


def gpu_visible(root: Path = Path("/")) -> bool:
    """An NVIDIA GPU is visible to this process (checked without importing torch, which takes seconds).

    Any of: the driver's /proc/driver/nvidia/gpus entries, a /dev/nvidiaN device node (containers that
    get the devices but not the driver's /proc), or WSL2's GPU device /dev/dxg. CUDA_VISIBLE_DEVICES ""
    or "-1" hides them all. `root` stands in for / in tests.
    """
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    try:
        gpus = root / "proc" / "driver" / "nvidia" / "gpus"
        if gpus.is_dir() and any(gpus.iterdir()):
            return True
        if any(re.fullmatch(r"nvidia\d+", node.name) for node in (root / "dev").glob("nvidia[0-9]*")):
            return True
        return (root / "dev" / "dxg").exists()
    except OSError:  # an unreadable /proc or /dev entry: as if absent
        return False


def visible_gpu_count(root: Path = Path("/")) -> int | None:
    """How many NVIDIA GPUs this process may use, without importing torch: the driver's /proc entries, or the
    /dev/nvidiaN nodes, narrowed by CUDA_VISIBLE_DEVICES; None where neither says (WSL2, an unreadable /proc)."""
    if not gpu_visible(root):
        return 0
    try:
        gpus = root / "proc" / "driver" / "nvidia" / "gpus"
        count = (
            len(list(gpus.iterdir()))
            if gpus.is_dir()
            else len([n for n in (root / "dev").glob("nvidia[0-9]*") if re.fullmatch(r"nvidia\d+", n.name)])
        )
    except OSError:
        return None
    chosen = os.environ.get("CUDA_VISIBLE_DEVICES")
    if chosen is not None:
        count = min(count, len([entry for entry in chosen.split(",") if entry.strip()]))
    return count or None


def make_plan(
    spec: JobSpec, job_path: Path, root: Path, python: str = sys.executable, placement: Placement | None = None
) -> Plan:
    """Decide device, launcher, batch split and the command line, and note what stops it running here. With a
    `placement`, the job gets only that share of this machine (its GPUs and CPU cores)."""
    from orchestrator.tracking import check_tracking_reachable, resolve_tracking_uri

    problems = []
    resources = spec.resources
    on_slurm = resources.launcher == "slurm"  # this host submits only: the compute nodes' GPUs are not visible from it
    if on_slurm:
        device = resources.device  # auto stays auto: the worker resolves it on the node (orchestrator/worker.py)
    else:
        device = resources.device if resources.device != "auto" else ("cuda" if gpu_visible() else "cpu")
        if device == "cuda" and not gpu_visible():
            problems.append("resources.device is cuda but no NVIDIA GPU is visible here; use device: cpu (or auto)")
        if resources.gpus_per_node is not None and device != "cuda":
            problems.append(
                f"resources.gpus_per_node {resources.gpus_per_node} needs CUDA, and no NVIDIA GPU is visible here; on "
                "CPU set processes instead"
            )
        visible = visible_gpu_count() if device == "cuda" else None
        if visible and placement is not None and placement.gpus is not None:
            visible = len(placement.gpus)
        if visible and resources.processes > visible:  # every rank of this node takes a GPU of its own
            problems.append(
                f"resources.processes {resources.processes} ranks per node, one per GPU, but this node shows {visible} "
                f"GPU(s); set gpus_per_node (or processes) to at most {visible}"
            )
    refusal = device_precision_refusal(device, spec.train.mixed_precision)
    if refusal:
        problems.append(refusal)
    # an hf_dataset is opened once per plan: one out of reach costs the Hub client's retries (~20 s) each time
    hub_data = _hub_data(spec) if spec.data.source == "hf_dataset" else None
    try:
        check_data(spec, hub_data)
    except PlanError as err:
        problems.append(str(err))
    deepspeed_lines: list[str] = []
    if resources.strategy.startswith("zero"):
        _need_deepspeed(f"resources.strategy {resources.strategy}", "strategy: ddp", problems)
        try:
            deepspeed_lines = describe_deepspeed(spec, deepspeed_config_of(spec, device))
        except DeepSpeedConfigError as err:
            problems.append(str(err))
    if spec.model.init_from and not Path(spec.model.init_from).is_file():
        problems.append(f"model.init_from {spec.model.init_from} does not exist")
    problems += evaluation_problems(spec)

    if on_slurm:  # None: the allocation's CPUs per rank, computed on the node by the sbatch script and the worker
        threads = resources.threads_per_process
    else:
        cores = placement.cpus if placement is not None else os.sched_getaffinity(0)
        threads = resources.threads_per_process or max(1, len(cores) // resources.processes)
    launcher = resources.launcher
    if launcher == "auto":
        launcher = "local" if resources.world_size == 1 else "torchrun"
    entry = ("-m", "orchestrator.worker", str(job_path))
    node_commands: tuple[LaunchCommand, ...] = ()
    sbatch_script = None
    launch_files: tuple[tuple[str, str], ...] = ()
    hosts: tuple[str, ...] = ()
    cpus_per_task = None
    if launcher == "local":
        command = local_command(python, entry, threads=threads)
    elif launcher == "torchrun":
        node_commands = tuple(
            torchrun_command(
                python,
                entry,
                nproc_per_node=resources.processes,
                nnodes=resources.nodes,
                node_rank=node,
                rdzv_endpoint=resources.rdzv_endpoint,
                rdzv_id=job_path.name if resources.rdzv_endpoint else None,
                threads=threads,
                max_restarts=resources.max_restarts,  # torchrun's elastic agent restarts every rank of the node
            )
            for node in range(resources.nodes)
        )
        command = node_commands[0]
    elif launcher == "slurm":
        cpus_per_task = slurm_cpus_per_task(spec)
        command, sbatch_script = _slurm_command(spec, job_path, python, entry, device, threads, cpus_per_task, problems)
        launch_files = ((str(job_path / "slurm" / "job.sbatch"), sbatch_script),)
    elif launcher == "deepspeed":
        command, launch_files, hosts = _deepspeed_command(spec, job_path, python, entry, threads, problems)
    else:
        command = accelerate_command(
            python, entry, num_processes=resources.processes, cpu=device == "cpu", threads=threads
        )

    if placement is not None:
        if launcher not in PLACEABLE_LAUNCHERS or resources.nodes > 1:
            problems.append(
                f"launcher {launcher} cannot be given a share of this machine (a sweep's side-by-side trial)"
            )
        if placement.gpus is not None:  # the launched processes see these GPUs only, numbered from 0
            visible_gpus = {"CUDA_VISIBLE_DEVICES": ",".join(placement.gpus)}
            command = LaunchCommand(command.argv, {**command.env, **visible_gpus})
            node_commands = tuple(LaunchCommand(c.argv, {**c.env, **visible_gpus}) for c in node_commands)

    tracking_uri = None
    if spec.tracking.enabled:
        tracking_uri = resolve_tracking_uri(spec.tracking.uri, root)
        problem = check_tracking_reachable(tracking_uri)
        if problem:
            problems.append(f"{problem} (or set tracking.enabled: false)")

    return Plan(
        launcher=launcher,
        device=device,
        strategy=resources.strategy,
        world_size=resources.world_size,
        processes_per_node=resources.processes,
        micro_batch_size=spec.micro_batch_size,
        grad_accum_steps=spec.train.grad_accum_steps,
        global_batch_size=spec.train.global_batch_size,
        threads_per_process=threads,
        tracking_uri=tracking_uri,
        compute=compute_description(spec, device),
        command=command,
        node_commands=node_commands or (command,),
        estimate=tuple(model_estimate(spec, resources.world_size, hub_data)),
        strategy_lines=tuple(deepspeed_lines or strategy_description(spec)),
        sbatch_script=sbatch_script,
        launch_files=launch_files,
        hosts=hosts,
        problems=tuple(problems),
        cpus_per_task=cpus_per_task,
        data=data_description(spec, hub_data),
        time=time_description(spec),
        cpus=placement.cpus if placement is not None else None,
    )


# Launchers a sweep can start side by side on shares of one machine: DeepSpeed's runner picks the GPUs itself (it
# rewrites CUDA_VISIBLE_DEVICES), and Slurm places its jobs itself.
PLACEABLE_LAUNCHERS = ("local", "torchrun", "accelerate")


def describe_deepspeed(spec: JobSpec, config: dict) -> list[str]:
    """`orch plan`'s lines on the DeepSpeed config that will apply."""
    from launch.deepspeed import offloaded as offloaded_parts

    zero = config.get("zero_optimization", {})
    offloaded = offloaded_parts(config)
    buckets = f"reduce bucket {zero.get('reduce_bucket_size'):,}"
    if "allgather_bucket_size" in zero:
        buckets += f", all-gather bucket {zero['allgather_bucket_size']:,}"
    overlap = zero.get("overlap_comm")
    lines = [
        f"deepspeed       ZeRO-{zero.get('stage')}, offload {' + '.join(offloaded) if offloaded else 'none'}, "
        f"{buckets} elements, "
        f"overlap_comm {'default' if overlap is None else overlap}, activation checkpointing "
        f"{'on' if spec.resources.activation_checkpointing else 'off'}"
    ]
    if spec.resources.deepspeed.config_file:
        lines.append(f"deepspeed json  {spec.resources.deepspeed.config_file} laid over orch's config")
    return lines


def compute_description(spec: JobSpec, device: str) -> str:
    """`orch plan`'s line on the arithmetic: autocast precision, fp32 matmuls (TF32 on CUDA) and torch.compile."""
    precision = {"no": "fp32", "bf16": "bf16 autocast", "fp16": "fp16 autocast with loss scaling"}[
        spec.train.mixed_precision
    ]
    on_gpu = "TF32" if spec.resources.tf32 else "strict fp32"
    matmuls = (
        on_gpu if device == "cuda" else f"{on_gpu} on a GPU node, fp32 on a CPU node" if device == "auto" else "fp32"
    )
    return f"{precision}, fp32 matmuls in {matmuls}, torch.compile {'per block' if spec.resources.compile else 'off'}"


def strategy_description(spec: JobSpec) -> list[str]:
    """`orch plan`'s line on the DDP strategy's settings."""
    r = spec.resources
    checkpointing = f"activation checkpointing {'on' if r.activation_checkpointing else 'off'}"
    if r.strategy == "fsdp":
        return [
            "fsdp            FSDP2, one shard unit per block, "
            f"{'bf16 weights, fp32 grad reduction' if spec.train.mixed_precision == 'bf16' else 'fp32'}, "
            f"{checkpointing}"
        ]
    if r.world_size == 1 and not r.activation_checkpointing:
        return []
    return [f"ddp             bucket {r.ddp.bucket_mb} MiB, {checkpointing}"]


def _need_deepspeed(what: str, alternative: str, problems: list[str]) -> None:
    """Note a problem if DeepSpeed, which `what` needs, is not installed (checked without importing it)."""
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        problems.append(
            f"{what} needs DeepSpeed, which is not installed: bash scripts/setup.sh installs it (or use {alternative})"
        )


def _deepspeed_command(spec: JobSpec, job_path: Path, python: str, entry, threads: int, problems: list[str]):
    """DeepSpeed's runner over the job's hostfile: (command, files to write, hosts)."""
    import shutil
    import socket

    from launch.deepspeed import deepspeed_command, env_file_text, hostfile_text, parse_hostfile

    r = spec.resources
    _need_deepspeed("launcher deepspeed", "launcher torchrun", problems)
    hosts = list(r.hosts)
    if r.hostfile:
        try:
            listed = parse_hostfile(Path(r.hostfile).read_text())
        except (OSError, ValueError) as err:
            problems.append(f"resources.hostfile {r.hostfile}: {getattr(err, 'strerror', None) or err}")
            listed = {}
        if listed and (len(listed) != r.nodes or set(listed.values()) != {r.processes}):
            problems.append(
                f"resources.hostfile lists {len(listed)} host(s) with {sorted(set(listed.values()))} slot(s) but the "
                "spec has "
                f"nodes {r.nodes} x processes {r.processes}; make them agree (the batch split follows the spec)"
            )
        hosts = list(listed) or hosts
    if not hosts:
        hosts = ["localhost"]  # one node: DeepSpeed's runner starts the ranks here, without ssh
    if len(hosts) > 1 and shutil.which("pdsh") is None:
        problems.append(
            "launcher deepspeed starts the other hosts with pdsh over ssh, and pdsh is not on the PATH (apt-get "
            "install pdsh)"
        )
    if r.rdzv_endpoint:
        master_addr, _, port = r.rdzv_endpoint.rpartition(":")
        master_port = int(port)
    elif len(hosts) > 1:
        master_addr, master_port = hosts[0], 29500
    else:
        with socket.socket() as probe:  # one node: a free loopback port, so that jobs on one machine do not collide
            probe.bind(("127.0.0.1", 0))
            master_addr, master_port = "127.0.0.1", probe.getsockname()[1]
    folder = job_path / "deepspeed"
    command = deepspeed_command(
        python,
        entry,
        hostfile=str(folder / "hostfile"),
        env_file=str(folder / "env"),
        master_addr=master_addr,
        master_port=master_port,
        ssh_port=r.ssh_port,
        threads=threads,
    )
    passed_on = {name: value for name, value in command.env.items() if name != "DS_ENV_FILE"}
    files = (
        (str(folder / "hostfile"), hostfile_text(hosts, r.processes)),
        (str(folder / "env"), env_file_text(passed_on)),
    )
    return command, files, tuple(hosts) if len(hosts) > 1 else ()


def slurm_cpus_per_task(spec: JobSpec) -> int:
    """CPUs asked for each node's task: resources.slurm.cpus_per_task, or per rank its DataLoader workers plus 2
    (the rank's own compute threads and its helper threads: pinning, collectives)."""
    return spec.resources.slurm.cpus_per_task or spec.resources.processes * (spec.data.num_workers + 2)


def _slurm_command(
    spec: JobSpec,
    job_path: Path,
    python: str,
    entry,
    device: str,
    threads: int | None,
    cpus_per_task: int,
    problems: list[str],
) -> tuple[LaunchCommand, str]:
    """The sbatch command and script of a Slurm job (torchrun on each node, requeue, time-limit warning).

    GPUs are asked for from the spec: one per rank for device cuda, or for device auto with gpus_per_node
    set (the worker then finds them on the node); none for cpu, or auto without gpus_per_node."""
    import shutil

    from launch.slurm import NodeStep, SlurmAllocation, sbatch_job

    resources, slurm = spec.resources, spec.resources.slurm
    wants_gpus = device == "cuda" or (device == "auto" and resources.gpus_per_node is not None)
    if shutil.which("sbatch") is None:
        problems.append(
            "launcher slurm needs sbatch on the PATH: run orch on a Slurm login node (or use launcher torchrun)"
        )
    try:
        allocation = SlurmAllocation(
            nodes=resources.nodes,
            gpus_per_node=resources.processes if wants_gpus else 0,
            processes_per_node=resources.processes,
            cpus_per_task=cpus_per_task,
            mem=slurm.mem,
            partition=slurm.partition,
            account=slurm.account,
            qos=slurm.qos,
            constraint=slurm.constraint,
            time_limit=slurm.time,
            signal_seconds=slurm.signal_seconds,
            requeue=slurm.requeue,
        )
        step = NodeStep(
            python=python, entry=entry, setup=slurm.setup, threads=threads, max_restarts=resources.max_restarts
        )
        job = sbatch_job(
            job_name=job_path.name,
            script_path=str(job_path / "slurm" / "job.sbatch"),
            logs_dir=str(job_path / "logs"),
            allocation=allocation,
            step=step,
            sbatch_extra=slurm.sbatch_extra,
            workdir=str(job_path),
        )
    except ValueError as err:  # values Slurm would reject or misread, named by the adapter
        raise PlanError(f"resources.slurm: {err}") from None
    return LaunchCommand(argv=job.argv, env={}), job.script


def model_estimate(spec: JobSpec, world_size: int, hub_data: HubData | None = None) -> list[str]:
    """`orch plan`'s lines on the network's size and its memory per rank (a computed lower bound, not a measurement)."""
    from orchestrator.jobs import estimate

    m = spec.model
    shape = _input_shape(spec, hub_data) if m.arch == "dit" else None
    if shape is None:
        return []  # the U-Net has no closed form here, and a latent job needs its prepared data to know its input
    channels, size, classes, text_dim = shape
    count = dict(
        depth=m.depth,
        hidden_size=m.hidden_size,
        patch_size=m.patch_size,
        in_channels=channels,
        input_size=size,
        num_classes=classes,
        learn_sigma=m.learn_sigma,
        mlp_ratio=m.mlp_ratio,
        class_dropout_prob=m.class_dropout,
        conditioning=m.conditioning,
        condition=m.condition,
        ffn=m.ffn,
        pos_embed=m.pos_embed,
        text_dim=text_dim,
    )
    total, trainable = (
        estimate.dit_parameter_count(**count),
        estimate.dit_parameter_count(**count, include_frozen=False),
    )
    tokens = (size // m.patch_size) ** 2
    r = spec.resources
    activations = estimate.dit_activation_bytes_per_sample(
        m.depth,
        tokens,
        m.hidden_size,
        m.num_heads,
        spec.train.mixed_precision,
        checkpointing=r.activation_checkpointing,
    )
    offload = None
    if r.strategy.startswith("zero") and r.deepspeed.offload_optimizer:
        offload = "optimizer+params" if r.deepspeed.offload_params else "optimizer"
    memory = estimate.memory_per_gpu(
        trainable,
        r.strategy,
        spec.train.mixed_precision,
        world_size,
        spec.micro_batch_size,
        activations,
        frozen_params=total - trainable,
        offload=offload,
        ema_sharded=False,  # the EMA is kept of the full weights on every rank (orchestrator/train/zero.py)
    )
    gb = 1e9
    offloaded = f"; {memory['cpu_offloaded_bytes'] / gb:.2f} GB offloaded to CPU memory" if offload else ""
    return [
        f"parameters      {total:,} ({trainable:,} trainable), input {channels}x{size}x{size}, {tokens} tokens",
        f"memory/rank     ~{memory['total_bytes'] / gb:.2f} GB ({r.strategy}, {spec.train.mixed_precision}): weights "
        f"{memory['weights_bytes'] / gb:.2f}, "
        f"grads {memory['grads_bytes'] / gb:.2f}, AdamW {memory['optimizer_states_bytes'] / gb:.2f}, EMA "
        f"{memory['ema_bytes'] / gb:.2f}, "
        f"activations {memory['activations_bytes'] / gb:.2f} (micro batch {spec.micro_batch_size}"
        f"{', checkpointed' if r.activation_checkpointing else ''}){offloaded}; a lower bound, plan for ~1.5x",
    ]


def _input_shape(spec: JobSpec, hub_data: HubData | None = None) -> tuple[int, int, int, int | None] | None:
    """(channels, side, classes, text width) of the network's input, or None where the data is not here to say."""
    if spec.data.latent:
        from orchestrator.data.shards import ShardError, open_shards

        try:
            index = open_shards(spec.data.path).index
        except (ShardError, ValueError):
            return None
        channels, size, _ = index.latent_shape
        return channels, size, classes_to_build(spec, index.num_classes), index.text_dim
    data_classes = None
    if spec.model.num_classes is None and spec.data.source == "digits":
        data_classes = 10
    elif spec.model.num_classes is None and spec.data.source == "hf_dataset":
        if spec.model.condition == "class":  # only a class-conditional network has a table sized by the data
            hub_data = _hub_data(spec, hub_data)
            if isinstance(hub_data, UserError):
                return None
            data_classes = _hub_classes(*hub_data)
    elif spec.model.num_classes is None:
        try:
            data_classes = len(scan_image_folder(Path(spec.data.path)).classes)
        except DataError:
            return None
    return spec.data.num_channels, spec.data.resolution, classes_to_build(spec, data_classes), None


def _hub_data(spec: JobSpec, opened: HubData | None = None) -> HubData:
    """The hf_dataset source opened and its columns checked, or the HubError why not; `opened` where the caller has
    it already."""
    if opened is not None:
        return opened
    from orchestrator.data import hub

    source = hub.source_of(spec.data)
    try:
        rows = hub.open_dataset(source)
        return rows, hub.columns_of(spec.data, rows.features, f"dataset {source.describe()}")
    except hub.HubError as err:
        return err


def _hub_classes(rows, columns) -> int | None:
    """Classes of an hf_dataset split, as training counts them (HubImageDataset): a ClassLabel's names, else the
    largest integer label + 1, else None (no label column)."""
    if columns.class_names is not None:
        return len(columns.class_names)
    if columns.label is None or len(rows) == 0:
        return None
    import pyarrow.compute as pc

    return int(pc.max(rows.with_format("arrow")[columns.label]).as_py()) + 1  # a column scan, not a Python loop


def check_data(spec: JobSpec, hub_data: HubData | None = None) -> None:
    """The data the spec names exists and is usable (for prepared latents: reading index.json only; an hf_dataset is
    opened, or `hub_data` is what opening it gave)."""
    if spec.data.latent:
        from orchestrator.components.model_input import latent_problems
        from orchestrator.data.shards import ShardError, check_dataset, open_shards

        try:
            # a prepared folder, or shard paths / a brace pattern beside their index.json
            shards = open_shards(spec.data.path)
        except (ShardError, ValueError) as err:
            raise PlanError(str(err)) from None
        index = shards.index
        channels, size, _ = index.latent_shape
        problems = latent_problems(spec, index) + check_dataset(
            Path(shards.index_path).parent,
            channels,
            size,
            world_size=spec.resources.world_size,
            num_workers=spec.data.num_workers,
            micro_batch_size=spec.micro_batch_size,
        )
        if problems:
            raise PlanError("; ".join(problems))
    if spec.data.source == "image_folder":
        try:
            index = scan_image_folder(Path(spec.data.path))
        except DataError as err:
            raise PlanError(str(err)) from None
        if spec.model.num_classes is not None and spec.model.num_classes < len(index.classes):
            raise PlanError(
                f"model.num_classes is {spec.model.num_classes} but {spec.data.path} has {len(index.classes)} class "
                "folders"
            )
        _require_one_global_batch(spec, len(index.items), f"image_folder {spec.data.path}")
    if spec.data.source == "hf_dataset":
        hub_data = _hub_data(spec, hub_data)
        if isinstance(hub_data, UserError):
            raise PlanError(str(hub_data)) from None
        rows, columns = hub_data
        _require_one_global_batch(spec, len(rows), f"hf_dataset {spec.data.path}")
        if spec.model.condition == "class" and spec.model.num_classes is not None:
            classes = _hub_classes(rows, columns)
            if classes is not None and spec.model.num_classes < classes:
                raise PlanError(
                    f"model.num_classes is {spec.model.num_classes} but {spec.data.path} has {classes} classes (column "
                    f"{columns.label!r})"
                )


def _require_one_global_batch(spec: JobSpec, samples: int, what: str) -> None:
    """PlanError if a pixel source cannot fill one micro batch on every rank (the training stream would refuse)."""
    micro, world = spec.micro_batch_size, spec.resources.world_size
    if samples < micro * world:
        raise PlanError(
            f"{what} has {samples:,} sample(s), fewer than one global batch ({micro} per rank x {world} rank(s)): "
            "lower train.global_batch_size or add data"
        )


#################################################################################
#                 The data's epochs and the job's time on 8 x A100              #
#################################################################################

DIGITS_SAMPLES = 1797  # scikit-learn's load_digits(): 1,797 images (counted here without importing scikit-learn)

# An input's side in latents per side in pixels, and the latent channels, of the VAEs `orch prepare` is used with
# (stabilityai/sd-vae-ft-mse, madebyollin/sdxl-vae-fp16-fix): what the time formula assumes without an index.json.
SD_VAE_DOWNSAMPLE, SD_VAE_CHANNELS = 8, 4


def steps_per_epoch(num_samples: int, micro_batch: int, world_size: int, grad_accum_steps: int) -> Fraction:
    """Optimizer steps per epoch of a pixel source, as the training stream (loader.EpochBatches) draws them: each rank
    gets floor(N / (micro batch x ranks)) micro batches per epoch (the rest of each epoch's shuffle is left out),
    and a step takes grad_accum_steps of them (the stream runs on across epochs, so a step may span two)."""
    return Fraction(num_samples // (micro_batch * world_size), grad_accum_steps)


def _number(value: Fraction | float) -> str:
    """1,234 / 7.5 / 0.25: whole numbers without decimals, others with at most two."""
    if isinstance(value, Fraction) and value.denominator == 1:
        return f"{value.numerator:,}"
    return f"{float(value):,.2f}".rstrip("0").rstrip(".")


def _epochs(value: Fraction) -> str:
    return f"{float(value):,.0f}" if value >= 100 else _number(round(float(value), 1) if value >= 1 else value)


def data_description(spec: JobSpec, hub_data: HubData | None = None) -> str:
    """`orch plan`'s data line: the source's training samples, steps per epoch at the global batch, and the epochs
    train.steps cover; where the data is not here, what is known without it (the data problem says why)."""
    data, train = spec.data, spec.train
    world, micro, accum = spec.resources.world_size, spec.micro_batch_size, train.grad_accum_steps
    batch = f"global batch {train.global_batch_size:,}"
    counted = _sample_count(spec, hub_data)
    if counted is None:
        return (
            f"{data.source} {data.path}: not readable here (see the problem below); {train.steps:,} steps x {batch} = "
            f"{train.steps * train.global_batch_size:,} samples drawn: divide by the dataset's size for epochs"
        )
    samples, what, micro_batches = counted
    if micro_batches is None:  # a pixel source: EpochBatches
        micro_batches = samples // (micro * world)
        drawn = f"floor, as the training stream draws: {micro_batches * micro * world:,} samples per epoch, the "
        drawn += f"other {samples - micro_batches * micro * world:,} left out at random"
    elif isinstance(micro_batches, str):  # prepared shards that cannot be laid out with these settings
        return f"{samples:,} samples ({what}); {micro_batches} (see the problem below)"
    else:  # prepared shards: epoch 0's deal of the shards to the ranks and workers
        drawn = (
            f"floor, as the shard stream draws epoch 0: {micro_batches * micro * world:,} samples, each DataLoader "
            "worker drops its last partial batch; later epochs deal the shards anew"
        )
    per_epoch = Fraction(micro_batches, accum)
    if per_epoch == 0:
        return (
            f"{samples:,} samples ({what}): fewer than one global batch ({micro} per rank x {world} rank(s)); training "
            "would refuse to start: lower train.global_batch_size or add data"
        )
    return (
        f"{samples:,} samples ({what}); {_number(per_epoch)} steps per epoch at {batch} ({drawn}); "
        f"{train.steps:,} steps = {_epochs(train.steps / per_epoch)} epochs"
    )


def _sample_count(spec: JobSpec, hub_data: HubData | None = None) -> tuple[int, str, int | str | None] | None:
    """(samples, what they are, micro batches per rank in an epoch where the source decides it itself (prepared
    shards; a reason where it cannot), else None), or None where the data is not here."""
    data = spec.data
    if data.source == "digits":
        return DIGITS_SAMPLES, "scikit-learn's digits", None
    if data.source == "image_folder":
        try:
            return len(scan_image_folder(Path(data.path)).items), f"image_folder {data.path}", None
        except DataError:
            return None
    if data.source == "hf_dataset":
        from orchestrator.data import hub

        hub_data = _hub_data(spec, hub_data)
        if isinstance(hub_data, UserError):
            return None
        return len(hub_data[0]), f"hf_dataset {hub.source_of(data).describe()}", None
    from orchestrator.data.shards import ShardError, open_shards, plan_epoch

    try:
        shards = open_shards(data.path)
    except (ShardError, ValueError):
        return None
    try:
        batches = plan_epoch(
            shards.counts,
            0,
            seed=spec.train.seed,
            world_size=spec.resources.world_size,
            num_workers=data.num_workers,
            micro_batch=spec.micro_batch_size,
        ).batches
    except ShardError:
        batches = "these shards cannot feed the ranks and workers"
    return shards.index.num_samples, f"prepared shards {data.path}", batches


def time_description(spec: JobSpec) -> str:
    """`orch plan`'s line on the whole job's training time on one node of 8 A100s: FLOPs per image (estimate.py) x
    global batch x train.steps at the A100's peak and an assumed MFU. A formula, not a measurement."""
    from orchestrator.jobs import estimate

    m, r, train = spec.model, spec.resources, spec.train
    if m.arch != "dit":
        return "the formula covers DiT only (estimate.py counts no U-Net FLOPs)"
    assumed = ""
    if spec.data.latent:
        from orchestrator.data.shards import ShardError, open_shards

        try:
            index = open_shards(spec.data.path).index
        except (ShardError, ValueError):
            index = None
        if index is not None:
            channels, size, _ = index.latent_shape
            text_dim, text_tokens = index.text_dim, index.max_text_tokens or 1
        elif m.condition == "text" and m.conditioning in ("cross_attention", "in_context"):
            return "needs the prepared data's caption tokens (its index.json is not here)"
        else:
            channels, size = SD_VAE_CHANNELS, spec.data.resolution // SD_VAE_DOWNSAMPLE
            text_dim, text_tokens = None, 1  # adaLN: the caption's projection only, under 0.1 % of the work
            assumed = (
                f"; input assumed {channels}x{size}x{size}, an SD-VAE's latents of {spec.data.resolution} px (the "
                "prepared index.json is not here)"
            )
    else:
        channels, size, text_dim, text_tokens = spec.data.num_channels, spec.data.resolution, None, 1
    macs = estimate.dit_forward_macs(
        m.depth,
        m.hidden_size,
        m.patch_size,
        channels,
        size,
        m.learn_sigma,
        m.mlp_ratio,
        conditioning=m.conditioning,
        ffn=m.ffn,
        condition_tokens={"class": 1, "text": text_tokens, "none": 0}[m.condition],
        text_dim=text_dim if m.condition == "text" else None,
    )
    per_image = estimate.training_flops_per_image(macs, checkpointing=r.activation_checkpointing)
    arithmetic = estimate.matmul_arithmetic(train.mixed_precision, r.tf32)
    peak = estimate.A100_PEAK_FLOPS[arithmetic]
    gpus = 8
    seconds = estimate.training_time_s(per_image, train.global_batch_size, train.steps, gpus, peak)
    passes = "4 passes (checkpointed)" if r.activation_checkpointing else "3 passes"
    return (
        f"{_duration(seconds)} on {gpus} x A100: {_si(per_image)}FLOPs per image ({passes} x 2 x "
        f"{_si(macs)} multiply-adds) x {train.global_batch_size:,} x {train.steps:,} steps = "
        f"{per_image * train.global_batch_size * train.steps:.2e} FLOPs ({arithmetic} peak {peak / 1e12:g} TFLOP/s at "
        f"an assumed {estimate.ASSUMED_MFU:.0%} MFU; training steps only; formula, not a measurement{assumed})"
    )


def _si(value: float) -> str:
    """123 G / 45.6 M / 789 k: three significant digits and a prefix."""
    for prefix, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.3g} {prefix}"
    return f"{value:.3g} "


def _duration(seconds: float) -> str:
    if seconds < 1:
        return "under 1 s"
    if seconds < 60:
        return f"~{seconds:.2g} s"
    if seconds < 90 * 60:
        return f"~{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"~{seconds / 3600:.1f} h"
    return f"~{seconds / 86400:.1f} days"
