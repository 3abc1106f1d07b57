"""The real images an evaluation compares with (orchestrator/evaluation/reference.py): ADM reference batches checked
from their headers before a job starts, image folders, the training data, and the cache key of their features."""

import numpy as np
import pytest
from PIL import Image

from orchestrator.evaluation.reference import (
    ReferenceError,
    cache_file,
    read_adm_batch,
    reference_problems,
    reference_set,
    spread,
)
from orchestrator.specs.job import parse_spec

SPEC = """
name: ref
data: {{source: digits, resolution: 32}}
model: {{patch_size: 8}}
train: {{steps: 10}}
eval: {{every: 5, metrics: [{metrics}], num_samples: {num}, reference: {reference}, reference_samples: 50}}
"""


def spec_with(reference, metrics="fid", num=8):
    return parse_spec(SPEC.format(reference=reference, metrics=metrics, num=num))


def adm_batch(path, count=12, side=32, stats=True, dtype=np.uint8):
    images = np.random.default_rng(0).integers(0, 256, (count, side, side, 3)).astype(dtype)
    arrays = {"arr_0": images}
    if stats:
        arrays |= {"mu": np.zeros(2048), "sigma": np.eye(2048)}
    np.savez(path, **arrays)
    return path


def test_an_adm_batch_is_read_from_its_header_and_its_statistics_are_taken_as_they_are(tmp_path):
    path = adm_batch(tmp_path / "ref.npz")
    batch = read_adm_batch(path)
    assert (batch.count, batch.side, batch.has_inception_stats) == (12, 32, True)
    references = reference_set(spec_with(path))
    assert references.count == 12 and references.inception_stats.mean.shape == (2048,)
    assert references.read([3, 1]).shape == (2, 32, 32, 3)
    np.testing.assert_array_equal(references.read([3])[0], np.load(path)["arr_0"][3])
    assert not reference_problems(spec_with(path))


@pytest.mark.parametrize(
    ("write", "message"),
    [
        (lambda p: p.write_bytes(b"not a zip"), "is not a readable .npz"),
        (lambda p: np.savez(p, images=np.zeros((2, 32, 32, 3), np.uint8)), "has no arr_0"),
        (lambda p: adm_batch(p, dtype=np.float32), "holds uint8 images"),
        (lambda p: adm_batch(p, side=16), "holds 16x16 images and the job draws 32x32"),
        (lambda p: None, "does not exist"),
    ],
)
def test_a_reference_batch_that_cannot_serve_is_named_before_the_job_starts(tmp_path, write, message):
    path = tmp_path / "ref.npz"
    write(path)
    problems = reference_problems(spec_with(path))
    assert len(problems) == 1 and message in problems[0] and str(path) in problems[0]


def test_precision_recall_needs_no_more_samples_than_the_reference_batch_holds(tmp_path):
    path = adm_batch(tmp_path / "ref.npz", count=12)
    assert not reference_problems(spec_with(path, "precision_recall", num=12))
    (problem,) = reference_problems(spec_with(path, "precision_recall", num=13))
    assert "lower eval.num_samples to 12" in problem


def test_a_folder_of_images_with_or_without_class_folders_is_a_reference(tmp_path):
    for folder in (tmp_path / "flat", tmp_path / "classes" / "cat"):
        folder.mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (40, 48), (i * 50,) * 3).save(folder / f"{i}.png")
    for root in (tmp_path / "flat", tmp_path / "classes"):
        references = reference_set(spec_with(root))
        assert references.count == 3
        pixels = references.read([0, 2])
        # centre-cropped to the resolution, in the job's channels (the digits are grey)
        assert pixels.shape == (2, 32, 32, 1) and pixels.dtype == np.uint8
        assert pixels[1, 16, 16, 0] == 100
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReferenceError, match="has no images"):
        reference_set(spec_with(tmp_path / "empty"))


def test_the_cache_key_changes_with_the_images_and_the_network(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (32, 32)).save(folder / "a.png")
    first = reference_set(spec_with(folder))
    assert cache_file(first, "inception:w1") == cache_file(reference_set(spec_with(folder)), "inception:w1")
    assert cache_file(first, "inception:w1") != cache_file(first, "inception:w2")
    Image.new("RGB", (32, 32), (255, 255, 255)).save(folder / "b.png")
    assert cache_file(reference_set(spec_with(folder)), "inception:w1") != cache_file(first, "inception:w1")


def test_the_training_digits_reference_is_spread_over_the_data():
    references = reference_set(spec_with("null"))
    assert references.count == 50 and "digits" in references.description
    assert spread(1797, 50)[:3] == [0, 35, 71] and spread(10, 50) == list(range(10))
