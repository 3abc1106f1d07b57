"""DDP through accelerate's Accelerator (gloo on CPU, NCCL on CUDA): every rank holds the whole model,
gradients are all-reduced in buckets, fp16 and bf16 are accelerate's autocast (and grad scaler for fp16)."""

from __future__ import annotations

from datetime import timedelta

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

from orchestrator.train.engine import Engine


class DdpEngine(Engine):
    def __init__(
        self,
        device: str,
        mixed_precision: str,
        expected_world_size: int,
        collective_timeout_s: int = 600,
        bucket_mb: int = 25,
        rank0_timeout_s: int = 3600,
    ):
        # cpu=True gives MULTI_CPU (DDP over gloo) under torchrun / accelerate launch, one CPU process alone.
        # The timeout turns a collective waiting on a stuck or vanished rank (another node) into an error, not a hang.
        timeout = InitProcessGroupKwargs(timeout=timedelta(seconds=collective_timeout_s))
        buckets = DistributedDataParallelKwargs(bucket_cap_mb=bucket_mb)
        accelerator = Accelerator(
            cpu=device == "cpu", mixed_precision=mixed_precision, kwargs_handlers=[timeout, buckets]
        )
        super().__init__(accelerator, expected_world_size, collective_timeout_s, rank0_timeout_s)

    def prepare(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        return self.accelerator.prepare(model, optimizer)

    def unwrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The network inside DDP's wrapper. Not accelerate's unwrap_model: on its first call it imports DeepSpeed
        (and through it MLflow) whenever DeepSpeed is installed, about half a second of every rank's start (measured).
        """
        return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model

    def autocast(self):
        return self.accelerator.autocast()

    def no_sync(self, model: torch.nn.Module):
        return self.accelerator.no_sync(model)

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    def step(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, max_norm: float | None) -> torch.Tensor:
        """Unscale (fp16), clip, step, zero the grads; the global grad norm before clipping.

        With fp16, the grad scaler skips the step whose gradients overflowed: `last_step_skipped`
        then tells the loop not to advance the LR schedule or the EMA for it.
        """
        grad_norm = self.accelerator.clip_grad_norm_(model.parameters(), max_norm if max_norm else float("inf"))
        # fp16: the scaler's job; a meta tensor (the device-placement test's) has no value to look at
        if (
            self.accelerator.mixed_precision != "fp16"
            and grad_norm.device.type != "meta"
            and not torch.isfinite(grad_norm)
        ):
            optimizer.zero_grad(set_to_none=True)  # every rank agrees: the norm is of the all-reduced gradients
            self.last_step_skipped = True
            return grad_norm
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self.last_step_skipped = bool(getattr(optimizer, "step_was_skipped", False))
        return grad_norm

    def full_state_dict(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """Every rank already holds the full weights: a host fp32 copy of them."""
        return {name: tensor.detach().float().cpu().clone() for name, tensor in self.unwrap(model).state_dict().items()}

    def update_ema(self, ema, model: torch.nn.Module, step: int) -> None:
        ema.update(self.unwrap(model), step)

    def save_state(self, directory: str) -> None:
        """Model, optimizer, grad scaler and this rank's RNG states (accelerate's layout)."""
        self.accelerator.save_state(directory)

    def load_state(self, directory: str) -> None:
        self.accelerator.load_state(directory, map_location="cpu")
