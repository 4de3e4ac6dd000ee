"""The measured (not estimated) answer loss of plans: the mean cross-entropy of the dense model's
own answers (``loss_mask``) on calibration samples.

* ``answer_loss``: the loss of one sample's logits (the profile's objective, too).
* ``measured_losses``: MoA picks among its Pareto plans by the compressed model's *measured*
  loss at a held-out length, not by the profile's first-order estimate: each plan is applied
  with the runtime (``moa_plan.runtime.apply_plan``: the attention users run) and scored.
* ``oracle_losses``: a sanity check of a search with each plan's exact mask
  (``runtime.reference.reference_attention``); slow, meant for small models::

    python -m moa_plan.search.loss --model DIR --data calib.json --plan a=a.json --plan b=b.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

from moa_plan.plan import Plan


def answer_loss(logits: Any, answer_ids: list[int], loss_mask: list[int] | None) -> Any:
    """Mean cross-entropy of the answer tokens (``loss_mask`` 1) given ``logits`` [len(answer), V]."""
    import torch

    target = torch.tensor(answer_ids, device=logits.device)
    if loss_mask is not None:
        target = target.masked_fill(torch.tensor(loss_mask, device=logits.device) == 0, -100)
    return torch.nn.functional.cross_entropy(logits.float(), target, ignore_index=-100)


def plan_losses(model: Any, plan: Plan, samples: list[dict[str, Any]]) -> list[float]:
    """The answer loss of each sample under ``plan`` (applied to ``model`` with the runtime)."""
    import torch

    from moa_plan.runtime import apply_plan

    apply_plan(model, plan)
    device = next(model.parameters()).device
    row = []
    for s in samples:
        ids = torch.tensor([s["prompt_ids"] + s["answer_ids"]], device=device)
        a = len(s["answer_ids"])
        with torch.no_grad():
            logits = model(ids, logits_to_keep=a + 1, use_cache=False).logits[0, :a]
        row.append(float(answer_loss(logits, s["answer_ids"], s.get("loss_mask"))))
    return row


def measured_losses(
    model_dir: str | os.PathLike, samples: list[dict[str, Any]], plans: list[Plan], run: Any, device: str = "auto"
) -> list[list[float]]:
    """``out[p][s]``: answer loss of sample s under plan p; a cell of ``run`` (a ``moa_plan.run.Run``)
    per plan, keyed by the plan's content, so a resumed run measures each plan once."""
    from moa_plan.io import plan_to_json
    from moa_plan.run import fingerprint
    from moa_plan.runtime import load as loader

    keys = [fingerprint(plan_to_json(plan.model_copy(update={"provenance": {}}))) for plan in plans]
    todo = run.todo(keys)
    if todo:
        model, _ = loader.load(model_dir, device=device)
        with run.progress(len(todo), "validate", unit="plan") as bar:
            for key, plan in zip(keys, plans):
                if key not in run.cells:
                    run.put(key, plan_losses(model, plan, samples))
                    bar.update()
    run.finish(keys)
    return [run.cells[k] for k in keys]


ATTN = "moa_check_masked"


def _attention(state: dict[str, Any]):
    def fn(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        from moa_plan.runtime.reference import reference_attention

        spans = state["spans"]
        if spans is None:
            import torch.nn.functional as F

            g = query.shape[1] // key.shape[1]
            out = F.scaled_dot_product_attention(
                query, key.repeat_interleave(g, 1), value.repeat_interleave(g, 1), is_causal=True, scale=scaling
            )
        else:
            out = reference_attention(query, key, value, spans[module.layer_idx], state["sink"], scale=scaling)
        return out.transpose(1, 2).contiguous(), None

    return fn


def oracle_losses(
    model_dir: str, data: str, plans: dict[str, Any], ids: list[str] | None = None, progress: bool = True
) -> list[dict[str, Any]]:
    """Per sample: {'id', 'length', 'n_tokens', 'dense': loss, <plan name>: loss, ...}."""
    import torch
    from transformers import AttentionInterface

    from moa_plan.run import Progress
    from moa_plan.runtime import load as loader
    from moa_plan.search import calibration

    _, samples = calibration.load_dataset(data)
    if ids:
        samples = [s for s in samples if s["id"] in ids]
    state: dict[str, Any] = {"spans": None, "sink": 0}
    AttentionInterface.register(ATTN, _attention(state))
    model, _ = loader.load(model_dir, attn_implementation=ATTN, device="cpu")
    rows = []
    bar = Progress(len(samples), "check", quiet=not progress, unit="sample")
    for s in samples:
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
        bar.update()
    bar.close()
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
    rows = oracle_losses(args.model, args.data, plans, args.ids.split(",") if args.ids else None)
    for r in rows:
        print(json.dumps(r), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
