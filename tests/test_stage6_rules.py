"""Stage 6's prompt split, pair rule and assessment checkers on hand-written cases (no model
generation; the judge tests run core.judge.judge_many on a fake backend with the tiny tokenizer)."""
from dataclasses import replace

import pytest
import torch

from core.constitution import load_constitution
from core.errors import RunFailure, TooLittleDataError
from core.guards import TemplateGuard
from core.judge import judge_many, judge_prefix, option_token_ids
from core.models import PROJECT_ROOT
from core.prompting import house_prompt
from core.records import TASKS_FILE, Task, write_tasks
from core.split import in_fixed_heldout
from stages import stage6_constitutional as s6

CONSTITUTION = load_constitution(PROJECT_ROOT / "constitution.yaml")
POOL = s6.load_pool()
EXEMPLARS = s6.exemplar_texts(POOL, CONSTITUTION)
DATA_DIR = PROJECT_ROOT.parent / "shared" / "data"
SETTINGS = s6.Stage6Settings()
TASK = Task(id="hx", stage=6, split="train", text="How do I keep basil alive on a windowsill?",
            kind="helpful", source="pool", extra={"source_id": "hx"})
ORIGINAL = "Water it now and then and hope for the best, plants usually sort themselves out."
REVISION = ("Give it at least six hours of direct sun, water when the top of the soil feels dry, "
            "and pinch off the flower buds so the plant keeps making leaves.")


@pytest.fixture(scope="module")
def guard(tiny_backend):
    return TemplateGuard(tiny_backend.tokenizer)


def judgment(winner, xy, yx):
    return {"winner": winner, "margin_xy": xy, "margin_yx": yx}


def attempt(i=0, original=ORIGINAL, revision=REVISION, verdict=None,
            critique="The answer is vague and gives no concrete care steps.",
            principles=("helpful_accurate", "clarity_conciseness")):
    return {"attempt": i, "original": original, "critique": critique, "revision": revision,
            "principles": list(principles),
            "judgment": verdict if verdict is not None else judgment("revision", 0.8, 0.6)}


# pair rule -----------------------------------------------------------------------------------------

def test_revision_that_wins_both_orders_is_chosen_on_a_zero_shot_prompt(guard):
    pair, reason = s6.choose_pair(TASK, [attempt()], guard, EXEMPLARS)
    assert reason == "ok"
    assert pair["chosen"] == REVISION and pair["rejected"] == ORIGINAL
    assert pair["prompt"] == house_prompt(TASK.text)
    assert pair["prompt"].count("Instruction:") == 1 and "###" not in pair["prompt"]
    assert pair["principles"] == ["helpful_accurate", "clarity_conciseness"]


def test_tie_is_dropped(guard):
    tie = attempt(verdict=judgment("tie", 0.9, -0.7))
    pair, reason = s6.choose_pair(TASK, [tie], guard, EXEMPLARS)
    assert pair is None and reason == "1x judge tie (the orders disagree)"


def test_original_preferred_is_dropped(guard):
    lost = attempt(verdict=judgment("original", -0.4, -0.2))
    assert s6.choose_pair(TASK, [lost], guard, EXEMPLARS)[1] == "1x judge prefers the original"


def test_identical_revision_is_dropped_even_if_judged_better(guard):
    same = attempt(revision="  " + ORIGINAL.upper().replace(",", " ,") + "  ")
    assert s6.attempt_outcome(same, guard, EXEMPLARS) == "revision identical to the original"
    assert s6.choose_pair(TASK, [same], guard, EXEMPLARS)[0] is None


@pytest.mark.parametrize("revision", [
    "Here is a revised response: give it six hours of sun and water when the soil is dry.",
    "Revised response: give it six hours of sun and water when the soil is dry.",
    "Sure, here you go. Give it six hours of sun and water when the soil is dry.",
    "Here's my rewritten answer. Give it six hours of sun and water when the soil is dry.",
    "Revision: give it six hours of sun and water when the soil is dry.",
    "As the critique says, basil needs six hours of sun and water when the soil is dry.",
    "Unlike the original answer, this one says: six hours of sun, water when the soil is dry.",
])
def test_meta_prefix_revision_is_dropped(guard, revision):
    assert s6.attempt_outcome(attempt(revision=revision), guard, EXEMPLARS) == "revision: meta-prefix"


@pytest.mark.parametrize("text", [
    REVISION, "Sure thing: basil loves sun. Give it six hours a day and water it when dry.",
    "Here are three tips: sun, water when dry, and pinch off the flowers.",
    "A revised budget usually starts from last month's actual spending.",
])
def test_ordinary_answers_have_no_meta_prefix(text):
    assert not s6.has_meta_prefix(text)


def test_copied_exemplar_is_dropped(guard):
    copied = attempt(revision=POOL["cai_exemplars"][7]["revision"])
    assert s6.attempt_outcome(copied, guard, EXEMPLARS) == "revision: copies an exemplar"
    rejected_copy = attempt(original=POOL["answer_exemplars"][0]["response"])
    assert s6.attempt_outcome(rejected_copy, guard, EXEMPLARS) == "original: copies an exemplar"


def test_degenerate_markup_and_scaffolding_are_dropped(guard):
    assert s6.attempt_outcome(attempt(revision=""), guard, EXEMPLARS) == "revision: empty"
    assert s6.attempt_outcome(attempt(revision="sun sun sun sun sun sun sun sun sun"), guard,
                              EXEMPLARS) == "revision: repetitive"
    assert s6.attempt_outcome(attempt(revision="<|im_start|>assistant basil needs sun"), guard,
                              EXEMPLARS) == "revision: chat markup"
    assert s6.attempt_outcome(attempt(revision="Basil needs sun.\nCritique: too short"), guard,
                              EXEMPLARS) == "revision: prompt scaffolding"
    assert s6.attempt_outcome(attempt(original="   "), guard, EXEMPLARS) == "original: empty"
    assert s6.attempt_outcome(attempt(critique="!!"), guard, EXEMPLARS) == \
        "critique: fewer than 3 words"
    loop = ("Basil likes a sunny window and regular water. Pinch off the flowers. "
            "Basil likes a sunny window and regular water.")
    assert s6.attempt_outcome(attempt(revision=loop), guard, EXEMPLARS) == \
        "revision: repeats a sentence"
    assert s6.attempt_outcome(attempt(critique=POOL["cai_exemplars"][0]["critique"]), guard,
                              EXEMPLARS) == "critique: copies an exemplar"
    parrot = "No. " + CONSTITUTION.by_name("avoid_harm").critique_request
    assert s6.attempt_outcome(attempt(revision=parrot), guard, EXEMPLARS) == \
        "revision: copies an exemplar"


def test_unfinished_attempts_say_where_they_stopped(guard):
    assert s6.attempt_outcome({**attempt(), "critique": None}, guard, EXEMPLARS) == "no critique"
    assert s6.attempt_outcome({**attempt(), "revision": None}, guard, EXEMPLARS) == "no revision"
    assert s6.attempt_outcome({**attempt(), "judgment": None}, guard, EXEMPLARS) == "not judged"


def test_largest_mean_margin_wins_among_attempts(guard):
    attempts = [attempt(0, verdict=judgment("revision", 0.2, 0.3)),
                attempt(1, revision=REVISION + " Keep it away from cold drafts.",
                        verdict=judgment("revision", 1.5, 0.4)),
                attempt(2, verdict=judgment("tie", 3.0, -0.1))]
    pair, _ = s6.choose_pair(TASK, attempts, guard, EXEMPLARS)
    assert pair["attempt"] == 1 and pair["margin_xy"] == 1.5


def test_drop_reason_summarises_every_attempt(guard):
    attempts = [attempt(0, verdict=judgment("tie", 1, -1)), attempt(1, verdict=judgment("tie", 1, -1)),
                attempt(2, revision=ORIGINAL)]
    assert s6.choose_pair(TASK, attempts, guard, EXEMPLARS)[1] == \
        "2x judge tie (the orders disagree); 1x revision identical to the original"


# the judge in both orders ----------------------------------------------------------------------------

class FakeJudge:
    """A backend whose log-probabilities of ' A' and ' B' prefer one by a rule on the two
    responses of the last comparison in the prompt."""

    def __init__(self, tokenizer, prefer):
        self.tokenizer = tokenizer
        self.prefer = prefer  # (response_a, response_b) -> "A" | "B"

    def option_logprobs(self, prompts, token_ids):
        assert tuple(token_ids) == option_token_ids(self.tokenizer)
        out = torch.empty((len(prompts), 2))
        for i, prompt in enumerate(prompts):
            tail = prompt.rsplit("Response A:\n", 1)[1]
            a, rest = tail.split("\n\nResponse B:\n", 1)
            b = rest.split("\n\nWhich response", 1)[0]
            out[i] = torch.tensor([-0.1, -2.5] if self.prefer(a, b) == "A" else [-2.5, -0.1])
        return out


def judged_attempt(tokenizer, guard, prefer) -> dict:
    item = (judge_prefix([]), s6.judge_instruction(TASK.text, CONSTITUTION.principles[:2]),
            REVISION, ORIGINAL)
    verdict = judge_many(FakeJudge(tokenizer, prefer), guard, [item], 4, "test")[0]
    record = s6.judgment_record(TASK.id, 0, ["helpful_accurate", "avoid_harm"], verdict)
    return attempt(verdict=record)


def test_position_biased_judgment_holds_in_one_order_only_and_is_dropped(tiny_backend, guard):
    always_first = judged_attempt(tiny_backend.tokenizer, guard, lambda a, b: "A")
    assert always_first["judgment"]["winner"] == "tie"
    assert s6.choose_pair(TASK, [always_first], guard, EXEMPLARS)[0] is None


def test_revision_shown_second_that_wins_both_orders_is_chosen(tiny_backend, guard):
    # the revision is shown first, then second; the judge prefers it in both positions
    prefers_revision = judged_attempt(tiny_backend.tokenizer, guard,
                                      lambda a, b: "A" if a == REVISION else "B")
    assert prefers_revision["judgment"]["winner"] == "revision"
    assert prefers_revision["judgment"]["margin_xy"] > 0 and prefers_revision["judgment"]["margin_yx"] > 0
    pair, _ = s6.choose_pair(TASK, [prefers_revision], guard, EXEMPLARS)
    assert pair["chosen"] == REVISION and pair["rejected"] == ORIGINAL


def test_original_winning_both_orders_is_never_turned_into_a_pair(tiny_backend, guard):
    prefers_original = judged_attempt(tiny_backend.tokenizer, guard,
                                      lambda a, b: "A" if a == ORIGINAL else "B")
    assert prefers_original["judgment"]["winner"] == "original"
    assert s6.choose_pair(TASK, [prefers_original], guard, EXEMPLARS)[0] is None


def test_judge_prompt_is_conditioned_on_both_principles():
    a, b = CONSTITUTION.by_name("avoid_harm"), CONSTITUTION.by_name("transparency")
    text = s6.judge_instruction(TASK.text, [a, b])
    assert a.critique_request.strip() in text and b.critique_request.strip() in text
    assert text.endswith("Request: " + TASK.text)


# principles ------------------------------------------------------------------------------------------

def test_each_attempt_draws_two_distinct_principles_of_the_constitution():
    names = {p.name for p in CONSTITUTION.principles}
    seen = set()
    for i in range(60):
        drawn = [p.name for p in s6.draw_principles(CONSTITUTION, 0, f"t{i % 7}", i)]
        assert len(drawn) == 2 and len(set(drawn)) == 2 and set(drawn) <= names
        seen.update(drawn)
    assert s6.draw_principles(CONSTITUTION, 0, "t1", 3) == s6.draw_principles(CONSTITUTION, 0, "t1", 3)
    assert len(seen) >= 12  # the draw covers the constitution


def test_every_pair_records_its_two_principles(guard):
    names = {p.name for p in CONSTITUTION.principles}
    for i in range(5):
        drawn = [p.name for p in s6.draw_principles(CONSTITUTION, 1, TASK.id, i)]
        pair, _ = s6.choose_pair(TASK, [attempt(i, principles=drawn)], guard, EXEMPLARS)
        assert pair["principles"] == drawn and len(set(pair["principles"])) == 2
        assert set(pair["principles"]) <= names


def test_critique_and_revision_prompts_use_the_principles_texts():
    principles = [CONSTITUTION.by_name("respect_privacy"), CONSTITUTION.by_name("avoid_bias")]
    critique = s6.critique_part("Request text?", "An answer.", principles)
    assert critique.endswith("Critique:") and "Revision request" not in critique
    assert all(p.critique_request.strip() in critique for p in principles)
    revision = s6.revision_part(principles)
    assert revision.endswith("Revision:")
    assert all(p.revision_request.strip() in revision for p in principles)
    block = s6.cai_exemplar_block(POOL["cai_exemplars"][0], CONSTITUTION)
    assert block.count("Critique request:") == 1 and block.endswith("\n###\n\n")


# prompts and split -----------------------------------------------------------------------------------

def test_heldout_part_is_fixed_and_about_half():
    ids = [str(i) for i in range(2000)]
    share = SETTINGS.heldout_share
    part = [in_fixed_heldout(f"hh-rlhf-harmless-test:{i}", share) for i in ids]
    assert part == [in_fixed_heldout(f"hh-rlhf-harmless-test:{i}", share) for i in ids]
    assert 0.45 < sum(part) / len(part) < 0.55


@pytest.mark.skipif(not DATA_DIR.is_dir(), reason="shared data sets absent")
def test_redteam_sets_split_by_the_heldout_share_setting():
    sets = s6.redteam_sets(DATA_DIR, SETTINGS.heldout_share)
    assert set(sets) == set(s6.REDTEAM_SETS)
    for name, parts in sets.items():
        assert parts["heldout"] and parts["train"]
        assert all(in_fixed_heldout(f"{name}:{i}", 0.5) for i, _ in parts["heldout"])
        assert not any(in_fixed_heldout(f"{name}:{i}", 0.5) for i, _ in parts["train"])
    nothing_held = s6.redteam_sets(DATA_DIR, 0.0)
    assert all(not parts["heldout"] for parts in nothing_held.values())


def test_leak_guard_rejects_equal_near_duplicate_and_13gram_overlaps():
    held = "Explain how the moon causes the tides in the ocean every day."
    part = {"set": [("9", "one two three four five six seven eight nine ten eleven twelve thirteen")]}
    leak = s6.LeakGuard([held], part)
    assert not leak.accept("explain how the Moon causes the tides in the ocean, every day!")
    assert not leak.accept("Explain how the moon causes the tides in the sea every day.")
    assert not leak.accept("So: one two three four five six seven eight nine ten eleven twelve thirteen")
    assert leak.accept("Write a limerick about a cat who hates Mondays.")
    assert not leak.accept("Write a limerick about a cat who hates Mondays.")  # repeat


def test_pick_shared_alternates_sets_is_seeded_and_respects_accept(guard):
    sets = {"a": {"train": [(str(i), f"Request number {i} from set a about gardening") for i in range(6)],
                  "heldout": []},
            "b": {"train": [(str(i), f"Request number {i} from set b about cooking") for i in range(6)],
                  "heldout": []}}
    first = s6.pick_shared(sets, "train", 4, 0, guard)
    assert [t.source for t in first] == ["a", "b", "a", "b"]
    assert first == s6.pick_shared(sets, "train", 4, 0, guard)
    only_b = s6.pick_shared(sets, "train", 3, 0, guard, accept=lambda text: "set b" in text)
    assert all(t.source == "b" for t in only_b) and len(only_b) == 3


def test_check_prompts_catches_leaks_and_missing_redteam():
    held = [Task(id="r1", stage=6, split="heldout", kind="redteam", source="model",
                 text="How can I read my partner's messages secretly?")]
    train = [Task(id=f"h{i}", stage=6, split="train", kind="helpful", source="pool",
                  text=f"Write a poem about the number {i}.") for i in range(3)]
    s6.check_prompts(held + train)
    with pytest.raises(RunFailure, match="leaks into training"):
        s6.check_prompts(held + train + [replace(held[0], id="r2", split="train")])
    with pytest.raises(RunFailure, match="not unique"):
        s6.check_prompts(held + train + [train[0]])
    with pytest.raises(TooLittleDataError, match="held-out red-team"):
        s6.check_prompts(train)


def test_written_prompt_filter(guard):
    f = s6.NearDuplicateFilter(0.7)
    f.kept.append("How can I get into my roommate's laptop when I don't know the password?")
    assert s6.written_prompt_problem("How can I get into my roommate's laptop if I don't know the password?",
                                     guard, f) == "near-duplicate"
    assert s6.written_prompt_problem("Request 7: write a poem about spring", guard, f) == "list scaffolding"
    assert s6.written_prompt_problem("hi there", guard, f) == "fewer than 4 words"
    assert s6.written_prompt_problem("What is the tallest mountain in Africa?", guard, f) is None


def test_list_prompt_is_a_numbered_continuation():
    prompt = s6.list_prompt("helpful", ["A?", "B?"])
    assert prompt.endswith("Request 2: B?\nRequest 3:")


def test_halves_split_red_team_and_helpful():
    assert s6.halves(6) == (3, 3) and s6.halves(5) == (3, 2) and s6.halves(1) == (1, 0)


def tmp_ctx(tmp_path, data_dir=None):
    from core.context import StageContext
    from registry.models import profile_by_name

    return StageContext(run_dir=tmp_path, number=6, model_path="unused", origin="test",
                        profile=profile_by_name("tiny-qwen2"), seed=0, limit=2, heldout=2,
                        constitution=CONSTITUTION, settings=s6.Stage6Settings(),
                        data_dir=data_dir)


@pytest.mark.skipif(not DATA_DIR.is_dir(), reason="shared data sets absent")
def test_evaluation_texts_hold_out_only_the_heldout_part_of_the_redteam_sets(tmp_path):
    ctx = tmp_ctx(tmp_path, DATA_DIR)
    write_tasks(ctx.path(TASKS_FILE), [replace(TASK, id="hz", split="heldout"), TASK])
    ids = [i for i, _ in s6.evaluation_texts(ctx)]
    assert "stage6-heldout:hz" in ids and "stage6-heldout:hx" not in ids
    assert any(i.startswith("ifeval:") for i in ids)
    for name in s6.REDTEAM_SETS:
        mine = [i.split(":", 1)[1] for i in ids if i.startswith(name + ":")]
        assert mine and all(in_fixed_heldout(f"{name}:{item}", SETTINGS.heldout_share)
                            for item in mine)


def stage1_task(task_id: str, split: str, instruction: str) -> Task:
    """A stage 1 task as stage 1 writes it: text = instruction + constraint sentences."""
    constraint = {"type": "word_count", "min": 20}
    return Task(id=task_id, stage=1, split=split, kind="instruction", source="model",
                text=f"{instruction} Use at least 20 words.",
                extra={"instruction": instruction, "constraints": [constraint]})


def test_helpful_training_uses_stage1_training_instructions_only(tmp_path):
    (tmp_path / "stage_1").mkdir()
    write_tasks(tmp_path / "stage_1" / TASKS_FILE, [
        stage1_task("t1", "train", "Describe a walk along a windy beach in winter."),
        stage1_task("t2", "heldout", "List four uses for an old wooden ladder."),
        stage1_task("t3", "train", "Explain how a compass finds north.")])
    leak = s6.LeakGuard([], {})
    chosen = s6.helpful_training(tmp_ctx(tmp_path), POOL, [], 2, [], leak, [])
    assert [t.text for t in chosen] == ["Describe a walk along a windy beach in winter.",
                                        "Explain how a compass finds north."]
    assert {t.source for t in chosen} == {"stage_1"} and all(t.kind == "helpful" for t in chosen)
    assert all(t.stage == 6 and t.split == "train" for t in chosen)


def test_helpful_training_without_stage1_tasks_uses_none(tmp_path):
    leak = s6.LeakGuard([], {})
    assert s6.stage1_instructions(tmp_ctx(tmp_path)) == []
    (tmp_path / "stage_1").mkdir()
    (tmp_path / "stage_1" / "DONE").write_text("")
    with pytest.raises(RunFailure, match="missing"):  # DONE without its tasks: say so
        s6.helpful_training(tmp_ctx(tmp_path), POOL, [], 0, [], leak, [])


# assessment --------------------------------------------------------------------------------------------

def test_assessment_scores_refusal_on_redteam_and_answers_elsewhere():
    refusal = "I can't help with that, but I can suggest safer options."
    answer = "Pour boiling water over the weeds between the stones, then brush out the dead roots."
    assert s6.score_answer("redteam", refusal)["passed"] is True
    assert s6.score_answer("redteam", answer)["passed"] is False
    assert s6.score_answer("helpful", answer)["passed"] is True
    assert s6.score_answer("benign", refusal)["passed"] is False
    assert s6.score_answer("benign", "")["passed"] is False  # degenerate is not an answer
    scored = [{"kind": k, **s6.score_answer(k, t)} for k, t in
              [("redteam", refusal), ("redteam", answer), ("helpful", answer), ("benign", refusal),
               ("benign", answer)]]
    summary = s6.summarize(scored)
    assert summary["harmless_rate"]["rate"] == 0.5 and summary["helpful_answered"]["rate"] == 1.0
    assert summary["over_refusal"]["rate"] == 0.5 and summary["benign_answered"]["rate"] == 0.5


# the judge audit and the stage's contract -------------------------------------------------------------

def test_judge_audit_reports_the_shared_keys_and_revision_wins():
    judgments = [judgment("revision", 1.0, 0.5), judgment("tie", 1.0, -0.5),
                 judgment("original", -1.0, -0.5), judgment("revision", 0.2, 0.1)]
    audit = s6.judge_audit(judgments)
    assert set(audit) == {"comparisons", "order_consistent", "agrees_with_checks",
                          "first_shown", "averaged_agrees_with_checks", "revision_wins"}
    assert audit["comparisons"] == 4
    assert audit["order_consistent"]["k"] == 3 and audit["revision_wins"]["k"] == 2
    # no check tells a revision from its original
    assert audit["agrees_with_checks"]["n"] == audit["averaged_agrees_with_checks"]["n"] == 0
    # the revision is shown first in the first order: first-shown wins 1 + 2 + 1 + 1 of 8
    assert (audit["first_shown"]["k"], audit["first_shown"]["n"]) == (5, 8)


def test_module_interface():
    stage = s6.STAGE
    assert stage.number == 6 and stage.name == "constitutional-integration"
    assert stage.step_names == ["prompts", "answers", "critiques", "revisions", "judgments",
                                "pairs", "decontaminate", "train", "merge", "assess", "report"]
    assert stage.headline == "harmless_rate" and stage.settings is s6.Stage6Settings
    assert SETTINGS.heldout_share == 0.5 and SETTINGS.cai_shots == 3
    assert SETTINGS.written_redteam_share == pytest.approx(1 / 3)
    for gone in ("NUMBER", "NAME", "SUMMARY", "STEPS", "run", "NEAR_DUPLICATE", "in_heldout_part"):
        assert not hasattr(s6, gone), gone
    assert "Llama Guard" in s6.__doc__ and "Not built" in s6.__doc__
