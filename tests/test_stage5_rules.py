"""Stage 5's task, check, judgment and pair rules on hand-written cases (no model generation)."""
import json
from dataclasses import replace

import pytest
import torch

from core.constraints import constraint_from_dict
from core.errors import NoPairsError, RunFailure
from core.guards import TemplateGuard
from core.io import write_jsonl
from core.judge import judge_many, option_token_ids
from core.prompting import house_prompt
from core.records import TASKS_FILE, Task, read_tasks, write_tasks
from stages import stage5_revision_tasks as s5

NO_COMMAS = [{"kind": "no_commas", "params": {}}]
LOWER = [{"kind": "lowercase", "params": {}}]
DRAFT = "Rain falls from the clouds, soaks the fields, and fills the rivers on its way to the sea."
FIXED = "Rain falls from the clouds and soaks the fields. It fills the rivers on its way to the sea."
MISSED = "Rain falls from the clouds, soaks the fields, and fills every river on its way to the sea."
EXEMPLAR = s5.load_pool()["revision_exemplars"][0]["revision"]


def task(checks=NO_COMMAS, draft=DRAFT):
    return s5.make_task("Describe what happens to rain.", draft, checks, "pool")


@pytest.fixture(scope="module")
def guard(tiny_backend):
    return TemplateGuard(tiny_backend.tokenizer)


def scored(i, text, t, guard, exemplars=()):
    return {"task_id": t.id, "sample": i, "text": text,
            **s5.score_revision(text, t, guard, list(exemplars))}


def judgment(x, y, winner, xy=1.0, yx=1.0):
    return {"task_id": "r", "x": x, "y": y, "passer": x, "winner": winner,
            "margin_xy": xy, "margin_yx": yx}


# prompts and critiques ---------------------------------------------------------------------------

def test_critique_names_the_failed_constraints():
    one = s5.critique_for(NO_COMMAS)
    assert one == ("The response does not follow this requirement: Do not use any commas in your "
                   "response. Rewrite it so that it does, keeping its content.")
    two = s5.critique_for(NO_COMMAS + LOWER)
    assert two.startswith("The response does not follow these requirements: Do not use any commas")
    assert "lowercase letters" in two


def test_task_record():
    t = task()
    assert (t.stage, t.split, t.kind, t.source) == (5, "train", "revision", "pool")
    assert t.text == s5.revision_text("Describe what happens to rain.", DRAFT,
                                      s5.critique_for(NO_COMMAS))
    assert t.extra == {"request": "Describe what happens to rain.", "draft": DRAFT,
                       "critique": s5.critique_for(NO_COMMAS), "checks": NO_COMMAS,
                       "origin": None}
    assert t.id == task(LOWER).id != task(draft=MISSED).id  # the id hashes request and draft


def test_training_prompt_is_zero_shot_house_format():
    prompt = house_prompt(task().text)
    assert prompt.startswith("Instruction: Rewrite the draft so that it follows the critique.\n\n"
                             "Request: Describe what happens to rain.\n\nDraft: Rain falls")
    assert prompt.endswith("keeping its content.\n\nResponse:\n")
    assert prompt.count("Instruction:") == 1 and prompt.count("Response:") == 1
    assert "###" not in prompt


# checks ------------------------------------------------------------------------------------------

def test_revision_checks():
    t = task()
    good = s5.revision_checks(FIXED, t)
    assert good["passed"] and good["fixes_critique"] and good["keeps_content"] and good["changed"]
    missed = s5.revision_checks(MISSED, t)
    assert not missed["passed"] and missed["keeps_content"] and not missed["fixes_critique"]
    unrelated = s5.revision_checks("Cats sleep most of the day in warm sunny spots.", t)
    assert unrelated["fixes_critique"] and not unrelated["keeps_content"] and not unrelated["passed"]
    copy = s5.revision_checks(DRAFT + "  ", t)
    assert not copy["changed"] and not copy["passed"]
    two_paragraphs = [{"kind": "paragraph_count", "params": {"n": 2}}]
    split = s5.revision_checks("Rain falls.\n\nIt fills the rivers.",
                               task(two_paragraphs, "Rain falls. It fills the rivers."))
    assert split["changed"] and split["passed"]  # a paragraph break is a change
    assert s5.revision_checks("Cats sleep most of the day in warm sunny spots.", t,
                              keeps_content=0.0)["passed"]  # the threshold is a setting


@pytest.mark.parametrize("text", [
    "Here is a revised response: Rain falls from the clouds and soaks the fields.",
    "Here's the rewritten version without commas. Rain falls from the clouds.",
    "Revised response: Rain falls from the clouds and soaks the fields.",
    "Sure, rain falls from the clouds and soaks the fields.",
    "Certainly! Rain falls from the clouds and soaks the fields.",
    "I have rewritten it. Rain falls from the clouds and soaks the fields.",
])
def test_meta_prefix_revisions_are_unusable(text, guard):
    assert s5.meta_prefix(text, DRAFT, NO_COMMAS)
    assert s5.unusable_reason(text, task(), guard, []).startswith("meta-prefix")


def test_prefixes_the_critique_demands_or_the_draft_had_are_content():
    start = [{"kind": "start_with", "params": {"phrase": "Sure, here is what you asked for:"}}]
    assert s5.meta_prefix("Sure, here is what you asked for: rain falls.", DRAFT, start) is None
    assert s5.meta_prefix("Sure, here is what you asked for: here is a revised one.", DRAFT,
                          start)
    assert s5.meta_prefix("Sure, it rains a lot here.", "Sure, it rains, a lot, here.",
                          NO_COMMAS) is None
    assert s5.meta_prefix(FIXED, DRAFT, NO_COMMAS) is None
    assert s5.meta_prefix("Here is my answer: rain falls.", DRAFT, NO_COMMAS) is None


def test_unusable_revisions(guard):
    t = task()
    assert s5.unusable_reason(FIXED, t, guard, [EXEMPLAR]) is None
    assert s5.unusable_reason(EXEMPLAR, t, guard, [EXEMPLAR]) == "copies an exemplar"
    assert s5.unusable_reason("Rain falls.\nCritique: no commas", t, guard, []) \
        == "prompt scaffolding"
    assert s5.unusable_reason("Rain falls.\nTask 5: Write a poem", t, guard, []) \
        == "prompt scaffolding"
    assert s5.unusable_reason("<|im_start|>assistant rain", t, guard, []) == "chat markup"
    assert s5.unusable_reason("  ", t, guard, []) == "empty"


def test_draft_problems(guard):
    assert s5.draft_problem(DRAFT, guard, [EXEMPLAR]) is None
    assert s5.draft_problem(EXEMPLAR, guard, [EXEMPLAR]) == "copies an exemplar"
    assert s5.draft_problem("Rain.\nResponse: more", guard, []) == "prompt scaffolding"


# pairs -------------------------------------------------------------------------------------------

def samples_for(t, guard, texts, exemplars=()):
    return [scored(i, text, t, guard, exemplars) for i, text in enumerate(texts)]


def test_chosen_passes_and_wins_both_orders(guard):
    t = task()
    samples = samples_for(t, guard, [MISSED, FIXED])
    pair, reason = s5.choose_pair(t, samples, [judgment(1, 0, "x")])
    assert reason == "ok"
    assert pair["chosen"] == FIXED and pair["rejected"] == MISSED
    assert pair["prompt"] == house_prompt(t.text) and pair["checks"] == NO_COMMAS
    assert pair["rejected_keeps_content"] is True


def test_tie_is_dropped(guard):
    t = task()
    samples = samples_for(t, guard, [MISSED, FIXED])
    pair, reason = s5.choose_pair(t, samples, [judgment(1, 0, "tie", 0.5, -0.3)])
    assert pair is None and reason == "judge tie (orders disagree)"


def test_judge_preferring_the_failing_revision_is_dropped(guard):
    t = task()
    samples = samples_for(t, guard, [MISSED, FIXED])
    pair, reason = s5.choose_pair(t, samples, [judgment(1, 0, "y", -1, -1)])
    assert pair is None and reason == "judge prefers the failing revision"


def test_identical_pair_is_dropped(guard):
    t = task()
    pair = {"prompt": house_prompt(t.text), "chosen": FIXED, "rejected": FIXED + " "}
    assert s5.pair_problem(pair, t, guard, []) == "identical"
    # the same text sampled twice counts once
    samples = samples_for(t, guard, [FIXED, FIXED + "\n"])
    assert s5.choose_pair(t, samples, [])[1] == "no failing revision (no rejected)"


def test_meta_prefix_revision_is_never_chosen(guard):
    t = task()
    samples = samples_for(t, guard, [MISSED, "Here is a revised response: " + FIXED])
    assert samples[1]["passed"] and samples[1]["unusable"]
    assert s5.choose_pair(t, samples, [judgment(1, 0, "x")])[1] == "no revision passes the checks"
    pair = {"prompt": "Instruction: x\n\nResponse:\n", "chosen": "Sure, " + FIXED,
            "rejected": MISSED}
    assert s5.pair_problem(pair, t, guard, []).startswith("chosen: meta-prefix")


def test_copied_exemplar_is_never_chosen(guard):
    t = task(LOWER, EXEMPLAR.capitalize())
    samples = samples_for(t, guard, [EXEMPLAR.capitalize() + " Indeed.", EXEMPLAR], [EXEMPLAR])
    assert samples[1]["passed"] and samples[1]["unusable"] == "copies an exemplar"
    assert s5.choose_pair(t, samples, [judgment(1, 0, "x")])[1] == "no revision passes the checks"
    pair = {"prompt": "Instruction: x\n\nResponse:\n", "chosen": EXEMPLAR, "rejected": MISSED}
    assert s5.pair_problem(pair, t, guard, [EXEMPLAR]) == "chosen: copies an exemplar"


def test_rejected_prefers_a_revision_that_keeps_content_but_misses_the_fix(guard):
    t = task()
    samples = samples_for(t, guard, ["Snow is cold, white, and soft.", FIXED, MISSED])
    assert s5.rejected_revision([samples[0], samples[2]])["sample"] == 2
    jobs = s5.judge_jobs(t.id, samples, seed=0)
    assert [{x, y} for _, x, y, _ in jobs] == [{1, 2}]


class FakeJudge:
    """Option log-probabilities scripted per judge prompt: (log p(A), log p(B))."""

    def __init__(self, tokenizer, scripted):
        self.tokenizer = tokenizer
        self.scripted = list(scripted)

    def option_logprobs(self, prompts, token_ids):
        assert tuple(token_ids) == option_token_ids(self.tokenizer)
        return torch.tensor([self.scripted.pop(0) for _ in prompts])


@pytest.mark.parametrize("passer_first", [True, False])
def test_wrong_order_judgment(tiny_backend, guard, passer_first):
    """A verdict that holds in one order only is dropped; one that holds in both orders with the
    second response winning chooses the second."""
    t = task()
    samples = samples_for(t, guard, [MISSED, FIXED])
    x, y = (1, 0) if passer_first else (0, 1)
    item = ("", s5.judge_instruction(t.text), samples[x]["text"], samples[y]["text"])
    # x shown as A wins; then y shown as A wins too: position bias, no verdict
    one_order = judge_many(FakeJudge(tiny_backend.tokenizer, [(-0.1, -2.0), (-0.1, -2.0)]),
                           guard, [item], 8, "test")
    records = s5.judgment_records([(t.id, x, y, 1)], one_order)
    assert records[0]["winner"] == "tie"
    assert s5.choose_pair(t, samples, records)[0] is None
    # the second response (y) wins in both orders
    second = judge_many(FakeJudge(tiny_backend.tokenizer, [(-2.0, -0.1), (-0.1, -2.0)]),
                        guard, [item], 8, "test")
    records = s5.judgment_records([(t.id, x, y, 1)], second)
    assert records[0]["winner"] == "y"
    pair, reason = s5.choose_pair(t, samples, records)
    if passer_first:  # the second response is the failing one: no pair
        assert pair is None and reason == "judge prefers the failing revision"
    else:
        assert reason == "ok" and pair["chosen"] == samples[y]["text"] == FIXED


def test_judge_jobs_pit_up_to_three_passers_against_one_rejected(guard):
    t = task()
    passers = [FIXED, FIXED.replace("Rain", "The rain"), FIXED.replace("sea", "ocean"),
               FIXED.replace("fields", "meadows")]
    samples = samples_for(t, guard, [MISSED] + passers)
    jobs = s5.judge_jobs(t.id, samples, seed=0)
    assert len(jobs) == 3 and all(0 in (x, y) and passer in (x, y) for _, x, y, passer in jobs)
    assert s5.judge_jobs(t.id, samples[1:], seed=0) == []
    assert len(s5.judge_jobs(t.id, samples, seed=0, max_judged=1)) == 1


def test_judge_audit():
    audit = s5.judge_audit([judgment(1, 0, "x"), judgment(1, 0, "y"), judgment(1, 0, "tie")])
    assert audit["comparisons"] == 3 and audit["order_consistent"]["k"] == 2
    assert audit["agrees_with_checks"]["k"] == 1 and audit["agrees_with_checks"]["n"] == 2
    # the passer shown second: a verdict for y agrees
    assert s5.judge_audit([{**judgment(0, 1, "y"), "passer": 1}])["agrees_with_checks"]["k"] == 1


# tasks -------------------------------------------------------------------------------------------

def stage1_task(task_id, instruction, constraints):
    """A stage 1 task in stage 1's schema: text = the instruction with its constraint
    sentences, extra = the bare instruction and the constraint dicts."""
    sentences = [constraint_from_dict(c).describe() for c in constraints]
    return Task(id=task_id, stage=1, split="train", text=" ".join([instruction] + sentences),
                kind="instruction", source="model",
                extra={"instruction": instruction, "constraints": constraints})


def write_stage1(run_dir, tasks, samples):
    folder = run_dir / "stage_1"
    folder.mkdir(parents=True)
    write_tasks(folder / TASKS_FILE, tasks)
    write_jsonl(folder / "scores.jsonl", samples)


def test_stage1_failures_become_tasks_naming_the_failed_constraints(tmp_path):
    two = NO_COMMAS + LOWER
    write_stage1(tmp_path, [
        stage1_task("t1", "Describe rain.", two),
        stage1_task("t2", "Describe snow.", []),
    ], [
        {"task_id": "t1", "sample": 0, "text": "rain, rain.", "constraint_results": [False, True],
         "passed": False, "unusable": None},
        {"task_id": "t1", "sample": 1, "text": "rain falls.", "constraint_results": [True, True],
         "passed": True, "unusable": None},
        {"task_id": "t1", "sample": 2, "text": "Rain, rain.", "constraint_results": [False, False],
         "passed": False, "unusable": None},
        {"task_id": "t1", "sample": 3, "text": "", "constraint_results": [True, False],
         "passed": False, "unusable": "empty"},
        {"task_id": "t1", "sample": 4, "text": "Rain", "constraint_results": [True, False],
         "passed": False, "unusable": None},
        {"task_id": "t2", "sample": 0, "text": "Snow is cold.", "constraint_results": [],
         "passed": False, "unusable": None},
    ])
    tasks = s5.stage1_failures(tmp_path)
    assert len(tasks) == s5.Stage5Settings().max_tasks_per_request == 2  # three failures, capped
    expected = {"t1-0": NO_COMMAS, "t1-2": two, "t1-4": LOWER}  # only the failed constraints
    for t in tasks:
        assert t.source == "stage1" and t.extra["request"] == "Describe rain."
        assert t.extra["checks"] == expected[t.extra["origin"]]
        assert t.extra["critique"] == s5.critique_for(t.extra["checks"])
    assert len(s5.stage1_failures(tmp_path, per_request=3)) == 3
    assert s5.stage1_failures(tmp_path / "elsewhere") == []


def test_failing_constraint_is_sampled_deterministically():
    checks = s5.failing_constraint("Rain falls, and falls.", "Describe rain.", seed=1)
    assert checks == s5.failing_constraint("Rain falls, and falls.", "Describe rain.", seed=1)
    assert checks and not s5.constraint_from_dict(checks[0]).check("Rain falls, and falls.")


def many_tasks():
    requests = ["Describe rain.", "Why do volcanoes erupt?", "How is bread made?",
                "Explain the rules of chess.", "What causes the tides?", "How do bees dance?",
                "Who invented jazz?", "Where are glaciers found?", "What is a comet made of?",
                "When do tulips flower?"]
    tasks = [s5.make_task(r, f"Well, {r.lower()} That is, in short, the question.", NO_COMMAS,
                          "pool") for r in requests]
    tasks.append(s5.make_task("Describe rain.", "Rain is, often, wet.", NO_COMMAS, "stage1"))
    return tasks


def test_split_by_request_is_stable_and_leak_free():
    tasks = many_tasks()
    split = s5.split_tasks(tasks, limit=20, heldout=3)
    held = [t for t in split if t.split == "heldout"]
    train = [t for t in split if t.split == "train"]
    rain_held = any(t.extra["request"] == "Describe rain." for t in held)  # 2nd task unused
    assert len(held) == 3 and len(train) == len(tasks) - 3 - rain_held
    assert not {t.extra["request"] for t in held} & {t.extra["request"] for t in train}
    assert s5.split_tasks(list(reversed(tasks)), limit=20, heldout=3) == split
    s5.check_leakage(split, 0.7)
    assert len(s5.split_tasks(tasks, limit=4, heldout=3)) == 3 + 4
    leaked = [replace(held[0], split="train", id="other")] + split
    with pytest.raises(RunFailure, match="leaks into training"):
        s5.check_leakage(leaked, 0.7)


def test_split_gives_every_source_a_turn():
    tasks = many_tasks() + [
        s5.make_task(f"Question number {w} about {w}?", f"{w}, {w} and {w} again.", NO_COMMAS,
                     source) for w, source in [("ink", "stage1"), ("oak", "stage1"),
                                               ("elm", "model-draft"), ("fog", "model-draft"),
                                               ("owl", "stage1"), ("yak", "model-draft")]]
    split = s5.split_tasks(tasks, limit=3, heldout=3)
    for side in ("heldout", "train"):
        assert sorted(t.source for t in split if t.split == side) \
            == sorted(s5.SOURCES), side


def real_drafts(n):
    return [s5.make_task(f"Real question {w} about the {w}?", f"The {w}, the {w} and more.",
                         NO_COMMAS, s5.HELDOUT_SOURCE)
            for w in ["sun", "moon", "sea", "hill", "rock", "leaf"][:n]]


def test_real_heldout_drafts_are_held_out_first_and_never_train():
    tasks = many_tasks() + real_drafts(5)
    split = s5.split_tasks(tasks, limit=20, heldout=3)
    held = [t for t in split if t.split == "heldout"]
    train = [t for t in split if t.split == "train"]
    assert len(held) == 3 and {t.source for t in held} == {s5.HELDOUT_SOURCE}
    assert len(train) == len(many_tasks()) and s5.HELDOUT_SOURCE not in {t.source for t in train}
    assert s5.split_tasks(list(reversed(tasks)), limit=20, heldout=3) == split
    # fewer real drafts than --heldout: the other sources top the held-out set up
    split = s5.split_tasks(many_tasks() + real_drafts(2), limit=20, heldout=4)
    held = [t for t in split if t.split == "heldout"]
    assert len(held) == 4 and sum(t.source == s5.HELDOUT_SOURCE for t in held) == 2
    assert not any(t.source == s5.HELDOUT_SOURCE for t in split if t.split == "train")
    s5.check_leakage(split, 0.7)
    # more requested than the other sources can spare: they keep three quarters for training
    split = s5.split_tasks(many_tasks() + real_drafts(2), limit=20, heldout=30)
    assert sum(t.split == "heldout" for t in split) == 2 + 10 // 4


def test_heldout_requests_are_real_heldout_questions_far_from_the_pool(tmp_path, tiny_dir):
    from core.constitution import load_constitution
    from core.context import StageContext
    from core.models import PROJECT_ROOT
    from core.realsets import load_real_questions
    from core.text import rouge_l
    from registry.models import profile_by_name

    data_dir = PROJECT_ROOT.parent / "shared" / "data"
    if not data_dir.is_dir():
        pytest.skip("needs ../shared/data")

    def context(**settings):
        return StageContext(run_dir=tmp_path, number=5, model_path=str(tiny_dir), origin="test",
                            profile=profile_by_name("tiny-qwen2"), seed=0, limit=4, heldout=10,
                            constitution=load_constitution(PROJECT_ROOT / "constitution.yaml"),
                            settings=s5.Stage5Settings(**settings), log=lambda _: None,
                            data_dir=data_dir)

    pool = s5.load_pool()
    requests = s5.heldout_requests(context(), pool)
    split = {q["question"]: q["split"] for q in load_real_questions(data_dir, 0.3)}
    assert len(requests) == 15 and len(set(requests)) == 15  # 1.5 x --heldout
    assert all(split[r] == "heldout" for r in requests)
    assert all(rouge_l(r, p) <= 0.7 for r in requests for p in pool["requests"])
    assert s5.heldout_requests(context(), pool) == requests  # fixed by the seed
    assert s5.heldout_requests(context(real_heldout=False), pool) == []
    assert set(s5.heldout_requests(context(real_heldout_share=0.6), pool)) != set(requests)


def test_training_requests_near_a_heldout_request_are_dropped():
    a = s5.make_task("Explain why the sky looks blue during the day.", "It scatters, light.",
                     NO_COMMAS, "pool")
    b = s5.make_task("Explain why the sky looks blue during the daytime.", "Light, scatters.",
                     NO_COMMAS, "pool")
    others = many_tasks()
    split = s5.split_tasks([a, b] + others, limit=20, heldout=len(others) + 1)
    sides = {t.id: t.split for t in split}
    assert len({sides.get(a.id), sides.get(b.id)} - {None}) == 1


# assessment and failure report -------------------------------------------------------------------

def test_assessed_item():
    t = task()
    assert s5.assessed_item(t, FIXED)["passed"]
    meta = s5.assessed_item(t, "Sure! " + FIXED)
    assert meta["fixes_critique"] and not meta["passed"] and meta["meta_prefix"]
    copy = s5.assessed_item(t, DRAFT)
    assert copy["keeps_content"] and not copy["changed"] and not copy["passed"]
    summary = s5.summarize_assessment([s5.assessed_item(t, FIXED), copy])
    assert summary["revision_success"]["k"] == 1 and summary["keeps_content"]["k"] == 2


def test_no_pairs_is_a_clear_error(tmp_path, tiny_dir, guard):
    from core.constitution import load_constitution
    from core.context import StageContext
    from core.models import PROJECT_ROOT
    from registry.models import profile_by_name

    ctx = StageContext(run_dir=tmp_path, number=5, model_path=str(tiny_dir), origin="test",
                       profile=profile_by_name("tiny-qwen2"), seed=0, limit=1, heldout=1,
                       constitution=load_constitution(PROJECT_ROOT / "constitution.yaml"),
                       settings=s5.Stage5Settings(), log=lambda _: None)
    t = task()
    write_tasks(ctx.path(TASKS_FILE), [t])
    assert read_tasks(ctx.path(TASKS_FILE), "train") == [t]
    write_jsonl(ctx.path("scores.jsonl"), samples_for(t, guard, [MISSED, FIXED]))
    write_jsonl(ctx.path("judgments.jsonl"), [{**judgment(1, 0, "tie", 1, -1), "task_id": t.id}])
    with pytest.raises(NoPairsError, match=r"no preference pairs from 1 tasks \(reasons in .*\); "
                                           "of 2 revisions 2 are usable, 1 fix the critique"):
        s5.make_pairs(ctx, s5.load_pool())
    dropped = [json.loads(line) for line in ctx.path("pairs_dropped.jsonl").read_text().splitlines()]
    assert dropped == [{"task_id": t.id, "reason": "judge tie (orders disagree)"}]


def test_hindsight_restates_the_critique_with_what_a_good_revision_fixed(guard):
    t = task(LOWER)  # neither revision is lowercase, and they differ in other ways
    samples = samples_for(t, guard, [MISSED, FIXED])
    assert not any(s["passed"] for s in samples)
    restated = s5.hindsight_task(t, samples, seed=0)
    checks = [constraint_from_dict(c) for c in restated.extra["checks"]]
    assert restated.id == t.id and restated.extra["stated_checks"] == LOWER
    # one revision fixes the restated critique, the other does not; the draft fails it
    assert sorted(s5.revision_checks(text, restated)["passed"] for text in (MISSED, FIXED)) == [
        False, True]
    assert not any(c.check(DRAFT) for c in checks)  # a critique names only what the draft lacks
    assert restated.extra["critique"] == s5.critique_for(restated.extra["checks"])
    assert restated.text == s5.revision_text("Describe what happens to rain.", DRAFT,
                                             restated.extra["critique"])
    assert s5.hindsight_task(t, samples, seed=0) == restated  # seeded
    # a task with a passing revision keeps its critique
    assert s5.hindsight_task(task(), samples_for(task(), guard, [MISSED, FIXED]), 0) is None


def test_a_hindsight_pair_is_judged_under_its_restated_critique(tmp_path, tiny_dir, guard):
    from core.constitution import load_constitution
    from core.context import StageContext
    from core.io import read_jsonl
    from core.models import PROJECT_ROOT
    from registry.models import profile_by_name

    ctx = StageContext(run_dir=tmp_path, number=5, model_path=str(tiny_dir), origin="test",
                       profile=profile_by_name("tiny-qwen2"), seed=0, limit=1, heldout=1,
                       constitution=load_constitution(PROJECT_ROOT / "constitution.yaml"),
                       settings=s5.Stage5Settings(), log=lambda _: None)
    t = task(LOWER)
    samples = samples_for(t, guard, [MISSED, FIXED])
    restated = s5.hindsight_task(t, samples, seed=0)
    write_tasks(ctx.path(TASKS_FILE), [t])
    write_tasks(ctx.path(s5.HINDSIGHT_FILE), [restated])
    write_jsonl(ctx.path("scores.jsonl"), samples)
    key = f"{t.id}@hindsight"
    jobs = s5.judge_jobs(key, s5.rescored(samples, restated, 0.2), seed=0)
    assert sorted(jobs[0][1:3]) == [0, 1] and len(jobs) == 1  # the passer against the other
    _, x, y, passer = jobs[0]
    write_jsonl(ctx.path("judgments.jsonl"),
                [{**judgment(x, y, "x" if x == passer else "y"), "task_id": key,
                  "passer": passer}])
    s5.make_pairs(ctx, s5.load_pool())
    [pair] = read_jsonl(ctx.path("pairs_candidates.jsonl"))
    assert pair["rule"] == "hindsight" and pair["stated_checks"] == LOWER
    assert pair["chosen"] == samples[passer]["text"] and pair["rejected"] == samples[1 - passer]["text"]
    assert pair["prompt"] == house_prompt(restated.text) and pair["checks"] == restated.extra["checks"]
    # the same verdict given under the stated critique does not count for the restated task
    write_jsonl(ctx.path("judgments.jsonl"),
                [{**judgment(x, y, "x" if x == passer else "y"), "task_id": t.id,
                  "passer": passer}])
    with pytest.raises(NoPairsError):
        s5.make_pairs(ctx, s5.load_pool())
    dropped = read_jsonl(ctx.path("pairs_dropped.jsonl"))
    assert dropped == [{"task_id": t.id, "reason": "restated in hindsight, then: not judged"}]


def test_exemplar_texts_leave_out_critiques():
    pool = s5.load_pool()
    texts = s5.exemplar_texts(pool)
    assert EXEMPLAR in texts
    assert not any(e["critique"] in texts for e in pool["revision_exemplars"])


def test_stage_contract():
    assert s5.STAGE.number == 5 and s5.STAGE.name == "revision-tasks"
    assert s5.STAGE.step_names == ["drafts", "tasks", "revisions", "scores", "pairs",
                                   "decontaminate", "train", "merge", "assess", "report"]
    assert s5.STAGE.headline == "revision_success" and s5.STAGE.settings is s5.Stage5Settings
    settings = s5.Stage5Settings()
    assert (settings.keeps_content, settings.max_tasks_per_request, settings.draft_oversample,
            settings.constraint_tries, settings.max_judged_revisions) == (0.2, 2, 1.5, 4, 3)
