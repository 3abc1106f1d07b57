"""What the harness costs per step: orch's trainer vs a bare PyTorch loop of the same model, batch,
precision and work (AdamW, diffusion loss, EMA update), on this machine's CPU.

    .venv/bin/python bench/overhead.py [--steps 200] [--precision no|bf16]

The harness figure is the step time orch itself logs to MLflow (`step_time_s`, which leaves out
the time spent drawing grids and writing checkpoints), read back from the job's local store.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
THREADS = len(os.sched_getaffinity(0))
os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))

import torch  # noqa: E402

from model.diffusion import diffusion_loss, make_noise_scheduler  # noqa: E402
from model.ema import EMA  # noqa: E402
from orchestrator.components.model import build_model  # noqa: E402
from orchestrator.components.model_input import pixel_input  # noqa: E402
from orchestrator.data.loader import DigitsDataset  # noqa: E402
from orchestrator.specs.job import load_spec  # noqa: E402

WARMUP = 20


def bare_loop(spec, steps: int) -> float:
    """Seconds per step of the plainest loop that does the same work."""
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    data = DigitsDataset(spec.data.resolution)
    model = build_model(spec, pixel_input(spec, num_classes=10))
    ema = EMA(model, decay=spec.ema.decay, warmup_power=spec.ema.warmup_power)
    t = spec.train
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=t.learning_rate, betas=t.adam_betas, weight_decay=t.weight_decay
    )
    d = spec.diffusion
    scheduler = make_noise_scheduler(d.num_train_timesteps, d.beta_schedule, d.beta_start, d.beta_end)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if t.mixed_precision == "bf16" else nullcontext()
    times = []
    for step in range(WARMUP + steps):
        start = time.perf_counter()
        index = torch.randint(0, len(data), (t.global_batch_size,))
        images, labels = data.images[index], data.labels[index]  # (B, 1, 8, 8), (B,)
        with autocast:
            loss = diffusion_loss(model, images, labels, scheduler)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.update(model, step + 1)
        times.append(time.perf_counter() - start)
    return statistics.median(times[WARMUP:])


def harness(spec_file: Path, steps: int, precision: str) -> float:
    """Seconds per step as orch logs them, for the same spec run through `orch submit`."""
    from mlflow import MlflowClient

    with tempfile.TemporaryDirectory() as root:
        orch = str(Path(sys.executable).with_name("orch"))
        subprocess.run(
            [
                orch,
                "--root",
                root,
                "submit",
                str(spec_file),
                "--set",
                f"train.steps={WARMUP + steps}",
                "--set",
                f"train.mixed_precision={precision}",
                "--set",
                "sample.every=100000",
                "--set",
                "sample.sampler=ddim",
                "--set",
                "sample.steps=5",
                "--set",
                "checkpoint.every=100000",
                "--set",
                "tracking.log_every=10",
                "--set",
                f"resources.threads_per_process={THREADS}",
            ],
            check=True,
            capture_output=True,
            env={**os.environ, "MLFLOW_TRACKING_URI": ""},
        )
        job = next(p for p in Path(root).iterdir() if (p / "state.json").exists())
        import json

        run_id = json.loads((job / "state.json").read_text())["mlflow_run_id"]
        history = MlflowClient(f"sqlite:///{Path(root).resolve() / 'mlflow.db'}").get_metric_history(
            run_id, "step_time_s"
        )
        return statistics.median(m.value for m in history if m.step > WARMUP)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--spec", default=str(REPO / "jobs" / "dit_digits.yaml"))
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--precision", default="no", choices=["no", "bf16"])
    parser.add_argument("--rounds", type=int, default=3, help="alternating bare/harness pairs (this machine is noisy)")
    args = parser.parse_args()
    spec = load_spec(args.spec, [f"train.mixed_precision={args.precision}"])
    print(
        f"machine: {platform.node()}, {THREADS} cores, torch {torch.__version__}; spec {Path(args.spec).name}, "
        f"batch {spec.train.global_batch_size}, precision {args.precision}, {args.steps} steps after {WARMUP} warm-up"
    )
    ratios = []
    for round_ in range(1, args.rounds + 1):
        bare = bare_loop(spec, args.steps)
        ours = harness(Path(args.spec), args.steps, args.precision)
        ratios.append(ours / bare)
        print(
            f"round {round_}: bare PyTorch loop {bare * 1000:6.1f} ms/step, orch harness {ours * 1000:6.1f} ms/step, "
            f"overhead {100 * (ours / bare - 1):+5.1f} %"
        )
    print(
        f"median overhead over {args.rounds} rounds: {100 * (statistics.median(ratios) - 1):+.1f} %  (goal: at most +5 "
        "%)"
    )


if __name__ == "__main__":
    main()
