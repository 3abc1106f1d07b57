"""How fast the latent shard stream feeds training, next to what training consumes.

    .venv/bin/python bench/shard_loader.py [--samples 2048] [--shard-size 256] [--batch 32] [--dit-steps 2]

Measures on this machine: the ShardStream's samples/s over DiT-sized latents (4x32x32 fp16 moments, the
layout `orch prepare` writes) with 0, 1 and 2 DataLoader workers; the time to the first batch when
resuming in the middle of an epoch (the cheap skip); and what one DiT-B/2 training process consumes here
(fwd + bwd + AdamW at batch 8). Next to them, what an 8xA100 node needs, from a published figure.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
THREADS = len(os.sched_getaffinity(0))
os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import webdataset as wds  # noqa: E402

from orchestrator.data.loader import DataPosition  # noqa: E402
from orchestrator.data.shardformat import SHARD_PATTERN, DatasetIndex, ShardRecord  # noqa: E402
from orchestrator.data.shards import ShardStream  # noqa: E402

LATENT = (4, 32, 32)  # SD VAE latents of 256x256 images

# fast-DiT README, "Improved Training Performance" (github.com/chuanyangjin/fast-DiT): DiT-XL/2 at 256x256 on one
# A100, global batch 128, gradient checkpointing + mixed precision + pre-extracted features: 0.84 steps/s.
A100_XL2_SAMPLES_PER_S = 0.84 * 128
# DiT paper (Peebles & Xie 2023), Table 4: forward Gflops of DiT-XL/2 and DiT-B/2 at 256x256 (latent 32x32).
GFLOPS = {"DiT-XL/2": 118.6, "DiT-B/2": 23.0}


def write_shards(folder: Path, samples: int, shard_size: int) -> None:
    """`orch prepare`'s layout: latent.npy = (mean, std) float16 (2, 4, 32, 32), cls, json; then index.json."""
    rng = np.random.default_rng(0)
    records = []
    for k, first in enumerate(range(0, samples, shard_size)):
        name = SHARD_PATTERN.format(k)
        count = min(shard_size, samples - first)
        with wds.TarWriter(str(folder / name), mtime=0) as sink:  # as orch prepare writes (no per-member PAX header)
            for number in range(first, first + count):
                moments = np.stack([rng.standard_normal(LATENT), 0.1 + rng.random(LATENT)]).astype(np.float16)
                sink.write(
                    {
                        "__key__": f"{number:09d}",
                        "latent.npy": moments,
                        "cls": number % 1000,
                        "json": {"source": f"{number}.jpg", "flipped": False},
                    }
                )
        records.append(ShardRecord(name=name, num_samples=count))
    DatasetIndex(
        num_samples=samples,
        shards=records,
        latent_shape=list(LATENT),
        latent_dtype="float16",
        scaling_factor=0.18215,
        vae="stabilityai/sd-vae-ft-mse",
        resolution=256,
        source="bench",
        flip=False,
        num_classes=1000,
    ).write(folder)


def loader_rate(folder: Path, workers: int, batch: int, epochs: int) -> tuple[float, float, int]:
    """(seconds to the first batch, samples/s after it, batches) over `epochs` epochs of one rank."""
    start = time.perf_counter()
    with ShardStream(folder, micro_batch=batch, num_workers=workers, shuffle_buffer=1000, seed=0) as stream:
        total = sum(stream.batches_in_epoch(e) for e in range(epochs))
        next(stream)
        first = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(total - 1):
            next(stream)
        elapsed = time.perf_counter() - start
    return first, (total - 1) * batch / elapsed, total


def resume_latency(folder: Path, workers: int, batch: int) -> tuple[float, float]:
    """Seconds to the first batch at the start of an epoch, and in its middle (skipping half of it)."""
    times = []
    for fraction in (0.0, 0.5):
        with ShardStream(folder, micro_batch=batch, num_workers=workers, seed=0) as probe:
            middle = int(probe.batches_in_epoch(0) * fraction)
        start = time.perf_counter()
        with ShardStream(
            folder, micro_batch=batch, num_workers=workers, seed=0, start=DataPosition(0, middle)
        ) as stream:
            next(stream)
            times.append(time.perf_counter() - start)
    return times[0], times[1]


def dit_b2_rate(steps: int, batch: int = 8) -> float:
    """Samples/s of DiT-B/2 training (fwd + bwd + AdamW, fp32) in this process on this CPU."""
    from model.diffusion import diffusion_loss, make_noise_scheduler
    from model.dit import DiT_B_2

    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    model = DiT_B_2(input_size=32, in_channels=4, num_classes=1000)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scheduler = make_noise_scheduler(1000, "linear")
    latents, labels = torch.randn(batch, *LATENT), torch.randint(0, 1000, (batch,))  # (B, 4, 32, 32), (B,)
    times = []
    for step in range(steps + 1):  # the first step warms up
        start = time.perf_counter()
        loss = diffusion_loss(model, latents, labels, scheduler)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return batch / (sum(times[1:]) / steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=2048)
    parser.add_argument("--shard-size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--dit-steps", type=int, default=2)
    args = parser.parse_args()

    print(
        f"machine: {platform.processor() or platform.machine()}, {THREADS} CPU cores, torch {torch.__version__}, "
        f"webdataset {wds.__version__}, Python {platform.python_version()}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        start = time.perf_counter()
        write_shards(folder, args.samples, args.shard_size)
        size = sum(p.stat().st_size for p in folder.glob("*.tar")) / 2**20
        print(
            f"data: {args.samples} samples of {LATENT} fp16 (mean, std) in shards of {args.shard_size} ({size:.0f} "
            f"MiB, written in {time.perf_counter() - start:.1f} s)"
        )
        print(
            f"\nShardStream, 1 rank, micro batch {args.batch}, shuffle buffer 1000, {args.epochs} epochs (page cache "
            "warm):"
        )
        print(f"  {'workers':>7}  {'first batch':>11}  {'samples/s':>9}  {'resume: epoch start':>19}  {'mid-epoch':>9}")
        for workers in (0, 1, 2):
            first, rate, _ = loader_rate(folder, workers, args.batch, args.epochs)
            at_start, at_middle = resume_latency(folder, workers, args.batch)
            print(f"  {workers:>7}  {first:>10.2f}s  {rate:>9.0f}  {at_start:>18.2f}s  {at_middle:>8.2f}s")

    print("\nconsumers of one rank:")
    rate = dit_b2_rate(args.dit_steps)
    print(
        f"  DiT-B/2 (input 32, 4 channels, 1000 classes) training on this CPU, fp32, batch 8, {THREADS} threads: "
        f"{rate:.1f} samples/s"
    )
    xl2_node = 8 * A100_XL2_SAMPLES_PER_S
    b2_node = xl2_node * GFLOPS["DiT-XL/2"] / GFLOPS["DiT-B/2"]
    print(f"  8x A100, DiT-XL/2: {xl2_node:.0f} samples/s per node = {xl2_node / 8:.0f} per rank")
    print(
        "      (fast-DiT README: 0.84 steps/s at global batch 128 on one A100 with fp16, gradient checkpointing, "
        "pre-extracted latents)"
    )
    print(f"  8x A100, DiT-B/2:  ~{b2_node:.0f} samples/s per node = ~{b2_node / 8:.0f} per rank")
    print(
        f"      (an estimate: the XL/2 figure scaled by forward Gflops {GFLOPS['DiT-XL/2']} / {GFLOPS['DiT-B/2']}, DiT "
        "paper Table 4)"
    )


if __name__ == "__main__":
    main()
