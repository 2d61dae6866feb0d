"""The stage 3 pool: shape, exemplars that pass their own checks, topics and prompt hygiene."""
from __future__ import annotations

import random
import re

import pytest

from core.config import RunSettings
from core.guards import TemplateGuard
from core.text import NearDuplicateFilter
from stages import stage3_generation_tasks as s3
from tests.pool_text import yaml_strings as strings

POOL = s3.load_pool()
FORBIDDEN = ("<|", "|>", "<start_of_turn>", "\nInstruction:", "\nResponse:", "###", "User:",
             "Assistant:")
SCAFFOLD_LINE = re.compile(r"^\s*(?:Instruction|Response|Task|Topic \d)\b", re.MULTILINE)


def test_top_level_shape():
    assert POOL["version"] == 1
    assert set(POOL) == {"version", "topics", "things", "templates", "response_exemplars",
                         "judge_exemplars"}
    assert set(POOL["templates"]) == set(s3.KINDS)


def test_topics_are_distinct_and_their_keywords_fit():
    topics = POOL["topics"]
    assert 55 <= len(topics) <= 70
    names = [t["name"] for t in topics]
    kept = NearDuplicateFilter(RunSettings().near_duplicate)
    assert all(kept.offer(n) for n in names + s3.exemplar_topics(POOL))  # no near-duplicates
    for t in topics:
        assert set(t) == {"name", "examples", "keywords"}, t
        assert 4 <= len(t["keywords"]) <= 10, t["name"]
        assert s3.mentions_topic(f"{t['name']} {t['examples']}", t["keywords"]), t["name"]


def test_no_pool_topic_is_the_topic_of_an_evaluation_probe():
    probes = s3.probe_requests()
    assert probes
    assert [t["name"] for t in POOL["topics"] if s3.is_probe_topic(t["name"], probes)] == []


def test_every_template_renders_for_pool_and_model_topics():
    model_topic = {"name": "tide pools", "examples": None, "keywords": ["tide"], "source": "model"}
    for kind, templates in POOL["templates"].items():
        assert any("{examples}" not in t for t in templates), kind
        for seed in range(30):
            for t in (POOL["topics"][seed], model_topic):
                task = s3.render_task({**t, "source": "pool"}, kind, random.Random(seed), POOL)
                assert "{" not in task.text and "None" not in task.text
    counted = [t for t in POOL["templates"]["mcq"] if "{count}" not in t]
    assert counted, "multiple-choice tasks need single-item templates"


@pytest.mark.parametrize("entry", POOL["response_exemplars"], ids=lambda e: e["instruction"][:40])
def test_response_exemplars_pass_every_check(entry):
    assert set(entry) == {"instruction", "spec", "response"}
    assert entry["spec"]["kind"] in s3.KINDS
    assert all(s3.check_response(entry["response"], entry["spec"]).values())
    assert s3.unusable_reason(entry["response"], TemplateGuard(), []) is None


def test_response_exemplars_cover_every_kind_and_count():
    exemplars = POOL["response_exemplars"]
    kinds = [e["spec"]["kind"] for e in exemplars]
    assert all(kinds.count(k) >= 3 for k in s3.KINDS)
    assert {e["spec"]["count"] for e in exemplars if e["spec"]["kind"] != "mcq"} == {2, 3, 4, 5}
    topics = {t["name"] for t in POOL["topics"]}
    assert not {e["spec"]["topic"] for e in exemplars} & topics  # exemplar topics never tasks


def test_judge_exemplars():
    exemplars = POOL["judge_exemplars"]
    assert [e["better"] for e in exemplars].count("A") == 3
    assert [e["better"] for e in exemplars].count("B") == 3
    for e in exemplars:
        better = e["response_a"] if e["better"] == "A" else e["response_b"]
        worse = e["response_b"] if e["better"] == "A" else e["response_a"]
        assert all(s3.check_response(better, e["spec"]).values()), e["instruction"]
        assert not all(s3.check_response(worse, e["spec"]).values()), e["instruction"]


@pytest.mark.parametrize("marker", FORBIDDEN)
def test_no_chat_markup(marker):
    for text in strings(POOL):
        assert marker not in text, (marker, text[:80])


def test_no_scaffold_lines():
    for text in strings(POOL):
        assert not SCAFFOLD_LINE.search(text), text[:80]
