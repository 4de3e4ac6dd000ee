"""The normative span / mask / density arithmetic of a plan (spec/README.md, "Semantics").

Everything else (kernels, cache, search) calls these functions, so there is exactly one
definition of what a head sees. Arithmetic is exact integer arithmetic except the single
IEEE-754 double evaluation of ``alpha + beta * n``.
"""

from __future__ import annotations

import math


def span(alpha: float, beta: float, n: int) -> int:
    """Keys in a head's local window at total length ``n``: min(n, max(1, floor(alpha + beta*n)))."""
    if n < 1:
        raise ValueError(f"length must be >= 1, got {n}")
    return min(n, max(1, math.floor(alpha + beta * n)))


def visible(i: int, j: int, span_: int, sink: int) -> bool:
    """Whether query ``i`` sees key ``j`` (both 0-based) for a head with this span and sink."""
    return j <= i and (j < sink or i - j < span_)


def window_start(i: int, span_: int) -> int:
    """First key of query ``i``'s local window (may be negative: the window then starts at 0)."""
    return i - span_ + 1


def visible_pairs(span_: int, sink: int, n: int) -> int:
    """Exact number of visible (i, j) pairs of an n x n causal mask with this span and sink.

    Window part: sum_i min(i + 1, s). Sink part (keys left of the window): with
    t = i - s + 1 running over 0..n-s, sum_t min(sink, t).
    """
    s = min(span_, n)
    window = s * (s + 1) // 2 + (n - s) * s
    m = n - s
    k = sink
    if m <= k:
        sinks = m * (m + 1) // 2
    else:
        sinks = k * (k + 1) // 2 + (m - k) * k
    return window + sinks


def causal_pairs(n: int) -> int:
    """Number of (i, j) pairs with j <= i in an n x n mask."""
    return n * (n + 1) // 2


def head_density(alpha: float, beta: float, sink: int, n: int) -> float:
    """Fraction of the causal triangle one head computes at length ``n``."""
    return visible_pairs(span(alpha, beta, n), sink, n) / causal_pairs(n)


def kv_slots(span_: int, sink: int, n: int) -> int:
    """KV entries a head must keep at length ``n`` to serve the last query: sink + window, capped at n."""
    return min(n, sink + span_)
