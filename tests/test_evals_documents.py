"""Retrieval document generators and scoring: single answer, target lengths, seeded reproducibility."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moa_plan.evals.quality.documents import TASKS, extract_answer, make_document, make_documents, score, token_counter


def words(text: str) -> int:
    return len(text.split())


@pytest.fixture(scope="module")
def bpe():
    from conftest import make_tokenizer

    return make_tokenizer()


@settings(max_examples=25, deadline=None)
@given(
    task=st.sampled_from(TASKS),
    length=st.integers(150, 3000),
    position=st.floats(0, 1),
    seed=st.integers(0, 10**6),
    index=st.integers(0, 5),
)
def test_answer_once_and_length_on_target(task, length, position, seed, index):
    doc = make_document(task, words, length, position, seed, index)
    assert doc.prompt.count(doc.answer) == 1
    assert doc.answer.isdigit()
    assert doc.context.count(doc.needle) == 1 and doc.answer in doc.needle
    assert doc.n_tokens == words(doc.prompt)
    # one filler sentence / one record line is the granularity
    assert abs(doc.n_tokens - length) <= 8


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("length", [256, 1000, 2500])
def test_lengths_with_a_real_tokenizer(bpe, task, length):
    count = token_counter(bpe)
    for position in (0.0, 0.5, 1.0):
        doc = make_document(task, bpe, length, position, seed=3)
        assert doc.n_tokens == count(doc.prompt)
        assert abs(doc.n_tokens - length) <= max(24, 0.02 * length)
        assert doc.prompt.count(doc.answer) == 1


@pytest.mark.parametrize("task", TASKS)
def test_seeds_reproduce_and_differ(task):
    a = make_document(task, words, 800, 0.3, seed=7, index=1)
    assert a == make_document(task, words, 800, 0.3, seed=7, index=1)
    others = {make_document(task, words, 800, 0.3, seed=s, index=1).prompt for s in range(8, 12)}
    assert a.prompt not in others and len(others) == 4
    assert make_document(task, words, 800, 0.3, seed=7, index=2).prompt != a.prompt


@pytest.mark.parametrize("task", TASKS)
def test_needle_depth_follows_position(task):
    depths = []
    for position in (0.0, 0.25, 0.5, 0.75, 1.0):
        doc = make_document(task, words, 1500, position, seed=1)
        depths.append(doc.context.index(doc.needle) / len(doc.context))
    assert depths == sorted(depths)
    assert depths[0] < 0.2 and depths[-1] > 0.9


def test_lines_question_names_the_needle_line():
    doc = make_document("lines", words, 600, 0.5, seed=2)
    key = doc.needle.split(":")[0].removeprefix("line ")
    assert doc.context.count(f"line {key}:") == 1
    assert key in doc.question and doc.prefix.endswith("is <")
    assert doc.needle == f"line {key}: REGISTER_CONTENT is <{doc.answer}>"


def test_grid_order_and_bad_input():
    docs = make_documents("passkey", words, [300, 600], [0.0, 1.0], samples=2, seed=0)
    assert [(d.length, d.position, d.index) for d in docs] == [
        (n, p, i) for n in (300, 600) for p in (0.0, 1.0) for i in range(2)
    ]
    with pytest.raises(ValueError, match="unknown task"):
        make_document("nope", words, 100, 0.5)
    with pytest.raises(ValueError, match="position"):
        make_document("lines", words, 100, 1.5)
    with pytest.raises(ValueError, match="length"):
        make_document("passkey", words, 0, 0.5)


@pytest.mark.parametrize(
    "generation, expected",
    [("24557>.", "24557"), (" <24557>", "24557"), ("The pass key is 123 45", "123"), ("none", None), ("", None)],
)
def test_extract_answer(generation, expected):
    assert extract_answer(generation) == expected


def test_score_is_exact_match_of_the_first_number():
    assert score("24557>\n", "24557") == 1.0
    assert score("245570", "24557") == 0.0
    assert score("2455", "24557") == 0.0
    assert score("1 then 24557", "24557") == 0.0
    assert score("", "24557") == 0.0
