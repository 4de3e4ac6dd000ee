"""`moa-plan bench`: MoA attention kernels and decode throughput against dense SDPA and FlexAttention.

One process, one GPU, one run: device ceilings, then for each model shape the decode attention
groups (cached length x batch) and prefill groups (length), ours with the plan at every density
against SDPA (flash backend where it applies) and FlexAttention compiled with the same per-head
sink + window block mask, then a whole-model decode step (random weights, CUDA graph) with a
dense static cache vs the MoA cache. The groups are the cells of a ``moa_plan.run`` job: a
rerun resumes (a changed setting is refused unless --overwrite), and the markdown is rendered
from the result file.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from moa_plan.args import add_run_flags, choice_list, comma_list, densities, float_in, int_in, lengths, positive

SHAPE_NAMES = ("llama3-8b", "mha-7b")  # evals/bench/cases.py SHAPES (not imported: registration stays light)


@dataclass
class BenchSettings:
    """The flags of `moa-plan bench`."""

    shapes: list[str]
    densities: list[float]
    prefill_lens: list[int]
    decode_lens: list[int]
    batches: list[int]
    sink: int = 64
    max_cache_gb: float = 30.0
    no_flex: bool = False
    flex_shapes: tuple[str, ...] | list[str] = ("llama3-8b",)
    flex_batches: tuple[int, ...] | list[int] = (32,)
    e2e: list[str] | tuple[str, ...] = ("llama3-8b",)
    e2e_context: int = 16384
    e2e_density: float = 0.5
    e2e_densities: list[float] | tuple[float, ...] = (0.5, 0.25)
    plan_kinds: list[str] | tuple[str, ...] = ("synthetic", "searched")
    generate: bool = False
    gen_layers: int = 8
    gen_new_tokens: int = 64
    gen_batches: list[int] | tuple[int, ...] = (8, 32, 48)
    gen_dense_batches: list[int] | tuple[int, ...] = (32, 8)
    gen_budget: float = 200.0
    gen_compile: list[str] | tuple[str, ...] = ("inductor",)
    sweep: bool = False
    time_budget: float = 420.0
    out: str = "evals/results"
    overwrite: bool = False
    quiet: bool = False

    def fixed(self) -> dict[str, Any]:
        """What decides a cell's value besides its key (the grid: shapes, lengths, batches)."""
        keep = ("sink", "densities", "no_flex", "flex_shapes", "flex_batches", "e2e_context", "plan_kinds")
        keep += ("gen_layers", "gen_new_tokens", "gen_compile")
        return {k: v for k, v in asdict(self).items() if k in keep}


def _compile_backend(text: str) -> str:
    """A torch.compile BACKEND or BACKEND:MODE ('' for none), the backend checked before any work."""
    if not text:
        return ""
    import torch._dynamo

    from moa_plan.runtime.graph_generate import compile_setting

    try:
        backend, _ = compile_setting(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    known = torch._dynamo.list_backends(exclude_tags=())
    if backend not in known:
        raise argparse.ArgumentTypeError(f"unknown torch.compile backend {backend!r}; known: {', '.join(known)}")
    return text


def register(subparsers: Any) -> None:
    """Add the `bench` subcommand (imports nothing heavy)."""
    shapes, some_shapes = choice_list(SHAPE_NAMES), choice_list(SHAPE_NAMES, empty=True)
    size_gb, fraction = float_in(0, 1e6, low_open=True), float_in(0, 1, low_open=True)
    p = subparsers.add_parser(
        "bench", help="GPU benchmark of the MoA kernels and decode throughput", description=__doc__.splitlines()[0]
    )
    p.add_argument("--shapes", type=shapes, default=list(SHAPE_NAMES), help=f"comma list of {', '.join(SHAPE_NAMES)}")
    p.add_argument("--densities", type=densities, default=[1.0, 0.5, 0.25], help="plan densities, comma list")
    p.add_argument("--prefill-lens", type=lengths, default=[4096, 16384, 65536], help="prefill lengths, comma list")
    p.add_argument(
        "--decode-lens",
        type=lengths,
        default=[4096, 16384, 65536],
        help="cached lengths of the decode cases, comma list",
    )
    p.add_argument("--batches", type=comma_list(positive), default=[1, 8, 32, 128], help="decode batch sizes")
    p.add_argument("--sink", type=int_in(0), default=64, help="sink tokens of the benchmark plans (default 64)")
    p.add_argument("--max-cache-gb", type=size_gb, default=30.0, help="skip decode cases whose dense K+V exceed this")
    p.add_argument("--no-flex", action="store_true", help="skip FlexAttention")
    p.add_argument(
        "--flex-shapes",
        type=some_shapes,
        default=["llama3-8b"],
        help="shapes FlexAttention runs on (each length compiles)",
    )
    p.add_argument(
        "--flex-batches",
        type=comma_list(positive, empty=True),
        default=[32],
        help="decode batches FlexAttention runs at",
    )
    p.add_argument(
        "--e2e", type=some_shapes, default=["llama3-8b"], help="shape for the whole-model decode step ('' to skip)"
    )
    p.add_argument("--e2e-context", type=positive, default=16384, help="context of the whole-model decode step")
    p.add_argument("--e2e-density", type=fraction, default=0.5, help="plan density of the whole-model decode step")
    p.add_argument(
        "--e2e-densities",
        type=densities,
        default=[0.5, 0.25],
        help="plan densities of the whole-model rows (decoder and generate), comma list",
    )
    p.add_argument(
        "--plan-kinds",
        type=choice_list(("synthetic", "searched", "grouped")),
        default=["synthetic", "searched"],
        help="benchmark plans: synthetic (spans vary smoothly), searched (a few rules per layer), "
        "grouped (one rule per KV group: reads = density)",
    )
    p.add_argument("--generate", action="store_true", help="also time model.generate (evals/bench/generation.py)")
    p.add_argument("--gen-layers", type=positive, default=8, help="layers of the generate benchmark's model")
    p.add_argument("--gen-new-tokens", type=int_in(2), default=64, help="new tokens per generate call")
    p.add_argument("--gen-batches", type=comma_list(positive), default=[8, 32, 48], help="MoA generate batches")
    p.add_argument(
        "--gen-dense-batches",
        type=comma_list(positive),
        default=[32, 8],
        help="dense generate batches (each tried, an out-of-memory one reported)",
    )
    p.add_argument("--gen-budget", type=float_in(0, 1e9), default=200.0, help="seconds for the generate rows")
    p.add_argument(
        "--gen-compile",
        type=comma_list(_compile_backend, empty=True),
        default=["inductor"],
        metavar="BACKEND",
        help="MoA generate rows with the decode step compiled before capture, beside the eagerly captured ones "
        "(MOA_GRAPH_COMPILE: BACKEND[:MODE], comma-separated; default inductor, generate's own default on CUDA; '' for none)",
    )
    p.add_argument("--sweep", action="store_true", help="also time alternative kernel block sizes")
    p.add_argument(
        "--time-budget", type=float_in(0, 1e9), default=420.0, help="seconds; later cells are left for a rerun past it"
    )
    p.add_argument("--out", default="evals/results", help="directory for bench-<gpu>.json/.md")
    p.add_argument("--resume", action="store_true", help=argparse.SUPPRESS)  # resuming is the default now
    add_run_flags(p)
    p.set_defaults(handler=_handler)


def _handler(args: argparse.Namespace) -> int:
    from moa_plan.args import settings_from

    run_bench(settings_from(BenchSettings, args))
    return 0


def gpu_tag(name: str) -> str:
    return "h200" if "H200" in name else "h100" if "H100" in name else name.split()[-1].lower()


def grid(s: BenchSettings) -> list[tuple[str, tuple]]:
    """The run's cells in order: (key, (method of Kernels, arguments))."""
    from moa_plan.evals.bench.cases import plan_label

    cells: list[tuple[str, tuple]] = [("ceilings", ("ceilings",))]
    for shape in s.shapes:
        cells += [
            (f"decode/{shape}/n{n}/b{b}", ("decode_group", shape, n, b))
            for n in s.decode_lens
            for b in s.batches
            if dense_cache_bytes(shape, n, b) <= s.max_cache_gb * 1e9
        ]
        cells += [(f"prefill/{shape}/n{n}", ("prefill_group", shape, n)) for n in s.prefill_lens]
        if shape == s.shapes[0] and s.e2e:
            cells += [
                (f"e2e/{s.e2e[0]}/{plan_label(d, kind)}", ("e2e", s.e2e[0], d, kind))
                for d in s.e2e_densities
                for kind in s.plan_kinds
            ]
        if shape == s.shapes[0] and s.generate:
            cells.append((f"generate/{shape}", ("generate", shape)))
    if s.sweep:
        cells.append(("sweep", ("sweep",)))
    return cells


def dense_cache_bytes(shape: str, n: int, batch: int) -> int:
    """Bytes of a dense bf16 K+V cache of one layer (decode cells above --max-cache-gb are left out)."""
    from moa_plan.evals.bench.cases import SHAPES

    return 2 * batch * SHAPES[shape]["hkv"] * n * SHAPES[shape]["d"] * 2


def run_bench(s: BenchSettings) -> Path:
    """Measure every cell of the grid not in the result file yet; write the JSON and markdown."""
    from moa_plan.errors import UsageError
    from moa_plan.evals.bench import kernels, timing
    from moa_plan.evals.bench.report import render_markdown
    from moa_plan.files import write_atomic
    from moa_plan.run import Run

    try:
        import torch
    except ImportError:
        torch = None
    if torch is None or not torch.cuda.is_available():
        raise UsageError([("device", "moa-plan bench needs a CUDA GPU")])
    info = timing.device_info()
    json_path = Path(s.out) / f"bench-{gpu_tag(info['device'])}.json"
    t0 = time.time()
    with Run(
        json_path,
        "bench",
        {**{k: info[k] for k in ("device", "torch", "triton", "cuda")}, **s.fixed()},
        overwrite=s.overwrite,
        quiet=s.quiet,
    ) as run:
        torch.manual_seed(0)
        measure = kernels.Kernels(s, lambda: time.time() - t0 > s.time_budget, run.cells.get("ceilings"))
        cells, skipped = grid(s), []
        for key, (method, *call) in cells:
            if key in run.cells:
                continue
            if key != "ceilings" and time.time() - t0 > s.time_budget:
                skipped.append(f"{key}: time budget (left for a rerun)")
                continue
            try:
                run.put(key, getattr(measure, method)(*call))
            except Exception as exc:  # noqa: BLE001 - one broken cell must not lose the others' results
                import traceback

                traceback.print_exc()
                skipped.append(f"{key}: failed: {type(exc).__name__}: {str(exc)[:300]}")
                torch.cuda.empty_cache()
                if key == "ceilings":
                    raise
        argv = sys.argv[2:] if sys.argv[1:2] == ["bench"] else sys.argv[1:]
        meta = {
            **info,
            "command": "moa-plan bench " + " ".join(shlex.quote(a) for a in argv),
            "dtype": "bfloat16",
            "sink": s.sink,
            "elapsed_s": round(time.time() - t0, 1),
            "density": "plan.density(N), the MoA paper's: mean over heads of min(N, sink + span) / N; "
            "attention_fraction: computed part of the causal N x N triangle",
        }
        run.finish([k for k, _ in cells], prune=False, meta=meta, skipped=skipped)
        res = results_view(run.cells, meta, skipped)
    write_atomic(json_path.with_suffix(".md"), render_markdown(res))
    print(render_markdown(res), flush=True)
    return json_path


def results_view(cells: dict[str, Any], meta: dict[str, Any], skipped: list[str]) -> dict[str, Any]:
    """The cells as the report reads them: meta, ceilings, kernels, guard, e2e, sweep, skipped."""
    groups = [v for k, v in cells.items() if k.startswith(("decode/", "prefill/")) and isinstance(v, dict)]
    e2e = [v for k, v in cells.items() if k.startswith("e2e/") and isinstance(v, dict)]
    gen = [v for k, v in cells.items() if k.startswith("generate/") and isinstance(v, dict)]
    return {
        "meta": meta,
        "ceilings": cells.get("ceilings", {}),
        "kernels": {k: e for g in groups for k, e in g.get("kernels", {}).items()},
        "guard": {k: e for g in groups for k, e in g.get("guard", {}).items()},
        "e2e": e2e,
        "generate": gen,
        "sweep": cells.get("sweep"),
        "skipped": [x for g in groups for x in g.get("skipped", [])] + skipped,
    }


if __name__ == "__main__":  # python -m moa_plan.evals.bench.cli ...
    from moa_plan.cli import main

    sys.exit(main(sys.argv[1:] if sys.argv[1:2] == ["bench"] else ["bench", *sys.argv[1:]]))
