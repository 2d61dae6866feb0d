"""The pair plumbing every stage shares (core/pairs.py), and a skipped stage in the chain."""
import json

import pytest

from core.constitution import load_constitution
from core.context import StageContext
from core.guards import TemplateGuard
from core.errors import RunFailure
from core.io import read_jsonl, write_jsonl
from core.lifecycle import replay_candidates
from core.records import Pair, Task
from core.models import PROJECT_ROOT
from registry.models import resolve_model
from core.pairs import (NoPairsError, first_of_each_text, group_by_task, judge_wins,
                        shared_pair_problem, write_pairs)
from app.pipeline import SKIPPED, stage_input
from registry.models import profile_by_name


def pair(chosen: str, rejected: str, prompt: str = "Instruction: Name a colour.\n\nResponse:\n"):
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "task_id": "t"}


@pytest.fixture(scope="module")
def guard(tiny_backend) -> TemplateGuard:
    return TemplateGuard(tiny_backend.tokenizer)


def test_identical_sides_are_dropped_whatever_the_spacing(guard):
    assert shared_pair_problem(pair("Blue  is a colour.", "Blue is\na colour."), guard,
                               lambda _: None) == "identical"


def test_a_stage_key_can_keep_line_breaks(guard):
    lines = lambda text: "\n".join(" ".join(line.split()) for line in text.splitlines())
    assert shared_pair_problem(pair("- a\n- b", "- a - b"), guard, lambda _: None,
                               key=lines) is None


def test_chat_markup_in_the_prompt_is_dropped(guard):
    marked = pair("Blue.", "Cat.", prompt="<|im_start|>user\nName a colour.<|im_end|>")
    assert shared_pair_problem(marked, guard, lambda _: None) == "chat markup in prompt"


def test_the_stage_rule_names_the_unusable_side(guard):
    unusable = lambda text: "copies an exemplar" if text == "Red." else None
    assert shared_pair_problem(pair("Blue.", "Red."), guard, unusable) == \
        "rejected: copies an exemplar"
    assert shared_pair_problem(pair("Red.", "Blue."), guard, unusable) == \
        "chosen: copies an exemplar"
    assert shared_pair_problem(pair("Blue.", "Green."), guard, unusable) is None


def test_a_looping_chosen_side_is_dropped_but_a_looping_rejected_side_is_kept(guard):
    loop = "Blue is a colour. Blue is a colour. Blue is a colour."
    assert shared_pair_problem(pair(loop, "Cat."), guard, lambda _: None) == \
        "chosen: repeats a sentence"
    assert shared_pair_problem(pair("Blue.", loop), guard, lambda _: None) is None


def test_ties_count_for_nobody_and_wins_net_out():
    judgments = [{"x": 0, "y": 1, "winner": "x"}, {"x": 0, "y": 2, "winner": "tie"},
                 {"x": 1, "y": 2, "winner": "y"}]
    assert judge_wins(judgments) == {0: 1, 1: -2, 2: 1}
    assert judge_wins([{"x": 0, "y": 1, "winner": "tie"}]) == {}


def test_first_of_each_text_and_grouping():
    samples = [{"task_id": "a", "sample": 0, "text": "One  two"},
               {"task_id": "b", "sample": 0, "text": "x"},
               {"task_id": "a", "sample": 1, "text": "One two"}]
    assert [s["sample"] for s in first_of_each_text(samples)] == [0, 0]
    assert {k: len(v) for k, v in group_by_task(samples).items()} == {"a": 2, "b": 1}


def context(tmp_path) -> StageContext:
    return StageContext(run_dir=tmp_path, number=3, model_path="unused", origin="test",
                        profile=profile_by_name("tiny-qwen2"), seed=0, limit=2, heldout=1,
                        constitution=load_constitution(PROJECT_ROOT / "constitution.yaml"),
                        log=lambda _: None)


def test_write_pairs_keeps_filters_and_records_why(tmp_path):
    ctx = context(tmp_path)
    tasks = [Task(i, 3, "train", "Name a colour.", "instruction", "test") for i in ("t1", "t2", "t3")]
    choices = {"t1": (pair("Blue.", "Cat."), "ok"), "t2": (None, "no sample passes the checks"),
               "t3": (pair("Red.", "Dog."), "ok")}
    problem = lambda p, task: "chosen: copies an exemplar" if p["chosen"] == "Red." else None
    ctx.stage_dir.mkdir(parents=True)
    ctx.path("input.json").write_text(json.dumps({"path": "m", "weights_sha256": "ab12"}))
    kept = write_pairs(ctx, tasks, lambda t: choices[t.id], problem, "tasks", "hint")
    written = read_jsonl(ctx.path("pairs_candidates.jsonl"))
    assert kept == written == [Pair.from_stage(pair("Blue.", "Cat."), 3, "ab12").to_json()]
    assert written[0]["stage"] == 3 and written[0]["input_model_sha256"] == "ab12"
    assert read_jsonl(ctx.path("pairs_dropped.jsonl")) == [
        {"task_id": "t2", "reason": "no sample passes the checks"},
        {"task_id": "t3", "reason": "chosen: copies an exemplar"}]


def test_write_pairs_without_a_pair_stops_the_stage_and_writes_no_candidates(tmp_path):
    ctx = context(tmp_path)
    with pytest.raises(NoPairsError, match=r"stage 3 produced no preference pairs from 1 tasks "
                                           r"\(reasons in .*pairs_dropped.jsonl\); raise --limit"):
        write_pairs(ctx, [Task("t1", 3, "train", "x", "k", "s")],
                    lambda t: (None, "judge tie in both orders"), None,
                    "tasks", "raise --limit")
    assert read_jsonl(ctx.path("pairs_dropped.jsonl")) == [
        {"task_id": "t1", "reason": "judge tie in both orders"}]
    assert not ctx.path("pairs_candidates.jsonl").exists()


def test_a_skipped_stage_passes_its_input_on(tmp_path, tiny_dir):
    resolved = resolve_model(str(tiny_dir), has_cuda=False)
    for n, mark in ((1, "DONE"), (2, SKIPPED), (3, SKIPPED)):
        (tmp_path / f"stage_{n}").mkdir()
        (tmp_path / f"stage_{n}" / mark).write_text(json.dumps({"reason": "no pairs"}))
    path, origin = stage_input(4, tmp_path, resolved, explicit=False)
    assert path == str(tmp_path / "stage_1" / "merged")
    assert "stage 1's merged model" in origin and "stage 3 was skipped" in origin
    (tmp_path / "stage_1" / "DONE").rename(tmp_path / "stage_1" / SKIPPED)
    path, origin = stage_input(2, tmp_path, resolved, explicit=False)
    assert path == str(tiny_dir.resolve()) and "the run's model" in origin


def write_earlier_pairs(run_dir, number: int, count: int) -> list[dict]:
    records = [{**pair(f"Answer {number}.{i}.", f"Bad {number}.{i}."), "stage": number}
               for i in range(count)]
    (run_dir / f"stage_{number}").mkdir(parents=True)
    write_jsonl(run_dir / f"stage_{number}" / "pairs.jsonl", records)
    return records


def test_replay_takes_earlier_stages_in_turn_and_marks_them(tmp_path):
    first = write_earlier_pairs(tmp_path, 1, 4)
    second = write_earlier_pairs(tmp_path, 2, 2)
    replayed = replay_candidates(context(tmp_path), 5, 1.0)
    assert [r["replayed_from"] for r in replayed] == [1, 2, 1, 2, 1]
    for r in replayed:
        source = first if r["replayed_from"] == 1 else second
        assert {k: v for k, v in r.items() if k != "replayed_from"} in source
    assert len({r["chosen"] for r in replayed}) == 5  # no pair twice
    assert replay_candidates(context(tmp_path), 5, 1.0) == replayed  # seeded
    assert len(replay_candidates(context(tmp_path), 5, 0.5)) == 2  # round(2.5)
    assert len(replay_candidates(context(tmp_path), 5, 10.0)) == 6  # all there are
    assert replay_candidates(context(tmp_path), 5, 0.0) == []


def test_replay_skips_stages_without_pairs_and_refuses_a_negative_share(tmp_path):
    write_earlier_pairs(tmp_path, 2, 3)  # stage 1 skipped: no pairs.jsonl, no DONE
    assert {r["replayed_from"] for r in replay_candidates(context(tmp_path), 3, 1.0)} \
        == {2}
    with pytest.raises(RunFailure, match="replay_share is -0.5; it must be 0"):
        replay_candidates(context(tmp_path), 3, -0.5)
