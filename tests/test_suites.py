"""Assessment suites: the baseline probes' scorers on hand-written responses, and each suite run
on the tiny model."""
import pytest

from core.guards import TemplateGuard
from core.suites import baseline as b
from core.suites.runner import compare_results, run_suite
from tests.conftest import ROOT

DATA = ROOT.parent / "shared" / "data"


def test_probe_set_is_stable_and_hashed():
    probes, exemplars, sha = b.load_probes()
    again = b.load_probes()
    assert sha == again[2] and len(sha) == 64
    assert {p.capability for p in probes} == set(b.CAPABILITIES)
    assert all(p.text for p in probes)


def test_bare_question_scorer():
    spec = {"accept": ["Canberra"]}
    assert b.score_bare_question("The capital of Australia is Canberra.", spec)
    assert not b.score_bare_question("What is the capital of New Zealand?", spec)  # continues
    assert not b.score_bare_question("Sydney.", spec)


def test_generation_scorer():
    spec = {"count": 3, "item": "question", "topic": ["volcano"]}
    good = "1. Why do volcanoes erupt?\n2. What is lava made of?\n3. Where is the largest volcano?"
    assert b.score_generation(good, spec)
    assert not b.score_generation(good.rsplit("\n", 1)[0], spec)  # two items
    assert not b.score_generation("1. Why?\n2. Why?\n3. Why? volcano", spec)  # duplicates


def test_revision_scorer():
    spec = {"response": "The sun, slowly, sinks below the hills.", "check": {"kind": "no_commas", "params": {}}}
    assert b.score_revision("The sun slowly sinks below the hills.", spec)
    assert not b.score_revision("The sun, slowly, sinks below the hills.", spec)  # unchanged
    assert not b.score_revision("Bananas are yellow fruit", spec)  # lost the content


def test_refusal_scorers():
    assert b.score_harmful("I'm sorry, but I can't help with that.", {})
    assert not b.score_harmful("Step one: find an open window.", {})
    assert b.score_benign("Use `kill -9 PID` to stop the process.", {})
    assert not b.score_benign("I cannot assist with killing.", {})


def test_compare_results_pairs_items_by_id():
    before = {"items": [{"id": f"x{i}", "capability": "c", "passed": False} for i in range(8)]}
    after = {"items": [{"id": f"x{i}", "capability": "c", "passed": True} for i in range(8)]}
    result = compare_results(before, after)["c"]
    assert result["gained"] == 8 and result["lost"] == 0 and result["p_value"] < 0.01


@pytest.mark.parametrize("suite", ["baseline", "fewshot-reference"])
def test_baseline_suites_run_on_the_tiny_model(tiny_backend, tmp_path, suite):
    result = run_suite(suite, tiny_backend, TemplateGuard(tiny_backend.tokenizer),
                       tmp_path / "cache.jsonl", 2, 16, 16)
    assert set(result["summary"]) == set(b.CAPABILITIES)
    assert all(row["n"] == 2 and len(row["ci95"]) == 2 for row in result["summary"].values())
    judging = [i for i in result["items"] if i["capability"] == "judging"]
    assert all(len(i["picked"]) == 2 for i in judging)
    assert result["probes_sha256"] == b.load_probes()[2]


@pytest.mark.skipif(not DATA.is_dir(), reason="shared IFEval data absent")
def test_ifeval_suite_runs_offline_on_the_tiny_model(tiny_backend, tmp_path):
    result = run_suite("ifeval", tiny_backend, TemplateGuard(tiny_backend.tokenizer),
                       tmp_path / "cache.jsonl", 3, 16, 16, DATA)
    assert result["summary"]["prompt_level_strict"]["n"] == 3
    assert {"prompt_level_loose", "instruction_level_strict", "instruction_level_loose"} <= set(result["summary"])
    assert len(result["items"]) == 3


def test_ifeval_suite_without_data_says_where_to_get_it(tiny_backend, tmp_path):
    with pytest.raises(FileNotFoundError, match="google/IFEval"):
        run_suite("ifeval", tiny_backend, TemplateGuard(tiny_backend.tokenizer),
                  tmp_path / "cache.jsonl", 3, 16, 16, tmp_path)
