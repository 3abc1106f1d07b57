"""PyTorch FSDP (FSDP2, `torch.distributed.fsdp.fully_shard`), an `Engine` (engine.py).

Why torch's own API and not accelerate's FSDP plugin: on CPU, accelerate 1.15 ignores an
`fsdp_plugin` without a word (it stays MULTI_CPU and wraps the model in DDP; measured), so the CPU
tests could not reach the code the GPUs run. accelerate still sets up the process group and device.

What differs from the DDP engine, and why:
- Each transformer / U-Net block is a sharding unit, then the root: a rank keeps 1/world of every
  weight, gradient and AdamW state; a block's weights are all-gathered for its forward and backward
  and freed after (reshard_after_forward, ZeRO-3's schedule).
- `fully_shard` swaps every parameter for a DTensor: `prepare` points the optimizer's parameter
  groups at the new ones (it has no state yet), so the LR schedule built on it keeps working.
- bf16: FSDP's MixedPrecisionPolicy (weights gathered and computed in bf16, gradients reduced in
  fp32, fp32 master shards) plus torch.autocast for the fp32 tensors the network makes in forward.
- Gradient accumulation: `no_sync` turns the reduce-scatter off for the micro steps before the last.
- The EMA follows the full fp32 weights, gathered at each EMA update (as under ZeRO): it equals an
  EMA of the consolidated weights on every rank, and sampling, checkpoints and export see a plain
  model's weights. One fp32 copy of the model per rank.
- Checkpoints: torch.distributed.checkpoint (DCP) writes every rank's shards of the weights and the
  AdamW state into `fsdp/`, rank 0 adds `model.safetensors` (consolidated fp32 weights) where the DDP
  engine has its weights, and each rank its RNG states. DCP reshards on load, so a checkpoint
  continues on any number of ranks with its optimizer state.
"""

from __future__ import annotations

import logging
import random
from contextlib import contextmanager, nullcontext
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from model.dit import blocks_of
from orchestrator.errors import UserError
from orchestrator.layout import MODEL_FILE
from orchestrator.specs.job import precision_refusal
from orchestrator.train.engine import Engine

SHARDS = "fsdp"  # the DCP folder inside a checkpoint
log = logging.getLogger(__name__)


class FsdpEngine(Engine):
    def __init__(
        self,
        device: str,
        mixed_precision: str,
        expected_world_size: int,
        collective_timeout_s: int = 600,
        rank0_timeout_s: int = 3600,
    ):
        refusal = precision_refusal("fsdp", mixed_precision)
        if refusal:
            raise UserError(refusal)
        from accelerate import Accelerator
        from accelerate.utils import InitProcessGroupKwargs

        timeout = InitProcessGroupKwargs(timeout=timedelta(seconds=collective_timeout_s))
        # mixed_precision "no": autocast and casting are ours (see above)
        super().__init__(
            Accelerator(cpu=device == "cpu", mixed_precision="no", kwargs_handlers=[timeout]),
            expected_world_size,
            collective_timeout_s,
            rank0_timeout_s,
        )
        self.mixed_precision = mixed_precision
        if not dist.is_initialized():  # one process without a launcher: FSDP still needs a (one-rank) process group
            import os
            import socket

            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(probe.getsockname()[1]))
            dist.init_process_group("gloo" if device == "cpu" else "nccl", rank=0, world_size=1)

    def prepare(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        model = model.to(self.device)
        names = {id(param): name for name, param in model.named_parameters()}
        policy = (
            MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            if self.mixed_precision == "bf16"
            else MixedPrecisionPolicy()
        )
        for block in blocks_of(model):  # one sharding unit per block, then the root
            fully_shard(block, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
        sharded = dict(model.named_parameters())
        for group in optimizer.param_groups:
            group["params"] = [sharded[names[id(param)]] for param in group["params"]]
        self._prepared = (model, optimizer)
        return model, optimizer

    def unwrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def autocast(self):
        if self.mixed_precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    @contextmanager
    def no_sync(self, model: torch.nn.Module):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, max_norm: float | None) -> torch.Tensor:
        """Clip (the norm over every rank's shards), step, zero the grads; the global grad norm before clipping."""
        norm = torch.nn.utils.clip_grad_norm_(
            [p for p in model.parameters() if p.grad is not None], max_norm if max_norm else float("inf")
        )
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # over every rank's shards
        self.last_step_skipped = not bool(torch.isfinite(norm))  # the same on every rank: skip the update
        if not self.last_step_skipped:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return norm

    # ------------------------------------------------------------------ full weights and EMA
    def full_state_dict(self, model: torch.nn.Module, on_host: bool = True) -> dict[str, torch.Tensor]:
        """The consolidated fp32 weights (parameters and persistent buffers) on every rank (a collective):
        copied to the host for writing, or (on_host=False) left on the device for the EMA."""
        full = {}
        for name, tensor in model.state_dict().items():
            tensor = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
            tensor = tensor.detach().float()
            full[name] = tensor.cpu().clone() if on_host else tensor
        return full

    def update_ema(self, ema, model: torch.nn.Module, step: int) -> None:
        """Move the EMA towards the gathered full fp32 weights, on the device; every rank calls it with the same step (a
        collective)."""
        if step % ema.update_every:
            return
        weights = self.full_state_dict(model, on_host=False)
        parameters = {name: weights[name] for name, _ in model.named_parameters()}
        buffers = {name: buffer.detach() for name, buffer in model.named_buffers()}
        ema.update_from(parameters, buffers, step)

    # ------------------------------------------------------------------ checkpoints
    def save_state(self, directory: str) -> None:
        """Every rank's shards (weights, AdamW) by DCP, this rank's RNG states, and on rank 0 the consolidated
        weights."""
        import torch.distributed.checkpoint as dcp
        from safetensors.torch import save_file
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model, optimizer = self._prepared
        model_state, optimizer_state = get_state_dict(model, optimizer)
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(Path(directory) / SHARDS))
        rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
        if self.device.type == "cuda":  # this rank's own GPU: another node may show another number of them
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        torch.save(rng, Path(directory) / f"random_states_{self.rank}.pkl")
        weights = self.full_state_dict(model)
        if self.is_main:
            save_file(weights, str(Path(directory) / MODEL_FILE))

    def load_state(self, directory: str) -> None:
        """Restore what save_state wrote, on any number of ranks (DCP reshards); RNG states only on the same world
        size."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        shards = Path(directory) / SHARDS
        if not shards.is_dir():
            raise UserError(
                f"{directory} holds no FSDP checkpoint ({SHARDS}/ is missing): it was written by another strategy"
            )
        model, optimizer = self._prepared
        model_state, optimizer_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optimizer": optimizer_state}
        dcp.load(state, checkpoint_id=str(shards))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
        rng_file = Path(directory) / f"random_states_{self.rank}.pkl"
        if rng_file.is_file() and len(list(Path(directory).glob("random_states_*.pkl"))) == self.world_size:
            rng = torch.load(rng_file, weights_only=False)
            random.setstate(rng["python"])
            np.random.set_state(rng["numpy"])
            torch.set_rng_state(rng["torch"])
            if "cuda" in rng and self.device.type == "cuda":
                torch.cuda.set_rng_state(rng["cuda"], self.device)
