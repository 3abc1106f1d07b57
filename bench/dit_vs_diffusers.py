"""Training-step throughput of orch's DiT vs diffusers' DiTTransformer2DModel with the same config and
identical weights, on this machine's CPU, fp32.

    .venv/bin/python bench/dit_vs_diffusers.py [--steps 4] [--models DiT-S/2,DiT-B/2]

The paper's 256 px setting: 32x32x4 latents (random tensors: the data does not change the work),
1000 classes with label dropout 0.1, learned sigma (8 output channels). One step = forward, an MSE
loss on the predicted noise, backward, AdamW step. The diffusers twin is model.convert.to_diffusers
of ours (same weights; it keeps a copy of the timestep/label embedders in every block, so it has
more parameters). The two are timed in alternation, median of --steps steps after one warm-up step.
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

import diffusers  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from model.convert import to_diffusers  # noqa: E402
from model.dit import DiT_models  # noqa: E402

BATCH = {"DiT-S/2": 8, "DiT-B/2": 4}
LATENT = (4, 32, 32)
NUM_CLASSES = 1000


def make_step(forward, model: torch.nn.Module, batch: int):
    """A closure running one training step (forward, loss, backward, AdamW) and returning its seconds."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0)
    generator = torch.Generator().manual_seed(0)

    def step() -> float:
        x = torch.randn(batch, *LATENT, generator=generator)  # (B, 4, 32, 32) noisy latents
        t = torch.randint(0, 1000, (batch,), generator=generator)  # (B,)
        y = torch.randint(0, NUM_CLASSES, (batch,), generator=generator)  # (B,)
        target = torch.randn(batch, *LATENT, generator=generator)  # (B, 4, 32, 32) the noise
        start = time.perf_counter()
        out = forward(model, x, t, y)  # (B, 8, 32, 32)
        loss = F.mse_loss(out[:, : LATENT[0]], target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    return step


def ours_forward(model, x, t, y):
    return model(x, t, y)


def diffusers_forward(model, x, t, y):
    return model(x, timestep=t, class_labels=y).sample


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4, help="timed steps per model (after one warm-up step)")
    parser.add_argument("--models", default="DiT-S/2,DiT-B/2")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    print(
        f"machine: {platform.node()}, {cpu_name()}, {THREADS} cores ({torch.get_num_threads()} torch threads), "
        f"torch {torch.__version__}, diffusers {diffusers.__version__}, Python {platform.python_version()}"
    )
    print(
        "setting: fp32 CPU training step (forward, MSE, backward, AdamW), latents "
        f"{LATENT[1]}x{LATENT[2]}x{LATENT[0]}, "
        f"{NUM_CLASSES} classes, learned sigma; median of {args.steps} steps after 1 warm-up, the two models "
        "alternating"
    )
    for name in args.models.split(","):
        batch = BATCH.get(name, 4)
        torch.manual_seed(0)
        ours = DiT_models[name](
            input_size=LATENT[1], in_channels=LATENT[0], num_classes=NUM_CLASSES, learn_sigma=True
        ).train()
        theirs = to_diffusers(ours).train()
        steps = {
            "orch DiT": make_step(ours_forward, ours, batch),
            "diffusers DiTTransformer2DModel": make_step(diffusers_forward, theirs, batch),
        }
        times: dict[str, list[float]] = {label: [] for label in steps}
        for i in range(args.steps + 1):
            for label, step in steps.items():
                seconds = step()
                if i > 0:
                    times[label].append(seconds)
        params = {
            "orch DiT": sum(p.numel() for p in ours.parameters()),
            "diffusers DiTTransformer2DModel": sum(p.numel() for p in theirs.parameters()),
        }
        rates = {label: batch / statistics.median(values) for label, values in times.items()}
        print(f"\n{name}, batch {batch}")
        for label, rate in rates.items():
            print(
                f"  {label:32s} {params[label] / 1e6:6.1f} M params  {statistics.median(times[label]):6.2f} s/step  "
                f"{rate:6.2f} samples/s"
            )
        ratio = rates["orch DiT"] / rates["diffusers DiTTransformer2DModel"]
        print(f"  orch / diffusers throughput: {ratio:.2f}x")
        del ours, theirs, steps


if __name__ == "__main__":
    main()
