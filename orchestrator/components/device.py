"""How a rank sets up its device: the node's GPUs checked against the job, TF32, determinism, NCCL's flight
recorder."""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

import torch

from orchestrator.errors import UserError
from orchestrator.specs.job import JobSpec

log = logging.getLogger(__name__)


def check_node_devices(spec: JobSpec, device: str) -> None:
    """UserError, naming this node, if it cannot run its share of the job: fewer GPUs than ranks per node, or no
    bf16."""
    if device != "cuda":
        return
    host = socket.gethostname()
    if not torch.cuda.is_available():
        raise UserError(
            f"node {host} has no usable CUDA GPU, and the job runs on device cuda (torch {torch.__version__}, CUDA "
            f"build {torch.version.cuda})"
        )
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", spec.resources.processes))
    visible = torch.cuda.device_count()
    if ranks_here > visible:
        raise UserError(
            f"node {host} shows {visible} GPU(s) but the job runs {ranks_here} rank(s) per node, one per GPU; "
            f"set resources.gpus_per_node (or processes) to at most {visible}, or check CUDA_VISIBLE_DEVICES"
        )
    if spec.train.mixed_precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise UserError(
            f"node {host}'s GPU ({torch.cuda.get_device_name()}) has no bf16; use train.mixed_precision fp16 (strategy "
            "ddp) or no"
        )


def set_determinism(deterministic: bool, device: str) -> None:
    """resources.deterministic: only deterministic kernels (a resume on CUDA then repeats the run bit for bit); else
    let cuDNN pick its fastest convolution algorithms for the shapes it sees (the U-Net's convolutions)."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts: before the first matmul
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = device == "cuda" and not deterministic


def use_tf32(enabled: bool) -> None:
    """fp32 matmuls and cuDNN convolutions on TF32 tensor cores, or strict fp32 (resources.tf32)."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def nccl_flight_recorder_env(logs_dir: Path) -> dict[str, str]:
    """The environment that makes NCCL keep a record of each rank's last collectives and write it when a collective
    times out (PyTorch's flight recorder, torch >= 2.3): logs/nccl_trace_rank_<R> tells which rank stopped calling
    which collective. Read when the process group is made, so it is set before; a user's own values win."""
    return {
        "TORCH_NCCL_TRACE_BUFFER_SIZE": "2000",  # collectives kept per rank (0, the default, keeps none)
        "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",  # write the record when the watchdog finds a timed-out collective
        "TORCH_NCCL_DEBUG_INFO_TEMP_FILE": str(logs_dir / "nccl_trace_rank_"),  # + the rank
    }


def record_nccl_collectives(logs_dir: Path) -> None:
    """Set nccl_flight_recorder_env in this process (a CUDA rank, before the process group), keeping set values."""
    logs_dir.mkdir(exist_ok=True)
    for name, value in nccl_flight_recorder_env(logs_dir).items():
        os.environ.setdefault(name, value)
    log.info(
        "NCCL flight recorder: the last %s collectives of each rank go to %s<rank> on a collective timeout",
        os.environ["TORCH_NCCL_TRACE_BUFFER_SIZE"],
        os.environ["TORCH_NCCL_DEBUG_INFO_TEMP_FILE"],
    )
