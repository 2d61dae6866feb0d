"""Stage 2 end to end on the tiny model, with the shared question sets: interface files, guards,
zero-shot training prompts and the held-out split."""
import json
from pathlib import Path

import pytest

from core.constitution import load_constitution
from core.context import StageContext
from core.guards import TemplateGuard
from core.models import PROJECT_ROOT
from registry.models import profile_by_name
from stages import stage2_implicit_instructions as s2

pytestmark = pytest.mark.slow


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def stage(tmp_path_factory, tiny_dir) -> Path:
    run_dir = tmp_path_factory.mktemp("stage2") / "run"
    ctx = StageContext(run_dir=run_dir, number=s2.NUMBER, model_path=str(tiny_dir), origin="test",
                       profile=profile_by_name("tiny-qwen2"), seed=0, limit=6, heldout=4,
                       constitution=load_constitution(PROJECT_ROOT / "constitution.yaml"),
                       data_dir=PROJECT_ROOT.parent / "shared" / "data")
    s2.run(ctx)
    return run_dir / "stage_2"


def test_interface_files(stage):
    for name in ("DONE", "questions.jsonl", "responses.jsonl", "scores.jsonl", "judgments.jsonl",
                 "pairs_candidates.jsonl", "pairs_dropped.jsonl", "pairs.jsonl", "metrics.json",
                 "report.md", "contamination.tsv", "adapter/adapter_config.json",
                 "merged/config.json"):
        assert (stage / name).exists(), name
    metrics = json.loads((stage / "metrics.json").read_text())
    assert metrics["dpo"]["steps"] > 0
    assert metrics["assessment"]["headline"] == "answer_rate"
    for side in ("before", "after"):
        summary = metrics["assessment"][side]["summary"]
        assert {"answer_rate", "on_topic", "non_degenerate"} <= set(summary)
        assert summary["answer_rate"]["n"] == metrics["data"]["tasks_heldout"] == 4
    assert metrics["data"]["tasks_train"] == 6


def test_pairs_are_clean_and_zero_shot(stage, tiny_backend):
    guard = TemplateGuard(tiny_backend.tokenizer)
    pool = s2.load_pool()
    exemplar_questions = [e["question"] for e in pool["answer_exemplars"]]
    pairs = lines(stage / "pairs.jsonl")
    assert pairs and all({"prompt", "chosen", "rejected", "task_id"} <= set(p) for p in pairs)
    questions = {t["id"]: t["question"] for t in lines(stage / "questions.jsonl")}
    for pair in pairs:
        guard.check_record(pair, "pairs.jsonl")
        assert pair["prompt"] == s2.house_prompt(questions[pair["task_id"]])
        assert pair["prompt"].count("Instruction:") == 1 and "###" not in pair["prompt"]
        assert not any(q in pair["prompt"] for q in exemplar_questions)
        assert s2.check_answer(questions[pair["task_id"]], pair["chosen"])["problem"] is None
        assert s2.check_answer(questions[pair["task_id"]], pair["rejected"])["problem"] is not None


def test_heldout_never_trains(stage):
    tasks = lines(stage / "questions.jsonl")
    held = {t["id"]: t["question"] for t in tasks if t["split"] == "heldout"}
    real_sets_read = any(t["source"] != "generated" for t in tasks)
    assert held and real_sets_read == (PROJECT_ROOT.parent / "shared" / "data").is_dir()
    for task in tasks:
        if task["source"] != "generated":
            assert (task["split"] == "heldout") == s2.is_heldout_item(task["id"])
    for pair in lines(stage / "pairs.jsonl"):
        assert pair["task_id"] not in held
        assert not any(q in pair["prompt"] for q in held.values())


def test_merged_model_loads(stage):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(stage / "merged"))
    assert model.config.model_type == "qwen2"
