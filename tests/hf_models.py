"""Tiny random transformers models for the runtime tests, and the oracle they are checked against:
``reference_attention`` (the plan's mask, materialised) plugged into a copy of the same model as a
test-only attention function, reading its spans from the plan itself (``Plan.spans(k_len)``)."""

from __future__ import annotations

import copy
import functools

import torch
from conftest import tiny_config
from transformers import (
    AttentionInterface,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from moa_plan.plan import FORMAT_VERSION, Layer, ModelShape, Plan, Rule
from moa_plan.runtime import apply_plan
from moa_plan.runtime.reference import reference_attention

TOL = 1e-4
REF = "moa_test_reference"
TINY = dict(max_position_embeddings=512, initializer_range=0.2, bos_token_id=0, eos_token_id=None)  # no EOS
VOCAB = tiny_config().vocab_size
SHAPE = ModelShape(num_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
ARCHS = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
}


def _reference_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    plan: Plan = module.ref_plan
    spans = torch.tensor(plan.spans(key.shape[2])[module.layer_idx], dtype=torch.int32, device=query.device)
    out = reference_attention(query, key, value, spans, plan.sink, scaling)
    return out.transpose(1, 2).contiguous(), None


@functools.lru_cache(maxsize=None)
def _base(arch: str) -> torch.nn.Module:
    config_cls, model_cls = ARCHS[arch]
    torch.manual_seed(1234)
    return model_cls(tiny_config(config_cls, **TINY)).eval()


def _clone(arch: str, attn: str = "sdpa") -> torch.nn.Module:
    base = _base(arch)
    config = copy.deepcopy(base.config)
    config._attn_implementation = attn
    model = type(base)(config).eval()
    model.load_state_dict(base.state_dict())
    return model


@functools.lru_cache(maxsize=None)
def _planned(arch: str) -> torch.nn.Module:
    return _clone(arch)


@functools.lru_cache(maxsize=None)
def _reference(arch: str) -> torch.nn.Module:
    AttentionInterface.register(REF, _reference_forward)
    model = _clone(arch)
    model.set_attn_implementation(REF)
    return model


def _with_plan(arch: str, plan: Plan) -> tuple[torch.nn.Module, torch.nn.Module]:
    model = apply_plan(_planned(arch), plan)
    ref = _reference(arch)
    for m in ref.modules():
        if type(m).__name__.endswith("Attention"):
            m.ref_plan = plan
    return model, ref


def _plan(rules: list[list[Rule]], sink: int) -> Plan:
    return Plan(format_version=FORMAT_VERSION, model=SHAPE, sink=sink, layers=[Layer(heads=r) for r in rules])


def _ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))
