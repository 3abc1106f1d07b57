"""The sample-quality metrics of the field, from features: Fréchet distance (FID, FD-DINOv2, the digits' FD),
the kernel inception distance (KID) and improved precision and recall, in float64 NumPy.

Written here rather than taken from torchmetrics or torch-fidelity: both compute these only behind their own
Inception network, and orch needs them on any feature extractor (Inception-v3, DINOv2, the digit classifier)
and on features gathered from many ranks. The formulas are the published ones:

- Fréchet distance (Heusel et al. 2017): |mu_1 - mu_2|^2 + tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2)). tr((S_1 S_2)^(1/2))
  is the sum of the square roots of the eigenvalues of S_1 S_2 (real and non-negative for covariance matrices, up
  to rounding), the form torchmetrics uses; pytorch-fid's scipy.linalg.sqrtm form gives the same number
  (tests/unit/test_metrics.py holds them together).
- KID (Binkowski et al. 2018): the unbiased MMD^2 with the kernel k(x, y) = (x.y / d + 1)^3, averaged over
  random subsets, as torch-fidelity reports it (mean and standard deviation over subsets).
- Improved precision and recall (Kynkäänniemi et al. 2019): each real feature's ball reaches its k-th nearest
  other real feature; precision is the share of generated features inside at least one real ball (fidelity), recall
  the share of real features inside at least one generated ball (coverage). k = 3, as the ADM suite's evaluator.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class FeatureStats:
    """The mean (D,) and covariance (D, D) of a set of features, and how many there were: what FID compares."""

    mean: np.ndarray
    cov: np.ndarray
    count: int

    @classmethod
    def of(cls, features: np.ndarray) -> FeatureStats:
        """Statistics of features (N, D), N >= 2, in float64 (the covariance with N - 1 in the denominator, as
        pytorch-fid and the ADM suite compute it)."""
        features = np.asarray(features, dtype=np.float64)
        if features.ndim != 2 or len(features) < 2:
            raise ValueError(f"features must be (N, D) with N >= 2, got shape {features.shape}")
        return cls(mean=features.mean(axis=0), cov=np.cov(features, rowvar=False), count=len(features))

    def save(self, path) -> None:
        """An .npz with `mu` and `sigma`, the layout of pytorch-fid's and the ADM suite's statistics files."""
        np.savez(path, mu=self.mean, sigma=self.cov, count=self.count)

    @classmethod
    def load(cls, path) -> FeatureStats:
        with np.load(path) as data:
            if "mu" not in data or "sigma" not in data:
                raise ValueError(f"{path} holds no reference statistics (it needs arrays 'mu' and 'sigma')")
            mean, cov = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
            count = int(data["count"]) if "count" in data else 0
        if mean.ndim != 1 or cov.shape != (len(mean), len(mean)):
            raise ValueError(f"{path}: 'mu' {mean.shape} and 'sigma' {cov.shape} are not a mean and its covariance")
        return cls(mean=mean, cov=cov, count=count)


def frechet_distance(a: FeatureStats, b: FeatureStats) -> float:
    """The Fréchet distance between the Gaussians fitted to two feature sets (FID on Inception features)."""
    if a.mean.shape != b.mean.shape:
        raise ValueError(f"the feature sets have different widths: {a.mean.shape[0]} and {b.mean.shape[0]}")
    diff = a.mean - b.mean
    # eigenvalues of S_a S_b: real and >= 0 in exact arithmetic; rounding leaves tiny imaginary parts and
    # negatives, which carry no distance.
    eigenvalues = np.linalg.eigvals(a.cov @ b.cov)
    trace_sqrt = np.sqrt(np.clip(eigenvalues.real, 0, None)).sum()
    return float(diff @ diff + np.trace(a.cov) + np.trace(b.cov) - 2 * trace_sqrt)


@dataclass(frozen=True)
class KernelDistance:
    """KID: the mean and standard deviation of the unbiased MMD^2 over subsets."""

    mean: float
    std: float


def kernel_distance(
    a: np.ndarray, b: np.ndarray, subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> KernelDistance:
    """KID between features a (N, D) and b (M, D): the unbiased MMD^2 with the cubic polynomial kernel on `subsets`
    random subsets of `subset_size` rows of each (drawn without replacement within a subset, from `seed`)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"features must be (N, D) and (M, D) of one width, got {a.shape} and {b.shape}")
    m = min(subset_size, len(a), len(b))
    if m < 2:
        raise ValueError(f"KID needs at least 2 features on each side, got {len(a)} and {len(b)}")
    rng = np.random.default_rng(seed)
    width = a.shape[1]
    values = []
    for _ in range(subsets):
        x = a[rng.choice(len(a), m, replace=False)]
        y = b[rng.choice(len(b), m, replace=False)]
        k_xx = (x @ x.T / width + 1) ** 3
        k_yy = (y @ y.T / width + 1) ** 3
        k_xy = (x @ y.T / width + 1) ** 3
        within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
        values.append(within - 2 * k_xy.mean())
    return KernelDistance(mean=float(np.mean(values)), std=float(np.std(values)))


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3, batch_size: int = 1000) -> tuple[float, float]:
    """Improved precision and recall of generated features `fake` (M, D) against real features `real` (N, D), with
    balls reaching each point's k-th nearest neighbour in its own set. Distances are computed `batch_size` rows at a
    time, so memory holds batch_size x max(N, M) of them rather than N x M."""
    real, fake = np.asarray(real, dtype=np.float64), np.asarray(fake, dtype=np.float64)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"features must be (N, D) and (M, D) of one width, got {real.shape} and {fake.shape}")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if len(real) < k + 1 or len(fake) < k + 1:
        raise ValueError(
            f"precision and recall with k={k} need at least {k + 1} features on each side "
            f"(each point's k nearest others), got {len(real)} real and {len(fake)} generated"
        )
    real_squared_radii = kth_neighbour_squared_distances(real, k, batch_size)
    fake_squared_radii = kth_neighbour_squared_distances(fake, k, batch_size)
    precision = share_inside_balls(fake, real, real_squared_radii, batch_size)
    recall = share_inside_balls(real, fake, fake_squared_radii, batch_size)
    return precision, recall


def squared_distances(rows: np.ndarray, points: np.ndarray, points_squared_norms: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances (R, P) between rows (R, D) and points (P, D), through |a|^2 + |b|^2 - 2 a.b."""
    distances = (rows * rows).sum(axis=1)[:, None] + points_squared_norms[None, :] - 2 * rows @ points.T
    return np.maximum(distances, 0)  # rounding can leave tiny negatives


def kth_neighbour_squared_distances(points: np.ndarray, k: int, batch_size: int) -> np.ndarray:
    """Each point's squared distance (N,) to its k-th nearest other point of the same set."""
    squared_norms = (points * points).sum(axis=1)
    squared_radii = np.empty(len(points))
    for start in range(0, len(points), batch_size):
        distances = squared_distances(points[start : start + batch_size], points, squared_norms)
        # column k of the sorted row: column 0 is the point itself (or a duplicate of it, at the same distance 0)
        squared_radii[start : start + batch_size] = np.partition(distances, k, axis=1)[:, k]
    return squared_radii


def share_inside_balls(queries: np.ndarray, centres: np.ndarray, squared_radii: np.ndarray, batch_size: int) -> float:
    """The share of queries (M, D) within sqrt(squared_radii[i]) (inclusive) of at least one of centres (N, D)."""
    squared_norms = (centres * centres).sum(axis=1)
    inside = 0
    for start in range(0, len(queries), batch_size):
        distances = squared_distances(queries[start : start + batch_size], centres, squared_norms)
        inside += int((distances <= squared_radii[None, :]).any(axis=1).sum())
    return inside / len(queries)
