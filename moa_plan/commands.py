"""Plan-format subcommands of ``moa-plan`` (validate, show, density, uniform, import/export, schema).

Every handler turns bad input (unreadable files, malformed JSON, invalid plans, unwritable
outputs) into located ``FILE: location: message`` lines and exit 1; every output file goes
through ``files.write_atomic``.
"""

from __future__ import annotations

import argparse
import io as _io
import json
import sys
from pathlib import Path

from moa_plan import build, files, io, model_config, strict_json
from moa_plan.args import int_in, lengths
from moa_plan.errors import OptionError, UserError, printable, report
from moa_plan.plan import MAX_LENGTH, ModelShape, Plan, PlanError

DEFAULT_LENGTHS = (1024, 4096)


# ---- helpers ---------------------------------------------------------------------------------

_positive_int = int_in(1, MAX_LENGTH)
_nonnegative_int = int_in(0)


def _density(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def _guarded(source: str, fn, *args):
    """Call ``fn``; turn PlanError and unexpected I/O or parsing errors into UserError(source)."""
    try:
        return fn(*args)
    except PlanError as exc:
        raise UserError(source, exc) from None
    except OSError as exc:
        raise UserError(source, PlanError([("", exc.strerror or str(exc))])) from None
    except (ValueError, TypeError, ArithmeticError, RecursionError, MemoryError) as exc:
        raise UserError(source, PlanError([("", f"cannot process: {type(exc).__name__}: {exc}")])) from None


def load(path: str) -> Plan:
    """A plan file, or UserError naming the file."""
    return _guarded(path, io.load_plan, path)


def load_shape(path: str) -> ModelShape:
    """A model shape from a config.json or a model folder, or UserError naming the config file."""
    p = Path(path)
    source = str(p / "config.json") if p.is_dir() else path
    return _guarded(source, model_config.load_model_shape, path)


def write(path: str, text: str | bytes) -> None:
    """Write an output file atomically, or UserError naming it."""
    try:
        files.write_atomic(path, text)
    except OSError as exc:
        raise UserError(path, PlanError([("", f"cannot write: {exc.strerror or exc}")])) from None


def lengths_of(plan: Plan, requested: list[int] | None) -> list[int]:
    """Requested lengths, else 1024, 4096 and the model's max_position_embeddings."""
    if requested:
        return list(dict.fromkeys(requested))
    out = list(DEFAULT_LENGTHS)
    if plan.model.max_position_embeddings:
        out.append(plan.model.max_position_embeddings)
    return sorted(set(out))


def summary_length(plan: Plan) -> int:
    return plan.model.max_position_embeddings or DEFAULT_LENGTHS[-1]


def report_lengths(plan: Plan) -> list[int]:
    """Where a plan's density means most: the lengths it was searched and validated at (its
    provenance), else its model's max_position_embeddings, else 4096."""
    prov = plan.provenance if isinstance(plan.provenance, dict) else {}
    found = prov.get("lengths") if isinstance(prov.get("lengths"), list) else []
    found = found + [prov.get("validation_length")]
    lengths = sorted({n for n in found if isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= MAX_LENGTH})
    return lengths or [summary_length(plan)]


def describe(plan: Plan) -> str:
    m = plan.model
    return f"{m.num_layers} layers x {m.num_attention_heads} heads, {m.num_key_value_heads} KV heads"


# ---- validate --------------------------------------------------------------------------------


def cmd_validate(args: argparse.Namespace) -> int:
    shape = load_shape(args.model) if args.model else None
    failed = False
    for path in args.plans:
        try:
            plan = load(path)
            if shape is not None:
                _guarded(path, model_config.check_fits, plan, shape)
        except UserError as exc:
            report(exc.source, exc.error)
            failed = True
            continue
        lengths = [args.length] if args.length else report_lengths(plan)
        densities = ", ".join(f"{plan.density(n):.4f} at N={n}" for n in lengths)
        print(printable(f"{path}: ok ({describe(plan)}, density {densities})"))
    return 1 if failed else 0


# ---- show ------------------------------------------------------------------------------------


def _form(plan: Plan) -> str:
    if plan.layers is None:
        return "compact (one global default rule)"
    if all(layer.heads is not None for layer in plan.layers) and plan.default is None:
        return "canonical (every head listed)"
    return "compact (defaults with overrides)"


def show_text(plan: Plan, source: str, lengths: list[int]) -> str:
    m = plan.model
    lines = [
        printable(source),
        f"  model       {printable(m.name or '(unnamed)')}{' @ ' + printable(m.revision) if m.revision else ''}",
        f"  shape       {describe(plan)}, head_dim {m.head_dim}, "
        f"max_position_embeddings {m.max_position_embeddings or 'unknown'}",
        f"  sink        {plan.sink}",
        f"  block_size  {plan.block_size}",
        f"  form        {_form(plan)}",
    ]
    method = plan.provenance.get("method") if isinstance(plan.provenance, dict) else None
    if method:
        lines.append(f"  provenance  {printable(str(method), limit=200)}")
    lines += ["", f"  {'N':>8}  {'density':>8}  {'attn frac':>9}  {'KV cache':>8}  {'mean span':>10}"]
    means = {}
    for n in lengths:
        means[n] = plan.mean_spans(n)
        lines.append(
            f"  {n:>8}  {plan.density(n):>8.4f}  {plan.attention_fraction(n):>9.4f}  "
            f"{plan.kv_cache_fraction(n):>8.4f}  {plan.mean_span(n):>10.1f}"
        )
    lines += [
        "",
        "  density: mean over heads of min(N, sink + span) / N (the MoA paper's); attn frac: computed",
        "  fraction of the causal N x N triangle; KV cache: per-KV-head cache slots / a dense cache's",
    ]
    lines += ["", "  mean span per layer", "  " + f"{'layer':>5}" + "".join(f"  {'N=' + str(n):>9}" for n in lengths)]
    for layer in range(m.num_layers):
        lines.append("  " + f"{layer:>5}" + "".join(f"  {means[n][layer]:>9.1f}" for n in lengths))
    return "\n".join(lines) + "\n"


def span_map_png(plan: Plan, n: int, title: str) -> bytes:
    """PNG of the span map (layers x heads) at length n, drawn with matplotlib's Agg backend."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlanError([("--plot", "needs matplotlib: pip install 'moa-plan[plot]'")]) from None
    spans = plan.spans(n)
    heads = plan.model.num_attention_heads
    fig, ax = plt.subplots(figsize=(min(16, 2 + 0.35 * heads), min(14, 1.5 + 0.25 * len(spans))))
    try:
        image = ax.imshow(spans, aspect="auto", cmap="viridis", vmin=1, vmax=n, interpolation="nearest")
        g = plan.model.group_size
        for k in range(1, plan.model.num_key_value_heads if g > 1 else 0):
            ax.axvline(k * g - 0.5, color="white", linewidth=0.8)  # GQA groups share a KV cache
        ax.set_xlabel("query head" + (f" (white lines: groups of {g} sharing a KV head)" if g > 1 else ""))
        ax.set_ylabel("layer")
        ax.set_title(f"{title}\nspan at N={n} (density {plan.density(n):.3f}, sink {plan.sink})", fontsize=9)
        fig.colorbar(image, ax=ax, label="span (tokens)")
        buf = _io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    finally:
        plt.close(fig)
    return buf.getvalue()


def cmd_show(args: argparse.Namespace) -> int:
    plan = load(args.plan)
    if args.expanded:
        sys.stdout.write(io.plan_to_json(plan.expanded()))
        return 0
    lengths = lengths_of(plan, args.lengths)
    sys.stdout.write(show_text(plan, args.plan, lengths))
    if args.plot:
        n = args.plot_length or max(lengths)
        write(args.plot, span_map_png(plan, n, Path(args.plan).name))
        print(printable(f"wrote {args.plot} (span map at N={n})"))
    return 0


# ---- density ---------------------------------------------------------------------------------


def cmd_density(args: argparse.Namespace) -> int:
    if not args.lengths:
        raise OptionError([("--lengths", "required: the input lengths, e.g. --lengths 1024,4096")])
    plan = load(args.plan)
    for n in dict.fromkeys(args.lengths):
        print(f"density at N={n}: {plan.density(n):.6g}")
        if args.all:
            print(f"attention fraction at N={n}: {plan.attention_fraction(n):.6g}")
            print(f"KV-cache fraction at N={n}: {plan.kv_cache_fraction(n):.6g}")
        if args.per_layer:
            for layer, d in enumerate(plan.layer_densities(n)):
                print(f"  layer {layer}: {d:.6g}")
    return 0


# ---- uniform / import / export / schema ------------------------------------------------------


def cmd_uniform(args: argparse.Namespace) -> int:
    shape = load_shape(args.model)
    plan = build.uniform_plan(
        shape, args.density, sink=args.sink, block_size=args.block_size, static_length=args.static_length
    )
    write(args.out, io.plan_to_json(plan))
    lengths = [args.static_length] if args.static_length else lengths_of(plan, None)
    report_ = ", ".join(f"{plan.density(n):.4f} at N={n}" for n in lengths)
    rule = plan.default
    print(
        printable(f"wrote {args.out}") + f": alpha {rule.alpha:g}, beta {rule.beta:g} for every head; density {report_}"
    )
    if args.static_length is None:
        print(
            f"density is {args.density} (within 1/N) at every N >= {plan.provenance['exact_from_length']}; "
            f"below that the window is one token and the density is (sink + 1) / N"
        )
    return 0


def _read_json(path: str):
    return strict_json.parse_json(files.read_text_limited(path))


def cmd_import_moa(args: argparse.Namespace) -> int:
    shape = load_shape(args.model)
    data = _guarded(args.file, _read_json, args.file)
    plan = _guarded(args.file, build.plan_from_moa, data, shape, args.sink, args.block_size)
    plan.provenance["source"] = Path(args.file).name
    write(args.out, io.plan_to_json(plan))
    print(
        printable(
            f"wrote {args.out} ({describe(plan)}, density {plan.density(summary_length(plan)):.4f} "
            f"at N={summary_length(plan)})"
        )
    )
    return 0


def moa_json(data: dict[str, list[list[float]]]) -> str:
    """The MoA reference JSON, one layer per line."""
    parts = []
    for key in ("alphas", "betas"):
        rows = ",\n  ".join(json.dumps(row, allow_nan=False) for row in data[key])
        parts.append(f'"{key}": [\n  {rows}\n ]')
    return "{" + ",\n ".join(parts) + "}\n"


def cmd_export_moa(args: argparse.Namespace) -> int:
    plan = load(args.plan)
    write(args.out, moa_json(build.plan_to_moa(plan)))
    print(printable(f"wrote {args.out} ({describe(plan)})"))
    if plan.sink != build.MOA_REFERENCE_SINK:
        print(
            f"note: the MoA format has no sink field (its runtime uses {build.MOA_REFERENCE_SINK}); "
            f"this plan's sink is {plan.sink}",
            file=sys.stderr,
        )
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    text = io.plan_schema_json()
    if args.out:
        write(args.out, text)
    else:
        sys.stdout.write(text)
    return 0


# ---- registration ----------------------------------------------------------------------------


def register(sub: argparse._SubParsersAction) -> None:
    """Add the plan-format subcommands."""
    model_help = "a transformers config.json or a model folder holding one"

    p = sub.add_parser("validate", help="check plan files (exit 1 and one line per problem)")
    p.add_argument("plans", nargs="+", metavar="PLAN", help="plan JSON files")
    p.add_argument("--model", metavar="CONFIG_OR_DIR", help=f"also check the shape against {model_help}")
    p.add_argument(
        "--length",
        type=_positive_int,
        metavar="N",
        help="length of the density in the ok line (default: the lengths the plan was searched at, "
        "else max_position_embeddings, else 4096)",
    )
    p.set_defaults(handler=cmd_validate)

    p = sub.add_parser("show", help="summary table of a plan; --plot draws its span map")
    p.add_argument("plan", metavar="PLAN", help="plan JSON file")
    p.add_argument(
        "--lengths",
        type=lengths,
        metavar="N,N",
        help="lengths of the table, comma-separated (default: 1024, 4096 and max_position_embeddings)",
    )
    p.add_argument("--length", type=_positive_int, nargs="+", dest="lengths", help=argparse.SUPPRESS)  # old name
    p.add_argument("--plot", metavar="PNG", help="write the span map (layers x heads) to this PNG")
    p.add_argument(
        "--plot-length", type=_positive_int, metavar="N", help="length of the span map (default: the largest --lengths)"
    )
    p.add_argument("--expanded", action="store_true", help="print the canonical expanded JSON instead")
    p.set_defaults(handler=cmd_show)

    p = sub.add_parser("density", help="plan density (mean over heads of min(N, sink + span) / N) at lengths")
    p.add_argument("plan", metavar="PLAN", help="plan JSON file")
    p.add_argument("--lengths", type=lengths, metavar="N,N", help="input lengths in tokens, comma-separated (required)")
    p.add_argument("--length", type=_positive_int, nargs="+", dest="lengths", help=argparse.SUPPRESS)  # old name
    p.add_argument("--per-layer", action="store_true", help="also each layer's density")
    p.add_argument(
        "--all",
        action="store_true",
        help="also the attention fraction (computed part of the causal triangle) and the "
        "KV-cache fraction (per-KV-head cache slots / a dense cache's)",
    )
    p.set_defaults(handler=cmd_density)

    p = sub.add_parser("uniform", help="StreamingLLM baseline plan at a density (the same at every length)")
    p.add_argument("--model", required=True, metavar="CONFIG_OR_DIR", help=model_help)
    p.add_argument(
        "--density",
        type=_density,
        required=True,
        metavar="D",
        help="density in (0, 1]: every head sees sink + density*N - sink keys at length N",
    )
    p.add_argument(
        "--static-length",
        type=_positive_int,
        metavar="N",
        help="instead one fixed window (beta 0) whose density at N is D: a constant-size cache",
    )
    p.add_argument("--sink", type=_nonnegative_int, default=64, help="tokens every head always sees (default 64)")
    p.add_argument("--block-size", type=_positive_int, default=64, help="the plan's block size (default 64)")
    p.add_argument("--out", required=True, metavar="PLAN", help="plan JSON to write")
    p.set_defaults(handler=cmd_uniform)

    p = sub.add_parser("import-moa", help='convert a MoA reference {"alphas", "betas"} file to a plan')
    p.add_argument("file", metavar="FILE", help='MoA reference JSON {"alphas": [[...]], "betas": [[...]]}')
    p.add_argument("--model", required=True, metavar="CONFIG_OR_DIR", help=model_help)
    p.add_argument(
        "--sink",
        type=_nonnegative_int,
        default=build.MOA_REFERENCE_SINK,
        help=f"sink tokens (default {build.MOA_REFERENCE_SINK}, the MoA runtime's)",
    )
    p.add_argument("--block-size", type=_positive_int, default=64, help="the plan's block size (default 64)")
    p.add_argument("--out", required=True, metavar="PLAN", help="plan JSON to write")
    p.set_defaults(handler=cmd_import_moa)

    p = sub.add_parser("export-moa", help='convert a plan to the MoA reference {"alphas", "betas"} format')
    p.add_argument("plan", metavar="PLAN", help="plan JSON file")
    p.add_argument("--out", required=True, metavar="FILE", help="MoA reference JSON to write")
    p.set_defaults(handler=cmd_export_moa)

    p = sub.add_parser("schema", help="print the plan JSON Schema (spec/plan.schema.json)")
    p.add_argument("--out", metavar="FILE", help="write it to FILE instead")
    p.set_defaults(handler=cmd_schema)
