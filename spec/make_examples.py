"""Regenerate the example plans in spec/examples/ (deterministic: same bytes on every run).

    python spec/make_examples.py [OUT_DIR]      # default: spec/examples

Uniform plans are the StreamingLLM baseline (moa_plan.build.uniform_plan). The heterogeneous
plans are ILLUSTRATIVE, not searched: each head draws a fixed pseudo-random preference and
takes a rule from a small MoA-style menu, with one exponent tuned so the plan density (mean
attended keys / N, the MoA paper's) at the
budget length is as large as possible without exceeding the target. They show the format and
exercise the runtime; searched plans come from ``moa-plan search``.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

from moa_plan import semantics
from moa_plan.build import uniform_plan
from moa_plan.io import save_plan
from moa_plan.plan import FORMAT_VERSION, Layer, ModelShape, Plan, Rule

SHAPES = {  # key: the model's name, layers, query heads, KV heads, head size (8192 positions each)
    key: ModelShape(
        name=name,
        num_layers=layers,
        num_attention_heads=hq,
        num_key_value_heads=hkv,
        head_dim=d,
        max_position_embeddings=8192,
    )
    for key, name, layers, hq, hkv, d in (
        ("smollm2-135m", "HuggingFaceTB/SmolLM2-135M", 30, 9, 3, 64),
        ("llama-3-8b", "meta-llama/Meta-Llama-3-8B", 32, 32, 8, 128),
    )
}
LENGTH = 8192
DENSITY = 0.5
REPORT_LENGTHS = (1024, 2048, 4096, 8192)
BLOCK = 64
SINK = 64


def menu(block: int = BLOCK, min_length: int = 1024) -> list[Rule]:
    """MoA-style candidates: alpha a multiple of the block size, beta in eighths, every span at
    least one block at ``min_length``; sorted by density at LENGTH (sparsest first)."""
    rules = [
        Rule(alpha=float(a), beta=b)
        for b in (0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0)
        for a in range(-2048, 4096 + 1, 4 * block)
        if a + b * min_length >= block
    ]
    return sorted(rules, key=lambda r: (semantics.head_density(r.alpha, r.beta, SINK, LENGTH), r.beta, r.alpha))


def illustrative_plan(key: str, shape: ModelShape, density: float = DENSITY) -> Plan:
    """Deterministic heterogeneous plan whose density at LENGTH is <= ``density``."""
    rng = random.Random(f"moa-plan example {key}")
    candidates = menu()
    # first two layers and the last layer lean dense, as in searched MoA plans
    prefs = [
        [
            min(1.0, rng.random() + (0.5 if l < 2 or l == shape.num_layers - 1 else 0.0))
            for _ in range(shape.num_attention_heads)
        ]
        for l in range(shape.num_layers)
    ]

    def build(gamma: float) -> Plan:
        pick = [[candidates[min(len(candidates) - 1, int(p**gamma * len(candidates)))] for p in row] for row in prefs]
        return Plan(
            format_version=FORMAT_VERSION,
            model=shape,
            sink=SINK,
            block_size=BLOCK,
            layers=[Layer(heads=row) for row in pick],
        )

    lo, hi = 1.0, 64.0  # density falls as gamma grows; find the smallest gamma within budget
    if build(hi).density(LENGTH) > density:
        raise SystemExit(f"{key}: the menu cannot reach density {density}")
    for _ in range(60):
        mid = (lo + hi) / 2
        if build(mid).density(LENGTH) <= density:
            hi = mid
        else:
            lo = mid
    plan = build(hi)
    plan.provenance.update(
        {
            "method": "illustrative: deterministic recipe in spec/make_examples.py, NOT a searched plan",
            "recipe": "per-head pseudo-random preference p (seeded by the file key; layers 0, 1 and the "
            "last get +0.5); rule = menu[floor(p**gamma * len(menu))], the menu sorted by "
            f"density at N={LENGTH}; gamma bisected to the budget",
            "density": "paper",
            "target_density": {str(LENGTH): density},
            "achieved_density": {str(n): plan.density(n) for n in REPORT_LENGTHS},
        }
    )
    return plan


def main(out_dir: str = "spec/examples") -> None:
    out = Path(out_dir)
    for key, shape in SHAPES.items():
        tag = f"{int(DENSITY * 100)}"
        save_plan(uniform_plan(shape, DENSITY, sink=SINK, block_size=BLOCK), out / f"{key}-uniform-{tag}.json")
        save_plan(illustrative_plan(key, shape), out / f"{key}-illustrative-{tag}.json")


if __name__ == "__main__":
    main(*sys.argv[1:2])
