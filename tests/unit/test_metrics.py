"""Sample-quality metrics from features (orchestrator/evaluation/metrics.py) and the digits' feature network."""

import numpy as np
import pytest
import scipy.linalg
import scipy.spatial.distance
import torch

from orchestrator.evaluation.digits import digit_features_and_predictions, digits_images, load_digit_classifier
from orchestrator.evaluation.metrics import FeatureStats, frechet_distance, kernel_distance, precision_recall

pytestmark = pytest.mark.usefixtures("one_thread")  # in-process torch on a busy 2-core machine


def reference_frechet_distance(a: FeatureStats, b: FeatureStats) -> float:
    """pytorch-fid's calculate_frechet_distance: the matrix square root by scipy.linalg.sqrtm."""
    diff = a.mean - b.mean
    covmean = scipy.linalg.sqrtm(a.cov @ b.cov)
    covmean = covmean.real
    return float(diff @ diff + np.trace(a.cov) + np.trace(b.cov) - 2 * np.trace(covmean))


def correlated(rng: np.random.Generator, n: int, d: int, scale: float, shift: float) -> np.ndarray:
    mixing = rng.normal(size=(d, d)) * scale / np.sqrt(d)
    return rng.normal(size=(n, d)) @ mixing + shift


@pytest.mark.parametrize("d", [8, 64])
def test_frechet_distance_equals_pytorch_fids_formula(d):
    rng = np.random.default_rng(d)
    a = FeatureStats.of(correlated(rng, 600, d, 1.0, 0.0))
    b = FeatureStats.of(correlated(rng, 500, d, 1.5, 0.3))
    ours, reference = frechet_distance(a, b), reference_frechet_distance(a, b)
    assert ours > 0
    assert ours == pytest.approx(reference, rel=1e-6)
    assert frechet_distance(b, a) == pytest.approx(ours, rel=1e-6)


def test_frechet_distance_of_equal_covariances_is_the_squared_mean_shift():
    rng = np.random.default_rng(1)
    features = correlated(rng, 400, 16, 1.0, 0.0)
    shift = np.full(16, 0.5)
    a, b = FeatureStats.of(features), FeatureStats.of(features + shift)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    assert frechet_distance(a, b) == pytest.approx(float(shift @ shift), rel=1e-8)


def test_statistics_survive_the_npz_layout_of_the_adm_suite(tmp_path):
    stats = FeatureStats.of(np.random.default_rng(2).normal(size=(50, 4)))
    stats.save(tmp_path / "ref.npz")
    loaded = FeatureStats.load(tmp_path / "ref.npz")
    assert np.array_equal(loaded.mean, stats.mean) and np.array_equal(loaded.cov, stats.cov) and loaded.count == 50
    np.savez(tmp_path / "other.npz", images=np.zeros((2, 8, 8, 3)))
    with pytest.raises(ValueError, match="no reference statistics"):
        FeatureStats.load(tmp_path / "other.npz")


def test_kid_is_near_zero_for_one_distribution_and_grows_with_the_difference():
    rng = np.random.default_rng(3)
    same = kernel_distance(rng.normal(size=(400, 16)), rng.normal(size=(400, 16)), subsets=20, subset_size=200)
    near = kernel_distance(rng.normal(size=(400, 16)), rng.normal(0.2, 1, size=(400, 16)), subsets=20, subset_size=200)
    far = kernel_distance(rng.normal(size=(400, 16)), rng.normal(1.0, 1, size=(400, 16)), subsets=20, subset_size=200)
    assert abs(same.mean) < 3 * same.std + 1e-3  # unbiased: zero in expectation
    assert 0 < near.mean < far.mean


def test_kid_of_one_subset_equals_the_unbiased_mmd_written_out():
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(5, 3)), rng.normal(0.5, 1, size=(5, 3))

    def k(u, v):
        return (u @ v / 3 + 1) ** 3

    m = 5
    within_x = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    within_y = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    across = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    kid = kernel_distance(x, y, subsets=1, subset_size=5)  # every row, in some order: the order does not matter
    assert kid.mean == pytest.approx(within_x + within_y - 2 * across, rel=1e-10)


def test_metrics_refuse_features_they_cannot_compare():
    with pytest.raises(ValueError, match="different widths"):
        frechet_distance(FeatureStats.of(np.ones((3, 2)) + np.eye(3, 2)), FeatureStats.of(np.eye(4, 3)))
    with pytest.raises(ValueError, match="at least 2"):
        kernel_distance(np.ones((1, 2)), np.ones((5, 2)))
    with pytest.raises(ValueError, match="N >= 2"):
        FeatureStats.of(np.ones((1, 4)))


def reference_precision_recall(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    """Improved precision and recall with every distance at once (scipy's cdist)."""
    real_radii = np.sort(scipy.spatial.distance.cdist(real, real), axis=1)[:, k]  # column 0: the point itself
    fake_radii = np.sort(scipy.spatial.distance.cdist(fake, fake), axis=1)[:, k]
    across = scipy.spatial.distance.cdist(fake, real)  # (M, N)
    precision = (across <= real_radii[None, :]).any(axis=1).mean()
    recall = (across.T <= fake_radii[None, :]).any(axis=1).mean()
    return float(precision), float(recall)


def test_precision_and_recall_of_a_set_against_itself_are_one_and_of_far_apart_sets_zero():
    rng = np.random.default_rng(5)
    real = rng.normal(size=(50, 8))
    assert precision_recall(real, real) == (1.0, 1.0)
    assert precision_recall(real, rng.normal(100, 1, size=(40, 8))) == (0.0, 0.0)


def test_precision_and_recall_of_points_on_a_line():
    # k=1: every ball reaches the nearest other point of its own set. The real balls have radius 1 and cover
    # [-1, 4]: 2 of the 4 generated points are inside (precision 0.5). The generated balls have radius 1 too and
    # cover [-0.5, 2.5] and [99, 102]: 3 of the 4 real points are inside (recall 0.75).
    real = np.array([[0.0], [1.0], [2.0], [3.0]])
    fake = np.array([[0.5], [1.5], [100.0], [101.0]])
    assert precision_recall(real, fake, k=1) == (0.5, 0.75)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_precision_and_recall_in_row_blocks_equal_them_computed_at_once(k):
    rng = np.random.default_rng(k)
    real, fake = rng.normal(size=(300, 16)), rng.normal(0.4, 1.2, size=(250, 16))
    precision, recall = precision_recall(real, fake, k=k, batch_size=7)
    assert (precision, recall) == reference_precision_recall(real, fake, k)
    assert 0 < precision < 1 and 0 < recall < 1
    assert precision_recall(real, fake, k=k, batch_size=1000) == (precision, recall)


def test_precision_and_recall_need_more_points_than_neighbours():
    with pytest.raises(ValueError, match="at least 4 features on each side"):
        precision_recall(np.ones((3, 2)), np.ones((10, 2)))
    with pytest.raises(ValueError, match="at least 4 features on each side"):
        precision_recall(np.ones((10, 2)), np.ones((3, 2)))
    with pytest.raises(ValueError, match="one width"):
        precision_recall(np.ones((10, 2)), np.ones((10, 3)))


def test_the_digit_classifier_reads_digits_and_its_distance_tells_digits_from_noise(tmp_path):
    model, held_out_accuracy = load_digit_classifier(tmp_path)
    assert held_out_accuracy >= 0.95
    again, _ = load_digit_classifier(tmp_path)  # from the cache, not trained again
    assert all(torch.equal(p, q) for p, q in zip(model.state_dict().values(), again.state_dict().values()))

    images, labels = digits_images()
    features, predictions = digit_features_and_predictions(model, images)
    assert features.shape == (len(labels), 128)
    assert (predictions == labels.numpy()).mean() >= 0.95
    halves = frechet_distance(FeatureStats.of(features[::2]), FeatureStats.of(features[1::2]))
    noise, _ = digit_features_and_predictions(model, torch.rand(900, 1, 8, 8) * 2 - 1)
    to_noise = frechet_distance(FeatureStats.of(features), FeatureStats.of(noise))
    assert halves * 20 < to_noise, (halves, to_noise)
    upscaled, _ = digit_features_and_predictions(model, torch.nn.functional.interpolate(images[:50], size=16))
    assert upscaled.shape == (50, 128)  # other resolutions are read at 8x8
