"""transformers integration: make a Llama-family causal LM attend exactly as a plan says.

Public extension points only: an attention function registered as ``"moa"`` in
``transformers.AttentionInterface`` (plus a mask function that builds nothing: the plan's mask is
made inside the attention function), a forward pre-hook on the decoder that refuses inputs the
plan cannot honour (``check_inputs``) before anything runs or any cache is written, a
``Cache`` subclass (``MoACache``: per-layer static cache with the plan's per-head layout), and
an instance-level ``generate`` that supplies a ``MoACache`` sized prompt + max_new_tokens (the
same pattern transformers uses for ``custom_generate``).

How the attention function learns N: with a ``MoACache``, its ``update`` tags the returned key
tensor with the step (layer, cached length), so N = cached + q_len; without one (plain forward,
or a transformers cache that returns all keys) N = k_len.

The plan replaces the model's attention pattern entirely: a native sliding window (Mistral,
Qwen2 with use_sliding_window) is not applied on top of it. ``hf_apply`` puts all this on a model.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AttentionInterface, Cache, PreTrainedModel
from transformers.cache_utils import CacheLayerMixin
from transformers.masking_utils import AttentionMaskInterface

from moa_plan.plan import Plan
from moa_plan.runtime.attention import cached_keys, chunk_attention, decode_attention, prefill_attention
from moa_plan.runtime.cache import LayerLayout, MemoryReport, allocate, memory_report, write_kv, write_token
from moa_plan.runtime.decode_op import decode as decode_op
from moa_plan.runtime.static_step import StaticDecode

ATTN_NAME = "moa"
_STEP_ATTR = "moa_step"


def _cache_arg() -> str:
    """The keyword transformers takes a cache by: ``cache`` in recent releases (where
    ``past_key_values`` is deprecated and warns), ``past_key_values`` before."""
    import dataclasses

    from transformers.modeling_outputs import CausalLMOutputWithPast

    return "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"


CACHE_ARG = _cache_arg()


# ---- plan state shared by the attention modules -------------------------------------------


class PlanState:
    """The plan of a model plus a small per-length cache of its spans as device tensors."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self.sink = plan.sink
        self._spans: dict[tuple[int, str], torch.Tensor | list[list[int]]] = {}

    def _table(self, n: int, device: torch.device | None) -> torch.Tensor | list[list[int]]:
        """Every layer's spans at total length n: ``Plan.spans`` (device None), or that table as an
        int32 tensor on ``device``; the last few (length, place) pairs met are kept."""
        key = (int(n), "host" if device is None else str(device))
        table = self._spans.get(key)
        if table is None:
            if len(self._spans) >= 8:
                self._spans.pop(next(iter(self._spans)))
            host = self.plan.spans(int(n)) if device is None else self._table(n, None)
            table = host if device is None else torch.tensor(host, dtype=torch.int32, device=device)
            self._spans[key] = table
        return table

    def spans(self, layer: int, n: int, device: torch.device) -> torch.Tensor:
        """int32 [Hq]: the layer's spans at total length n (``Plan.spans``), on ``device``."""
        return self._table(n, device)[layer]

    def host_spans(self, layer: int, n: int) -> list[int]:
        """The same spans as a Python list."""
        return list(self._table(n, None)[layer])


# ---- the static cache ----------------------------------------------------------------------


@dataclass
class _Step:
    """What the attention function needs about the current update of one layer."""

    layer: MoALayer
    past: int  # positions cached before this update
    cached: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # cache view before a chunk was written
    static: StaticDecode | None = None  # set: a static decode step (position, N and spans on the device)


class MoALayer(CacheLayerMixin):
    """One layer's per-head static cache: flat K/V buffers [B, S, D] with a ``LayerLayout``."""

    is_compileable = False
    is_sliding = False
    is_croppable = False

    def __init__(self, plan: Plan, layer_idx: int, n_max: int):
        super().__init__()
        self.plan, self.layer_idx, self.n_max = plan, layer_idx, n_max
        self.caps = plan.kv_slots(n_max)[layer_idx]
        self.layout: LayerLayout | None = None
        self.length = 0
        self.static: StaticDecode | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, hkv, _, d = key_states.shape
        if hkv != len(self.caps):
            raise ValueError(f"layer {self.layer_idx}: the model gives {hkv} KV heads, the plan {len(self.caps)}")
        self.dtype, self.device = key_states.dtype, key_states.device
        self.batch_size = batch
        self.layout = LayerLayout.from_caps(self.caps, self.plan.sink, self.n_max, self.device)
        self.keys, self.values = allocate(self.layout, batch, d, self.dtype, self.device)
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new positions; return the new K/V tagged with the step for the attention function."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        t = key_states.shape[2]
        past = self.length
        if past + t > self.n_max:
            raise ValueError(
                f"MoACache holds {self.n_max} positions (n_max); this step needs {past + t}: "
                "build the cache with a larger n_max"
            )
        if key_states.shape[0] != self.keys.shape[0]:
            raise ValueError(f"batch of {key_states.shape[0]} does not match the cache's {self.keys.shape[0]}")
        if self.static is not None and t == 1:  # static step: position from the device, nothing read back
            write_token(self.keys, self.values, self.layout, key_states, value_states, self.static.pos)
            self.length = past + 1
            setattr(key_states, _STEP_ATTR, _Step(self, past, None, self.static))
            return key_states, value_states
        cached = cached_keys(self.keys, self.values, self.layout, past) if past > 0 and t > 1 else None
        write_kv(self.keys, self.values, self.layout, key_states, value_states, past)
        self.length = past + t
        setattr(key_states, _STEP_ATTR, _Step(self, past, cached))
        return key_states, value_states

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self.n_max

    get_max_cache_shape = get_max_length  # its name before transformers 5.x renamed it

    def reset(self) -> None:
        super().reset()
        self.length = 0

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("MoACache cannot be cropped: its ring buffers drop old positions")

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self.keys = self.keys.repeat_interleave(repeats, dim=0)
            self.values = self.values.repeat_interleave(repeats, dim=0)
            self.batch_size = self.keys.shape[0]

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self.keys, self.values = self.keys[indices], self.values[indices]
            self.batch_size = self.keys.shape[0]


class MoACache(Cache):
    """Per-head static KV cache of a planned model, serving total lengths up to ``n_max``.

    Pass it as ``model(..., **{CACHE_ARG: cache})`` (``cache=`` in recent transformers,
    ``past_key_values=`` before); ``generate`` of a model from ``apply_plan`` does so itself.
    """

    def __init__(self, model_or_plan: PreTrainedModel | Plan, n_max: int):
        plan = model_or_plan if isinstance(model_or_plan, Plan) else plan_of(model_or_plan)
        if n_max < 1:
            raise ValueError(f"n_max must be >= 1, got {n_max}")
        self.plan, self.n_max = plan, n_max
        super().__init__(layers=[MoALayer(plan, l, n_max) for l in range(plan.model.num_layers)])

    def memory_report(self, batch: int | None = None, dtype: torch.dtype | None = None) -> MemoryReport:
        """Bytes of this cache's K/V buffers vs a dense cache (batch/dtype of the allocated buffers by default)."""
        first = self.layers[0]
        if batch is None or dtype is None:
            if not first.is_initialized:
                raise ValueError("the cache is not allocated yet: pass batch and dtype")
            batch = first.keys.shape[0] if batch is None else batch
            dtype = first.keys.dtype if dtype is None else dtype
        return memory_report(self.plan, self.n_max, batch, dtype)

    def set_static(self, static: StaticDecode | None) -> None:
        """Decode steps (one token) read position, N and spans from ``static`` (None: from host ints)."""
        for layer in self.layers:
            layer.static = static

    def set_length(self, length: int) -> None:
        """The host's count of cached positions (static steps replayed in a CUDA graph do not run the
        Python that counts them); no device work."""
        if not 0 <= length <= self.n_max:
            raise ValueError(f"length {length} outside 0..{self.n_max}")
        for layer in self.layers:
            layer.length = length

    def allocated_bytes(self) -> int:
        """Bytes actually held by the allocated K/V buffers."""
        return sum(2 * layer.keys.numel() * layer.keys.element_size() for layer in self.layers if layer.is_initialized)


# ---- attention and mask functions ------------------------------------------------------------


def moa_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: q [B,Hq,Lq,D], k/v [B,Hkv,Lk,D] -> ([B,Lq,Hq,D], None)."""
    state: PlanState | None = getattr(module, "moa_state", None)
    if state is None:
        raise RuntimeError("attn_implementation 'moa' needs moa_plan.runtime.apply_plan(model, plan) first")
    layer = module.layer_idx
    q_len = query.shape[2]
    step: _Step | None = getattr(key, _STEP_ATTR, None)
    if step is not None and step.static is not None:
        cache, static = step.layer, step.static
        d = query.shape[-1]
        out = decode_op(
            query[:, :, 0],
            [cache.keys, cache.values],
            [cache.layout.offset, cache.layout.cap, cache.layout.n_sink],
            static.spans[layer],
            static.n,
            state.sink,
            float(scaling) if scaling is not None else d**-0.5,
            max(cache.caps),  # the widest KV head of this layer's cache: fixes the launch
        ).unsqueeze(2)
    elif step is None or step.past == 0:  # every key is in hand: N = k_len
        spans = state.spans(layer, key.shape[2], query.device)
        host = state.host_spans(layer, key.shape[2])
        out = prefill_attention(query, key, value, spans, state.sink, scaling, host_spans=host)
    else:
        n = step.past + q_len
        spans = state.spans(layer, n, query.device)
        cache = step.layer
        if q_len == 1:
            out = decode_attention(
                query[:, :, 0], cache.keys, cache.values, cache.layout, spans, state.sink, n, scaling
            ).unsqueeze(2)
        else:
            out = chunk_attention(query, key, value, step.cached, step.past, spans, state.sink, scaling)
    return out.transpose(1, 2).contiguous(), None


def moa_mask(*args: Any, **kwargs: Any) -> None:
    """No mask tensor: the plan's mask is built inside the attention function (the inputs were
    checked by ``check_inputs`` before the decoder ran). Takes whatever the mask interface passes
    (its argument names differ between transformers releases)."""
    return None


def check_inputs(attention_mask: Any, position_ids: torch.Tensor | None, past: int, q_len: int | None) -> None:
    """Refuse what the plan's attention cannot honour, so nothing is silently ignored:

    * a 2-D mask with padding (0 entries): spans depend on each sequence's own length N;
    * a 4-D mask that is not exactly the causal mask of positions ``past .. past + q_len - 1``
      (bool True / float 0.0 on every key at or before the query, hidden after it): it would
      hide keys the plan shows, or add a bias the plan's kernels do not add;
    * ``position_ids`` that restart inside a row (several packed documents): the plan sees one
      sequence per row.
    """
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor):
            raise ValueError(
                f"moa attention takes no {type(attention_mask).__name__} attention_mask; pass a 2-D "
                "padding-free mask or none"
            )
        if attention_mask.dim() == 2:
            if not bool(attention_mask.bool().all()):
                raise ValueError(
                    "moa attention runs batches of equal-length prompts only: the attention_mask has "
                    "padding (0 entries); run the prompts one by one or batch prompts of the same length"
                )
        elif attention_mask.dim() == 4 and q_len is not None:
            _check_mask_4d(attention_mask, past, q_len)
        else:
            raise ValueError(
                f"moa attention takes a 2-D [batch, length] or 4-D attention_mask, got shape "
                f"{tuple(attention_mask.shape)}"
            )
    if position_ids is not None and position_ids.shape[-1] > 1:
        steps = torch.diff(position_ids.reshape(-1, position_ids.shape[-1]), dim=-1)
        if not bool((steps == 1).all()):
            raise ValueError(
                "moa attention runs one sequence per row: these position_ids do not count up by one "
                "(packed sequences restart them); give each document its own row or call"
            )


def _check_mask_4d(mask: torch.Tensor, past: int, q_len: int) -> None:
    if mask.dtype == torch.bool:
        attend = mask
    elif mask.is_floating_point():
        attend = mask == 0
        hidden = mask <= torch.finfo(mask.dtype).min / 2  # -inf or the dtype's min, as transformers writes it
        if not bool((attend | hidden).all()):
            raise ValueError(
                "moa attention cannot add an attention bias: a float attention_mask may only hold 0 "
                "(attend) and -inf / the dtype's minimum (hidden)"
            )
    else:
        raise ValueError(f"moa attention takes a bool or float 4-D attention_mask, got {mask.dtype}")
    if mask.shape[-2] != q_len or mask.shape[-1] < past + q_len:
        raise ValueError(
            f"4-D attention_mask of shape {tuple(mask.shape)} does not cover {q_len} queries after "
            f"{past} cached positions"
        )
    i = torch.arange(past, past + q_len, device=mask.device).view(-1, 1)
    j = torch.arange(mask.shape[-1], device=mask.device).view(1, -1)
    if not bool((attend == (j <= i)).all()):
        raise ValueError(
            "moa attention honours only the causal mask: this 4-D attention_mask hides keys the plan "
            "would show (padding?) or shows later ones; batch prompts of equal length without padding"
        )


def check_call(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook of the decoder: ``check_inputs`` on its arguments, before any layer runs."""
    bound = _signature(type(module)).bind_partial(module, *args, **kwargs).arguments
    bound.update(bound.pop("kwargs", None) or {})
    x = bound.get("input_ids")
    x = bound.get("inputs_embeds") if x is None else x
    q_len = x.shape[1] if isinstance(x, torch.Tensor) and x.dim() >= 2 else None
    cache = next((c for c in (bound.get("cache"), bound.get("past_key_values")) if isinstance(c, Cache)), None)
    past = int(cache.get_seq_length()) if cache is not None else 0  # 'cache' is the newer name
    check_inputs(bound.get("attention_mask"), bound.get("position_ids"), past, q_len)


@functools.lru_cache(maxsize=None)
def _signature(cls: type) -> inspect.Signature:
    return inspect.signature(cls.forward)


def register() -> None:
    """Register the 'moa' attention and mask functions with transformers (idempotent)."""
    AttentionInterface.register(ATTN_NAME, moa_attention_forward)
    AttentionMaskInterface.register(ATTN_NAME, moa_mask)


def plan_of(model: PreTrainedModel) -> Plan:
    plan = getattr(model, "moa_plan", None)
    if plan is None:
        raise ValueError("this model has no plan: call moa_plan.runtime.apply_plan(model, plan) first")
    return plan
