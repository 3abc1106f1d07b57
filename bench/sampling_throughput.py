"""Sampling throughput of DiT-S/2: images/s of DDIM-50 with classifier-free guidance 4, on this machine's CPU, fp32.

    .venv/bin/python bench/sampling_throughput.py [--batch 8] [--steps 50] [--guidance 4] [--rounds 1]

The paper's 256 px setting at the network: 32x32x4 latents (4 channels; the VAE decode that would
turn them into 256 px images is not included), 1000 classes, learned sigma. Untrained weights: the
work does not depend on them. It runs orch's sampler (model.diffusion.sample, what `orch sample`
calls per batch) with per-image noise as orchestrator.trained.sampling draws it; guidance doubles the
network's batch (conditional and unconditional halves), so a batch of 8 images is 16 per forward.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from machine import cores, cpu_name  # noqa: E402  (bench/machine.py)

THREADS = cores()
os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))

import torch  # noqa: E402

from model.diffusion import make_noise_scheduler, sample  # noqa: E402
from model.dit import DiT_S_2  # noqa: E402
from orchestrator.trained.sampling import initial_noise  # noqa: E402

LATENT = (4, 32, 32)
NUM_CLASSES = 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--rounds", type=int, default=1, help="timed batches (after a 2-step warm-up)")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    print(
        f"machine: {platform.node()}, {cpu_name()}, {THREADS} cores ({torch.get_num_threads()} torch threads), "
        f"torch {torch.__version__}, Python {platform.python_version()}"
    )
    torch.manual_seed(0)
    model = DiT_S_2(input_size=LATENT[1], in_channels=LATENT[0], num_classes=NUM_CLASSES, learn_sigma=True).eval()
    scheduler = make_noise_scheduler(1000, "linear")
    labels = torch.arange(args.batch) % NUM_CLASSES  # (B,)

    def run(steps: int, seed: int) -> float:
        noise, _ = initial_noise(seed, args.batch, LATENT)  # (B, 4, 32, 32)
        start = time.perf_counter()
        sample(
            model,
            labels,
            LATENT,
            scheduler,
            sampler="ddim",
            num_steps=steps,
            guidance_scale=args.guidance,
            null_label=NUM_CLASSES,
            noise=noise,
            clip_denoised=False,
        )  # latents: no clipping
        return time.perf_counter() - start

    run(2, seed=99)  # warm-up
    times = [run(args.steps, seed) for seed in range(args.rounds)]
    seconds = statistics.median(times)
    forwards = args.steps * args.batch * (2 if args.guidance != 1 else 1)
    print(
        f"DiT-S/2 ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M params), latents "
        f"{LATENT[1]}x{LATENT[2]}x{LATENT[0]} (no VAE decode), fp32, batch {args.batch}, "
        f"DDIM-{args.steps}, guidance {args.guidance:g}: {seconds:.1f} s per batch, {args.batch / seconds:.3f} "
        "images/s, "
        f"{forwards / seconds:.1f} image-forwards/s ({args.rounds} round(s))"
    )


if __name__ == "__main__":
    main()
