"""Stage 4's verdict parsing, reason checks, pair rules, splits and assessment summary on
hand-written cases (no model)."""
import json
import random

import pytest

from core.errors import RunFailure
from core.guards import TemplateGuard
from core.io import write_jsonl
from core.prompting import few_shot_prompt
from core.records import Task, read_tasks, write_tasks
from stages import stage4_evaluation_tasks as s4

GUARD = TemplateGuard()
PAIR = {"id": "l1", "source": "pool", "key": "Which planet is closest to the Sun?",
        "request": "Which planet is closest to the Sun?",
        "better": "Mercury is the planet closest to the Sun.",
        "worse": "Venus is the planet closest to the Sun."}
REASON = "It names Mercury, which really is the nearest planet, while the other one names Venus."
EXEMPLAR_REASON = s4.load_pool()["verdict_exemplars"][0]["reason"]


def task(label: str) -> Task:
    return s4.judge_tasks([{**PAIR, "split": "train"}])[s4.LETTERS.index(label)]


def scored(sample: int, text: str, label: str, exemplars: list[str] = ()) -> dict:
    responses = s4.ordered(PAIR, label)
    return {"sample": sample, "text": text,
            **s4.score_verdict(text, "stop", label, responses, GUARD, list(exemplars))}


# parsing and reasons -----------------------------------------------------------------------------

@pytest.mark.parametrize("text,letter", [
    ("A. " + REASON, "A"), ("B: " + REASON, "B"), ("(B) " + REASON, "B"), ("  A - " + REASON, "A"),
    ("A", "A"), ("B.", "B"),
])
def test_verdicts_parse_on_their_first_letter(text, letter):
    assert s4.parse_verdict(text)[0] == letter


@pytest.mark.parametrize("text", [
    "A tie: both responses are equally good.", "Both responses answer the question.",
    "Neither response is right.", "Apples are red.", "Because A is right.", "B's answer is better.",
    "Here is my verdict: A. It is right.", "Response A is better.", "", "abc",
])
def test_ties_meta_prefixes_and_words_do_not_parse(text):
    assert s4.parse_verdict(text) == (None, "")


def test_reason_is_what_follows_the_letter():
    assert s4.parse_verdict("B. " + REASON) == ("B", REASON)


@pytest.mark.parametrize("reason,problem", [
    (REASON, None),
    ("", "no reason"),
    ("It names Mercury. The other one names Venus.", "more than one sentence"),
    ("It names Mercury, which really is the nearest", "unfinished sentence"),
    ("It is right\nThe other is wrong.", "more than one line"),
    ("it it it it it it it it it it.", "repetitive"),
    ("Good.", "fewer than 4 words"),
    ("Mercury is the planet closest to the Sun.", "copies a response"),
    ("Venus is the planet that is closest to the Sun.", "copies a response"),
])
def test_reason_checks(reason, problem):
    assert s4.reason_problem(reason, s4.ordered(PAIR, "A")) == problem


def test_a_reason_cut_off_by_the_token_limit_is_not_good():
    assert s4.reason_problem(REASON, s4.ordered(PAIR, "A"), finish="length") == "cut off"


# the pair rule -----------------------------------------------------------------------------------

def test_the_letter_is_right_or_wrong_for_its_own_order():
    says_a, says_b = "A. " + REASON, "B. " + REASON
    first, why = s4.choose_pair(task("A"), [scored(0, says_a, "A"), scored(1, says_b, "A")], [])
    second, _ = s4.choose_pair(task("B"), [scored(0, says_a, "B"), scored(1, says_b, "B")], [])
    assert why == "ok"
    assert (first["chosen"], first["rejected"]) == (says_a, says_b)
    # the better response is shown second: B is right there, and the same "A" verdict is wrong
    assert (second["chosen"], second["rejected"]) == (says_b, says_a)
    assert second["rejected_kind"] == "wrong letter" and second["label"] == "B"
    assert "Response A:\nVenus" in second["prompt"] and "Response B:\nMercury" in second["prompt"]


def test_alone_an_order_that_is_always_right_or_always_wrong_gives_no_pair():
    always_a = [scored(k, "A. " + REASON, "A") for k in range(3)]
    assert s4.choose_pair(task("A"), always_a, []) == (
        None, "every usable verdict is right (no rejected)")
    wrong_everywhere = [scored(k, "A. " + REASON, "B") for k in range(3)]
    assert s4.choose_pair(task("B"), wrong_everywhere, []) == (
        None, "no verdict with the right letter and a one-sentence reason")


def test_a_verdict_that_holds_in_both_orders_chooses_the_second_response_when_it_is_better():
    # A position-biased model says "A" in both orders; its reason names no position.
    order_a = [scored(0, "A. " + REASON, "A")]
    order_b = [scored(0, "A. " + REASON, "B"), scored(1, "A tie.", "B")]
    second, why = s4.choose_pair(task("B"), order_b, order_a)
    assert why == "ok"
    assert second["chosen"] == "B. " + REASON and second["chosen_order"] == "other"
    assert second["rejected"] == "A. " + REASON and second["rejected_order"] == "this"
    first, _ = s4.choose_pair(task("A"), order_a, order_b)
    assert (first["chosen"], first["rejected"]) == ("A. " + REASON, "B. " + REASON)
    assert (first["chosen_order"], first["rejected_order"]) == ("this", "other")


def test_a_verdict_that_holds_in_one_order_only_is_dropped_from_the_other():
    for reason in ("Response A names Mercury, the nearest planet.",
                   "The first one names Mercury, the nearest planet."):
        order_a = [scored(0, f"A. {reason}", "A")]
        assert order_a[0]["passed"] and not order_a[0]["both_orders"]
        order_b = [scored(0, "A. " + REASON, "B")]
        assert s4.choose_pair(task("B"), order_b, order_a) == (
            None, "no verdict with the right letter and a one-sentence reason")


def test_own_verdicts_come_before_carried_ones():
    order_a = [scored(0, "A. It names Mercury correctly, while the other one is wrong.", "A")]
    order_b = [scored(0, "A. " + REASON, "B"), scored(1, "B. " + REASON, "B")]
    pair, _ = s4.choose_pair(task("B"), order_b, order_a)
    assert pair["chosen"] == "B. " + REASON and pair["chosen_order"] == "this"
    order_b = [scored(0, "B. " + REASON, "B"), scored(1, "B.", "B")]
    order_a = [scored(0, "B. It names Venus, which is not nearest to the Sun.", "A")]
    pair, _ = s4.choose_pair(task("B"), order_b, order_a)
    assert pair["rejected"] == "A. It names Venus, which is not nearest to the Sun."
    assert pair["rejected_order"] == "other"  # a wrong letter beats a missing reason


def test_ties_and_unparsed_verdicts_are_dropped():
    ties = [scored(0, "A tie: both are fine.", "A"), scored(1, "Both are right.", "A")]
    assert s4.choose_pair(task("A"), ties, []) == (None, "no usable verdict parses")
    assert ties[0]["unusable"] == "does not parse"


def test_a_wrong_letter_is_preferred_as_rejected_over_a_poor_reason():
    samples = [scored(0, "A. " + REASON, "A"), scored(1, "A.", "A"),
               scored(2, "B. It is right about planets, and wrong", "A"),
               scored(3, "B. " + REASON, "A")]
    pair, _ = s4.choose_pair(task("A"), samples, [])
    assert pair["rejected_sample"] == 3
    pair, _ = s4.choose_pair(task("A"), samples[:3], [])
    assert pair["rejected_sample"] == 2 and pair["rejected_kind"] == "wrong letter"
    pair, _ = s4.choose_pair(task("A"), samples[:2], [])
    assert pair["rejected"] == "A." and pair["rejected_kind"] == "reason: no reason"


def test_a_right_letter_needs_a_good_reason_to_be_chosen():
    samples = [scored(0, "A. Mercury is the planet closest to the Sun.", "A"),
               scored(1, "B. " + REASON, "A")]
    assert samples[0]["correct"] and samples[0]["reason_problem"] == "copies a response"
    assert s4.choose_pair(task("A"), samples, [])[0] is None


def test_copied_exemplars_and_chat_markup_are_never_used():
    copy = scored(0, "A. " + EXEMPLAR_REASON, "A", [EXEMPLAR_REASON])
    markup = scored(1, "A. " + REASON + "<|im_end|>", "A")
    assert copy["unusable"] == "copies an exemplar" and markup["unusable"] == "chat markup"
    samples = [copy, markup, scored(2, "B. " + REASON, "A")]
    assert s4.choose_pair(task("A"), samples, [copy])[1] == \
        "no verdict with the right letter and a one-sentence reason"


def test_identical_verdicts_never_make_a_pair():
    same = [scored(0, "A. " + REASON, "A"), scored(1, "A.  " + REASON, "A")]
    assert s4.choose_pair(task("A"), same, [])[0] is None


def test_pair_filter():
    samples = [scored(0, "A. " + REASON, "A"), scored(1, "B. " + REASON, "A")]
    pair, _ = s4.choose_pair(task("A"), samples, [])
    assert s4.pair_problem(pair, GUARD, []) is None
    assert s4.pair_problem({**pair, "rejected": pair["chosen"] + " "}, GUARD, []) == "identical"
    assert s4.pair_problem({**pair, "rejected": "B. " + EXEMPLAR_REASON}, GUARD,
                           [EXEMPLAR_REASON]) == "rejected: copies an exemplar"
    assert s4.pair_problem({**pair, "chosen": "A. fine\nTask 4: write"}, GUARD, []) \
        == "chosen: prompt scaffolding"
    assert s4.pair_problem({**pair, "prompt": "<|im_start|>user\n" + pair["prompt"]}, GUARD, []) \
        == "chat markup in prompt"


# prompts -----------------------------------------------------------------------------------------

def test_training_prompt_is_one_zero_shot_house_prompt():
    samples = [scored(0, "B. " + REASON, "B"), scored(1, "A. " + REASON, "B")]
    pair, _ = s4.choose_pair(task("B"), samples, [])
    prompt = pair["prompt"]
    assert prompt.startswith(
        "Instruction: Here is a request and two responses.\n\nRequest: Which planet")
    assert prompt.endswith("then give the reason in one sentence.\n\nResponse:\n")
    assert prompt.count("Instruction:") == 1 and prompt.count("\nResponse:") == 1
    assert "###" not in prompt and EXEMPLAR_REASON not in prompt


def test_each_labelled_pair_becomes_two_tasks_one_per_order():
    a, b = s4.judge_tasks([{**PAIR, "split": "train"}])
    assert (a.extra["label"], b.extra["label"]) == ("A", "B")
    assert a.extra["pair_id"] == b.extra["pair_id"] == "l1"
    assert a.text.index("Mercury is") < a.text.index("Venus is")
    assert b.text.index("Venus is") < b.text.index("Mercury is")
    assert a.extra["instruction"] == PAIR["key"]
    assert (a.id, a.stage, a.split, a.kind, a.source) == ("l1-A", 4, "train", "judge", "pool")


def test_shots_balance_letters_and_put_the_better_response_where_the_letter_says():
    pool = s4.load_pool()
    for seed in range(20):
        shots = s4.verdict_shots(pool, random.Random(seed))
        letters = [verdict[0] for _, verdict in shots]
        assert 3 <= len(shots) <= 4 and abs(letters.count("A") - letters.count("B")) <= 1
        for text, verdict in shots:
            exemplar = next(e for e in pool["verdict_exemplars"] if e["reason"] in verdict)
            shown = text.split("Response A:\n")[1].split("\n\nResponse B:")[0]
            assert (shown == exemplar["better"]) == (verdict[0] == "A")
    target = s4.judge_tasks([{**PAIR, "split": "train"}])[0].text
    prompt = few_shot_prompt(shots, target)
    assert prompt.endswith("in one sentence.\n\nResponse:\n") and prompt.count("###") == len(shots)


# labelled pairs, split and leakage ---------------------------------------------------------------

def write_stage1(run_dir, tasks, samples):
    folder = run_dir / "stage_1"
    folder.mkdir(parents=True)
    write_tasks(folder / "tasks.jsonl", tasks)
    write_jsonl(folder / "scores.jsonl", samples)


def stage1_task(i, instruction):
    return Task(id=f"t{i}", stage=1, split="train",
                text=instruction + " Use lowercase letters only.", kind="instruction",
                source="model", extra={"instruction": instruction, "constraints": []})


def test_labelled_pairs_come_from_stage1_check_outcomes(tmp_path):
    tasks = [stage1_task(1, "Describe rain in a sentence."), stage1_task(2, "Describe snow."),
             stage1_task(3, "Describe fog in a sentence.")]
    samples = [
        {"task_id": "t1", "sample": 0, "text": "Rain Falls From Grey Clouds.", "passed": False},
        {"task_id": "t1", "sample": 1, "text": "rain falls from grey clouds.", "passed": True},
        {"task_id": "t2", "sample": 0, "text": "Snow Is Cold.", "passed": False},  # no passer
        {"task_id": "t3", "sample": 0, "text": "fog hides the hills.", "passed": True},
        {"task_id": "t3", "sample": 1, "text": "Task 4: Describe mist.", "passed": False},
    ]
    write_stage1(tmp_path, tasks, samples)
    pairs = s4.labelled_from_stage(tmp_path, s4.EARLIER_STAGES[0], GUARD)
    assert len(pairs) == 1
    assert pairs[0]["better"] == "rain falls from grey clouds."
    assert pairs[0]["worse"] == "Rain Falls From Grey Clouds."
    assert pairs[0]["request"] == "Describe rain in a sentence. Use lowercase letters only."
    assert pairs[0]["key"] == pairs[0]["request"]  # the task's text: dedup and leakage key
    assert pairs[0]["source"] == "stage_1" and pairs[0]["origin"]["task_id"] == "t1"
    assert s4.labelled_from_stage(tmp_path, s4.EARLIER_STAGES[1], GUARD) == []  # stage 2 absent


def test_tasks_step_mixes_stage1_and_pool_pairs(tmp_path, tiny_dir):
    from core.constitution import load_constitution
    from core.context import StageContext
    from core.models import PROJECT_ROOT
    from registry.models import profile_by_name

    tasks = [stage1_task(i, text) for i, text in enumerate([
        "Describe rain.", "Write a riddle about snow.", "Explain how fog forms over a lake.",
        "List two dangers of hail for farmers.", "Compose a haiku about wind in the trees.",
        "Tell a child what frost is."])]
    samples = [s for t in tasks for s in (
        {"task_id": t.id, "sample": 0, "text": "it falls softly from the sky.", "passed": True},
        {"task_id": t.id, "sample": 1, "text": "It Falls Softly From The Sky.", "passed": False})]
    write_stage1(tmp_path, tasks, samples)
    write_assessed_stage2(tmp_path, done=False)  # (a DONE stage 2 would need its scores too)
    ctx = StageContext(run_dir=tmp_path, number=4, model_path=str(tiny_dir), origin="test",
                       profile=profile_by_name("tiny-qwen2"), seed=0, limit=100, heldout=5,
                       constitution=load_constitution(PROJECT_ROOT / "constitution.yaml"),
                       settings=s4.Stage4Settings())
    s4.make_tasks(ctx, s4.load_pool())
    labelled = [json.loads(line) for line in ctx.path("labelled.jsonl").read_text().splitlines()]
    judge = read_tasks(ctx.path("tasks.jsonl"))
    dropped = ctx.path("tasks_dropped.jsonl").read_text().splitlines()  # prompts too long
    assert sum(p["source"] == "stage_1" for p in labelled) == 6
    assert sum(p["split"] == "heldout" for p in labelled) == 5
    # stage 2's two labelled held-out outputs are held out, and first
    assert [(p["source"], p["split"]) for p in labelled if p["source"] == "stage_2_heldout"] \
        == [("stage_2_heldout", "heldout")] * 2
    assert len(labelled) == 6 + 2 + len(s4.load_pool()["labelled_pairs"]) - len(dropped)
    assert len(judge) == 2 * len(labelled) and {t.extra["label"] for t in judge} == {"A", "B"}
    assert ctx.path("hh_heldout.jsonl").read_text() == ""  # no data_dir
    s4.check_leakage(labelled)


def test_split_is_stable_and_drops_training_pairs_near_a_heldout_one():
    pairs = [{**PAIR, "id": f"l{i}", "key": f"Write a short poem about a {w} at night."}
             for i, w in enumerate(["cat", "dog", "fox", "owl", "bat", "cow"])]
    kept, dropped = s4.split_labelled(pairs, limit=10, heldout=1)
    assert [p["split"] for p in kept] == ["heldout"]  # the other five are one word away
    assert len(dropped) == 5 and dropped[0]["reason"] == "near a held-out request"
    distinct = [{**PAIR, "id": f"l{i}", "key": k} for i, k in enumerate(
        ["Name a planet.", "How do bees make honey?", "Write a haiku about snow.",
         "What is 3 times 4?", "Give a tip for sleeping well."])]
    kept, dropped = s4.split_labelled(distinct, limit=3, heldout=2)
    assert [p["id"] for p in kept] == ["l0", "l1", "l2", "l3", "l4"] and not dropped
    assert [p["split"] for p in kept] == ["heldout"] * 2 + ["train"] * 3
    assert s4.split_labelled(list(reversed(distinct)), limit=3, heldout=2)[0] == kept
    s4.check_leakage(kept)
    with pytest.raises(RunFailure, match="leaks into training"):
        s4.check_leakage(kept + [{**kept[0], "id": "lx", "split": "train"}])


def write_assessed_stage2(run_dir, done=True):
    """A stage 2 that ran in `run_dir`: four held-out questions, one training question, and its
    held-out assessment (input model "before", trained model "after")."""
    from core.io import write_json

    folder = run_dir / "stage_2"
    folder.mkdir(parents=True)
    questions = {"q1": "What is fog?", "q2": "Why is the sea salty?", "q3": "Who was Ada?",
                 "q4": "What do bees eat?", "q5": "How do owls hunt?"}
    write_tasks(folder / "tasks.jsonl", [
        Task(id=i, stage=2, split="train" if i == "q5" else "heldout", text=q, kind="question",
             source="truthfulqa") for i, q in questions.items()])
    item = lambda i, text, passed: {"id": i, "response": text, "passed": passed}  # noqa: E731
    write_json(folder / "assessment.json", {"headline": "answer_rate", "before": {"items": [
        item("q1", "What is mist? What is rain?", False),
        item("q2", "Rivers carry salt from rocks into the sea.", True),
        item("q3", "Who was Bob?", False),
        item("q4", "Bees eat nectar and pollen.", True),
        item("q5", "What is an owl?", False)]}, "after": {"items": [
        item("q1", "Fog is a cloud that touches the ground.", True),  # gained
        item("q2", "Why is the sea blue?", False),  # lost
        item("q3", "Who was Eve?", False),  # neither passes: no label
        item("q4", "Bees eat nectar and pollen.", True),  # both pass: no label
        item("q5", "Owls hunt at night by sound.", True)]}})  # a training question
    if done:
        (folder / "DONE").write_text("")


def test_heldout_only_pairs_come_from_an_earlier_stage_s_heldout_assessment(tmp_path):
    from core.records import MissingEarlierOutputError

    write_assessed_stage2(tmp_path)
    pairs = s4.labelled_from_assessment(tmp_path, 2, GUARD)
    assert [(p["request"], p["better"], p["worse"], p["origin"]["better_model"])
            for p in pairs] == [
        ("What is fog?", "Fog is a cloud that touches the ground.",
         "What is mist? What is rain?", "after"),
        ("Why is the sea salty?", "Rivers carry salt from rocks into the sea.",
         "Why is the sea blue?", "before")]
    assert all(p["source"] == "stage_2_heldout" and s4.heldout_only(p) for p in pairs)
    assert s4.labelled_from_assessment(tmp_path, 3, GUARD) == []  # stage 3 never ran here
    (tmp_path / "stage_2" / "assessment.json").unlink()
    with pytest.raises(MissingEarlierOutputError, match="assessment.json"):
        s4.labelled_from_assessment(tmp_path, 2, GUARD)  # DONE, yet its assessment is gone


def test_heldout_only_pairs_are_held_out_first_and_never_train():
    keys = ["Name a planet.", "How do bees make honey?", "Write a haiku about snow.",
            "What is 3 times 4?", "Give a tip for sleeping well.", "Describe a storm at sea.",
            "Who painted the Mona Lisa?", "Explain what a lever does."]
    others = [{**PAIR, "id": f"l{i}", "key": k} for i, k in enumerate(keys[:6])]
    reserved = [{**PAIR, "id": f"l{i}", "key": k, "source": "stage_1_heldout"}
                for i, k in enumerate(keys[6:], start=6)]
    kept, _ = s4.split_labelled(others + reserved, limit=10, heldout=3)
    held = [p for p in kept if p["split"] == "heldout"]
    assert [p["id"] for p in held] == ["l6", "l7", "l0"]  # the reserved two, then one other
    assert [p["id"] for p in kept if p["split"] == "train"] == ["l1", "l2", "l3", "l4", "l5"]
    kept, _ = s4.split_labelled(others + reserved, limit=10, heldout=1)
    assert [p["id"] for p in kept if p["split"] == "heldout"] == ["l6"]
    assert not any(s4.heldout_only(p) for p in kept if p["split"] == "train")  # l7 unused
    s4.check_leakage(kept)


def test_hh_records_give_single_turn_pairs_only():
    single = {"chosen": "\n\nHuman: Can you help me?\n\nAssistant: Sure, with what?",
              "rejected": "\n\nHuman: Can you help me?\n\nAssistant: No."}
    multi = {"chosen": single["chosen"] + "\n\nHuman: Thanks\n\nAssistant: Bye",
             "rejected": single["rejected"] + "\n\nHuman: Thanks\n\nAssistant: Bye"}
    assert s4.hh_pair(json.dumps(single)) == {"request": "Can you help me?",
                                              "better": "Sure, with what?", "worse": "No."}
    assert s4.hh_pair(json.dumps(multi)) is None
    picked = s4.pick_hh_heldout({0: s4.hh_pair(json.dumps(single)), 1: {
        "request": "Hi", "better": "Hello there.", "worse": "Hello there."}}, 5, GUARD)
    assert picked == [{"id": "hh-0", "row": 0}]  # identical responses are not a pair


# assessment summary ------------------------------------------------------------------------------

def row(pid, a_letter, b_letter, source="pool"):
    def verdict(letter, label):
        return {"text": f"{letter}. x", "letter": letter, "correct": letter == label,
                "reason_ok": False}

    return {"id": pid, "source": source, "A": verdict(a_letter, "A"), "B": verdict(b_letter, "B")}


def test_a_verdict_right_in_one_order_only_does_not_count_for_both_orders():
    rows = [row("p1", "A", "A"), row("p2", "A", "A"), row("p3", "A", "B"), row("p4", None, "B")]
    summary = s4.judging_summary(rows)
    assert summary["accuracy_both_orders"]["k"] == 1
    assert summary["accuracy_better_first"]["k"] == 3
    assert summary["accuracy_better_second"]["k"] == 2
    assert summary["verdict_parsed"]["k"] == 7 and summary["verdict_parsed"]["n"] == 8
    assert s4.position_bias_gap(rows) == pytest.approx(0.25)
    assert s4.position_bias_gap([]) is None


def test_assessed_items_keep_hh_texts_out_and_out_of_mcnemar():
    own = s4.assessed_items([row("p1", "A", "B")], paired=True)[0]
    hh = s4.assessed_items([row("hh-3", "A", "B", s4.HH_SOURCE)], paired=False)[0]
    assert own["passed"] is True and own["better_first"]["text"] == "A. x"
    assert hh["passed"] is None and hh["correct_both"] is True
    assert "text" not in hh["better_first"] and "text" not in hh["better_second"]
