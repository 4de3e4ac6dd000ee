"""Triton prefill kernel (interpreter, CPU) against the dense reference with the plan's mask.

Error bound (stated, tested): max |out - ref| <= 1e-5 in fp32 (IEEE dots) and <= 2e-3 in fp16
(fp16 inputs, P rounded to fp16 before P @ V, fp32 accumulation), inputs ~ N(0, 1).
"""

from __future__ import annotations

import torch
from _triton_cpu import kernels
from hypothesis import given, settings
from hypothesis import strategies as st

from moa_plan.runtime.reference import reference_attention

triton_prefill, _ = kernels()

TOL = {torch.float32: 1e-5, torch.float16: 2e-3}


@st.composite
def prefill_cases(draw):
    hkv = draw(st.integers(1, 2))
    group = draw(st.sampled_from([1, 2, 3]))
    hq = hkv * group
    k_len = draw(st.integers(1, 150))
    q_len = draw(st.sampled_from([k_len, 1]) | st.integers(1, k_len))
    sink = draw(st.sampled_from([0, 0, 4]) | st.integers(0, k_len + 5))
    spans = [draw(st.sampled_from([1, k_len]) | st.integers(1, k_len)) for _ in range(hq)]
    return dict(
        batch=draw(st.integers(1, 2)),
        hq=hq,
        hkv=hkv,
        q_len=q_len,
        k_len=k_len,
        d=draw(st.sampled_from([16, 32, 64])),
        sink=sink,
        spans=spans,
        dtype=draw(st.sampled_from([torch.float16, torch.float32])),
        seed=draw(st.integers(0, 2**16)),
        tma=draw(st.booleans()),  # K/V through tensor descriptors (the Hopper TMA path) or pointers
    )


def _inputs(c):
    g = torch.Generator().manual_seed(c["seed"])
    q = torch.randn(c["batch"], c["hq"], c["q_len"], c["d"], generator=g).to(c["dtype"])
    k = torch.randn(c["batch"], c["hkv"], c["k_len"], c["d"], generator=g).to(c["dtype"])
    v = torch.randn(c["batch"], c["hkv"], c["k_len"], c["d"], generator=g).to(c["dtype"])
    return q, k, v, torch.tensor(c["spans"], dtype=torch.int32)


@settings(max_examples=25, deadline=None)
@given(prefill_cases())
def test_prefill_matches_reference(c):
    q, k, v, spans = _inputs(c)
    got = triton_prefill.prefill_attention(q, k, v, spans, c["sink"], config={"TMA": int(c["tma"])})
    want = reference_attention(q, k, v, spans, c["sink"])
    assert got.shape == want.shape and got.dtype == q.dtype
    assert torch.isfinite(got).all()
    err = (got.float() - want.float()).abs().max().item()
    assert err <= TOL[c["dtype"]], f"max abs error {err:.3g} for {c}"


def test_prefill_block_edges_and_scale():
    """Lengths around the block size, a window edge inside a block, and an explicit scale."""
    for k_len, q_len, sink, spans in [
        (64, 64, 0, [1, 64]),
        (65, 33, 2, [31, 33]),
        (97, 97, 96, [1, 2]),
        (130, 7, 0, [65, 128]),
    ]:
        c = dict(
            batch=1,
            hq=2,
            hkv=1,
            q_len=q_len,
            k_len=k_len,
            d=32,
            sink=sink,
            spans=spans,
            dtype=torch.float32,
            seed=k_len,
        )
        q, k, v, sp = _inputs(c)
        got = triton_prefill.prefill_attention(q, k, v, sp, sink, scale=0.3)
        want = reference_attention(q, k, v, sp, sink, scale=0.3)
        assert (got - want).abs().max().item() <= 1e-5


def test_prefill_noncontiguous_inputs():
    """Transposed [B, L, H, D] views (what transformers passes) give the same result."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 40, 4, 16, generator=g).transpose(1, 2)
    k = torch.randn(2, 40, 2, 16, generator=g).transpose(1, 2)
    v = torch.randn(2, 40, 2, 16, generator=g).transpose(1, 2)
    spans = torch.tensor([1, 5, 40, 17], dtype=torch.int32)
    for tma in (0, 1):
        got = triton_prefill.prefill_attention(q, k, v, spans, 3, config={"TMA": tma})
        assert (got - reference_attention(q, k, v, spans, 3)).abs().max().item() <= 1e-5


def test_prefill_rejects_bad_shapes():
    q = torch.randn(1, 3, 4, 16)
    k = torch.randn(1, 2, 4, 16)
    for args in [
        (q, k, k, torch.ones(3, dtype=torch.int32), 0),  # 3 % 2 != 0
        (torch.randn(1, 2, 5, 16), k, k, torch.ones(2, dtype=torch.int32), 0),  # Lq > Lk
        (
            torch.randn(1, 2, 4, 24),
            torch.randn(1, 2, 4, 24),
            torch.randn(1, 2, 4, 24),
            torch.ones(2, dtype=torch.int32),
            0,
        ),
    ]:  # D = 24
        try:
            triton_prefill.prefill_attention(*args)
        except ValueError:
            continue
        raise AssertionError("bad input accepted")
