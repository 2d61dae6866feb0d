"""The stage 4 pool: shape, reasons that pass the stage's own checks, prompt hygiene, and no
overlap with the shots, the evaluation sets or the baseline probes."""
from __future__ import annotations

import re
from collections import Counter

import pytest

from core.contamination import evaluation_index
from core.models import PROJECT_ROOT
from core.text import copies_exemplar, normalize
from stages import stage4_evaluation_tasks as s4
from tests.pool_text import yaml_strings

POOL = s4.load_pool()
FORBIDDEN = ("<|", "|>", "<start_of_turn>", "\nInstruction:", "\nResponse:", "###", "User:",
             "Assistant:", "Human:")
SCAFFOLD_LINE = re.compile(r"^\s*(?:Instruction|Response|Request|Task)\b", re.MULTILINE)


def test_top_level_shape():
    assert set(POOL) == {"version", "verdict_exemplars", "labelled_pairs"} and POOL["version"] == 1
    assert len(POOL["verdict_exemplars"]) >= 8 and len(POOL["labelled_pairs"]) >= 40
    for entry in POOL["verdict_exemplars"]:
        assert set(entry) == {"request", "better", "worse", "reason"}, entry
    for entry in POOL["labelled_pairs"]:
        assert set(entry) == {"kind", "request", "better", "worse"}, entry


def test_exemplar_reasons_are_one_good_sentence_that_names_no_position():
    for entry in POOL["verdict_exemplars"]:
        for letter in s4.LETTERS:
            verdict = s4.verdict_text(letter, entry["reason"])
            assert s4.parse_verdict(verdict) == (letter, entry["reason"])
        responses = (entry["better"], entry["worse"])
        assert s4.reason_problem(entry["reason"], responses) is None, entry["reason"]
        assert not s4.POSITION.search(entry["reason"]), entry["reason"]


def test_labelled_pairs_are_distinct_and_varied():
    requests = [normalize(p["request"]) for p in POOL["labelled_pairs"]]
    assert len(set(requests)) == len(requests)
    assert len({s4.labelled_id(p["request"]) for p in POOL["labelled_pairs"]}) == len(requests)
    kinds = Counter(p["kind"] for p in POOL["labelled_pairs"])
    assert len(kinds) >= 8 and max(kinds.values()) <= 10, kinds
    for pair in POOL["labelled_pairs"] + POOL["verdict_exemplars"]:
        assert normalize(pair["better"]) != normalize(pair["worse"])
        assert len(pair["request"].split()) <= 40
        assert len(pair["better"].split()) <= 60 and len(pair["worse"].split()) <= 60


def test_labelled_pairs_never_copy_a_shot():
    shots = s4.exemplar_texts(POOL)
    for pair in POOL["labelled_pairs"]:
        for field in ("request", "better", "worse"):
            assert not copies_exemplar(pair[field], shots), pair[field]


@pytest.mark.parametrize("marker", FORBIDDEN)
def test_no_chat_markup(marker):
    for text in yaml_strings(POOL):
        assert marker not in text, (marker, text[:80])


def test_no_scaffold_lines():
    for text in yaml_strings(POOL):
        assert not SCAFFOLD_LINE.search(text), text[:80]
        assert "As an AI" not in text, text[:80]


def test_no_overlap_with_evaluation_sets_or_baseline_probes():
    data_dir = PROJECT_ROOT.parent / "shared" / "data"
    index = evaluation_index(data_dir if data_dir.is_dir() else None, [])
    for text in yaml_strings(POOL):
        assert index.first_hit(text) is None, (text[:80], index.first_hit(text))
