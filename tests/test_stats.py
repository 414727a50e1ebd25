import math

import numpy as np
import pytest

from saesteer.errors import SaesteerError
from saesteer.stats import bootstrap_ci, cohen_kappa, kappa_ci


def test_bootstrap_ci_contains_point_and_shrinks_with_n():
    rng = np.random.default_rng(0)
    small = (rng.random(20) < 0.3).astype(float)
    large = (rng.random(2000) < 0.3).astype(float)
    p_small, lo_small, hi_small = bootstrap_ci(small, seed=1)
    p_large, lo_large, hi_large = bootstrap_ci(large, seed=1)
    assert lo_small <= p_small <= hi_small and lo_large <= p_large <= hi_large
    assert p_large == pytest.approx(large.mean())
    assert (hi_large - lo_large) < (hi_small - lo_small) / 4
    assert abs((hi_large - lo_large) - 2 * 1.96 * math.sqrt(0.3 * 0.7 / 2000)) < 0.01  # normal approximation
    assert bootstrap_ci(small, seed=1) == (p_small, lo_small, hi_small)  # seeded
    assert bootstrap_ci([1.0] * 10) == (1.0, 1.0, 1.0)
    with pytest.raises(SaesteerError, match="zero items"):
        bootstrap_ci([])


def test_bootstrap_ratio_with_transform():
    nll, tokens = [10.0, 30.0], [10, 10]
    point, low, high = bootstrap_ci(nll, tokens, transform=np.exp, n_resamples=500)
    assert (
        point == pytest.approx(math.exp(2.0))
        and math.exp(1.0) - 1e-9 <= low <= point <= high <= math.exp(3.0) + 1e-9
    )


def test_cohen_kappa_known_answers():
    # 50 items: both yes 20, A yes/B no 5, A no/B yes 10, both no 15 -> po 0.7, pe 0.5, kappa 0.4
    a = [1] * 20 + [1] * 5 + [0] * 10 + [0] * 15
    b = [1] * 20 + [0] * 5 + [1] * 10 + [0] * 15
    assert cohen_kappa(a, b) == pytest.approx(0.4)
    assert cohen_kappa(a, a) == 1.0 and cohen_kappa([1, 1], [1, 1]) == 1.0
    assert cohen_kappa([1, 0, 1, 0], [0, 1, 0, 1]) == pytest.approx(-1.0)
    with pytest.raises(SaesteerError, match="equally long"):
        cohen_kappa([1], [1, 0])
    kappa, low, high = kappa_ci(a, b, seed=3, n_resamples=200)
    assert kappa == pytest.approx(0.4) and low <= kappa <= high and (low, high) != (kappa, kappa)
    assert kappa_ci(a, b, seed=3, n_resamples=200) == (kappa, low, high)  # seeded
