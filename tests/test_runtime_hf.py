"""End to end on tiny random transformers models: a planned model attends exactly as the plan says.

The oracle is ``reference_attention`` (materialised plan mask) plugged into a copy of the same model
as a test-only attention function; it reads spans from the plan itself (``Plan.spans(k_len)``).
Tolerance: float32 everywhere, logits compared with atol = rtol = 1e-4 (TOL).
"""

from __future__ import annotations

import pytest
import torch
from hf_models import (
    TOL,
    _clone,
    _ids,
    _plan,
    _planned,
    _with_plan,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import (
    DynamicCache,
)

from moa_plan.io import save_plan
from moa_plan.plan import FORMAT_VERSION, ModelShape, Plan, PlanError, Rule
from moa_plan.runtime import MoACache, apply_plan, load_model
from moa_plan.runtime.cache import memory_report
from moa_plan.runtime.hf import CACHE_ARG

rule_st = st.builds(Rule, alpha=st.integers(-4, 40).map(float), beta=st.sampled_from([0.0, 0.0, 0.1, 0.25, 0.6, 1.0]))
plan_st = st.builds(
    _plan,
    st.lists(st.lists(rule_st, min_size=4, max_size=4), min_size=2, max_size=2),
    st.sampled_from([0, 1, 3, 10, 100]),
)


def _assert_greedy_consistent(logits: torch.Tensor, tokens: torch.Tensor) -> None:
    """Generated tokens are the argmax of the oracle's logits wherever the top-2 gap is not a near-tie."""
    top2 = logits.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 10 * TOL
    assert torch.equal(logits.argmax(-1)[clear], tokens[clear])


# ---- (a) every span = N gives the dense model ------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("dense_attn", ["eager", "sdpa"])
def test_dense_plan_gives_dense_logits(arch, dense_attn):
    dense = _clone(arch, dense_attn)
    model = apply_plan(_planned(arch), "dense")
    ids = _ids(2, 57)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, dense(ids).logits, atol=TOL, rtol=TOL)
        out = model.generate(ids, max_new_tokens=6, do_sample=False, return_dict_in_generate=True, output_logits=True)
        ref = dense.generate(ids, max_new_tokens=6, do_sample=False, return_dict_in_generate=True, output_logits=True)
    assert isinstance(getattr(out, CACHE_ARG), MoACache)
    torch.testing.assert_close(torch.stack(out.logits), torch.stack(ref.logits), atol=TOL, rtol=TOL)


def test_generate_uses_the_current_cache_keyword(recwarn, caplog):
    """No 'past_key_values is deprecated' warning from generate or from reading its output."""
    import warnings

    model = apply_plan(_planned("llama"), "uniform:0.5")
    warnings.simplefilter("always")
    with torch.no_grad():
        out = model.generate(_ids(1, 21), max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    assert isinstance(getattr(out, CACHE_ARG), MoACache)
    said = [str(w.message) for w in recwarn] + [r.getMessage() for r in caplog.records]
    assert not [m for m in said if "past_key_values" in m], said


# ---- (b) a random plan's logits equal the reference with the plan's mask ---------------------


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plan=plan_st, arch=st.sampled_from(["llama", "qwen2", "mistral"]), n=st.integers(1, 70))
def test_random_plan_logits_equal_reference(plan, arch, n):
    model, ref = _with_plan(arch, plan)
    ids = _ids(2, n, seed=n)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids, use_cache=False).logits, atol=TOL, rtol=TOL)


# ---- (c) greedy generation through MoACache ---------------------------------------------------


def test_generate_equals_full_forward_at_each_steps_n():
    """Layer 0 has N-independent spans (beta 0, alpha <= prompt), layer 1 grows (beta > 0) and evicts
    from its ring: step t's logits are then exactly those of a full reference forward at N = P + t."""
    prompt, new = 30, 24
    layer0 = [Rule(alpha=a, beta=0.0) for a in (1.0, 5.0, 12.0, 30.0)]
    layer1 = [Rule(alpha=a, beta=b) for a, b in ((2.0, 0.1), (-3.0, 0.3), (4.0, 0.05), (0.0, 1.0))]
    plan = _plan([layer0, layer1], sink=3)
    model, ref = _with_plan("llama", plan)
    ids = _ids(2, prompt, seed=7)
    with torch.no_grad():
        out = model.generate(
            ids,
            max_new_tokens=new,
            do_sample=False,
            return_dict_in_generate=True,
            output_logits=True,
            attention_mask=torch.ones_like(ids),
        )
        cache = getattr(out, CACHE_ARG)
        assert isinstance(cache, MoACache) and cache.n_max == prompt + new
        seq = out.sequences
        assert seq.shape[1] == prompt + new
        for t in range(new):
            want = ref(seq[:, : prompt + t], use_cache=False).logits[:, -1]
            torch.testing.assert_close(out.logits[t], want, atol=TOL, rtol=TOL, msg=f"step {t}")
            _assert_greedy_consistent(want, seq[:, prompt + t])


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plan=plan_st, chunks=st.lists(st.integers(1, 9), min_size=1, max_size=3), new=st.integers(1, 22))
def test_cached_steps_equal_stepwise_reference(plan, chunks, new):
    """Any plan (spans growing in every layer): prefill in chunks then decode through MoACache equals
    the reference attention run call by call over transformers' dense DynamicCache (same N per call)."""
    model, ref = _with_plan("llama", plan)
    prompt = sum(chunks)
    ids = _ids(1, prompt + new, seed=prompt)
    cache = MoACache(model, prompt + new)
    dyn = DynamicCache(config=ref.config)
    with torch.no_grad():
        start = 0
        for size in [*chunks, *([1] * new)]:
            piece = ids[:, start : start + size]
            got = model(piece, **{CACHE_ARG: cache}).logits
            want = ref(piece, **{CACHE_ARG: dyn}).logits
            torch.testing.assert_close(got, want, atol=TOL, rtol=TOL, msg=f"positions {start}..{start + size - 1}")
            start += size
    assert cache.get_seq_length() == prompt + new


def test_generate_beyond_the_cache_is_refused():
    model, _ = _with_plan("llama", _plan([[Rule(alpha=4.0, beta=0.0)] * 4] * 2, sink=1))
    cache = MoACache(model, 10)
    with torch.no_grad(), pytest.raises(ValueError, match="n_max"):
        model(_ids(1, 11), **{CACHE_ARG: cache})


# ---- (d) plans that do not fit; memory ----------------------------------------------------------


def test_plan_that_does_not_fit_is_refused_with_location():
    wrong = Plan(
        format_version=FORMAT_VERSION,
        sink=0,
        default=Rule(alpha=8.0, beta=0.0),
        model=ModelShape(num_layers=3, num_attention_heads=8, num_key_value_heads=2, head_dim=16),
    )
    with pytest.raises(PlanError) as err:
        apply_plan(_clone("llama"), wrong)
    assert ("model.num_attention_heads", "is 8, the model has 4") in err.value.problems
    assert ("model.num_layers", "is 3, the model has 2") in err.value.problems


def test_memory_equals_the_plans_slots():
    plan = _plan([[Rule(alpha=0.0, beta=0.5)] * 4, [Rule(alpha=6.0, beta=0.0)] * 4], sink=2)
    model, _ = _with_plan("llama", plan)
    ids = _ids(3, 40)
    with torch.no_grad():
        out = model.generate(
            ids, max_new_tokens=8, do_sample=False, return_dict_in_generate=True, attention_mask=torch.ones_like(ids)
        )
    cache = getattr(out, CACHE_ARG)
    n_max = 48
    slots = sum(map(sum, plan.kv_slots(n_max)))  # layer 0: 2 + 24 per KV head; layer 1: 2 + 6
    assert slots == 2 * 26 + 2 * 8
    report = cache.memory_report()
    assert report.slots == slots
    assert cache.allocated_bytes() == report.bytes_allocated == slots * 2 * 3 * 16 * 4
    assert report.bytes_dense == 2 * 2 * n_max * 2 * 3 * 16 * 4
    assert report == memory_report(plan, n_max, 3, torch.float32)


def test_padded_batch_is_refused():
    model, _ = _with_plan("llama", _plan([[Rule(alpha=4.0, beta=0.0)] * 4] * 2, sink=1))
    ids = _ids(2, 9)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with torch.no_grad(), pytest.raises(ValueError, match="equal-length prompts"):
        model.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False)


def _causal_4d(batch: int, q_len: int, kv_len: int, past: int, kind: str) -> torch.Tensor:
    i = torch.arange(past, past + q_len).view(-1, 1)
    allowed = (torch.arange(kv_len).view(1, -1) <= i).expand(batch, 1, q_len, kv_len).clone()
    if kind == "bool":
        return allowed
    return torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_4d_masks_hiding_keys_are_refused_and_causal_ones_honoured(kind):
    """Issue 15: a [B,1,L,L] mask hiding padding keys used to be ignored (logits equal to the unmasked
    run). It is refused; the exact causal mask, bool or float, gives the logits of no mask at all."""
    plan = _plan([[Rule(alpha=4.0, beta=0.5)] * 4, [Rule(alpha=1e6, beta=1.0)] * 4], sink=1)
    model, ref = _with_plan("llama", plan)
    ids = _ids(2, 12, seed=3)
    causal = _causal_4d(2, 12, 12, 0, kind)
    padded = causal.clone()
    padded[0, :, :, :3] = False if kind == "bool" else torch.finfo(torch.float32).min
    dense = _clone("llama")  # transformers' own attention honours the padding: the answers differ
    with torch.no_grad():
        assert not torch.allclose(dense(ids, attention_mask=padded).logits[0], dense(ids).logits[0], atol=1e-3)
        with pytest.raises(ValueError, match="hides keys the plan"):
            model(ids, attention_mask=padded)
        torch.testing.assert_close(
            model(ids, attention_mask=causal).logits, ref(ids, use_cache=False).logits, atol=TOL, rtol=TOL
        )
        if kind == "float":
            biased = causal.clone()
            biased[1, :, 5, 2] = -1.0
            with pytest.raises(ValueError, match="bias"):
                model(ids, attention_mask=biased)


def test_4d_mask_showing_future_keys_is_refused():
    model, _ = _with_plan("llama", _plan([[Rule(alpha=4.0, beta=0.0)] * 4] * 2, sink=1))
    ids = _ids(1, 6)
    with torch.no_grad(), pytest.raises(ValueError, match="causal"):
        model(ids, attention_mask=torch.ones(1, 1, 6, 6, dtype=torch.bool))


def test_packed_position_ids_are_refused_offsets_kept():
    """Several documents in one row (position_ids restarting) are refused; positions that only start
    later (no restart) change nothing about the mask and run."""
    plan = _plan([[Rule(alpha=3.0, beta=0.25)] * 4] * 2, sink=1)
    model, _ = _with_plan("llama", plan)
    ids = _ids(1, 10)
    with torch.no_grad():
        with pytest.raises(ValueError, match="position_ids"):
            model(ids, position_ids=torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4]]))
        with pytest.raises(ValueError, match="position_ids"):
            model(
                ids,
                position_ids=torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7, 8, 9], [0, 1, 2, 0, 1, 2, 3, 4, 5, 6]]),
                use_cache=False,
            )
        shifted = model(ids, position_ids=torch.arange(5, 15).view(1, -1)).logits
        assert torch.isfinite(shifted).all()


def test_a_refused_step_leaves_the_cache_untouched():
    """The check runs before the decoder: a refused decode step writes nothing, and the next valid
    step gives the same logits as if the refused one had never been tried."""
    plan = _plan([[Rule(alpha=3.0, beta=0.25)] * 4, [Rule(alpha=0.0, beta=1.0)] * 4], sink=1)
    model, ref = _with_plan("llama", plan)
    ids = _ids(1, 14, seed=5)
    cache = MoACache(model, 14)
    dyn = DynamicCache(config=ref.config)
    with torch.no_grad():
        model(ids[:, :12], past_key_values=cache)
        ref(ids[:, :12], past_key_values=dyn)
        before = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
        bad = _causal_4d(1, 1, 13, 12, "bool")
        bad[..., 4] = False  # hides a key the plan shows
        with pytest.raises(ValueError, match="hides keys"):
            model(ids[:, 12:13], past_key_values=cache, attention_mask=bad)
        assert cache.get_seq_length() == 12
        for layer, (k, v) in zip(cache.layers, before):
            assert torch.equal(layer.keys, k) and torch.equal(layer.values, v)
        for t in (12, 13):  # step 12 with the exact causal mask of a decode step (honoured), 13 without one
            mask = _causal_4d(1, 1, t + 1, t, "bool") if t == 12 else None
            got = model(ids[:, t : t + 1], past_key_values=cache, attention_mask=mask).logits
            torch.testing.assert_close(got, ref(ids[:, t : t + 1], past_key_values=dyn).logits, atol=TOL, rtol=TOL)


# ---- loading ----------------------------------------------------------------------------------------


def test_load_model_refuses_a_bad_plan_before_reading_weights(tmp_path, monkeypatch):
    import os

    from transformers import AutoModelForCausalLM

    _clone("llama").save_pretrained(tmp_path / "model")
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("weights read first"))
    os.mkfifo(tmp_path / "fifo.json")
    (tmp_path / "zero.json").symlink_to("/dev/zero")
    (tmp_path / "bad.json").write_text('{"format_version": 1}')
    for name, message in [
        ("fifo.json", "a FIFO, not a regular file"),
        ("zero.json", "a character device"),
        ("bad.json", "model: required field is missing"),
    ]:
        with pytest.raises(PlanError) as err:
            load_model(tmp_path / "model", tmp_path / name)
        assert str(err.value).startswith(f"{tmp_path / name}: ") and message in str(err.value)
    (tmp_path / "cfg").mkdir()
    os.mkfifo(tmp_path / "cfg" / "config.json")
    with pytest.raises(PlanError, match="a FIFO"):
        load_model(tmp_path / "cfg", "dense")


def test_load_model_from_saved_dir_and_plan_file(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _clone("llama").save_pretrained(tmp_path / "model")
    plan = _plan([[Rule(alpha=3.0, beta=0.2)] * 4, [Rule(alpha=-2.0, beta=0.5)] * 4], sink=2)
    save_plan(plan, tmp_path / "plan.json")
    model = load_model(tmp_path / "model", tmp_path / "plan.json", dtype=torch.float32)
    assert model.moa_plan == plan
    _, ref = _with_plan("llama", plan)
    ids = _ids(1, 33)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=20, do_sample=False, return_dict_in_generate=True, output_logits=True)
        assert isinstance(getattr(out, CACHE_ARG), MoACache)
        want = ref(out.sequences[:, :33], use_cache=False).logits[:, -1]
        torch.testing.assert_close(out.logits[0], want, atol=TOL, rtol=TOL)
    # a planned model saved with save_pretrained keeps its plan in config.json
    model.save_pretrained(tmp_path / "planned")
    again = load_model(tmp_path / "planned", dtype=torch.float32)
    assert again.moa_plan == plan


def test_plan_strings():
    model = apply_plan(_clone("llama"), "uniform:0.5@512")
    assert model.moa_plan.model.num_attention_heads == 4
    assert model.moa_plan.density(512) <= 0.5
    with pytest.raises(PlanError, match="uniform"):
        apply_plan(_clone("llama"), "uniform:half")
    with pytest.raises(PlanError):
        apply_plan(_clone("llama"), "no-such-plan.json")
