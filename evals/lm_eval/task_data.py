"""Dataset builders and scoring behind the lm-eval tasks ``moa_longeval_lines`` and ``moa_passkey``.

lm-eval calls the dataset builder with the run's metadata, which includes the model arguments
(``pretrained``, optionally ``tokenizer`` / ``gguf_file``) and anything given with ``--metadata``:
``lengths`` (tokens), ``positions`` (needle depths in [0, 1]), ``samples`` (per cell) and ``seed``.
Documents are generated offline, sized with the model's own tokenizer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from moa_plan.evals.quality.documents import make_documents, score

DEFAULT_LENGTHS = (1024, 2048, 4096)
DEFAULT_POSITIONS = (0.0, 0.25, 0.5, 0.75, 1.0)
DEFAULT_SAMPLES = 2


def parse_list(value: Any, kind: type, name: str) -> list:
    """A list from a list, a number, or a string separated by commas, spaces, ':' or ';'."""
    if value is None:
        raise ValueError(f"{name} is missing")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        items: Sequence[Any] = [value]
    elif isinstance(value, str):
        items = [v for v in value.replace(",", " ").replace(":", " ").replace(";", " ").split() if v]
    elif isinstance(value, (list, tuple)):
        items = value
    else:
        raise ValueError(f"{name} must be a list, got {value!r}")
    try:
        out = [kind(v) for v in items]
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a list of {kind.__name__}, got {value!r}") from None
    if not out:
        raise ValueError(f"{name} is empty")
    return out


def load_tokenizer(metadata: dict[str, Any]) -> Any:
    """The tokenizer named by ``tokenizer`` or ``pretrained`` in the task metadata (model args)."""
    name = metadata.get("tokenizer") or metadata.get("pretrained")
    if not isinstance(name, str) or not name:
        raise ValueError(
            "moa retrieval tasks size their documents with the model's tokenizer: pass "
            "--model_args pretrained=<model> (or tokenizer=<name>)"
        )
    from transformers import AutoTokenizer

    kwargs = {}
    if metadata.get("gguf_file") and not metadata.get("tokenizer"):
        kwargs["gguf_file"] = metadata["gguf_file"]
    return AutoTokenizer.from_pretrained(name, **kwargs)


def build_dataset(task: str, **metadata: Any) -> dict[str, Any]:
    """The ``test`` split of ``task`` ('lines' or 'passkey') as a ``datasets.Dataset``."""
    import datasets

    lengths = parse_list(metadata.get("lengths", DEFAULT_LENGTHS), int, "lengths")
    positions = parse_list(metadata.get("positions", DEFAULT_POSITIONS), float, "positions")
    samples = int(metadata.get("samples", DEFAULT_SAMPLES))
    seed = int(metadata.get("seed", 0))
    docs = make_documents(task, load_tokenizer(metadata), lengths, positions, samples, seed)
    rows = [
        {
            "task": d.task,
            "length": d.length,
            "position": d.position,
            "seed": d.seed,
            "index": d.index,
            "prompt": d.prompt,
            "answer": d.answer,
            "n_tokens": d.n_tokens,
        }
        for d in docs
    ]
    return {"test": datasets.Dataset.from_list(rows)}


def lines_dataset(**metadata: Any) -> dict[str, Any]:
    return build_dataset("lines", **metadata)


def passkey_dataset(**metadata: Any) -> dict[str, Any]:
    return build_dataset("passkey", **metadata)


def process_results(doc: dict[str, Any], results: Sequence[str]) -> dict[str, float]:
    """Exact match of the first number the model generated against the document's answer."""
    return {"exact_match": score(results[0] if results else "", doc["answer"])}
