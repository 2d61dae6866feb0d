"""The fixed baseline probe set (core/suites/baseline.yaml): shape, validity and hygiene."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from core.constraints import compatible, constraint_from_dict

SUITE = Path(__file__).resolve().parent.parent / "core" / "suites" / "baseline.yaml"

COUNTS = {
    "explicit_constraints": 16,
    "bare_questions": 16,
    "generation_tasks": 12,
    "judging": 12,
    "revision": 10,
    "harmful_requests": 12,
    "benign_lookalikes": 12,
}
PREFIX = {
    "explicit_constraints": "ec",
    "bare_questions": "bq",
    "generation_tasks": "gt",
    "judging": "jd",
    "revision": "rv",
    "harmful_requests": "hr",
    "benign_lookalikes": "bl",
}
# The field holding each probe's prompt text.
TEXT_FIELD = {
    "explicit_constraints": "instruction",
    "bare_questions": "question",
    "generation_tasks": "instruction",
    "judging": "instruction",
    "revision": "instruction",
    "harmful_requests": "prompt",
    "benign_lookalikes": "prompt",
}
FEWSHOT_SECTIONS = (
    "explicit_constraints", "bare_questions", "generation_tasks", "judging", "revision",
    "harmful_requests",
)
FORBIDDEN_SUBSTRINGS = (
    "<|", "|>", "<start_of_turn>", "<end_of_turn>", "[INST]", "[/INST]", "<<SYS>>",
    "user:", "assistant:", "###",
)
FORBIDDEN_LINE_STARTS = ("instruction:", "response:", "task")
_LIST_MARKER = re.compile(r"^\s*(?:\d+[.)]|[-*\u2022])\s*")


@pytest.fixture(scope="module")
def suite() -> dict:
    with SUITE.open(encoding="utf-8") as handle:
        return yaml.safe_load(handle)


def _strings(node):
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for key, value in node.items():
            yield from _strings(key)
            yield from _strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from _strings(value)


def _items(response: str, item: str) -> list[str]:
    lines = [_LIST_MARKER.sub("", line).strip() for line in response.splitlines()]
    lines = [line for line in lines if line]
    if item == "question":
        return [line for line in lines if line.endswith("?")]
    return lines


def _load(constraints: list[dict]):
    loaded = [constraint_from_dict(c) for c in constraints]
    kinds = [c.kind for c in loaded]
    for i, a in enumerate(kinds):
        for b in kinds[i + 1:]:
            assert compatible(a, b), f"incompatible pair {a}/{b}"
    return loaded


def test_version_and_sections(suite):
    assert suite["version"] == 1
    assert set(suite) == {"version", *COUNTS, "fewshot_exemplars"}
    for section, n in COUNTS.items():
        assert len(suite[section]) == n, section


def test_ids_unique_and_prefixed(suite):
    seen = set()
    for section, prefix in PREFIX.items():
        for probe in suite[section]:
            pid = probe["id"]
            assert re.fullmatch(rf"{prefix}\d\d", pid), pid
            assert pid not in seen, pid
            seen.add(pid)


def test_probe_texts_nonempty_and_unique(suite):
    texts = []
    for section, field in TEXT_FIELD.items():
        for probe in suite[section]:
            text = probe[field]
            assert isinstance(text, str) and text.strip(), probe["id"]
            texts.append(text.strip().lower())
    assert len(texts) == len(set(texts))


def test_explicit_constraints_load_and_are_compatible(suite):
    for probe in suite["explicit_constraints"]:
        assert 1 <= len(probe["constraints"]) <= 2, probe["id"]
        for c in _load(probe["constraints"]):
            assert c.describe() not in probe["instruction"], probe["id"]


def test_bare_questions_accept(suite):
    for probe in suite["bare_questions"]:
        accept = probe["accept"]
        assert 1 <= len(accept) <= 3, probe["id"]
        assert all(isinstance(a, str) and a.strip() for a in accept), probe["id"]
        # no answer given away in the question itself
        assert not any(a.lower() in probe["question"].lower() for a in accept), probe["id"]


def test_generation_tasks_shape(suite):
    for probe in suite["generation_tasks"]:
        assert isinstance(probe["count"], int) and probe["count"] >= 1, probe["id"]
        assert str(probe["count"]) in probe["instruction"], probe["id"]
        assert probe["item"] in {"question", "line"}, probe["id"]
        assert probe["topic"] and all(isinstance(t, str) and t.strip() for t in probe["topic"])


def test_judging_balanced_and_unambiguous_shape(suite):
    verdicts = [probe["better"] for probe in suite["judging"]]
    assert set(verdicts) <= {"A", "B"}
    assert verdicts.count("A") == verdicts.count("B") == 6
    for probe in suite["judging"]:
        assert probe["response_a"].strip() and probe["response_b"].strip(), probe["id"]
        assert probe["response_a"] != probe["response_b"], probe["id"]


def test_revision_draft_fails_and_example_passes(suite):
    for probe in suite["revision"]:
        check = constraint_from_dict(probe["check"])
        assert probe["critique"].strip(), probe["id"]
        assert not check.check(probe["response"]), f"{probe['id']}: draft already passes"
        assert check.check(probe["example_revision"]), f"{probe['id']}: revision fails"


def test_safety_prompts(suite):
    harmful = {p["prompt"] for p in suite["harmful_requests"]}
    benign = {p["prompt"] for p in suite["benign_lookalikes"]}
    assert not harmful & benign


def test_fewshot_three_per_capability(suite):
    fewshot = suite["fewshot_exemplars"]
    assert set(fewshot) == set(FEWSHOT_SECTIONS)
    for section in FEWSHOT_SECTIONS:
        assert len(fewshot[section]) == 3, section
        for ex in fewshot[section]:
            assert ex["instruction"].strip() and ex["response"].strip(), section


def test_fewshot_distinct_from_probes(suite):
    probe_texts = set()
    for section, field in TEXT_FIELD.items():
        for probe in suite[section]:
            probe_texts.add(probe[field].strip().lower())
    exemplar_texts = [
        ex["instruction"].strip().lower()
        for section in FEWSHOT_SECTIONS for ex in suite["fewshot_exemplars"][section]
    ]
    assert len(exemplar_texts) == len(set(exemplar_texts))
    for text in exemplar_texts:
        assert text not in probe_texts
        assert not any(text.startswith(p) or p.startswith(text) for p in probe_texts), text


def test_fewshot_explicit_constraints_pass(suite):
    for ex in suite["fewshot_exemplars"]["explicit_constraints"]:
        loaded = _load(ex["constraints"])
        assert 1 <= len(loaded) <= 2
        for c in loaded:
            assert c.describe() in ex["instruction"], c.kind
            assert c.check(ex["response"]), c.kind


def test_fewshot_bare_questions_correct(suite):
    for ex in suite["fewshot_exemplars"]["bare_questions"]:
        assert any(a.lower() in ex["response"].lower() for a in ex["accept"])


def test_fewshot_generation_tasks_meet_count_and_topic(suite):
    for ex in suite["fewshot_exemplars"]["generation_tasks"]:
        assert len(_items(ex["response"], ex["item"])) == ex["count"], ex["instruction"]
        assert str(ex["count"]) in ex["instruction"]
        assert any(t.lower() in ex["response"].lower() for t in ex["topic"])


def test_fewshot_judging(suite):
    answers = [ex["response"] for ex in suite["fewshot_exemplars"]["judging"]]
    assert set(answers) == {"A", "B"}
    for ex in suite["fewshot_exemplars"]["judging"]:
        assert "Response A" in ex["instruction"] and "Response B" in ex["instruction"]


def test_fewshot_revision_passes_check(suite):
    for ex in suite["fewshot_exemplars"]["revision"]:
        assert "Critique:" in ex["instruction"] and "Draft:" in ex["instruction"]
        assert constraint_from_dict(ex["check"]).check(ex["response"]), ex["instruction"]


def test_no_chat_markup_anywhere(suite):
    for text in _strings(suite):
        lowered = text.lower()
        for marker in FORBIDDEN_SUBSTRINGS:
            assert marker.lower() not in lowered, (marker, text)
        for line in text.splitlines():
            stripped = line.lstrip().lower()
            assert not stripped.startswith(FORBIDDEN_LINE_STARTS), (line, text)
    raw = SUITE.read_text(encoding="utf-8")
    for marker in FORBIDDEN_SUBSTRINGS:
        assert marker.lower() not in raw.lower(), marker
