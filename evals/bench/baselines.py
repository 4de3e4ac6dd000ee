"""The baselines the MoA kernels are timed against: FlexAttention with the plan's block mask and
dense SDPA forced onto each backend (a mixin of ``kernels.Kernels``)."""

from __future__ import annotations

import math
from typing import Any

from moa_plan.evals.bench.timing import _with_backend


class Baselines:
    # -- FlexAttention
    def _flex(self):
        if self.flex is None and not self.s.no_flex:
            import torch
            from torch.nn.attention.flex_attention import flex_attention

            torch._dynamo.config.cache_size_limit = 64
            if hasattr(torch._dynamo.config, "recompile_limit"):
                torch._dynamo.config.recompile_limit = 64
            self.flex = torch.compile(flex_attention, dynamic=False)
        return self.flex

    def _flex_for(self, shape_name: str, batch: int | None = None):
        if shape_name not in self.s.flex_shapes:
            return None
        if batch is not None and batch not in self.s.flex_batches:
            return None
        return self._flex()

    def _flex_block_mask(self, spans, sink: int, q_len: int, k_len: int):
        """BlockMask of the plan's mask, built from exact per-block interval tests (no N x N mask)."""
        import torch
        from torch.nn.attention.flex_attention import BlockMask, create_block_mask

        off = k_len - q_len
        # one spans buffer and one mask_mod object per (heads, offset): a new closure would recompile
        key = (spans.numel(), off, sink)
        self._mask_mods = getattr(self, "_mask_mods", {})
        if key not in self._mask_mods:
            buf = torch.empty(spans.numel(), dtype=torch.int64, device=self.dev)

            def mask_mod(b, h, q_idx, kv_idx):
                i = q_idx + off
                return (kv_idx <= i) & ((kv_idx < sink) | (i - kv_idx < buf[h]))

            self._mask_mods[key] = (buf, mask_mod)
        sp, mask_mod = self._mask_mods[key]
        sp.copy_(spans.to(torch.int64))

        if q_len < 128:
            return create_block_mask(mask_mod, None, sp.numel(), q_len, k_len, device=self.dev)
        bs = 128
        nq, nk = math.ceil(q_len / bs), math.ceil(k_len / bs)
        dev = self.dev
        i0 = off + torch.arange(nq, device=dev).view(1, nq, 1) * bs
        i1 = torch.clamp(i0 + bs, max=k_len) - 1
        j0 = torch.arange(nk, device=dev).view(1, 1, nk) * bs
        j1 = torch.clamp(j0 + bs, max=k_len) - 1
        s = sp.view(-1, 1, 1)
        win_lo = i0 - s + 1
        any_vis = ((j0 < sink) & (j0 <= i1)) | ((j1 >= win_lo) & (j0 <= i1))
        full = (j1 <= i0) & ((j1 < sink) | (i1 - j0 < s)) & (j1 - j0 + 1 == bs)
        full = full & (i1 - i0 + 1 == bs)
        part = any_vis & ~full

        def pack(m):
            num = m.sum(-1).to(torch.int32)
            idx = torch.argsort((~m).to(torch.int8), dim=-1, stable=True).to(torch.int32)
            return num[None], idx[None]

        pn, pi = pack(part)
        fn, fi = pack(full)
        try:
            return BlockMask.from_kv_blocks(
                pn, pi, fn, fi, BLOCK_SIZE=bs, mask_mod=mask_mod, seq_lengths=(q_len, k_len)
            )
        except TypeError:  # older torch: no seq_lengths
            return BlockMask.from_kv_blocks(pn, pi, fn, fi, BLOCK_SIZE=bs, mask_mod=mask_mod)

    def _sdpa_backends(self, tag: str, run_small, want, fns, graph: bool) -> dict[str, Any]:
        """Time dense SDPA forced onto each backend (cuDNN, flash, efficient); ms or why not."""
        from torch.nn.attention import SDPBackend, sdpa_kernel

        out: dict[str, Any] = {}
        for name in ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION"):
            backend = getattr(SDPBackend, name, None)
            if backend is None:
                continue
            try:
                with sdpa_kernel([backend]):
                    got = run_small(enable_gqa=True)
                    wrapped = [(lambda f=f: _with_backend(backend, f)) for f in fns]
                    ms = self._guarded(f"{tag}/sdpa-{name}", got, want, lambda: wrapped, graph=graph)
                out[name] = ms if ms is not None else "WRONG"
            except Exception as exc:  # noqa: BLE001 - a backend that refuses these inputs
                out[name] = f"n/a ({type(exc).__name__})"
        return out
