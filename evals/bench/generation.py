"""Whole-model ``model.generate`` on a GPU through the transformers integration.

Dense (SDPA + transformers' DynamicCache) against the same random-weight Llama with a MoA plan
applied by ``moa_plan.runtime.apply_plan`` (Triton kernels + MoACache). Unlike the decoder inside
``evals/bench/`` this goes through transformers, RoPE, sampling loop and all, so it shows what a
user of ``load_model(...).generate`` gets. Usage (GPU machine, repo importable):

    python -m moa_plan.evals.bench.generation --prompt 16384 --new-tokens 64 --batch 8 --out gen.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time


def _timed_generate(model, ids, new_tokens: int) -> tuple[float, float]:
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    with torch.no_grad():
        model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
        )
    torch.cuda.synchronize()
    return time.perf_counter() - start, torch.cuda.max_memory_allocated()


def measure(model, ids, new_tokens: int) -> dict[str, float]:
    """Prefill time (1 new token), decode tokens/s over the remaining steps, peak memory."""
    _timed_generate(model, ids, 4)  # warm-up: Triton compilation, cuBLAS heuristics
    prefill_s, _ = _timed_generate(model, ids, 1)
    total_s, peak = _timed_generate(model, ids, new_tokens)
    steps = new_tokens - 1
    batch = ids.shape[0]
    return {
        "prefill_ms": prefill_s * 1e3,
        "total_s": total_s,
        "decode_tok_per_s": batch * steps / (total_s - prefill_s),
        "ms_per_step": (total_s - prefill_s) / steps * 1e3,
        "peak_gib": peak / 2**30,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", type=int, default=4096)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--density", type=float, default=0.5)
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from moa_plan.build import uniform_plan
    from moa_plan.files import write_atomic
    from moa_plan.runtime import MoACache, apply_plan
    from moa_plan.runtime.hf_apply import model_shape

    if not torch.cuda.is_available():
        print("bench_generate: needs a CUDA device", file=sys.stderr)
        return 1
    n_max = args.prompt + args.new_tokens
    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 11 // 4,
        num_hidden_layers=args.layers,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=max(n_max, 8192),
        bos_token_id=0,
        eos_token_id=None,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    ids = torch.randint(1, config.vocab_size, (args.batch, args.prompt), device="cuda")

    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "args": vars(args)}
    results["dense_sdpa_dynamic_cache"] = measure(model, ids, args.new_tokens)
    plan = uniform_plan(model_shape(model), args.density, n_max)
    apply_plan(model, plan)
    results["plan"] = {"span": plan.provenance.get("span"), "density": plan.density(n_max)}
    report = MoACache(plan, n_max).memory_report(args.batch, torch.bfloat16)
    results["kv_cache"] = {**dataclasses.asdict(report), "ratio_to_dense": report.ratio}
    results["moa_triton_moacache"] = measure(model, ids, args.new_tokens)
    dense, moa = results["dense_sdpa_dynamic_cache"], results["moa_triton_moacache"]
    results["decode_speedup"] = moa["decode_tok_per_s"] / dense["decode_tok_per_s"]
    text = json.dumps(results, indent=1, default=str)
    print(text)
    if args.out:
        write_atomic(args.out, text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
