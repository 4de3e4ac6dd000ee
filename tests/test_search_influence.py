"""Influence profiling: exact gradients, exact aggregation, and agreement with real loss changes."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

sys.path.insert(0, str(Path(__file__).parent))
from conftest import tiny_model  # noqa: E402

from moa_plan.runtime.reference import plan_mask, reference_attention  # noqa: E402
from moa_plan.search import influence  # noqa: E402
from moa_plan.search.profile import profile_sample  # noqa: E402


def _naive(q, k, v, scale):
    group = q.shape[1] // k.shape[1]
    kr, vr = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    n = q.shape[2]
    s = q @ kr.transpose(-1, -2) * scale
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    a = torch.softmax(s.masked_fill(~causal, float("-inf")), -1)
    a.retain_grad()
    return a @ vr, a


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("hq,hkv,n,chunk,sink", [(4, 2, 37, 5, 3), (2, 2, 16, 16, 0), (6, 2, 23, 7, 30)])
def test_custom_backward_matches_autograd(hq, hkv, n, chunk, sink, signed):
    g = torch.Generator().manual_seed(n)
    d = 8
    q = torch.randn(2, hq, n, d, dtype=torch.float64, generator=g, requires_grad=True)
    k = torch.randn(2, hkv, n, d, dtype=torch.float64, generator=g, requires_grad=True)
    v = torch.randn(2, hkv, n, d, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(2, hq, n, d, dtype=torch.float64, generator=g)
    rec = influence.InfluenceRecorder(sink=sink, chunk=chunk, signed=signed)
    out = influence.influence_attention(q, k, v, None, rec, layer=0)
    (out * w).sum().backward()
    mine = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    ref, a = _naive(q, k, v, 1 / math.sqrt(d))
    (ref * w).sum().backward()
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    for m, r in zip(mine, (q.grad, k.grad, v.grad)):
        torch.testing.assert_close(m, r, rtol=0, atol=1e-11)

    # exact aggregation: rule influence from diag suffix sums == brute force over the element mask
    gA = a.grad
    s_row = (a * gA).sum(-1, keepdim=True)
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    entry = torch.where(causal & (a < 1), a * (s_row - gA) / (1 - a), torch.zeros_like(a))  # [b, hq, n, n]
    entry = (entry if signed else entry.abs()).sum(0)  # absolute value per sample, then summed
    diag = rec.diag[0]
    for span in [1, 2, 5, n // 2, n - 1, n]:
        spans = torch.full((hq,), span)
        removed = causal & ~plan_mask(spans, sink, n, n)  # what the plan hides, from the oracle
        brute = (entry * removed).sum((-1, -2))
        got = influence.rule_influence(diag, [span])[:, 0]
        torch.testing.assert_close(got, brute, rtol=1e-9, atol=1e-10)
    if not signed:  # a rule's cost can only grow as its window shrinks
        costs = influence.rule_influence(diag, list(range(1, n + 1)))
        assert bool((costs[:, :-1] >= costs[:, 1:]).all())


def test_influence_entry_formula_is_first_order_loss_change():
    """Hiding one key and renormalising changes a smooth loss by ~ the entry's influence."""
    g = torch.Generator().manual_seed(1)
    n, d = 12, 4
    q = torch.randn(1, 1, n, d, dtype=torch.float64, generator=g) * 0.3
    k = torch.randn(1, 1, n, d, dtype=torch.float64, generator=g) * 0.3
    v = torch.randn(1, 1, n, d, dtype=torch.float64, generator=g)
    w = torch.randn(1, 1, n, d, dtype=torch.float64, generator=g)
    rec = influence.InfluenceRecorder(sink=0, chunk=4, signed=True)
    q.requires_grad_(True)
    out = influence.influence_attention(q, k, v, None, rec)
    base = (out * w).sum()
    base.backward()
    # span n-1 hides exactly the entry (n-1, 0)
    est = influence.rule_influence(rec.diag[0], [n - 1])[0, 0].item()
    real = (reference_attention(q.detach(), k, v, torch.tensor([n - 1]), 0) * w).sum().item() - base.item()
    assert est == pytest.approx(real, rel=0.05, abs=1e-6)


def _masked_attention(spans_by_layer):
    def fn(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        spans = spans_by_layer[module.layer_idx]
        out = reference_attention(query, key, value, spans, sink=0, scale=scaling)
        return out.transpose(1, 2).contiguous(), None

    return fn


def test_influence_ranks_real_loss_changes_on_tiny_model():
    """Predicted loss increase of masking a head beyond a span vs the measured one: rank correlation."""
    from transformers import AttentionInterface

    model = tiny_model(seed=3, attn=influence.register_attention(), init_std=0.1)
    for p in model.parameters():
        p.requires_grad_(False)
    n, answer = 96, 8
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(4, 100, (n,), generator=g).tolist()
    prompt, ans = ids[:-answer], ids[-answer:]
    rec = influence.InfluenceRecorder(sink=0, chunk=32, signed=True)
    base, diag = profile_sample(model, prompt, ans, rec)
    layers, heads = diag.shape[:2]
    spans_by_layer = {l: torch.full((heads,), n) for l in range(layers)}
    AttentionInterface.register("moa_test_masked", _masked_attention(spans_by_layer))
    model.config._attn_implementation = "moa_test_masked"
    full = torch.tensor([prompt + ans])

    def loss_now():
        with torch.no_grad():
            logits = model(full, logits_to_keep=answer + 1, use_cache=False).logits[0, :answer]
        return torch.nn.functional.cross_entropy(logits, torch.tensor(ans)).item()

    assert loss_now() == pytest.approx(base, abs=1e-4)  # dense masked path == profiled path
    pred, real = [], []
    for l in range(layers):
        for h in range(heads):
            for span in (8, 24, 48, 80):
                pred.append(influence.rule_influence(diag[l, h].double(), [span])[0].item())
                spans_by_layer[l][h] = span
                real.append(loss_now() - base)
                spans_by_layer[l][h] = n
    rank = lambda x: torch.tensor(x).argsort().argsort().double()  # noqa: E731
    rp, rr = rank(pred), rank(real)
    rho = torch.corrcoef(torch.stack([rp, rr]))[0, 1].item()
    assert rho > 0.6, (rho, pred, real)


@pytest.mark.parametrize("seed", [0, 1])
def test_absolute_influence_cost_never_grows_with_the_span(seed):
    """The reference's absolute per-entry influence: on a profile of a real forward/backward pass,
    every head's cost is non-increasing as its span grows (a wider window can only hide less), so
    no head is rewarded for a narrower window. The signed sum has no such guarantee."""
    model = tiny_model(seed=seed, attn=influence.register_attention(), init_std=0.1)
    for p in model.parameters():
        p.requires_grad_(False)
    n, answer, sink = 120, 8, 4
    g = torch.Generator().manual_seed(seed + 11)
    diags = []
    for _ in range(3):
        ids = torch.randint(4, 100, (n,), generator=g).tolist()
        rec = influence.InfluenceRecorder(sink=sink, chunk=32, signed=False)
        _, diag = profile_sample(model, ids[:-answer], ids[-answer:], rec)
        diags.append(diag.double())
    diag = torch.stack(diags).mean(0)
    layers, heads = diag.shape[:2]
    spans = list(range(1, n + 1))
    cost = influence.rule_influence(diag.reshape(layers * heads, -1), spans)  # [units, spans]
    assert (cost >= -1e-12).all()
    assert (cost[:, 1:] <= cost[:, :-1] + 1e-12).all()
    assert cost[:, -1].abs().max() < 1e-9  # the full span hides nothing
