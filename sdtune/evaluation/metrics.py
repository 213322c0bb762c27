"""The numbers: FID and KID (torchmetrics, on features already extracted), Vendi, MS-SSIM diversity.

FID and KID are computed by torchmetrics' own metrics. Their `feature` module here is
`Precomputed`, which passes feature rows through, so features come from one extraction (or the
cache) and are reused for per-condition subsets and bootstrap resamples.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import nn

MS_SSIM_BETAS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # Wang et al. 2003, five scales
MS_SSIM_KERNEL = 11


class Precomputed(nn.Module):
    """The `feature` module for torchmetrics when the features are already extracted: rows pass through."""

    def __init__(self, dim: int):
        super().__init__()
        self.num_features = dim

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        # float64: torchmetrics returns FID in the features' dtype.
        return features.double()


def frechet_distance(real: torch.Tensor, fake: torch.Tensor) -> float:
    """FID between two feature sets (N, D), by torchmetrics' FrechetInceptionDistance."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    # Every process of a launch already holds all the features (extract_features gathers them);
    # torchmetrics' sync at compute() would gather them again, counting each image once per process.
    metric = FrechetInceptionDistance(feature=Precomputed(real.shape[1]), sync_on_compute=False)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    return float(metric.compute())


def fid_with_spread(real: torch.Tensor, fake: torch.Tensor, resamples: int = 10, seed: int = 0) -> dict:
    """FID and its bootstrap spread: the std of FID over `resamples` sets drawn with replacement (seeded).

    Resampled sets repeat rows, so their FIDs sit a little above the full-set value: the std
    says how much FID moves with the sample, not a confidence interval around it.
    """
    result = {"value": frechet_distance(real, fake), "n_real": len(real), "n_fake": len(fake)}
    if resamples > 0:
        rng = np.random.default_rng(seed)

        def draw(x: torch.Tensor) -> torch.Tensor:  # len(x) rows, with replacement
            return x[rng.integers(0, len(x), len(x))]

        values = [frechet_distance(draw(real), draw(fake)) for _ in range(resamples)]
        result.update(std=float(np.std(values, ddof=1)) if resamples > 1 else 0.0, bootstrap_resamples=resamples)
    return result


def kernel_inception_distance(real: torch.Tensor, fake: torch.Tensor, subsets: int = 100, subset_size: int = 1000,
                              seed: int = 0) -> dict:
    """KID (Binkowski et al. 2018): unbiased MMD^2 with kernel (x.y / d + 1)^3, mean and std over random subsets."""
    from torchmetrics.image.kid import KernelInceptionDistance

    size = min(subset_size, len(real), len(fake))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        metric = KernelInceptionDistance(feature=Precomputed(real.shape[1]), subsets=subsets, subset_size=size,
                                         sync_on_compute=False)  # as in frechet_distance
    metric.update(real, real=True)
    metric.update(fake, real=False)
    with torch.random.fork_rng():  # torchmetrics draws subsets from the global generator
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return {"mean": float(mean), "std": float(std), "subsets": subsets, "subset_size": size}


def vendi_score(features: torch.Tensor) -> float:
    """Vendi score (Friedman & Dieng 2023): exp of the Shannon entropy of the eigenvalues of K / n,
    K the cosine-similarity kernel. 1 = all samples alike, n = all orthogonal."""
    x = features.double()
    x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
    n, d = x.shape
    # K / n = X X^T / n has the non-zero eigenvalues of X^T X / n: the smaller matrix is enough.
    gram = x.T @ x / n if n > d else x @ x.T / n
    eigenvalues = torch.linalg.eigvalsh(gram)
    eigenvalues = eigenvalues[eigenvalues > 1e-12]  # 0 log 0 = 0
    return float(torch.exp(-(eigenvalues * eigenvalues.log()).sum()))


def ms_ssim_scales(height: int, width: int, kernel: int = MS_SSIM_KERNEL) -> int:
    """The most scales (<= 5) torchmetrics' MS-SSIM accepts for this size (its own checks, replayed)."""
    for scales in range(len(MS_SSIM_BETAS), 0, -1):
        div = max(1, scales - 1) ** 2
        if min(height, width) >= 2**scales and min(height, width) // div > kernel - 1:
            return scales
    return 0


def ms_ssim_betas(scales: int) -> tuple[float, ...]:
    """The first `scales` MS-SSIM weights, rescaled to the sum of all five (the five are unchanged)."""
    betas = MS_SSIM_BETAS[:scales]
    return tuple(b * sum(MS_SSIM_BETAS) / sum(betas) for b in betas)


def random_pairs(n: int, count: int, seed: int = 0) -> list[tuple[int, int]]:
    """`count` distinct unordered pairs i < j of range(n) (all of them when there are fewer), seeded."""
    total = n * (n - 1) // 2
    if total <= count:
        return [(i, j) for i in range(n) for j in range(i + 1, n)]
    rng = np.random.default_rng(seed)
    pairs: set[tuple[int, int]] = set()
    while len(pairs) < count:
        i, j = rng.integers(0, n, 2)
        if i != j:
            pairs.add((int(min(i, j)), int(max(i, j))))
    return sorted(pairs)


def ms_ssim_diversity(load, n: int, pairs: int = 1000, seed: int = 0, batch_size: int = 16) -> dict:
    """Mean MS-SSIM over random pairs of one set (lower = more diverse); `load(i)` gives image i, uint8 (3, H, W).

    Images below 176 px get fewer scales (the first weights, rescaled): torchmetrics' MS-SSIM
    needs each scale to stay larger than its 11-pixel window. The result says how many.
    """
    from torchmetrics.functional.image import multiscale_structural_similarity_index_measure as ms_ssim

    chosen = random_pairs(n, pairs, seed)
    first = load(chosen[0][0])
    height, width = first.shape[-2:]
    scales = ms_ssim_scales(height, width)
    if scales == 0:
        raise ValueError(f"images of {height}x{width} are too small for MS-SSIM (at least 11x11 px)")
    betas = ms_ssim_betas(scales)
    values = []
    for start in range(0, len(chosen), batch_size):
        batch = chosen[start:start + batch_size]
        a = torch.stack([load(i) for i, _ in batch]).float()
        b = torch.stack([load(j) for _, j in batch]).float()
        if a.shape[-2:] != (height, width) or b.shape[-2:] != (height, width):
            raise ValueError(f"MS-SSIM compares images of one size; found {tuple(a.shape[-2:])} and {(height, width)}")
        values.append(ms_ssim(a, b, data_range=255.0, kernel_size=MS_SSIM_KERNEL, betas=betas, reduction="none"))
    values = torch.cat(values).double()
    return {"mean": float(values.mean()), "std": float(values.std()) if len(values) > 1 else 0.0,
            "pairs": len(chosen), "scales": scales, "image_size": [int(height), int(width)]}
