"""Measured (not estimated) answer loss of plans on calibration samples: a sanity check of a search.

Runs the model with each plan's exact mask (``runtime.reference.reference_attention``, the
oracle) over prompt + answer and reports the mean cross-entropy of the dense model's own
answer, next to the dense loss. Slow (dense masked attention); meant for small models.

    python -m moa_plan.search.check --model DIR --data calib.jsonl --plan a.json --plan b.json
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

ATTN = "moa_check_masked"


def _attention(state: dict[str, Any]):
    def fn(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        from moa_plan.runtime.reference import reference_attention

        spans = state["spans"]
        if spans is None:
            import torch.nn.functional as F

            g = query.shape[1] // key.shape[1]
            out = F.scaled_dot_product_attention(query, key.repeat_interleave(g, 1), value.repeat_interleave(g, 1),
                                                 is_causal=True, scale=scaling)
        else:
            out = reference_attention(query, key, value, spans[module.layer_idx], state["sink"], scale=scaling)
        return out.transpose(1, 2).contiguous(), None

    return fn


def answer_losses(model_dir: str, data: str, plans: dict[str, Any], ids: list[str] | None = None,
                  progress: bool = True) -> list[dict[str, Any]]:
    """Per sample: {'id', 'length', 'n_tokens', 'dense': loss, <plan name>: loss, ...}."""
    import torch
    from tqdm import tqdm
    from transformers import AttentionInterface

    from moa_plan.search import calibration
    from moa_plan.search import model as model_mod

    _, samples = calibration.load_dataset(data)
    if ids:
        samples = [s for s in samples if s["id"] in ids]
    state: dict[str, Any] = {"spans": None, "sink": 0}
    AttentionInterface.register(ATTN, _attention(state))
    model, _ = model_mod.load(model_dir, attn_implementation=ATTN)
    rows = []
    for s in tqdm(samples, desc="check", disable=not progress):
        toks = torch.tensor([s["prompt_ids"] + s["answer_ids"]])
        n, a = toks.shape[1], len(s["answer_ids"])
        row = {"id": s["id"], "length": s["length"], "n_tokens": n}
        for name, plan in [("dense", None), *plans.items()]:
            t0 = time.perf_counter()
            if plan is None:
                state["spans"] = None
            else:
                state["spans"] = [torch.tensor(layer) for layer in plan.spans(n)]
                state["sink"] = plan.sink
            with torch.no_grad():
                logits = model(toks, logits_to_keep=a + 1, use_cache=False).logits[0, :a].float()
            row[name] = torch.nn.functional.cross_entropy(logits, torch.tensor(s["answer_ids"])).item()
            row[f"{name}_seconds"] = round(time.perf_counter() - t0, 2)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    from moa_plan.io import load_plan

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--plan", action="append", default=[], help="NAME=PLAN.json (repeatable)")
    p.add_argument("--ids", help="comma-separated sample ids (default: all)")
    args = p.parse_args(argv)
    plans = {}
    for item in args.plan:
        name, _, path = item.partition("=")
        plans[name] = load_plan(path)
    rows = answer_losses(args.model, args.data, plans, args.ids.split(",") if args.ids else None)
    for r in rows:
        print(json.dumps(r), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
