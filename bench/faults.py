"""orch's fault suite injected for real into tiny real jobs on this machine's CPU: does each job survive, how many
training steps and how many bytes of complete checkpoints does each fault cost, how long a hang takes to be found and
trained past, and what the per-step guards (non-finite check, hang watchdog, checkpoint checks) cost.

    .venv/bin/python bench/faults.py [--out bench/results/faults-cpu.md] [--overhead-py]

Faults (each the way tests/faults and tests/integration inject it):
  sigkill      SIGKILL of a 1-rank job's supervisor and launcher mid-run, then `orch resume`; bitwise vs uninterrupted
  hang         SIGSTOP of rank 1 of 2 (torchrun, resources.hang_timeout_s 10, max_restarts 1): watchdog, restart
  nan          a NaN loss injected at one step (ORCH_FAULT_NONFINITE_STEPS): that update is skipped
  disk-full    a tmpfs filled by another file while the job checkpoints (checkpoint.on_write_error continue), then freed
  bad-image    a PNG of the image folder cut in its header while the job trains on it: replaced and counted
  tracking     the MLflow server SIGKILLed mid-run and started again: no metric point may be missing

"Bytes of checkpoints lost": the bytes of the complete checkpoints (checkpoint.keep high enough that nothing is pruned)
that existed just before the fault and are missing or changed (size or SHA-256 of any file) once the job is done.
Exits 1 if any fault was not survived (or could not be injected).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from tests.helpers import (  # noqa: E402
    assert_bitwise_equal,
    final_weights,
    job_appeared,
    kill_job_processes,
    log_text,
    only_job,
    orch,
    start_orch,
    state,
    tiny_spec,
    wait_for,
)

STEP_LINE = re.compile(r"step (\d+): loss [-\d.naif]+, [\d.]+ samples/s, ([\d.]+) s/step")
NO_SAMPLES = {"every": 100000}
HANG_SETTINGS = ["--set", "resources.hang_timeout_s=10", "--set", "resources.max_restarts=1"]
HANG_SPEC = dict(
    train={"steps": 120, "seed": 3},
    checkpoint={"every": 50, "keep": 10},
    sample=NO_SAMPLES,
    resources={"processes": 2, "launcher": "torchrun", "threads_per_process": 1},
)


@dataclass
class Result:
    fault: str
    survived: bool
    steps_lost: int | None = None
    bytes_lost: int | None = None
    detail: str = ""
    injected: bool = True
    figures: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------- helpers


def checkpoint_files(job: Path) -> dict[str, dict[str, tuple[int, str]]]:
    """The complete checkpoints of a job (step-N directories with their trainer state, not a .tmp being written):
    for each, every file's size and SHA-256."""
    complete = {}
    for folder in sorted((job / "checkpoints").glob("step-*")):
        if folder.name.endswith(".tmp") or not (folder / "trainer_state.json").is_file():
            continue
        files = {}
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                files[str(path.relative_to(folder))] = (
                    path.stat().st_size,
                    hashlib.sha256(path.read_bytes()).hexdigest(),
                )
        complete[folder.name] = files
    return complete


def bytes_lost(before: dict, after: dict) -> int:
    """Bytes of the checkpoints complete before the fault that are missing or changed after it."""
    return sum(sum(size for size, _ in files.values()) for name, files in before.items() if after.get(name) != files)


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def sets(*overrides: str) -> list[str]:
    return [arg for o in overrides for arg in ("--set", o)]


def logged_steps(job: Path) -> list[tuple[int, float]]:
    """(step, seconds per step) of every step line in the job's log, in order."""
    return [(int(m.group(1)), float(m.group(2))) for m in STEP_LINE.finditer(log_text(job))]


def last_logged_step(job: Path) -> int:
    steps = logged_steps(job)
    return steps[-1][0] if steps else 0


def stop_job(process: subprocess.Popen | None, job: Path | None) -> None:
    """Leave nothing of a job running (after a failure of the bench itself)."""
    if job is not None and (job / "state.json").exists():
        try:
            if state(job)["state"] in ("queued", "running"):
                kill_job_processes(job)
        except (OSError, KeyError, ValueError):
            pass
    if process is not None and process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait(timeout=30)


def same_weights(job: Path, reference: Path) -> bool:
    model, ema = final_weights(job)
    reference_model, reference_ema = final_weights(reference)
    try:
        assert_bitwise_equal(model, reference_model)
        assert_bitwise_equal(ema, reference_ema)
    except AssertionError:
        return False
    return True


def finished(job: Path, steps: int) -> bool:
    record = state(job)
    return record["state"] == "succeeded" and record["step"] == steps and record["checkpoint_step"] == steps


# ---------------------------------------------------------------------------------------------------- faults


def fault_sigkill(work: Path) -> Result:
    """SIGKILL of supervisor and launcher mid-run (a dying node), then `orch resume`: bitwise vs uninterrupted."""
    total = 150
    spec = tiny_spec(work, name="kill", train={"steps": total}, checkpoint={"every": 50, "keep": 10}, sample=NO_SAMPLES)
    reference_run = start_orch("submit", str(spec), root=work / "reference")  # alongside: nothing of it is timed
    root, job = work / "runs", None
    try:
        orch("submit", str(spec), "--detach", root=root, check=True)
        job = only_job(root)
        wait_for(lambda: (state(job).get("checkpoint_step") or 0) >= 50, timeout=240, what="the checkpoint at 50")
        wait_for(lambda: state(job)["step"] >= 80, timeout=120, what="step 80")
        before = checkpoint_files(job)
        kill_job_processes(job)
        wait_for(
            lambda: orch("status", job.name, "--json", root=root).stdout.count('"failed"'),
            timeout=60,
            what="the job to show as failed",
        )
        killed_at = max(state(job)["step"], last_logged_step(job))
        began = time.monotonic()
        resumed = orch("resume", job.name, root=root)
        resume_s = time.monotonic() - began
        match = re.search(r"resuming from step-(\d+)", resumed.stdout)
        resumed_from = int(match.group(1)) if match else 0
        reference_run.wait(timeout=300)
        equal = resumed.returncode == 0 and same_weights(job, only_job(work / "reference"))
        survived = resumed.returncode == 0 and finished(job, total) and equal
        return Result(
            "SIGKILL of a 1-rank job, then `orch resume`",
            survived,
            killed_at - resumed_from,
            bytes_lost(before, checkpoint_files(job)),
            f"killed at step {killed_at}, resumed from step-{resumed_from:07d}; `orch resume` to the end "
            f"{resume_s:.1f} s; final model and EMA bitwise equal to the uninterrupted job: {'yes' if equal else 'NO'}",
        )
    finally:
        stop_job(reference_run, job_appeared(work / "reference"))
        stop_job(None, job)


def start_hang_reference(work: Path) -> tuple[subprocess.Popen, Path]:
    spec = tiny_spec(work, name="hang", **HANG_SPEC)
    return start_orch("submit", str(spec), *HANG_SETTINGS, root=work / "reference"), spec


def fault_hang(work: Path, reference_run: subprocess.Popen, spec: Path) -> Result:
    """SIGSTOP of rank 1 of 2: the watchdog finds the hang, torchrun starts both ranks again from the checkpoint."""
    total = HANG_SPEC["train"]["steps"]
    reference_run.wait(timeout=300)  # started earlier, alongside other faults, so that it does not slow this one
    root, run, job, stopped = work / "runs", None, None, None
    try:
        run = start_orch("submit", str(spec), *HANG_SETTINGS, root=root)
        job = wait_for(lambda: job_appeared(root), what="the job")
        wait_for(lambda: (state(job).get("checkpoint_step") or 0) >= 50, timeout=240, what="the checkpoint at 50")
        wait_for(lambda: last_logged_step(job) >= 65, timeout=120, what="step 65")
        before = checkpoint_files(job)
        stopped = json.loads((job / "ranks" / "1.json").read_text())["pid"]
        os.kill(stopped, signal.SIGSTOP)  # rank 1 hangs; rank 0 waits for it in the next all-reduce
        hung_at = time.monotonic()
        wait_for(lambda: "hang: no progress" in log_text(job), timeout=90, interval=0.02, what="the watchdog")
        detect_s = time.monotonic() - hung_at
        offset = len(log_text(job))
        hung_step = last_logged_step(job)
        # The stalled rank comes back (a node out of a long stall): it meets torchrun's stop at once, as in the tests.
        os.kill(stopped, signal.SIGCONT)

        def training_again():
            after = log_text(job)[offset:]
            resumed = re.search(r"resumed from step-(\d+)", after)
            if resumed and STEP_LINE.search(after, resumed.end()):
                return int(resumed.group(1))
            return None

        resumed_from = wait_for(training_again, timeout=240, interval=0.02, what="a training step after the restart")
        again_s = time.monotonic() - hung_at
        returncode = run.wait(timeout=300)
        record = state(job)
        equal = returncode == 0 and same_weights(job, only_job(work / "reference"))
        survived = returncode == 0 and finished(job, total) and record["restarts"] == 1 and equal
        result = Result(
            "SIGSTOP of rank 1 of 2 (hang; watchdog, torchrun restart)",
            survived,
            hung_step - resumed_from,
            bytes_lost(before, checkpoint_files(job)),
            f"stopped after step {hung_step}; hang detected in {detect_s:.1f} s (hang_timeout_s 10), training again "
            f"{again_s:.1f} s after the stop, from step-{resumed_from:07d}; restarts {record['restarts']}; bitwise "
            f"equal to the uninterrupted job: {'yes' if equal else 'NO'}",
        )
        result.figures = {"detect_s": detect_s, "again_s": again_s, "restart_s": again_s - detect_s}
        return result
    finally:
        if stopped is not None:
            try:
                os.kill(stopped, signal.SIGCONT)
            except ProcessLookupError:
                pass
        stop_job(run, job)
        stop_job(reference_run, job_appeared(work / "reference"))


def fault_nan(work: Path) -> Result:
    """A NaN loss at one chosen update: that update is skipped (weights, schedule, EMA untouched); training goes on."""
    total, nan_step = 150, 100
    spec = tiny_spec(work, name="nan", train={"steps": total}, checkpoint={"every": 50, "keep": 10}, sample=NO_SAMPLES)
    root, run, job = work / "runs", None, None
    try:
        run = start_orch("submit", str(spec), root=root, env={"ORCH_FAULT_NONFINITE_STEPS": str(nan_step)})
        job = wait_for(lambda: job_appeared(root), what="the job")
        wait_for(lambda: (state(job).get("checkpoint_step") or 0) >= 50, timeout=240, what="the checkpoint at 50")
        before = checkpoint_files(job)
        returncode = run.wait(timeout=300)
        skipped = re.findall(r"step (\d+): gradients not finite", log_text(job))
        finite = all(torch.isfinite(t).all() for weights in final_weights(job) for t in weights.values())
        survived = returncode == 0 and finished(job, total) and skipped == [str(nan_step)] and finite
        return Result(
            f"NaN loss injected at update {nan_step}",
            survived,
            len(skipped),
            bytes_lost(before, checkpoint_files(job)),
            f"skipped updates: {', '.join(skipped) or 'none'} ({len(skipped)}); job finished {total} steps; "
            f"final weights finite: {'yes' if finite else 'NO'}",
        )
    finally:
        stop_job(run, job)


def digit_folder(root: Path) -> list[Path]:
    """32 real 8x8 digits as RGB PNGs, 16 per class folder (as tests/faults/test_bad_data.py writes them)."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits, written = load_digits(), []
    for label in (0, 1):
        folder = root / f"class{label}"
        folder.mkdir(parents=True)
        for n, image in enumerate(digits.images[digits.target == label][:16]):
            pixels = (image * 255 / 16).astype(np.uint8)
            Image.fromarray(np.stack([pixels] * 3, axis=-1)).save(folder / f"{n:02d}.png")
            written.append(folder / f"{n:02d}.png")
    return written


def fault_bad_image(work: Path) -> Result:
    """A PNG of the image folder cut in its header while the job trains on it (read once an epoch of 4 steps)."""
    total = 120
    digit_folder(work / "images")
    corrupt = work / "images" / "class1" / "07.png"
    spec = tiny_spec(
        work,
        name="badimage",
        data={"source": "image_folder", "path": str(work / "images"), "resolution": 8},
        train={"steps": total, "global_batch_size": 8},
        checkpoint={"every": 50, "keep": 10},
        sample={"every": 100000, "classes": [0, 1]},
    )
    root, run, job = work / "runs", None, None
    try:
        run = start_orch("submit", str(spec), root=root)
        job = wait_for(lambda: job_appeared(root), what="the job")
        wait_for(lambda: (state(job).get("checkpoint_step") or 0) >= 50, timeout=240, what="the checkpoint at 50")
        before = checkpoint_files(job)
        corrupted_at = last_logged_step(job)
        corrupt.write_bytes(corrupt.read_bytes()[:40])  # unreadable from now on
        returncode = run.wait(timeout=300)
        record = state(job)
        warnings = [line for line in log_text(job).splitlines() if "an unreadable sample was replaced" in line]
        survived = returncode == 0 and finished(job, total) and record["bad_samples"] >= 1
        return Result(
            "corrupt PNG in the image folder mid-run",
            survived,
            total - record["step"],
            bytes_lost(before, checkpoint_files(job)),
            f"cut at step {corrupted_at}; samples replaced: {record['bad_samples']} (state bad_samples; "
            f"{len(warnings)} warnings naming it); job finished {record['step']} steps",
        )
    finally:
        stop_job(run, job)


def fault_disk_full(work: Path, measured_job: Path) -> Result:
    """A small tmpfs that another file fills while the job checkpoints; with checkpoint.on_write_error continue the
    job trains on, and once the file is removed it saves again, its final checkpoint included."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        return Result(
            "disk full while checkpointing", False, detail="not injected: mounting a tmpfs needs root", injected=False
        )
    total, every = 200, 20
    checkpoint = folder_bytes(measured_job / "checkpoints" / "step-0000050")
    base = folder_bytes(measured_job) - folder_bytes(measured_job / "checkpoints")
    disk = work / "disk"
    disk.mkdir()
    size = 4 * base + (total // every + 3) * checkpoint  # room for every checkpoint (keep 20: none is pruned)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(disk)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        return Result(
            "disk full while checkpointing",
            False,
            detail=f"not injected: mount failed ({mounted.stderr.strip()})",
            injected=False,
        )
    spec = tiny_spec(
        work, name="disk", train={"steps": total}, checkpoint={"every": every, "keep": 20}, sample=NO_SAMPLES
    )
    root, run, job = disk / "runs", None, None
    try:
        overrides = sets("checkpoint.on_write_error=continue", "tracking.log_every=5")
        run = start_orch("submit", str(spec), *overrides, root=root)
        job = wait_for(lambda: job_appeared(root), what="the job")
        wait_for(lambda: checkpoint_files(job), timeout=240, interval=0.01, what="a first checkpoint")
        before = checkpoint_files(job)
        filler = disk / "filler"  # another user's file: less room than one checkpoint is left
        filler.write_bytes(b"\0" * max(0, shutil.disk_usage(disk).free - checkpoint // 2))
        filled_at = last_logged_step(job)
        wait_for(lambda: "training goes on" in log_text(job), timeout=120, interval=0.01, what="a checkpoint to fail")
        filler.unlink()  # room again: the next checkpoints are written
        freed_at = last_logged_step(job)
        returncode = run.wait(timeout=300)
        record = state(job)
        after = checkpoint_files(job)
        missing = [step for step in range(every, total + 1, every) if f"step-{step:07d}" not in after]
        survived = returncode == 0 and finished(job, total) and record["checkpoint_failures"] >= 1
        return Result(
            "disk full while checkpointing (on_write_error continue)",
            survived,
            total - record["step"],
            bytes_lost(before, after),
            f"tmpfs of {size / 1e6:.1f} MB filled after step {filled_at}, freed after step {freed_at}; checkpoints not "
            f"written: {record['checkpoint_failures']} (steps {', '.join(map(str, missing)) or 'none'}); final "
            f"checkpoint step-{record['checkpoint_step']:07d} written",
        )
    finally:
        stop_job(run, job)
        subprocess.run(["umount", "-l", str(disk)], check=False, capture_output=True)


def fault_tracking(work: Path) -> Result:
    """The MLflow server SIGKILLed mid-run and started again a while later: training goes on, the tracker catches up."""
    from mlflow import MlflowClient

    from tests.mlflow_server import MlflowServer, free_port, signal_group, wait_until_port_is_free

    total, outage_s = 300, 5.0
    folder = work / "mlflow"
    folder.mkdir()
    server = MlflowServer(folder, free_port())
    server.start()
    spec = tiny_spec(
        work,
        name="tracking",
        train={"steps": total, "global_batch_size": 256},
        checkpoint={"every": 100, "keep": 10},
        sample=NO_SAMPLES,
        tracking={"enabled": True, "uri": server.uri, "experiment": "faults", "log_every": 1},
    )
    root, run, job = work / "runs", None, None
    try:
        run = start_orch("submit", str(spec), root=root)
        job = wait_for(lambda: job_appeared(root), what="the job")
        wait_for(lambda: state(job)["step"] >= 30, timeout=240, what="step 30")
        before = checkpoint_files(job)
        process, server.process = server.process, None
        signal_group(process, signal.SIGKILL)  # the server dies, not a clean shutdown
        process.wait(timeout=30)
        wait_until_port_is_free(server.port)
        down_at, killed_step = time.monotonic(), last_logged_step(job)
        time.sleep(outage_s)
        server.start()
        outage = time.monotonic() - down_at
        back_step = last_logged_step(job)
        returncode = run.wait(timeout=300)
        record = state(job)
        log = log_text(job)
        client = MlflowClient(server.uri)
        logged = {m.step for m in client.get_metric_history(record["mlflow_run_id"], "loss")}
        missing = sorted(set(range(1, total + 1)) - logged)
        status = client.get_run(record["mlflow_run_id"]).info.status
        survived = returncode == 0 and finished(job, total) and not missing and status == "FINISHED"
        return Result(
            "MLflow tracking server killed mid-run, restarted",
            survived,
            total - record["step"],
            bytes_lost(before, checkpoint_files(job)),
            f"server down {outage:.1f} s (killed at step {killed_step}, answering again at step {back_step}); "
            f"`loss` points missing in MLflow: {len(missing)} of {total}; run {status}; "
            f"log says unreachable/reachable again: {'is unreachable' in log}/{'is reachable again' in log}",
        )
    finally:
        stop_job(run, job)
        server.stop()


# ---------------------------------------------------------------------------------------------------- guards


GUARD_SPEC = dict(
    model={"patch_size": 4, "hidden_size": 64, "depth": 4, "num_heads": 4},
    train={"steps": 300},
    checkpoint={"every": 100, "keep": 10},
    sample=NO_SAMPLES,
    tracking={"enabled": False, "log_every": 10},
)
GUARD_WARMUP = 20


def guard_job(work: Path, spec: Path, watchdog: bool, round_: int) -> tuple[list[float], Path]:
    root = work / f"{'on' if watchdog else 'off'}-{round_}"
    overrides = [] if watchdog else sets("resources.hang_timeout_s=null")
    orch("submit", str(spec), *overrides, root=root, check=True)
    job = only_job(root)
    return [seconds for step, seconds in logged_steps(job) if step > GUARD_WARMUP], job


def microseconds(call, repeat: int = 20000) -> float:
    """Microseconds per call: the median of 5 batches (the machine is shared)."""
    for _ in range(200):
        call()
    batches = []
    for _ in range(5):
        began = time.perf_counter()
        for _ in range(repeat // 5):
            call()
        batches.append((time.perf_counter() - began) / (repeat // 5) * 1e6)
    return statistics.median(batches)


def guard_overhead(work: Path, rounds: int) -> dict:
    """Median step time of the same job with the hang watchdog on (the default hang_timeout_s) and off (empty),
    alternated; and each guard timed alone in this process."""
    spec_file = tiny_spec(work, name="guard", **GUARD_SPEC)
    on, off, pairs, job = [], [], [], None
    for round_ in range(rounds):
        times_on, job = guard_job(work, spec_file, True, round_)
        times_off, _ = guard_job(work, spec_file, False, round_)
        on, off = on + times_on, off + times_off
        pairs.append((statistics.median(times_on) * 1e3, statistics.median(times_off) * 1e3))
    on_s, off_s = statistics.median(on), statistics.median(off)
    inloop = guards_in_loop(spec_file, job / "checkpoints" / "step-0000300")
    per_step_us = sum(inloop[key] for key in ("progress_us", "nonfinite_us", "checkpoint_us", "due_us"))
    return {
        "rounds": rounds,
        "pairs": pairs,
        "on_ms": on_s * 1e3,
        "off_ms": off_s * 1e3,
        "on_n": len(on),
        "off_n": len(off),
        "diff_pct": 100 * (on_s / off_s - 1),
        **inloop,
        "per_step_us": per_step_us,
        "per_step_pct": 100 * per_step_us / inloop["step_us"],
    }


GUARD_INLOOP_STEPS = 300


def guards_in_loop(spec_file: Path, newest: Path) -> dict:
    """Each guard timed by itself where it runs: between the real training steps (forward, backward, AdamW) of the
    same model and batch in this process, one thread as the jobs have: the watchdog's progress call, the non-finite
    check of the global grad norm, whether a checkpoint is due, and the checks before each checkpoint (finite weights:
    model and EMA checksums; room: the newest checkpoint's bytes against the disk's free bytes) spread over
    checkpoint.every steps. Means, as a step pays every one of them."""
    import copy

    from model.diffusion import diffusion_loss, make_noise_scheduler
    from orchestrator.components.model import build_model
    from orchestrator.components.model_input import pixel_input
    from orchestrator.data.loader import DigitsDataset
    from orchestrator.specs.job import load_spec
    from orchestrator.train.watchdog import HangWatchdog

    spec = load_spec(spec_file)
    threads = torch.get_num_threads()
    torch.set_num_threads(spec.resources.threads_per_process or 1)
    torch.manual_seed(0)
    data = DigitsDataset(spec.data.resolution)
    model = build_model(spec, pixel_input(spec, num_classes=10))
    ema = copy.deepcopy(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.train.learning_rate)
    d = spec.diffusion
    scheduler = make_noise_scheduler(d.num_train_timesteps, d.beta_schedule, d.beta_start, d.beta_end)
    watchdog = HangWatchdog(spec.resources.hang_timeout_s, lambda message: None)
    every = spec.checkpoint.every
    spent = {"progress": [], "nonfinite": [], "due": [], "step": []}
    try:
        for step in range(1, GUARD_WARMUP + GUARD_INLOOP_STEPS + 1):
            began = time.perf_counter()
            index = torch.randint(0, len(data), (spec.train.global_batch_size,))
            loss = diffusion_loss(model, data.images[index], data.labels[index], scheduler)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
            checked = time.perf_counter()
            skip = not torch.isfinite(grad_norm)
            nonfinite = time.perf_counter() - checked
            if not skip:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            reported = time.perf_counter()
            watchdog.progress(step)
            progress = time.perf_counter() - reported
            asked = time.perf_counter()
            due = step % every == 0
            due_s = time.perf_counter() - asked
            if step > GUARD_WARMUP and not due:
                spent["nonfinite"].append(nonfinite)
                spent["progress"].append(progress)
                spent["due"].append(due_s)
                spent["step"].append(time.perf_counter() - began)
    finally:
        watchdog.close()

    def checkpoint_checks():
        ema_sum = sum(float(p.detach().double().sum()) for p in ema.parameters())
        model_sum = sum(float(p.detach().double().sum()) for p in model.parameters())
        return ema_sum + model_sum, folder_bytes(newest) < shutil.disk_usage(newest).free

    checkpoint_us = microseconds(checkpoint_checks, repeat=200) / every
    torch.set_num_threads(threads)
    return {
        "progress_us": statistics.mean(spent["progress"]) * 1e6,
        "progress_median_us": statistics.median(spent["progress"]) * 1e6,
        "progress_max_us": max(spent["progress"]) * 1e6,
        "nonfinite_us": statistics.mean(spent["nonfinite"]) * 1e6,
        "due_us": statistics.mean(spent["due"]) * 1e6,
        "checkpoint_us": checkpoint_us,
        "step_us": statistics.mean(spent["step"]) * 1e6,
        "inloop_steps": len(spent["step"]),
        "every": every,
        "params": sum(p.numel() for p in model.parameters()),
    }


def overhead_py() -> str:
    """What bench/overhead.py says (one short round): orch's step time vs a bare PyTorch loop."""
    try:
        result = subprocess.run(
            [sys.executable, str(REPO / "bench" / "overhead.py"), "--steps", "100", "--rounds", "1"],
            capture_output=True,
            text=True,
            timeout=180,
        )
    except subprocess.TimeoutExpired:
        return "bench/overhead.py did not finish in 180 s (skipped)"
    if result.returncode != 0:
        return f"bench/overhead.py exited {result.returncode}: {result.stderr.strip()[-300:]}"
    return result.stdout.strip()


# ---------------------------------------------------------------------------------------------------- report


def cell(value) -> str:
    return "n/a" if value is None else f"{value:,}" if isinstance(value, int) else str(value)


def report(results: list[Result], guards: dict | None, overhead: str | None, command: str, wall_s: float) -> str:
    node, cpus = platform.node(), os.cpu_count()
    usable = len(os.sched_getaffinity(0))
    lines = [
        "# orch fault suite, injected for real on CPU",
        "",
        f"Machine: `{node}`, {cpus} CPUs ({usable} usable), torch {torch.__version__}, Python "
        f"{platform.python_version()}; {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}.",
        f"Command: `{command}` ({wall_s:.0f} s wall).",
        "",
        "| fault | survived | steps lost | bytes of checkpoints lost | detail |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        survived = "yes" if r.survived else ("not injected" if not r.injected else "no")
        lines.append(f"| {r.fault} | {survived} | {cell(r.steps_lost)} | {cell(r.bytes_lost)} | {r.detail} |")
    steps = sum(r.steps_lost or 0 for r in results)
    lost = sum(r.bytes_lost or 0 for r in results)
    lines += [
        "",
        f"Goal: faults tried {len(results)}, survived {sum(r.survived for r in results)}, steps lost total {steps}, "
        f"bytes of checkpoints lost total {lost:,}.",
        "",
        "Steps lost: the steps trained after the checkpoint a job resumed from and done again (SIGKILL, hang), the "
        "updates skipped (NaN), else the steps the job did not finish. Bytes lost: complete checkpoints that existed "
        "before the fault and are missing or changed after it (checkpoint.keep high enough that nothing is pruned).",
    ]
    hang = next((r for r in results if r.figures), None)
    lines += ["", "## (a) A hang: detection and training again", ""]
    if hang is not None:
        f = hang.figures
        lines.append(
            f"SIGSTOP of rank 1 of 2 (torchrun, resources.hang_timeout_s 10, watchdog polling every 1 s): the watchdog "
            f"logged the hang {f['detect_s']:.1f} s after the stop; the job logged a training step again "
            f"{f['again_s']:.1f} s after the stop ({f['restart_s']:.1f} s from detection: torchrun stops both ranks, "
            "starts two new ones, they load the checkpoint and take a step)."
        )
    else:
        lines.append("Not measured (the hang fault did not run to its end).")
    lines += ["", "## (b) Per-step cost of the guards", ""]
    if guards is not None:
        g = guards
        rounds = ", ".join(f"{a:.2f}/{b:.2f}" for a, b in g["pairs"])
        lines += [
            f"Job: DiT hidden 64, depth 4 ({g['params']:,} parameters) on the digits, batch 32, 1 thread, 300 steps, "
            f"checkpoint every {g['every']}, log_every 10; step times from the job log (`s/step`, checkpoints "
            f"excluded), the first {GUARD_WARMUP} steps left out; {g['rounds']} alternated rounds (watchdog on "
            "first).",
            "",
            "| run | median s/step | windows |",
            "|---|---|---|",
            f"| resources.hang_timeout_s 1800 (default, watchdog on) | {g['on_ms']:.2f} ms | {g['on_n']} |",
            f"| resources.hang_timeout_s empty (`--set resources.hang_timeout_s=null`: no watchdog) | "
            f"{g['off_ms']:.2f} ms | {g['off_n']} |",
            "",
            f"Difference of the medians: {g['diff_pct']:+.2f} % (per round, on/off ms: {rounds}). The jobs share two "
            "cores with other work, so each guard is also timed by itself between real training steps:",
            "",
            f"| guard, timed in a training loop of the same model ({g['inloop_steps']} steps) | mean per step |",
            "|---|---|",
            f"| hang watchdog `progress()` (re-arms faulthandler's C backstop every 5 s) | "
            f"{g['progress_us']:.1f} us (median {g['progress_median_us']:.1f}, max {g['progress_max_us']:.0f}) |",
            f"| non-finite check of the global grad norm | {g['nonfinite_us']:.1f} us |",
            f"| checkpoint due? (`step % every`) | {g['due_us']:.2f} us |",
            f"| checks before a checkpoint (finite model/EMA checksums, room on disk), / {g['every']} steps | "
            f"{g['checkpoint_us']:.1f} us |",
            f"| **all guards** (step {g['step_us'] / 1e3:.2f} ms in this loop) | "
            f"**{g['per_step_us']:.1f} us = {g['per_step_pct']:.2f} % of a step** |",
            "",
            f"Goal: guards at most 1 % of a step: {'met' if g['per_step_pct'] <= 1 else 'NOT met'} by the guards timed "
            f"in the loop ({g['per_step_pct']:.2f} %); between the job medians {g['diff_pct']:+.2f} % "
            f"({'within' if g['diff_pct'] <= 1 else 'NOT within'} 1 %).",
        ]
    else:
        lines.append("Not measured (--no-guards).")
    if overhead is not None:
        lines += ["", "## bench/overhead.py (orch vs a bare PyTorch loop, one short round)", "", "```", overhead, "```"]
    return "\n".join(lines) + "\n"


def run_fault(results: list[Result], name: str, call) -> None:
    began = time.monotonic()
    print(f"[{time.strftime('%H:%M:%S')}] {name} ...", flush=True)
    try:
        result = call()
    except BaseException as err:  # noqa: BLE001 - pytest.fail (the MLflow fixture) raises a BaseException
        if isinstance(err, KeyboardInterrupt):
            raise
        traceback.print_exc()
        result = Result(name, False, detail=f"the bench failed: {type(err).__name__}: {str(err)[:300]}")
    result.detail += f" [{time.monotonic() - began:.0f} s]"
    print(f"    survived: {'yes' if result.survived else 'NO'}; {result.detail}", flush=True)
    results.append(result)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "faults-cpu.md"))
    parser.add_argument("--guard-rounds", type=int, default=2, help="alternated watchdog on/off job pairs")
    parser.add_argument("--no-guards", action="store_true", help="skip the guard overhead jobs")
    parser.add_argument(
        "--overhead-py", action="store_true", help="also run one short round of bench/overhead.py (minutes on 2 cores)"
    )
    args = parser.parse_args()
    command = " ".join([".venv/bin/python", "bench/faults.py", *sys.argv[1:]])
    began = time.monotonic()
    os.environ["MLFLOW_TRACKING_URI"] = ""  # the jobs' own stores: a user's server is never written to
    results: list[Result] = []
    guards = overhead = None
    with tempfile.TemporaryDirectory(prefix="orch-faults-") as tmp:
        work = Path(tmp)
        for name in ("sigkill", "hang", "nan", "badimage", "disk", "tracking", "guards"):
            (work / name).mkdir()
        # the hang's uninterrupted reference trains while faults whose timings do not matter run
        hang_reference, hang_spec = start_hang_reference(work / "hang")
        try:
            run_fault(results, "SIGKILL + resume", lambda: fault_sigkill(work / "sigkill"))
            run_fault(results, "NaN", lambda: fault_nan(work / "nan"))
            run_fault(results, "corrupt image", lambda: fault_bad_image(work / "badimage"))
            measured = job_appeared(work / "sigkill" / "reference")
            if measured is None or not (measured / "checkpoints" / "step-0000050").is_dir():
                results.append(Result("disk full while checkpointing", False, detail="not run: no measured checkpoint"))
            else:
                run_fault(results, "disk full", lambda: fault_disk_full(work / "disk", measured))
            run_fault(results, "hang", lambda: fault_hang(work / "hang", hang_reference, hang_spec))
        finally:
            stop_job(hang_reference, job_appeared(work / "hang" / "reference"))
        run_fault(results, "tracking outage", lambda: fault_tracking(work / "tracking"))
        if not args.no_guards:
            print(f"[{time.strftime('%H:%M:%S')}] guard overhead ...", flush=True)
            guards = guard_overhead(work / "guards", args.guard_rounds)
        if args.overhead_py:
            print(f"[{time.strftime('%H:%M:%S')}] bench/overhead.py ...", flush=True)
            overhead = overhead_py()
    text = report(results, guards, overhead, command, time.monotonic() - began)
    print()
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"written to {out}")
    return 0 if all(r.survived for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
