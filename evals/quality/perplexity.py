"""Perplexity on long text, offline, for a method at several input lengths.

Two texts, both available without any download:

* ``text`` - the evaluation part of ``moa_plan.corpus`` (sections of the Python reference manual
  that ship with CPython, none of which calibration ever sees): long, natural technical English.
  Windows of N tokens, loss over every predicted token.
* ``repeat`` - a window whose second half repeats its first half; loss over the second half
  only. A model that can look back N/2 tokens copies it almost perfectly, a local window
  cannot: the sharpest long-range probe a perplexity can give.

The forward pass runs the whole window at once (total length N), so a plan applies its spans
at N; the vocabulary projection is chunked to keep memory small.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from moa_plan.evals.quality.methods import Method
from moa_plan.run import Run

KINDS = ("text", "repeat")


def reference_text() -> str:
    """The evaluation part of the offline corpus (disjoint from the calibration documents)."""
    from moa_plan.corpus import text

    return text("evaluation")


def windows(token_ids: Sequence[int], length: int, count: int, kind: str) -> list[tuple[list[int], int]]:
    """(``ids``, ``score_from``) pairs: ``count`` disjoint windows of ``length`` tokens."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; choose from {', '.join(KINDS)}")
    need = length if kind == "text" else length // 2
    out = []
    for i in range(count):
        chunk = list(token_ids[i * need : (i + 1) * need])
        if len(chunk) < need:
            raise ValueError(f"the text has {len(token_ids)} tokens, too few for {count} windows of {length}")
        if kind == "text":
            out.append((chunk, 1))
        else:
            ids = chunk + chunk + chunk[: length - 2 * need]
            out.append((ids, need))
    return out


def token_nll(model: Any, ids: list[int], chunk: int = 512) -> Any:
    """Negative log-likelihood of tokens ``1..`` of ``ids``, each given its prefix (one forward
    pass; the vocabulary projection is chunked): a float tensor of ``len(ids) - 1`` values."""
    import torch
    import torch.nn.functional as F

    x = torch.tensor([ids], device=model.device)
    with torch.no_grad():
        hidden = model.get_decoder()(input_ids=x).last_hidden_state[0]
        head = model.get_output_embeddings()
        parts = [
            F.cross_entropy(head(hidden[start - 1 : stop - 1]).float(), x[0, start:stop], reduction="none")
            for start, stop in ((s, min(len(ids), s + chunk)) for s in range(1, len(ids), chunk))
        ]
    return torch.cat(parts).cpu() if parts else torch.zeros(0)


def window_nll(model: Any, ids: list[int], score_from: int, chunk: int = 512) -> tuple[float, int]:
    """Summed negative log-likelihood of tokens ``score_from..`` given their prefix, and their count."""
    nll = token_nll(model, ids, chunk)[max(score_from, 1) - 1 :]
    return float(nll.double().sum()), len(nll)


def run_perplexity(
    pool: Any,
    shape: Any,
    methods: Sequence[Method],
    lengths: Sequence[int],
    kinds: Sequence[str],
    count: int,
    out: Path | None,
    model: str,
    dtype: str,
    quiet: bool = False,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Perplexity of every method at every (kind, length): a ``moa_plan.run`` job (``perplexity``)
    resumed from ``out`` (None: a temporary file), a cell per (method, kind, length). The file's
    ``methods`` field gathers each method's cells: ``{name: {spec, fingerprint, stats,
    perplexity: {kind: {length: cell}}}}``."""
    if out is None:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            return run_perplexity(
                pool, shape, methods, lengths, kinds, count, Path(tmp) / "perplexity.json", model, dtype, quiet
            )
    settings = {"model": model, "windows": count, "dtype": dtype, "methods": {m.name: m.fingerprint() for m in methods}}
    grid = [(m, kind, n) for m in methods for kind in kinds for n in lengths]
    keys = [f"{m.name}|{kind}|{n}" for m, kind, n in grid]
    with Run(out, "perplexity", settings, overwrite=overwrite, quiet=quiet, grows=("methods",)) as run:
        todo = set(run.todo(keys))
        ids: list[int] | None = None
        with run.progress(len(todo) * count, "perplexity", unit="window") as bar:
            for (m, kind, n), key in zip(grid, keys):
                if key not in todo:
                    continue
                if ids is None:
                    ids = pool.get_tokenizer().encode(reference_text(), add_special_tokens=False)
                model_ = pool.get(m, n)
                t0 = time.perf_counter()
                nll, tokens, per_window = 0.0, 0, []
                for w, start in windows(ids, n, count, kind):
                    a, b = window_nll(model_, w, start)
                    nll, tokens = nll + a, tokens + b
                    per_window.append(round(a / b, 6))
                    bar.update(1)
                run.put(
                    key,
                    {
                        "ppl": math.exp(nll / tokens),
                        "nll": nll / tokens,
                        "tokens": tokens,
                        "window_nll": per_window,
                        "seconds": round(time.perf_counter() - t0, 3),
                    },
                )
        info = {
            m.name: {
                "spec": m.spec,
                "fingerprint": m.fingerprint(),
                "stats": {str(n): m.stats(shape, n) for n in lengths},
                "perplexity": {kind: {str(n): run.cells[f"{m.name}|{kind}|{n}"] for n in lengths} for kind in kinds},
            }
            for m in methods
        }
        run.finish(keys, prune=False, methods={**run.summary.get("methods", {}), **info})
    return info


def perplexity_table(methods: dict[str, Any], lengths: list[int], kinds: list[str]) -> str:
    head = ["method"] + [f"{k} ppl@{n}" for k in kinds for n in lengths]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in methods.items():
        lines.append(
            "| "
            + " | ".join([name] + [f"{m['perplexity'][k][str(n)]['ppl']:.2f}" for k in kinds for n in lengths])
            + " |"
        )
    return "\n".join(lines) + "\n"
