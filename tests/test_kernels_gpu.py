"""GPU property tests of the Triton kernels in bf16/fp16 and at realistic shapes (skipped without CUDA).

Run in a process without TRITON_INTERPRET (tools/gpu_check.sh does). Error bound (stated, tested):
‖out - ref‖ / ‖ref‖ <= 1e-2 and max |out - ref| <= 3e-2 in bf16 (8-bit mantissa, P rounded to bf16
before P @ V), <= 2e-3 / 5e-3 in fp16; ref = fp32 dense reference on the same (rounded) inputs.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import GPU_ONLY
from hypothesis import given, settings
from hypothesis import strategies as st

from moa_plan.plan import FORMAT_VERSION, Layer, ModelShape, Plan, Rule
from moa_plan.runtime.reference import reference_attention

pytestmark = GPU_ONLY

TOL = {torch.bfloat16: (1e-2, 3e-2), torch.float16: (2e-3, 5e-3)}


def _check(got, want, dtype, what):
    assert torch.isfinite(got).all(), f"{what}: non-finite output"
    diff = got.float() - want.float()
    rel = (diff.norm() / want.float().norm()).item()
    mx = diff.abs().max().item()
    rel_tol, abs_tol = TOL[dtype]
    assert rel <= rel_tol and mx <= abs_tol, f"{what}: rel {rel:.3g} max {mx:.3g}"


@st.composite
def prefill_cases(draw):
    hkv = draw(st.sampled_from([1, 2, 4]))
    group = draw(st.sampled_from([1, 2, 4]))
    k_len = draw(st.integers(1, 2100))
    return dict(
        batch=draw(st.integers(1, 2)),
        hq=hkv * group,
        hkv=hkv,
        k_len=k_len,
        q_len=draw(st.sampled_from([k_len, 1]) | st.integers(1, k_len)),
        d=draw(st.sampled_from([64, 128])),
        sink=draw(st.sampled_from([0, 64]) | st.integers(0, k_len)),
        spans=[draw(st.sampled_from([1, k_len]) | st.integers(1, k_len)) for _ in range(hkv * group)],
        dtype=draw(st.sampled_from([torch.bfloat16, torch.bfloat16, torch.float16])),
        seed=draw(st.integers(0, 2**16)),
        tma=draw(st.sampled_from([None, 0, 1])),  # the default launch, pointer loads, TMA descriptors
    )


@settings(max_examples=30, deadline=None)
@given(prefill_cases())
def test_gpu_prefill_matches_reference(c):
    from moa_plan.runtime.triton_prefill import prefill_attention

    g = torch.Generator(device="cuda").manual_seed(c["seed"])
    dev, dt = "cuda", c["dtype"]
    q = torch.randn(c["batch"], c["hq"], c["q_len"], c["d"], device=dev, generator=g).to(dt)
    k = torch.randn(c["batch"], c["hkv"], c["k_len"], c["d"], device=dev, generator=g).to(dt)
    v = torch.randn(c["batch"], c["hkv"], c["k_len"], c["d"], device=dev, generator=g).to(dt)
    spans = torch.tensor(c["spans"], dtype=torch.int32, device=dev)
    got = prefill_attention(q, k, v, spans, c["sink"], config=None if c["tma"] is None else {"TMA": c["tma"]})
    _check(got, reference_attention(q, k, v, spans, c["sink"]), dt, str({**c, "spans": "..."}))


@settings(max_examples=30, deadline=None)
@given(prefill_cases(), st.integers(1, 4))
def test_gpu_cudnn_band_prefill_matches_reference(c, streams):
    """The cuDNN band calls (strided views, 1-4 streams) + the sink fold, as the Triton prefill
    (prompts of any length: the rule that sends short ones to Triton is lifted)."""
    pytest.importorskip("cudnn", reason="the cudnn extra (nvidia-cudnn-frontend) is not installed")
    from moa_plan.runtime import cudnn_band_prefill as band_module
    from moa_plan.runtime.cudnn_band_prefill import prefill_attention

    c = {**c, "q_len": c["k_len"]}  # whole prompts: the band path's case (queries after cached keys go to Triton)
    g = torch.Generator(device="cuda").manual_seed(c["seed"])
    dev, dt = "cuda", c["dtype"]
    q = torch.randn(c["batch"], c["q_len"], c["hq"], c["d"], device=dev, generator=g).to(dt).transpose(1, 2)
    k = torch.randn(c["batch"], c["hkv"], c["k_len"], c["d"], device=dev, generator=g).to(dt)
    v = torch.randn(c["batch"], c["hkv"], c["k_len"], c["d"], device=dev, generator=g).to(dt)
    spans = torch.tensor(c["spans"], dtype=torch.int32, device=dev)
    saved = band_module.STREAMS, band_module.MIN_LEN
    band_module.STREAMS, band_module.MIN_LEN = streams, 0
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = prefill_attention(q, k, v, spans, c["sink"])
        torch.cuda.synchronize()
    finally:
        band_module.STREAMS, band_module.MIN_LEN = saved
    _check(got, reference_attention(q, k, v, spans, c["sink"]), dt, str({**c, "spans": "..."}))
    fell_back = [str(w.message) for w in caught if "falls back" in str(w.message)]
    assert not fell_back or c["k_len"] < 128, fell_back  # whole prompts of >= 128 tokens run on cuDNN


@st.composite
def decode_cases(draw):
    hkv = draw(st.sampled_from([1, 2, 8]))
    group = draw(st.sampled_from([1, 4]))
    hq = hkv * group
    n_max = draw(st.integers(1, 5000))
    rules = []
    for _ in range(hq):
        kind = draw(st.sampled_from(["one", "full", "const", "grow"]))
        rules.append(
            {
                "one": Rule(alpha=1, beta=0),
                "full": Rule(alpha=0, beta=1),
                "const": Rule(alpha=float(draw(st.integers(1, n_max))), beta=0),
                "grow": Rule(alpha=float(draw(st.integers(-64, 64))), beta=draw(st.floats(0.05, 0.9))),
            }[kind]
        )
    shape = ModelShape(
        num_layers=1, num_attention_heads=hq, num_key_value_heads=hkv, head_dim=draw(st.sampled_from([64, 128]))
    )
    plan = Plan(
        format_version=FORMAT_VERSION,
        model=shape,
        sink=draw(st.sampled_from([0, 64]) | st.integers(0, 100)),
        layers=[Layer(heads=rules)],
    )
    n = draw(st.integers(1, n_max))
    return dict(
        plan=plan,
        n_max=n_max,
        n=n,
        prompt=max(1, n - draw(st.integers(0, 3))),
        batch=draw(st.sampled_from([1, 3, 16])),
        dtype=draw(st.sampled_from([torch.bfloat16, torch.float16])),
        n_tensor=draw(st.booleans()),
        loads=draw(st.sampled_from([None, "gather", "tma"])),  # the default, then each way of reading
        pdl=draw(st.sampled_from([None, False, True])),
        merge=draw(st.sampled_from([None, "kernel", "fused"])),
        seed=draw(st.integers(0, 2**16)),
    )


@settings(max_examples=30, deadline=None)
@given(decode_cases())
def test_gpu_decode_matches_reference(c):
    from moa_plan.runtime.cache import LayerLayout, allocate, write_kv
    from moa_plan.runtime.triton_decode import decode_attention

    plan, n, dt, dev = c["plan"], c["n"], c["dtype"], "cuda"
    shape = plan.model
    hq, hkv, d = shape.num_attention_heads, shape.num_key_value_heads, shape.head_dim
    g = torch.Generator(device=dev).manual_seed(c["seed"])
    k = torch.randn(c["batch"], hkv, n, d, device=dev, generator=g).to(dt)
    v = torch.randn(c["batch"], hkv, n, d, device=dev, generator=g).to(dt)
    q = torch.randn(c["batch"], hq, d, device=dev, generator=g).to(dt)
    layout = LayerLayout.from_plan(plan, 0, c["n_max"], device=dev)
    kc, vc = allocate(layout, c["batch"], d, dt, device=dev)
    vc.fill_(float("nan"))  # stale slots must never be read
    write_kv(kc, vc, layout, k[:, :, : c["prompt"]], v[:, :, : c["prompt"]], 0)
    for p in range(c["prompt"], n):
        write_kv(kc, vc, layout, k[:, :, p : p + 1], v[:, :, p : p + 1], p)
    spans = torch.tensor(plan.spans(n)[0], dtype=torch.int32, device=dev)
    n_arg = torch.tensor(n, dtype=torch.int32, device=dev) if c["n_tensor"] else n
    got = decode_attention(
        q, kc, vc, layout.offset, layout.cap, layout.n_sink, spans, plan.sink, n_arg,
        loads=c["loads"], pdl=c["pdl"], merge=c["merge"],
    )  # fmt: skip
    want = reference_attention(q[:, :, None], k, v, spans, plan.sink)[:, :, 0]
    where = f"n={n} n_max={c['n_max']} batch={c['batch']} loads={c['loads']} pdl={c['pdl']} merge={c['merge']}"
    _check(got, want, dt, where)


@pytest.mark.parametrize("hq,hkv", [(32, 8), (32, 32)])
def test_gpu_llama_shape_8k(hq, hkv):
    """Llama-3-8B / 7B-MHA attention shapes at 8k with heterogeneous spans, bf16, both kernels."""
    from moa_plan.runtime.cache import LayerLayout, allocate, write_kv
    from moa_plan.runtime.triton_decode import decode_attention
    from moa_plan.runtime.triton_prefill import prefill_attention

    n, d, dev, dt, sink = 8192, 128, "cuda", torch.bfloat16, 64
    g = torch.Generator(device=dev).manual_seed(0)
    spans = torch.randint(1, n + 1, (hq,), generator=g, device=dev, dtype=torch.int32)
    q = torch.randn(1, hq, n, d, device=dev, dtype=dt, generator=g)
    k = torch.randn(1, hkv, n, d, device=dev, dtype=dt, generator=g)
    v = torch.randn(1, hkv, n, d, device=dev, dtype=dt, generator=g)
    got = prefill_attention(q[:, :, -512:], k, v, spans, sink)
    _check(got, reference_attention(q[:, :, -512:], k, v, spans, sink), dt, "prefill 8k")
    group = hq // hkv
    caps = [min(n, sink + int(spans[i * group : (i + 1) * group].max())) for i in range(hkv)]
    layout = LayerLayout.from_caps(caps, sink, n, device=dev)
    kc, vc = allocate(layout, 1, d, dt, device=dev)
    write_kv(kc, vc, layout, k, v, 0)
    got = decode_attention(q[:, :, -1], kc, vc, layout.offset, layout.cap, layout.n_sink, spans, sink, n)
    want = reference_attention(q[:, :, -1:], k, v, spans, sink)[:, :, 0]
    _check(got, want, dt, "decode 8k")


@pytest.mark.parametrize("tma", [0, 1])
def test_gpu_prefill_strided_inputs(tma):
    """The transposed [B, L, H, D] views transformers passes, bf16, batch 2, GQA: pointer loads
    read them in place; the TMA launch (the head_dim 128 default) copies K/V to [B, H, L, D] first."""
    from moa_plan.runtime.triton_prefill import prefill_attention

    b, n, hq, hkv, d, dev, dt, sink = 2, 1500, 8, 2, 128, "cuda", torch.bfloat16, 16
    g = torch.Generator(device=dev).manual_seed(3)
    q = torch.randn(b, n, hq, d, device=dev, dtype=dt, generator=g).transpose(1, 2)
    k = torch.randn(b, n, hkv, d, device=dev, dtype=dt, generator=g).transpose(1, 2)
    v = torch.randn(b, n, hkv, d, device=dev, dtype=dt, generator=g).transpose(1, 2)
    spans = torch.tensor([1, 64, 200, n, 700, 65, 1499, 3], dtype=torch.int32, device=dev)
    got = prefill_attention(q, k, v, spans, sink, config={"TMA": tma})
    _check(got, reference_attention(q, k, v, spans, sink), dt, f"strided prefill, TMA {tma}")
