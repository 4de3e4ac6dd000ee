"""The Triton kernels through a planned model, in a child process: the interpreter on CPU (fp32),
the real kernels on CUDA (bf16), against the float32 reference oracle of ``hf_models``."""

from __future__ import annotations

import pytest
import torch
from hf_models import TOL

# ---- the Triton kernels through the model (interpreter on CPU, real kernels on CUDA) ----------------

_TRITON_SCRIPT = r"""
import os, sys, torch
sys.path.insert(0, os.path.dirname(sys.argv[1]))
import hf_models as t
from moa_plan.plan import Rule
from moa_plan.runtime import MoACache, attention
from moa_plan.runtime.hf import CACHE_ARG
from transformers import DynamicCache
if os.environ.get(attention.PREFILL_KERNEL_ENV) == "cudnn":  # these prompts are short: lift the length rule
    from moa_plan.runtime import cudnn_band_prefill
    cudnn_band_prefill.MIN_LEN = 0
device, dtype, tol = sys.argv[2], getattr(torch, sys.argv[3]), float(sys.argv[4])
plan = t._plan([[Rule(alpha=a, beta=b) for a, b in ((1.0, 0.0), (5.0, 0.1), (0.0, 1.0), (-2.0, 0.3))],
                [Rule(alpha=a, beta=b) for a, b in ((3.0, 0.2), (9.0, 0.0), (2.0, 0.05), (0.0, 0.5))]], sink=2)
model, ref = t._with_plan("llama", plan)
model.to(device=device, dtype=dtype); ref.to(device=device, dtype=dtype).float()  # same rounded weights
ids = t._ids(2, 21).to(device)
steps, cut = 6, 9


def stepwise(m, cache, seq):
    # logits of the prompt's last position, then of each fed token (teacher forcing on seq)
    got = [m(seq[:, :21], **{CACHE_ARG: cache}).logits[:, -1].float()]
    got += [m(seq[:, 20 + s:21 + s], **{CACHE_ARG: cache}).logits[:, -1].float() for s in range(1, steps)]
    return got


def chunked(m, cache):
    m(ids[:, :cut], **{CACHE_ARG: cache})
    return m(ids[:, cut:], **{CACHE_ARG: cache}).logits.float()


with torch.no_grad():
    os.environ[attention.BACKEND_ENV] = "triton"
    out = model.generate(ids, max_new_tokens=steps, do_sample=False, return_dict_in_generate=True,
                         output_logits=True)
    assert isinstance(getattr(out, CACHE_ARG), MoACache)
    seq, tri = out.sequences, [x.float() for x in out.logits]
    tri_chunk = chunked(model, MoACache(model, 40))  # Triton prefill, PyTorch chunk, Triton decode
    os.environ[attention.BACKEND_ENV] = "torch"  # the same model and dtype through the PyTorch paths
    pt, pt_chunk = stepwise(model, MoACache(model, 40), seq), chunked(model, MoACache(model, 40))
    # the oracle: reference attention (float32) call by call over a dense DynamicCache, same N per call
    want, want_chunk = stepwise(ref, DynamicCache(config=ref.config), seq), chunked(ref, DynamicCache(config=ref.config))
err_tri = max((a - b).abs().max().item() for a, b in zip(tri, want))
err_pt = max((a - b).abs().max().item() for a, b in zip(pt, want))
err_tri_chunk, err_pt_chunk = ((x - want_chunk).abs().max().item() for x in (tri_chunk, pt_chunk))
print(f"max |logit - reference|: triton {err_tri:.3g} (chunked {err_tri_chunk:.3g}), "
      f"pytorch paths {err_pt:.3g} (chunked {err_pt_chunk:.3g}), logit scale {want[0].abs().max().item():.3g}")
assert err_tri <= max(tol, 2 * err_pt) and err_tri_chunk <= max(tol, 2 * err_pt_chunk), "triton error too large"
print("ok")
"""


def _kernels_present() -> bool:
    import importlib.util

    return all(
        importlib.util.find_spec(m) is not None
        for m in ("triton", "moa_plan.runtime.triton_prefill", "moa_plan.runtime.triton_decode")
    )


def _run_triton_script(device: str, dtype: str, tol: float, interpret: bool, **extra_env: str) -> None:
    import os
    import subprocess
    import sys

    env = dict(os.environ, HF_HUB_OFFLINE="1", **extra_env)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run(
        [sys.executable, "-c", _TRITON_SCRIPT, __file__, device, dtype, str(tol)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    print(proc.stdout)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.skipif(not _kernels_present(), reason="Triton kernel modules not present")
@pytest.mark.skipif(
    torch.cuda.is_available(),
    reason="interpreter tests run where there is no GPU (as tests/_triton_cpu.py); here the compiled kernels are tested",
)
def test_triton_backend_through_the_model_interpreted():
    """TRITON_INTERPRET=1: generate (Triton prefill + decode kernels, fp32) and a chunked prefill match
    the reference attention run call by call over a dense DynamicCache, at every step."""
    _run_triton_script("cpu", "float32", TOL, interpret=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_triton_backend_through_the_model_bf16_gpu():
    _run_triton_script("cuda", "bfloat16", 2e-2, interpret=False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cudnn_band_prefill_through_the_model_bf16_gpu():
    """MOA_PREFILL_KERNEL=cudnn: the prefills go through cuDNN's band calls + the sink fold."""
    pytest.importorskip("cudnn", reason="the cudnn extra (nvidia-cudnn-frontend) is not installed")
    _run_triton_script("cuda", "bfloat16", 2e-2, interpret=False, MOA_PREFILL_KERNEL="cudnn")
