"""A disk that fills up while a checkpoint is written: the previous checkpoint stays intact and the error says so."""

import json
import os
import shutil
import subprocess

import pytest

from tests.helpers import log_text, only_job, orch, state, tiny_spec

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


def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(tmp_path, small_disk):
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a tmpfs needs root")
    spec = tiny_spec(tmp_path, train={"steps": 4}, checkpoint={"every": 2, "keep": 3}, sample={"every": 1000})

    # Measure what a job directory with one checkpoint takes, then give the job room for ~1.5 of them.
    measure_root = tmp_path / "measure"
    orch("submit", str(spec), "--set", "train.steps=2", root=measure_root, check=True)
    one_checkpoint = folder_bytes(only_job(measure_root))
    root = small_disk(int(one_checkpoint * 1.5))

    result = orch("submit", str(spec), root=root)
    job = only_job(root)
    assert result.returncode == 1, log_text(job)
    record = state(job)
    assert record["state"] == "failed"
    assert "step-0000004 could not be written (No space left on device)" in record["message"]
    assert "the previous checkpoint step-0000002 is intact" in record["message"]
    assert record["checkpoint_step"] == 2

    checkpoints = job / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step-0000002"]  # no half-written step-4
    assert (checkpoints / "latest").read_text().strip() == "step-0000002"
    assert json.loads((checkpoints / "step-0000002" / "trainer_state.json").read_text())["step"] == 2
    reference = only_job(measure_root) / "checkpoints" / "step-0000002"
    for name in ("model.safetensors", "ema.safetensors", "optimizer.bin"):
        assert (checkpoints / "step-0000002" / name).read_bytes() == (reference / name).read_bytes(), name
