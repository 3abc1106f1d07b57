"""The training loop of one rank: model, diffusion, data, EMA, checkpoints, tracking.

Exactness: weights are seeded from train.seed, the data order from (seed, epoch), and the global
RNG is reseeded at every step from (seed, step, rank), so the noise, timesteps and label dropout of
step k do not depend on what ran before it. With the checkpoint restoring model, optimizer,
schedule and EMA, a resumed run repeats the uninterrupted one bit for bit (same world size, same
threads).
"""

from __future__ import annotations

import logging
import math
import socket
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from model.diffusion import training_loss
from model.dit import compile_blocks
from model.ema import EMA
from orchestrator.components.device import check_node_devices, record_nccl_collectives, set_determinism, use_tf32
from orchestrator.components.model import build_model, make_diffusion
from orchestrator.components.model_input import classes_to_build, latent_input, pixel_input
from orchestrator.components.weights import load_weights, read_weights
from orchestrator.data.imagefolder import DataError
from orchestrator.data.loader import BatchStream, DataPosition, EpochBatches, build_dataset
from orchestrator.evaluation.evaluator import Evaluator
from orchestrator.jobs.directory import JobDir
from orchestrator.jobs.evaluations import EvaluationRecord, best_checkpoints, ranking_metric, steps_to_keep
from orchestrator.specs.job import JobSpec
from orchestrator.tracking import NullTracker, Tracker
from orchestrator.train.engine import Engine, TrainingDiverged
from orchestrator.train.grids import GridMaker
from orchestrator.train.run_tracking import SystemMetrics, log_trained_model, start_tracker
from orchestrator.train.schedule import lr_factor, step_seed
from orchestrator.train.signals import StopRequest
from orchestrator.train.state import (
    CheckpointError,
    TrainerState,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)
from orchestrator.train.strategy import make_engine
from orchestrator.train.watchdog import HangWatchdog

log = logging.getLogger(__name__)
HYBRID_VLB_WEIGHT = 1e-3  # lambda of L_hybrid (Nichol & Dhariwal 2021, Sec. 3.1)
# Fault injection for the fault suite (tests/faults): the losses of these steps ("5" or "5-9", 0-based) become NaN on
# the rank ORCH_FAULT_RANK (default: every rank), a real NaN through the real backward pass and gradient all-reduce.
FAULT_NONFINITE_STEPS = "ORCH_FAULT_NONFINITE_STEPS"
FAULT_RANK = "ORCH_FAULT_RANK"


def injected_nonfinite_steps(rank: int) -> range:
    """The 0-based steps whose loss the fault suite turns into NaN on this rank (empty unless asked for)."""
    import os

    steps = os.environ.get(FAULT_NONFINITE_STEPS, "")
    if not steps or os.environ.get(FAULT_RANK, str(rank)) != str(rank):
        return range(0)
    first, _, last = steps.partition("-")
    return range(int(first), int(last or first) + 1)


@dataclass(frozen=True)
class Outcome:
    finished: bool
    step: int
    stop_signal: str | None = None


def train(spec: JobSpec, job: JobDir, device: str, tracking_uri: str | None) -> Outcome:
    """Train from the newest checkpoint of the job (or from scratch) until done or asked to stop."""
    stop = StopRequest()
    check_node_devices(spec, device)  # before the first collective: a wrong node fails alone, with its name
    if device == "cuda":
        use_tf32(spec.resources.tf32)
        record_nccl_collectives(job.logs_dir)  # before the process group: its dump names a stuck collective
    set_determinism(spec.resources.deterministic, device)
    engine = make_engine(spec, device)
    log.info(
        "rank %d of %d on %s: node%d in the per-node metrics",
        engine.rank,
        engine.world_size,
        socket.gethostname(),
        engine.rank // spec.resources.processes,
    )
    trainer = None
    try:
        trainer = Trainer(spec, job, engine, stop)
        trainer.tracker = start_tracker(spec, job, engine, tracking_uri, resumed=trainer.resumed_from is not None)
        trainer.tracking_uri = tracking_uri
        try:
            outcome = trainer.run()
        except BaseException:
            trainer.close_system_metrics()
            trainer.tracker.close(status="FAILED", timeout=10)
            raise
        finally:
            if trainer.watchdog is not None:
                trainer.watchdog.close()  # what follows (waiting out a tracking outage) is not a training step
        trainer.close_system_metrics()
        # A finished job waits out a short MLflow outage; a stopping one (preempted: its grace time is short) does not.
        trainer.tracker.close(status="FINISHED" if outcome.finished else "KILLED", outlast_outage=outcome.finished)
        if outcome.finished:  # after the run's end: an upload never holds back its status, nor a slow one its metrics
            log_trained_model(spec, job, trainer.tracker, outcome.step)
        return outcome
    finally:
        if trainer is not None:
            # DataLoader workers are forks holding the process group's sockets: gloo's teardown waits for
            # those sockets to close, so the workers must be gone first (measured: a 2-rank job hung at exit).
            trainer.stream.close()
        engine.close()


def compiled_graphs() -> str:
    """What torch.compile has made so far in this process: graphs and graph breaks (dynamo's counters)."""
    from torch._dynamo.utils import counters

    graphs, breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
    return f"{graphs} graph(s) compiled, {breaks} graph break(s)"


class Trainer:
    """Everything one rank trains with, built from the spec and restored from the newest checkpoint."""

    def __init__(self, spec: JobSpec, job: JobDir, engine: Engine, stop: StopRequest):
        t = spec.train
        self.spec, self.job, self.engine, self.stop = spec, job, engine, stop
        if spec.data.latent:
            from orchestrator.data.shards import open_shards

            shards = open_shards(spec.data.path)
            self.model_input = latent_input(spec, shards.index)
        else:
            dataset = build_dataset(spec.data)
            self.model_input = pixel_input(spec, classes_to_build(spec, len(dataset.classes)))
        self.num_classes = self.model_input.num_classes

        torch.manual_seed(t.seed)
        model = build_model(spec, self.model_input)
        if spec.model.init_from and job.latest_checkpoint() is None:
            load_weights(model, Path(spec.model.init_from))
            log.info("initialised the model from %s", spec.model.init_from)
        self.ema = EMA(
            model, decay=spec.ema.decay, warmup_power=spec.ema.warmup_power, update_every=spec.ema.update_every
        )
        model.activation_checkpointing = spec.resources.activation_checkpointing
        # before DDP/FSDP wrap the model (accelerate's dynamo_backend would not compile under DDP)
        if spec.resources.compile:
            log.info("torch.compile: %d blocks (compiled at the first step)", compile_blocks(model))
        optimizer = engine.make_optimizer(
            model.parameters(), lr=t.learning_rate, betas=t.adam_betas, eps=t.adam_eps, weight_decay=t.weight_decay
        )
        # Not prepared by accelerate: a prepared scheduler steps once per rank (accelerate#2926).
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, spec))
        self.model, self.optimizer = engine.prepare(model, optimizer)
        self.ema.to(engine.device)  # where the model trains: updates and grids never cross to the host
        if spec.model.init_from and job.latest_checkpoint() is None:
            # DeepSpeed's fp32 master copy too
            engine.load_full_state_dict(self.model, read_weights(Path(spec.model.init_from)))
        self.noise_scheduler = make_diffusion(spec)
        self.vlb_weight = HYBRID_VLB_WEIGHT if spec.diffusion.loss == "hybrid" else 0.0

        self.step, position = 0, DataPosition()
        self.resumed_from = job.latest_checkpoint()
        if self.resumed_from is not None:
            self._restore(self.resumed_from)
            position = DataPosition(self.restored.epoch, self.restored.batch_in_epoch)
        pinned = engine.device.type == "cuda"  # page-locked batches: host-to-device copies that overlap the step
        if spec.data.latent:
            from orchestrator.data.shards import ShardStream

            self.stream = ShardStream(
                shards,
                micro_batch=spec.micro_batch_size,
                rank=engine.rank,
                world_size=engine.world_size,
                seed=t.seed,
                num_workers=spec.data.num_workers,
                shuffle_buffer=spec.data.shuffle_buffer,
                start=position,
                pin_memory=pinned,
                skip_bad=spec.data.on_bad_sample == "skip",
            )
        else:
            batches = EpochBatches(
                len(dataset), spec.micro_batch_size, engine.rank, engine.world_size, t.seed, spec.data.hflip, position
            )
            self.stream = BatchStream(dataset, batches, spec.data.num_workers, t.seed, pin_memory=pinned)
        self.grid = GridMaker(spec, self.model_input, engine.device) if engine.is_main else None
        self.evaluator = Evaluator(spec, self.model_input, engine) if spec.eval.every else None
        self.tracker: Tracker = NullTracker()
        self.tracking_uri: str | None = None
        self.system_metrics: SystemMetrics | None = None
        self.nonfinite_steps = injected_nonfinite_steps(engine.rank)
        self.bad_samples = 0  # unreadable samples this rank replaced in this run (data.on_bad_sample skip)
        self.checkpoint_failures = 0  # checkpoints not written in this run (checkpoint.on_write_error continue)
        hang_timeout = spec.resources.hang_timeout_s
        self.watchdog = HangWatchdog(hang_timeout, self._record_hang) if hang_timeout else None

    def _restore(self, checkpoint: Path) -> None:
        state, ema_weights = load_checkpoint(self.engine, checkpoint)
        self.ema.load_state_dict({"weights": ema_weights, "num_updates": state.ema_num_updates})
        self.scheduler.load_state_dict(state.lr_scheduler)
        for group, lr in zip(self.scheduler.optimizer.param_groups, self.scheduler.get_last_lr()):
            group["lr"] = lr  # the restored schedule's rate, also where an engine restored only the weights
        self.step, self.restored = state.step, state
        if state.world_size != self.engine.world_size:
            log.warning(
                "resuming a %d-rank checkpoint on %d ranks: training continues, but not bitwise as before",
                state.world_size,
                self.engine.world_size,
            )
        if state.spec_digest != self.spec.digest():
            log.warning("the spec changed since %s (resume was allowed to change it)", checkpoint.name)
        log.info(
            "resumed from %s (step %d, epoch %d, batch %d)",
            checkpoint.name,
            state.step,
            state.epoch,
            state.batch_in_epoch,
        )

    def run(self) -> Outcome:
        """Optimizer steps up to train.steps, with metrics, grids and checkpoints on the way."""
        spec, t, engine, model = self.spec, self.spec.train, self.engine, self.model
        loss_sum = torch.zeros((), device=engine.device)
        window_start, window_steps, paused, data_wait, skipped_steps = time.perf_counter(), 0, 0.0, 0.0, 0
        skipped_since = None  # the first of the steps skipped in a row (non-finite gradients), if the last one was
        if engine.is_main:
            self.job.update(step=self.step, total_steps=t.steps)
        log.info(
            "training steps %d..%d: micro batch %d x %d rank(s) x %d accumulation",
            self.step,
            t.steps,
            spec.micro_batch_size,
            engine.world_size,
            t.grad_accum_steps,
        )
        report_compiled = spec.resources.compile
        start_step = self.step
        if (
            self.resumed_from is not None
            and self.step % spec.sample.every == 0
            and engine.any(engine.is_main and not self._grid_file("samples").exists())
        ):
            # the stop came between the checkpoint and its grid: draw the grid now
            self._draw_grids(final=self.step == t.steps)

        while self.step < t.steps:
            torch.manual_seed(step_seed(t.seed, self.step, engine.rank))
            model.train()
            for micro in range(t.grad_accum_steps):
                asked = time.perf_counter()
                inputs, condition = self._next_batch()  # (B, C, H, W) pixels or latents; labels (B,) or a text dict
                data_wait += time.perf_counter() - asked
                last = micro == t.grad_accum_steps - 1
                with nullcontext() if last else engine.no_sync(model):
                    with engine.autocast():
                        loss = training_loss(
                            model,
                            inputs,
                            condition,
                            self.noise_scheduler,
                            vlb_weight=self.vlb_weight,
                            snr_gamma=spec.diffusion.min_snr_gamma,
                        )
                    if self.step in self.nonfinite_steps:
                        loss = loss * float("nan")  # the fault suite's injected NaN
                    engine.backward(loss / t.grad_accum_steps)
                loss_sum += loss.detach().float() / t.grad_accum_steps
            grad_norm = engine.step(model, self.optimizer, t.grad_clip)
            self.step += 1
            if self.watchdog is not None:
                self.watchdog.progress(self.step)
            # Non-finite gradients (the same on every rank: they are all-reduced before their norm) were not applied.
            if engine.last_step_skipped:
                skipped_steps += 1
                skipped_since = self.step - 1 if skipped_since is None else skipped_since
                log.warning("step %d: gradients not finite (grad norm %s): update skipped", self.step - 1, grad_norm)
                if self.step - skipped_since >= t.max_nonfinite_steps:
                    raise TrainingDiverged(
                        f"loss not finite since step {skipped_since} ({self.step - skipped_since} updates in a row "
                        f"skipped, train.max_nonfinite_steps {t.max_nonfinite_steps}); the last checkpoint holds the "
                        "weights before it: lower the learning rate or check the data, then `orch resume`"
                    )
            else:  # the schedule and the EMA follow the updates that happened
                skipped_since = None
                self.scheduler.step()
                # under ZeRO and FSDP the full weights are gathered for it
                engine.update_ema(self.ema, model, self.step)
            window_steps += 1
            if window_steps == 1 and self.step == start_step + 1:
                self._start_system_metrics()  # after a collective: rank 0 has opened the run
            if report_compiled:  # the first step compiled the blocks
                log.info("torch.compile: %s in %.1f s", compiled_graphs(), time.perf_counter() - window_start)
                report_compiled = False

            # a signal is acted on by every rank at the same step
            stopping = engine.any_since_last_step(self.stop.requested)
            done = self.step == t.steps
            if self.step % spec.tracking.log_every == 0 or done or stopping:
                step_time = (time.perf_counter() - window_start - paused) / window_steps
                self._log(
                    engine.mean(loss_sum / window_steps).item(),
                    float(grad_norm),
                    step_time,
                    data_wait / window_steps,
                    skipped_steps,
                )
                loss_sum.zero_()
                window_start, window_steps, paused, data_wait, skipped_steps = time.perf_counter(), 0, 0.0, 0.0, 0

            began = time.perf_counter()
            unwatched = self.watchdog.paused if self.watchdog is not None else lambda what: nullcontext()
            evaluating = self.evaluator is not None and (self.step % spec.eval.every == 0 or done) and not stopping
            # keep_best keeps checkpoints by their evaluation: every evaluated step has one
            checkpointing = (
                self.step % spec.checkpoint.every == 0
                or done
                or stopping
                or (evaluating and spec.checkpoint.keep_best is not None)
            )
            sampling = (self.step % spec.sample.every == 0 or done) and not stopping
            with unwatched("checkpoint, grid and evaluation"):  # progress of their own, with their own timeouts
                if checkpointing:
                    self._checkpoint(required=done or stopping)
                if sampling:  # after the checkpoint: a grid that fails or runs long never costs it
                    self._draw_grids(final=done)
                if evaluating:
                    self._evaluate()
            paused += time.perf_counter() - began
            if (checkpointing or sampling) and engine.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(engine.device)  # peak_memory_gb: the training steps', not the grid's
            if stopping:
                return Outcome(
                    finished=False, step=self.step, stop_signal=self.stop.signal_name or "a signal on another rank"
                )
        return Outcome(finished=True, step=self.step)

    def _start_system_metrics(self) -> None:
        """Each node's first rank samples its machine into the job's run (under system/node<k>/)."""
        processes = self.spec.resources.processes
        if self.engine.rank % processes:
            return
        run_id = self.tracker.run_id if self.engine.is_main else self.job.read().mlflow_run_id
        node = self.engine.rank // processes
        self.system_metrics = SystemMetrics.start(
            self.spec, self.tracking_uri, run_id, node, resumed=self.resumed_from is not None
        )

    def close_system_metrics(self) -> None:
        if self.system_metrics is not None:
            self.system_metrics.close()
            self.system_metrics = None

    def _record_hang(self, message: str) -> None:
        """What the watchdog records before it ends this rank (rank 0 keeps the job's state)."""
        if self.engine.is_main:
            self.job.update(stop_reason=f"error: {message}")

    def _next_batch(self) -> tuple[torch.Tensor, torch.Tensor | dict[str, torch.Tensor]]:
        """The next micro batch on the device: the network's inputs and the condition its `y` takes."""
        device = self.engine.device
        batch = next(self.stream)  # in pinned memory on CUDA: the copies below do not block the host
        if self.stream.replaced:
            self._count_bad_samples()
        if isinstance(batch, tuple):  # pixels: (images, labels)
            images, labels = batch
            return images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        batch = batch.to(device, non_blocking=True)  # a LatentBatch
        condition = batch.condition(self.spec.model.condition)
        return batch.latents, batch.labels if condition is None else condition

    def _count_bad_samples(self) -> None:
        """Warn of the unreadable samples the stream replaced, and fail past data.max_bad_samples in this run."""
        for reason in self.stream.replaced:
            log.warning("step %d: an unreadable sample was replaced in its batch: %s", self.step, reason)
        self.bad_samples += len(self.stream.replaced)
        last = self.stream.replaced[-1]
        self.stream.replaced.clear()
        limit = self.spec.data.max_bad_samples
        if self.bad_samples > limit:
            raise DataError(
                f"{self.bad_samples} unreadable samples on rank {self.engine.rank} in this run, more than "
                f"data.max_bad_samples {limit} (the last: {last}); repair the data (or raise the limit), then "
                "`orch resume`"
            )

    def _draw_grids(self, final: bool) -> None:
        """The sample grid (and the x0 progression strip with every grid when sample.progression asks, else at the
        end) from the EMA, drawn by rank 0 in the training precision while the other ranks wait outside NCCL; saved
        under samples/ in the job directory and logged to MLflow. A grid that fails (say, out of memory) is logged
        with its traceback and skipped: it never stops training."""
        with self.engine.rank0_alone(f"the sample grid of step {self.step}"):
            if self.engine.is_main:
                began = time.perf_counter()
                try:
                    with self.engine.autocast():
                        grids = self.grid.draw(self.ema.module, final=final)  # samples (and progression)
                except Exception:
                    log.exception("drawing the sample grid of step %d failed; training goes on without it", self.step)
                    return
                for key, image in grids.items():
                    self._grid_file(key).parent.mkdir(exist_ok=True)
                    image.save(self._grid_file(key))
                    self.tracker.log_image(image, key=key, step=self.step)
                log.info("sample grid of step %d drawn in %.1f s", self.step, time.perf_counter() - began)

    def _evaluate(self) -> None:
        """The `eval` metrics of the EMA weights at this step (every rank draws its share of the samples): logged to
        MLflow at the step and written to eval/step-N.json in the job directory by rank 0. A failed evaluation is
        recorded as such (eval/failed 1 in MLflow, its reason in the file) and training goes on."""
        result = self.evaluator.run(self.ema.module, self.step)
        if result is None:  # not rank 0
            return
        e = self.spec.eval
        settings = self.evaluator.settings
        record = EvaluationRecord(
            step=self.step,
            source="in-loop",
            metrics=result.metrics,
            num_samples=self.evaluator.num_samples,
            sampler=settings.sampler,
            sampler_steps=settings.steps,
            guidance_scale=settings.guidance_scale,
            seed=e.seed,
            error=result.error,
        )
        record.write(self.job.path)
        if result.error is not None:
            log.error("evaluation of step %d failed (%s); training goes on", self.step, result.error)
            self.tracker.log_metrics({"eval/failed": 1.0, "eval/seconds": result.seconds}, step=self.step)
            return
        self.tracker.log_metrics(result.metrics, step=self.step)
        log.info("evaluation of step %d: %s", self.step, ", ".join(f"{k} {v:.4g}" for k, v in result.metrics.items()))
        metric = ranking_metric(self.spec)
        if metric is not None:
            best = best_checkpoints(self.job.path, metric, 1)
            if best:
                self.job.update(best_step=best[0].step, best_metric=metric, best_value=best[0].value)
                self.tracker.set_tags({"orch.best_checkpoint": str(best[0].path), f"orch.best_{metric}": best[0].value})
        if self.spec.checkpoint.keep_best is not None:  # a checkpoint that is no longer among the best goes now
            keep_steps = frozenset(steps_to_keep(self.job.path, self.spec))
            prune_checkpoints(self.job.checkpoints_dir, self.spec.checkpoint.keep, keep_steps)

    def _grid_file(self, key: str) -> Path:
        """Where the grid `key` (samples, progression) of the current step is saved in the job directory."""
        return self.job.path / "samples" / f"{key}-{self.step:07d}.png"

    def _log(self, loss: float, grad_norm: float, step_time: float, data_wait: float, skipped_steps: int = 0) -> None:
        """Metrics of the last window of steps, logged by rank 0; every rank calls it (a collective).

        Each node's ranks report their peak memory and the seconds per step they waited for batches:
        in synchronous training every node steps at the pace of the slowest, and its data wait or
        memory is what tells the straggler (a slow filesystem, a rank near its memory limit) apart.
        """
        if self.system_metrics is not None:  # MLflow's monitor ends for good in a server outage: start another
            self.system_metrics.revive()
        # (world size, 2), rank-major
        per_rank = self.engine.gather_floats([self._peak_memory_bytes() / 1e9, data_wait, float(self.bad_samples)])
        per_node = [
            per_rank[n : n + self.spec.resources.processes]
            for n in range(0, len(per_rank), self.spec.resources.processes)
        ]
        metrics = {
            "loss": loss,
            "lr": self.scheduler.get_last_lr()[0],
            "grad_norm": grad_norm,
            "step_time_s": step_time,
            "samples_per_sec": self.spec.train.global_batch_size / step_time,
            "samples_per_sec_per_node": self.spec.train.global_batch_size / step_time / self.spec.resources.nodes,
            "epoch": float(self.stream.position.epoch),
            "peak_memory_gb": max(memory for memory, _, _ in per_rank),
            "data_wait_s": max(wait for _, wait, _ in per_rank),
            "bad_samples": sum(bad for _, _, bad in per_rank),  # unreadable samples replaced in this run, all ranks
        }
        metrics["skipped_steps"] = float(skipped_steps)  # updates skipped in this window: non-finite gradients
        for node, ranks in enumerate(per_node):  # torchrun, DeepSpeed's runner and Slurm number ranks node by node
            metrics[f"node{node}/peak_memory_gb"] = max(memory for memory, _, _ in ranks)
            metrics[f"node{node}/data_wait_s"] = max(wait for _, wait, _ in ranks)
        if self.engine.is_main:
            self.tracker.log_metrics(metrics, self.step)
            self.job.update(
                step=self.step,
                loss=loss,
                samples_per_sec=metrics["samples_per_sec"],
                bad_samples=int(metrics["bad_samples"]),
            )
            self.job.append_loss(self.step, loss)
            log.info(
                "step %d: loss %.4f, %.1f samples/s, %.4f s/step, peak memory %.2f GB, data wait %.4f s/step",
                self.step,
                loss,
                metrics["samples_per_sec"],
                step_time,
                metrics["peak_memory_gb"],
                metrics["data_wait_s"],
            )

    def _peak_memory_bytes(self) -> float:
        """This rank's peak memory: CUDA allocations on a GPU, else the process's peak resident set."""
        if self.engine.device.type == "cuda":
            return float(torch.cuda.max_memory_allocated(self.engine.device))
        import resource

        return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB

    def _checkpoint(self, required: bool) -> None:
        """Write the checkpoint of this step. One that cannot be written stops the job, unless it is not `required`
        (neither the last step's nor a stopping job's) and checkpoint.on_write_error says to continue without it."""
        try:
            self._write_checkpoint()
        except CheckpointError as err:
            if required or self.spec.checkpoint.on_write_error == "stop":
                raise
            self.checkpoint_failures += 1
            log.warning("%s; training goes on (checkpoint.on_write_error: continue)", err)
            if self.engine.is_main:
                self.job.update(checkpoint_failures=self.checkpoint_failures, checkpoint_error=str(err))
                self.tracker.log_metrics({"checkpoint_failures": float(self.checkpoint_failures)}, step=self.step)

    def _write_checkpoint(self) -> None:
        ema_checksum = sum(float(p.double().sum()) for p in self.ema.module.parameters())
        local_checksum = sum(float(p.detach().double().sum()) for p in self.model.parameters())  # this rank's shard
        if self.engine.any(not (math.isfinite(ema_checksum) and math.isfinite(local_checksum))):
            raise TrainingDiverged(
                f"the weights are not finite at step {self.step}: no checkpoint written (the previous one is intact); "
                "lower the learning rate or check the data, then `orch resume`"
            )
        assert self.engine.same_on_all_ranks(ema_checksum), f"EMA weights differ across ranks at step {self.step}"
        position = self.stream.position
        state = TrainerState(
            step=self.step,
            epoch=position.epoch,
            batch_in_epoch=position.batch,
            ema_num_updates=self.ema.num_updates,
            world_size=self.engine.world_size,
            spec_digest=self.spec.digest(),
            lr_scheduler=self.scheduler.state_dict(),
        )
        path = save_checkpoint(
            self.engine,
            self.job.checkpoints_dir,
            state,
            self.ema.module.state_dict(),
            self.spec.to_yaml(),
            self.spec.checkpoint.keep,
            model_input=self.model_input,
            keep_steps=frozenset(steps_to_keep(self.job.path, self.spec)) if self.engine.is_main else frozenset(),
        )
        if self.engine.is_main:
            self.job.update(checkpoint=str(path), checkpoint_step=self.step)
            self.tracker.set_tags({"orch.checkpoint": str(path)})  # the run page links to the job's files
            log.info("checkpoint %s", path.name)
