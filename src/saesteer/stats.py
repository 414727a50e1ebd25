"""Statistics of result rows, gates and judge audits: seeded percentile-bootstrap CIs, Cohen's kappa, exact
(Clopper-Pearson) binomial bounds."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy.stats import beta

from saesteer.errors import SaesteerError


def bootstrap_ci(
    values,
    denominators=None,
    seed: int = 0,
    n_resamples: int = 1000,
    level: float = 0.95,
    transform: Callable[[np.ndarray], np.ndarray] | None = None,
) -> tuple[float, float, float]:
    """(point, low, high): the mean of `values` (or sum(values)/sum(denominators)) with a percentile bootstrap CI.

    `transform` maps the statistic (e.g. exp of a mean NLL for perplexity) before the percentiles are taken.
    """
    num = np.asarray(values, dtype=np.float64)
    if num.size == 0:
        raise SaesteerError("cannot compute a rate on zero items")
    den = np.ones_like(num) if denominators is None else np.asarray(denominators, dtype=np.float64)
    apply = transform or (lambda x: x)
    point = float(apply(np.asarray(num.sum() / den.sum())))
    rng = np.random.default_rng(seed)
    samples = np.empty(n_resamples)
    for start in range(0, n_resamples, 256):  # bounded memory for large n
        idx = rng.integers(0, num.size, size=(min(256, n_resamples - start), num.size))
        samples[start : start + len(idx)] = apply(num[idx].sum(1) / den[idx].sum(1))
    low, high = np.quantile(samples, [(1 - level) / 2, (1 + level) / 2])
    return point, float(min(low, point)), float(max(high, point))


def cohen_kappa(a: list, b: list) -> float:
    """Cohen's kappa between two raters' labels (1.0 when both agree perfectly, even on one label)."""
    if len(a) != len(b) or not a:
        raise SaesteerError("Cohen's kappa needs two equally long, non-empty label lists")
    n = len(a)
    observed = sum(x == y for x, y in zip(a, b)) / n
    expected = sum((a.count(label) / n) * (b.count(label) / n) for label in set(a) | set(b))
    if expected == 1.0:
        return 1.0
    return (observed - expected) / (1.0 - expected)


def kappa_ci(a: list, b: list, seed: int = 0, n_resamples: int = 1000) -> tuple[float, float, float]:
    """Cohen's kappa of two raters' labels and a seeded percentile-bootstrap 95% CI over the items
    (widened to contain the point estimate)."""
    rng = np.random.default_rng(seed)
    kappas = []
    for _ in range(n_resamples):
        idx = rng.integers(0, len(a), len(a))
        kappas.append(cohen_kappa([a[i] for i in idx], [b[i] for i in idx]))
    kappa = cohen_kappa(a, b)
    low, high = np.quantile(kappas, [0.025, 0.975])
    return kappa, float(min(low, kappa)), float(max(high, kappa))


def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Two-sided exact binomial interval for k successes in n trials."""
    alpha = 1 - level
    low = 0.0 if k == 0 else float(beta.ppf(alpha / 2, k, n - k + 1))
    high = 1.0 if k == n else float(beta.ppf(1 - alpha / 2, k + 1, n - k))
    return low, high


def upper_bound(k: int, n: int, level: float = 0.95) -> float:
    """One-sided exact upper confidence bound for the rate behind k of n."""
    return 1.0 if k == n else float(beta.ppf(level, k + 1, n - k))
