"""Triton decode kernel (interpreter, CPU) over the per-head static cache against the dense reference.

The cache is built with runtime/cache.py's write_kv from a random plan (the layout in cache.py's
docstring); the reference is reference_attention of the last query on the full K/V of length n.
Error bound (stated, tested): max |out - ref| <= 1e-5 in fp32 and <= 2e-3 in fp16, inputs ~ N(0, 1).
"""

from __future__ import annotations

import itertools

import pytest
import torch
from _triton_cpu import kernels
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import one_layer_plans

from moa_plan.plan import FORMAT_VERSION, Layer, ModelShape, Plan, Rule
from moa_plan.runtime.cache import LayerLayout, allocate, write_kv
from moa_plan.runtime.reference import reference_attention

_, triton_decode = kernels()

TOL = {torch.float32: 1e-5, torch.float16: 2e-3}


@st.composite
def decode_cases(draw):
    n_max = draw(st.integers(1, 120))
    plan = draw(one_layer_plans(n_max, head_dims=[16, 32, 64]))
    n = draw(st.integers(1, n_max))
    return dict(
        plan=plan,
        n_max=n_max,
        n=n,
        prompt=draw(st.integers(1, n)),
        batch=draw(st.integers(1, 2)),
        dtype=draw(st.sampled_from([torch.float16, torch.float32])),
        splits=draw(st.sampled_from([None, 1, 2, 3])),
        block_n=draw(st.sampled_from([None, 16])),
        n_tensor=draw(st.booleans()),
        merge=draw(st.sampled_from(["fused", "kernel"])),
        loads=draw(st.sampled_from([None, "gather", "tma"])),
        seed=draw(st.integers(0, 2**16)),
    )


def _filled_cache(c):
    """K/V of positions 0..n-1 (prompt in one write, then token by token) and the full K/V."""
    plan, n = c["plan"], c["n"]
    shape = plan.model
    g = torch.Generator().manual_seed(c["seed"])
    hq, hkv, d = shape.num_attention_heads, shape.num_key_value_heads, shape.head_dim
    k = torch.randn(c["batch"], hkv, n, d, generator=g).to(c["dtype"])
    v = torch.randn(c["batch"], hkv, n, d, generator=g).to(c["dtype"])
    q = torch.randn(c["batch"], hq, d, generator=g).to(c["dtype"])
    layout = LayerLayout.from_plan(plan, 0, c["n_max"])
    kc, vc = allocate(layout, c["batch"], d, c["dtype"])
    kc.normal_(generator=g)  # poison: stale slots must never be read
    vc.fill_(float("nan"))
    prompt = c["prompt"]
    write_kv(kc, vc, layout, k[:, :, :prompt], v[:, :, :prompt], 0)
    for p in range(prompt, n):
        write_kv(kc, vc, layout, k[:, :, p : p + 1], v[:, :, p : p + 1], p)
    return q, k, v, kc, vc, layout


def _small_case(prompt: int):
    """(plan, filled cache as _filled_cache returns it, spans) of 4 heads on 2 KV heads, window 9,
    2 sinks, 40 tokens in the cache, the first `prompt` of them written at once."""
    shape = ModelShape(num_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    plan = Plan(format_version=FORMAT_VERSION, model=shape, sink=2, layers=[Layer(heads=[Rule(alpha=9, beta=0)] * 4)])
    c = dict(plan=plan, n_max=40, n=40, prompt=prompt, batch=1, dtype=torch.float32, seed=1)
    return plan, _filled_cache(c), torch.tensor(plan.spans(40)[0], dtype=torch.int32)


def _decode(q, kc, vc, layout, spans, sink, n, **kw):
    """The Triton decode over a cache with ``layout`` (its per-KV-head offsets, caps and sinks)."""
    return triton_decode.decode_attention(q, kc, vc, layout.offset, layout.cap, layout.n_sink, spans, sink, n, **kw)


@settings(max_examples=25, deadline=None)
@given(decode_cases())
def test_decode_matches_reference(c):
    plan, n = c["plan"], c["n"]
    q, k, v, kc, vc, layout = _filled_cache(c)
    spans = torch.tensor(plan.spans(n)[0], dtype=torch.int32)
    n_arg = torch.tensor(n, dtype=torch.int32) if c["n_tensor"] else n
    got = _decode(
        q, kc, vc, layout, spans, plan.sink, n_arg, num_splits=c["splits"], block_n=c["block_n"], merge=c["merge"],
        loads=c["loads"],
    )  # fmt: skip
    want = reference_attention(q[:, :, None], k, v, spans, plan.sink)[:, :, 0]
    assert got.shape == want.shape and got.dtype == q.dtype
    assert torch.isfinite(got).all(), "read a poisoned (NaN) slot or lost a row"
    err = (got.float() - want.float()).abs().max().item()
    assert err <= TOL[c["dtype"]], f"max abs error {err:.3g}"


def test_decode_long_ring_wraps_with_many_splits():
    """A ring that wrapped several times, read in many small chunks, one head of span 1."""
    shape = ModelShape(num_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    rules = [Rule(alpha=1, beta=0), Rule(alpha=37, beta=0), Rule(alpha=5, beta=0.25), Rule(alpha=0, beta=1)]
    plan = Plan(format_version=FORMAT_VERSION, model=shape, sink=5, layers=[Layer(heads=rules)])
    c = dict(plan=plan, n_max=300, n=300, prompt=200, batch=1, dtype=torch.float32, seed=0)
    q, k, v, kc, vc, layout = _filled_cache(c)
    spans = torch.tensor(plan.spans(300)[0], dtype=torch.int32)
    want = reference_attention(q[:, :, None], k, v, spans, plan.sink)[:, :, 0]
    for splits in (1, 5, 19):
        for merge, loads in itertools.product(("fused", "kernel"), ("gather", "tma")):
            got = _decode(
                q, kc, vc, layout, spans, plan.sink, 300, num_splits=splits, block_n=16, merge=merge, loads=loads
            )
            assert (got - want).abs().max().item() <= 1e-5, (splits, merge, loads)


def test_decode_fused_merge_in_several_steps():
    """A wide GQA group (32 query heads on one KV head) leaves the fused merge room for only 4 chunks
    per step (``fused_merge_block``), so 5 and 19 chunks are merged in 2 and 5 online steps."""
    shape = ModelShape(num_layers=1, num_attention_heads=32, num_key_value_heads=1, head_dim=16)
    rules = [Rule(alpha=1 + 9 * (h % 4), beta=0.1 * (h % 3)) for h in range(31)] + [Rule(alpha=0, beta=1)]
    plan = Plan(format_version=FORMAT_VERSION, model=shape, sink=4, layers=[Layer(heads=rules)])
    c = dict(plan=plan, n_max=260, n=260, prompt=200, batch=1, dtype=torch.float32, seed=2)
    q, k, v, kc, vc, layout = _filled_cache(c)
    spans = torch.tensor(plan.spans(260)[0], dtype=torch.int32)
    want = reference_attention(q[:, :, None], k, v, spans, plan.sink)[:, :, 0]
    assert triton_decode.fused_merge_block(32, 19) == {"GROUP_M": 32, "SPLITS_B": 4}
    for splits in (5, 19):
        got = _decode(q, kc, vc, layout, spans, plan.sink, 260, num_splits=splits, block_n=16, merge="fused")
        assert (got - want).abs().max().item() <= 1e-5, splits


def test_decode_tma_on_a_misaligned_cache_falls_back():
    """loads='tma' on caches whose base is not 16-byte aligned reads them with pointer loads instead."""
    plan, (q, k, v, kc, vc, layout), spans = _small_case(prompt=30)
    want = reference_attention(q[:, :, None], k, v, spans, plan.sink)[:, :, 0]
    shifted = []
    for t in (kc, vc):
        buf = torch.empty(t.numel() + 1, dtype=t.dtype)
        view = buf[1:].view(t.shape)  # 4 bytes past an aligned base
        view.copy_(t)
        shifted.append(view)
    got = _decode(q, *shifted, layout, spans, plan.sink, 40, num_splits=3, block_n=16, loads="tma")
    assert (got - want).abs().max().item() <= 1e-5


def test_decode_fused_merge_leaves_counters_at_zero():
    """The fused merge's last program resets its arrival counter: repeated launches (CUDA graph
    replays) start from zero, and the result is the same every time."""
    shape = ModelShape(num_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    plan = Plan(format_version=FORMAT_VERSION, model=shape, sink=3, layers=[Layer(heads=[Rule(alpha=0, beta=1)] * 4)])
    c = dict(plan=plan, n_max=90, n=90, prompt=90, batch=2, dtype=torch.float32, seed=1)
    q, k, v, kc, vc, layout = _filled_cache(c)
    spans = torch.tensor(plan.spans(90)[0], dtype=torch.int32)
    n = torch.tensor(90, dtype=torch.int32)
    args = (q, kc, vc, layout.offset, layout.cap, layout.n_sink, spans, plan.sink, n)
    first = triton_decode.decode_attention(*args, num_splits=4, block_n=16, merge="fused")
    counters = triton_decode.arrival_counters(q.device, 4)
    assert int(counters[:4].abs().sum()) == 0
    again = triton_decode.decode_attention(*args, num_splits=4, block_n=16, merge="fused")
    assert torch.equal(first, again)
    want = reference_attention(q[:, :, None], k, v, spans, plan.sink)[:, :, 0]
    assert (first - want).abs().max().item() <= 1e-5


def test_decode_settings(monkeypatch):
    """MOA_DECODE_MERGE / _LOADS / _PDL pick the defaults; a bad value names the variable."""
    monkeypatch.delenv(triton_decode.MERGE_ENV, raising=False)
    assert triton_decode.merge_setting() == "kernel"
    monkeypatch.setenv(triton_decode.MERGE_ENV, "kernel")
    assert triton_decode.merge_setting() == "kernel"
    monkeypatch.setenv(triton_decode.MERGE_ENV, "bogus")
    with pytest.raises(ValueError):
        triton_decode.merge_setting()
    monkeypatch.setenv(triton_decode.LOADS_ENV, "tma")
    assert triton_decode.loads_setting() == "tma"
    monkeypatch.setenv(triton_decode.LOADS_ENV, "pointer")
    with pytest.raises(ValueError, match="MOA_DECODE_LOADS"):
        triton_decode.loads_setting()
    monkeypatch.setenv(triton_decode.PDL_ENV, "1")
    assert triton_decode.pdl_setting() is True
    monkeypatch.setenv(triton_decode.PDL_ENV, "yes")
    with pytest.raises(ValueError, match="MOA_DECODE_PDL"):
        triton_decode.pdl_setting()


def test_decode_bad_merge_is_refused():
    plan, (q, k, v, kc, vc, layout), spans = _small_case(prompt=40)
    with pytest.raises(ValueError, match="merge must be one of"):
        _decode(q, kc, vc, layout, spans, plan.sink, 40, merge="both")


def test_decode_split_plan_fills_gpu():
    splits, chunk = triton_decode.plan_splits(batch=1, hkv=8, max_tokens=65536, block_n=64, sms=132)
    assert splits * 8 >= 132 and chunk % 64 == 0 and splits * chunk >= 65536
    splits, chunk = triton_decode.plan_splits(batch=128, hkv=8, max_tokens=4096, block_n=64, sms=132)
    assert chunk <= 2048 + 64 and (splits - 1) * chunk < 4096 <= splits * chunk  # no empty split
    assert triton_decode.plan_splits(batch=1, hkv=1, max_tokens=40, block_n=16, sms=132) == (2, 32)


def test_decode_rejects_bad_shapes():
    q = torch.randn(1, 3, 16)
    kc = torch.randn(1, 10, 16)
    i32 = torch.tensor([0, 5], dtype=torch.int32)
    with pytest.raises(ValueError):
        triton_decode.decode_attention(q, kc, kc, i32, i32, i32, torch.ones(3, dtype=torch.int32), 0, 4)
