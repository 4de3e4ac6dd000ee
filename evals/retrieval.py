"""Retrieval accuracy over (method x length x needle position), resumable, without lm-eval.

Each cell (method, task, length, position) runs ``samples`` documents with greedy decoding, one
prompt at a time (a plan's spans depend on each prompt's length). After every cell the whole
result file is rewritten atomically, so an interrupted run resumes where it stopped; a cell is
reused only if it was computed with the same method fingerprint, model and settings.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from moa_plan.evals.generate import Document, make_document, score
from moa_plan.evals.methods import Method
from moa_plan.io import MAX_RESULT_BYTES, exclusive, read_json_limited, write_atomic
from moa_plan.plan import PlanError

RESULT_VERSION = 1


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

    def to_json(self) -> str:
        return json.dumps({"version": RESULT_VERSION, "settings": self.settings, "methods": self.methods,
                           "cells": self.cells}, indent=1) + "\n"

    @classmethod
    def load(cls, path: Path) -> Results | None:
        if not os.path.lexists(path):
            return None
        try:
            data = read_json_limited(path, MAX_RESULT_BYTES)
        except PlanError as exc:
            raise PlanError([(loc, f"{msg}; delete it to start afresh") for loc, msg in exc.problems],
                            source=str(path)) from None
        parts = [data.get(k) for k in ("settings", "methods", "cells")] if isinstance(data, dict) else []
        if (not isinstance(data, dict) or data.get("version") != RESULT_VERSION
                or not all(isinstance(part, dict) for part in parts)
                or not all(isinstance(cell, dict) for cell in data["cells"].values())):
            raise PlanError([("", "not a result file of this moa-plan version; delete it to start afresh")],
                            source=str(path))
        return cls(*parts)


def cell_key(method: str, task: str, length: int, position: float) -> str:
    return f"{method}|{task}|{length}|{position:g}"


# ---- model handling -----------------------------------------------------------------------

def load_base_model(model_dir: str, dtype: str = "float32", device: str = "cpu") -> tuple[Any, Any]:
    """(model, tokenizer) from a transformers folder, offline, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (Path(model_dir) / "config.json").is_file():
        raise PlanError([("--model", f"{model_dir}: not a transformers model folder (no config.json)")])
    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype):
        raise PlanError([("--dtype", f"unknown torch dtype {dtype!r}")])
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype).to(device).eval()
    return model, tokenizer


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
        from moa_plan.io import load_model_shape

        return load_model_shape(self.model_dir)

    def get(self, method: Method, n: int) -> Any:
        from moa_plan.io import plan_to_json
        from moa_plan.runtime.hf import apply_plan

        plan = method.plan_at(self.shape(), n)
        if plan is None:
            if self._dense is None:
                self._dense, self.tokenizer = load_base_model(self.model_dir, self.dtype, self.device)
            return self._dense
        if self._planned is None:
            self._planned, self.tokenizer = load_base_model(self.model_dir, self.dtype, self.device)
        text = plan_to_json(plan)
        if text != self._planned_with:
            apply_plan(self._planned, plan)
            self._planned_with = text
        return self._planned

    def get_tokenizer(self) -> Any:
        if self.tokenizer is None:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        return self.tokenizer


def prompt_ids(tokenizer: Any, doc: Document, chat: bool) -> list[int]:
    """Token ids of a document's prompt; with ``chat`` the context and question form the user turn
    and the answer prefix opens the assistant turn."""
    if not chat:
        return tokenizer.encode(doc.prompt, add_special_tokens=False)
    text = tokenizer.apply_chat_template([{"role": "user", "content": doc.context + doc.question}],
                                         tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(text + doc.prefix.lstrip(), add_special_tokens=False)


def generate(model: Any, tokenizer: Any, ids: list[int], max_new_tokens: int) -> str:
    """Greedy continuation of one prompt, decoded."""
    import torch

    x = torch.tensor([ids], device=model.device)
    with torch.no_grad():
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return tokenizer.decode(out[0, x.shape[1]:], skip_special_tokens=True)


# ---- the grid -----------------------------------------------------------------------------

def run_grid(settings: Settings, methods: Sequence[Method], out: Path | None = None, progress: bool = True,
             pool: ModelPool | None = None, on_cell: Callable[[str, dict[str, Any]], None] | None = None) -> Results:
    """Accuracy of every method at every (length, position); resumes from ``out`` if it exists.
    While it runs, ``out`` is locked: a second run on the same file is refused, not interleaved."""
    with exclusive(out) if out is not None else contextlib.nullcontext():
        return _run_grid(settings, methods, out, progress, pool, on_cell)


def _run_grid(settings: Settings, methods: Sequence[Method], out: Path | None, progress: bool,
              pool: ModelPool | None, on_cell: Callable[[str, dict[str, Any]], None] | None) -> Results:
    from tqdm.auto import tqdm

    pool = pool or ModelPool(settings.model, settings.dtype, settings.device)
    shape = pool.shape()
    results = Results.load(out) if out is not None else None
    if results is None or results.settings != settings.key():
        results = Results(settings.key())  # a cell's outcome depends on every setting: start afresh
    results.methods = {}  # this run's methods; cells of others stay in the file as a cache
    for m in methods:
        results.methods[m.name] = {"kind": m.kind, "spec": m.spec, "fingerprint": m.fingerprint(),
                                   "stats": {str(n): m.stats(shape, n) for n in settings.lengths}}
    _adopt_renamed(results, methods, settings)
    todo = [(m, n, p) for m in methods for n in settings.lengths for p in settings.positions
            if not _done(results, m, settings.task, n, p)]
    docs: dict[tuple[int, float, int], Document] = {}
    bar = tqdm(total=len(todo) * settings.samples, desc=f"{settings.task} retrieval", disable=not progress,
               unit="prompt")
    for m, n, p in todo:
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
            rows.append({"answer": doc.answer, "generation": text, "correct": score(text, doc.answer),
                         "prompt_tokens": len(ids)})
            bar.update(1)
        cell = {"method": m.name, "fingerprint": m.fingerprint(), "task": settings.task, "length": n,
                "position": p, "accuracy": sum(r["correct"] for r in rows) / len(rows), "samples": rows,
                "seconds": round(time.perf_counter() - t0, 3)}
        results.cells[cell_key(m.name, settings.task, n, p)] = cell
        if out is not None:
            write_atomic(out, results.to_json())
        if on_cell is not None:
            on_cell(cell_key(m.name, settings.task, n, p), cell)
    bar.close()
    if out is not None:
        write_atomic(out, results.to_json())
    return results


def _adopt_renamed(results: Results, methods: Sequence[Method], settings: Settings) -> None:
    """Reuse cells of a method stored under another name (same fingerprint = same attention)."""
    by_print = {(c.get("fingerprint"), c.get("task"), c.get("length"), c.get("position")): c
                for c in results.cells.values()}
    for m in methods:
        for n in settings.lengths:
            for p in settings.positions:
                key = cell_key(m.name, settings.task, n, p)
                if _done(results, m, settings.task, n, p):
                    continue
                cell = by_print.get((m.fingerprint(), settings.task, n, p))
                if cell is not None:
                    results.cells[key] = {**cell, "method": m.name}


def _done(results: Results, method: Method, task: str, n: int, p: float) -> bool:
    cell = results.cells.get(cell_key(method.name, task, n, p))
    return cell is not None and cell.get("fingerprint") == method.fingerprint()


def accuracy_table(results: Results, method: str, task: str, lengths: Sequence[int],
                   positions: Sequence[float]) -> list[list[float | None]]:
    """[position][length] accuracy of one method (None where the cell was not run)."""
    out = []
    for p in positions:
        row = []
        for n in lengths:
            cell = results.cells.get(cell_key(method, task, n, p))
            row.append(None if cell is None else cell["accuracy"])
        out.append(row)
    return out
