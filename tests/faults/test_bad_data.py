"""A corrupt image met while training: replaced in its batch, warned about by name and counted (data.on_bad_sample
skip); past data.max_bad_samples the job fails naming it, and a resume with a higher limit finishes the job."""

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from tests.helpers import log_text, only_job, orch, state, tiny_spec

pytestmark = pytest.mark.slow


def digit_folder(root):
    """32 real 8x8 digits as RGB PNGs, 16 per class folder; one of them is a corrupt file."""
    digits = load_digits()
    for label in (0, 1):
        folder = root / f"class{label}"
        folder.mkdir(parents=True)
        images = digits.images[digits.target == label][:16]
        for n, image in enumerate(images):
            pixels = (image * 255 / 16).astype(np.uint8)
            Image.fromarray(np.stack([pixels] * 3, axis=-1)).save(folder / f"{n:02d}.png")
    corrupt = root / "class1" / "07.png"
    corrupt.write_bytes(corrupt.read_bytes()[:40])  # a PNG cut in its header: unreadable
    return corrupt


def test_a_corrupt_image_is_replaced_and_counted_and_too_many_fail_the_job_until_resumed_with_a_higher_limit(tmp_path):
    corrupt = digit_folder(tmp_path / "images")
    # 32 images, 8 per step: the corrupt one is read once per epoch of 4 steps, at steps that do not depend on the limit
    spec = tiny_spec(
        tmp_path,
        data={"source": "image_folder", "path": "images", "resolution": 8, "max_bad_samples": 2},
        train={"steps": 16, "global_batch_size": 8},
        checkpoint={"every": 2, "keep": 2},
        sample={"every": 1000, "classes": [0, 1]},
    )
    root = tmp_path / "jobs"

    failed = orch("submit", str(spec), root=root)
    job = only_job(root)
    record = state(job)
    assert failed.returncode != 0 and record["state"] == "failed", log_text(job)
    assert "3 unreadable samples on rank 0 in this run, more than data.max_bad_samples 2" in record["message"]
    assert f"cannot read image {corrupt}" in record["message"]
    assert record["bad_samples"] == 2  # counted at every logged step before the third one stopped it
    assert 8 <= record["checkpoint_step"] < 12
    warnings = [line for line in log_text(job).splitlines() if "an unreadable sample was replaced in its batch" in line]
    assert len(warnings) == 3 and all(str(corrupt) in line for line in warnings)

    resumed = orch(
        "resume", job.name, "--set", "data.max_bad_samples=1000", "--allow-spec-change", root=root, timeout=300
    )
    record = state(job)
    assert resumed.returncode == 0 and record["state"] == "succeeded", log_text(job)
    assert record["step"] == 16 and record["checkpoint_step"] == 16
    assert 1 <= record["bad_samples"] <= 2  # this run's: the epochs after the checkpoint it resumed from
    status = orch("status", job.name, root=root, check=True).stdout
    assert "unreadable sample(s) replaced" in status
