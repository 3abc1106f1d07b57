"""Single-GPU training throughput and MFU of DiT-B/2 and DiT-XL/2 at 256 px, in orch's settings and in
the reference training setup, on whatever GPU this runs on.

    .venv/bin/python bench/gpu_throughput.py [--models DiT-B/2,DiT-XL/2] [--batch 32] [--steps 30] [--warmup 10]

Settings (the `resources` / `train` fields that select them in a job spec in brackets):
  reference      fp32 weights and activations, matmuls on TF32, eager: the DiT reference training setup
                 (train.mixed_precision: "no", resources.tf32: true)
  bf16           bf16 autocast, eager (train.mixed_precision: bf16)
  bf16+compile   bf16 autocast, every DiT block compiled by torch.compile (resources.compile: true)

One step is what a job's rank does per optimizer step on one GPU: the paper's 256 px setting (32x32x4
latents, random tensors: the data does not change the work; 1000 classes, label dropout 0.1, learned
sigma with the hybrid loss; batch 32 per GPU as in the paper's 256 on 8 GPUs), orch's DiT, diffusion loss, AdamW and EMA update. Steps are timed with
CUDA events after `--warmup` steps (which include compiling). samples/s = batch / median step time.

MFU = model FLOPs per second / the GPU's dense bf16 tensor peak. Model FLOPs per image =
3 x 2 x forward multiply-adds (orchestrator/estimate.dit_forward_macs, which reproduces the DiT paper's
Table 4: 118.6 G for XL/2, 23.0 G for B/2), the convention of the PaLM paper (Chowdhery et al. 2022,
App. B). Peaks from NVIDIA's datasheets, dense (no sparsity): A100 312 TFLOPS, H100 SXM 989, H100 PCIe
756, H100 NVL 835, H200 989. The reference is also given against the TF32 peak (half the bf16 peak), which is what
it can reach at best.

Without a GPU the script runs the same steps on the CPU with DiT-S/8 at batch 4 (a smoke run of the
code path; no MFU). Writes nothing; paste its output into bench/results/ with the device it names.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from machine import cpu_name  # noqa: E402  (bench/machine.py)

from model.diffusion import diffusion_loss, make_noise_scheduler  # noqa: E402
from model.dit import DIT_SIZES, DiT_models, compile_blocks  # noqa: E402
from model.ema import EMA  # noqa: E402
from orchestrator.estimate import dit_forward_macs, training_flops_per_image  # noqa: E402
from orchestrator.train.loop import HYBRID_VLB_WEIGHT, use_tf32  # noqa: E402

LATENT = (4, 32, 32)  # 256 px through the SD VAE's 8x downsampling
NUM_CLASSES = 1000
SETTINGS = ("reference", "bf16", "bf16+compile")
PEAK_BF16_TFLOPS = {"A100": 312, "H100 PCIe": 756, "H100 NVL": 835, "H100": 989, "H200": 989}  # dense tensor-core peaks (datasheets)


def peak_bf16_flops(device_name: str) -> float | None:
    """The datasheet's dense bf16 peak of a GPU named like torch.cuda.get_device_name, or None if not listed."""
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):  # "H100 PCIe" before "H100"
        if all(part in device_name for part in key.split()):
            return PEAK_BF16_TFLOPS[key] * 1e12
    return None


def model_flops_per_image(name: str) -> int:
    size = DIT_SIZES[name.split("-")[1].split("/")[0]]
    patch = int(name.split("/")[1])
    macs = dit_forward_macs(size["depth"], size["hidden_size"], patch, LATENT[0], LATENT[1], learn_sigma=True)
    return training_flops_per_image(macs)


class Clock:
    """Seconds between two points of the device's stream (CUDA events), or wall time on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def start(self):
        if self.cuda:
            self.begin, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.begin.record()
        else:
            self.began = time.perf_counter()

    def stop(self) -> float:
        if self.cuda:
            self.end.record()
            self.end.synchronize()
            return self.begin.elapsed_time(self.end) / 1000
        return time.perf_counter() - self.began


def run_setting(name: str, setting: str, batch: int, steps: int, warmup: int, device: torch.device) -> tuple[float, float]:
    """(median seconds per step, peak memory GB) of one model in one setting."""
    use_tf32(True)  # the reference setup's TF32; bf16 autocast leaves only the fp32 parts to it
    torch.manual_seed(0)
    model = DiT_models[name](input_size=LATENT[1], in_channels=LATENT[0], num_classes=NUM_CLASSES, learn_sigma=True).to(device).train()
    ema = EMA(model, decay=0.9999)
    if setting.endswith("+compile"):
        compile_blocks(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0)
    noise_scheduler = make_noise_scheduler()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if setting.startswith("bf16") else nullcontext()
    x = torch.randn(batch, *LATENT, device=device)  # (B, 4, 32, 32) latents
    y = torch.randint(0, NUM_CLASSES, (batch,), device=device)  # (B,)
    clock, times = Clock(device), []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for step in range(warmup + steps):
        clock.start()
        with autocast:
            loss = diffusion_loss(model, x, y, noise_scheduler, vlb_weight=HYBRID_VLB_WEIGHT)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.update(model, step + 1)
        seconds = clock.stop()
        if step >= warmup:
            times.append(seconds)
    peak = torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else float("nan")
    del model, ema, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return statistics.median(times), peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=None, help="comma-separated (default DiT-B/2,DiT-XL/2 on a GPU, DiT-S/8 on the CPU)")
    parser.add_argument("--batch", type=int, default=None, help="images per step (default 32 on a GPU, the paper's per-GPU batch; 4 on the CPU)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per setting (default 30 on a GPU, 3 on the CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first, compiling included (default 10 / 1)")
    parser.add_argument("--settings", default=",".join(SETTINGS))
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    models = (args.models or ("DiT-B/2,DiT-XL/2" if cuda else "DiT-S/8")).split(",")
    batch = args.batch or (32 if cuda else 4)
    steps = args.steps or (30 if cuda else 3)
    warmup = args.warmup if args.warmup is not None else (10 if cuda else 1)
    device_name = torch.cuda.get_device_name() if cuda else f"CPU: {cpu_name()}, {torch.get_num_threads()} threads"
    peak = peak_bf16_flops(device_name) if cuda else None
    print(f"device: {device_name}; torch {torch.__version__}"
          f"{f', CUDA {torch.version.cuda}' if cuda else ''}; peak dense bf16 {f'{peak / 1e12:.0f} TFLOPS' if peak else 'unknown (no MFU)'}")
    print(f"setting: batch {batch}, latents {LATENT[1]}x{LATENT[2]}x{LATENT[0]}, {NUM_CLASSES} classes, learned sigma, AdamW + EMA; "
          f"median of {steps} steps after {warmup} warm-up")
    print(f"\n{'model':10s} {'setting':14s} {'s/step':>8s} {'samples/s':>10s} {'TFLOPS':>8s} {'MFU':>7s} {'peak mem':>9s}")
    for name in models:
        flops = model_flops_per_image(name) * batch
        for setting in args.settings.split(","):
            try:
                seconds, memory = run_setting(name, setting, batch, steps, warmup, device)
            except torch.OutOfMemoryError:
                torch.cuda.empty_cache()
                print(f"{name:10s} {setting:14s} out of memory at batch {batch} (try --batch {batch // 2})")
                continue
            achieved = flops / seconds
            mfu = f"{achieved / peak:7.1%}" if peak else "    n/a"
            memory_text = f"{memory:6.1f} GB" if cuda else "      n/a"
            tf32_note = f"  ({achieved / (peak / 2):.1%} of the TF32 peak)" if peak and setting == "reference" else ""
            print(f"{name:10s} {setting:14s} {seconds:8.3f} {batch / seconds:10.1f} {achieved / 1e12:8.2f} {mfu} {memory_text}{tf32_note}")


if __name__ == "__main__":
    main()
