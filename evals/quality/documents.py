"""Offline, seeded generators of long-context retrieval documents.

Two tasks, both with a single answer that occurs exactly once in the prompt:

* ``lines`` - the LMSYS LongEval "lines" task: a record of ``line <word-word>: REGISTER_CONTENT
  is <number>`` lines, then the question for one line's number.
* ``passkey`` - a pass key hidden in repeated filler text (needle in a haystack).

A document is sized in tokens of the model's own tokenizer (the prompt, as plain text, without
special tokens) and the needle is placed at a chosen relative depth (0 = first line / start of
the text, 1 = last line / end). Everything is derived from a string seed, so the same
(task, length, position, seed, index) gives the same document in every process.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

TaskName = Literal["lines", "passkey"]
TASKS: tuple[str, ...] = ("lines", "passkey")

# Plain lower-case English words, no digits: line names are two of them joined by '-'.
WORDS: tuple[str, ...] = tuple(
    """
able acid aged also area army away baby back ball band bank base bath bear beat bell belt bend
best bird blow blue boat body bond bone book boot born boss both bowl bulk burn bush busy cake
call calm camp card care cart case cash cast cell chat chip city clay club coal coat code cold
come cook cool cope copy cord core corn cost crew crop dark data date dawn deal dear debt deck
deep deny desk dial diet disk dock door dose down draw drop drum dual duck dull dust duty each
earn ease east easy edge else even ever face fact fail fair fall farm fast fate fear feed feel
file fill film find fine fire firm fish flag flat flow folk food foot fork form fort four free
frog fuel full fund gain game gate gear gift girl give glad goal gold golf good grab gray grey
grid grow gulf hair half hall hand hang hard harm hate head heat held hell help herb hero hide
high hill hint hire hold hole holy home hood hook hope horn host hour huge hunt idea inch iron
item jazz join joke jump jury keen keep kick kind king kiss knee knot lack lady lake lamp land
lane last late lead leaf lean left lens life lift like lime line link lion list live load loan
lock long look lord loss loud love luck lung main make mall many mark mask mass meal meat melt
menu mild milk mill mind mine mint miss mode mood moon most move much mule nail name navy neat
neck need nest news next nice node noon nose note oath open oval oven pace pack page pain pair
palm park part pass past path peak pick pile pine pink pipe plan play plot plug poem poet pole
pond pool port pose post pour pure push race rail rain rank rare rate read real rear rice rich
ride ring rise risk road rock role roof room root rope rose ruby rule rush safe sail salt sand
""".split()
)

PASSKEY_INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize "
    "it. I will quiz you about the important information there.\n\n"
)
PASSKEY_FILLER = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
)
LINES_INTRO = (
    "Below is a record of lines I want you to remember. Each line begins with 'line <line index>' "
    "and contains a '<REGISTER_CONTENT>' at the end of the line as a numerical value. For each "
    "line index, memorize its corresponding <REGISTER_CONTENT>. At the end of the record, I will "
    "ask you to retrieve the corresponding <REGISTER_CONTENT> of a certain line index. Now the "
    "record start:\n\n"
)

TokenCounter = Callable[[str], int]


@dataclass(frozen=True)
class Document:
    """One retrieval question: ``prompt = context + question + prefix``; ``answer`` is the exact string
    to return. ``prefix`` starts the answer (with a chat template it opens the assistant turn)."""

    task: str
    length: int  # target length in tokens
    position: float  # relative depth of the needle in [0, 1]
    seed: int
    index: int
    context: str
    question: str
    prefix: str
    answer: str
    n_tokens: int  # measured tokens of the prompt
    needle: str

    @property
    def prompt(self) -> str:
        return self.context + self.question + self.prefix

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["prompt"] = self.prompt
        return out


def token_counter(tokenizer: Any) -> TokenCounter:
    """A function counting the tokens of a text (no special tokens) with a HF tokenizer or a callable."""
    if callable(tokenizer) and not hasattr(tokenizer, "encode"):
        return tokenizer
    return lambda text: len(tokenizer.encode(text, add_special_tokens=False))


def _rng(task: str, length: int, position: float, seed: int, index: int) -> random.Random:
    # str seeds are hashed with SHA-512 by random.seed: stable across processes and platforms.
    return random.Random(f"{task}|{length}|{position!r}|{seed}|{index}")


def _check(length: int, position: float) -> None:
    if length < 1:
        raise ValueError(f"length must be >= 1, got {length}")
    if not 0.0 <= position <= 1.0:
        raise ValueError(f"position must be in [0, 1], got {position}")


def _fit(build: Callable[[int], str], count: TokenCounter, target: int, lo: int, hi: int) -> tuple[int, str, int]:
    """The unit count n in [lo, hi] whose text length is closest to ``target`` tokens (lengths grow with n)."""
    cache: dict[int, tuple[str, int]] = {}

    def measure(n: int) -> int:
        if n not in cache:
            text = build(n)
            cache[n] = (text, count(text))
        return cache[n][1]

    if measure(hi) <= target:
        best = hi
    else:
        a, b = lo, hi  # invariant: measure(b) > target
        while b - a > 1:
            mid = (a + b) // 2
            if measure(mid) <= target:
                a = mid
            else:
                b = mid
        best = min((a, b), key=lambda n: (abs(measure(n) - target), n))
    text, tokens = cache[best]
    return best, text, tokens


def _line_number(rng: random.Random, forbidden: set[str], answer: str | None) -> str:
    while True:
        value = str(rng.randint(1, 50000))
        if value in forbidden:
            continue
        if answer is not None and (answer in value or value in answer):
            continue
        return value


def lines_document(count: TokenCounter, length: int, position: float, seed: int = 0, index: int = 0) -> Document:
    """A LongEval 'lines' prompt of about ``length`` tokens asking for the line at relative depth ``position``."""
    _check(length, position)
    rng = _rng("lines", length, position, seed, index)
    answer = _line_number(rng, set(), None)
    sample = count("line able-acid: REGISTER_CONTENT is <12345>\n")
    max_lines = max(2, 4 * length // max(1, sample) + 8)
    names: list[str] = []
    seen: set[str] = set()
    while len(names) < max_lines:  # distinct names; about 100k pairs available
        name = f"{rng.choice(WORDS)}-{rng.choice(WORDS)}"
        if name not in seen:
            seen.add(name)
            names.append(name)
    values: list[str] = []
    used = {answer}
    for _ in range(max_lines):
        v = _line_number(rng, used, answer)
        used.add(v)
        values.append(v)

    def parts(n: int) -> tuple[str, str, str, str]:
        target = round(position * (n - 1))
        rows = []
        for i in range(n):
            value = answer if i == target else values[i]
            rows.append(f"line {names[i]}: REGISTER_CONTENT is <{value}>\n")
        key = names[target]
        question = (
            f"\nNow the record is over. Tell me what is the <REGISTER_CONTENT> in line {key}? I need the number.\n"
        )
        prefix = f"The <REGISTER_CONTENT> in line {key} is <"
        return LINES_INTRO + "".join(rows), question, prefix, rows[target].strip()

    def build(n: int) -> str:
        context, question, prefix, _ = parts(n)
        return context + question + prefix

    n, _, tokens = _fit(build, count, length, 1, max_lines)
    context, question, prefix, needle = parts(n)
    return Document("lines", length, position, seed, index, context, question, prefix, answer, tokens, needle)


def passkey_document(count: TokenCounter, length: int, position: float, seed: int = 0, index: int = 0) -> Document:
    """A pass-key prompt of about ``length`` tokens with the key sentence at relative depth ``position``."""
    _check(length, position)
    rng = _rng("passkey", length, position, seed, index)
    answer = str(rng.randint(10000, 99999))
    needle = f"The pass key is {answer}. Remember it."
    question = "\n\nWhat is the pass key?"
    prefix = " The pass key is"
    start = rng.randrange(len(PASSKEY_FILLER))
    per = max(1, count(" ".join(PASSKEY_FILLER)) // len(PASSKEY_FILLER))
    max_units = max(2, 2 * length // per + 8)
    filler = [PASSKEY_FILLER[(start + i) % len(PASSKEY_FILLER)] for i in range(max_units)]

    def context(n: int) -> str:
        cut = round(position * n)
        return PASSKEY_INTRO + " ".join(filler[:cut] + [needle] + filler[cut:n])

    n, _, tokens = _fit(lambda n: context(n) + question + prefix, count, length, 0, max_units)
    return Document("passkey", length, position, seed, index, context(n), question, prefix, answer, tokens, needle)


GENERATORS: dict[str, Callable[..., Document]] = {"lines": lines_document, "passkey": passkey_document}


def make_document(task: str, tokenizer: Any, length: int, position: float, seed: int = 0, index: int = 0) -> Document:
    """One document of ``task`` ('lines' or 'passkey') sized with ``tokenizer`` (HF tokenizer or counter)."""
    if task not in GENERATORS:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    return GENERATORS[task](token_counter(tokenizer), length, position, seed, index)


def make_documents(
    task: str, tokenizer: Any, lengths: Sequence[int], positions: Sequence[float], samples: int = 1, seed: int = 0
) -> list[Document]:
    """The full grid: every length x position x sample index, in that order."""
    count = token_counter(tokenizer)
    return [
        make_document(task, count, length, position, seed, i)
        for length in lengths
        for position in positions
        for i in range(samples)
    ]


_NUMBER = re.compile(r"\d+")


def extract_answer(generation: str) -> str | None:
    """The first integer in a model's generation (e.g. ' <24557>.' -> '24557'), or None."""
    match = _NUMBER.search(generation)
    return match.group(0) if match else None


def score(generation: str, answer: str) -> float:
    """Exact match of the first number in the generation against the answer: 1.0 or 0.0."""
    return float(extract_answer(generation) == answer)
