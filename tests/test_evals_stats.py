"""The interval helpers against closed forms and their defining properties."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moa_plan.evals.quality.stats import paired_bootstrap, wilson


def test_wilson_known_values():
    # textbook values (z = 1.96): 0 of 10 -> [0, 0.2775]; 5 of 10 -> [0.2366, 0.7634]
    assert wilson(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    with pytest.raises(ValueError):
        wilson(3, 0)
    with pytest.raises(ValueError):
        wilson(11, 10)


@given(n=st.integers(1, 500), data=st.data())
@settings(max_examples=100, deadline=None)
def test_wilson_contains_the_estimate_and_shrinks_with_n(n, data):
    k = data.draw(st.integers(0, n))
    lo, hi = wilson(k, n)
    assert 0 <= lo <= k / n <= hi <= 1
    lo4, hi4 = wilson(4 * k, 4 * n)
    assert hi4 - lo4 < hi - lo + 1e-12


def test_paired_bootstrap_detects_a_real_shift_and_not_noise():
    rng = random.Random(1)
    base = [rng.gauss(3.0, 1.0) for _ in range(40)]  # large between-item spread
    shifted = [x + 0.05 + rng.gauss(0, 0.01) for x in base]  # small but consistent paired shift
    mean, lo, hi = paired_bootstrap(shifted, base)
    assert mean == pytest.approx(0.05, abs=0.01) and lo > 0
    noise = [x + rng.gauss(0, 0.01) for x in base]
    _, lo, hi = paired_bootstrap(noise, base)
    assert lo < 0 < hi
    with pytest.raises(ValueError):
        paired_bootstrap([1.0], [1.0, 2.0])
