"""Retrieval accuracy over (method x length x needle position), resumable, without lm-eval.

Each cell (method, task, length, position) runs ``samples`` documents with greedy decoding, one
prompt at a time (a plan's spans depend on each prompt's length). The grid is a ``moa_plan.run``
job: checkpointed after every cell, resumed by default; a method whose plan changed under the
same name, or any other changed setting, is refused unless the run starts afresh.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from moa_plan.evals.quality.documents import Document, make_document, score
from moa_plan.evals.quality.methods import Method
from moa_plan.run import Run


@dataclass
class Settings:
    """Everything besides the method that decides a cell's outcome."""

    model: str
    task: str
    lengths: list[int]
    positions: list[float]
    samples: int = 2
    seed: int = 0
    chat: bool = False
    max_new_tokens: int = 12
    dtype: str = "float32"
    device: str = "cpu"

    def key(self) -> dict[str, Any]:
        """The settings a stored cell must share to be reused (the grid itself may grow)."""
        return {k: v for k, v in asdict(self).items() if k not in ("lengths", "positions", "device")}


@dataclass
class Results:
    """All cells of a run: ``cells[key]`` with key ``method|task|length|position``."""

    settings: dict[str, Any]
    methods: dict[str, dict[str, Any]] = field(default_factory=dict)
    cells: dict[str, dict[str, Any]] = field(default_factory=dict)


def cell_key(method: str, task: str, length: int, position: float) -> str:
    return f"{method}|{task}|{length}|{position:g}"


class ModelPool:
    """Hands out the model set up for a method at a length: the plain model for dense, and one
    planned copy (``apply_plan``, re-applied when the plan changes) for everything else."""

    def __init__(self, model_dir: str, dtype: str, device: str):
        self.model_dir, self.dtype, self.device = model_dir, dtype, device
        self._dense: Any = None
        self._planned: Any = None
        self._planned_with: str | None = None
        self.tokenizer: Any = None

    def shape(self):
        from moa_plan.model_config import load_model_shape

        return load_model_shape(self.model_dir)

    def get(self, method: Method, n: int) -> Any:
        from moa_plan.io import plan_to_json
        from moa_plan.runtime import load as loader
        from moa_plan.runtime.hf_apply import apply_plan

        plan = method.plan_at(self.shape(), n)
        if plan is None:
            if self._dense is None:
                self._dense, self.tokenizer = loader.load(self.model_dir, self.dtype, self.device, None)
            return self._dense
        if self._planned is None:
            self._planned, self.tokenizer = loader.load(self.model_dir, self.dtype, self.device, None)
        text = plan_to_json(plan)
        if text != self._planned_with:
            apply_plan(self._planned, plan)
            self._planned_with = text
        return self._planned

    def get_tokenizer(self) -> Any:
        if self.tokenizer is None:
            from moa_plan.runtime import load as loader

            self.tokenizer = loader.load_tokenizer(self.model_dir)
        return self.tokenizer


def prompt_ids(tokenizer: Any, doc: Document, chat: bool) -> list[int]:
    """Token ids of a document's prompt; with ``chat`` the context and question form the user turn
    and the answer prefix opens the assistant turn."""
    if not chat:
        return tokenizer.encode(doc.prompt, add_special_tokens=False)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": doc.context + doc.question}], tokenize=False, add_generation_prompt=True
    )
    return tokenizer.encode(text + doc.prefix.lstrip(), add_special_tokens=False)


def generate(model: Any, tokenizer: Any, ids: list[int], max_new_tokens: int) -> str:
    """Greedy continuation of one prompt, decoded."""
    import torch

    x = torch.tensor([ids], device=model.device)
    with torch.no_grad():
        out = model.generate(
            x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
            disable_compile=True,  # a new prompt length per document: a compilation each would cost more than it saves
        )
    return tokenizer.decode(out[0, x.shape[1] :], skip_special_tokens=True)


# ---- the grid -----------------------------------------------------------------------------


def run_grid(
    settings: Settings,
    methods: Sequence[Method],
    out: Path | None,
    quiet: bool = False,
    pool: ModelPool | None = None,
    overwrite: bool = False,
) -> Results:
    """Accuracy of every method at every (length, position), a ``moa_plan.run`` job (``retrieval``)
    resumed from ``out`` (None: a temporary file): a cell per (method, length, position), computed once."""
    if out is None:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            return run_grid(settings, methods, Path(tmp) / "retrieval.json", quiet, pool)
    pool = pool or ModelPool(settings.model, settings.dtype, settings.device)
    shape = pool.shape()
    fixed = {**settings.key(), "methods": {m.name: m.fingerprint() for m in methods}}
    grid = [(m, n, p) for m in methods for n in settings.lengths for p in settings.positions]
    keys = [cell_key(m.name, settings.task, n, p) for m, n, p in grid]
    with Run(out, "retrieval", fixed, overwrite=overwrite, quiet=quiet, grows=("methods",)) as run:
        _adopt_renamed(run, methods, settings)
        todo = set(run.todo(keys))
        docs: dict[tuple[int, float, int], Document] = {}
        with run.progress(len(todo) * settings.samples, f"{settings.task} retrieval", unit="prompt") as bar:
            for (m, n, p), key in zip(grid, keys):
                if key not in todo:
                    continue
                model = pool.get(m, n)
                tokenizer = pool.get_tokenizer()
                rows = []
                t0 = time.perf_counter()
                for i in range(settings.samples):
                    doc = docs.get((n, p, i))
                    if doc is None:
                        doc = docs[(n, p, i)] = make_document(settings.task, tokenizer, n, p, settings.seed, i)
                    ids = prompt_ids(tokenizer, doc, settings.chat)
                    text = generate(model, tokenizer, ids, settings.max_new_tokens)
                    rows.append(
                        {
                            "answer": doc.answer,
                            "generation": text,
                            "correct": score(text, doc.answer),
                            "prompt_tokens": len(ids),
                        }
                    )
                    bar.update(1)
                run.put(
                    key,
                    {
                        "method": m.name,
                        "fingerprint": m.fingerprint(),
                        "task": settings.task,
                        "length": n,
                        "position": p,
                        "accuracy": sum(r["correct"] for r in rows) / len(rows),
                        "samples": rows,
                        "seconds": round(time.perf_counter() - t0, 3),
                    },
                )
        info = {
            m.name: {
                "kind": m.kind,
                "spec": m.spec,
                "fingerprint": m.fingerprint(),
                "stats": {str(n): m.stats(shape, n) for n in settings.lengths},
            }
            for m in methods
        }
        cells = run.finish(keys, prune=False, methods={**run.summary.get("methods", {}), **info})
        return Results(run.settings, info, cells)


def _adopt_renamed(run: Run, methods: Sequence[Method], settings: Settings) -> None:
    """Reuse cells of a method stored under another name (same fingerprint = same attention)."""
    by_print = {
        (c.get("fingerprint"), c.get("task"), c.get("length"), c.get("position")): c
        for c in run.cells.values()
        if isinstance(c, dict)
    }
    for m in methods:
        for n in settings.lengths:
            for p in settings.positions:
                key = cell_key(m.name, settings.task, n, p)
                cell = by_print.get((m.fingerprint(), settings.task, n, p))
                if key not in run.cells and cell is not None:
                    run.cells[key] = {**cell, "method": m.name}


def accuracy_table(
    results: Results, method: str, task: str, lengths: Sequence[int], positions: Sequence[float]
) -> list[list[float | None]]:
    """[position][length] accuracy of one method (None where the cell was not run)."""
    out = []
    for p in positions:
        row = []
        for n in lengths:
            cell = results.cells.get(cell_key(method, task, n, p))
            row.append(None if cell is None else cell["accuracy"])
        out.append(row)
    return out
