"""Banded prefill (``cudnn_band_prefill``) on CPU: the split of a plan's heads into band calls over
strided views, and the Triton sink fold (interpreter), with PyTorch standing in for cuDNN's band
call (``torch_band``); the whole against the dense reference with the plan's mask.

Error bound (stated, tested): max |out - ref| <= 1e-5 in fp32; <= 4e-3 in fp16 (the band output is
rounded to fp16 once before the fold and once after), inputs ~ N(0, 1).
"""

from __future__ import annotations

import pytest
import torch
from _triton_cpu import band_prefill
from hypothesis import given, settings
from hypothesis import strategies as st

from moa_plan.runtime.reference import reference_attention

bp = band_prefill()

TOL = {torch.float32: 1e-5, torch.float16: 4e-3}


@st.composite
def head_plans(draw):
    hkv = draw(st.integers(1, 6))
    group = draw(st.sampled_from([1, 2, 3, 4, 8]))
    k_len = draw(st.integers(1, 5000))
    sink = draw(st.sampled_from([0, 64]) | st.integers(0, k_len))
    choices = draw(st.lists(st.integers(1, k_len + 10), min_size=1, max_size=4))
    spans = [draw(st.sampled_from(choices)) for _ in range(hkv * group)]
    return spans, sink, k_len, group


@settings(max_examples=200, deadline=None)
@given(head_plans())
def test_band_calls_cover_every_head_once_with_its_kv_head_and_band(case):
    spans, sink, k_len, group = case
    calls = bp.band_calls(spans, sink, k_len, group)
    seen = []
    for c in calls:
        assert c.n_q % c.n_kv == 0 and c.q_step >= 1
        per_kv = c.n_q // c.n_kv
        for i, h in enumerate(c.heads()):
            assert h // group == c.kv0 + i // per_kv, (c, h)  # the GQA order the call assumes
            full = spans[h] >= k_len or spans[h] + sink >= k_len
            assert c.window == (None if full else spans[h])
        seen += c.heads()
    assert sorted(seen) == list(range(len(spans)))
    if len(set(spans)) == 1:  # one span: whole KV groups, one call
        assert len(calls) == 1


@st.composite
def prefill_cases(draw):
    hkv = draw(st.integers(1, 2))
    group = draw(st.sampled_from([1, 2, 4]))
    k_len = draw(st.integers(1, 150))
    return dict(
        batch=draw(st.integers(1, 2)),
        hq=hkv * group,
        hkv=hkv,
        k_len=k_len,
        q_len=draw(st.sampled_from([k_len, 1]) | st.integers(1, k_len)),
        d=draw(st.sampled_from([16, 32, 64])),
        sink=draw(st.sampled_from([0, 4, 70]) | st.integers(0, k_len + 5)),
        spans=[draw(st.sampled_from([1, k_len]) | st.integers(1, k_len)) for _ in range(hkv * group)],
        dtype=draw(st.sampled_from([torch.float16, torch.float32])),
        seed=draw(st.integers(0, 2**16)),
        blhd=draw(st.booleans()),  # q/k/v as the transposed [B, L, H, D] views transformers passes
    )


@settings(max_examples=40, deadline=None)
@given(prefill_cases())
def test_band_prefill_with_sink_fold_matches_reference(c):
    g = torch.Generator().manual_seed(c["seed"])

    def make(h, n):
        if c["blhd"]:
            return torch.randn(c["batch"], n, h, c["d"], generator=g).to(c["dtype"]).transpose(1, 2)
        return torch.randn(c["batch"], h, n, c["d"], generator=g).to(c["dtype"])

    q, k, v = make(c["hq"], c["q_len"]), make(c["hkv"], c["k_len"]), make(c["hkv"], c["k_len"])
    spans = torch.tensor(c["spans"], dtype=torch.int32)
    got = bp.prefill_attention(q, k, v, spans, c["sink"], band=bp.torch_band)
    want = reference_attention(q, k, v, spans, c["sink"])
    assert got.shape == want.shape and got.dtype == q.dtype and torch.isfinite(got).all()
    err = (got.float() - want.float()).abs().max().item()
    assert err <= TOL[c["dtype"]], f"max |diff| {err:.3g}"


def test_sink_fold_leaves_rows_that_miss_no_sink_key_untouched():
    q = torch.randn(1, 2, 40, 16)
    k, v = torch.randn(1, 1, 40, 16), torch.randn(1, 1, 40, 16)
    out = torch.full((1, 2, 40, 16), 7.0)
    lse = torch.zeros(1, 2, 40)
    spans = torch.tensor([40, 10], dtype=torch.int32)  # head 0: whole rows; head 1: rows >= 10 miss sinks
    bp.fold_sink(q, k, v, out, lse, spans, 4)
    assert torch.equal(out[:, 0], torch.full_like(out[:, 0], 7.0))
    assert torch.equal(out[:, 1, :10], torch.full_like(out[:, 1, :10], 7.0))
    assert not torch.equal(out[:, 1, 10:], torch.full_like(out[:, 1, 10:], 7.0))


def test_sink_fold_with_rows_folds_only_the_listed_heads_from_their_offsets():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 3, 40, 16, generator=g)
    k, v = torch.randn(2, 1, 40, 16, generator=g), torch.randn(2, 1, 40, 16, generator=g)
    lse = torch.randn(2, 3, 40, generator=g)
    spans = torch.tensor([10, 12, 8], dtype=torch.int32)  # every head misses sinks from row ~10
    want = bp.fold_sink(q, k, v, torch.ones(2, 3, 40, 16), lse, spans, 4)  # all heads, head order
    flat = torch.full((300,), float("nan"))  # head 2's statistics at 7 + b * 150, head 0's at 60 + b * 150
    for h, at in ((2, 7), (0, 60)):
        for b in range(2):
            flat[at + b * 150 : at + b * 150 + 40] = lse[b, h]
    rows = torch.tensor([[2, 7, 150], [0, 60, 150]])
    got = bp.fold_sink(q, k, v, torch.ones(2, 3, 40, 16), flat, spans, 4, rows=rows)
    assert torch.equal(got[:, 1], torch.ones(2, 40, 16))  # head 1 is not listed: untouched
    assert torch.allclose(got[:, [0, 2]], want[:, [0, 2]], atol=1e-6)


def test_streams_take_the_longest_calls_first_each_onto_the_least_loaded():
    n = 1000
    calls = [bp.BandCall(None, 0, 1, 4, 0, 1), bp.BandCall(None, 4, 1, 4, 1, 1)]  # two long whole-row calls
    calls += [bp.BandCall(10, 8 + h, 1, 1, 2, 1) for h in range(6)]  # six short bands
    calls.sort(key=lambda c: -bp.band_cost(c, n))
    where = bp.assign_streams(calls, n, 4)
    assert where[0] != where[1]  # round-robin order would have done this too; the rest must not pile up
    loads = [sum(bp.band_cost(c, n) for c, w in zip(calls, where) if w == s) for s in range(4)]
    assert max(loads) == bp.band_cost(calls[0], n)  # the short calls fill the two idle streams
    assert bp.band_cost(bp.BandCall(3, 0, 1, 2, 0, 1), 5) == 2 * (1 + 2 + 3 + 3 + 3)


@pytest.mark.parametrize("batch", [1, 3])
def test_fold_rows_point_at_each_heads_statistics_whatever_the_launch_order(batch):
    """The cuDNN path launches long calls first; the fold reads each head's statistics from the
    scratch block its call wrote (blocks in layout order, a call's heads in call order)."""
    hq, hkv, n = 8, 2, 5
    q, k = torch.randn(batch, hq, n, 4), torch.randn(batch, hkv, n, 4)
    out = q.new_empty(batch, n, hq, 4).transpose(1, 2)
    calls = bp.band_calls([1, 3, 1, 5, 3, 3, 1, 2], 0, n + 1, hq // hkv)  # every head banded
    layouts = bp.band_layout(q, k, k, out, calls)
    scratch = torch.empty(batch * hq * n)
    for lay in layouts:  # every head's block filled with its own head index
        lay.stats.of(scratch).copy_(torch.tensor(lay.call.heads(), dtype=torch.float32).view(1, -1, 1))
    for order in (layouts, layouts[::-1], sorted(layouts, key=lambda lay: -lay.call.n_q)):
        rows = bp.fold_rows(order, n, "cpu").tolist()
        assert sorted(h for h, _, _ in rows) == list(range(hq))
        for h, offset, batch_stride in rows:
            for b in range(batch):
                assert scratch[offset + b * batch_stride : offset + b * batch_stride + n].eq(h).all()
    whole = bp.band_layout(q, k, k, out, bp.band_calls([n] * hq, 0, n, 4))
    assert bp.fold_rows(whole, n, "cpu") is None  # whole causal rows: nothing to fold


def test_host_spans_must_match_the_heads():
    q, k = torch.randn(1, 4, 8, 16), torch.randn(1, 2, 8, 16)
    spans = torch.full((4,), 8, dtype=torch.int32)
    with pytest.raises(ValueError, match="3 host spans"):
        bp.prefill_attention(q, k, k, spans, 0, band=bp.torch_band, host_spans=[8, 8, 8])
    got = bp.prefill_attention(q, k, k, spans, 2, band=bp.torch_band, host_spans=[8, 3, 5, 8])
    want = reference_attention(q, k, k, torch.tensor([8, 3, 5, 8], dtype=torch.int32), 2)
    assert (got - want).abs().max() <= TOL[torch.float32]  # the host spans are the ones used


def test_fold_launch_shape_does_not_change_the_result():
    """The sweep's other fold launches (rows per program, warps) fold the same rows the same way."""
    g = torch.Generator().manual_seed(5)
    q = torch.randn(1, 2, 70, 16, generator=g)
    k, v = torch.randn(1, 1, 70, 16, generator=g), torch.randn(1, 1, 70, 16, generator=g)
    lse = torch.randn(1, 2, 70, generator=g)
    spans = torch.tensor([9, 30], dtype=torch.int32)
    want = bp.fold_sink(q, k, v, torch.ones(1, 2, 70, 16), lse, spans, 5)
    for block_m, warps in ((16, 4), (64, 8)):
        got = bp.fold_sink(q, k, v, torch.ones(1, 2, 70, 16), lse, spans, 5, block_m=block_m, num_warps=warps)
        assert torch.allclose(got, want, atol=1e-6), (block_m, warps)


def test_short_prompts_go_to_the_triton_kernel(monkeypatch):
    """Below MIN_LEN keys the cuDNN path hands the whole prompt to the Triton kernel without a
    warning (measured faster there); from MIN_LEN on it tries the band calls (on CPU it then falls
    back, with its one warning)."""
    import warnings

    from moa_plan.runtime import triton_prefill

    seen = []
    monkeypatch.setattr(triton_prefill, "prefill_attention", lambda q, *rest: seen.append(q.shape[2]) or q)
    monkeypatch.setattr(bp, "MIN_LEN", 16)
    monkeypatch.setattr(bp, "_warned", set())
    spans = torch.tensor([4, 20], dtype=torch.int32)
    q, k = torch.randn(1, 2, 15, 8), torch.randn(1, 1, 15, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bp.prefill_attention(q, k, k, spans, 1)
    assert seen == [15]
    q, k = torch.randn(1, 2, 16, 8), torch.randn(1, 1, 16, 8)
    with pytest.warns(UserWarning, match="falls back to the Triton kernel"):
        bp.prefill_attention(q, k, k, spans, 1)
    assert seen == [15, 16]
