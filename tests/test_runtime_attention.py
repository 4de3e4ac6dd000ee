"""PyTorch attention paths of the runtime against the dense reference; backend selection."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from moa_plan.runtime import attention
from moa_plan.runtime.attention import (
    cached_keys,
    chunk_attention,
    decode_attention,
    prefill_attention,
    torch_prefill_attention,
)
from moa_plan.runtime.cache import LayerLayout, allocate, write_kv
from moa_plan.runtime.reference import reference_attention

TOL = 1e-5  # float32, absolute and relative


@st.composite
def heads(draw, n: int):
    hkv = draw(st.integers(1, 3))
    group = draw(st.integers(1, 3))
    spans = draw(st.lists(st.sampled_from([1, n]) | st.integers(1, n), min_size=hkv * group, max_size=hkv * group))
    return hkv, group, torch.tensor(spans, dtype=torch.int32)


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_blockwise_prefill_matches_reference(data):
    k_len = data.draw(st.integers(1, 70))
    q_len = data.draw(st.integers(1, k_len))
    hkv, group, spans = data.draw(heads(k_len))
    sink = data.draw(st.sampled_from([0, 1, 4]) | st.integers(0, k_len + 3))
    d = data.draw(st.sampled_from([4, 8, 16]))
    batch = data.draw(st.integers(1, 2))
    block = data.draw(st.sampled_from([1, 3, 7, 16, 512]))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    q = torch.randn(batch, hkv * group, q_len, d, generator=g)
    k = torch.randn(batch, hkv, k_len, d, generator=g)
    v = torch.randn(batch, hkv, k_len, d, generator=g)
    want = reference_attention(q, k, v, spans, sink)
    got = torch_prefill_attention(q, k, v, spans, sink, block=block)
    torch.testing.assert_close(got, want, atol=TOL, rtol=TOL)


@settings(max_examples=80, deadline=None)
@given(st.data())
def test_cpu_prefill_matches_reference(data):
    """The CPU path (heads grouped by span, causal rows + band blocks batched in one SDPA call) on
    lengths long enough for several blocks, partial blocks and split calls, in fp32 and fp16, with
    transformers' [B, L, H, D] memory layout or contiguous tensors."""
    k_len = data.draw(st.integers(1, 300))
    q_len = data.draw(st.sampled_from([k_len, 1]) | st.integers(1, k_len))
    hkv, group = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 3))
    span = st.sampled_from([1, k_len]) | st.integers(1, k_len)
    spans = torch.tensor(data.draw(st.lists(span, min_size=hkv * group, max_size=hkv * group)), dtype=torch.int32)
    if data.draw(st.booleans()):  # few distinct spans, as in searched plans
        pick = data.draw(st.lists(st.integers(0, 1), min_size=hkv * group, max_size=hkv * group))
        spans = spans[torch.tensor(pick).clamp(max=hkv * group - 1)]
    sink = data.draw(st.sampled_from([0, 1, 4, 64]) | st.integers(0, k_len + 3))
    d = data.draw(st.sampled_from([4, 8, 16, 64]))
    batch = data.draw(st.integers(1, 2))
    block = data.draw(st.none() | st.sampled_from([1, 2, 3, 5, 8, 16, 64]))
    dtype = data.draw(st.sampled_from([torch.float32, torch.float16]))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))

    def make(h: int, n: int) -> torch.Tensor:
        if data.draw(st.booleans(), label="transformers layout"):
            return torch.randn(batch, n, h, d, generator=g).to(dtype).transpose(1, 2)
        return torch.randn(batch, h, n, d, generator=g).to(dtype)

    q, k, v = make(hkv * group, k_len)[:, :, k_len - q_len :], make(hkv, k_len), make(hkv, k_len)
    band_bytes = data.draw(st.sampled_from([1, 1000, attention.BAND_BYTES]))
    saved, attention.BAND_BYTES = attention.BAND_BYTES, band_bytes  # small: band blocks split over calls
    try:
        got = torch_prefill_attention(q, k, v, spans, sink, block=block)
    finally:
        attention.BAND_BYTES = saved
    want = reference_attention(q, k, v, spans, sink)
    tol = TOL if dtype == torch.float32 else 2e-3
    assert got.shape == want.shape and got.dtype == dtype
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)


def test_dense_plan_is_plain_sdpa():
    """Every head seeing every earlier key (span + sink >= N) is one causal SDPA call, bit for bit."""
    q, k, v = torch.randn(1, 6, 40, 8), torch.randn(1, 2, 40, 8), torch.randn(1, 2, 40, 8)
    spans = torch.tensor([40, 40, 36, 38, 40, 40], dtype=torch.int32)  # 36 + sink 4 = 40: dense too
    assert attention.span_groups(spans.tolist(), 4, 40) == {40: [0, 1, 2, 3, 4, 5]}
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert torch.equal(torch_prefill_attention(q, k, v, spans, 4), want)


def test_cpu_prefill_work_follows_the_attended_pairs(monkeypatch):
    """The (query, key) pairs handed to SDPA stay within the attended pairs plus the band blocks'
    masked triangles (less than a block, at most a quarter window, per row), so the cost of a sparse
    plan scales with them."""
    n, sink = 1024, 16
    spans = torch.tensor([112, 112, 240, 240, 1024, 500], dtype=torch.int32)
    computed = []

    def counting(q, k, v, attn_mask=None, is_causal=False, **kwargs):
        lq, lk = q.shape[2], k.shape[2]
        computed.append(q.shape[0] * q.shape[1] * (lq * (lq + 1) // 2 if is_causal else lq * lk))
        return sdpa(q, k, v, attn_mask=attn_mask, is_causal=is_causal, **kwargs)

    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
    q, k = torch.randn(1, 6, n, 8), torch.randn(1, 3, n, 8)
    torch_prefill_attention(q, k, k, spans, sink)
    attended = int(attention_mask_pairs(spans, sink, n))
    extra = sum(min(256, (int(s) + sink) / 4) * n for s in spans)  # < one block of masked keys per row
    assert attended <= sum(computed) <= attended + extra
    assert sum(computed) < 0.6 * 6 * n * (n + 1) // 2  # well under dense causal attention


def attention_mask_pairs(spans: torch.Tensor, sink: int, n: int) -> torch.Tensor:
    from moa_plan.runtime.reference import plan_mask

    return plan_mask(spans, sink, n, n).sum()


@settings(max_examples=50, deadline=None)
@given(st.data())
def test_chunk_over_cache_matches_reference(data):
    """Prefill P positions into the static cache, then a chunk of T queries attends over cache ∪ chunk
    (before the chunk is written) exactly as the reference over all P + T keys at N = P + T."""
    n_max = data.draw(st.integers(2, 50))
    total = data.draw(st.integers(2, n_max))
    past = data.draw(st.integers(1, total - 1))
    total - past
    hkv, group, spans_nmax = data.draw(heads(n_max))
    sink = data.draw(st.sampled_from([0, 2]) | st.integers(0, n_max))
    # the cache must serve the spans used at every length up to n_max: size it from spans at n_max,
    # and use spans at N = total that do not exceed them (spans never shrink as N grows)
    spans = torch.minimum(spans_nmax, torch.tensor(total, dtype=torch.int32))
    caps = [min(n_max, sink + int(spans_nmax[k * group : (k + 1) * group].max())) for k in range(hkv)]
    layout = LayerLayout.from_caps(caps, sink, n_max)
    d = data.draw(st.sampled_from([4, 8]))
    batch = data.draw(st.integers(1, 2))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    q = torch.randn(batch, hkv * group, total, d, generator=g)
    k = torch.randn(batch, hkv, total, d, generator=g)
    v = torch.randn(batch, hkv, total, d, generator=g)
    kc, vc = allocate(layout, batch, d, torch.float32)
    write_kv(kc, vc, layout, k[:, :, :past], v[:, :, :past], 0)
    cached = cached_keys(kc, vc, layout, past)
    got = chunk_attention(
        q[:, :, past:],
        k[:, :, past:],
        v[:, :, past:],
        cached,
        past,
        spans,
        sink,
        block=data.draw(st.sampled_from([1, 4, 512])),
    )
    want = reference_attention(q[:, :, past:], k, v, spans, sink)
    torch.testing.assert_close(got, want, atol=TOL, rtol=TOL)
    # then writing the chunk and decoding one more position is also exact
    write_kv(kc, vc, layout, k[:, :, past:], v[:, :, past:], past)
    out = decode_attention(q[:, :, -1], kc, vc, layout, spans, sink, total)
    torch.testing.assert_close(out, want[:, :, -1], atol=TOL, rtol=TOL)


def test_prefill_dispatch_uses_torch_on_cpu(monkeypatch):
    monkeypatch.delenv(attention.BACKEND_ENV, raising=False)
    q = torch.randn(1, 2, 5, 8)
    k = torch.randn(1, 1, 5, 8)
    spans = torch.tensor([2, 5], dtype=torch.int32)
    torch.testing.assert_close(
        prefill_attention(q, k, k, spans, 1), reference_attention(q, k, k, spans, 1), atol=TOL, rtol=TOL
    )


def test_backend_setting_is_checked(monkeypatch):
    monkeypatch.setenv(attention.BACKEND_ENV, "cuda-please")
    with pytest.raises(ValueError, match="MOA_ATTENTION_BACKEND"):
        attention.backend_setting()


def test_forced_triton_without_kernels_is_a_clear_error(monkeypatch):
    monkeypatch.setenv(attention.BACKEND_ENV, "triton")
    monkeypatch.setitem(attention._kernels, "triton_prefill", None)
    q = torch.randn(1, 1, 3, 8)
    with pytest.raises(RuntimeError, match="triton_prefill"):
        prefill_attention(q, q, q, torch.tensor([3], dtype=torch.int32), 0)


def test_forced_torch_skips_kernels(monkeypatch):
    monkeypatch.setenv(attention.BACKEND_ENV, "torch")
    assert attention._use_triton("triton_prefill", torch.device("cuda")) is None


def test_prefill_kernel_setting_is_checked(monkeypatch):
    monkeypatch.setenv(attention.PREFILL_KERNEL_ENV, "cutlass")
    with pytest.raises(ValueError, match="MOA_PREFILL_KERNEL"):
        attention.prefill_kernel_setting()


def test_cudnn_prefill_kernel_leaves_cpu_and_fp32_inputs_where_they_were(monkeypatch):
    monkeypatch.setenv(attention.PREFILL_KERNEL_ENV, "cudnn")
    assert attention._cudnn_band(torch.randn(1, 1, 3, 8)) is None  # CPU: the PyTorch / Triton path
    q = torch.randn(1, 2, 5, 8)
    k = torch.randn(1, 1, 5, 8)
    spans = torch.tensor([2, 5], dtype=torch.int32)
    torch.testing.assert_close(
        prefill_attention(q, k, k, spans, 1), reference_attention(q, k, k, spans, 1), atol=TOL, rtol=TOL
    )


def _cli_stderr(monkeypatch, capsys, fn) -> tuple[int, list[str]]:
    """(exit code, stderr lines) of a moa-plan command whose work is ``fn()``."""
    from moa_plan import cli

    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    args = parser.parse_args(["validate", "x.json"])
    monkeypatch.setattr(parser, "parse_args", lambda argv=None: args)
    args.handler = lambda _: fn()
    code = cli.main([])
    return code, capsys.readouterr().err.strip().splitlines()


def test_a_bad_setting_is_a_located_problem_the_cli_prints_as_one_line(monkeypatch, capsys):
    from moa_plan.errors import Problems, SettingError

    monkeypatch.setenv(attention.PREFILL_KERNEL_ENV, "cutlass")
    with pytest.raises(SettingError) as info:
        attention.prefill_kernel_setting()
    assert isinstance(info.value, Problems) and isinstance(info.value, ValueError)
    assert str(info.value) == "MOA_PREFILL_KERNEL='cutlass': must be one of triton, cudnn (unset: triton)"
    assert _cli_stderr(monkeypatch, capsys, attention.prefill_kernel_setting) == (
        1,
        ["moa-plan: MOA_PREFILL_KERNEL='cutlass': must be one of triton, cudnn (unset: triton)"],
    )


def test_cudnn_prefill_kernel_without_its_extra_is_one_located_line(monkeypatch, capsys):
    from types import SimpleNamespace

    monkeypatch.setenv(attention.PREFILL_KERNEL_ENV, "cudnn")
    monkeypatch.setattr(attention.importlib.util, "find_spec", lambda name: None)
    cuda_q = SimpleNamespace(is_cuda=True, dtype=torch.bfloat16)  # only what the choice looks at
    with pytest.raises(RuntimeError, match="moa-plan\\[cudnn\\]"):
        attention._cudnn_band(cuda_q)
    assert _cli_stderr(monkeypatch, capsys, lambda: attention._cudnn_band(cuda_q)) == (
        1,
        ["moa-plan: MOA_PREFILL_KERNEL='cudnn': needs the cudnn-frontend wheel: pip install 'moa-plan[cudnn]'"],
    )
