"""Wall time of a 4-trial `orch sweep` of the digits demo against the same 4 jobs submitted by hand, one after another.

    .venv/bin/python bench/sweep_overhead.py [--steps 150] [--rounds 1] [--parallel 2]

The jobs: jobs/dit_digits.yaml cut to --steps steps, no evaluation, the final grid in 20 DDIM steps, tracking to the
default local store under a fresh root; the grid train.learning_rate 5e-4,1e-3 x ema.decay 0.99,0.999. By hand is
`orch submit` four times (foreground, as a user's script would); the sweep is one `orch sweep` (Optuna study, MLflow
parent run, the trials as detached jobs it watches). Rounds alternate the two orders. Prints both wall times and the
sweep's overhead (goal: within 5 %). With --parallel N, also the same sweep with max_parallel N: N trials side by side,
each on its share of the machine's cores (threads per rank follow the share), against one after another.
"""

from __future__ import annotations

import argparse
import itertools
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import machine  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ORCH = str(Path(sys.executable).with_name("orch"))
SPEC = REPO / "jobs" / "dit_digits.yaml"
LEARNING_RATES = ("5e-4", "1e-3")
EMA_DECAYS = ("0.99", "0.999")


def common(steps: int) -> list[str]:
    settings = [f"train.steps={steps}", "eval.every=", "sample.every=100000", "sample.steps=20", "sample.sampler=ddim"]
    return [arg for setting in settings for arg in ("--set", setting)]


def run(args: list[str], root: str) -> float:
    start = time.perf_counter()
    result = subprocess.run([ORCH, "--root", root, *args], capture_output=True, text=True)
    took = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"orch {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return took


def by_hand(steps: int) -> float:
    with tempfile.TemporaryDirectory() as root:
        total = 0.0
        for lr, decay in itertools.product(LEARNING_RATES, EMA_DECAYS):
            trial = ["--set", f"train.learning_rate={lr}", "--set", f"ema.decay={decay}"]
            total += run(["submit", str(SPEC), *common(steps), *trial], root)
        return total


def as_sweep(steps: int, parallel: int = 1) -> float:
    with tempfile.TemporaryDirectory() as root:
        grid = [
            "--grid",
            f"train.learning_rate={','.join(LEARNING_RATES)}",
            "--grid",
            f"ema.decay={','.join(EMA_DECAYS)}",
        ]
        sweep = ["sweep", str(SPEC), *common(steps), *grid, "--name", "bench", "--max-parallel", str(parallel)]
        return run(sweep, root)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150, help="training steps per job")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--parallel", type=int, default=1, help="also time the sweep with this max_parallel")
    args = parser.parse_args()
    print(f"machine: {machine.cpu_name()}, {machine.cores()} cores, Python {platform.python_version()}")
    print(f"4 jobs of {SPEC.name}, {args.steps} steps each, grid lr {LEARNING_RATES} x ema.decay {EMA_DECAYS}")
    hand, sweep = [], []
    for round_ in range(args.rounds):
        order = (
            (("hand", by_hand), ("sweep", as_sweep)) if round_ % 2 == 0 else (("sweep", as_sweep), ("hand", by_hand))
        )
        for name, measure in order:
            took = measure(args.steps)
            (hand if name == "hand" else sweep).append(took)
            print(f"round {round_ + 1}: {name:5s} {took:7.1f} s", flush=True)
    h, s = sum(hand) / len(hand), sum(sweep) / len(sweep)
    print(f"by hand (4 x orch submit): {h:.1f} s; orch sweep: {s:.1f} s; overhead {100 * (s - h) / h:+.1f} %")
    if args.parallel > 1:
        side = [as_sweep(args.steps, args.parallel) for _ in range(args.rounds)]
        p = sum(side) / len(side)
        print(f"orch sweep --max-parallel {args.parallel} (a share of the cores each): {p:.1f} s; {s / p:.2f}x")


if __name__ == "__main__":
    main()
