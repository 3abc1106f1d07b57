"""What the GPU bench scripts share: the real `orch` commands, a synthetic latent dataset made by `orch prepare`,
and small readers of a job directory. Imported as `gpu_jobs` from bench/ (as `machine` is)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
LATENT_SIDE = (
    32  # 64 px images through a VAE that halves once: 4 x 32 x 32 latents, the DiT paper's 256 px latent shape
)
CLASSES = 10


def environment() -> dict[str, str]:
    """The environment every command runs with: this checkout importable (no install needed), hubs offline."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def orch(*args: str, root: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    """Run `orch ARGS` (as `python -m orchestrator.cli`, which needs no installed script) against a job root."""
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "--root", str(root), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=environment(),
    )


def write_spec(path: Path, spec: dict) -> Path:
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def the_job(root: Path) -> Path | None:
    jobs = [p for p in root.iterdir() if (p / "state.json").exists()] if root.is_dir() else []
    return jobs[0] if jobs else None


def job_state(job: Path) -> dict:
    return json.loads((job / "state.json").read_text())


def job_log(job: Path) -> str:
    log = job / "logs" / "job.log"
    return log.read_text(errors="replace") if log.exists() else "(no log)"


def kill_job(job: Path) -> None:
    """SIGKILL the job's supervisor and launched processes, as a dying node would."""
    record = job_state(job)
    for pgid in (record.get("launcher_pid"), record.get("supervisor_pid")):
        if pgid:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def wait_for(predicate, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


METRICS_LINE = re.compile(
    r"step (\d+): loss ([-\d.naif]+), ([\d.]+) samples/s, ([\d.]+) s/step, peak memory ([\d.]+) GB"
)


def logged_windows(job: Path) -> list[dict]:
    """The metric windows rank 0 logged: step, loss, samples/s, s/step and peak memory (GB) of each."""
    return [
        {
            "step": int(m[1]),
            "loss": float(m[2]),
            "samples_per_sec": float(m[3]),
            "step_s": float(m[4]),
            "peak_gb": float(m[5]),
        }
        for m in METRICS_LINE.finditer(job_log(job))
    ]


def make_latent_dataset(work: Path, device: str, images_per_class: int = 40) -> Path:
    """`orch prepare` of synthetic 64 px images in CLASSES class folders through a tiny random AutoencoderKL: 4 x 32 x
    32 latents."""
    import numpy as np
    import torch
    from diffusers import AutoencoderKL
    from PIL import Image

    shards = work / "shards"
    if (shards / "index.json").exists():
        return shards
    torch.manual_seed(0)
    AutoencoderKL(
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=2 * LATENT_SIDE,
    ).save_pretrained(work / "vae")
    rng = np.random.default_rng(0)
    for label in range(CLASSES):
        folder = work / "images" / f"class{label}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(images_per_class):
            # smooth colour fields, a little different per class
            coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            coarse[..., label % 3] //= 2
            Image.fromarray(coarse).resize((2 * LATENT_SIDE, 2 * LATENT_SIDE), Image.BILINEAR).save(folder / f"{i}.png")
    spec = {
        "kind": "prepare",
        "version": 1,
        "input": {"source": "image_folder", "path": str(work / "images")},
        "image": {"resolution": 2 * LATENT_SIDE},
        "vae": {"name": str(work / "vae")},
        "output": {"path": str(shards), "shard_size": images_per_class * CLASSES // 4},
        "resources": {"device": device, "batch_size": 64},
    }
    result = orch("prepare", str(write_spec(work / "prepare.yaml", spec)), root=work / "prepare-runs")
    if result.returncode != 0:
        raise RuntimeError(f"orch prepare failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return shards


def gpu_description() -> tuple[str, str]:
    """(the device's name, a line of versions) as torch sees them."""
    import torch

    if not torch.cuda.is_available():
        return "CPU (no GPU)", f"torch {torch.__version__}"
    return (
        torch.cuda.get_device_name(),
        f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPU(s) visible",
    )
