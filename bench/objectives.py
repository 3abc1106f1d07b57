"""The objectives side by side on the digits: the demo's DiT (jobs/dit_digits.yaml) trained for the same steps with
`ddpm` (epsilon), `ddpm` with min-SNR-5, `continuous` (x0 prediction) and `flow` (logit-normal times), each sampled at
5, 10, 20 and 50 steps (DDIM for ddpm; DDIM and ancestral for continuous; Euler and Heun for flow, Heun spending two
network calls per step but the last), without guidance. Prints one table: the digit-feature Fréchet distance and the
share of samples the digit classifier reads as their class (500 samples, `orch eval`), and each objective's training
step time relative to ddpm's.

    .venv/bin/python bench/objectives.py [--steps 1500] [--num 500] [--work /tmp/orch-objectives]

Every figure comes from orch's own commands (`orch submit`, `orch eval`); nothing here trains or samples by hand.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ORCH = str(Path(sys.executable).with_name("orch"))
OBJECTIVES = {  # name: (spec overrides, samplers)
    "ddpm (eps)": ([], ["ddim"]),
    "ddpm + min-SNR-5": (["diffusion.min_snr_gamma=5"], ["ddim"]),
    "continuous (x0)": (["diffusion.objective=continuous", "diffusion.beta_schedule=linear"], ["ddim", "ddpm"]),
    "flow (logit-normal)": (
        ["diffusion.objective=flow", "diffusion.beta_schedule=linear", "sample.sampler=euler"],
        ["euler", "heun"],
    ),
}
SAMPLING_STEPS = (5, 10, 20, 50)


def run(*args: str) -> str:
    done = subprocess.run([ORCH, *args], capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        sys.exit(f"orch {' '.join(args)} failed:\n{done.stderr}")
    return done.stdout


def step_time(job: Path) -> float:
    """The median seconds per training step the job logged (grids, checkpoints and evaluations excluded)."""
    times = [float(m) for m in re.findall(r"(\d+\.\d+) s/step", (job / "logs" / "job.log").read_text())]
    return statistics.median(times[len(times) // 10 :])  # past the first windows (warm-up)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--num", type=int, default=500)
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="orch-objectives-"))
    rows, times = [], {}
    for name, (overrides, samplers) in OBJECTIVES.items():
        root = work / re.sub(r"\W+", "-", name)
        sets = [f"train.steps={args.steps}", "eval.every=null", f"sample.every={args.steps}", "sample.steps=20"]
        if not any(root.glob("*/checkpoints/latest")):
            run(
                "--root",
                str(root),
                "submit",
                "jobs/dit_digits.yaml",
                *[a for o in sets + overrides for a in ("--set", o)],
            )
        (job,) = [p for p in root.iterdir() if (p / "state.json").is_file()]
        times[name] = step_time(job)
        for sampler in samplers:
            for steps in SAMPLING_STEPS:
                run("--root", str(root), "eval", job.name, "--num", str(args.num), "--sampler", sampler, "--steps",
                    str(steps), "--guidance", "1", "--metrics", "fd_digits,digit_accuracy")  # fmt: skip
                (record,) = (job / "eval").glob("offline-step-*.json")
                metrics = json.loads(record.read_text())["metrics"]
                rows.append((name, sampler, steps, metrics["eval/fd_digits"], metrics["eval/digit_accuracy"]))
                print(
                    f"{name:<22} {sampler:<6} {steps:>3}: fd {rows[-1][3]:.2f}, accuracy {rows[-1][4]:.3f}", flush=True
                )
    print(f"\n{args.steps} training steps each, {args.num} samples per figure, no guidance; work in {work}\n")
    print("| objective | sampler | " + " | ".join(f"{s} steps" for s in SAMPLING_STEPS) + " |")
    print("|---|---|" + "---|" * len(SAMPLING_STEPS))
    for name, (_, samplers) in OBJECTIVES.items():
        for sampler in samplers:
            cells = [f"{fd:.1f} / {acc:.3f}" for n, s, _, fd, acc in rows if n == name and s == sampler]
            print(f"| {name} | {sampler} | " + " | ".join(cells) + " |")
    print("\ncells: fd_digits / digit accuracy\n")
    base = times["ddpm (eps)"]
    for name, seconds in times.items():
        print(f"training step of {name}: {seconds * 1000:.1f} ms ({(seconds / base - 1) * 100:+.1f} % vs ddpm)")


if __name__ == "__main__":
    main()
