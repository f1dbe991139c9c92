"""Bootstrap intervals (vcm.stats)."""

from __future__ import annotations

import numpy as np
import pytest

from vcm.stats import bootstrap_ci, paired_difference


def test_interval_holds_the_mean_and_narrows_with_more_subjects():
    rng = np.random.default_rng(0)
    small, large = rng.normal(0.7, 0.1, 8), rng.normal(0.7, 0.1, 200)
    lo_s, hi_s = bootstrap_ci(small)
    lo_l, hi_l = bootstrap_ci(large)
    assert lo_s < small.mean() < hi_s and lo_l < large.mean() < hi_l
    assert hi_l - lo_l < hi_s - lo_s
    assert bootstrap_ci(small) == bootstrap_ci(small)  # seeded


@pytest.mark.parametrize(("values", "expected"), [([0.5], (np.nan, np.nan)), ([0.3, 0.3, 0.3], (0.3, 0.3))])
def test_degenerate_inputs(values, expected):
    np.testing.assert_equal(bootstrap_ci(np.array(values)), expected)


def test_paired_difference_sees_a_shift_that_unpaired_spread_hides():
    rng = np.random.default_rng(1)
    base = rng.normal(0.6, 0.2, 16)  # subjects differ a lot ...
    mean, low, high = paired_difference(base + 0.05 + rng.normal(0, 0.01, 16), base)
    assert mean == pytest.approx(0.05, abs=0.01) and 0 < low < mean < high  # ... the pairing removes that
    with pytest.raises(ValueError, match="same subjects"):
        paired_difference(np.zeros(3), np.zeros(4))
