"""Measured validation: the real answer loss of the compressed model, plan by plan.

MoA picks among its Pareto plans by the compressed model's *measured* loss at a held-out
length, not by the profile's first-order estimate. Here each plan is applied to the model with
the runtime (``moa_plan.runtime.apply_plan``: the same attention users run) and scored by the
mean cross-entropy of the dense model's own answers (``loss_mask``) on held-out calibration
samples.
"""

from __future__ import annotations

import os
from typing import Any

from moa_plan.plan import Plan


def measured_losses(model_dir: str | os.PathLike, samples: list[dict[str, Any]], plans: list[Plan],
                    progress: bool = True, device: str = "auto") -> list[list[float]]:
    """``out[p][s]``: answer loss of sample s under plan p (the model is loaded once)."""
    import torch
    from tqdm import tqdm

    from moa_plan.runtime import apply_plan
    from moa_plan.search import model as model_mod
    from moa_plan.search.profile import answer_loss

    model, _ = model_mod.load(model_dir, device=device)
    device = next(model.parameters()).device
    out = []
    bar = tqdm(total=len(plans) * len(samples), desc="validate", disable=not progress)
    for plan in plans:
        apply_plan(model, plan)
        row = []
        for s in samples:
            ids = torch.tensor([s["prompt_ids"] + s["answer_ids"]], device=device)
            a = len(s["answer_ids"])
            with torch.no_grad():
                logits = model(ids, logits_to_keep=a + 1, use_cache=False).logits[0, :a]
            row.append(float(answer_loss(logits, s["answer_ids"], s.get("loss_mask"))))
            bar.update()
        out.append(row)
    bar.close()
    return out
