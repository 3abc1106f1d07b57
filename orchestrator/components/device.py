"""How a rank sets up its device: the node's GPUs checked against the job, TF32, determinism."""

from __future__ import annotations

import os
import socket

import torch

from orchestrator.errors import UserError
from orchestrator.specs.job import JobSpec


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
