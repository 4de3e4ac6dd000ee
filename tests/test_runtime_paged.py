"""Plan attention over vLLM's paged KV cache (``moa_plan.runtime.paged``), without vLLM.

Oracle: ``reference_attention`` on each sequence's keys laid out densely, spans at its own N.
Random block tables (pages shuffled, shared pool), page sizes, lengths, q_len (decode, chunk,
whole prompt), GQA groups, spans and sinks. The Triton kernel (interpreter, CPU) is checked
against the PyTorch path. Bounds: 1e-5 fp32, 2e-3 fp16 (inputs ~ N(0, 1)).
"""

from __future__ import annotations

import torch
from _triton_cpu import kernels
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import alphas, betas

from moa_plan import semantics
from moa_plan.plan import Layer, ModelShape, Plan, Rule
from moa_plan.runtime.paged import spans_at, torch_paged_attention, write_kv
from moa_plan.runtime.reference import reference_attention
from moa_plan.runtime.vllm import local_rules

triton_prefill, _ = kernels()
TOL = {torch.float32: 1e-5, torch.float16: 2e-3}


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(alphas(), betas()), min_size=1, max_size=6),
    st.lists(st.integers(1, 1 << 20), min_size=1, max_size=5),
)
def test_spans_at_is_the_spec_span(rules, lengths):
    a = torch.tensor([[r[0] for r in rules]], dtype=torch.float64)
    b = torch.tensor([[r[1] for r in rules]], dtype=torch.float64)
    got = spans_at(a, b, torch.tensor(lengths))
    assert got.tolist() == [[[semantics.span(x, y, n) for x, y in rules] for n in lengths]]
    assert (
        spans_at(
            torch.tensor([[0.0]], dtype=torch.float64), torch.tensor([[0.29]], dtype=torch.float64), torch.tensor([100])
        ).item()
        == 28
    )  # the spec's double-rounding example


@st.composite
def paged_cases(draw):
    hkv = draw(st.integers(1, 2))
    group = draw(st.sampled_from([1, 2, 3]))
    page = draw(st.sampled_from([1, 3, 16, 32]))
    seqs = []
    for _ in range(draw(st.integers(1, 3))):
        n = draw(st.integers(1, 90))
        q_len = draw(st.sampled_from([1, n]) | st.integers(1, n))
        spans = [draw(st.sampled_from([1, n]) | st.integers(1, n)) for _ in range(hkv * group)]
        seqs.append((n, q_len, spans))
    return dict(
        hkv=hkv,
        hq=hkv * group,
        page=page,
        seqs=seqs,
        sink=draw(st.sampled_from([0, 4]) | st.integers(0, 95)),
        d=draw(st.sampled_from([16, 32])),
        dtype=draw(st.sampled_from([torch.float16, torch.float32])),
        seed=draw(st.integers(0, 2**16)),
    )


def _paged(c):
    """Random per-sequence K/V scattered into a shuffled page pool; the dense copies for the oracle."""
    g = torch.Generator().manual_seed(c["seed"])
    page, hkv, hq, d, dt = c["page"], c["hkv"], c["hq"], c["d"], c["dtype"]
    counts = [-(-n // page) for n, _, _ in c["seqs"]]
    pool = sum(counts) + 2
    order = torch.randperm(pool, generator=g)
    width = max(counts)
    table = torch.full((len(counts), width), pool - 1, dtype=torch.int32)  # unused entries point anywhere
    # the cache is a strided view of a [pages, Hkv, PAGE, 2D] buffer, as vLLM's per-layer cache
    kv = torch.randn(pool, hkv, page, 2 * d, generator=g).to(dt)
    k_cache, v_cache = kv.transpose(1, 2).split(d, dim=-1)
    dense, queries, start, used = [], [], [0], 0
    for s, (n, q_len, _) in enumerate(c["seqs"]):
        table[s, : counts[s]] = order[used : used + counts[s]].to(torch.int32)
        used += counts[s]
        k = torch.randn(n, hkv, d, generator=g).to(dt)
        v = torch.randn(n, hkv, d, generator=g).to(dt)
        pos = torch.arange(n)
        slots = table[s, pos // page].long() * page + pos % page
        write_kv(k, v, k_cache, v_cache, slots)
        dense.append((k, v))
        queries.append(torch.randn(q_len, hq, d, generator=g).to(dt))
        start.append(start[-1] + q_len)
    spans = torch.tensor([sp for _, _, sp in c["seqs"]], dtype=torch.int32)
    return torch.cat(queries), k_cache, v_cache, table, start, [n for n, _, _ in c["seqs"]], spans, dense


def _reference(c, query, start, dense, spans):
    outs = []
    for s, (k, v) in enumerate(dense):
        q = query[start[s] : start[s + 1]].transpose(0, 1).unsqueeze(0)
        ref = reference_attention(
            q, k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0), spans[s], c["sink"], 0.125
        )
        outs.append(ref[0].transpose(0, 1))
    return torch.cat(outs)


@settings(max_examples=30, deadline=None)
@given(paged_cases())
def test_torch_paged_matches_reference(c):
    query, k_cache, v_cache, table, start, lens, spans, dense = _paged(c)
    out = torch.full_like(query, float("nan"))
    torch_paged_attention(query, k_cache, v_cache, table, start, lens, spans, c["sink"], 0.125, out, block=8)
    err = (out.float() - _reference(c, query, start, dense, spans).float()).abs().max().item()
    assert err <= TOL[c["dtype"]], f"max abs error {err:.3g} for {c}"


@settings(max_examples=25, deadline=None)
@given(paged_cases())
def test_triton_paged_matches_torch_path(c):
    query, k_cache, v_cache, table, start, lens, spans, dense = _paged(c)
    want = torch_paged_attention(
        query, k_cache, v_cache, table, start, lens, spans, c["sink"], 0.125, torch.empty_like(query)
    )
    got = torch.full_like(query, float("nan"))
    triton_prefill.paged_attention(
        query,
        k_cache,
        v_cache,
        table,
        torch.tensor(start, dtype=torch.int32),
        torch.tensor(lens, dtype=torch.int32),
        spans,
        c["sink"],
        0.125,
        got,
        max(b - a for a, b in zip(start, start[1:])),
    )
    err = (got.float() - want.float()).abs().max().item()
    assert err <= TOL[c["dtype"]], f"max abs error {err:.3g} for {c}"


def test_write_kv_skips_padding_slots():
    k_cache = torch.zeros(2, 4, 1, 2)
    v_cache = torch.zeros(2, 4, 1, 2)
    key = torch.arange(6.0).view(3, 1, 2)
    write_kv(key, -key, k_cache, v_cache, torch.tensor([5, -1, 0]))
    assert k_cache[1, 1, 0].tolist() == [0.0, 1.0] and k_cache[0, 0, 0].tolist() == [4.0, 5.0]
    assert v_cache[1, 1, 0].tolist() == [-0.0, -1.0] and int((k_cache != 0).sum()) == 3


def test_tensor_parallel_ranks_split_the_heads():
    shape = ModelShape(num_layers=2, num_attention_heads=6, num_key_value_heads=2, head_dim=16)
    plan = Plan(
        format_version=1,
        model=shape,
        sink=3,
        layers=[Layer(heads=[Rule(alpha=h * 7 - l, beta=h / 7) for h in range(6)]) for l in range(2)],
    )
    full = local_rules(plan, 0, 6)
    lengths = torch.tensor([5, 77, 300])
    whole = spans_at(full.alphas, full.betas, lengths)
    for tp in (2, 3, 6):
        parts = [local_rules(plan, r, 6 // tp) for r in range(tp)]
        got = torch.cat([spans_at(p.alphas, p.betas, lengths) for p in parts], dim=2)
        assert torch.equal(got, whole) and all(p.sink == 3 for p in parts)
    assert whole[:, 1].tolist() == [[plan.spans(77)[l][h] for h in range(6)] for l in range(2)]
