"""Stage 6 end to end on the tiny model in a temporary run directory.

The tiny random model cannot judge: its A/B margins are pure position bias (equal and opposite
in the two orders), so no revision wins in both orders and the stage, correctly, stops with a
RuntimeError at the pairs step. To exercise everything after the judge, this test runs the real
judge_many (prompts, guards, batching) and then replaces its verdicts with a fixed content rule:
the revision wins in both orders when it uses more distinct words than the original.
"""
import json
from dataclasses import replace

import pytest

from core import judge
from core.constitution import load_constitution
from core.context import StageContext
from core.guards import TemplateGuard
from core.models import PROJECT_ROOT
from core.prompting import house_prompt
from registry.models import profile_by_name
from stages import stage6_constitutional as s6

pytestmark = pytest.mark.slow


def more_words_judge(backend, guard, items, batch_size, where):
    judge.judge_many(backend, guard, items, batch_size, where)  # built, guarded and run for real
    verdicts = []
    for _, _, revision, original in items:
        gain = len(set(revision.split())) - len(set(original.split()))
        verdicts.append(judge.Verdict("x", gain, gain) if gain > 0 else
                        judge.Verdict("tie", gain, -gain))
    return verdicts


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def stage(tmp_path_factory, tiny_dir):
    run_dir = tmp_path_factory.mktemp("stage6") / "run"
    log: list[str] = []
    profile = replace(profile_by_name("tiny-qwen2"), responses_per_task=2, max_new_tokens=24)
    ctx = StageContext(run_dir=run_dir, number=s6.NUMBER, model_path=str(tiny_dir), origin="test",
                       profile=profile, seed=0, limit=6, heldout=4,
                       constitution=load_constitution(PROJECT_ROOT / "constitution.yaml"),
                       data_dir=PROJECT_ROOT.parent / "shared" / "data", log=log.append)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(s6, "judge_many", more_words_judge)
        s6.run(ctx)
    return ctx.stage_dir, log


def test_stage_finishes_with_pairs(stage):
    stage_dir, _ = stage
    assert (stage_dir / "DONE").is_file()
    pairs = read(stage_dir / "pairs.jsonl")
    assert pairs and all({"prompt", "chosen", "rejected", "task_id", "principles"} <= set(p) for p in pairs)
    assert len({p["task_id"] for p in pairs}) == len(pairs)


def test_pairs_pass_the_guard_and_train_on_zero_shot_prompts(stage, tiny_backend):
    stage_dir, _ = stage
    guard = TemplateGuard(tiny_backend.tokenizer)
    tasks = {t["id"]: t for t in read(stage_dir / "instructions.jsonl")}
    constitution = load_constitution(PROJECT_ROOT / "constitution.yaml")
    exemplars = [e for e in s6.exemplar_texts(s6.load_pool(), constitution) if len(e) > 30]
    for pair in read(stage_dir / "pairs.jsonl"):
        guard.check_record(pair, "pairs.jsonl")
        assert pair["prompt"] == house_prompt(tasks[pair["task_id"]]["instruction"])
        assert pair["prompt"].count("Instruction:") == 1 and "###" not in pair["prompt"]
        assert "Critique request:" not in pair["prompt"]
        assert not any(e in pair["prompt"] for e in exemplars)


def test_every_pair_names_two_distinct_principles(stage):
    stage_dir, _ = stage
    names = {p.name for p in load_constitution(PROJECT_ROOT / "constitution.yaml").principles}
    for path in ("pairs_candidates.jsonl", "pairs.jsonl"):
        for pair in read(stage_dir / path):
            assert len(pair["principles"]) == 2 and len(set(pair["principles"])) == 2
            assert set(pair["principles"]) <= names


def test_heldout_never_trains(stage):
    stage_dir, _ = stage
    tasks = read(stage_dir / "instructions.jsonl")
    held = [t for t in tasks if t["split"] == "heldout"]
    assert {t["kind"] for t in held} == {"redteam", "helpful", "benign"}
    for pair in read(stage_dir / "pairs.jsonl"):
        assert pair["task_id"] not in {t["id"] for t in held}
        assert not any(t["instruction"] in pair["prompt"] for t in held)
    for t in tasks:  # shared red-team items come from the right fixed part of their set
        if t["source"] in s6.REDTEAM_SETS:
            assert s6.in_heldout_part(t["source"], t["source_id"]) == (t["split"] == "heldout")


def test_redteam_prompt_text_never_reaches_the_log(stage):
    stage_dir, log = stage
    text = "\n".join(log)
    for t in read(stage_dir / "instructions.jsonl"):
        if t["kind"] == "redteam":
            assert t["instruction"] not in text


def test_merged_model_and_metrics(stage):
    from transformers import AutoModelForCausalLM

    stage_dir, _ = stage
    assert AutoModelForCausalLM.from_pretrained(str(stage_dir / "merged")).config.model_type == "qwen2"
    metrics = json.loads((stage_dir / "metrics.json").read_text())
    assert metrics["dpo"]["steps"] > 0
    assessment = metrics["assessment"]
    assert assessment["headline"] == "harmless_rate"
    for side in ("before", "after"):
        summary = assessment[side]["summary"]
        assert set(summary) == {"harmless_rate", "helpful_answered", "benign_answered", "over_refusal"}
        assert summary["harmless_rate"]["n"] == 2 and summary["helpful_answered"]["n"] == 2
        assert summary["benign_answered"]["n"] == len(s6.load_pool()["benign_lookalikes"])
    assert metrics["data"]["pairs"] == len(read(stage_dir / "pairs.jsonl"))
    assert "principles_in_pairs" in metrics["data"]
