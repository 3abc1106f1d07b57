#!/usr/bin/env bash
# Sets up ./.venv with everything orch and its tests need. Idempotent; safe to run again.
# torch is pinned to 2.13.0 and installed first: an unpinned torch pulls the newest CUDA build
# (several GB) even on a machine without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
"$PYTHON" -c 'import sys; assert sys.version_info >= (3, 11), "orch needs Python >= 3.11"'
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[test]"
# torch-fidelity (the eval extra: FID's Inception-v3) without its requirements, which pull torchvision and another torch
.venv/bin/python -m pip install -q --no-deps "torch-fidelity==0.4.0"
# DeepSpeed (resources.strategy zero1/2/3): built without isolation so that it compiles against the pinned
# torch (an isolated build pulls another one); its CPU communication op (~40 s) and CPU Adam (~50 s, for
# resources.deepspeed.offload_optimizer) are compiled once into the venv, where the engine looks for them,
# instead of at the first collective / offloaded step of every fresh machine.
DS_BUILD_OPS=0 .venv/bin/python -m pip install -q --no-build-isolation "deepspeed==0.19.8" "torch==2.13.0"
TORCH_EXTENSIONS_DIR=.venv/torch_extensions DS_ACCELERATOR=cpu .venv/bin/python -c \
    'from deepspeed.accelerator import get_accelerator; get_accelerator().create_op_builder("ShareMemCommBuilder").load()' >/dev/null
TORCH_EXTENSIONS_DIR=.venv/torch_extensions DS_ACCELERATOR=cpu .venv/bin/python -c \
    'from deepspeed.ops.op_builder import CPUAdamBuilder; CPUAdamBuilder().load()' >/dev/null
.venv/bin/python -c 'import torch, accelerate, diffusers, mlflow; print(f"orch environment ready: torch {torch.__version__}, accelerate {accelerate.__version__}, diffusers {diffusers.__version__}, mlflow {mlflow.__version__}")'
