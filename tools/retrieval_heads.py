"""Which heads a pass key needs, and how much of their attention each plan keeps: a diagnosis of
why a searched plan finds the pass key more or less often than another at the same density.

The dense model reads the evaluation's pass-key prompts (``evals.quality.documents``, chat
template) followed by the answer digits; for every (layer, head) we take the attention that the
positions predicting the digits put on the needle's digits ("retrieval mass", as retrieval-head
studies score copying heads). A plan keeps a head's mass when the needle is inside that head's
window (or sink) at the prompt's length. "Kept" = the mass-weighted share of the needle's
attention each plan keeps, averaged over documents; the table puts it beside each plan's measured
passkey accuracy (the eval's JSON), so one can see whether keeping retrieval heads is what
separates the plans.

    python tools/retrieval_heads.py --model smollm2 --plan run3=search/results/smollm2/smollm2-135m-moa-50.json \
        --plan run4=... --lengths 512,1024 --samples 2 --accuracy evals/results/smollm2/passkey.json --out DIR

Writes DIR/retrieval-heads.md and .json. CPU is enough (eager attention, float32).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch

from moa_plan.args import comma_list, int_in
from moa_plan.build import uniform_plan
from moa_plan.evals.quality.documents import make_document
from moa_plan.evals.quality.retrieval import prompt_ids
from moa_plan.files import write_atomic
from moa_plan.io import load_plan
from moa_plan.runtime import load as loader
from moa_plan.semantics import visible

POSITIONS = (0.1, 0.3, 0.5, 0.7, 0.9)


def needle_positions(tok, ids: list[int], answer: str) -> list[int]:
    """Token positions of the answer's digits inside the needle sentence of the prompt."""
    text = tok.decode(ids)
    start = text.find(f"pass key is {answer}")
    if start < 0:
        raise ValueError("needle not found in the prompt")
    lo, hi = start + len("pass key is "), start + len("pass key is ") + len(answer)
    out, pos = [], 0
    for j, t in enumerate(ids):
        piece = tok.decode([t])
        if pos < hi and pos + len(piece) > lo and re.search(r"\d", piece):
            out.append(j)
        pos += len(piece)
    return out


def head_mass(model, tok, doc, chat: bool) -> tuple[torch.Tensor, int, list[int], int]:
    """[layers, heads] attention mass from the digit-predicting positions onto the needle digits,
    the prompt length, the needle positions and the first query position."""
    prompt = prompt_ids(tok, doc, chat)
    answer = tok.encode(" " + doc.answer, add_special_tokens=False)
    ids = prompt + answer
    needle = needle_positions(tok, prompt, doc.answer)
    queries = list(range(len(prompt) - 1, len(ids) - 1))  # each predicts the next answer token
    with torch.no_grad():
        out = model(torch.tensor([ids]), output_attentions=True, use_cache=False)
    att = torch.stack([a[0] for a in out.attentions])  # [layers, heads, q, k]
    mass = att[:, :, queries][:, :, :, needle].sum(-1).mean(-1)
    return mass, len(prompt), needle, queries[0]


def kept(plan, n: int, needle: list[int], query: int) -> torch.Tensor:
    """[layers, heads] 1.0 where the head sees every needle digit from the first answer query."""
    spans = plan.spans(n)
    return torch.tensor(
        [[float(all(visible(query, j, s, plan.sink) for j in needle)) for s in layer] for layer in spans]
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--plan", action="append", default=[], help="NAME=PATH (repeatable)")
    p.add_argument("--uniform", type=comma_list(float), default=[0.5, 0.25], help="uniform windows at these densities")
    p.add_argument("--lengths", type=comma_list(int_in(64)), default=[512, 1024])
    p.add_argument("--samples", type=int_in(1), default=2, help="documents per (length, depth)")
    p.add_argument(
        "--accuracy",
        action="append",
        help="eval passkey JSON(s): measured accuracy per (method, length); name plans as there",
    )
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    loader.offline()
    model_dir = loader.resolve(a.model)
    model, tok = loader.load(model_dir, device="cpu")
    model.set_attn_implementation("eager")
    plans = {name: load_plan(path) for name, path in (s.split("=", 1) for s in a.plan)}
    shape = next(iter(plans.values())).model if plans else loader.model_shape(model_dir)
    plans.update({f"uniform-{round(d * 100)}": uniform_plan(shape, d, sink=64) for d in a.uniform})
    rows, heads = [], {}
    for n in a.lengths:
        masses, keeps = [], {name: [] for name in plans}
        for pos in POSITIONS:
            for i in range(a.samples):
                doc = make_document("passkey", tok, n, pos, 0, i)
                mass, n_prompt, needle, q0 = head_mass(model, tok, doc, chat=True)
                masses.append(mass)
                for name, plan in plans.items():
                    keeps[name].append(kept(plan, n_prompt, needle, q0))
                print(f"n={n} depth={pos} doc {i}: needle at {needle[0]}, query {q0}", flush=True)
        mean_mass = torch.stack(masses).mean(0)
        heads[n] = mean_mass.tolist()
        top = mean_mass.flatten().topk(10).indices  # the ten heads with the most needle attention
        for name, ks in keeps.items():
            share = [float((m * k).sum() / m.sum()) for m, k in zip(masses, ks)]
            top_kept = torch.stack(ks).mean(0).flatten()[top].mean().item()
            rows.append({"plan": name, "length": n, "kept_mass": sum(share) / len(share), "top10_heads_kept": top_kept})
    acc: dict[tuple[str, int], list[float]] = {}
    for path in a.accuracy or []:
        for cell in json.loads(Path(path).read_text())["cells"].values():
            name = cell["method"]
            if name.startswith("uniform~"):  # the eval names the matched window after its plan
                name = "uniform-" + name.rsplit("-", 1)[-1]
            acc.setdefault((name, int(cell["length"])), []).append(float(cell["accuracy"]))
    lines = [
        "Plans named -50 / -25 are at density 50% / 25% (the MoA paper's: mean over query heads of "
        "min(N, sink + span) / N); uniform-D is the StreamingLLM window at that density.",
        "",
        "| plan | length | needle attention kept (mass-weighted) | top-10 retrieval heads kept | passkey accuracy |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        got = acc.get((r["plan"], r["length"]))
        accuracy = f"{sum(got) / len(got):.2f}" if got else "-"
        r["passkey_accuracy"] = accuracy
        lines.append(
            f"| {r['plan']} | {r['length']} | {r['kept_mass']:.3f} | {r['top10_heads_kept']:.2f} | {accuracy} |"
        )
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "retrieval-heads.json", json.dumps({"rows": rows, "head_mass": heads}, indent=1))
    write_atomic(out / "retrieval-heads.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
