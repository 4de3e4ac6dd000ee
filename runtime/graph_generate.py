"""Greedy generation whose decode step is one CUDA graph replay: no per-step host work.

``model.generate`` of a planned model (``hf_apply``) comes here for plain greedy decoding of
equal-length prompts on CUDA (``fast_path`` says when; anything else goes to transformers'
``generate``). The prompt is prefilled eagerly into a ``MoACache``; then one decode step (the
model's forward on the last token with the cache in static mode (``static_step``), argmax, the
end-of-sequence bookkeeping, the token stored, the position advanced) is captured once and
replayed: every per-step value lives in device tensors, the split-K counts are fixed by the
cache's capacities, and nothing is read back until the end (or every ``CHECK_EVERY`` steps when
an end-of-sequence token can stop all rows early). The captured step is kept on the model for
the next call with the same batch, prompt length, dtype and end-of-sequence tokens and no longer a bound (``release`` frees it).

``MOA_GRAPH_DECODE``: 'auto' (default: on CUDA), '0' (never: transformers' loop), '1' (also off
CUDA, stepping eagerly through the same static step: what the CPU tests check).
``MOA_GRAPH_COMPILE``: how the decode step's model call is compiled before it is captured, so the
small per-layer operations (norms, rotary, residual adds, the activation) fuse into fewer kernels:
``BACKEND`` or ``BACKEND:MODE`` (e.g. 'inductor:max-autotune-no-cudagraphs', which also tunes the
weight matmuls), or 'none'. Unset: 'inductor' when the step is captured on CUDA, as transformers
compiles its own static-cache decode step; ``generate(..., disable_compile=True)`` (transformers'
keyword) turns it off for one call. A compilation costs seconds per new batch / prompt length, so
callers that change the prompt length on every call (the quality evaluations) turn it off, and
unset, a model compiles at most ``DEFAULT_COMPILE_LIMIT`` shapes (later ones are captured eagerly).
Measured by ``evals.bench.trace_generate`` and ``moa-plan bench --generate``.
"""

from __future__ import annotations

import gc
import inspect
import os
import warnings
from typing import Any

import torch

from moa_plan.errors import SettingError
from moa_plan.runtime.hf import CACHE_ARG, MoACache, plan_of
from moa_plan.runtime.static_step import StaticDecode
from moa_plan.settings import env_choice

ENV = "MOA_GRAPH_DECODE"
COMPILE_ENV = "MOA_GRAPH_COMPILE"
DEFAULT_COMPILE = "inductor"  # MOA_GRAPH_COMPILE unset, step captured on CUDA
DEFAULT_COMPILE_LIMIT = 4  # decoders a model compiles by default; past it new shapes are captured eagerly
CHECK_EVERY = 32  # replays between looks at "every row finished" (one host sync each)
_KWARGS = {"input_ids", "inputs", "attention_mask", "max_new_tokens", "max_length", "min_new_tokens"}
_KWARGS |= {"do_sample", "num_beams", "generation_config", "pad_token_id", "eos_token_id", "use_cache"}
_KWARGS |= {"disable_compile"}


def setting() -> str:
    return env_choice(ENV, ("auto", "0", "1"))


def compile_setting(value: str | None = None) -> tuple[str, str | None]:
    """(backend, mode) from MOA_GRAPH_COMPILE or ``value`` ('' backend: no compilation; unset:
    ``DEFAULT_COMPILE``); modes are checked by torch."""
    text = os.environ.get(COMPILE_ENV) if value is None else value
    text = DEFAULT_COMPILE if text is None else text.strip()
    if text.lower() in ("", "none", "0"):
        return "", None
    backend, sep, mode = text.partition(":")
    if sep and not (backend and mode):
        raise SettingError(COMPILE_ENV, text, "must be BACKEND, BACKEND:MODE or none")
    return backend, mode or None


def _step_compile(graph: bool, allowed: bool) -> tuple[str, str | None]:
    """What compiles a decoder's step: nothing when the call disabled it, the default only for a
    step captured on CUDA (the CPU path steps eagerly), else MOA_GRAPH_COMPILE."""
    if not allowed or (os.environ.get(COMPILE_ENV) is None and not graph):
        return "", None
    return compile_setting()


def _config(model: Any, kwargs: dict) -> Any:
    import copy

    config = copy.deepcopy(kwargs.get("generation_config") or model.generation_config)
    config.update(**{k: v for k, v in kwargs.items() if k not in ("generation_config", "input_ids", "inputs")})
    return config


def _plain_greedy(config: Any) -> bool:
    """Greedy with no logits processing, one sequence per prompt, tokens returned as a tensor."""
    off = ("do_sample", "return_dict_in_generate", "output_scores", "output_logits", "output_attentions")
    if any(getattr(config, f, False) for f in off) or (getattr(config, "num_beams", 1) or 1) != 1:
        return False
    if (getattr(config, "num_return_sequences", 1) or 1) != 1 or getattr(config, "use_cache", True) is False:
        return False
    if getattr(config, "repetition_penalty", 1.0) not in (None, 1.0):
        return False
    unset = ("no_repeat_ngram_size", "bad_words_ids", "suppress_tokens", "begin_suppress_tokens", "min_length")
    if any(getattr(config, f, None) for f in unset):
        return False
    return getattr(config, "forced_bos_token_id", None) is None and getattr(config, "forced_eos_token_id", None) is None


def fast_path(model: Any, args: tuple, kwargs: dict) -> dict[str, Any] | None:
    """The arguments of ``generate_greedy`` when this call can take the graph path, else None."""
    mode = setting()
    ids = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs"))
    if mode == "0" or len(args) > 1 or set(kwargs) - _KWARGS or not isinstance(ids, torch.Tensor):
        return None
    if ids.dim() != 2 or ids.dtype not in (torch.long, torch.int) or (ids.device.type != "cuda" and mode != "1"):
        return None
    config = _config(model, kwargs)
    if not _plain_greedy(config):
        return None
    new = config.max_new_tokens if config.max_new_tokens is not None else (config.max_length or 0) - ids.shape[1]
    eos = config.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    if new < 1 or (eos and (config.min_new_tokens or 0) > 1):
        return None
    mask = kwargs.get("attention_mask")
    if mask is not None and (mask.shape != ids.shape or not bool(mask.bool().all())):
        return None  # padding: transformers' path explains what the plan cannot run
    pad = config.pad_token_id if config.pad_token_id is not None else (eos[0] if eos else 0)
    compile_ok = not (kwargs.get("disable_compile") or getattr(config, "disable_compile", False))
    return dict(input_ids=ids, max_new_tokens=int(new), eos_token_id=eos, pad_token_id=int(pad), compile=compile_ok)


def _logits_kwargs(model: Any) -> dict[str, int]:
    """Ask the model for the last position's logits only (the keyword its transformers takes)."""
    params = inspect.signature(type(model).forward).parameters
    return next(({name: 1} for name in ("logits_to_keep", "num_logits_to_keep") if name in params), {})


class GraphDecoder:
    """Prefill + greedy decode steps of one (batch, prompt length, n_max, dtype) on a planned model."""

    def __init__(
        self,
        model: Any,
        batch: int,
        prompt: int,
        n_max: int,
        device: torch.device,
        graph: bool,
        eos: list[int],
        compile: bool = True,
    ):
        self.model, self.batch, self.prompt, self.n_max = model, batch, prompt, n_max
        self.cache = MoACache(plan_of(model), n_max)
        self.static = StaticDecode(plan_of(model), prompt + 1, n_max, device)
        long = dict(dtype=torch.long, device=device)
        self.ids = torch.zeros(batch, 1, **long)
        self.tokens = torch.zeros(batch, n_max - prompt, **long)  # column j: the token of step j
        self.done = torch.zeros(batch, dtype=torch.bool, device=device)
        self.finished_at = torch.zeros(batch, **long)  # column of each row's first end-of-sequence token
        self.eos = torch.tensor(eos, **long)  # fixed per decoder: a captured step reads this very tensor
        self.pad = torch.zeros((), **long)
        self.use_graph, self.graph = graph, None
        self.keep = _logits_kwargs(model)
        backend, mode = _step_compile(graph, compile)
        # a plain function, not a bound method kept on self: a decoder in a reference cycle would be
        # freed (with its CUDA graph) by the cyclic garbage collector at any later time
        compiled = backend and torch.compile(_model_call, backend=backend, mode=mode, dynamic=False)
        self.step_call = compiled or _model_call

    def prefill(self, input_ids: torch.Tensor, pad: int) -> None:
        """Eager prefill of the prompt; the first new token goes to column 0. Everything the
        captured step reads is written in place, never replaced."""
        self.cache.set_static(None)
        self.cache.set_length(0)
        first = _model_call(self.model, self.cache, self.keep, input_ids).argmax(-1)
        self.pad.fill_(pad)
        self.done.copy_(torch.isin(first, self.eos))
        self.finished_at.fill_(self.tokens.shape[1]).masked_fill_(self.done, 0)
        self.ids.copy_(first.view(-1, 1))
        self.tokens[:, 0].copy_(first)
        self.static.rewind(self.prompt)
        self.cache.set_static(self.static)

    def step(self) -> None:
        """One decode step, all on the device: write the token at ``pos``, attend, pick the next."""
        st = self.static
        st.begin()
        # the host's count pinned (``decode`` sets the real one): a compiled step sees one value
        self.cache.set_length(self.prompt)
        logits = self.step_call(
            self.model,
            self.cache,
            self.keep,
            self.ids,
            position_ids=st.pos.view(1, 1).expand(self.batch, 1),
            cache_position=st.pos,
        )
        nxt = torch.where(self.done, self.pad, logits.argmax(-1))
        col = st.pos - (self.prompt - 1)  # the step writing position prompt emits column 1
        ended = torch.isin(nxt, self.eos) & ~self.done
        self.finished_at.copy_(torch.where(ended, col, self.finished_at))
        self.done.logical_or_(ended)
        self.ids.copy_(nxt.view(-1, 1))
        self.tokens.index_copy_(1, col, nxt.view(-1, 1))
        st.advance()

    def _capture(self) -> None:
        """Run one real step eagerly on a side stream (compiles kernels, allocates workspaces), then
        capture the next one. A capture that fails (an operation the step's code path cannot
        record) leaves this decoder stepping eagerly, with a warning: slower, never wrong."""
        self._warm_up()
        try:
            self.graph = self._record()
        except RuntimeError as exc:  # nothing of the step ran: its state is as the warm-up left it
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            warnings.warn(f"moa generate: CUDA graph capture failed ({first}); decoding eagerly", stacklevel=3)
            self.use_graph = False

    def _warm_up(self) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.step()
        torch.cuda.current_stream().wait_stream(side)

    def _record(self) -> torch.cuda.CUDAGraph:
        """Capture one step. The cyclic garbage collector is run before and kept off during the
        capture: an object it frees mid-capture (a dead decoder's CUDA graph, say) would make a
        CUDA call that invalidates the capture."""
        gc.collect()
        gc.disable()
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.step()
        finally:
            gc.enable()
        return graph

    def decode(self, new_tokens: int, stop_early: bool) -> int:
        """Steps 1 .. new_tokens - 1; returns the columns produced (fewer once every row ended)."""
        j = 1
        while j < new_tokens:
            if self.use_graph and self.graph is None:
                self._capture()  # its eager warm-up step is step j
            elif self.use_graph:
                self.graph.replay()
            else:
                self.step()
            j += 1
            if stop_early and j % CHECK_EVERY == 0 and bool(self.done.all()):
                break
        self.cache.set_length(self.prompt + j - 1)
        if stop_early:
            j = min(j, int(self.finished_at.max()) + 1)
        return j


def _model_call(model: Any, cache: MoACache, keep: dict[str, int], ids: torch.Tensor, **kw: Any) -> torch.Tensor:
    """The last position's logits of one forward with the cache (what the step compiles)."""
    out = model(input_ids=ids, use_cache=True, **{CACHE_ARG: cache}, **keep, **kw)
    return out.logits[:, -1]


def generate_greedy(
    model: Any,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    eos_token_id: list[int],
    pad_token_id: int,
    compile: bool = True,
) -> torch.Tensor:
    """[B, prompt + new] tokens as transformers' greedy ``generate`` returns them."""
    batch, prompt = input_ids.shape
    n_max = prompt + max_new_tokens
    device = input_ids.device
    graph = device.type == "cuda"
    shape = (batch, prompt, str(device), next(model.parameters()).dtype, tuple(eos_token_id))
    how = _step_compile(graph, compile)
    held = getattr(model, "_moa_graph_decoder", None)

    def kept(how: tuple) -> bool:  # a longer bound serves shorter calls
        return held is not None and held[0] == (*shape, how) and held[1].n_max >= n_max

    if not kept(how):
        by_default = how[0] and os.environ.get(COMPILE_ENV) is None
        if by_default and not _default_compile_left(model):
            how = ("", None)  # past the limit: this shape is captured eagerly (or kept so already)
    if not kept(how):
        release(model)
        held = ((*shape, how), GraphDecoder(model, batch, prompt, n_max, device, graph, eos_token_id, bool(how[0])))
        model._moa_graph_decoder = held
    dec = held[1]
    with torch.no_grad():
        dec.prefill(input_ids, pad_token_id)
        cols = dec.decode(max_new_tokens, stop_early=bool(eos_token_id))
    return torch.cat([input_ids.to(torch.long), dec.tokens[:, :cols].clone()], dim=1)


def _default_compile_left(model: Any) -> bool:
    """Count a decoder compiled by default; False past DEFAULT_COMPILE_LIMIT (warned once). A caller
    whose prompt length changes every call (a chat loop, an evaluation) would otherwise pay a
    compilation per call; a server that sees a few shapes compiles each of them."""
    spent = getattr(model, "_moa_default_compiles", 0)
    model._moa_default_compiles = spent + 1
    if spent == DEFAULT_COMPILE_LIMIT:
        warnings.warn(
            f"generate: {spent} decode steps compiled for new batch / prompt shapes; further shapes are "
            f"captured without compiling (set {COMPILE_ENV}=inductor to compile every shape, or pass "
            "disable_compile=True where the shape changes every call)",
            stacklevel=3,
        )
    return spent < DEFAULT_COMPILE_LIMIT


def release(model: Any) -> None:
    """Drop the captured step and its cache kept on ``model``."""
    if getattr(model, "_moa_graph_decoder", None) is not None:
        model._moa_graph_decoder = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
