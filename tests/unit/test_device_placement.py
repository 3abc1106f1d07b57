"""Every tensor a rank holds or makes lives on the engine's device, and the loop's order keeps a checkpoint safe.

The machines that test orch have no GPU, where every tensor shares the CPU and a tensor left behind
goes unseen. `meta` stands in for CUDA here: a second device, on which a CPU tensor meeting a
device tensor raises as it would on a GPU (an EMA left on the CPU crashed the first grid of every
GPU job this way).
"""

from __future__ import annotations

import os
import types
from pathlib import Path

import pytest
import torch
import yaml

from model.diffusion import diffusion_loss
from model.ema import EMA
from orchestrator.jobs.directory import JobDir
from orchestrator.specs.job import spec_from_dict
from orchestrator.train.ddp import DdpEngine
from orchestrator.train.loop import Trainer
from tests.helpers import tiny_spec

META = torch.device("meta")


class MetaEngine(DdpEngine):
    """The DDP engine of one process with `meta` standing in for a GPU."""

    @property
    def device(self) -> torch.device:
        return META

    def prepare(self, model, optimizer):
        names = {id(param): name for name, param in model.named_parameters()}
        model = model.to(META)  # as accelerate's prepare moves the model to cuda:k
        moved = dict(model.named_parameters())
        for group in optimizer.param_groups:
            group["params"] = [moved[names[id(param)]] for param in group["params"]]
        return model, optimizer


class SkipSecondStepEngine(DdpEngine):
    """The DDP engine whose grad scaler (fp16, which the CPU lacks) 'finds' inf gradients at the second step."""

    def step(self, model, optimizer, max_norm):
        self.steps_taken = getattr(self, "steps_taken", 0) + 1
        if self.steps_taken == 2:
            optimizer.zero_grad(set_to_none=True)
            self.last_step_skipped = True
            return torch.tensor(float("inf"))
        return super().step(model, optimizer, max_norm)


def make_trainer(tmp_path: Path, engine_class, **sections) -> Trainer:
    spec = spec_from_dict(yaml.safe_load(tiny_spec(tmp_path, **sections).read_text()))
    job = JobDir.create(tmp_path / "runs", "job-1", spec.name, spec.to_yaml(), spec.train.steps)
    never_stop = types.SimpleNamespace(requested=False, signal_name=None)  # no signal handlers inside pytest
    return Trainer(spec, job, engine_class("cpu", "no", 1), never_stop)


def tensors_of(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(module.named_parameters()), **dict(module.named_buffers())}


def test_every_tensor_the_trainer_holds_or_makes_lives_on_the_engine_device(tmp_path, one_thread):
    trainer = make_trainer(tmp_path, MetaEngine)
    off_device = {name: t.device for name, t in tensors_of(trainer.model).items() if t.device != META}
    assert not off_device, f"model tensors off the engine's device: {off_device}"
    off_device = {name: t.device for name, t in tensors_of(trainer.ema.module).items() if t.device != META}
    assert not off_device, f"EMA tensors off the engine's device (the grid then mixes devices): {off_device}"
    assert (
        trainer.grid.noise.device == META
        and trainer.grid.labels.device == META
        and trainer.grid.conditions.device == META
    )

    images, labels = trainer._next_batch()
    assert images.device == META and labels.device == META
    loss = diffusion_loss(trainer.model, images, labels, trainer.noise_scheduler)
    assert loss.device == META
    loss.backward()
    trainer.engine.step(trainer.model, trainer.optimizer, 1.0)
    trainer.engine.update_ema(trainer.ema, trainer.model, step=1)
    assert trainer.ema.num_updates == 1 and all(t.device == META for t in tensors_of(trainer.ema.module).values())

    # What the grid feeds the EMA network at every sampler step: its fixed noise, a timestep and its rows' labels.
    timesteps = torch.full((len(trainer.grid.labels),), 3, device=trainer.grid.noise.device)
    with torch.no_grad():
        out = trainer.ema.module.eval()(trainer.grid.noise, timesteps, trainer.grid.conditions)
    assert out.device == META


def test_ema_updates_on_the_device_it_lives_on_and_copies_nothing_to_the_host():
    model = torch.nn.Linear(3, 2)
    ema = EMA(model, decay=0.5, warmup_power=0).to(META)
    device_weights = {name: p.detach().to(META) for name, p in model.named_parameters()}
    ema.update_from(device_weights, {}, step=1)  # gathered full weights under ZeRO or FSDP, left on the device
    assert all(p.device == META for p in ema.module.parameters())


def test_zero_keeps_gathered_weights_on_the_device_for_the_ema_and_copies_them_to_the_host_to_write():
    pytest.importorskip("deepspeed")
    from orchestrator.train.zero import _placed

    on_device = torch.ones(2, device=META, dtype=torch.bfloat16)
    kept = _placed(on_device, on_host=False)
    assert kept.device == META and kept.dtype == torch.float32
    assert _placed(torch.ones(2, dtype=torch.bfloat16), on_host=True).device.type == "cpu"


def test_a_failing_grid_costs_neither_the_checkpoint_nor_the_run(tmp_path, one_thread, caplog):
    trainer = make_trainer(tmp_path, DdpEngine, train={"steps": 4}, checkpoint={"every": 2}, sample={"every": 2})
    drawn = []

    def draw(ema_model, final=False):
        drawn.append(trainer.step)
        if trainer.step == 2:
            raise torch.OutOfMemoryError("CUDA out of memory (a stand-in)")
        return original_draw(ema_model, final)

    original_draw, trainer.grid.draw = trainer.grid.draw, draw
    outcome = trainer.run()
    assert outcome.finished and outcome.step == 4
    assert drawn == [2, 4]
    checkpoints = sorted(p.name for p in trainer.job.checkpoints_dir.glob("step-*"))
    assert checkpoints == ["step-0000002", "step-0000004"], (
        "the checkpoint of the step whose grid failed was not written"
    )
    assert "drawing the sample grid of step 2 failed" in caplog.text
    saved = sorted(p.name for p in (trainer.job.path / "samples").iterdir())
    assert saved == ["progression-0000004.png", "samples-0000004.png"]


def test_an_update_the_grad_scaler_skipped_advances_neither_the_lr_schedule_nor_the_ema(tmp_path, one_thread):
    trainer = make_trainer(
        tmp_path, SkipSecondStepEngine, train={"steps": 3}, checkpoint={"every": 100}, sample={"every": 100}
    )
    trainer._draw_grids = lambda final: None  # no grids: not what this test is about
    assert trainer.run().finished
    assert trainer.step == 3, "the skipped step still counts as a step (its batch was consumed)"
    assert trainer.scheduler.last_epoch == 2 and trainer.ema.num_updates == 2


def test_a_node_with_fewer_gpus_than_ranks_or_without_bf16_is_named_before_any_collective(tmp_path, monkeypatch):
    import socket

    from orchestrator.components.device import check_node_devices
    from orchestrator.errors import UserError

    spec = spec_from_dict(yaml.safe_load(tiny_spec(tmp_path, train={"mixed_precision": "bf16"}).read_text()))
    host = socket.gethostname()
    with pytest.raises(UserError, match=f"node {host} has no usable CUDA GPU"):
        check_node_devices(spec, "cuda")  # this test machine has none
    check_node_devices(spec, "cpu")  # nothing to check on the CPU

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: "Tesla V100-SXM2-32GB")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # what torchrun tells each rank
    with pytest.raises(UserError, match=f"node {host} shows 2 GPU\\(s\\) but the job runs 4 rank\\(s\\) per node"):
        check_node_devices(spec, "cuda")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(UserError, match="Tesla V100-SXM2-32GB\\) has no bf16"):
        check_node_devices(spec, "cuda")


def test_deterministic_turns_on_deterministic_kernels_and_off_cudnn_autotuning(monkeypatch):
    from orchestrator.components.device import set_determinism

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        set_determinism(True, "cuda")
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        # cuBLAS reads it when it starts, before the first matmul
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        set_determinism(False, "cuda")
        assert not torch.backends.cudnn.deterministic and torch.backends.cudnn.benchmark  # the fast default on a GPU
    finally:
        torch.use_deterministic_algorithms(False)
        set_determinism(False, "cpu")


def test_the_nccl_flight_recorder_writes_into_the_job_logs_and_keeps_a_users_own_settings(tmp_path, monkeypatch):
    from orchestrator.components.device import nccl_flight_recorder_env, record_nccl_collectives

    for name in nccl_flight_recorder_env(tmp_path):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TORCH_NCCL_TRACE_BUFFER_SIZE", "50")  # the user's own
    record_nccl_collectives(tmp_path / "logs")
    assert os.environ["TORCH_NCCL_TRACE_BUFFER_SIZE"] == "50"
    assert os.environ["TORCH_NCCL_DUMP_ON_TIMEOUT"] == "1"
    assert os.environ["TORCH_NCCL_DEBUG_INFO_TEMP_FILE"] == str(tmp_path / "logs" / "nccl_trace_rank_")
    assert (tmp_path / "logs").is_dir()
