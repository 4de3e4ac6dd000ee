"""Measured (not estimated) cost of narrowing one layer: the mean answer-loss increase over dense
when every head of layer l keeps only the sink and the last ``--keep`` x N keys, all other
layers dense, on calibration samples. A zeroth-order check of what the first-order profile says
about far keys (evals/results/smollm2/run6-holdout/README.md).

    python tools/measured_layer_cost.py --model smollm2 --data calib.json [--length 512] [--keep 0.5] [--samples 20]
"""

from __future__ import annotations

import argparse
import json


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--keep", type=float, default=0.5)
    p.add_argument("--samples", type=int, default=20)
    p.add_argument("--sink", type=int, default=64)
    args = p.parse_args()
    from moa_plan.build import dense_plan
    from moa_plan.plan import Layer, Plan, Rule
    from moa_plan.runtime import load as loader
    from moa_plan.search import calibration
    from moa_plan.search.loss import plan_losses

    _, samples = calibration.load_dataset(args.data)
    samples = [s for s in samples if s["length"] == args.length][: args.samples]
    model, _ = loader.load(args.model, device="cpu")
    shape = loader.model_shape(args.model)
    base = plan_losses(model, dense_plan(shape), samples)
    full = Layer(heads=[Rule(alpha=0.0, beta=1.0)] * shape.num_attention_heads)
    narrow = Layer(heads=[Rule(alpha=0.0, beta=args.keep)] * shape.num_attention_heads)
    rows = []
    for layer in range(shape.num_layers):
        layers = [narrow if i == layer else full for i in range(shape.num_layers)]
        plan = Plan(format_version=1, model=shape, sink=args.sink, block_size=64, layers=layers)
        got = plan_losses(model, plan, samples)
        rise = sum(g - b for g, b in zip(got, base)) / len(samples)
        rows.append({"layer": layer, "loss_increase": round(rise, 5)})
        print(f"layer {layer:2d}: loss +{rise:.4f}", flush=True)
    print(json.dumps({"length": args.length, "keep": args.keep, "samples": len(samples), "layers": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
