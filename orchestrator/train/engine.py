"""The face every distributed engine shows the trainer, and what all of them share.

`Engine` states what the loop needs: wrap the model and optimizer (`prepare`), run forward and
backward under the training precision (`autocast`, `no_sync`, `backward`), clip and step (`step`),
gather the full fp32 weights (`full_state_dict`, `update_ema`, `load_full_state_dict`) and save and
load every rank's state (`save_state`, `load_state`). DDP (ddp.py), FSDP (fsdp.py) and DeepSpeed ZeRO
(zero.py) are peers behind it; a fourth engine is one new file that fills in the abstract methods and
one line in `strategy.make_engine`.

What they share lives here: accelerate's Accelerator sets up the process group and the device in all
three, and small host-side agreements (stop requested? every rank's peak memory, an invariant check) go
over a second process group on gloo, with CPU tensors: on CUDA they never wait for the GPU's queue of
work, so the step that asks stays asynchronous. A third group, also gloo, carries the wait of the other
ranks while rank 0 works alone (`rank0_alone`: sample grids, a checkpoint conversion), with a timeout
of its own, so that a long grid does not run into the collective timeout (NCCL's, or gloo's).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import AbstractContextManager, contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist

from orchestrator.errors import UserError


class TrainingDiverged(Exception):
    """The loss or the weights stopped being finite: the job ends as failed, its last good checkpoint kept."""


class WorldSizeMismatch(UserError):
    """The launcher started a different number of ranks than the plan asked for."""


class Engine(ABC):
    """One rank's view of the distributed job: its place in it, its collectives, and the training calls every
    engine answers in its own way (the abstract methods)."""

    def __init__(self, accelerator, expected_world_size: int, collective_timeout_s: int, rank0_timeout_s: int):
        """accelerator: the engine's accelerate.Accelerator, which has set up the process group and the device."""
        self.accelerator = accelerator
        self.last_step_skipped = False  # set by `step`: fp16's grad scaler skipped the update (inf/NaN gradients)
        self._check_world_size(expected_world_size)
        self._start_host_group(collective_timeout_s, rank0_timeout_s)

    # ------------------------------------------------------------------ what each engine does its own way
    def make_optimizer(
        self, params, lr: float, betas: tuple[float, float], eps: float, weight_decay: float
    ) -> torch.optim.Optimizer:
        """The AdamW the model trains with (torch's, unless the engine needs its own)."""
        return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)

    @abstractmethod
    def prepare(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer
    ) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        """The model and optimizer as this engine trains them (wrapped, sharded, moved to the device)."""

    @abstractmethod
    def unwrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The network inside what `prepare` returned."""

    @abstractmethod
    def autocast(self) -> AbstractContextManager:
        """The context the forward pass runs in: the training precision."""

    @abstractmethod
    def no_sync(self, model: torch.nn.Module) -> AbstractContextManager:
        """The context of a micro step before the last of an accumulation: gradients accumulate, no reduction."""

    @abstractmethod
    def backward(self, loss: torch.Tensor) -> None:
        """Backward of a loss the caller already divided by the number of accumulation steps."""

    @abstractmethod
    def step(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, max_norm: float | None) -> torch.Tensor:
        """Clip to max_norm (None: only measure), take the optimizer step, zero the grads; the global grad norm
        before clipping. Sets `last_step_skipped` when the update was skipped (fp16 overflow)."""

    @abstractmethod
    def full_state_dict(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The full fp32 state dict (parameters and persistent buffers) on the host of every rank (a collective)."""

    @abstractmethod
    def update_ema(self, ema, model: torch.nn.Module, step: int) -> None:
        """Move the EMA (model.ema.EMA, on the training device) towards the full trained weights (every rank calls
        it)."""

    def load_full_state_dict(self, model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
        """After `prepare`, set every weight from the full state dict the network was loaded with before it
        (model.init_from). DDP and FSDP wrap or shard the loaded module and need nothing more; an engine that
        keeps a copy of its own (DeepSpeed's fp32 master weights) sets it here."""

    @abstractmethod
    def save_state(self, directory: str) -> None:
        """Model, optimizer and this rank's RNG states into the checkpoint directory (every rank calls it)."""

    @abstractmethod
    def load_state(self, directory: str) -> None:
        """Restore what save_state wrote (every rank calls it)."""

    # ------------------------------------------------------------------ what all engines share
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
                f"rank {self.rank} sees a world of {self.world_size} process(es) but the plan has "
                f"{expected_world_size}; "
                "the launcher did not start the ranks together (distributed type "
                f"{self.accelerator.distributed_type.value})"
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

    def gather_to_main(self, value):
        """Every rank's `value` (any picklable object, e.g. a NumPy array of features), in rank order, on rank 0;
        None on the other ranks (a collective over the host group: CPU objects, no wait for the GPU)."""
        if not self.distributed:
            return [value]
        gathered = [None] * self.world_size if self.is_main else None
        dist.gather_object(value, gathered, dst=0, group=self.host_group)
        return gathered

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
        self._pending_flag = (
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self.host_group, async_op=True),
            tensor,
        )
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
                    dist.monitored_barrier(
                        group=self._rank0_wait_group, timeout=timedelta(seconds=self.rank0_timeout_s)
                    )
                except RuntimeError as err:
                    raise RuntimeError(
                        f"rank {self.rank} waited {self.rank0_timeout_s} s for rank 0 to finish {what} "
                        f"(resources.rank0_timeout_s): {err}"
                    ) from err

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    def close(self) -> None:
        # the last step's agreement, still in flight: finish it before the group goes
        if self._pending_flag is not None:
            self._pending_flag[0].wait()
            self._pending_flag = None
        self.accelerator.end_training()
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
