"""Layer-block variants of a plan, to find where a plan loses a retrieval: ``dense`` makes one
block of layers dense and keeps the plan elsewhere (does densifying that block restore it?),
``sparse`` keeps the plan in one block and makes the rest dense (does that block alone break it?).
Evaluate the variants with ``moa-plan eval retrieval --plan NAME=FILE ...`` (search/results/smollm2/
run6-holdout/README.md used it on the pass key at depth 0.1).

    python tools/layer_ablation.py PLAN.json OUT_DIR [--block 5] [--mode dense|sparse]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from moa_plan.io import load_plan, save_plan
from moa_plan.plan import Layer, Rule


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("plan")
    p.add_argument("out_dir")
    p.add_argument("--block", type=int, default=5, help="layers per block (default 5)")
    p.add_argument("--mode", choices=("dense", "sparse"), default="dense")
    args = p.parse_args()
    plan = load_plan(args.plan)
    full = Layer(heads=[Rule(alpha=0.0, beta=1.0)] * plan.model.num_attention_heads)
    layers = plan.layers or []
    out = Path(args.out_dir)
    for a in range(0, len(layers), args.block):
        inside = range(a, min(a + args.block, len(layers)))
        if args.mode == "dense":
            new = [full if i in inside else layer for i, layer in enumerate(layers)]
        else:
            new = [layer if i in inside else full for i, layer in enumerate(layers)]
        what = f"layers {inside.start}-{inside.stop - 1} {'dense' if args.mode == 'dense' else 'sparse, rest dense'}"
        variant = plan.model_copy(update={"layers": new, "provenance": {"diagnostic": what}})
        save_plan(variant, out / f"{args.mode}-L{a:02d}.json")
        print(out / f"{args.mode}-L{a:02d}.json", what)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
