"""The normative span / mask / density arithmetic of a plan (spec/README.md, "Semantics").

Three figures describe a plan at a length N, each defined here once:

* **density** (the MoA paper's): keys the newest query attends to, ``min(N, sink + span)``,
  over N, averaged over query heads;
* **attention fraction**: visible (query, key) pairs over the causal N x N triangle (prefill work);
* **KV-cache fraction**: slots of the per-KV-head cache over a dense cache's (memory; on GQA
  models the widest query head of a group decides the group's slots).

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


def attended_keys(span_: int, sink: int, n: int) -> int:
    """Keys the newest query (position n - 1) sees at length ``n``: sink + window, capped at n.

    This is also the KV entries a head must keep to serve that query.
    """
    return min(n, sink + span_)


kv_slots = attended_keys  # the cache's name for the same count


def head_density(alpha: float, beta: float, sink: int, n: int) -> float:
    """Density of one head at length ``n``, as the MoA paper means it: keys the newest query
    attends to over ``n`` (``min(n, sink + span) / n``). A plan's density is the mean over heads."""
    return attended_keys(span(alpha, beta, n), sink, n) / n


def head_attention_fraction(alpha: float, beta: float, sink: int, n: int) -> float:
    """Fraction of the n x n causal triangle one head computes (prefill work, not the density)."""
    return visible_pairs(span(alpha, beta, n), sink, n) / causal_pairs(n)
