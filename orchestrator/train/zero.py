"""DeepSpeed ZeRO (stages 1, 2, 3), an `Engine` (engine.py), through accelerate's DeepSpeedPlugin.

What differs from the DDP engine, and why:
- DeepSpeed owns the optimizer step. Gradient clipping and accumulation live in its config
  (launch/deepspeed.py); `step()` runs DeepSpeed's step (reduce, clip, AdamW, zero the grads) and returns
  the global grad norm before clipping. The optimizer that `prepare` returns is accelerate's wrapper,
  whose `step()` and `zero_grad()` do nothing.
- The loss is not divided again: the loop already divides it by grad_accum_steps, so `backward`
  passes `scale_wrt_gas=False`. `no_sync` marks a micro step that is not the accumulation boundary.
- bf16 is DeepSpeed's bf16 mode: the module's weights are bf16, the fp32 master weights and the AdamW
  state live (partitioned) in DeepSpeed's optimizer. DeepSpeed does not autocast (and accelerate's
  autocast is a no-op under DeepSpeed), yet the network makes fp32 tensors inside its forward
  (timestep features), so `autocast()` is a real `torch.autocast(bf16)` here; inputs may stay fp32.
- The EMA follows the fp32 master weights, gathered in full on every rank at each EMA update
  (`update_ema`, a collective), so it equals the EMA the DDP engine keeps of its fp32 weights; its
  memory is one fp32 copy of the model per rank, as with DDP (see `update_ema` for the trade-off).
- `save_state`/`load_state` write and read DeepSpeed's own layout (`pytorch_model/` with per-rank ZeRO
  shards, plus accelerate's `random_states_<r>.pkl`) inside the checkpoint directory, and rank 0 adds
  `model.safetensors` (the consolidated fp32 weights) where the DDP engine keeps its weights, so
  sampling and export read a ZeRO checkpoint as they read a DDP one; every rank calls both. A
  checkpoint of another world size is loaded as a DeepSpeed universal checkpoint (weights, fp32 master
  and AdamW state), or from its consolidated weights only. `full_state_dict` gathers the fp32 weights
  in a running job; `consolidated_weights` rebuilds them from a checkpoint in one process (zero_to_fp32).

The first collective compiles DeepSpeed's `deepspeed_shm_comm` op (30-40 s in one process on 2 cores,
about 80 s when two ranks start on an empty cache), cached in TORCH_EXTENSIONS_DIR; this module points
that at `<venv>/torch_extensions` unless it is set.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import socket
import subprocess
import sys
import warnings
from contextlib import contextmanager, nullcontext, redirect_stdout
from datetime import timedelta
from pathlib import Path

import torch

from launch.deepspeed import offloaded
from orchestrator.errors import UserError
from orchestrator.layout import MODEL_FILE
from orchestrator.specs.job import precision_refusal
from orchestrator.train.engine import Engine, TrainingDiverged

MODEL_TAG = "pytorch_model"  # the sub-directory accelerate's save_state gives DeepSpeed's checkpoint (its MODEL_NAME)
UNIVERSAL_TAG = (
    "pytorch_model_universal"  # DeepSpeed's universal checkpoint, made from the shards for a world-size change
)
log = logging.getLogger(__name__)


def saved_world_size(checkpoint_dir: str | Path) -> int | None:
    """The number of ranks whose ZeRO shards a checkpoint holds (None: no DeepSpeed checkpoint in it)."""
    shards = list((Path(checkpoint_dir) / MODEL_TAG).glob("*zero_pp_rank_*_optim_states.pt"))
    return len(shards) or None


def extensions_dir() -> Path:
    """Where DeepSpeed's JIT-compiled ops are cached: TORCH_EXTENSIONS_DIR, else `<venv>/torch_extensions`."""
    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path(sys.prefix) / "torch_extensions")


def _single_process_environment() -> None:
    """A rank started without a launcher (no LOCAL_RANK): a world of one on a free loopback port, as DeepSpeed needs
    one."""
    if "LOCAL_RANK" in os.environ:
        return
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.update(
        RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )


class ZeroEngine(Engine):
    """accelerate + DeepSpeed ZeRO over gloo (CPU) or NCCL (CUDA): `Engine`'s methods (ranks, collectives from it) and a
    few more."""

    def __init__(
        self,
        device: str,
        mixed_precision: str,
        expected_world_size: int,
        collective_timeout_s: int = 600,
        *,
        config: dict,
        rank0_timeout_s: int = 3600,
    ):
        """config: the DeepSpeed config (launch.deepspeed.deepspeed_config), batch split and stage included."""
        refusal = precision_refusal(f"zero{config['zero_optimization']['stage']}", mixed_precision)
        if refusal:
            raise UserError(refusal)
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(extensions_dir()))
        if device == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        _single_process_environment()
        # DeepSpeed 0.19 calls collectives torch 2.13 deprecates: one warning per call would flood the job log.
        warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
        # DeepSpeed steps the offloaded CPU Adam itself, past the LR scheduler's step counter; the schedule
        # still applies (it sets the groups' lr, which CPU Adam reads: tests/integration/test_strategy_settings.py).
        warnings.filterwarnings(
            "ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before `optimizer\.step\(\)`"
        )
        from accelerate import Accelerator, DeepSpeedPlugin
        from accelerate.utils import InitProcessGroupKwargs

        self.config = config
        self.stage = config["zero_optimization"]["stage"]
        self.mixed_precision, self.grad_accum_steps = mixed_precision, config["gradient_accumulation_steps"]
        self.offload_optimizer = "optimizer" in offloaded(config)
        plugin = DeepSpeedPlugin(hf_ds_config=self.config)
        # Without an explicit backend accelerate asks DeepSpeed for its default (ccl on CPU), and
        # without a process group every rank believes it is alone; cpu=True would turn DeepSpeed off.
        # The timeout turns a collective waiting on a stuck or vanished rank into an error, not a hang.
        backend = "gloo" if device == "cpu" else "nccl"
        accelerator = Accelerator(
            deepspeed_plugin=plugin,
            mixed_precision=mixed_precision,
            gradient_accumulation_steps=self.grad_accum_steps,
            kwargs_handlers=[InitProcessGroupKwargs(backend=backend, timeout=timedelta(seconds=collective_timeout_s))],
        )
        super().__init__(accelerator, expected_world_size, collective_timeout_s, rank0_timeout_s)
        self.ds = None  # the DeepSpeedEngine, once prepared
        self._boundary = True

    # ------------------------------------------------------------------ training
    def make_optimizer(
        self, params, lr: float, betas: tuple[float, float], eps: float, weight_decay: float
    ) -> torch.optim.Optimizer:
        """torch's AdamW; with the optimizer offloaded, DeepSpeed's CPU Adam in AdamW mode (the same update,
        vectorised for the CPU; DeepSpeed refuses other optimizers there). Its op is compiled once (setup.sh)."""
        if not self.offload_optimizer:
            return super().make_optimizer(params, lr, betas, eps, weight_decay)
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, adamw_mode=True)

    def unwrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The network inside the DeepSpeedEngine."""
        return self.accelerator.unwrap_model(model)

    def prepare(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        """(DeepSpeedEngine, accelerate's DeepSpeedOptimizerWrapper); under ZeRO-3 the module's parameters are
        partitioned."""
        if self.ds is not None:
            raise RuntimeError("ZeroEngine.prepare was called twice; it holds one model")
        wrapped_model, wrapped_optimizer = self.accelerator.prepare(model, optimizer)
        self.ds = wrapped_model
        if self.is_main:  # read back from DeepSpeed's engine: what it really runs with
            offload_param = self.ds.zero_offload_param()
            log.info(
                "DeepSpeed ZeRO-%d: optimizer %s%s%s, reduce bucket %d elements, overlap_comm %s, bf16 %s",
                self.ds.zero_optimization_stage(),
                type(self.ds.optimizer.optimizer).__name__,
                " offloaded to CPU" if self.ds.zero_cpu_offload() else "",
                ", weights offloaded to CPU" if offload_param is not None and offload_param.device == "cpu" else "",
                self.ds.zero_reduce_bucket_size(),
                self.ds.zero_overlap_comm(),
                self.ds.bfloat16_enabled(),
            )
        return wrapped_model, wrapped_optimizer

    def autocast(self):
        """torch.autocast to bf16 in bf16 mode (DeepSpeed does not autocast; fp32 tensors made in forward need
        casting)."""
        if self.mixed_precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    @contextmanager
    def no_sync(self, model: torch.nn.Module):
        """The backward inside is a micro step before the accumulation boundary: gradients accumulate, no step."""
        self._boundary = False
        try:
            yield
        finally:
            self._boundary = True

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of a loss the caller already divided by grad_accum_steps (DeepSpeed must not divide again)."""
        assert self.ds is not None, "ZeroEngine.backward before prepare"
        self.ds.set_gradient_accumulation_boundary(self._boundary)
        self.ds.backward(loss, scale_wrt_gas=False)

    def step(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, max_norm: float | None) -> torch.Tensor:
        """DeepSpeed's step after the boundary micro batch: reduce, clip (config), AdamW, zero grads; the global norm
        before
        clipping. max_norm must be the clipping the config was built with."""
        assert self.ds is not None, "ZeroEngine.step before prepare"
        if float(max_norm or 0) != float(self.config["gradient_clipping"] or 0):
            raise ValueError(
                f"the DeepSpeed config clips at {self.config['gradient_clipping']}, the caller asked for {max_norm}"
            )
        self.ds.set_gradient_accumulation_boundary(True)
        skipped_before = self.ds.skipped_steps
        self.ds.step()
        # ZeRO-1/2 skip a step with non-finite gradients themselves (fp16 and fp32 always, bf16 with the
        # check_grad_overflow DeepSpeed defaults to) and count it; ZeRO-3 only under fp16.
        self.last_step_skipped = self.ds.skipped_steps > skipped_before
        norm = self.ds.get_global_grad_norm()
        norm = torch.as_tensor(float("nan") if norm is None else float(norm))
        if not self.last_step_skipped and not torch.isfinite(norm) and self.stage == 3:
            raise TrainingDiverged(
                "ZeRO-3 applied an update with non-finite gradients (DeepSpeed checks them only under fp16): the "
                "weights are lost from this step; `orch resume` continues from the last checkpoint"
            )
        return norm

    # ------------------------------------------------------------------ full weights and EMA
    def _full_fp32(self, module: torch.nn.Module, on_host: bool = True) -> dict[str, torch.Tensor]:
        """Every parameter of `module` in full, fp32, on every rank (a collective: every rank calls it): copied to
        the host for writing, or (on_host=False) left on the device for the EMA.

        Trainable parameters: DeepSpeed's fp32 master weights (ZeRO-1/2: an all-reduce of each rank's
        fragment over zeros, exact; ZeRO-3: an all-gather of the partitions). Frozen ones (no master
        copy): the module's own, gathered under ZeRO-3.
        """
        from deepspeed.utils import safe_get_full_fp32_param

        if self.stage < 3 and self.mixed_precision == "no":
            # ZeRO-1/2 in fp32: every rank's module holds the full, current fp32 weights; no collective needed.
            return {name: _placed(param, on_host) for name, param in module.named_parameters()}
        full = {}
        frozen = []
        for name, param in module.named_parameters():
            master = safe_get_full_fp32_param(param) if param.requires_grad else None
            if master is None:
                frozen.append((name, param))
            else:
                full[name] = _placed(master, on_host)
        if frozen:
            context = nullcontext()
            if self.stage == 3:
                import deepspeed

                context = deepspeed.zero.GatheredParameters([p for _, p in frozen], modifier_rank=None)
            with context:
                for name, param in frozen:
                    full[name] = _placed(param, on_host)
        return {name: full[name] for name, _ in module.named_parameters()}  # the module's order

    def load_full_state_dict(self, model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
        """Set every weight from a full state dict, the fp32 master copy included (every rank calls it with the same
        weights).

        After `prepare`: loading fp32 weights into the network before it would keep only their bf16
        rounding in bf16 mode (DeepSpeed builds its fp32 master from the bf16 module). This is how a job
        starts from consolidated weights, e.g. on another world size.
        """
        from deepspeed.utils import safe_set_full_fp32_param

        module = self.unwrap(model)
        expected = set(module.state_dict().keys())
        if expected != set(weights):
            missing, extra = sorted(expected - set(weights)), sorted(set(weights) - expected)
            raise ValueError(f"the weights do not fit the model (missing: {missing[:5]}, unexpected: {extra[:5]})")
        params = list(module.named_parameters())
        context = nullcontext()
        if self.stage == 3:
            import deepspeed

            # rank 0's copy is scattered
            context = deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=0)
        with torch.no_grad():
            with context:
                for name, param in params:
                    param.data.copy_(weights[name].to(param.dtype))
            for name, param in params:
                if param.requires_grad:
                    safe_set_full_fp32_param(param, weights[name].to(self.device, torch.float32))
            for name, buffer in module.named_buffers():
                if name in weights:
                    buffer.copy_(weights[name])

    def full_state_dict(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The consolidated fp32 state dict (parameters and persistent buffers) on every rank, for export and sampling
        (a collective)."""
        module = self.unwrap(model)
        weights = self._full_fp32(module)
        names = set(module.state_dict().keys())
        for name, buffer in module.named_buffers():
            if name in names:
                weights[name] = buffer.detach().float().cpu().clone()
        return {name: weights[name] for name in module.state_dict()}

    def update_ema(self, ema, model: torch.nn.Module, step: int) -> None:
        """Move the EMA (model.ema.EMA) towards the full fp32 weights; every rank calls it with the same step (a
        collective).

        Decision: gather the full weights at each EMA update rather than keep the EMA sharded. The
        EMA then equals, bit for bit, an EMA of the consolidated fp32 weights on every rank, the trainer
        samples from it on rank 0 and writes it into checkpoints exactly as under DDP, and it stays
        the same object (model.ema.EMA). The cost: an all-gather of the fp32 weights per update
        (amortise with ema.update_every) and one fp32 copy of the model per rank. A sharded EMA (each
        rank averaging only its fp32 partition, gathered only for grids and checkpoints) is the way
        once a full fp32 copy no longer fits on one device; it is not done here.
        """
        if step % ema.update_every:
            return
        module = self.unwrap(model)
        weights = self._full_fp32(module, on_host=False)
        buffers = {name: buffer.detach() for name, buffer in module.named_buffers()}
        ema.update_from(weights, buffers, step)

    @staticmethod
    def consolidated_weights(checkpoint_dir: str | Path) -> dict[str, torch.Tensor]:
        """The fp32 weights of a checkpoint written by save_state, rebuilt from its ZeRO shards in this one process."""
        from deepspeed.utils.zero_to_fp32 import (
            get_fp32_state_dict_from_zero_checkpoint,
        )

        checkpoint_dir = Path(checkpoint_dir)
        if not (checkpoint_dir / MODEL_TAG).is_dir():
            raise FileNotFoundError(f"{checkpoint_dir} holds no DeepSpeed checkpoint ({MODEL_TAG}/ is missing)")
        with redirect_stdout(io.StringIO()) as chatter:  # zero_to_fp32 prints its progress
            weights = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=MODEL_TAG)
        log.debug("zero_to_fp32: %s", chatter.getvalue().strip())
        # ZeRO-1 records no frozen parameters (e.g. DiT's fixed pos_embed) for zero_to_fp32: take them,
        # and anything else it left out, from the module state DeepSpeed saved beside the shards.
        module_states = sorted((checkpoint_dir / MODEL_TAG).glob("*model_states.pt"))
        if module_states:
            module = torch.load(module_states[0], map_location="cpu", weights_only=False)["module"]
            for name, tensor in module.items():
                if name not in weights and torch.is_tensor(tensor) and tensor.numel() > 0:
                    weights[name] = tensor
        return {name: tensor.float().contiguous() for name, tensor in weights.items()}

    # ------------------------------------------------------------------ checkpoints
    def save_state(self, directory: str) -> None:
        """DeepSpeed's checkpoint (module, fp32 master and optimizer shards), every rank's RNG states, and on rank 0
        `model.safetensors`, the consolidated fp32 weights, where the DDP engine has its weights (a collective)."""
        self.accelerator.save_state(directory)
        if self.ds is not None:
            weights = self.full_state_dict(self.ds)
            if self.is_main:
                from safetensors.torch import save_file

                save_file(weights, str(Path(directory) / MODEL_FILE))

    def load_state(self, directory: str, reshard: str = "universal") -> None:
        """Restore what save_state wrote, on any world size (every rank calls it).

        The same world size: DeepSpeed's shards and the RNG states, exactly. Another world size:
        `reshard="universal"` converts the shards once (rank 0, DeepSpeed's ds_to_universal, into
        `<checkpoint>/pytorch_model_universal/`) and loads weights, fp32 master and AdamW state from
        it; `reshard="weights"` (or a failed conversion) loads the consolidated fp32 weights only, and
        the AdamW moments start from zero. Either way the RNG states are not restored and the caller
        must set the learning rate its schedule reached. A warning says which way was taken.
        """
        assert self.ds is not None, "ZeroEngine.load_state before prepare"
        if reshard not in ("universal", "weights"):
            raise ValueError(f"reshard must be 'universal' or 'weights', got {reshard!r}")
        saved = saved_world_size(directory)
        if saved is None:
            raise UserError(
                f"{directory} holds no DeepSpeed checkpoint ({MODEL_TAG}/ is missing): was it written by the DDP "
                "engine?"
            )
        if saved == self.world_size:
            # No map_location: accelerate passes load kwargs on to DeepSpeed's load_checkpoint, which takes none.
            self.accelerator.load_state(directory)
            return
        if reshard == "universal" and self._convert_to_universal(Path(directory)):
            log.warning(
                "%s was written by %d ranks, this job has %d: loading it as a universal checkpoint",
                directory,
                saved,
                self.world_size,
            )
            self.ds._config.load_universal_checkpoint = True  # read by load_checkpoint only
            try:
                self.ds.load_checkpoint(directory, tag=UNIVERSAL_TAG, load_module_strict=True)
            finally:
                self.ds._config.load_universal_checkpoint = False
            return
        log.warning(
            "%s was written by %d ranks, this job has %d: continuing from its consolidated fp32 weights; "
            "the optimizer state (AdamW moments) starts afresh",
            directory,
            saved,
            self.world_size,
        )
        self.load_full_state_dict(self.ds, self.consolidated_weights(directory))

    def _convert_to_universal(self, directory: Path) -> bool:
        """`directory/pytorch_model_universal` made from the ZeRO shards (once, by rank 0, while the others wait
        up to rank0_timeout_s outside NCCL); whether it is there on every rank."""
        target = directory / UNIVERSAL_TAG
        ok = True
        with self.rank0_alone("converting the checkpoint to another world size"):
            if self.is_main and not target.is_dir():
                ok = self._run_universal_conversion(directory, target)
        return not self.any(not ok)

    def _run_universal_conversion(self, directory: Path, target: Path) -> bool:
        """DeepSpeed's ds_to_universal, into a temporary folder renamed to `target` when it succeeds."""
        tmp = directory / f"{UNIVERSAL_TAG}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        argv = [
            sys.executable,
            "-m",
            "deepspeed.checkpoint.ds_to_universal",
            "--input_folder",
            str(directory / MODEL_TAG),
            "--output_folder",
            str(tmp),
            "--num_extract_workers",
            "1",
            "--num_merge_workers",
            "1",
            "--inject_missing_state",
        ]
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        if done.returncode == 0:
            os.replace(tmp, target)
            return True
        log.warning(
            "converting %s to a universal checkpoint failed: %s", directory, done.stderr.strip().splitlines()[-1:]
        )
        shutil.rmtree(tmp, ignore_errors=True)
        return False


def _placed(tensor: torch.Tensor, on_host: bool) -> torch.Tensor:
    """A weight as fp32: a host copy to be written, or the device tensor itself (no copy when it already is fp32)."""
    tensor = tensor.detach().float()
    return tensor.cpu().clone() if on_host else tensor
