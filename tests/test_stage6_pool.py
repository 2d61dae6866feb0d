"""The stage 6 exemplar pool: shape, principle names, A/B balance and prompt hygiene."""
from __future__ import annotations

import re
from functools import lru_cache
from itertools import combinations

import pytest

from core.config import RunSettings
from core.constitution import load_constitution
from core.models import PROJECT_ROOT
from core.suites.baseline import is_refusal, load_probes
from core.text import normalize, rouge_l
from stages import stage6_constitutional as s6
from tests.pool_text import yaml_strings as strings

FORBIDDEN = ("<|", "|>", "<start_of_turn>", "###", "User:", "Assistant:", "[INST]")
SCAFFOLD_LINE = re.compile(r"^\s*(?:Instruction|Response|Task|Request|Answer|Critique|Revision)\b",
                           re.MULTILINE)
NEAR_DUPLICATE = RunSettings().near_duplicate
PRINCIPLE_NAMES = {p.name for p in load_constitution(PROJECT_ROOT / "constitution.yaml").principles}


@lru_cache(maxsize=1)
def pool() -> dict:
    return s6.load_pool()


def test_top_level_shape():
    assert set(pool()) == {"version", "redteam_seeds", "helpful_prompts", "benign_lookalikes",
                           "answer_exemplars", "cai_exemplars", "judge_exemplars"}
    assert len(pool()["redteam_seeds"]) >= 12 and len(pool()["helpful_prompts"]) >= 40
    assert len(pool()["benign_lookalikes"]) >= 12 and len(pool()["answer_exemplars"]) >= 8
    assert len(pool()["cai_exemplars"]) >= 6


@pytest.mark.parametrize("section", ["redteam_seeds", "helpful_prompts", "benign_lookalikes"])
def test_prompt_lists_are_single_lines_distinct_and_not_near_duplicates(section):
    items = pool()[section]
    assert all(i.strip() == i and "\n" not in i and 4 <= len(i.split()) <= 30 for i in items)
    for a, b in combinations(items, 2):
        assert rouge_l(a, b) <= NEAR_DUPLICATE, (a, b)


def test_no_pool_prompt_is_a_baseline_probe():
    probes = [p.text for p in load_probes()[0]]
    prompts = pool()["helpful_prompts"] + pool()["benign_lookalikes"] + pool()["redteam_seeds"]
    for text in prompts:
        assert all(rouge_l(text, probe) <= NEAR_DUPLICATE for probe in probes), text


def test_cai_exemplars_name_two_distinct_principles_and_revise_cleanly():
    for e in pool()["cai_exemplars"]:
        assert set(e) == {"prompt", "answer", "principles", "critique", "revision"}
        assert len(e["principles"]) == 2 and len(set(e["principles"])) == 2
        assert set(e["principles"]) <= PRINCIPLE_NAMES
        assert normalize(e["answer"]) != normalize(e["revision"])
        assert not s6.has_meta_prefix(e["revision"]), e["revision"]
        for field in ("answer", "critique", "revision"):
            assert s6.degenerate_reason(e[field]) is None and not s6.repeats_a_sentence(e[field])


def test_cai_exemplars_teach_both_declining_and_not_over_refusing():
    exemplars = pool()["cai_exemplars"]
    declines = [e for e in exemplars if is_refusal(e["revision"]) and not is_refusal(e["answer"])]
    unrefuses = [e for e in exemplars if is_refusal(e["answer"]) and not is_refusal(e["revision"])]
    assert len(declines) >= 3 and len(unrefuses) >= 1


def test_answer_exemplars_are_helpful_only():
    for e in pool()["answer_exemplars"]:
        assert set(e) == {"prompt", "response"} and not is_refusal(e["response"])
        assert 20 <= len(e["response"].split()) <= 120


def test_judge_exemplars_are_balanced_and_principled():
    exemplars = pool()["judge_exemplars"]
    assert [e["better"] for e in exemplars].count("A") == [e["better"] for e in exemplars].count("B")
    for e in exemplars:
        assert set(e) == {"prompt", "principles", "response_a", "response_b", "better"}
        assert len(set(e["principles"])) == 2 and set(e["principles"]) <= PRINCIPLE_NAMES


@pytest.mark.parametrize("marker", FORBIDDEN)
def test_no_chat_markup(marker):
    for text in strings(pool()):
        assert marker not in text, (marker, text[:80])


def test_no_scaffold_lines():
    for text in strings(pool()):
        assert not SCAFFOLD_LINE.search(text), text[:80]
        assert "As an AI" not in text, text[:80]
