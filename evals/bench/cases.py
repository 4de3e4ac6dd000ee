"""The benchmark cases: model shapes and the heterogeneous plans timed at each density."""

from __future__ import annotations

SHAPES: dict[str, dict[str, int]] = {
    # attention shape + the rest of a Llama-style decoder (for the whole-model decode step)
    "llama3-8b": dict(layers=32, hq=32, hkv=8, d=128, hidden=4096, inter=14336, vocab=128256),
    "mha-7b": dict(layers=32, hq=32, hkv=32, d=128, hidden=4096, inter=11008, vocab=32000),
}


def bench_plan(shape: dict[str, int], density: float, n: int, sink: int, layer_shift: bool = True):
    """A heterogeneous plan (Rule(0, beta_h), spans vary 3x across KV groups, 0.6x within) with
    plan.density(n) as close to `density` as integer spans allow (bisection on a common factor)."""
    from moa_plan.plan import Layer, Rule

    hq, hkv, layers = shape["hq"], shape["hkv"], shape["layers"]
    group = hq // hkv
    a = [0.5 + i / max(1, hkv - 1) for i in range(hkv)]  # 0.5 .. 1.5
    perm = [(i * 5 + 3) % hkv for i in range(hkv)]
    b = [1.0 - 0.4 * j / max(1, group - 1) for j in range(group)]  # 1.0 .. 0.6 within a group
    base = [a[perm[h // group]] * b[h % group] for h in range(hq)]

    def rows(c: float) -> list:
        out = []
        for layer in range(layers):
            shift = (layer * group) % hq if layer_shift else 0
            out.append(Layer(heads=[Rule(alpha=0.0, beta=min(1.0, c * base[(h + shift) % hq])) for h in range(hq)]))
        return out

    return _fit(rows, shape, sink, "bench", density, n, 1.0 / min(base))


def searched_plan(shape: dict[str, int], density: float, n: int, sink: int):
    """A plan shaped like those the MoA search returns: per layer three distinct rules of very
    different spans (a short fixed window, a window growing with N, a near-dense head), the heads
    of each layer spread over them in layer-dependent proportions and mixed inside GQA groups;
    plan.density(n) brought close to ``density`` by bisection on a common factor."""
    from moa_plan.plan import Layer, Rule

    hq, layers = shape["hq"], shape["layers"]
    pattern = [0, 0, 1, 0, 1, 2, 0, 1]  # rule of each head, rotated per layer: 1/2 short, 3/8 growing, 1/8 wide

    def rows(c: float) -> list:
        rules = (
            Rule(alpha=float(int(min(n, 0.03 * n * c))), beta=0.0),
            Rule(alpha=0.0, beta=min(1.0, 0.3 * c)),
            Rule(alpha=0.0, beta=min(1.0, 1.2 * c)),
        )
        return [Layer(heads=[rules[pattern[(h * 3 + layer) % 8]] for h in range(hq)]) for layer in range(layers)]

    return _fit(rows, shape, sink, "bench-searched-shape", density, n, 1.0 / 0.03)


def grouped_plan(shape: dict[str, int], density: float, n: int, sink: int):
    """A per-KV-group plan (as ``moa-plan optimize --gqa`` returns): the query heads of a group share
    one rule, spans vary 3x across groups and layers. The decode kernel reads each group's widest
    head, so only here is the KV read fraction the density: per-head plans read more."""
    from moa_plan.plan import Layer, Rule

    hq, hkv, layers = shape["hq"], shape["hkv"], shape["layers"]
    group = hq // hkv
    a = [0.5 + i / max(1, hkv - 1) for i in range(hkv)]  # 0.5 .. 1.5

    def rows(c: float) -> list:
        out = []
        for layer in range(layers):
            per_group = [Rule(alpha=0.0, beta=min(1.0, c * a[(g * 5 + 3 + layer) % hkv])) for g in range(hkv)]
            out.append(Layer(heads=[per_group[h // group] for h in range(hq)]))
        return out

    return _fit(rows, shape, sink, "bench-grouped", density, n, 2.0)


def _fit(rows, shape: dict[str, int], sink: int, method: str, density: float, n: int, hi: float):
    """The plan of layers ``rows(c)`` at the smallest common factor c in [0, hi] that reaches
    ``density`` at n (bisection: a plan's density grows with c; ``hi`` gives the densest plan)."""
    from moa_plan.plan import FORMAT_VERSION, ModelShape, Plan

    model = ModelShape(
        num_layers=shape["layers"],
        num_attention_heads=shape["hq"],
        num_key_value_heads=shape["hkv"],
        head_dim=shape["d"],
    )

    def make(c: float) -> Plan:
        provenance = {"method": method, "density": density, "n": n}
        return Plan(format_version=FORMAT_VERSION, model=model, sink=sink, layers=rows(c), provenance=provenance)

    lo = 0.0
    for _ in range(40):
        mid = (lo + hi) / 2
        if make(mid).density(n) < density:
            lo = mid
        else:
            hi = mid
    return make(hi)


PLAN_KINDS = {"synthetic": bench_plan, "searched": searched_plan, "grouped": grouped_plan}


def plan_of_kind(kind: str, shape: dict[str, int], density: float, n: int, sink: int):
    """The benchmark plan of one kind ('synthetic': bench_plan, 'searched': searched_plan,
    'grouped': grouped_plan)."""
    return PLAN_KINDS[kind](shape, density, n, sink)


def plan_label(density: float, kind: str) -> str:
    """The suffix of a plan's result key: moa0.5 (synthetic) or moa0.5-searched."""
    return f"moa{density:g}" + ("" if kind == "synthetic" else f"-{kind}")


def label_density(key: str) -> float:
    """The density in a result key ending in a plan label."""
    return float(key.rsplit("moa", 1)[1].split("-")[0])


def decode_tokens_read(spans: list[int], caps: list[int], sink: int, n: int, group: int) -> list[int]:
    """Tokens the decode kernel reads per KV head at length n (valid sink slots + the group's window)."""
    out = []
    for k, cap in enumerate(caps):
        n_sink = min(sink, cap)
        ring = cap - n_sink
        w = max(spans[k * group : (k + 1) * group])
        p_lo = max(n_sink, n - w)
        out.append(min(n_sink, n) + min(max(n - p_lo, 0), ring))
    return out
