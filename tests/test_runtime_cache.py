"""The per-head static KV cache: prefill-write then decode token by token equals the dense reference."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import one_layer_plans

from moa_plan.plan import FORMAT_VERSION, ModelShape, Plan, Rule
from moa_plan.runtime.cache import (
    LayerLayout,
    allocate,
    memory_report,
    plan_layouts,
    slot_positions,
    torch_decode_attention,
    write_kv,
)
from moa_plan.runtime.reference import reference_attention

ATOL = 1e-5  # float32 against float32 reference


@st.composite
def cache_cases(draw):
    n_max = draw(st.integers(1, 41))
    plan = draw(one_layer_plans(n_max, head_dims=[4, 8, 16], const_alpha=(-3, n_max + 3)))
    prompt = draw(st.integers(1, n_max))
    batch = draw(st.integers(1, 2))
    seed = draw(st.integers(0, 2**16))
    return plan, n_max, prompt, batch, seed


@settings(max_examples=40, deadline=None)
@given(cache_cases())
def test_prefill_then_decode_matches_reference(case):
    plan, n_max, prompt, batch, seed = case
    shape = plan.model
    g = torch.Generator().manual_seed(seed)
    hq, hkv, d = shape.num_attention_heads, shape.num_key_value_heads, shape.head_dim
    k = torch.randn(batch, hkv, n_max, d, generator=g)
    v = torch.randn(batch, hkv, n_max, d, generator=g)
    q = torch.randn(batch, hq, n_max, d, generator=g)
    layout = LayerLayout.from_plan(plan, 0, n_max)
    assert layout.slots == sum(plan.kv_slots(n_max)[0])
    kc, vc = allocate(layout, batch, d, torch.float32)
    kc.fill_(float("nan"))  # slots not yet written may hold anything: masked, never multiplied by 0
    vc.fill_(float("nan"))
    write_kv(kc, vc, layout, k[:, :, :prompt], v[:, :, :prompt], 0)
    for n in range(prompt, n_max + 1):
        if n > prompt:
            write_kv(kc, vc, layout, k[:, :, n - 1 : n], v[:, :, n - 1 : n], n - 1)
        spans = torch.tensor(plan.spans(n)[0], dtype=torch.int32)
        got = torch_decode_attention(
            q[:, :, n - 1], kc, vc, layout.offset, layout.cap, layout.n_sink, spans, plan.sink, n
        )
        want = reference_attention(q[:, :, n - 1 : n], k[:, :, :n], v[:, :, :n], spans, plan.sink)[:, :, 0]
        torch.testing.assert_close(got, want, atol=ATOL, rtol=ATOL, msg=f"n={n}")
        # slot_positions names exactly the positions the slots hold
        pos = slot_positions(layout, n)
        owner = torch.repeat_interleave(torch.arange(hkv), torch.tensor(layout.caps))
        held = pos >= 0
        assert int(pos.max()) < n
        torch.testing.assert_close(kc[:, held], k[:, owner[held], pos[held]], atol=0, rtol=0, equal_nan=False)
        # every position a head can see at n is held: sink positions and its window
        need = sum(min(n, min(plan.sink, c)) for c in layout.caps)
        assert int(held.sum()) >= need


@settings(max_examples=40, deadline=None)
@given(cache_cases(), st.data())
def test_chunked_write_equals_token_by_token(case, data):
    """write_kv of any chunking (incl. chunks longer than the ring) leaves the same cache."""
    plan, n_max, _, batch, seed = case
    d = plan.model.head_dim
    hkv = plan.model.num_key_value_heads
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(batch, hkv, n_max, d, generator=g)
    layout = LayerLayout.from_plan(plan, 0, n_max)
    one_k, one_v = allocate(layout, batch, d, torch.float32)
    for p in range(n_max):
        write_kv(one_k, one_v, layout, k[:, :, p : p + 1], -k[:, :, p : p + 1], p)
    cuts = sorted(data.draw(st.lists(st.integers(1, n_max - 1), unique=True, max_size=4))) if n_max > 1 else []
    ch_k, ch_v = allocate(layout, batch, d, torch.float32)
    bounds = [0, *cuts, n_max]
    for a, b in zip(bounds, bounds[1:]):
        write_kv(ch_k, ch_v, layout, k[:, :, a:b], -k[:, :, a:b], a)
    pos = slot_positions(layout, n_max)
    filled = pos >= 0
    torch.testing.assert_close(ch_k[:, filled], one_k[:, filled], atol=0, rtol=0)
    torch.testing.assert_close(ch_v[:, filled], one_v[:, filled], atol=0, rtol=0)


def test_slot_positions_small_example():
    # one KV head, sink 2, cap 5 -> ring 3; position p >= 2 lives in ring slot (p - 2) % 3
    layout = LayerLayout.from_caps([5], sink=2, n_max=10)
    assert slot_positions(layout, 7).tolist() == [0, 1, 5, 6, 4]
    assert slot_positions(layout, 3).tolist() == [0, 1, 2, -1, -1]
    assert slot_positions(layout, 1).tolist() == [0, -1, -1, -1, -1]


def test_write_outside_cache_is_refused():
    layout = LayerLayout.from_caps([3, 4], sink=1, n_max=6)
    kc, vc = allocate(layout, 1, 4, torch.float32)
    new = torch.zeros(1, 2, 2, 4)
    with pytest.raises(ValueError, match="outside"):
        write_kv(kc, vc, layout, new, new, 5)


def _half_plan(layers=2, hq=4, hkv=2, d=16, sink=4) -> Plan:
    shape = ModelShape(num_layers=layers, num_attention_heads=hq, num_key_value_heads=hkv, head_dim=d)
    return Plan(format_version=FORMAT_VERSION, model=shape, sink=sink, default=Rule(alpha=0.0, beta=0.5))


def test_memory_report_counts_the_plans_slots():
    plan = _half_plan()
    n_max = 1000
    rep = memory_report(plan, n_max, batch=3, dtype=torch.float16)
    slots = sum(map(sum, plan.kv_slots(n_max)))
    assert rep.slots == slots == sum(layout.slots for layout in plan_layouts(plan, n_max))
    assert rep.bytes_allocated == slots * 2 * 3 * 16 * 2
    assert rep.bytes_dense == 2 * 2 * n_max * 2 * 3 * 16 * 2
    # span 500 + sink 4 of 1000 slots per head
    assert rep.ratio == pytest.approx(504 / 1000)


@settings(max_examples=30, deadline=None)
@given(cache_cases(), st.integers(2, 9))
def test_chunk_after_cache_ignores_non_finite_unused_slots(case, chunk):
    """A chunk of queries over a cache whose unwritten slots hold NaN / inf equals the reference:
    the PyTorch path masks unread slots instead of multiplying them by a zero weight."""
    from moa_plan.runtime.attention import cached_keys, chunk_attention

    plan, n_max, prompt, batch, seed = case
    n_max += chunk
    shape = plan.model
    g = torch.Generator().manual_seed(seed)
    hq, hkv, d = shape.num_attention_heads, shape.num_key_value_heads, shape.head_dim
    k, v = (torch.randn(batch, hkv, n_max, d, generator=g) for _ in range(2))
    q = torch.randn(batch, hq, n_max, d, generator=g)
    layout = LayerLayout.from_plan(plan, 0, n_max)
    kc, vc = allocate(layout, batch, d, torch.float32)
    kc.fill_(float("inf"))
    vc.fill_(float("nan"))
    write_kv(kc, vc, layout, k[:, :, :prompt], v[:, :, :prompt], 0)
    n = prompt + chunk
    spans = torch.tensor(plan.spans(n)[0], dtype=torch.int32)
    got = chunk_attention(
        q[:, :, prompt:n],
        k[:, :, prompt:n],
        v[:, :, prompt:n],
        cached_keys(kc, vc, layout, prompt),
        prompt,
        spans,
        plan.sink,
    )
    want = reference_attention(q[:, :, prompt:n], k[:, :, :n], v[:, :, :n], spans, plan.sink)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=ATOL)
