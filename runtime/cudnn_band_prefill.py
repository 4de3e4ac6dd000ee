"""MoA prefill through cuDNN's banded attention (the optional ``nvidia-cudnn-frontend`` wheel).

Why: on Hopper cuDNN runs causal attention ~1.2x faster than our Triton prefill kernel (a
FlashAttention-3-class kernel against a FlashAttention-2-class one), and it runs a causal band
``i - W < j <= i`` natively, skipping the key blocks outside it. A MoA head's mask is such a band
(W = its span) plus the sink columns j < sink. So the heads are grouped by span, each group runs as
band calls over zero-copy strided views (``band_calls``: Q and O of some query heads, K and V of
their KV heads), spread over a few CUDA streams, and one Triton pass (``triton_sink_fold``) merges
in the sink columns each band left out, from the log-sum-exp cuDNN returns, read where each call
left it. (Folding each stream's heads on that stream, to overlap the other streams' calls, was
measured on an H100 and dropped: the band calls fill the SMs, so the fold's CTAs gain little, and
each extra fold launch cost ~0.2 ms of host time, which at 16k the GPU then waits for.)

Cost: cuDNN builds a graph per (shapes, strides, window) the first time it meets one (tens of ms
each, kept for the process; measured on an H100: 0.1-0.2 s for a layer of 12 calls, 1-2.6 s for
one whose 32 heads all differ): worth it for long prompts of recurring lengths (benchmarks, batch
jobs), not for a server that meets a new prompt length per request. Hence opt-in:
``MOA_PREFILL_KERNEL=cudnn`` (``moa_plan.runtime.attention``); Triton stays the default.
"""

from __future__ import annotations

import math
import threading
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from moa_plan.runtime.triton_common import device_index
from moa_plan.runtime.triton_sink_fold import fold_sink

MAX_GRAPHS = 1024  # built graphs kept (oldest dropped first): a model meets ~(layers x distinct spans) per length
STREAMS = 4  # side streams the band calls are spread over (an H100 probe: 1.04-1.08x one all-heads call)
MIN_LEN = 16384  # shorter prompts go to the Triton kernel (H100, sparse plans: 2.4-6.7x slower at 4k, faster at 16k)
# Graphs for dynamic shapes on kernel caches (``_kernel_cache``): off, because on cuDNN 9.19 (frontends 1.16
# and 1.18, an H100) a graph built for a new length from a cached kernel ran the first length's problem
# (wrong outputs, out-of-bounds accesses). Kept for ``tools/cudnn_build_probe.py`` to re-test newer cuDNNs.
DYNAMIC = False


@dataclass(frozen=True)
class BandCall:
    """One band attention call: query heads q0, q0 + q_step, ... (n_q of them) over KV heads
    kv0 .. kv0 + n_kv - 1 (n_q a multiple of n_kv, GQA order), window ``window`` (None: causal)."""

    window: int | None
    q0: int
    q_step: int
    n_q: int
    kv0: int
    n_kv: int

    def heads(self) -> list[int]:
        return [self.q0 + i * self.q_step for i in range(self.n_q)]


def _progressions(idx: list[int], step: int | None = None) -> list[tuple[int, int, int]]:
    """Sorted distinct ints split greedily into arithmetic runs (start, step, count); ``step``
    fixes the step (other gaps start a new run)."""
    runs, i = [], 0
    while i < len(idx):
        if i + 1 == len(idx) or (step is not None and idx[i + 1] - idx[i] != step):
            runs.append((idx[i], step or 1, 1))
            i += 1
            continue
        step_i, n = idx[i + 1] - idx[i], 2
        while i + n < len(idx) and idx[i + n] - idx[i + n - 1] == step_i:
            n += 1
        runs.append((idx[i], step_i, n))
        i += n
    return runs


def effective_spans(spans: list[int], sink: int, k_len: int) -> list[int]:
    """Each head's band at k_len keys; k_len where sink + span covers every earlier key (then the
    band is the whole causal row and no sink column is missing)."""
    return [k_len if s + sink >= k_len or s >= k_len else s for s in spans]


def band_calls(spans: list[int], sink: int, k_len: int, group: int) -> list[BandCall]:
    """The calls covering every query head once with its KV head and band: per span, runs of
    consecutive KV groups whose heads all share it are one GQA call; the other heads of a KV group
    go as arithmetic runs (strided views), one call each."""
    eff = effective_spans(spans, sink, k_len)
    by_span: dict[int, list[int]] = {}
    for h, s in enumerate(eff):
        by_span.setdefault(s, []).append(h)
    calls = []
    for s, heads in by_span.items():
        window = None if s >= k_len else s
        per_kv: dict[int, list[int]] = {}
        for h in heads:
            per_kv.setdefault(h // group, []).append(h)
        full = sorted(g for g, hs in per_kv.items() if len(hs) == group)
        for g0, _, m in _progressions(full, step=1):  # runs of consecutive whole KV groups
            calls.append(BandCall(window, g0 * group, 1, m * group, g0, m))
        for g, hs in sorted(per_kv.items()):
            if len(hs) < group:
                calls += [BandCall(window, a, st, n, g, 1) for a, st, n in _progressions(sorted(hs))]
    return calls


def _view(x: torch.Tensor, first: int, step: int, count: int) -> torch.Tensor:
    return x[:, first : first + (count - 1) * step + 1 : step]


@dataclass(frozen=True)
class Operand:
    """Where one call's operand lies inside its whole tensor: element offset, shape, strides."""

    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    def of(self, x: torch.Tensor) -> torch.Tensor:
        return x.as_strided(self.shape, self.stride, x.storage_offset() + self.offset)


def _operand(view: torch.Tensor, whole: torch.Tensor) -> Operand:
    return Operand(view.storage_offset() - whole.storage_offset(), tuple(view.shape), tuple(view.stride()))


@dataclass(frozen=True)
class CallLayout:
    """One band call's operands: Q, K, V and O as views of the whole tensors, and its statistics
    as a packed [B, n_q, Lq] block of a scratch buffer (blocks in call order)."""

    call: BandCall
    q: Operand
    k: Operand
    v: Operand
    out: Operand
    stats: Operand


def band_layout(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, calls: list[BandCall]):
    """Each call's operands as (offset, shape, strides) of q / k / v / out and of the statistics
    scratch: the same for every input of these shapes and strides, so built once per plan."""
    batch, q_len, layouts, done = q.shape[0], q.shape[2], [], 0
    for c in calls:
        stats = Operand(done * batch * q_len, (batch, c.n_q, q_len), (c.n_q * q_len, q_len, 1))
        kv = slice(c.kv0, c.kv0 + c.n_kv)
        layouts.append(
            CallLayout(
                c,
                _operand(_view(q, c.q0, c.q_step, c.n_q), q),
                _operand(k[:, kv], k),
                _operand(v[:, kv], v),
                _operand(_view(out, c.q0, c.q_step, c.n_q), out),
                stats,
            )
        )
        done += c.n_q
    return layouts


def fold_rows(layouts: list[CallLayout], q_len: int, device) -> torch.Tensor | None:
    """The sink fold's ``rows`` table for the banded heads of these calls (None: none is banded):
    each head with where its statistics lie in the scratch (``CallLayout.stats``)."""
    rows = [
        (h, lay.stats.offset + i * q_len, lay.stats.stride[0])
        for lay in layouts
        if lay.call.window is not None
        for i, h in enumerate(lay.call.heads())
    ]
    return torch.tensor(rows, dtype=torch.int64, device=device) if rows else None


Band = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int | None, float], None]


def torch_band(q, k, v, out, lse, window, scale) -> None:
    """The band call in float32 PyTorch (CPU tests, and the reference for cuDNN's): writes
    out [B, n_q, Lq, D] and lse [B, n_q, Lq] (natural log) of q over k/v [B, n_kv, Lk, D]."""
    lq, lk = q.shape[2], k.shape[2]
    group = q.shape[1] // k.shape[1]
    i = torch.arange(lk - lq, lk, device=q.device).view(-1, 1)
    j = torch.arange(lk, device=q.device).view(1, -1)
    seen = (j <= i) if window is None else (j <= i) & (i - j < window)
    s = q.float() @ k.float().repeat_interleave(group, 1).transpose(-1, -2) * scale
    s = s.masked_fill(~seen, float("-inf"))
    out.copy_(torch.softmax(s, -1) @ v.float().repeat_interleave(group, 1))
    lse.copy_(torch.logsumexp(s, -1))


_lock = threading.Lock()
_graphs: dict[tuple, tuple] = {}
_plans: dict[tuple, "BandPlan"] = {}
_handles: dict[int, object] = {}
_streams: dict[tuple, list] = {}
_kernel_caches: dict[tuple, object] = {}


def _handle(device: torch.device):
    import cudnn

    index = device_index(device)
    if index not in _handles:
        with torch.cuda.device(index):
            _handles[index] = cudnn.create_handle()
    return _handles[index]


def _order(x: torch.Tensor) -> tuple[int, ...]:
    """The axes of x from the largest stride to the smallest: its memory layout, whatever its length."""
    return tuple(sorted(range(x.dim()), key=lambda i: -x.stride(i)))


def _kernel_cache(device: torch.device, lay: CallLayout, layout: tuple):
    """A cuDNN kernel cache for the graphs of one call class (only with ``DYNAMIC``, which is off):
    graphs built against it with dynamic shapes reuse the kernels compiled for an earlier graph of
    the class. A class fixes all but the lengths and the window's width (dtype, scale, head counts
    and memory layout of the whole tensors, ``layout``; the call's head counts, query head step and
    whether it is banded): one cache for every call handed calls of other head counts kernels that
    read out of bounds. Measured (``tools/cudnn_build_probe.py``, cuDNN 9.19, an H100): within a
    class, other windows at the same length came out right and built 5-10x faster; other lengths
    came out wrong."""
    import cudnn

    c = lay.call
    key = (device_index(device), layout, c.n_q, c.n_kv, c.q_step, c.window is None)
    with _lock:
        if key not in _kernel_caches:
            _kernel_caches[key] = cudnn.create_kernel_cache()
        return _kernel_caches[key]


def _graph(lay: CallLayout, dtype: torch.dtype, scale: float, handle, kernel_cache=None):
    """A built cuDNN graph for one call's operand shapes / strides and window (cached for the
    process) and the uids of its q, k, v, out and stats tensors. With ``kernel_cache`` the graph is
    built for dynamic shapes and takes its kernels from that cache when it has them."""
    import cudnn

    window = lay.call.window
    key = (lay.q.shape, lay.q.stride, lay.k.shape, lay.k.stride, lay.v.stride, lay.out.stride, window, scale, dtype)
    key += (kernel_cache is not None,)
    with _lock:
        if key in _graphs:
            return _graphs[key]
        dt = {torch.bfloat16: cudnn.data_type.BFLOAT16, torch.float16: cudnn.data_type.HALF}[dtype]
        dynamic = {} if kernel_cache is None else {"kernel_cache": kernel_cache}
        g = cudnn.pygraph(
            io_data_type=dt,
            intermediate_data_type=cudnn.data_type.FLOAT,
            compute_data_type=cudnn.data_type.FLOAT,
            handle=handle,
            **dynamic,
        )
        ts = [
            g.tensor(name=n, dim=list(op.shape), stride=list(op.stride), data_type=dt)
            for n, op in zip("qkv", (lay.q, lay.k, lay.v))
        ]
        band = {} if window is None else {"diagonal_band_left_bound": int(window)}
        o, stats = g.sdpa(
            name="band",
            q=ts[0],
            k=ts[1],
            v=ts[2],
            generate_stats=True,
            attn_scale=scale,
            diagonal_alignment=cudnn.diagonal_alignment.TOP_LEFT,
            diagonal_band_right_bound=0,
            **band,
        )
        o.set_output(True).set_dim(list(lay.out.shape)).set_stride(list(lay.out.stride)).set_data_type(dt)
        b, n_q, q_len = lay.stats.shape
        stats.set_output(True).set_dim([b, n_q, q_len, 1]).set_stride([n_q * q_len, q_len, 1, 1])
        stats.set_data_type(cudnn.data_type.FLOAT)
        g.validate()
        g.build_operation_graph()
        g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        g.check_support()
        g.build_plans()
        if len(_graphs) >= MAX_GRAPHS:
            del _graphs[next(iter(_graphs))]
        _graphs[key] = (g, tuple(t.get_uid() for t in (*ts, o, stats)), g.get_workspace_size())
        return _graphs[key]


def band_cost(c: BandCall, k_len: int) -> int:
    """The (query, key) pairs a call computes: its heads x its band's pairs."""
    w = k_len if c.window is None else min(c.window, k_len)
    return c.n_q * (w * (w + 1) // 2 + (k_len - w) * w)


def assign_streams(calls: list[BandCall], k_len: int, n_streams: int) -> list[int]:
    """Each call's stream, in order, onto the least loaded one so far (with the calls longest
    first, the classic longest-processing-time rule): round-robin can put two long calls on one
    stream and leave the others idle at the end."""
    load, where = [0] * n_streams, []
    for c in calls:
        where.append(min(range(n_streams), key=load.__getitem__))
        load[where[-1]] += band_cost(c, k_len)
    return where


@dataclass
class BandPlan:
    """Everything one plan's prefill needs that does not depend on the data: the calls' layouts in
    launch order (longest first) and their streams, the sink fold's ``rows`` and spans (None: no
    head misses a sink) and, for cuDNN, the built graphs and the workspace one stream needs."""

    layouts: list[CallLayout]
    streams: list[int]
    fold_rows: torch.Tensor | None
    fold_spans: torch.Tensor | None
    graphs: list[tuple] | None = None
    workspace: int = 1


def plan_bands(q, k, v, out, spans: list[int], sink: int, scale: float, cudnn_graphs: bool) -> BandPlan:
    """Lay out (once per plan, shapes and strides; kept for the process) every call the prefill
    runs, and with ``cudnn_graphs`` build their graphs; raises what cuDNN raises for a shape it
    refuses."""
    key = (tuple(spans), sink, scale, q.dtype, q.device, cudnn_graphs, STREAMS, DYNAMIC)
    key += tuple((tuple(t.shape), t.stride()) for t in (q, k, v, out))
    plan = _plans.get(key)
    if plan is None:
        k_len, q_len = k.shape[2], q.shape[2]
        calls = band_calls(spans, sink, k_len, q.shape[1] // k.shape[1])
        layouts = sorted(band_layout(q, k, v, out, calls), key=lambda lay: -band_cost(lay.call, k_len))
        rows = fold_rows(layouts, q_len, q.device) if sink > 0 else None  # None: no banded head misses a sink
        fold_spans = None
        if rows is not None:
            fold_spans = torch.tensor(effective_spans(spans, sink, k_len), dtype=torch.int32, device=q.device)
        plan = BandPlan(layouts, assign_streams([lay.call for lay in layouts], k_len, STREAMS), rows, fold_spans)
        if cudnn_graphs:
            handle = _handle(q.device)
            whole = (q.dtype, scale, q.shape[1], k.shape[1], q.shape[3], *(_order(t) for t in (q, k, v, out)))
            plan.graphs = [
                _graph(lay, q.dtype, scale, handle, _kernel_cache(q.device, lay, whole) if DYNAMIC else None)
                for lay in layouts
            ]
            plan.workspace = max([g[2] for g in plan.graphs] + [1])
        with _lock:
            if len(_plans) >= MAX_GRAPHS:
                del _plans[next(iter(_plans))]
            _plans[key] = plan
    return plan


def _run_cudnn(plan: BandPlan, q, k, v, out, scratch) -> None:
    """Every band call of the plan, by raw pointers (no per-call tensors: at 16k the calls are
    short and Python's per-call work would otherwise be what the GPU waits for), on the side
    streams, each stream with its own slice of one workspace."""
    import cudnn

    handle, streams = _handle(q.device), _side_streams(q.device)
    ws = torch.empty(plan.workspace * len(streams), device=q.device, dtype=torch.uint8)
    main = torch.cuda.current_stream(q.device)
    for s in streams:
        s.wait_stream(main)
    bases = [(t.data_ptr(), t.element_size()) for t in (q, k, v, out, scratch)]
    for lay, (g, uids, _), n in zip(plan.layouts, plan.graphs, plan.streams):
        cudnn.set_stream(handle=handle, stream=streams[n].cuda_stream)
        ops = (lay.q, lay.k, lay.v, lay.out, lay.stats)
        ptrs = {uid: base + op.offset * size for uid, op, (base, size) in zip(uids, ops, bases)}
        g._execute(ptrs, ws.data_ptr() + n * plan.workspace, handle)
    for s in streams:
        main.wait_stream(s)


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=3)


def _unsupported(q, k) -> str | None:
    """Why cuDNN cannot take these inputs at all. The band is anchored top-left, so the queries
    must be the whole sequence (no cached keys before them)."""
    if q.shape[2] != k.shape[2]:
        return "queries after cached keys (the band path takes whole prompts)"
    if q.dtype not in (torch.float16, torch.bfloat16) or not q.is_cuda:
        return f"{q.dtype} on {q.device} (cuDNN attention takes fp16/bf16 on CUDA)"
    return None


def _triton_prefill(q, k, v, spans, sink, scale) -> torch.Tensor:
    """The whole prefill through the Triton kernel (imported here: it is the fallback, not a dependency)."""
    from moa_plan.runtime.triton_prefill import prefill_attention

    return prefill_attention(q, k, v, spans, sink, scale)


def _side_streams(device: torch.device) -> list:
    key = (device_index(device), STREAMS)
    if key not in _streams:
        _streams[key] = [torch.cuda.Stream(device=key[0]) for _ in range(STREAMS)]
    return _streams[key]


def prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    spans: torch.Tensor,
    sink: int,
    scale: float | None = None,
    *,
    band: Band | None = None,
    host_spans: list[int] | None = None,
) -> torch.Tensor:
    """Plan attention of q [B, Hq, Lq, D] over k/v [B, Hkv, Lk, D] (Lq <= Lk, row r at position
    Lk - Lq + r), spans [Hq] at N = Lk: band calls (``band``, default cuDNN; ``torch_band`` on CPU)
    then the sink fold. Returns [B, Hq, Lq, D] in the [B, Lq, Hq, D] memory transformers wants.
    With cuDNN, every graph is built before anything runs. Prompts of fewer than ``MIN_LEN`` keys go
    to the Triton kernel (faster there); inputs cuDNN cannot take (queries after cached keys, fp32,
    a shape it refuses) go whole to it too, with one warning.
    ``host_spans``: the same spans as a list, if the caller has them (reading a device tensor's
    values waits for the GPU to drain, and the calls are then issued to an idle GPU)."""
    batch, hq, q_len, d = q.shape
    hkv, k_len = k.shape[1], k.shape[2]
    if k.shape != v.shape or k.shape[0] != batch or k.shape[3] != d or hq % hkv or q_len > k_len:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not fit together")
    if spans.shape != (hq,) or (host_spans is not None and len(host_spans) != hq):
        got = tuple(spans.shape) if spans.shape != (hq,) else f"{len(host_spans)} host spans"
        raise ValueError(f"spans must have shape ({hq},), got {got}")
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    if band is None and k_len < MIN_LEN:  # short prompts: many short calls, the Triton kernel is faster
        return _triton_prefill(q, k, v, spans, sink, scale)
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    out = q.new_empty(batch, q_len, hq, d).transpose(1, 2)
    if q_len == 0 or batch == 0:
        return out
    spans_l = [int(s) for s in (spans.tolist() if host_spans is None else host_spans)]
    why = _unsupported(q, k) if band is None else None
    try:
        plan = None if why else plan_bands(q, k, v, out, spans_l, sink, scale, cudnn_graphs=band is None)
    except Exception as exc:  # noqa: BLE001 - cuDNN's own errors: a shape or layout it does not support
        why = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
    if why:  # every graph is built before anything runs: what cuDNN cannot run goes to Triton whole
        _warn_once(f"cuDNN band prefill falls back to the Triton kernel: {why}")
        return _triton_prefill(q, k, v, spans, sink, scale)
    scratch = torch.empty(batch * hq * q_len, device=q.device, dtype=torch.float32)
    if band is None:
        _run_cudnn(plan, q, k, v, out, scratch)
    else:  # the same calls in the same order, one after another
        for lay in plan.layouts:
            band(lay.q.of(q), lay.k.of(k), lay.v.of(v), lay.out.of(out), lay.stats.of(scratch), lay.call.window, scale)
    if plan.fold_rows is not None:
        fold_sink(q, k, v, out, scratch, plan.fold_spans, sink, scale, rows=plan.fold_rows)
    return out
