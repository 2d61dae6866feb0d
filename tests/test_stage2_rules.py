"""Stage 2's answer checks, question handling, split and pair rules on hand-written cases."""
from pathlib import Path

import pytest
import torch

from core.errors import RunFailure
from core.guards import TemplateGuard
from core.judge import judge_many, option_token_ids
from core.records import Task, write_tasks
from core.split import in_fixed_heldout
from stages import stage2_implicit_instructions as s2

SHARE = s2.Stage2Settings().heldout_share

QUESTION = "How do vaccines protect the body?"
ANSWER = "Vaccines show the immune system a harmless piece of a germ, so it learns to fight it."
POOL_ANSWER = s2.load_pool()["answer_exemplars"][0]["answer"]


def problem(text: str, question: str = QUESTION) -> str | None:
    return s2.check_answer(question, text)["problem"]


# the answer checks -------------------------------------------------------------------------------

def test_a_direct_answer_passes():
    assert problem(ANSWER) is None
    assert problem("Lisbon.", "What's the capital of Portugal?") is None  # short: topic exempt
    assert problem("36.", "What is 15 percent of 240?") is None  # short numeric answer
    assert problem("Nobody knows yet who will win the 2030 election.",
                   "Who will win the 2030 election?") is None  # on-topic hedge, not a dodge
    assert problem("def reverse_words(sentence):\n    return ' '.join(sentence.split()[::-1])",
                   "A Python function that reverses the words in a sentence?") is None  # code


@pytest.mark.parametrize("text, reason", [
    ("and how long does the protection last, and do I need a booster?", "continues the question"),
    (", and are they safe for children", "continues the question"),
    ("How do vaccines protect the body? They train the immune system.", "repeats the question"),
    ("What is the difference between a vaccine and an antibiotic?",
     "asks a question instead of answering"),
    ("Vaccines train the immune system.\nHow do antibiotics work?\nThey kill bacteria.",
     "goes on to new questions"),
    ("Question: What else do vaccines do?", "prompt scaffolding"),
    ("I don't know. You should ask someone else about it.", "dodges the question"),
    ("That is a good question. People have wondered about it for a very long time.",
     "dodges the question"),
    ("My cousin went to Spain last summer and loved the beaches near Valencia.", "off topic"),
    ("the the the the the the the the the the", "continues the question"),
    ("Vaccine vaccine vaccine vaccine vaccine vaccine vaccine vaccine vaccine.", "repetitive"),
    ("", "empty"),
])
def test_failures_are_named(text, reason):
    assert problem(text) == reason


def test_a_dodge_opener_followed_by_an_answer_is_not_a_dodge():
    text = "That's a good question. Vaccines train the immune system to recognise a germ."
    assert problem(text) is None


def test_topic_matching_uses_light_stems():
    assert s2.shares_topic("Tips for staying awake on a long drive.", "Share the driving.")
    assert s2.shares_topic("Why do we yawn?", "Yawning cools the brain.")
    assert s2.shares_topic("What is 15 percent of 240?", "Take a tenth of 240, then half again.")
    assert not s2.shares_topic("Is coffee bad for you?", "Most adults are fine with four cups.")
    assert s2.shares_topic("Why?", "Anything at all.")  # nothing to match: on topic


def test_answer_check_knobs_are_parameters():
    question = "How long do vaccines protect the body?"
    assert problem("Ten years.", question) is None  # short: exempt from the topic check
    assert s2.check_answer(question, "Ten years or so, often.", short_words=2)["problem"] \
        == "off topic"
    late = "Most adults need a booster now and then, and the timing varies. Vaccines wear off."
    assert problem(late, question) is None
    assert s2.check_answer(question, late, topic_window=5)["problem"] == "off topic"


def test_on_topic_and_non_degenerate_flags():
    assert s2.check_answer(QUESTION, ANSWER) == {"non_degenerate": True, "on_topic": True,
                                                 "problem": None}
    off = s2.check_answer(QUESTION, "The train to Lisbon leaves at nine from platform two.")
    assert off["on_topic"] is False and off["non_degenerate"] is True


# generated and real questions --------------------------------------------------------------------

@pytest.fixture(scope="module")
def guard(tiny_backend):
    return TemplateGuard(tiny_backend.tokenizer)


def test_question_filter(guard):
    f = s2.NearDuplicateFilter(0.7)
    f.kept.append("Why do onions make your eyes water?")
    assert s2.question_problem("Why do onions make your eyes water so much?", guard, f) \
        == "near-duplicate"
    assert s2.question_problem("5. Why is the sea blue?", guard, f) == "list scaffolding"
    assert s2.question_problem("Question: why is grass green", guard, f) == "list scaffolding"
    assert s2.question_problem("Why?", guard, f) == "fewer than 3 words"
    assert s2.question_problem("<|im_start|>user why is grass green", guard, f) == "chat markup"
    assert s2.question_problem("Why is grass green?", guard, f) is None
    assert "Why is grass green?" in f.kept


def test_list_prompt_is_a_numbered_continuation():
    prompt = s2.list_prompt(["Why is grass green?", "Best pizza toppings?"])
    assert prompt.endswith("1. Why is grass green?\n2. Best pizza toppings?\n3.")


def write_sets(root: Path) -> None:
    (root / "self-instruct").mkdir(parents=True)
    (root / "self-instruct" / "seed_tasks.jsonl").write_text(
        '{"id": "seed_task_0", "instruction": "Suggest a name for a bakery.", '
        '"instances": [{"input": "", "output": "x"}]}\n'
        '{"id": "seed_task_1", "instruction": "Sort these words.", '
        '"instances": [{"input": "b, a", "output": "a, b"}]}\n')
    (root / "truthfulqa").mkdir()
    (root / "truthfulqa" / "TruthfulQA.csv").write_text(
        'Type,Category,Question,Best Answer\n'
        'Adversarial,Misconceptions,"Why do veins appear blue,\nreally?",Light\n')
    (root / "mt-bench").mkdir()
    (root / "mt-bench" / "question.jsonl").write_text(
        '{"question_id": 81, "category": "writing", "turns": ["Write a haiku about tea.", "More"]}\n')


def test_real_questions_are_read_and_split_by_id_hash(tmp_path):
    write_sets(tmp_path)
    items = s2.load_real_questions(tmp_path, SHARE)
    assert [i["source"] for i in items] == ["self-instruct", "truthfulqa", "mt-bench"]
    assert items[0]["id"] == "self-instruct:seed_task_0"  # seed_task_1 has an instance input
    assert items[1]["question"] == "Why do veins appear blue,\nreally?"  # a CSV parser
    assert items[2]["question"] == "Write a haiku about tea."  # the first turn only
    for item in items:
        assert item["split"] == ("heldout" if in_fixed_heldout(item["id"], SHARE) else "train")
    assert [i["split"] for i in s2.load_real_questions(tmp_path, 1.0)] == ["heldout"] * 3
    assert [i["split"] for i in s2.load_real_questions(tmp_path, 0.0)] == ["train"] * 3
    assert s2.load_real_questions(None) == [] and s2.load_real_questions(tmp_path / "none") == []


def test_the_heldout_part_of_a_real_set_is_fixed():
    ids = [f"truthfulqa:{i}" for i in range(2000)]
    held = [i for i in ids if in_fixed_heldout(i, SHARE)]
    assert 0.25 < len(held) / len(ids) < 0.35
    assert held == [i for i in ids if in_fixed_heldout(i, SHARE)]  # no seed, no state
    assert set(held) <= {i for i in ids if in_fixed_heldout(i, 0.5)}  # a larger share adds items


def real(source, i, question, split="train"):
    return {"id": f"{source}:{i}", "source": source, "question": question, "split": split}


def test_pick_real_takes_one_split_round_robin(guard):
    items = [real("a", 0, "Why is the sky blue?"), real("a", 1, "How do magnets work?"),
             real("b", 0, "Best pizza toppings for kids?"), real("b", 1, "Is tea healthy?"),
             real("a", 2, "Where do swallows spend the winter?", "heldout")]
    taken: set[str] = set()
    picked = s2.pick_real(items, "train", 2, s2.NearDuplicateFilter(0.7), guard, taken, seed=0)
    assert sorted(p["source"] for p in picked) == ["a", "b"]
    more = s2.pick_real(items, "train", 5, s2.NearDuplicateFilter(0.7), guard, taken, seed=0)
    assert len(more) == 2 and not {p["id"] for p in more} & {p["id"] for p in picked}
    assert all(p["split"] == "train" for p in picked + more)


def test_pick_real_skips_near_duplicates_long_and_marked_up_items(guard):
    f = s2.NearDuplicateFilter(0.7)
    f.kept.append("Why is the sky blue?")
    items = [real("a", 0, "Why is the sky so blue?"), real("a", 1, "word " * 61),
             real("a", 2, "<|im_start|>user hi there"), real("a", 3, "How do magnets work?")]
    picked = s2.pick_real(items, "train", 4, f, guard, set(), seed=0)
    assert [p["id"] for p in picked] == ["a:3"]
    short = s2.pick_real([real("a", 4, "How do tides work?"),
                          real("a", 5, "Why do cats purr when they are happy?")],
                         "train", 2, s2.NearDuplicateFilter(0.7), guard, set(), seed=0, max_words=4)
    assert [p["id"] for p in short] == ["a:4"]


def test_generated_split_and_leakage():
    questions = [f"Why do {w} sleep so much during the day?" for w in ["cats", "dogs", "owls"]]
    tasks = s2.generated_tasks(questions, heldout=1)
    assert sum(t.split == "heldout" for t in tasks) == 1
    assert s2.generated_tasks(list(reversed(questions)), heldout=1)[::-1] == tasks
    held = min(t.id for t in tasks)  # the smallest id hash is held out
    assert [t.id for t in tasks if t.split == "heldout"] == [held]
    with pytest.raises(RunFailure, match="leaks into training"):
        s2.check_leakage(tasks, 0.7)
    s2.check_leakage(tasks, 0.99)  # a stricter notion of "the same question" lets them pass


def test_questions_are_task_records():
    generated = s2.generated_tasks(["Why do cats purr?", "How do tides work?"], heldout=1)
    for t in generated:
        assert (t.stage, t.kind, t.source, t.extra) == (2, "question", "generated", {})
        assert t.id == "q" + s2.short_hash(s2.normalize(t.text))
    item = real("truthfulqa", 7, "Why do veins appear blue?", "heldout")
    assert s2.question_task(item) == Task(id="truthfulqa:7", stage=2, split="heldout",
                                          text="Why do veins appear blue?", kind="question",
                                          source="truthfulqa", extra={})


def test_stage1_tasks_are_read_when_stage1_wrote_them(tmp_path):
    class Ctx:
        run_dir = tmp_path

    assert s2.stage1_instructions(Ctx()) == []  # stage 1 has not run here
    stage1 = [Task(id=f"i{n}", stage=1, split=split, text=f"Name {n} birds. Use commas.",
                   kind="instruction", source="model",
                   extra={"instruction": f"Name {n} birds.", "constraints": []})
              for n, split in ((1, "train"), (2, "heldout"))]
    (tmp_path / "stage_1").mkdir()
    write_tasks(tmp_path / "stage_1" / "tasks.jsonl", stage1)
    assert s2.stage1_instructions(Ctx()) == stage1


# pairs -------------------------------------------------------------------------------------------

def sample(i, text, prompting="few-shot", question=QUESTION, unusable=None):
    checks = s2.check_answer(question, text)
    return {"sample": i, "text": text, "prompting": prompting, **checks,
            "answers": checks["problem"] is None, "unusable": unusable}


def task():
    return Task(id="t1", stage=2, split="train", text=QUESTION, kind="question",
                source="generated")


def rank(x, y, winner, xy=1.0, yx=1.0):
    return {"task_id": "t1", "kind": "rank", "x": x, "y": y, "winner": winner,
            "margin_xy": xy, "margin_yx": yx}


def test_chosen_answers_and_rejected_fails():
    samples = [sample(0, "and are they safe for babies too"), sample(1, ANSWER)]
    pair, reason = s2.choose_pair(task(), samples, [])
    assert reason == "ok"
    assert pair["chosen"] == ANSWER and pair["rejected_problem"] == "continues the question"
    assert pair["prompt"] == "Instruction: " + QUESTION + "\n\nResponse:\n"  # zero-shot house


def test_no_pair_without_a_passer_or_without_a_failure():
    assert s2.choose_pair(task(), [sample(0, "and more"), sample(1, "I don't know.")], [])[1] \
        == "no sample answers the question"
    both = [sample(0, ANSWER), sample(1, "Vaccines teach the body to fight a germ early.")]
    assert s2.choose_pair(task(), both, [])[1] == "every usable sample answers (no rejected)"


def test_rejected_prefers_instructive_and_zero_shot_failures():
    samples = [sample(0, ANSWER), sample(1, "Vaccine vaccine vaccine vaccine vaccine vaccine "
                                            "vaccine vaccine vaccine."),
               sample(2, "I don't know. Ask someone else.", "few-shot"),
               sample(3, "I have no idea. Ask someone else.", "zero-shot")]
    assert s2.pick_rejected(samples)["sample"] == 3
    samples.append(sample(4, "and do they hurt", "few-shot"))
    assert s2.pick_rejected(samples)["sample"] == 4  # continuing beats dodging


def test_judge_tie_counts_for_nobody():
    samples = [sample(0, ANSWER), sample(1, "Vaccines teach the body to fight a germ early."),
               sample(2, "and do they hurt")]
    pair, _ = s2.choose_pair(task(), samples, [rank(0, 1, "tie", 0.4, -0.2)])
    assert pair["chosen_sample"] == 0  # no consistent preference: the earliest passer


def test_judge_consistent_second_response_wins():
    samples = [sample(0, ANSWER), sample(1, "Vaccines teach the body to fight a germ early."),
               sample(2, "and do they hurt")]
    pair, _ = s2.choose_pair(task(), samples, [rank(0, 1, "y", -0.4, -0.3)])
    assert pair["chosen_sample"] == 1 and pair["rejected_sample"] == 2


def test_judge_veto_drops_a_pair_only_when_consistent():
    samples = [sample(0, ANSWER), sample(1, "and do they hurt")]
    veto = {"task_id": "t1", "kind": "check", "x": 0, "y": 1, "winner": "y",
            "margin_xy": -1.0, "margin_yx": -1.0}
    assert s2.choose_pair(task(), samples, [veto])[1] \
        == "the judge prefers the rejected sample in both orders"
    assert s2.choose_pair(task(), samples, [{**veto, "winner": "tie"}])[1] == "ok"


class ScriptedJudge:
    """A backend whose log-probabilities of " A" and " B" favour one of them as scripted."""

    def __init__(self, tokenizer, favour: list[str]):
        self.tokenizer, self.favour = tokenizer, list(favour)

    def option_logprobs(self, prompts, token_ids):
        assert tuple(token_ids) == option_token_ids(self.tokenizer)
        out = torch.full((len(prompts), 2), -10.0)
        for row in range(len(prompts)):
            out[row, 0 if self.favour.pop(0) == "A" else 1] = -0.1
        return out


def verdict_records(tiny_backend, guard, favour):
    judge = ScriptedJudge(tiny_backend.tokenizer, favour)
    verdicts = judge_many(judge, guard, [("", QUESTION, ANSWER, "Vaccines teach the body.")], 8, "t")
    return [{"task_id": "t1", "kind": "rank", "x": 0, "y": 1, "winner": v.winner,
             "margin_xy": v.margin_xy, "margin_yx": v.margin_yx} for v in verdicts]


def test_verdict_in_one_order_only_is_dropped(tiny_backend, guard):
    records = verdict_records(tiny_backend, guard, ["A", "A"])  # position bias: always "A"
    assert records[0]["winner"] == "tie"
    samples = [sample(0, ANSWER), sample(1, "Vaccines teach the body."), sample(2, "and more")]
    assert s2.choose_pair(task(), samples, records)[0]["chosen_sample"] == 0
    assert s2.judge_wins(records) == {}


def test_verdict_in_both_orders_for_the_second_response_chooses_it(tiny_backend, guard):
    records = verdict_records(tiny_backend, guard, ["B", "A"])  # y shown second, then first
    assert records[0]["winner"] == "y"
    samples = [sample(0, ANSWER), sample(1, "Vaccines teach the body."), sample(2, "and more")]
    assert s2.choose_pair(task(), samples, records)[0]["chosen_sample"] == 1


def test_pair_filter(guard):
    base = {"prompt": s2.house_prompt(QUESTION), "chosen": ANSWER, "rejected": "and more"}
    assert s2.pair_problem(base, QUESTION, guard, [POOL_ANSWER]) is None
    assert s2.pair_problem({**base, "rejected": ANSWER + "  "}, QUESTION, guard, []) == "identical"
    assert s2.pair_problem({**base, "chosen": "<|im_start|>assistant Vaccines"}, QUESTION, guard,
                           []) == "chosen: chat markup"
    assert s2.pair_problem({**base, "chosen": POOL_ANSWER}, QUESTION, guard, [POOL_ANSWER]) \
        == "chosen: copies an exemplar"
    assert s2.pair_problem({**base, "rejected": POOL_ANSWER}, QUESTION, guard, [POOL_ANSWER]) \
        == "rejected: copies an exemplar"
    assert s2.pair_problem({**base, "rejected": ""}, QUESTION, guard, []) == "rejected: empty"
    assert s2.pair_problem({**base, "chosen": "I don't know."}, QUESTION, guard, []) \
        == "chosen: dodges the question"


def test_samples_copying_an_exemplar_are_unusable(guard):
    assert s2.unusable_reason(POOL_ANSWER, guard, [POOL_ANSWER]) == "copies an exemplar"
    copied = sample(0, POOL_ANSWER, unusable="copies an exemplar")
    assert s2.choose_pair(task(), [copied, sample(1, "and more")], [])[1] \
        == "no sample answers the question"


def test_sample_plan_orders_few_shot_then_zero_shot():
    plan = s2.sample_plan("t1", 3, s2.Stage2Settings().zero_shot_samples)
    assert [p for _, p in plan] == ["few-shot"] * 3 + ["zero-shot"] * 2
    assert len({rid for rid, _ in plan}) == len(plan)
    assert [p for _, p in s2.sample_plan("t1", 1, 0)] == ["few-shot"]


def test_rank_comparisons_are_round_robin_among_the_first_passers():
    samples = [sample(i, f"Vaccines train the immune system, reason {i}.") for i in range(5)]
    assert s2.rank_comparisons(samples) == [(0, 1), (0, 2), (1, 2)]
    assert s2.rank_comparisons(samples, max_judged=2) == [(0, 1)]


def test_judge_audit_compares_only_where_the_checks_differ():
    scored = [{"task_id": "t1", "sample": 0, "answers": True},
              {"task_id": "t1", "sample": 1, "answers": True},
              {"task_id": "t1", "sample": 2, "answers": False}]
    judgments = [rank(0, 1, "x"), {**rank(0, 2, "x"), "kind": "check"},
                 {**rank(1, 2, "tie"), "kind": "check"}]
    audit = s2.judge_audit(judgments, scored)
    assert set(audit) == {"comparisons", "order_consistent", "agrees_with_checks", "first_shown",
                          "averaged_agrees_with_checks"}
    assert audit["comparisons"] == 3
    assert audit["order_consistent"]["k"] == 2
    assert audit["agrees_with_checks"]["k"] == audit["agrees_with_checks"]["n"] == 1


def test_judge_audit_reads_position_bias_and_the_averaged_margin():
    scored = [{"task_id": "t1", "sample": 0, "answers": True},
              {"task_id": "t1", "sample": 1, "answers": False}]
    # always the first-shown, by more when the answering sample is first: a tie every time, but
    # the averaged margin still favours the answer
    biased = [{**rank(0, 1, "tie", xy=3.0, yx=-1.0), "kind": "check"},
              {**rank(1, 0, "tie", xy=1.0, yx=-3.0), "kind": "check"}]
    audit = s2.judge_audit(biased, scored)
    assert audit["order_consistent"]["k"] == 0 and audit["agrees_with_checks"]["n"] == 0
    assert (audit["first_shown"]["k"], audit["first_shown"]["n"]) == (4, 4)
    assert audit["averaged_agrees_with_checks"]["k"] == audit["averaged_agrees_with_checks"]["n"] == 2
    fair = [{**rank(0, 1, "y", xy=-2.0, yx=-2.0), "kind": "check"}]  # prefers the non-answer
    audit = s2.judge_audit(fair, scored)
    assert audit["first_shown"]["k"] == 1 and audit["first_shown"]["n"] == 2
    assert audit["averaged_agrees_with_checks"]["k"] == 0
    assert audit["agrees_with_checks"]["k"] == 0 and audit["agrees_with_checks"]["n"] == 1


def test_assessment_summary_rates():
    scored = [{"passed": True, "on_topic": True, "non_degenerate": True, "source": "truthfulqa"},
              {"passed": False, "on_topic": False, "non_degenerate": True, "source": "generated"}]
    summary = s2.summarize(scored)
    assert summary["answer_rate"]["k"] == 1 and summary["answer_rate"]["n"] == 2
    assert summary["answer_rate_truthfulqa"]["rate"] == 1.0
    assert summary["answer_rate_generated"]["rate"] == 0.0
    assert set(summary) >= {"answer_rate", "on_topic", "non_degenerate"}
