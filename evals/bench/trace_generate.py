"""Where a graph-replayed ``generate`` decode step spends its time: a profiler trace, summarised.

The bench's generate rows give one number per step; this says which kernels make it up. The
model and plan are the bench's (``generation.build_model``, ``cases.plan_of_kind``): a prompt is
prefilled, the decode step is captured by ``generate`` itself, then ``--steps`` replays of the
captured step run under ``torch.profiler`` (CUDA activity only: kernel times inside the graph).
Kernels are grouped by what they do (name patterns in ``CATEGORIES``); the table gives each
group's time per step, the bytes it must read (weights for the matmuls, the plan's KV bytes for
attention) and the bandwidth that implies, and the idle time between kernels (wall per step
minus busy time: launch gaps inside the graph).

    python -m moa_plan.evals.bench.trace_generate --out DIR [--batches 8,32 --compile none,inductor]

Each batch is traced with the step captured eagerly and with it compiled first
(``MOA_GRAPH_COMPILE``, see ``runtime.graph_generate``). Writes DIR/trace-generate.json (per
configuration: every kernel's name, calls and microseconds per step) and DIR/trace-generate.md
(the summaries). CUDA only.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path
from typing import Any

from moa_plan.args import comma_list, int_in
from moa_plan.evals.bench.timing import copy_bandwidth, kernel_records
from moa_plan.files import write_atomic

CATEGORIES = (  # first match wins; patterns on the lower-cased kernel name
    ("attention: MoA decode", r"_decode_kernel|_reduce_kernel|_merge"),
    ("matmul (weights)", r"gemm|gemv|cutlass|xmma|nvjet|cublas|splitk|sm90_|sm80_"),
    ("KV cache write", r"index_put|scatter|index_copy"),
    ("norm / reduction", r"reduce|norm|mean|pow|rsqrt"),
    ("argmax / bookkeeping", r"argmax|isin|where|logical|index_select|compare"),
    ("elementwise (rope, act, add, cast)", r"elementwise|vectorized|unrolled|cat|copy|silu|mul|add"),
)


def category(name: str) -> str:
    low = name.lower()
    return next((label for label, pat in CATEGORIES if re.search(pat, low)), "other")


def _replay_ms(graph: Any, steps: int) -> float:
    import torch

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / steps


def trace(model: Any, plan: Any, batch: int, context: int, steps: int, copy_gbps: float, backend: str) -> dict:
    """Trace ``steps`` replays of the captured decode step of ``model`` (planned with ``plan``);
    ``backend``: MOA_GRAPH_COMPILE for this decoder ('' = eager capture)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from moa_plan.evals.bench.generation import _free, env, step_bytes
    from moa_plan.runtime.graph_generate import COMPILE_ENV

    _free(model)
    ids = torch.randint(1, model.config.vocab_size, (batch, context), device="cuda")
    with torch.no_grad():
        with env(COMPILE_ENV, backend):  # read when generate builds the decoder, which captures the step
            model.generate(ids, do_sample=False, max_new_tokens=steps + 2, min_new_tokens=steps + 2)
        dec = model._moa_graph_decoder[1]
        dec.prefill(ids, 0)
        torch.cuda.synchronize()
        wall_ms = _replay_ms(dec.graph, steps)
        dec.prefill(ids, 0)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                dec.graph.replay()
            torch.cuda.synchronize()
    kernels: dict[str, dict[str, float]] = {}
    for _, us, name in kernel_records(prof):
        k = kernels.setdefault(name, {"calls": 0, "us": 0.0})
        k["calls"] += 1
        k["us"] += us
    rows = sorted(
        (
            {"kernel": n, "category": category(n), "calls_per_step": v["calls"] / steps, "us_per_step": v["us"] / steps}
            for n, v in kernels.items()
        ),
        key=lambda r: -r["us_per_step"],
    )
    b = step_bytes(model, plan, batch, context + steps // 2)
    groups: dict[str, dict[str, float]] = {}
    for r in rows:
        g = groups.setdefault(r["category"], {"us_per_step": 0.0, "launches_per_step": 0.0})
        g["us_per_step"] += r["us_per_step"]
        g["launches_per_step"] += r["calls_per_step"]
    busy_us = sum(g["us_per_step"] for g in groups.values())
    floor_ms = (b["weights"] + b["kv"]) / copy_gbps / 1e6
    return {
        "batch": batch,
        "context": context,
        "density": round(plan.density(context), 4),
        "layers": plan.model.num_layers,
        "steps": steps,
        "compile": backend or "none",
        "copy_GBps": copy_gbps,
        "wall_ms_per_step": round(wall_ms, 4),
        "busy_ms_per_step": round(busy_us / 1e3, 4),
        "floor_ms": round(floor_ms, 4),
        "weights_bytes": b["weights"],
        "kv_read_bytes": b["kv"],
        "groups": groups,
        "kernels": rows,
        "device": torch.cuda.get_device_name(),
    }


def markdown(res: dict[str, Any]) -> str:
    """The summary table: each kernel group's time per step, its share, and its bandwidth."""
    wall, busy = res["wall_ms_per_step"], res["busy_ms_per_step"]
    need = {"matmul (weights)": res["weights_bytes"], "attention: MoA decode": res["kv_read_bytes"]}
    out = [
        f"# generate decode step, traced ({res['device']})",
        "",
        f"Llama-3-8B-shaped, {res['layers']} layers, batch {res['batch']}, context {res['context']}, plan "
        f"{res['kind']} at density {res['density']} (the paper's), {res['steps']} graph replays, step "
        f"compiled: {res['compile']}.",
        f"Wall {wall:.3f} ms/step (CUDA events, no profiler); kernels busy {busy:.3f} ms; idle between "
        f"kernels {wall - busy:.3f} ms. Floor {res['floor_ms']:.3f} ms = ({res['weights_bytes'] / 1e9:.3f} GB "
        f"weights + {res['kv_read_bytes'] / 1e9:.3f} GB KV) / {res['copy_GBps']:.0f} GB/s; wall = "
        f"{wall / res['floor_ms']:.2f}x floor.",
        "",
        "| group | ms/step | share of wall | launches/step | bytes needed | GB/s | x its floor |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, g in sorted(res["groups"].items(), key=lambda kv: -kv[1]["us_per_step"]):
        ms = g["us_per_step"] / 1e3
        nb = need.get(name)
        rate = f"{nb / ms / 1e6:.0f}" if nb else "-"
        x = f"{ms / (nb / res['copy_GBps'] / 1e6):.2f}" if nb else "-"
        gb = f"{nb / 1e9:.3f} GB" if nb else "-"
        out.append(f"| {name} | {ms:.3f} | {ms / wall:.1%} | {g['launches_per_step']:.0f} | {gb} | {rate} | {x} |")
    out.append(f"| idle between kernels | {wall - busy:.3f} | {(wall - busy) / wall:.1%} | | | | |")
    out += ["", "Top kernels:", "", "| kernel | group | calls/step | us/step |", "|---|---|---|---|"]
    for r in res["kernels"][:20]:
        out.append(f"| `{r['kernel'][:90]}` | {r['category']} | {r['calls_per_step']:.0f} | {r['us_per_step']:.1f} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--batches", type=comma_list(int_in(1)), default=[8, 32])
    p.add_argument(
        "--compile",
        type=comma_list(str),
        default=["none", "inductor"],
        help="MOA_GRAPH_COMPILE values to trace ('none': captured eagerly; default none,inductor)",
    )
    p.add_argument("--context", type=int, default=16384)
    p.add_argument("--density", type=float, default=0.5)
    p.add_argument("--kind", default="synthetic", choices=("synthetic", "searched"))
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--steps", type=int, default=32)
    a = p.parse_args(argv)
    from moa_plan.evals.bench.cases import SHAPES, plan_of_kind
    from moa_plan.evals.bench.generation import build_model
    from moa_plan.runtime import apply_plan

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    shape = {**SHAPES["llama3-8b"], "layers": a.layers}
    model = build_model(shape, a.layers, a.context + a.steps + 2)
    plan = plan_of_kind(a.kind, shape, a.density, a.context, 64)
    apply_plan(model, plan)
    copy_gbps = copy_bandwidth("cuda")
    results, pages = [], []
    for batch in a.batches:
        for backend in a.compile:
            t0 = time.time()
            try:
                res = trace(model, plan, batch, a.context, a.steps, copy_gbps, "" if backend == "none" else backend)
            except Exception as exc:  # noqa: BLE001 - one failed configuration must not lose the others
                res = {"batch": batch, "compile": backend, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
                print(res, flush=True)
                results.append(res)
                continue
            res.update(kind=a.kind, seconds=round(time.time() - t0, 1))
            results.append(res)
            pages.append(markdown(res))
            print(pages[-1], flush=True)
            write_atomic(out / "trace-generate.json", json.dumps(results, indent=1))
            write_atomic(out / "trace-generate.md", "\n".join(pages))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
