"""Stage 4 end to end on the tiny model, run alone (pool pairs; HH-RLHF held-out pairs from the
shared data).

The tiny model writes near-gibberish: it almost never starts a line with "A." or "B.", so its own
verdicts give no pair and the stage stops at `pairs` with a RuntimeError that says so. The test
checks that, then stands in for a model that can write verdicts but is position-biased: it
replaces the verdicts with hand-written ones that say "A" in both orders (plus a tie) and resumes
the stage. Rescoring turns them into pairs in both orders (the better-second order borrows the
other order's reason, which names no position), carried through decontaminate, train, merge,
assess and report."""
import json
from dataclasses import replace
from pathlib import Path

import pytest

from core.constitution import load_constitution
from core.context import StageContext
from core.guards import TemplateGuard
from core.models import PROJECT_ROOT
from registry.models import profile_by_name
from stages import stage4_evaluation_tasks as module

pytestmark = pytest.mark.slow
DATA_DIR = PROJECT_ROOT.parent / "shared" / "data"
HAS_DATA = (DATA_DIR / module.HH_PATH).is_file()
REASON = "It does what the request asks, and the other one falls short of it."


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def context(run_dir: Path, tiny_dir: Path) -> StageContext:
    # One epoch and four verdicts per task keep the test short; the rules do not depend on them.
    profile = replace(profile_by_name("tiny-qwen2"), epochs=1, responses_per_task=4)
    return StageContext(run_dir=run_dir, number=module.NUMBER, model_path=str(tiny_dir),
                        origin="test", profile=profile, seed=0, limit=6, heldout=4,
                        constitution=load_constitution(PROJECT_ROOT / "constitution.yaml"),
                        data_dir=PROJECT_ROOT.parent / "shared" / "data")


def position_biased_verdicts(stage: Path) -> list[dict]:
    verdicts = []
    for task in lines(stage / "instructions.jsonl"):
        if task["split"] == "train":
            for k, text in enumerate([f"A. {REASON}", "A tie: both are fine."]):
                verdicts.append({"task_id": task["id"], "sample": k, "text": text,
                                 "finish": "stop"})
    return verdicts


@pytest.fixture(scope="module")
def stage(tmp_path_factory, tiny_dir) -> Path:
    run_dir = tmp_path_factory.mktemp("stage4") / "run"
    folder = run_dir / "stage_4"
    try:
        module.run(context(run_dir, tiny_dir))
    except RuntimeError as error:
        assert "produced no preference pairs" in str(error)
        assert not (folder / "DONE").exists() and (folder / "steps" / "scores.done").exists()
        assert len(lines(folder / "verdicts.jsonl")) == 12 * 4  # 6 pairs x 2 orders x 4 verdicts
        (folder / "verdicts.jsonl").write_text(
            "".join(json.dumps(v) + "\n" for v in position_biased_verdicts(folder)))
        (folder / "steps" / "scores.done").unlink()
        module.run(context(run_dir, tiny_dir))
    return folder


def test_stage_finishes_with_pairs(stage):
    assert (stage / "DONE").is_file()
    pairs = lines(stage / "pairs.jsonl")
    assert pairs and all({"prompt", "chosen", "rejected", "task_id", "pair_id", "label"} <= set(p)
                         for p in pairs)
    assert {p["label"] for p in pairs} == {"A", "B"}  # both orders of the labelled pairs
    for pair in pairs:
        assert module.parse_verdict(pair["chosen"])[0] == pair["label"]
        assert module.parse_verdict(pair["rejected"])[0] != pair["label"]
    labelled = lines(stage / "labelled.jsonl")
    assert sum(p["split"] == "train" for p in labelled) == 6
    assert sum(p["split"] == "heldout" for p in labelled) == 4


def test_pairs_pass_the_guard_and_prompts_are_zero_shot(stage, tiny_dir):
    from transformers import AutoTokenizer

    guard = TemplateGuard(AutoTokenizer.from_pretrained(str(tiny_dir)))
    shots = module.exemplar_texts(module.load_pool())
    for pair in lines(stage / "pairs.jsonl"):
        guard.check_record(pair, "pairs.jsonl")
        prompt = pair["prompt"]
        assert prompt.startswith("Instruction: Here is a request and two responses.")
        assert prompt.count("Instruction:") == 1 and prompt.count("\nResponse:\n") == 1
        assert "###" not in prompt and not any(shot in prompt for shot in shots)


def test_heldout_pairs_never_train(stage):
    held = [p for p in lines(stage / "labelled.jsonl") if p["split"] == "heldout"]
    pairs = lines(stage / "pairs.jsonl")
    assert not {p["id"] for p in held} & {p["pair_id"] for p in pairs}
    for pair in pairs:
        assert not any(h["request"] in pair["prompt"] for h in held)
    train_tasks = [t for t in lines(stage / "instructions.jsonl") if t["split"] == "train"]
    assert not {p["id"] for p in held} & {t["pair_id"] for t in train_tasks}


def test_merged_model_loads(stage):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(stage / "merged"))
    assert model.config.model_type == "qwen2"


def test_metrics_and_assessment(stage):
    metrics = json.loads((stage / "metrics.json").read_text())
    assert metrics["stage"] == 4 and metrics["name"] == "evaluation-tasks"
    assert metrics["dpo"]["steps"] > 0
    assessment = metrics["assessment"]
    assert assessment["headline"] == "accuracy_both_orders"
    for side in ("before", "after"):
        summary = assessment[side]["summary"]
        assert summary["accuracy_both_orders"]["n"] == 4
        assert {"accuracy_better_first", "accuracy_better_second", "verdict_parsed",
                "reason_ok"} <= set(summary)
        hh_items = [i for i in assessment[side]["items"] if i["id"].startswith("hh-")]
        if not HAS_DATA:  # the HH-RLHF held-out set is read only when the shared data exists
            assert not hh_items and "hh_accuracy_both_orders" not in summary
            continue
        assert summary["hh_accuracy_both_orders"]["n"] == 4
        assert set(assessment[side]["position_bias_gap"]) == {"labelled", "hh"}
        assert len(hh_items) == 4 and all(i["passed"] is None for i in hh_items)
        assert all("text" not in i["better_first"] for i in hh_items)
    assert assessment["paired"]["items"] == 4
    assert metrics["data"]["hh_heldout"] == (4 if HAS_DATA else 0)
    assert "Stage 4: evaluation-tasks" in (stage / "report.md").read_text()
