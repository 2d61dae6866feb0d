"""The stage 5 pool: shape, checks that hold, prompt hygiene, and no overlap with evaluation text."""
from __future__ import annotations

import re
from itertools import combinations

from core import contamination
from core.config import RunSettings
from core.constraints import constraint_from_dict
from core.models import PROJECT_ROOT
from core.text import copies_exemplar, degenerate_reason, rouge_l
from stages import stage5_revision_tasks as s5
from tests.pool_text import yaml_strings as strings

POOL = s5.load_pool()
FORBIDDEN = ("<|", "|>", "<start_of_turn>", "###", "User:", "Assistant:")
SCAFFOLD_LINE = re.compile(r"^\s*(?:Instruction|Response|Task)\b", re.MULTILINE)


def passes(text: str, checks: list[dict]) -> bool:
    return all(constraint_from_dict(c).check(text) for c in checks)


def as_task(item: dict):
    """A pool item (request, draft, critique, check) as the revision task it would be."""
    return s5.make_task(item["request"], item["draft"], item["check"], "pool",
                        critique=item["critique"])


def test_shape():
    assert POOL["version"] == 1
    assert set(POOL) == {"version", "revision_exemplars", "judge_exemplars", "tasks", "requests"}
    assert len(POOL["revision_exemplars"]) >= 12 and len(POOL["tasks"]) >= 20
    assert len(POOL["requests"]) >= 30


def test_text_hygiene():
    for text in strings(POOL):
        assert not any(marker in text for marker in FORBIDDEN), text
        assert not SCAFFOLD_LINE.search(text), text
        assert not s5.SCAFFOLDING.search(text), text


def test_revision_exemplars_fix_the_critique_and_keep_the_content():
    kinds = set()
    for e in POOL["revision_exemplars"]:
        assert set(e) == {"request", "draft", "critique", "check", "revision"}
        assert not passes(e["draft"], e["check"]), e["request"]
        task = as_task(e)
        assert s5.revision_checks(e["revision"], task)["passed"], e["request"]
        assert s5.meta_prefix(e["revision"], e["draft"], e["check"]) is None
        assert degenerate_reason(e["revision"]) is None
        kinds |= {c["kind"] for c in e["check"]}
    from core.constraints import KINDS

    assert set(KINDS) <= kinds, sorted(set(KINDS) - kinds)


def test_judge_exemplars_are_balanced_and_right():
    sides = [e["better"] for e in POOL["judge_exemplars"]]
    assert sides.count("A") == sides.count("B") >= 2
    for e in POOL["judge_exemplars"]:
        task = as_task(e)
        better = e["revision_" + e["better"].lower()]
        worse = e["revision_" + ("b" if e["better"] == "A" else "a")]
        assert s5.assessed_item(task, better)["passed"], e["request"]
        assert not s5.assessed_item(task, worse)["passed"], e["request"]


def test_tasks_drafts_fail_their_checks():
    for t in POOL["tasks"]:
        assert set(t) == {"request", "draft", "critique", "check"}
        assert not passes(t["draft"], t["check"]), t["request"]
        assert degenerate_reason(t["draft"]) is None


def test_requests_are_distinct():
    requests = ([e["request"] for e in POOL["revision_exemplars"]]
                + [e["request"] for e in POOL["judge_exemplars"]]
                + [t["request"] for t in POOL["tasks"]] + POOL["requests"])
    for a, b in combinations(requests, 2):
        assert rouge_l(a, b) <= RunSettings().near_duplicate, (a, b)


def test_tasks_copy_no_exemplar():
    exemplars = s5.exemplar_texts(POOL)
    for t in POOL["tasks"]:
        assert not copies_exemplar(t["draft"], exemplars), t["request"]
        assert not copies_exemplar(t["request"], exemplars), t["request"]


def test_no_overlap_with_evaluation_text():
    index = contamination.evaluation_index(PROJECT_ROOT.parent / "shared" / "data", [])
    for text in strings(POOL):
        assert index.first_hit(text) is None, (text, index.first_hit(text))
    for t in POOL["tasks"]:  # the training prompt as a whole
        assert index.first_hit(as_task(t).text) is None, t["request"]
