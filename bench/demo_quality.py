"""How good is the demo model under each sampler? `orch eval` of a finished dit-digits job's newest checkpoint for a
grid of sampler settings: the Fréchet distance in the digit classifier's features (lower is better) and the share of
class-conditional samples it reads as their class (chance: 10 %), with the seconds each evaluation took.

    .venv/bin/python bench/demo_quality.py JOB [--root runs] [--num 500]

Each line is one `orch eval JOB --sampler S --steps N --guidance G --num NUM`: the figures the demo's in-loop
evaluation would log with those settings (it also leaves eval/offline-step-N.json of the last setting in the job).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ORCH = str(Path(sys.executable).with_name("orch"))
SETTINGS = [  # (sampler, steps, guidance)
    ("ddpm", 250, 1.0),
    ("ddpm", 100, 1.5),
    ("ddpm", 250, 1.5),
    ("ddpm", 250, 2.0),
    ("ddim", 50, 1.5),
    ("dpm_solver++", 25, 1.5),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("job")
    parser.add_argument("--root", default="runs")
    parser.add_argument("--num", type=int, default=500)
    args = parser.parse_args()
    print(f"{'sampler':<14} {'steps':>5} {'guidance':>8} {'fd_digits':>10} {'accuracy':>9} {'seconds':>8}")
    for sampler, steps, guidance in SETTINGS:
        command = [ORCH, "--root", args.root, "eval", args.job, "--num", str(args.num), "--sampler", sampler]
        command += ["--steps", str(steps), "--guidance", str(guidance), "--metrics", "fd_digits,digit_accuracy"]
        done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
        if done.returncode != 0:
            sys.exit(f"{' '.join(command)} failed:\n{done.stderr}")
        (record_file,) = sorted((Path(args.root).resolve() / "").glob(f"{args.job}*/eval/offline-step-*.json"))[-1:]
        metrics = json.loads(record_file.read_text())["metrics"]
        print(
            f"{sampler:<14} {steps:>5} {guidance:>8} {metrics['eval/fd_digits']:>10.2f} "
            f"{metrics['eval/digit_accuracy']:>9.3f} {metrics['eval/seconds']:>8.1f}"
        )


if __name__ == "__main__":
    main()
