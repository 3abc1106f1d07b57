"""A disk that fills up: the previous checkpoint stays intact, the error names the bytes needed, and with
checkpoint.on_write_error continue training goes on and saves again once there is room."""

import json
import os
import re
import shutil
import subprocess
import time

import pytest

from tests.helpers import log_text, only_job, orch, start_orch, state, tiny_spec

pytestmark = pytest.mark.slow


def folder_bytes(path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of a chosen size (needs root, as CI and this project's machines have)."""
    mounts = []

    def mount(size_bytes: int):
        target = tmp_path / f"disk{len(mounts)}"
        target.mkdir()
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(target)], capture_output=True, text=True
        )
        if result.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs here ({result.stderr.strip() or 'not root'})")
        mounts.append(target)
        return target

    yield mount
    for target in mounts:
        subprocess.run(["umount", "-l", str(target)], check=False)


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """A job directory with one checkpoint (step 2) of the spec both tests train: what it and its checkpoint take."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a tmpfs needs root")
    folder = tmp_path_factory.mktemp("measure")
    spec = tiny_spec(folder, train={"steps": 4}, checkpoint={"every": 2, "keep": 3}, sample={"every": 1000})
    orch("submit", str(spec), "--set", "train.steps=2", root=folder / "jobs", check=True)
    return spec, only_job(folder / "jobs")


def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(measured, small_disk):
    spec, measured_job = measured
    root = small_disk(int(folder_bytes(measured_job) * 1.5))  # room for ~1.5 job directories of one checkpoint

    result = orch("submit", str(spec), root=root)
    job = only_job(root)
    assert result.returncode == 1, log_text(job)
    record = state(job)
    assert record["state"] == "failed"
    assert "step-0000004 could not be written (No space left on device)" in record["message"]
    assert "the previous checkpoint step-0000002 is intact" in record["message"]
    # checked before the write against the newest checkpoint's size: the message says how much is needed and free
    needed, free = map(
        float, re.search(r"needs about ([\d.]+) MB .* and ([\d.]+) MB are free", record["message"]).groups()
    )
    step2_mb = folder_bytes(job / "checkpoints" / "step-0000002") / 1e6
    assert abs(needed - step2_mb) < 0.1 and free < needed, record["message"]
    assert record["checkpoint_step"] == 2

    checkpoints = job / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step-0000002"]  # no half-written step-4
    assert (checkpoints / "latest").read_text().strip() == "step-0000002"
    assert json.loads((checkpoints / "step-0000002" / "trainer_state.json").read_text())["step"] == 2
    reference = measured_job / "checkpoints" / "step-0000002"
    for name in ("model.safetensors", "ema.safetensors", "optimizer.bin"):
        assert (checkpoints / "step-0000002" / name).read_bytes() == (reference / name).read_bytes(), name


def test_full_disk_with_on_write_error_continue_trains_on_and_saves_once_there_is_room(measured, small_disk):
    spec, measured_job = measured
    one_checkpoint = folder_bytes(measured_job / "checkpoints" / "step-0000002")
    root = small_disk(int(folder_bytes(measured_job) + one_checkpoint * 1.5))  # room to write one while one is kept
    filler = root / "filler"

    overrides = ["train.steps=200", "checkpoint.keep=1", "checkpoint.on_write_error=continue"]
    job_process = start_orch("submit", str(spec), *(arg for o in overrides for arg in ("--set", o)), root=root)
    deadline = time.monotonic() + 120
    while not list(root.glob("*/checkpoints/step-*")) and time.monotonic() < deadline:
        time.sleep(0.02)
    filler.write_bytes(b"\0" * int(one_checkpoint * 1.2))  # another user's files: no room for the next checkpoint
    job = only_job(root)
    while "training goes on" not in log_text(job) and time.monotonic() < deadline:
        time.sleep(0.02)
    filler.unlink()  # space freed: the next checkpoints are written again
    job_process.communicate(timeout=120)

    assert job_process.returncode == 0, log_text(job)
    record = state(job)
    assert record["state"] == "succeeded" and record["checkpoint_step"] == 200
    assert record["checkpoint_failures"] >= 1
    assert "could not be written (No space left on device)" in record["checkpoint_error"]
    assert "checkpoint.on_write_error: continue" in log_text(job)
    checkpoints = job / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step-0000200"]
