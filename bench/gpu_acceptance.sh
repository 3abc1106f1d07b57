#!/usr/bin/env bash
# GPU acceptance of orch's own commands, in one command, under 8 minutes on one GPU: prepare, fault jobs
# (DDP bf16/fp16, FSDP, ZeRO-2: grids, checkpoints, SIGKILL, resume), bitwise resume with
# resources.deterministic, and the trainer's throughput and MFU. Writes bench/results/gpu-<device>.md;
# exits non-zero on any failure. Details: bench/gpu_acceptance.py. Run it first whenever a GPU is at hand.
#   bash bench/gpu_acceptance.sh [--device cpu] [--out FILE] [--budget-s 420]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
exec "$PYTHON" bench/gpu_acceptance.py "$@"
