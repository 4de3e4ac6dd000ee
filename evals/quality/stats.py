"""Intervals for quality comparisons: a difference between two plans is only reported as real
when its interval excludes zero.

- ``wilson``: 95% score interval of an accuracy (k correct of n), sound near 0 and 1 where the
  normal interval is not.
- ``paired_bootstrap``: interval of mean(a - b) over paired items (the same documents or text
  windows under two plans), resampling the items; pairing removes the between-document variance
  that dominates small samples.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

Z95 = 1.959963984540054


def wilson(k: float, n: int, z: float = Z95) -> tuple[float, float]:
    """(low, high) of the Wilson score interval for k successes of n trials."""
    if n <= 0:
        raise ValueError("n must be positive")
    if not 0 <= k <= n:
        raise ValueError(f"k={k} must be in [0, n={n}]")
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo, hi = max(0.0, centre - half), min(1.0, centre + half)
    return (0.0 if k == 0 else lo), (1.0 if k == n else hi)  # exact ends, no float drift


def paired_bootstrap(
    a: Sequence[float], b: Sequence[float], resamples: int = 10000, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float]:
    """(mean(a - b), low, high): percentile bootstrap interval of the mean paired difference."""
    if len(a) != len(b) or not a:
        raise ValueError(f"need two non-empty paired samples of one length, got {len(a)} and {len(b)}")
    diff = [x - y for x, y in zip(a, b)]
    n = len(diff)
    rng = random.Random(seed)
    means = sorted(sum(diff[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    lo = means[int(math.floor((1 - level) / 2 * resamples))]
    hi = means[min(resamples - 1, int(math.ceil((1 + level) / 2 * resamples)) - 1)]
    return sum(diff) / n, lo, hi
