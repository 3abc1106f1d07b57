"""The distributed engine behind one face: accelerate's Accelerator (DDP over gloo or NCCL).

The trainer talks to this class only; FSDP (fsdp.py) and DeepSpeed ZeRO (zero.py) subclass it.

Small host-side agreements (stop requested? every rank's peak memory, an invariant check) go over a
second process group on gloo, with CPU tensors: on CUDA they never wait for the GPU's queue of work,
so the step that asks stays asynchronous. A third group, also gloo, carries the wait of the other
ranks while rank 0 works alone (`rank0_alone`: sample grids, a checkpoint conversion), with a timeout
of its own, so that a long grid does not run into the collective timeout (NCCL's, or gloo's).
"""

from __future__ import annotations

from orchestrator.errors import UserError

from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs


class WorldSizeMismatch(UserError):
    """The launcher started a different number of ranks than the plan asked for."""


class Engine:
    def __init__(
        self, device: str, mixed_precision: str, expected_world_size: int, collective_timeout_s: int = 600, bucket_mb: int = 25,
        rank0_timeout_s: int = 3600,
    ):
        # cpu=True gives MULTI_CPU (DDP over gloo) under torchrun / accelerate launch, one CPU process alone.
        # The timeout turns a collective waiting on a stuck or vanished rank (another node) into an error, not a hang.
        timeout = InitProcessGroupKwargs(timeout=timedelta(seconds=collective_timeout_s))
        buckets = DistributedDataParallelKwargs(bucket_cap_mb=bucket_mb)
        self.accelerator = Accelerator(cpu=device == "cpu", mixed_precision=mixed_precision, kwargs_handlers=[timeout, buckets])
        self._check_world_size(expected_world_size)
        self._start_host_group(collective_timeout_s, rank0_timeout_s)
        self.last_step_skipped = False

    def _start_host_group(self, collective_timeout_s: int, rank0_timeout_s: int) -> None:
        """The gloo groups for host-side agreements and for waiting out rank 0's solo phases (every rank calls it, once,
        after the default group). Two groups because gloo applies a group's own timeout to every send and receive:
        a stuck rank must still fail a per-step agreement within collective_timeout_s."""
        self.rank0_timeout_s = rank0_timeout_s
        self.host_group = self._rank0_wait_group = None
        self._pending_flag = None  # any_since_last_step's all-reduce in flight: (work, tensor)
        if self.distributed:
            self.host_group = dist.new_group(backend="gloo", timeout=timedelta(seconds=collective_timeout_s))
            self._rank0_wait_group = dist.new_group(backend="gloo", timeout=timedelta(seconds=rank0_timeout_s))

    def _check_world_size(self, expected_world_size: int) -> None:
        if self.world_size != expected_world_size:
            # Several launch commands silently start one process, or N that each see a world of 1.
            raise WorldSizeMismatch(
                f"rank {self.rank} sees a world of {self.world_size} process(es) but the plan has {expected_world_size}; "
                f"the launcher did not start the ranks together (distributed type {self.accelerator.distributed_type.value})"
            )

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def make_optimizer(self, params, lr: float, betas: tuple[float, float], eps: float, weight_decay: float) -> torch.optim.Optimizer:
        """The AdamW the model trains with (torch's)."""
        return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)

    def prepare(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        return self.accelerator.prepare(model, optimizer)

    def unwrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The network inside DDP's wrapper. Not accelerate's unwrap_model: on its first call it imports DeepSpeed
        (and through it MLflow) whenever DeepSpeed is installed, about half a second of every rank's start (measured)."""
        return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model

    def autocast(self):
        return self.accelerator.autocast()

    def no_sync(self, model: torch.nn.Module):
        return self.accelerator.no_sync(model)

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    def clip_grad_norm(self, model: torch.nn.Module, max_norm: float | None) -> torch.Tensor:
        """Unscale (fp16), clip to max_norm (None: only measure), return the global norm before clipping."""
        return self.accelerator.clip_grad_norm_(model.parameters(), max_norm if max_norm else float("inf"))

    def step(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, max_norm: float | None) -> torch.Tensor:
        """Clip, take the optimizer step, zero the grads; the global grad norm before clipping.

        With fp16, the grad scaler skips the step whose gradients overflowed: `last_step_skipped`
        then tells the loop not to advance the LR schedule or the EMA for it.
        """
        grad_norm = self.clip_grad_norm(model, max_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self.last_step_skipped = bool(getattr(optimizer, "step_was_skipped", False))
        return grad_norm

    def update_ema(self, ema, model: torch.nn.Module, step: int) -> None:
        """Move the EMA towards the trained weights (every rank calls it)."""
        ema.update(self.unwrap(model), step)

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """Mean over ranks (a logged loss is the global one, not rank 0's)."""
        if not self.distributed:
            return value
        value = value.detach().to(self.device, torch.float32).clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value / self.world_size

    def any(self, flag: bool) -> bool:
        """True on every rank if it is true on any rank (over the host group: no wait for the GPU)."""
        if not self.distributed:
            return flag
        tensor = torch.tensor([1.0 if flag else 0.0])
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self.host_group)
        return bool(tensor.item())

    def gather_floats(self, values: list[float]) -> list[list[float]]:
        """Every rank's `values`, in rank order, on every rank (a collective of a few numbers, over the host group)."""
        if not self.distributed:
            return [list(values)]
        mine = torch.tensor(values, dtype=torch.float64)
        everyone = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(everyone, mine, group=self.host_group)
        return [tensor.tolist() for tensor in everyone]

    def same_on_all_ranks(self, value: float) -> bool:
        """Whether every rank holds the same number (an invariant check, e.g. of EMA weights)."""
        if not self.distributed:
            return True
        tensor = torch.tensor([value, -value], dtype=torch.float64)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self.host_group)
        return tensor[0].item() == -tensor[1].item()

    def any_since_last_step(self, flag: bool) -> bool:
        """Whether any rank's flag was true at its previous call, on every rank alike; every rank calls it once a step.

        An agreement that never waits: the all-reduce of this call's flag starts now, over the host group, and
        is read at the next call, a step later, when it has long arrived. A synchronous one would cost a round
        trip through every rank each step (gloo's ring over 256 ranks: milliseconds) or, over NCCL, a wait for
        the GPU. So a stop signal takes effect one step after it arrived, on every rank at the same step.
        """
        if not self.distributed:
            return flag
        agreed = False
        if self._pending_flag is not None:
            work, tensor = self._pending_flag
            work.wait()
            agreed = bool(tensor.item())
        tensor = torch.tensor([1.0 if flag else 0.0])
        self._pending_flag = (dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self.host_group, async_op=True), tensor)
        return agreed

    @contextmanager
    def rank0_alone(self, what: str):
        """Rank 0 runs the body alone (the caller checks is_main); the others wait at a gloo barrier for up to
        rank0_timeout_s instead of in the next NCCL collective, whose timeout a long grid would exceed."""
        try:
            yield
        finally:
            if self.distributed:
                try:
                    dist.monitored_barrier(group=self._rank0_wait_group, timeout=timedelta(seconds=self.rank0_timeout_s))
                except RuntimeError as err:
                    raise RuntimeError(
                        f"rank {self.rank} waited {self.rank0_timeout_s} s for rank 0 to finish {what} "
                        f"(resources.rank0_timeout_s): {err}"
                    ) from err

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    def save_state(self, directory: str) -> None:
        """Model, optimizer, grad scaler and this rank's RNG states (a collective: every rank calls it)."""
        self.accelerator.save_state(directory)

    def load_state(self, directory: str) -> None:
        self.accelerator.load_state(directory, map_location="cpu")

    def close(self) -> None:
        if self._pending_flag is not None:  # the last step's agreement, still in flight: finish it before the group goes
            self._pending_flag[0].wait()
            self._pending_flag = None
        self.accelerator.end_training()
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
