"""The static decode step (what CUDA graphs replay), checked on CPU: same tokens as transformers'
own greedy loop, no host synchronisation, a custom op with a correct fake implementation.

On CPU ``MOA_GRAPH_DECODE=1`` runs the very step that CUDA captures, eagerly, step by step; the
CUDA capture itself is checked in tests/test_graph_gpu.py. float32; tokens compared exactly
(the same arithmetic in both paths, up to the order of the cache write)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from moa_plan.plan import FORMAT_VERSION, Layer, ModelShape, Plan, Rule
from moa_plan.runtime import apply_plan
from moa_plan.runtime.cache import LayerLayout, allocate, torch_decode_attention, write_kv, write_token
from moa_plan.runtime.graph_generate import COMPILE_ENV, ENV, GraphDecoder, fast_path, generate_greedy, release
from moa_plan.runtime.static_step import StaticDecode, spans_table

SHAPE = ModelShape(num_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
TINY = dict(vocab_size=97, intermediate_size=96, max_position_embeddings=256, bos_token_id=0, eos_token_id=None)


def _plan(rules: list[list[Rule]], sink: int) -> Plan:
    return Plan(format_version=FORMAT_VERSION, model=SHAPE, sink=sink, layers=[Layer(heads=r) for r in rules])


def _model(plan: Plan) -> torch.nn.Module:
    return apply_plan(tiny_model(seed=3, init_std=0.3, **TINY), plan)


rule_st = st.builds(Rule, alpha=st.integers(-4, 30).map(float), beta=st.sampled_from([0.0, 0.1, 0.3, 0.6, 1.0]))
plan_st = st.builds(
    _plan, st.lists(st.lists(rule_st, min_size=4, max_size=4), min_size=2, max_size=2), st.sampled_from([0, 2, 5])
)
MIXED = _plan(
    [
        [Rule(alpha=3, beta=0.0), Rule(alpha=0, beta=1.0), Rule(alpha=8, beta=0.1), Rule(alpha=1, beta=0.0)],
        [Rule(alpha=-2, beta=0.5), Rule(alpha=20, beta=0.0), Rule(alpha=0, beta=0.25), Rule(alpha=4, beta=0.6)],
    ],
    sink=2,
)


def _ids(batch: int, length: int, seed: int) -> torch.Tensor:
    """Token ids above 1: 1 is a pad token in the end-of-sequence test (transformers reads it as padding)."""
    return torch.randint(2, TINY["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed))


def _hf_generate(model, ids, monkeypatch, **kw) -> torch.Tensor:
    monkeypatch.setenv(ENV, "0")
    with torch.no_grad():
        out = model.generate(ids, do_sample=False, **kw)
    monkeypatch.setenv(ENV, "1")
    return out


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plan=plan_st, prompt=st.integers(1, 25), new=st.integers(1, 30), batch=st.integers(1, 3))
def test_static_steps_generate_what_transformers_generates(plan, prompt, new, batch):
    import os

    model = _model(plan)
    ids = _ids(batch, prompt, seed=prompt * 31 + new)
    old = os.environ.get(ENV)
    try:
        os.environ[ENV] = "0"
        with torch.no_grad():
            want = model.generate(ids, do_sample=False, max_new_tokens=new)
        os.environ[ENV] = "1"
        with torch.no_grad():
            got = model.generate(ids, do_sample=False, max_new_tokens=new)
    finally:
        os.environ.pop(ENV) if old is None else os.environ.__setitem__(ENV, old)
    assert torch.equal(got, want)


def test_a_kept_step_serves_the_next_call_and_a_new_shape_replaces_it(monkeypatch):
    model = _model(MIXED)
    monkeypatch.setenv(ENV, "1")
    kept = {(2, 9): 21, (1, 5): 12}  # the first bound of a (batch, prompt) serves shorter calls
    for seed, (batch, prompt, new) in enumerate([(2, 9, 12), (2, 9, 12), (2, 9, 3), (1, 5, 7)]):
        ids = _ids(batch, prompt, seed)
        want = _hf_generate(model, ids, monkeypatch, max_new_tokens=new)
        with torch.no_grad():
            got = model.generate(ids, do_sample=False, max_new_tokens=new)
        assert torch.equal(got, want), (batch, prompt, new)
        assert model._moa_graph_decoder[0][:2] == (batch, prompt)
        assert model._moa_graph_decoder[1].n_max == kept[batch, prompt]
    release(model)
    assert model._moa_graph_decoder is None


def test_a_compiled_step_generates_the_same_tokens_and_compiles_once(monkeypatch):
    """MOA_GRAPH_COMPILE: the step's model call under torch.compile (here a counting aot_eager
    backend) gives transformers' tokens, and one compiled graph serves every step (the host length
    is pinned, so no guard fails as positions advance: on CUDA nothing compiles inside the capture)."""
    from torch._dynamo import register_backend
    from torch._dynamo.backends.common import aot_autograd

    graphs = []

    @register_backend(name="moa_test_count")
    def _count(gm, example_inputs):
        graphs.append(gm)
        return aot_autograd(fw_compiler=lambda g, _: g)(gm, example_inputs)

    torch._dynamo.reset()
    model = _model(MIXED)
    ids = _ids(2, 13, seed=4)
    want = _hf_generate(model, ids, monkeypatch, max_new_tokens=10)
    monkeypatch.setenv(COMPILE_ENV, "moa_test_count")
    with torch.no_grad():
        got = model.generate(ids, do_sample=False, max_new_tokens=10)
    assert torch.equal(got, want)
    assert 1 <= len(graphs) <= 3  # a few graphs at the call's graph breaks, compiled for the first step only
    first = len(graphs)
    with torch.no_grad():
        assert torch.equal(model.generate(ids, do_sample=False, max_new_tokens=10), want)
    assert len(graphs) == first
    torch._dynamo.reset()


def test_compile_setting_reads_backend_and_mode(monkeypatch):
    from moa_plan.runtime.graph_generate import compile_setting

    monkeypatch.setenv(COMPILE_ENV, " inductor:max-autotune-no-cudagraphs ")
    assert compile_setting() == ("inductor", "max-autotune-no-cudagraphs")
    assert compile_setting("aot_eager") == ("aot_eager", None)
    assert compile_setting("") == compile_setting("none") == ("", None)
    monkeypatch.delenv(COMPILE_ENV)
    assert compile_setting() == ("inductor", None)  # unset: transformers' choice for a static-cache step
    for bad in (":x", "inductor:"):
        with pytest.raises(ValueError, match="BACKEND, BACKEND:MODE or none"):
            compile_setting(bad)


def test_the_default_compiles_captured_steps_only_and_disable_compile_turns_it_off(monkeypatch):
    """Unset, a step captured on CUDA is compiled (transformers' rule for a static-cache step), a
    CPU step is not; ``generate(..., disable_compile=True)`` wins over MOA_GRAPH_COMPILE."""
    from moa_plan.runtime.graph_generate import _model_call, _step_compile

    monkeypatch.delenv(COMPILE_ENV, raising=False)
    assert _step_compile(graph=True, allowed=True) == ("inductor", None)
    assert _step_compile(graph=False, allowed=True) == ("", None)
    assert _step_compile(graph=True, allowed=False) == ("", None)
    monkeypatch.setenv(COMPILE_ENV, "aot_eager")
    assert _step_compile(graph=False, allowed=True) == ("aot_eager", None)
    monkeypatch.setenv(ENV, "1")
    model = _model(MIXED)
    ids = _ids(1, 8, seed=2)
    with torch.no_grad():
        model.generate(ids, do_sample=False, max_new_tokens=3, disable_compile=True)
        assert model._moa_graph_decoder[1].step_call is _model_call
        model.generate(ids, do_sample=False, max_new_tokens=3)  # compiled: a decoder of its own
        assert model._moa_graph_decoder[1].step_call is not _model_call
    release(model)
    torch._dynamo.reset()


def test_a_failed_capture_decodes_eagerly_with_a_warning(monkeypatch):
    """A step the GPU cannot record must not fail ``generate``: the warm-up step stands, the
    decoder goes on eagerly and gives transformers' tokens (capture simulated on CPU)."""
    model = _model(MIXED)
    ids = _ids(2, 12, seed=6)
    want = _hf_generate(model, ids, monkeypatch, max_new_tokens=9)

    def refuse(self):
        raise RuntimeError("operation not permitted when stream is capturing\nmore detail")

    monkeypatch.setattr(GraphDecoder, "_warm_up", GraphDecoder.step)
    monkeypatch.setattr(GraphDecoder, "_record", refuse)
    dec = GraphDecoder(model, 2, 12, 21, torch.device("cpu"), graph=True, eos=[])
    with torch.no_grad(), pytest.warns(UserWarning, match="capture failed \\(operation not permitted"):
        dec.prefill(ids, 0)
        cols = dec.decode(9, stop_early=False)
    assert not dec.use_graph and dec.graph is None
    assert torch.equal(torch.cat([ids, dec.tokens[:, :cols]], dim=1), want)


def test_a_released_decoder_is_freed_at_once(monkeypatch):
    """No reference cycle through a decoder: dropped, it (and on CUDA its graph) is freed then and
    there, never later by the cyclic collector, which could run inside another decoder's capture."""
    import gc
    import weakref

    model = _model(MIXED)
    monkeypatch.setenv(ENV, "1")
    for backend in ("", "aot_eager"):
        monkeypatch.setenv(COMPILE_ENV, backend)
        with torch.no_grad():
            model.generate(_ids(1, 8, seed=2), do_sample=False, max_new_tokens=3)
        gc.disable()
        try:
            held = weakref.ref(model._moa_graph_decoder[1])
            release(model)
            assert held() is None, backend
        finally:
            gc.enable()
    torch._dynamo.reset()


def test_end_of_sequence_stops_and_pads_like_transformers(monkeypatch):
    model = _model(MIXED)
    ids = _ids(3, 11, seed=5)
    free = _hf_generate(model, ids, monkeypatch, max_new_tokens=40)
    for col in (11, 14, 30, 50):  # a token some rows emit early: those rows end and pad, the rest go on
        eos = int(free[0, col])
        want = _hf_generate(model, ids, monkeypatch, max_new_tokens=40, eos_token_id=eos, pad_token_id=1)
        with torch.no_grad():
            got = model.generate(ids, do_sample=False, max_new_tokens=40, eos_token_id=eos, pad_token_id=1)
        assert torch.equal(got, want), col


def test_fast_path_takes_only_plain_greedy(monkeypatch):
    model = _model(MIXED)
    ids = _ids(2, 6, seed=0)
    monkeypatch.setenv(ENV, "auto")
    assert fast_path(model, (ids,), {"max_new_tokens": 4}) is None  # CPU: transformers' loop
    monkeypatch.setenv(ENV, "1")
    assert fast_path(model, (ids,), {"max_new_tokens": 4})["max_new_tokens"] == 4
    assert fast_path(model, (ids,), {"max_length": 10})["max_new_tokens"] == 4
    assert fast_path(model, (ids,), {"max_new_tokens": 4, "attention_mask": torch.ones_like(ids)}) is not None
    refused = [
        {"max_new_tokens": 4, "do_sample": True},
        {"max_new_tokens": 4, "num_beams": 2},
        {"max_new_tokens": 4, "repetition_penalty": 1.2},
        {"max_new_tokens": 4, "return_dict_in_generate": True},
        {"max_new_tokens": 4, "streamer": object()},
        {"max_new_tokens": 4, "attention_mask": torch.tensor([[0, 1, 1, 1, 1, 1], [1] * 6])},
        {"max_new_tokens": 4, "eos_token_id": 3, "min_new_tokens": 3},
    ]
    for kwargs in refused:
        assert fast_path(model, (ids,), kwargs) is None, kwargs
    monkeypatch.setenv(ENV, "0")
    assert fast_path(model, (ids,), {"max_new_tokens": 4}) is None
    monkeypatch.setenv(ENV, "maybe")
    with pytest.raises(ValueError, match=ENV):
        fast_path(model, (ids,), {"max_new_tokens": 4})


# ---- no host synchronisation inside a step ---------------------------------------------------------

_SYNCING = {"_local_scalar_dense", "nonzero", "item", "masked_select", "unique", "_unique2"}


class _NoSync(TorchDispatchMode):
    """Fails on any aten op that reads a device value back to the host (.item(), bool(t), nonzero)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in _SYNCING:
            raise AssertionError(f"host sync in the static decode step: aten.{name}")
        return func(*args, **(kwargs or {}))


def test_the_static_step_reads_nothing_back(monkeypatch):
    monkeypatch.setenv(ENV, "1")
    model = _model(MIXED)
    ids = _ids(2, 10, seed=1)
    dec = GraphDecoder(model, 2, 10, 30, torch.device("cpu"), graph=False, eos=[5])
    with torch.no_grad():
        dec.prefill(ids, 0)
        with _NoSync():
            for _ in range(6):
                dec.step()
    with pytest.raises(AssertionError, match="host sync"), _NoSync():
        torch.ones(2).sum().item()


def test_a_kept_step_reads_the_same_tensors_on_the_next_call(monkeypatch):
    """A captured CUDA graph reads fixed addresses: the next call's prefill must write the state
    in place, and a call with other end-of-sequence tokens must get its own decoder (on the GPU a
    replaced eos tensor once left a kept graph blind to the new end-of-sequence token)."""
    from moa_plan.runtime.graph_generate import generate_greedy

    monkeypatch.setenv(ENV, "1")
    model = _model(MIXED)
    ids = _ids(2, 10, seed=2)

    def state():
        dec = model._moa_graph_decoder[1]
        return dec, {k: v.data_ptr() for k, v in vars(dec).items() if isinstance(v, torch.Tensor)}

    free = generate_greedy(model, ids, 12, [], 0)
    dec, ptrs = state()
    generate_greedy(model, ids, 12, [], 0)
    assert state() == (dec, ptrs)
    eos = int(free[1, 14])
    got = generate_greedy(model, ids, 12, [eos], 3)
    assert state()[0] is not dec and model._moa_graph_decoder[0][-2] == (eos,)
    monkeypatch.setenv(ENV, "0")
    with torch.no_grad():
        want = model.generate(ids, do_sample=False, max_new_tokens=12, eos_token_id=eos, pad_token_id=3)
    assert torch.equal(got, want)


def test_decode_op_and_its_pytorch_twin_read_nothing_back():
    layout = LayerLayout.from_caps([7, 12], 2, 40)
    kc, vc = allocate(layout, 2, 16, torch.float32)
    kc.normal_()
    vc.normal_()
    q = torch.randn(2, 4, 16)
    spans = torch.tensor([3, 9, 12, 1], dtype=torch.int32)
    n = torch.tensor(30, dtype=torch.int32)
    args = (q, [kc, vc], [layout.offset, layout.cap, layout.n_sink], spans, n, 2, 0.25, 12)
    with _NoSync():
        got = torch.ops.moa_plan.decode(*args)
        twin = torch_decode_attention(q, kc, vc, layout.offset, layout.cap, layout.n_sink, spans, 2, n, 0.25, width=12)
    want = torch_decode_attention(q, kc, vc, layout.offset, layout.cap, layout.n_sink, spans, 2, 30, 0.25)
    assert torch.equal(got, want) and torch.equal(twin, want)


def test_decode_op_passes_opcheck():
    layout = LayerLayout.from_caps([5, 9], 1, 30)
    kc, vc = allocate(layout, 1, 16, torch.float32)
    kc.normal_()
    vc.normal_()
    args = (
        torch.randn(1, 4, 16),
        [kc, vc],
        [layout.offset, layout.cap, layout.n_sink],
        torch.tensor([4, 2, 9, 6], dtype=torch.int32),
        torch.tensor(20, dtype=torch.int32),
        1,
        0.25,
        9,
    )
    torch.library.opcheck(torch.ops.moa_plan.decode.default, args)


# ---- the pieces of the step --------------------------------------------------------------------------


@settings(max_examples=20, deadline=None)
@given(plan=plan_st, first=st.integers(1, 60), count=st.integers(1, 40))
def test_spans_table_is_the_plans_spans_at_every_length(plan, first, count):
    table = spans_table(plan, first, first + count - 1)
    assert table.shape == (count, 2, 4) and table.dtype == torch.int32
    for i in range(count):
        assert table[i].tolist() == plan.spans(first + i)


def test_static_decode_walks_positions_on_the_device():
    st_ = StaticDecode(MIXED, 8, 20, "cpu")
    st_.rewind(7)
    for pos in range(7, 22):
        st_.begin()
        n = min(pos + 1, 20)  # past the table's range the last row is used
        assert int(st_.pos) == pos and int(st_.n) == pos + 1
        assert st_.spans.tolist() == MIXED.spans(n)
        st_.advance()
    with pytest.raises(ValueError):
        st_.rewind(3)
    with pytest.raises(ValueError):
        spans_table(MIXED, 5, 4)


def test_write_token_equals_write_kv_of_one_token():
    layout = LayerLayout.from_caps([4, 9, 3], 2, 50)
    a_k, a_v = allocate(layout, 2, 8, torch.float32)
    b_k, b_v = allocate(layout, 2, 8, torch.float32)
    for p in range(30):
        k, v = torch.randn(2, 3, 1, 8), torch.randn(2, 3, 1, 8)
        write_kv(a_k, a_v, layout, k, v, p)
        write_token(b_k, b_v, layout, k, v, torch.tensor([p]))
    assert torch.equal(a_k, b_k) and torch.equal(a_v, b_v)


def test_generate_greedy_returns_prompt_and_new_tokens(monkeypatch):
    monkeypatch.setenv(ENV, "1")
    model = _model(MIXED)
    ids = _ids(1, 4, seed=2)
    out = generate_greedy(model, ids, 1, [], 0)
    assert out.shape == (1, 5) and torch.equal(out[:, :4], ids)


def test_default_compilation_stops_after_a_few_shapes_with_one_warning(monkeypatch):
    """Unset, a model compiles its first DEFAULT_COMPILE_LIMIT decoder shapes and captures later
    ones eagerly (a prompt length per call must not cost a compilation per call); a kept decoder
    is reused whatever the count; MOA_GRAPH_COMPILE set compiles every shape."""
    import warnings

    from moa_plan.runtime import graph_generate as gg

    monkeypatch.delenv(COMPILE_ENV, raising=False)
    monkeypatch.setenv(ENV, "1")
    # the CPU steps eagerly by default; stand in the cheap 'eager' backend for the CUDA default
    monkeypatch.setattr(gg, "_step_compile", lambda graph, allowed: ("eager", None) if allowed else ("", None))
    model = _model(MIXED)
    compiled = []
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for length in range(6, 6 + gg.DEFAULT_COMPILE_LIMIT + 2):
            model.generate(_ids(1, length, seed=length), do_sample=False, max_new_tokens=2)
            compiled.append(model._moa_graph_decoder[1].step_call is not gg._model_call)
        model.generate(_ids(1, length, seed=length), do_sample=False, max_new_tokens=2)  # the kept one
        assert model._moa_graph_decoder[1].step_call is gg._model_call
    assert compiled == [True] * gg.DEFAULT_COMPILE_LIMIT + [False, False]
    assert sum("captured without compiling" in str(w.message) for w in caught) == 1
    monkeypatch.setenv(COMPILE_ENV, "eager")
    with torch.no_grad():
        model.generate(_ids(1, 30, seed=1), do_sample=False, max_new_tokens=2)
    assert model._moa_graph_decoder[1].step_call is not gg._model_call
    release(model)
    torch._dynamo.reset()
