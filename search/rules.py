"""Candidate span rules of the search and their per-length spans / densities.

A rule is ``(alpha, beta)``; its span and density at a length come from ``moa_plan.semantics``
only. The default grid follows the reference: alpha on a coarse step in [-N_max, N_max], beta
on a grid in [0, 1], keeping the rules whose unclamped span ``alpha + beta*N`` is >= 1 at the
smallest length and <= N at every length considered. The alpha grid is anchored at
``origin`` (the search passes ``-sink``): then the rule ``(-sink, d)`` is a candidate, the
elastic StreamingLLM window whose density is d at every N, so the uniform baseline is always in
the search space and a budget that the uniform plan meets is never infeasible.
"""

from __future__ import annotations

from dataclasses import dataclass

from moa_plan import semantics
from moa_plan.plan import PlanError


@dataclass(frozen=True)
class Candidate:
    """One candidate rule."""

    alpha: float
    beta: float

    def span(self, n: int) -> int:
        return semantics.span(self.alpha, self.beta, n)


def beta_grid(step: float) -> list[float]:
    """0, step, 2*step, ..., 1 (1 included when step divides it), rounded to avoid float drift."""
    if not 0 < step <= 1:
        raise PlanError([("beta_step", f"must be in (0, 1], got {step}")])
    count = int(round(1.0 / step))
    values = sorted({round(min(1.0, i * step), 10) for i in range(count + 1)})
    return values


def candidate_grid(
    lengths: list[int],
    alpha_step: int,
    beta_step: float,
    alpha_min: int | None = None,
    alpha_max: int | None = None,
    dedupe: bool = True,
    cap_lengths: list[int] | None = None,
    origin: int = 0,
) -> list[Candidate]:
    """The rules valid at every length in ``lengths`` (see module docstring); the upper bound
    (unclamped span <= N) is checked only at ``cap_lengths`` when given.

    With ``dedupe`` two rules giving the same span at every length are indistinguishable to
    the search (same density, same influence), so only the first (smallest alpha, then beta)
    is kept.
    """
    if not lengths or min(lengths) < 1:
        raise PlanError([("lengths", "need at least one positive length")])
    if alpha_step < 1:
        raise PlanError([("alpha_step", f"must be >= 1, got {alpha_step}")])
    n_min, n_max = min(lengths), max(lengths)
    lo = -n_max if alpha_min is None else alpha_min
    hi = n_max if alpha_max is None else alpha_max
    first = -(-(lo - origin) // alpha_step)  # ceil((lo - origin) / step)
    alphas = [origin + a * alpha_step for a in range(first, (hi - origin) // alpha_step + 1)]
    out: list[Candidate] = []
    seen: set[tuple[int, ...]] = set()
    for beta in beta_grid(beta_step):
        for alpha in alphas:
            if alpha + beta * n_min < 1:
                continue
            if any(alpha + beta * n > n for n in (cap_lengths or lengths)):
                continue
            cand = Candidate(float(alpha), float(beta))
            key = tuple(cand.span(n) for n in sorted(set(lengths)))
            if dedupe and key in seen:
                continue
            seen.add(key)
            out.append(cand)
    if not out:
        raise PlanError(
            [
                (
                    "candidates",
                    f"no (alpha, beta) rule is valid at every length {sorted(set(lengths))}; "
                    "widen the alpha range or refine the beta step",
                )
            ]
        )
    out.sort(key=lambda c: (c.beta, c.alpha))
    return out


def density_table(cands: list[Candidate], sink: int, lengths: list[int]) -> list[list[float]]:
    """``table[r][k]``: exact density of rule r at ``lengths[k]`` (semantics.head_density)."""
    return [[semantics.head_density(c.alpha, c.beta, sink, n) for n in lengths] for c in cands]


def span_table(cands: list[Candidate], lengths: list[int]) -> list[list[int]]:
    """``table[r][k]``: span of rule r at ``lengths[k]``."""
    return [[c.span(n) for n in lengths] for c in cands]
