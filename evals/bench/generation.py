"""Whole-model ``model.generate`` on a GPU, what a user of ``load_model(...).generate`` gets.

A random-weight bf16 Llama with ``--layers`` Llama-3-8B-shaped layers (8 by default: the issue's
model), a prompt of ``context`` tokens, greedy decoding. Rows:

- dense: transformers' recommended fast path, ``cache_implementation="static"`` (transformers then
  compiles the decode step, mode "reduce-overhead": CUDA graphs) with SDPA;
- moa graph eager capture: a plan applied (``apply_plan``), ``generate`` replays one captured
  decode step (``runtime.graph_generate``) recorded from eager PyTorch (``MOA_GRAPH_COMPILE=none``);
- moa graph compiled (``--gen-compile BACKEND[:MODE]``, several allowed): the same, the step compiled
  before capture (``MOA_GRAPH_COMPILE``: fuses the per-layer small operations; 'inductor' is what
  ``generate`` does by default on CUDA);
- moa loop: the same plan through transformers' own loop (``MOA_GRAPH_DECODE=0``), for comparison.

Each at a few batches, up to the largest that fits (an out-of-memory try is reported and the next
smaller one run). Decode ms/step = (generate time of ``new`` tokens - of one token) / (new - 1),
each the best of two calls. The hardware floor of a step = (weights read: every
parameter but the embedding table, plus one embedding row per sequence; KV bytes the plan reads at
the middle length) / measured copy bandwidth; ``x_floor`` = measured / floor.
"""

from __future__ import annotations

import contextlib
import gc
import os
import time
from typing import Any

from moa_plan.evals.bench.cases import SHAPES, decode_tokens_read, plan_label, plan_of_kind


def build_model(shape: dict[str, int], layers: int, n_max: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=shape["vocab"],
        hidden_size=shape["hidden"],
        intermediate_size=shape["inter"],
        num_hidden_layers=layers,
        num_attention_heads=shape["hq"],
        num_key_value_heads=shape["hkv"],
        head_dim=shape["d"],
        max_position_embeddings=max(n_max, 8192),
        bos_token_id=0,
        eos_token_id=None,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    with torch.device("cuda"):
        return LlamaForCausalLM(config).to(torch.bfloat16).eval()


def step_bytes(model, plan, batch: int, n: int) -> dict[str, int]:
    """Bytes one decode step must read at length n: weights (all but the embedding table, plus one
    row per sequence) and K/V (dense: every position; plan: what the decode kernel reads)."""
    embed = model.get_input_embeddings().weight
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) - embed.numel() * embed.element_size()
    weights += batch * embed.shape[1] * embed.element_size()
    shape = plan.model
    per_token = 2 * shape.head_dim * 2 * batch  # K and V, bf16
    if plan.provenance.get("dense"):
        kv = shape.num_layers * shape.num_key_value_heads * n * per_token
    else:
        group = shape.num_attention_heads // shape.num_key_value_heads
        spans, caps = plan.spans(n), plan.kv_slots(n)
        kv = sum(sum(decode_tokens_read(spans[l], caps[l], plan.sink, n, group)) for l in range(shape.num_layers))
        kv *= per_token
    return {"weights": weights, "kv": kv}


@contextlib.contextmanager
def env(name: str, value: str):
    """``name=value`` in the environment for the block (read when ``generate`` builds its decoder)."""
    os.environ[name] = value
    try:
        yield
    finally:
        os.environ.pop(name, None)


def _sync_time(fn) -> float:
    import torch

    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def measure(model, ids, new: int, **gen_kw: Any) -> dict[str, float]:
    """Decode ms/step and tokens/s of ``generate`` (after one warm-up call), prefill ms, peak GB.

    A step is timed as the difference of two ``generate`` calls, ``new`` tokens and one token,
    divided by ``new - 1``: both calls prefill the same way, so what remains is the decode steps
    as ``generate`` runs them (its own prefill, cache writes included, cancel out; a bare forward
    on the prompt, used before, missed the cache writes and overstated the step). The one-token
    call is the reported prefill. transformers' static cache keeps the larger length across calls,
    so its compiled step is not recompiled for the shorter one.
    """
    import torch

    def gen(tokens: int):
        with torch.no_grad():
            model.generate(ids, do_sample=False, max_new_tokens=tokens, min_new_tokens=tokens, **gen_kw)

    torch.cuda.reset_peak_memory_stats()
    gen(new)  # warm-up: compilation, graph capture, cuBLAS heuristics
    prefill_s = min(_sync_time(lambda: gen(1)) for _ in range(2))
    total_s = min(_sync_time(lambda: gen(new)) for _ in range(2))
    step_ms = (total_s - prefill_s) / (new - 1) * 1e3
    return {
        "prefill_ms": round(prefill_s * 1e3, 2),
        "generate_s": round(total_s, 3),
        "ms_per_step": round(step_ms, 3),
        "tok_per_s": round(ids.shape[0] * 1e3 / step_ms, 1),
        "peak_GB": round(torch.cuda.max_memory_allocated() / 1e9, 2),
    }


def _free(model) -> None:
    """Drop what a row left on the model (a kept decode graph, transformers' cache and compiled
    step), then everything compiled or cached on the device."""
    from moa_plan.runtime.graph_generate import release

    release(model)
    for attr in ("_cache", "_compiled_call"):  # removed, not set to None: transformers tests hasattr
        model.__dict__.pop(attr, None)
    _free_all()


def row(model, plan, label: str, batch: int, context: int, new: int, copy_gbps: float, **gen_kw: Any) -> dict:
    """One measured row with its floor arithmetic, or the error that stopped it."""
    import torch

    out: dict[str, Any] = {"variant": label, "batch": batch}
    try:
        ids = torch.randint(1, model.config.vocab_size, (batch, context), device="cuda")
        out.update(measure(model, ids, new, **gen_kw))
        b = step_bytes(model, plan, batch, context + new // 2)
        floor_ms = (b["weights"] + b["kv"]) / copy_gbps / 1e6
        out.update(
            weights_bytes=b["weights"],
            kv_read_bytes=b["kv"],
            floor_ms=round(floor_ms, 3),
            x_floor=round(out["ms_per_step"] / floor_ms, 3),
            floor=f"({b['weights'] / 1e9:.3f} GB weights + {b['kv'] / 1e9:.3f} GB KV) / {copy_gbps:.0f} GB/s "
            f"= {floor_ms:.3f} ms",
        )
    except torch.cuda.OutOfMemoryError as exc:
        out["error"] = f"out of memory: {str(exc)[:120]}"
    except Exception as exc:  # noqa: BLE001 - one broken row must not lose the others
        import traceback

        traceback.print_exc()
        out["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    print("generate", out, flush=True)
    _free(model)
    return out


def _largest(run, batches: list[int]) -> list[dict]:
    """Rows at the batches in order; past the first out-of-memory only smaller ones are tried."""
    rows, limit = [], None
    for b in batches:
        if limit is not None and b >= limit:
            continue
        r = run(b)
        rows.append(r)
        if "out of memory" in r.get("error", ""):
            limit = b
    return rows


def suite(s: Any, copy_gbps: float, shape_name: str) -> dict[str, Any]:
    """Dense (transformers static cache, compiled) vs MoA plans through ``generate``."""
    from moa_plan.build import dense_plan
    from moa_plan.runtime import apply_plan
    from moa_plan.runtime.graph_generate import COMPILE_ENV, ENV
    from moa_plan.runtime.hf_apply import model_shape

    shape = {**SHAPES[shape_name], "layers": s.gen_layers}
    ctx, new = s.e2e_context, s.gen_new_tokens
    deadline = time.time() + s.gen_budget
    model = build_model(shape, s.gen_layers, ctx + new)
    dense = dense_plan(model_shape(model)).model_copy(update={"provenance": {"dense": True}})
    res: dict[str, Any] = {
        "shape": shape_name,
        "layers": s.gen_layers,
        "context": ctx,
        "new_tokens": new,
        "copy_GBps": copy_gbps,
        "rows": [],
    }
    rows = res["rows"]
    for dens in s.e2e_densities:
        for kind in s.plan_kinds:
            if time.time() > deadline:
                rows.append({"variant": plan_label(dens, kind), "error": "time budget"})
                continue
            plan = plan_of_kind(kind, shape, dens, ctx, s.sink)
            apply_plan(model, plan)
            label = f"moa graph eager capture {plan_label(dens, kind)}"
            with env(COMPILE_ENV, "none"):
                got = _largest(lambda b: row(model, plan, label, b, ctx, new, copy_gbps), s.gen_batches)
            for how in s.gen_compile:  # the same rows with the step compiled before capture
                compiled = f"moa graph compiled ({how}) {plan_label(dens, kind)}"
                with env(COMPILE_ENV, how):
                    got += _largest(lambda b: row(model, plan, compiled, b, ctx, new, copy_gbps), s.gen_batches)
            if dens == s.e2e_densities[0] and kind == s.plan_kinds[0]:
                with env(ENV, "0"):
                    loop = f"moa transformers loop {plan_label(dens, kind)}"
                    got.append(row(model, plan, loop, 8, ctx, new, copy_gbps))
            for r in got:  # the plan's own figures, also on the transformers-loop row
                r.update(density=round(plan.density(ctx), 4), attention_fraction=round(plan.attention_fraction(ctx), 4))
            rows.extend(got)
    _unplan(model)
    for b in s.gen_dense_batches:
        if time.time() > deadline:
            rows.append({"variant": "dense static+compile", "batch": b, "error": "time budget"})
            continue
        rows.append(row(model, dense, "dense static+compile", b, ctx, new, copy_gbps, cache_implementation="static"))
    model = None
    _free_all()
    return res


def _unplan(model) -> None:
    """Back to plain transformers (SDPA, its own generate, no input-check hook) for the dense rows."""
    decoder = model.get_decoder()
    hook = getattr(decoder, "_moa_input_check", None)
    if hook is not None:
        hook.remove()
        decoder._moa_input_check = None
    model.__dict__.pop("generate", None)
    model.set_attn_implementation("sdpa")


def _free_all() -> None:
    import torch

    torch._dynamo.reset()
    gc.collect()
    torch.cuda.empty_cache()
