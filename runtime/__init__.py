"""moa_plan.runtime: attention that follows a plan (dense reference, Triton kernels, KV cache, transformers)."""
