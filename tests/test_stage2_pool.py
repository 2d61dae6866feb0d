"""The stage 2 exemplar pool: shape, answers that pass the stage's own checks, judge exemplars
whose better side is the only one that answers, and prompt hygiene."""
from __future__ import annotations

import re
from functools import lru_cache
from itertools import combinations

import pytest
import yaml

from core.text import rouge_l
from stages.stage2_implicit_instructions import POOL_PATH, check_answer
from tests.pool_text import yaml_strings as _strings

FORBIDDEN = ("<|", "|>", "<start_of_turn>", "\nInstruction:", "\nResponse:", "###", "User:",
             "Assistant:")
SCAFFOLD_LINE = re.compile(r"^\s*(?:Instruction|Response|Task|Question|Answer)\b", re.MULTILINE)


@lru_cache(maxsize=1)
def _pool() -> dict:
    return yaml.safe_load(POOL_PATH.read_text(encoding="utf-8"))


def _questions() -> list[str]:
    pool = _pool()
    return (pool["question_seeds"] + [e["question"] for e in pool["answer_exemplars"]]
            + [e["question"] for e in pool["judge_exemplars"]])


def test_top_level_shape():
    pool = _pool()
    assert pool["version"] == 1
    assert set(pool) == {"version", "question_seeds", "answer_exemplars", "judge_exemplars"}
    assert len(pool["question_seeds"]) == 60
    assert len(pool["answer_exemplars"]) == 20
    assert len(pool["judge_exemplars"]) == 6


def test_questions_are_bare_short_and_distinct():
    questions = _questions()
    for q in questions:
        assert q.strip() == q and "\n" not in q, q
        assert 2 <= len(q.split()) <= 25, q
        assert not q.lower().startswith(("please", "write", "instruction")), q
    for a, b in combinations(questions, 2):
        assert rouge_l(a, b) <= 0.7, (a, b)


def test_answer_exemplars_pass_the_answer_checks():
    for entry in _pool()["answer_exemplars"]:
        assert set(entry) == {"question", "answer"}
        assert check_answer(entry["question"], entry["answer"])["problem"] is None, entry["question"]
        assert 8 <= len(entry["answer"].split()) <= 90, entry["question"]


def test_judge_exemplars_prefer_the_answer():
    exemplars = _pool()["judge_exemplars"]
    assert [e["better"] for e in exemplars].count("A") == 3
    failures = set()
    for entry in exemplars:
        assert set(entry) == {"question", "response_a", "response_b", "better"}
        better = entry["response_a"] if entry["better"] == "A" else entry["response_b"]
        worse = entry["response_b"] if entry["better"] == "A" else entry["response_a"]
        assert check_answer(entry["question"], better)["problem"] is None, entry["question"]
        failures.add(check_answer(entry["question"], worse)["problem"])
    assert None not in failures and len(failures) >= 4  # several different ways to fail


def test_no_baseline_probe_question_in_the_pool():
    from core.suites.baseline import load_probes

    probes = {p.text.lower() for p in load_probes()[0] if p.capability == "bare_questions"}
    assert not probes & {q.lower() for q in _questions()}


@pytest.mark.parametrize("marker", FORBIDDEN)
def test_no_chat_markup(marker):
    for text in _strings(_pool()):
        assert marker not in text, (marker, text[:80])


def test_no_scaffold_lines():
    for text in _strings(_pool()):
        assert not SCAFFOLD_LINE.search(text), text[:80]
        assert "As an AI" not in text, text[:80]
