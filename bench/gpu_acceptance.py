"""GPU acceptance of orch's own commands: run `bash bench/gpu_acceptance.sh` first whenever a GPU is at hand.

1. `orch prepare` encodes synthetic images into 4x32x32 latents through a tiny VAE, on the GPU.
2. Fault jobs, side by side on the GPU(s): `orch submit --detach` of a small DiT on those latents through DDP
   (bf16 and fp16), FSDP and ZeRO-2 (bf16), each drawing grids and checkpointing every 100 steps, SIGKILLed
   after its checkpoint at step 100 (while it draws that step's grid), `orch resume`d, finished at step 300.
   Checked: the job succeeded in 2 attempts, grids of steps 100-300 (the one the kill interrupted drawn on resume)
   and the final progression strip exist,
   the last checkpoint is step 300 with finite weights. World size 1 on one GPU, 2 when two or more are visible.
   ddp-bf16 also evaluates every 100 steps (FID, KID, precision/recall, FD-DINOv2 against the prepared images, the
   feature networks' real architectures with random weights): one record per evaluated step, finite figures.
3. Bitwise resume: DDP bf16 with `resources.deterministic: true` must end bit for bit equal (model and EMA) to
   its uninterrupted run; the same without it is reported, not required.
4. Trainer throughput and MFU of DiT-B/2 and DiT-XL/2 (bench/gpu_throughput.py: `orch submit` of the paper's
   256 px job, the trainer users run), within what is left of the time budget.

Writes bench/results/gpu-<device>.md (or --out) with the device named, prints it, and exits 1 if any check
failed. `--device cpu` runs the same on the CPU (fp16 left out, it needs a GPU): a rehearsal of the script.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpu_jobs import (  # noqa: E402
    REPO,
    gpu_description,
    job_log,
    job_state,
    kill_job,
    make_latent_dataset,
    orch,
    the_job,
    wait_for,
    write_spec,
)

STEPS, EVERY, KILL_AT, WIDTH = 300, 100, 100, 256  # on a GPU; main() scales them down for a CPU rehearsal


@dataclass(frozen=True)
class Case:
    name: str
    strategy: str
    precision: str
    deterministic: bool = False
    compare: str | None = None  # "required" or "reported": bitwise against an uninterrupted run of the same spec
    evaluate: bool = False  # also evaluates every EVERY steps: FID, KID, precision/recall, FD-DINOv2 on the GPU


CASES = (
    Case("ddp-bf16", "ddp", "bf16", compare="reported", evaluate=True),
    Case("ddp-fp16", "ddp", "fp16"),
    Case("fsdp-bf16", "fsdp", "bf16"),
    Case("zero2-bf16", "zero2", "bf16"),
    Case("ddp-bf16-deterministic", "ddp", "bf16", deterministic=True, compare="required"),
)


def case_spec(case: Case, shards: Path, device: str, processes: int) -> dict:
    spec = {
        "version": 1,
        "name": case.name,
        "model": {"patch_size": 4, "hidden_size": WIDTH, "depth": 4, "num_heads": 4},
        "data": {"source": "webdataset", "path": str(shards), "resolution": 64, "num_workers": 1, "shuffle_buffer": 64},
        "train": {
            "steps": STEPS,
            "global_batch_size": 32 * processes,
            "learning_rate": 3e-4,
            "warmup_steps": 10,
            "mixed_precision": case.precision,
            "seed": 11,
        },
        "ema": {"decay": 0.999},
        "checkpoint": {"every": EVERY, "keep": 5},
        "sample": {"every": EVERY, "sampler": "ddpm", "steps": EVERY, "per_class": 4, "classes": [0, 1, 2, 3]},
        "tracking": {"enabled": False, "log_every": 25},
        "resources": {
            "device": device,
            "strategy": case.strategy,
            "processes": processes,
            "threads_per_process": 2,
            "deterministic": case.deterministic,
        },
    }
    if case.evaluate:  # the feature networks' real architectures with random weights (nothing can be downloaded)
        work = shards.parent
        spec["eval"] = {
            "every": EVERY,
            "num_samples": 32,
            "sampler": "ddim",
            "steps": 10,
            "metrics": ["fid", "kid", "precision_recall", "fd_dinov2"],
            "reference": str(work / "images"),
            "reference_samples": 64,
            "weights_dir": str(work / "feature-weights"),
            "batch_size": 16,
        }
    return spec


def evaluation_failures(job: Path) -> list[str]:
    """What is wrong with an evaluating job's eval/ records: one per evaluated step, each with finite figures."""
    import json
    import math

    records = {p.name: json.loads(p.read_text()) for p in sorted((job / "eval").glob("step-*.json"))}
    expected = {f"step-{step:07d}.json" for step in range(EVERY, STEPS + 1, EVERY)}
    failures = [f"evaluations missing: {sorted(expected - set(records))}"] if expected - set(records) else []
    for name, record in records.items():
        bad = [k for k, v in record["metrics"].items() if not math.isfinite(v)]
        if record["error"] or bad or "eval/fd_dinov2" not in record["metrics"]:
            failures.append(f"{name}: {record['error'] or bad or 'no eval/fd_dinov2'}")
    return failures


def weights(job: Path, name: str) -> dict:
    from safetensors.torch import load_file

    checkpoint = job / "checkpoints" / (job / "checkpoints" / "latest").read_text().strip()
    return load_file(str(checkpoint / name))


def bitwise_equal(a: Path, b: Path) -> bool:
    return all(
        (wa := weights(a, name)).keys() == (wb := weights(b, name)).keys() and all(wa[k].equal(wb[k]) for k in wa)
        for name in ("model.safetensors", "ema.safetensors")
    )


def run_case(case: Case, shards: Path, work: Path, device: str, processes: int) -> dict:
    """Submit, kill after the checkpoint at KILL_AT, resume, finish; check what a user relies on. A row of the
    report."""
    began = time.perf_counter()
    row = {
        "case": case.name,
        "strategy": case.strategy,
        "precision": case.precision,
        "world": processes,
        "failures": [],
    }
    spec = write_spec(work / f"{case.name}.yaml", case_spec(case, shards, device, processes))
    try:
        root = work / case.name
        submitted = orch("submit", str(spec), "--detach", root=root)
        if submitted.returncode != 0:
            raise RuntimeError(f"submit exited {submitted.returncode}: {submitted.stderr.strip()[-800:]}")
        job = the_job(root)
        wait_for(
            lambda: (
                (job_state(job).get("checkpoint_step") or 0) >= KILL_AT
                or job_state(job)["state"] in ("failed", "succeeded")
            ),
            timeout=600,
            what=f"{case.name}: its checkpoint at step {KILL_AT}",
        )
        kill_job(job)
        record = job_state(job)
        row["killed_at"] = record["checkpoint_step"]
        if record["state"] != "running" or record["step"] >= STEPS:
            row["failures"].append(f"not killed while running (state {record['state']}, step {record['step']})")
        wait_for(
            lambda: '"failed"' in orch("status", job.name, "--json", root=root).stdout,
            timeout=60,
            what="the job to show as failed",
        )
        resumed = orch("resume", job.name, root=root)
        record = job_state(job)
        if (
            resumed.returncode != 0
            or record["state"] != "succeeded"
            or record["step"] != STEPS
            or record["attempts"] != 2
        ):
            row["failures"].append(
                f"resume: exit {resumed.returncode}, state {record['state']} at step {record['step']}, "
                f"{record['attempts']} attempts; {resumed.stderr.strip()[-300:]}"
            )
        expected = [f"samples-{step:07d}.png" for step in range(EVERY, STEPS + 1, EVERY)] + [
            f"progression-{STEPS:07d}.png"
        ]
        missing = [name for name in expected if not (job / "samples" / name).is_file()]
        if missing:
            row["failures"].append(f"grids missing: {missing}")
        row["grids"] = len(expected) - len(missing)
        final = weights(job, "model.safetensors")
        if not all(t.isfinite().all() for t in final.values()):
            row["failures"].append("non-finite weights in the last checkpoint")
        if "drawing the sample grid" in job_log(job):
            row["failures"].append(
                "a grid failed: " + re.findall(r".*drawing the sample grid.*", job_log(job))[0][-200:]
            )
        if device == "cuda" and "NCCL flight recorder" not in job_log(job):
            row["failures"].append("the NCCL flight recorder was not set up (no 'NCCL flight recorder' log line)")
        row["last_loss"] = record.get("loss")
        if case.evaluate:
            row["failures"] += evaluation_failures(job)
        if case.compare:
            reference_root = work / f"{case.name}-uninterrupted"
            reference = orch("submit", str(spec), root=reference_root)
            if reference.returncode != 0:
                row["failures"].append(f"uninterrupted run exited {reference.returncode}")
            else:
                row["bitwise"] = bitwise_equal(job, the_job(reference_root))
                if case.compare == "required" and not row["bitwise"]:
                    row["failures"].append("the resumed run is not bitwise equal to the uninterrupted one")
        row["log"] = job_log(job)[-3000:] if row["failures"] else ""
    except Exception as err:  # a row that could not run is a failed row, with its reason
        row["failures"].append(f"{type(err).__name__}: {err}")
        row["log"] = traceback.format_exc()[-2000:]
        job = the_job(work / case.name)
        if job is not None:
            row["log"] += "\n" + job_log(job)[-3000:]
    row["wall_s"] = time.perf_counter() - began
    return row


def acceptance_table(rows: list[dict]) -> list[str]:
    lines = [
        "| case | strategy | precision | ranks | killed after checkpoint | resumed to | grids | bitwise vs "
        "uninterrupted | result | wall |",
        "|---|---|---|---:|---:|---:|---:|---|---|---:|",
    ]
    for r in rows:
        bitwise = {True: "yes", False: "no", None: "-"}[r.get("bitwise")]
        result = "ok" if not r["failures"] else "FAILED: " + "; ".join(r["failures"]).replace("|", "/")[:400]
        lines.append(
            f"| {r['case']} | {r['strategy']} | {r['precision']} | {r['world']} | {r.get('killed_at', '-')} | "
            f"{STEPS if not r['failures'] else '-'} "
            f"| {r.get('grids', '-')} | {bitwise} | {result} | {r['wall_s']:.0f} s |"
        )
    return lines


def main() -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=None, help="the report (default bench/results/gpu-<device>.md)")
    parser.add_argument("--work", type=Path, default=None, help="where data and jobs go (default: a temporary folder)")
    parser.add_argument(
        "--budget-s", type=float, default=420, help="seconds for the whole script; throughput rows past it are skipped"
    )
    parser.add_argument(
        "--throughput",
        default="DiT-B/2:bf16,DiT-XL/2:bf16,DiT-B/2:bf16+deterministic,DiT-B/2:reference,DiT-XL/2:bf16+compile,"
        "DiT-B/2:bf16+compile,DiT-XL/2:reference",
        help="MODEL:SETTING rows of the trainer throughput, in order of priority ('' for none)",
    )
    args = parser.parse_args()
    began = time.perf_counter()
    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            "gpu_acceptance: no CUDA GPU is visible to torch; run with --device cpu for a rehearsal on the CPU",
            file=sys.stderr,
        )
        return 2
    if args.device == "cpu":  # a rehearsal of the script's code paths on 2 cores: a tenth of the work
        global STEPS, EVERY, KILL_AT, WIDTH
        STEPS, EVERY, KILL_AT, WIDTH = 30, 10, 10, 64
    work = args.work or Path(tempfile.mkdtemp(prefix="orch-acceptance-"))
    device_name, versions = gpu_description()
    processes = min(2, torch.cuda.device_count()) if args.device == "cuda" else 1
    print(f"gpu_acceptance on {device_name} ({versions}); work in {work}", flush=True)

    shards = make_latent_dataset(work, args.device)
    from tests.helpers import write_feature_weights

    write_feature_weights(work / "feature-weights")
    prepared_s = time.perf_counter() - began
    cases = [c for c in CASES if args.device == "cuda" or c.precision != "fp16"]
    with ThreadPoolExecutor(max_workers=len(cases)) as pool:
        rows = list(pool.map(lambda case: run_case(case, shards, work, args.device, processes), cases))
    faults_s = time.perf_counter() - began - prepared_s
    for row in rows:
        print(
            f"{row['case']}: {'ok' if not row['failures'] else 'FAILED ' + '; '.join(row['failures'])} "
            f"({row['wall_s']:.0f} s)",
            flush=True,
        )
        if row["failures"]:
            print(row["log"], flush=True)

    throughput_lines: list[str] = []
    wanted = [item.split(":") for item in args.throughput.split(",") if item]
    if wanted:
        import gpu_throughput

        left = args.budget_s - (time.perf_counter() - began)
        shards_rows = []
        for preset, setting in wanted:
            if time.perf_counter() - began > args.budget_s:
                shards_rows.append(
                    {"model": preset, "setting": setting, "error": "skipped: time budget spent", "wall_s": 0.0}
                )
                continue
            batch, steps = (32, 60) if args.device == "cuda" else (4, 9)
            shards_rows.append(gpu_throughput.measure(preset, setting, batch, steps, shards, work, args.device))
            print(gpu_throughput.table(shards_rows[-1:], batch, device_name)[-1], flush=True)
        throughput_lines = [
            f"Trainer throughput (bench/gpu_throughput.py rows, run by this script with {left:.0f} s of its budget "
            "left): `orch submit` "
            "of the paper's 256 px job (4x32x32 latents, 1000 classes, learned sigma, hybrid loss), batch "
            f"{32 if args.device == 'cuda' else 4} "
            f"per GPU, AdamW + EMA on the GPU + clipping, the trainer's last logged window.",
            "",
            *gpu_throughput.table(shards_rows, 32, device_name),
        ]

    failed = [r for r in rows if r["failures"]]
    report = [
        f"# GPU acceptance on {device_name}",
        "",
        f"{versions}; `bash bench/gpu_acceptance.sh`, {time.strftime('%Y-%m-%d')}, {time.perf_counter() - began:.0f} s "
        "in all "
        f"(prepare {prepared_s:.0f} s, fault jobs side by side {faults_s:.0f} s). {len(rows) - len(failed)} of "
        f"{len(rows)} fault cases passed.",
        "",
        f"Fault jobs: a DiT (width {WIDTH}, depth 4, patch 4) on 4x32x32 latents, {STEPS} steps, grids (DDPM-{EVERY}, "
        "16 images) and "
        f"checkpoints every {EVERY}, SIGKILLed after the checkpoint at step {KILL_AT}, then `orch resume`.",
        "",
        *acceptance_table(rows),
        "",
        *throughput_lines,
        "",
    ]
    out = (
        args.out
        or REPO / "bench" / "results" / f"gpu-{re.sub(r'[^A-Za-z0-9]+', '-', device_name).strip('-').lower()}.md"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(report))
    print("\n".join(report))
    print(f"report written to {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
