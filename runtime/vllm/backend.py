"""The vLLM attention backend that applies a plan: ``moa_plan.runtime.paged`` over vLLM's pages.

Stage 1 (this file): vLLM's pages hold every head of a layer, as for dense attention, so the plan
saves attention work, not KV memory (stage 2, per-head memory: VLLM.md next to this file).

Per step the metadata builder computes each sequence's spans at its own N (the total length
after this forward call: vLLM's ``seq_lens``), for every layer at once; each layer then reads
its row. Under tensor parallelism rank r holds query heads [r * H_local, (r + 1) * H_local) of
every layer (vLLM's split), so it takes exactly those heads' rules from the plan.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import ClassVar

import torch
from vllm.config import VllmConfig, get_current_vllm_config
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionCGSupport,
    AttentionImpl,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
)

from moa_plan.model_config import shape_from_config
from moa_plan.runtime.paged import paged_attention, spans_at, write_kv
from moa_plan.runtime.vllm import PLAN_ENV, LocalRules, MoAPlanError, local_rules, plan_spec, resolve


@lru_cache(maxsize=8)
def _rules(spec: str, config_json: str, rank: int, heads: int) -> LocalRules:
    import json

    shape = shape_from_config(json.loads(config_json))
    return local_rules(resolve(spec, shape), rank, heads)


def rules_for(vllm_config: VllmConfig, heads: int) -> LocalRules:
    """The plan of MOA_PLAN checked against the served model, sliced for this TP rank."""
    spec = plan_spec()
    if spec is None:
        raise MoAPlanError(
            f"{PLAN_ENV}: not set: the MoA attention backend needs a plan (a plan file, 'dense' or 'uniform:<density>')"
        )
    from vllm.distributed import get_tensor_model_parallel_rank

    config = vllm_config.model_config.hf_text_config.to_json_string(use_diff=False)
    return _rules(spec, config, get_tensor_model_parallel_rank(), heads)


@dataclass
class MoAMetadata:
    num_actual_tokens: int
    max_query_len: int
    query_start_loc: torch.Tensor  # [S + 1]
    seq_lens: torch.Tensor  # [S], N of each sequence after this step
    block_table: torch.Tensor  # [S, pages]
    spans: torch.Tensor  # int32 [L, S, H_local]


class MoAMetadataBuilder(AttentionMetadataBuilder[MoAMetadata]):
    # Spans are computed on the host every step from the sequence lengths: no CUDA graphs.
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.NEVER

    def __init__(self, kv_cache_spec, layer_names: list[str], vllm_config: VllmConfig, device: torch.device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        heads = vllm_config.model_config.get_num_attention_heads(vllm_config.parallel_config)
        self.rules = rules_for(vllm_config, heads)
        self.exact_cpu_lens = vllm_config.speculative_config is None

    def build(
        self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata, fast_build: bool = False
    ) -> MoAMetadata:
        m = common_attn_metadata
        lens = m.seq_lens_cpu_upper_bound if self.exact_cpu_lens else None
        lens = (m.seq_lens if lens is None else lens)[: m.num_reqs]
        spans = spans_at(self.rules.alphas, self.rules.betas, lens).to(self.device, non_blocking=True)
        return MoAMetadata(
            num_actual_tokens=m.num_actual_tokens,
            max_query_len=m.max_query_len,
            query_start_loc=m.query_start_loc[: m.num_reqs + 1],
            seq_lens=m.seq_lens[: m.num_reqs],
            block_table=m.block_table_tensor[: m.num_reqs],
            spans=spans,
        )


def _split_cache(kv_cache: torch.Tensor, head_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM's logical per-layer view [pages, Hkv, PAGE, 2 * D] -> K, V views [pages, PAGE, Hkv, D]."""
    return kv_cache.transpose(1, 2).split(head_size, dim=-1)


class MoAImpl(AttentionImpl[MoAMetadata]):
    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int | None = None,
        alibi_slopes: list[float] | None = None,
        sliding_window: int | None = None,
        kv_cache_dtype: str = "auto",
        logits_soft_cap: float | None = None,
        attn_type: str = AttentionType.DECODER,
        kv_sharing_target_layer_name: str | None = None,
        sinks: torch.Tensor | None = None,
    ) -> None:
        unsupported = {
            "ALiBi": alibi_slopes is not None,
            "a model sliding window": sliding_window is not None,
            "logits soft-capping": bool(logits_soft_cap),
            "learned attention sinks": sinks is not None,
            f"attention type {attn_type}": attn_type != AttentionType.DECODER,
            f"kv_cache_dtype {kv_cache_dtype}": kv_cache_dtype not in ("auto", "float16", "bfloat16"),
        }
        for what, bad in unsupported.items():
            if bad:
                raise NotImplementedError(f"moa-plan's vLLM backend does not support {what}")
        self.num_heads, self.head_size, self.scale = num_heads, head_size, float(scale)
        self.num_kv_heads = num_kv_heads or num_heads
        self.kv_cache_dtype = kv_cache_dtype
        self.kv_sharing_target_layer_name = kv_sharing_target_layer_name
        self.rules = rules_for(get_current_vllm_config(), num_heads)  # a bad plan stops here, before weights load
        self.layer_idx: int | None = None

    def do_kv_cache_update(
        self, layer, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor
    ) -> None:
        key_cache, value_cache = _split_cache(kv_cache, self.head_size)
        write_kv(key, value, key_cache, value_cache, slot_mapping)

    def forward(
        self,
        layer,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: MoAMetadata | None,
        output: torch.Tensor,
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("moa-plan's vLLM backend does not fuse output quantization")
        if attn_metadata is None:  # profiling run
            return output.fill_(0)
        if self.layer_idx is None:
            from vllm.model_executor.models.utils import extract_layer_index

            self.layer_idx = extract_layer_index(layer.layer_name)
        n = attn_metadata.num_actual_tokens
        key_cache, value_cache = _split_cache(kv_cache, self.head_size)
        paged_attention(
            query[:n],
            key_cache,
            value_cache,
            attn_metadata.block_table,
            attn_metadata.query_start_loc,
            attn_metadata.seq_lens,
            attn_metadata.spans[self.layer_idx],
            self.rules.sink,
            self.scale,
            out=output[:n],
            max_query_len=attn_metadata.max_query_len,
        )
        return output


class MoABackend(AttentionBackend):
    """Per-head sink + elastic window attention from a MoA plan (MOA_PLAN)."""

    forward_includes_kv_cache_update: bool = False
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes: ClassVar[list] = ["auto", "float16", "bfloat16"]

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"

    @staticmethod
    def get_impl_cls() -> type[MoAImpl]:
        return MoAImpl

    @staticmethod
    def get_builder_cls() -> type[MoAMetadataBuilder]:
        return MoAMetadataBuilder
