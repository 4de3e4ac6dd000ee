"""Calibration data with long-range dependencies, supervised by the dense model's own greedy answer.

Each sample is a conversation of about ``length`` tokens of the model's tokenizer: a long
context, then one or more questions whose answers need context far back, each followed by the
dense model's own greedy answer (at most ``max_answer_tokens`` each; supervision aligned to the
model, not a human reference, as MoA prescribes). The profile's loss is over the answer tokens
only (``loss_mask``). The tasks: ``calibration_tasks``; rendering, fitting and answering a
sample: ``calibration_prompts``.

The dataset is one ``moa_plan.run`` result file (job ``calibrate``): the settings, then one
sample per cell. It is checkpointed atomically after every batch, so an interrupted run resumes
where it stopped.
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path
from typing import Any

from moa_plan.errors import OptionError, UsageError
from moa_plan.run import Run, read_result
from moa_plan.search.calibration_prompts import fit_conversation, generate_answers, render, tokenize_sample
from moa_plan.search.calibration_tasks import DOC_QUESTIONS, SYNTHETIC, read_user_texts, text_task
from moa_plan.search.settings import CalibrateSettings


def sample_plan(settings: dict[str, Any]) -> list[dict[str, Any]]:
    """The (id, task, length, seed) of every sample the settings ask for, in order."""
    tasks = list(settings["tasks"]) + (["text"] if settings.get("text") else [])
    out = []
    for i in range(settings["samples_per_length"]):  # lengths interleaved: a cut-short run has every length
        for n in settings["lengths"]:
            out.append({"id": f"n{n}-{i}", "task": tasks[i % len(tasks)], "length": n, "index": i})
    return out


GRID = ("lengths", "samples_per_length", "chat_template")  # stored beside the settings, not part of them


def load_dataset(path: str | os.PathLike) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(settings with the grid, samples) of a calibration file; located errors. Samples of a task
    with an exact answer that the dense model got wrong are left out (they would supervise the
    wrong answer) unless the file was built with ``keep_wrong_answers``."""
    data = read_result(path, "calibrate")
    for key, s in data["cells"].items():
        if not isinstance(s, dict) or not all(k in s for k in ("id", "length", "prompt_ids", "answer_ids")):
            raise UsageError([(f"cells.{key}", "sample lacks id / length / prompt_ids / answer_ids")], source=str(path))
    settings = data["settings"]
    keep_wrong = bool(settings.get("keep_wrong_answers"))
    samples = [s for s in data["cells"].values() if keep_wrong or s.get("dense_correct") is not False]
    if not samples:
        raise UsageError(
            [("cells", "the dense model answered every sample wrongly (calibrate --keep-wrong-answers keeps them)")],
            source=str(path),
        )
    return {**settings, **{k: data[k] for k in GRID if k in data}}, samples


def build(job: CalibrateSettings) -> Path:
    """Build (or resume) the calibration file at ``out`` (a ``moa_plan.run`` result file whose
    cells are the samples); returns its path.

    Samples are generated in batches of ``batch_size`` (one left-padded ``generate`` per question
    round); the file is checkpointed after every batch.
    """
    from moa_plan.runtime import load as loader

    model_dir, out, lengths, samples_per_length, tasks = job.model, job.out, job.lengths, job.samples, job.tasks
    seed, max_answer_tokens, text = job.seed, job.max_answer_tokens, job.text
    bad = [t for t in tasks if t not in SYNTHETIC]
    if bad:
        raise OptionError([("--tasks", f"unknown task(s) {bad}; known: {list(SYNTHETIC)}")])
    if not tasks and not text:
        raise OptionError([("--tasks", "no task and no --text: nothing to build")])
    if samples_per_length < 1:
        raise OptionError([("--samples", "must be >= 1")])
    if max_answer_tokens < 1:
        raise OptionError([("--max-answer-tokens", "must be >= 1")])
    model_dir = loader.resolve(model_dir)
    for n in lengths:
        if questions_at(n, max_answer_tokens, 1) < 1:
            raise OptionError(
                [("--lengths", f"{n} is too short for a prompt plus an answer of {max_answer_tokens} tokens")]
            )
    settings = {
        "model": loader.model_name(model_dir),
        "tasks": list(tasks),
        "seed": seed,
        "max_answer_tokens": max_answer_tokens,
        "text": str(Path(text).resolve()) if text else None,
        "supervision": "dense model's greedy answers, loss over answer tokens only",
        "keep_wrong_answers": job.keep_wrong_answers,
    }
    grid = {"lengths": sorted(set(lengths)), "samples_per_length": samples_per_length}
    wanted = sample_plan({**settings, **grid})
    keys = [s["id"] for s in wanted]
    with Run(out, "calibrate", settings, overwrite=job.overwrite, quiet=job.quiet) as run:
        todo = [s for s in wanted if s["id"] in set(run.todo(keys))]
        if todo:
            _generate(run, todo, model_dir, settings, text, job.batch_size, job.device)
        run.finish(keys, **grid, chat_template=bool(run.summary.get("chat_template")))
    return Path(out)


def _generate(
    run: Run,
    todo: list[dict[str, Any]],
    model_dir: Path,
    settings: dict[str, Any],
    text: str | None,
    batch_size: int,
    device: str,
) -> None:
    """Generate the samples ``todo`` into ``run``, one batch at a time."""
    from moa_plan.runtime import load as loader

    seed, max_answer_tokens = settings["seed"], settings["max_answer_tokens"]
    model, tok = loader.load(model_dir, device=device)
    run.summary["chat_template"] = bool(getattr(tok, "chat_template", None))
    docs = read_user_texts(text) if text else []
    with run.progress(len(todo), "calibrate", unit="sample") as bar:
        for start in range(0, len(todo), batch_size):
            t0 = time.perf_counter()
            batch = todo[start : start + batch_size]
            convs = []
            for spec in batch:
                n_q = questions_at(spec["length"], max_answer_tokens, DOC_QUESTIONS if spec["task"] == "docs" else 1)
                # each answer's end-of-turn markup and re-tokenisation take a few tokens more
                target = spec["length"] - n_q * (max_answer_tokens + 4)
                if spec["task"] == "text":
                    doc = docs[spec["index"] % len(docs)]
                    make = lambda units, doc=doc: text_task(doc, units)  # noqa: E731
                else:
                    fn, rng_seed = SYNTHETIC[spec["task"]], f"{seed}-{spec['id']}"
                    make = lambda units, fn=fn, s=rng_seed, q=n_q: _first_questions(  # noqa: E731
                        fn(random.Random(s), units), q
                    )
                convs.append(fit_conversation(tok, make, target))
            answers: list[list[str]] = [[] for _ in batch]
            for turn in range(max(len(c[1]) for c in convs)):
                open_ = [i for i, c in enumerate(convs) if turn < len(c[1])]
                texts = [render(tok, convs[i][0], convs[i][1], answers[i])[0] for i in open_]
                for i, answer in zip(open_, generate_answers(model, tok, texts, max_answer_tokens)):
                    answers[i].append(answer)
            seconds = round((time.perf_counter() - t0) / len(batch), 2)
            cells = {}
            for spec, (context, questions, expected), ans in zip(batch, convs, answers):
                full, spans = render(tok, context, questions, ans)
                prompt_ids, answer_ids, loss_mask = tokenize_sample(tok, full, spans)
                checked = {} if expected is None else {"expected": expected, "dense_correct": expected in ans[0]}
                cells[spec["id"]] = {
                    **{k: spec[k] for k in ("id", "task", "length")},
                    "questions": questions,
                    "answers": ans,
                    **checked,
                    "prompt_ids": prompt_ids,
                    "answer_ids": answer_ids,
                    "loss_mask": loss_mask,
                    "n_tokens": len(prompt_ids) + len(answer_ids),
                    "seconds": seconds,
                }
            run.put_many(cells)
            bar.update(len(batch))


def questions_at(length: int, max_answer_tokens: int, wanted: int) -> int:
    """How many question turns (up to ``wanted``) a sample of ``length`` tokens holds. Each turn
    reserves ``max_answer_tokens`` plus its markup; the turns take at most half the sample, so the
    document the answers read stays the larger part (as in long-document calibration), except that
    a short length still gets one turn where one fits, so it can be profiled (0: none fits)."""
    turn = max_answer_tokens + 48
    if length <= turn + 32:
        return 0
    return max(1, min(wanted, (length // 2) // turn))


def _first_questions(task: tuple[str, str | list[str], str | None], n: int) -> tuple[str, list[str], str | None]:
    """The task with its first ``n`` questions (a single question becomes a list of one)."""
    context, questions, expected = task
    questions = [questions] if isinstance(questions, str) else list(questions)
    return context, questions[:n], expected
