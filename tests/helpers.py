"""What the end-to-end tests share: a tiny job spec and a way to run the real `orch` command."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

ORCH = str(Path(sys.executable).with_name("orch"))


def tiny_spec(tmp_path: Path, name: str = "tiny", **sections) -> Path:
    """A DiT of a few thousand parameters on the digits: real code paths, seconds per run."""
    spec = {
        "version": 1,
        "name": name,
        "model": {"patch_size": 4, "hidden_size": 32, "depth": 2, "num_heads": 2},
        "diffusion": {"num_train_timesteps": 100, "beta_schedule": "squaredcos_cap_v2"},
        "data": {"source": "digits", "resolution": 8},
        "train": {
            "steps": 6,
            "global_batch_size": 32,
            "learning_rate": 1e-3,
            "warmup_steps": 2,
            "lr_schedule": "cosine",
            "seed": 7,
        },
        "ema": {"decay": 0.99, "warmup_power": 0.75},
        "checkpoint": {"every": 3, "keep": 2},
        "sample": {"every": 3, "sampler": "ddim", "steps": 5, "per_class": 2, "classes": [0, 1, 2]},
        "tracking": {"enabled": False, "log_every": 1},
        "resources": {"processes": 1, "threads_per_process": 1},
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            spec[section] = {**spec.get(section, {}), **values}
        else:
            spec[section] = values
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def orch(
    *args: str, root: Path, timeout: float = 300, check: bool = False, env: dict | None = None
) -> subprocess.CompletedProcess:
    """Run the installed `orch` command against a job root."""
    result = subprocess.run(
        [ORCH, "--root", str(root), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
    if check and result.returncode != 0:
        raise AssertionError(f"orch {' '.join(args)} exited {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


def start_orch(*args: str, root: Path, env: dict | None = None) -> subprocess.Popen:
    """Start `orch` in the background (as a user's terminal would run it in the foreground)."""
    return subprocess.Popen(
        [ORCH, "--root", str(root), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
        start_new_session=True,
    )


def only_job(root: Path) -> Path:
    jobs = [p for p in root.iterdir() if (p / "state.json").exists()]
    assert len(jobs) == 1, jobs
    return jobs[0]


def job_appeared(root: Path) -> Path | None:
    """The job directory once `orch submit` has created it, else None."""
    jobs = [p for p in root.iterdir() if (p / "state.json").exists()] if root.exists() else []
    return jobs[0] if jobs else None


def state(job_dir: Path) -> dict:
    return json.loads((job_dir / "state.json").read_text())


def wait_for(predicate, timeout: float = 120, interval: float = 0.05, what: str = "condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


def kill_job_processes(job_dir: Path) -> None:
    """SIGKILL everything of a running job (supervisor and launched processes), as a dying node would."""
    record = state(job_dir)
    # the supervisor first: killed second, it could see its launcher die and record that, as no dead node does
    for pgid in (record["supervisor_pid"], record["launcher_pid"]):
        if pgid:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def final_weights(job: Path, checkpoint: str | None = None) -> tuple[dict, dict]:
    """The model and EMA weights of a job's newest checkpoint (or of the one named, e.g. step-0000014)."""
    from safetensors.torch import load_file

    chosen = job / "checkpoints" / (checkpoint or (job / "checkpoints" / "latest").read_text().strip())
    return load_file(chosen / "model.safetensors"), load_file(chosen / "ema.safetensors")


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [key for key in a if not a[key].equal(b[key])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def kill_after_checkpoint_then_resume(
    tmp_path: Path, spec: Path, overrides: list[str], kill_at: int, total: int, before_resume=None, exact: bool = True
):
    """Run `spec` uninterrupted (into tmp_path/reference), and again SIGKILLed after its checkpoint at `kill_at` and
    resumed from it to `total` (calling `before_resume(job)` first, if given); unless exact=False, assert both end
    with bitwise-equal model and EMA weights; return the resumed job and `orch resume`'s result.

    The two runs share nothing but the spec, so the uninterrupted one runs while the other is killed and resumed: a
    second job on the machine only slows the one to be killed, which widens the window to kill it in."""
    reference_root = tmp_path / "reference"
    uninterrupted = start_orch("submit", str(spec), *overrides, root=reference_root)
    try:
        job, resumed = _kill_and_resume(tmp_path / "killed", spec, overrides, kill_at, total, before_resume)
        _, err = uninterrupted.communicate(timeout=300)
    finally:
        if uninterrupted.poll() is None:
            os.killpg(uninterrupted.pid, signal.SIGKILL)
            uninterrupted.communicate()
    assert uninterrupted.returncode == 0, err + log_text(only_job(reference_root))
    if not exact:
        return job, resumed
    reference_model, reference_ema = final_weights(only_job(reference_root))
    model, ema = final_weights(job)
    assert_bitwise_equal(model, reference_model)
    assert_bitwise_equal(ema, reference_ema)
    return job, resumed


def _kill_and_resume(root: Path, spec: Path, overrides: list[str], kill_at: int, total: int, before_resume):
    """The killed half of kill_after_checkpoint_then_resume: the job and `orch resume`'s result."""
    assert orch("submit", str(spec), *overrides, "--detach", root=root).returncode == 0
    job = only_job(root)
    wait_for(
        lambda: state(job).get("checkpoint_step") == kill_at, timeout=300, what=f"the checkpoint at step {kill_at}"
    )
    kill_job_processes(job)
    wait_for(
        lambda: orch("status", job.name, "--json", root=root).stdout.count('"failed"'),
        timeout=30,
        what="the job to show as failed",
    )
    assert state(job)["step"] < total, "the job finished before it could be killed; the test proves nothing"
    assert "vanished" in state(job)["message"]
    if before_resume is not None:
        before_resume(job)

    resumed = orch("resume", job.name, root=root)
    assert resumed.returncode == 0, resumed.stderr + log_text(job)
    assert f"resuming from step-{kill_at:07d}" in resumed.stdout, resumed.stdout
    return job, resumed


def service_unavailable(reason: str, require_variable: str) -> None:
    """Skip the test that needs a local service (Slurm, sshd) with the reason, or fail it where the
    environment says the service must be there (a silent skip in CI would hide a broken set-up)."""
    import pytest

    print(reason)
    if os.environ.get(require_variable) == "1":
        pytest.fail(reason)
    pytest.skip(reason)


def log_text(job_dir: Path) -> str:
    log = job_dir / "logs" / "job.log"
    return log.read_text() if log.exists() else "(no log)"


HEAVY_MODULES = ("torch", "mlflow", "deepspeed", "diffusers", "accelerate", "pydantic", "optuna")


def heavy_modules_loaded(args: list[str]) -> list[str]:
    """Heavy modules the CLI loads when it runs `args` (in a fresh interpreter)."""
    code = (
        "import sys\nfrom orchestrator.cli import cli\n"
        f"try:\n    cli({args!r}, prog_name='orch')\nexcept SystemExit:\n    pass\n"
        f"print('HEAVY:' + ','.join(m for m in {HEAVY_MODULES!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    line = next(line for line in out.splitlines() if line.startswith("HEAVY:"))
    return [m for m in line.removeprefix("HEAVY:").split(",") if m]


def sbatch_from(**values):
    """launch.slurm.sbatch_job with its values given flat, each routed to its group (SlurmAllocation, NodeStep)."""
    from dataclasses import fields

    from launch.slurm import NodeStep, SlurmAllocation, sbatch_job

    allocation = {f.name: values.pop(f.name) for f in fields(SlurmAllocation) if f.name in values}
    step = {f.name: values.pop(f.name) for f in fields(NodeStep) if f.name in values}
    return sbatch_job(**values, allocation=SlurmAllocation(**allocation), step=NodeStep(**step))


DINOV2_HIDDEN = 32  # the width of the tiny DINOv2 write_feature_weights writes


def write_feature_weights(folder: Path) -> Path:
    """A weights directory with both feature networks under the names orch looks for, as tests cannot download the
    real ones: torch-fidelity's Inception-v3 with random weights (~95 MB) and a tiny DINOv2 saved as Hugging Face's
    save_pretrained writes facebook/dinov2-large. Real architectures, meaningless numbers."""
    from unittest import mock

    import torch
    from torch import nn
    from transformers import Dinov2Config, Dinov2Model

    from orchestrator.evaluation.features import inception_extractor_class
    from orchestrator.evaluation.weights import weights_path

    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    extractor_class = inception_extractor_class()
    empty = folder / "empty.pth"
    torch.save({}, empty)
    with mock.patch.object(extractor_class, "load_state_dict", lambda self, state_dict: None):
        inception = extractor_class("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty))
    empty.unlink()
    for module in inception.modules():
        if isinstance(module, nn.Conv2d):  # PyTorch's default initialisation fades the features to ~1e-8
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu", generator=generator)
    torch.save(inception.state_dict(), weights_path("inception", folder))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        config = Dinov2Config(
            hidden_size=DINOV2_HIDDEN,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            patch_size=14,
            image_size=224,
        )
        Dinov2Model(config).save_pretrained(weights_path("dinov2", folder))
    return folder


def write_tiny_vae(folder: Path, resolution: int = 16) -> Path:
    """A randomly initialised diffusers AutoencoderKL that halves once (16-px images -> 4 x 8 x 8 latents), saved with
    save_pretrained: the real VAE code path in a fraction of a second."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=resolution,
    ).save_pretrained(folder)
    return folder
