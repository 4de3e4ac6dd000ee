"""A calibration sample as the model sees it: the conversation rendered (chat template where the
tokenizer has one), fitted to a token length, answered by the dense model, and tokenized with a
loss mask over the answer tokens."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from moa_plan.errors import UsageError


def render(tok: Any, context: str, questions: list[str], answers: list[str]) -> tuple[str, list[tuple[int, int]]]:
    """The conversation as text (chat template where the tokenizer has one) ending in a generation
    prompt for the next question when ``answers`` is one short, else complete; and the character
    span of each given answer in it."""
    if getattr(tok, "chat_template", None):
        msgs: list[dict[str, str]] = []
        spans = []
        for i, q in enumerate(questions[: len(answers) + 1]):
            msgs.append({"role": "user", "content": f"{context}\n\n{q}" if i == 0 else q})
            if i < len(answers):
                head = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
                msgs.append({"role": "assistant", "content": answers[i]})
                spans.append((len(head), len(head) + len(answers[i])))
        pending = len(answers) < len(questions)
        text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=pending)
        if any(text[a:b] != answer for (a, b), answer in zip(spans, answers)):  # earlier turns verbatim
            raise UsageError([("calibration", "the chat template does not keep earlier turns as a prefix")])
        return text, spans
    text, spans = f"{context}\n\n", []
    for i, q in enumerate(questions[: len(answers) + 1]):
        text += ("\n" if i else "") + f"Question: {q}\nAnswer:"
        if i < len(answers):
            spans.append((len(text) + 1, len(text) + 1 + len(answers[i])))
            text += f" {answers[i]}"
    return text, spans


def encode(tok: Any, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=not getattr(tok, "chat_template", None))["input_ids"])


Task = tuple[str, list[str], str | None]  # context, questions, the exact answer where there is one


def fit_prompt(tok: Any, make: Callable[[int], Task], target: int, max_units: int) -> Task:
    """Largest unit count whose first prompt has <= ``target`` tokens (binary search)."""
    lo, hi = 1, max_units
    best = None
    while lo <= hi:
        mid = (lo + hi) // 2
        task = make(mid)
        if len(encode(tok, render(tok, task[0], task[1], [])[0])) <= target:
            best, lo = task, mid + 1
        else:
            hi = mid - 1
    if best is None:
        raise UsageError([("lengths", f"a prompt of {target} tokens is too short for even one unit of the task")])
    return best


def fit_conversation(tok: Any, make: Callable[[int], Task], budget: int) -> Task:
    """The longest context whose first prompt plus the later questions' turns fit ``budget`` tokens
    (the answers' tokens are reserved by the caller)."""
    target = budget
    for _ in range(4):
        task = fit_prompt(tok, make, target, max_units=max(4, target))
        first = len(encode(tok, render(tok, task[0], task[1], [])[0]))
        later = sum(len(encode(tok, q)) + 24 for q in task[1][1:])  # each later turn's markup too
        if first + later <= budget:
            break
        target -= first + later - budget
    return task


def generate_answers(model: Any, tok: Any, texts: list[str], max_new_tokens: int) -> list[str]:
    """The dense model's greedy continuation of each text (one left-padded batch), as text up to
    its end-of-turn token."""
    import torch

    eos = tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else (eos if eos is not None else 0)
    ids = [encode(tok, t) for t in texts]
    width = max(map(len, ids))
    device = next(model.parameters()).device
    x = torch.tensor([[pad] * (width - len(i)) + i for i in ids], device=device)
    mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids], device=device)
    with torch.no_grad():
        out = model.generate(x, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
    answers = []
    for row in out[:, width:].tolist():
        if eos is not None and eos in row:
            row = row[: row.index(eos)]
        answers.append(tok.decode(row, skip_special_tokens=True).strip() or "...")
    return answers


def tokenize_sample(tok: Any, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[int], list[int]]:
    """(prompt ids before the first answer, the rest, loss mask over the rest): a token is an
    answer token when it starts inside an answer's characters, or is the end-of-turn token that
    directly follows one."""
    enc = tok(text, add_special_tokens=not getattr(tok, "chat_template", None), return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
    mask = []
    for j, (start, end) in enumerate(offsets):
        inside = any(a <= start < b for a, b in spans)
        closes = j > 0 and mask[-1] == 1 and ids[j] == tok.eos_token_id
        mask.append(1 if inside or closes else 0)
    if 1 not in mask:
        raise UsageError([("calibration", "no answer token found in a sample")])
    first = mask.index(1)
    return ids[:first], ids[first:], mask[first:]
