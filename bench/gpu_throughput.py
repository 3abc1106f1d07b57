"""Training throughput and MFU of DiT-B/2 and DiT-XL/2 at 256 px as users run them: `orch submit` of a job, its
own trainer (data loader, EMA on the device, grad clipping, metrics), timed by the trainer's own logged windows.

    python bench/gpu_throughput.py [--models DiT-B/2,DiT-XL/2] [--settings reference,bf16,bf16+compile]
                                   [--batch 32] [--steps 60] [--work DIR] [--budget-s 400]

Settings (the job-spec fields that select them):
  reference      fp32 weights and activations, matmuls on TF32, eager: the DiT reference training setup
                 (train.mixed_precision: "no", resources.tf32: true)
  bf16           bf16 autocast, eager (train.mixed_precision: bf16)
  bf16+compile   bf16 autocast, every DiT block compiled by torch.compile (resources.compile: true)
  bf16+deterministic  bf16 autocast with deterministic kernels only (resources.deterministic: true): its cost

The job is the paper's 256 px setting: 4 x 32 x 32 latents (synthetic images prepared by `orch prepare` through a
tiny VAE: the data do not change the work), 1000 classes, label dropout 0.1, learned sigma with the hybrid loss,
batch 32 per GPU (the paper's 256 over 8 GPUs), AdamW, EMA, grad clipping at 1. Throughput is the trainer's
samples/s of its last logged window (`--steps` / 3 steps after the first two windows, which hold start-up and
compiling); its step time leaves out checkpoints and grids, as the trainer's metric does.

MFU = model FLOPs per second / the GPU's dense bf16 tensor peak. Model FLOPs per image = 3 x 2 x forward
multiply-adds (orchestrator/estimate.dit_forward_macs, which reproduces the DiT paper's Table 4: 118.6 G for
XL/2, 23.0 G for B/2), the convention of the PaLM paper (Chowdhery et al. 2022, App. B). Peaks from NVIDIA's
datasheets, dense (no sparsity): A100 312 TFLOPS, H100 SXM 989, H100 PCIe 756, H100 NVL 835, H200 989. The
reference is also given against the TF32 peak (half the bf16 peak), which is what it can reach at best.

Without a GPU it runs DiT-S/8 at batch 4 for 9 steps on the CPU: a smoke run of the code path, no MFU.
Prints a markdown table (and returns its rows to bench/gpu_acceptance.py).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpu_jobs import (  # noqa: E402
    LATENT_SIDE,
    gpu_description,
    logged_windows,
    make_latent_dataset,
    orch,
    the_job,
    write_spec,
)

NUM_CLASSES = 1000
SETTINGS = ("reference", "bf16", "bf16+compile")  # the default rows; "bf16+deterministic" on request
PEAK_BF16_TFLOPS = {
    "A100": 312,
    "H100 PCIe": 756,
    "H100 NVL": 835,
    "H100": 989,
    "H200": 989,
}  # dense tensor-core peaks (datasheets)


def peak_bf16_flops(device_name: str) -> float | None:
    """The datasheet's dense bf16 peak of a GPU named like torch.cuda.get_device_name, or None if not listed."""
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):  # "H100 PCIe" before "H100"
        if all(part in device_name for part in key.split()):
            return PEAK_BF16_TFLOPS[key] * 1e12
    return None


def model_flops_per_image(preset: str) -> int:
    from model.dit import DIT_SIZES
    from orchestrator.jobs.estimate import dit_forward_macs, training_flops_per_image

    size = DIT_SIZES[preset.split("-")[1].split("/")[0]]
    patch = int(preset.split("/")[1])
    macs = dit_forward_macs(size["depth"], size["hidden_size"], patch, 4, LATENT_SIDE, learn_sigma=True)
    return training_flops_per_image(macs)


def job_spec(preset: str, setting: str, batch: int, steps: int, shards: Path, device: str) -> dict:
    """The job of one row: the paper's 256 px class-conditional setting in one of SETTINGS."""
    return {
        "version": 1,
        "name": f"throughput-{preset.replace('/', '-')}-{setting.replace('+', '-')}",
        "model": {"preset": preset, "num_classes": NUM_CLASSES, "learn_sigma": True},
        "diffusion": {"loss": "hybrid"},
        "data": {
            "source": "webdataset",
            "path": str(shards),
            "resolution": 2 * LATENT_SIDE,
            "num_workers": 2,
            "shuffle_buffer": 64,
        },
        "train": {
            "steps": steps,
            "global_batch_size": batch,
            "learning_rate": 1e-4,
            "warmup_steps": 0,
            "grad_clip": 1.0,
            "mixed_precision": "no" if setting == "reference" else "bf16",
            "seed": 0,
        },
        "ema": {"decay": 0.9999},
        "checkpoint": {"every": 10 * steps, "keep": 1},  # written once, at the end (outside the timed windows)
        "sample": {"every": 10 * steps, "sampler": "ddpm", "steps": 2, "per_class": 1, "classes": [0]},
        "tracking": {"enabled": False, "log_every": max(1, steps // 3)},
        "resources": {
            "device": device,
            "tf32": True,
            "compile": setting.endswith("+compile"),
            "deterministic": setting.endswith("+deterministic"),
            "threads_per_process": 4,
        },
    }


def measure(preset: str, setting: str, batch: int, steps: int, shards: Path, work: Path, device: str) -> dict:
    """One row: run the job through `orch submit`, read the trainer's last logged window."""
    root = work / "throughput" / f"{preset.replace('/', '-')}-{setting}"
    spec = write_spec(work / f"{root.name}.yaml", job_spec(preset, setting, batch, steps, shards, device))
    began = time.perf_counter()
    result = orch("submit", str(spec), root=root, timeout=900)
    row = {"model": preset, "setting": setting, "wall_s": time.perf_counter() - began}
    job = the_job(root)
    windows = logged_windows(job) if job else []
    if result.returncode != 0 or len(windows) < 3:
        tail = (result.stdout + result.stderr)[-1500:]
        row["error"] = (
            "out of memory"
            if "OutOfMemoryError" in tail or "out of memory" in tail
            else f"exit {result.returncode}: {tail.strip().splitlines()[-1:]}"
        )
        return row
    last = windows[-1]
    row.update(samples_per_sec=last["samples_per_sec"], step_s=last["step_s"], peak_gb=last["peak_gb"])
    return row


def table(rows: list[dict], batch: int, device_name: str) -> list[str]:
    """The markdown table of the rows, with TFLOPS and MFU against the device's bf16 peak."""
    peak = peak_bf16_flops(device_name)
    lines = [
        "| model | setting | s/step | samples/s | TFLOPS | MFU | peak memory | wall (job) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        if "error" in row:
            lines.append(
                f"| {row['model']} | {row['setting']} | {row['error']} | | | | | {row.get('wall_s', 0):.0f} s |"
            )
            continue
        achieved = model_flops_per_image(row["model"]) * row["samples_per_sec"]
        mfu = f"{achieved / peak:.1%}" if peak else "n/a"
        if peak and row["setting"] == "reference":
            mfu += f" ({achieved / (peak / 2):.1%} of TF32 peak)"
        lines.append(
            f"| {row['model']} | {row['setting']} | {row['step_s']:.4f} | {row['samples_per_sec']:.1f} | "
            f"{achieved / 1e12:.1f} | {mfu} | "
            f"{row['peak_gb']:.1f} GB | {row['wall_s']:.0f} s |"
        )
    return lines


def run(
    models: list[str],
    settings: list[str],
    batch: int,
    steps: int,
    work: Path,
    device: str,
    budget_s: float | None = None,
) -> list[str]:
    """Measure every (model, setting) in order, skipping what no longer fits the time budget; the report's lines."""
    device_name, versions = gpu_description()
    shards = make_latent_dataset(work, device)
    began, rows = time.perf_counter(), []
    for preset in models:
        for setting in settings:
            if budget_s is not None and time.perf_counter() - began > budget_s:
                rows.append({"model": preset, "setting": setting, "error": "skipped: time budget spent", "wall_s": 0.0})
                continue
            rows.append(measure(preset, setting, batch, steps, shards, work, device))
            print(table(rows[-1:], batch, device_name)[-1], flush=True)
    return [
        f"Trainer throughput on {device_name} ({versions}): `orch submit` of the paper's 256 px job (4x32x32 latents, "
        f"1000 classes, learned sigma, hybrid loss), batch {batch} on one GPU, AdamW + EMA (on the GPU) + clipping; "
        f"the trainer's last logged window of {steps} steps.",
        "",
        *table(rows, batch, device_name),
    ]


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cuda = torch.cuda.is_available()
    parser.add_argument("--models", default="DiT-B/2,DiT-XL/2" if cuda else "DiT-S/8")
    parser.add_argument("--settings", default=",".join(SETTINGS) if cuda else "reference,bf16")
    parser.add_argument(
        "--batch", type=int, default=32 if cuda else 4, help="images per step (default 32, the paper's per-GPU batch)"
    )
    parser.add_argument("--steps", type=int, default=60 if cuda else 9)
    parser.add_argument(
        "--work", type=Path, default=None, help="where the dataset and jobs go (default: a temporary folder)"
    )
    parser.add_argument(
        "--budget-s", type=float, default=None, help="skip the remaining rows once this many seconds are spent"
    )
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="orch-throughput-"))
    lines = run(
        args.models.split(","),
        args.settings.split(","),
        args.batch,
        args.steps,
        work,
        "cuda" if cuda else "cpu",
        args.budget_s,
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
