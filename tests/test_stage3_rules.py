"""Stage 3's checkers, task, split and pair rules on hand-written cases (no model; the stage end
to end is tests/test_stage3_e2e.py)."""
import dataclasses
import random

import pytest

from core.errors import NoPairsError, RunFailure, UsageError
from core.guards import TemplateGuard
from core.judge import consistent_winner, winning_sample
from core.prompting import house_prompt
from core.records import Task
from core.stats import rate
from core.text import NearDuplicateFilter
from stages import stage3_generation_tasks as s3

VOLCANO_KEYWORDS = ["volcano", "lava", "magma", "eruption", "carbon dioxide"]


def spec(kind, count, keywords=VOLCANO_KEYWORDS):
    return {"kind": kind, "count": count, "topic": "volcanoes", "keywords": keywords}


def passes(text, kind, count, keywords=VOLCANO_KEYWORDS):
    return s3.check_response(text, spec(kind, count, keywords))


# checkers ----------------------------------------------------------------------------------------

def test_questions_exact_count_with_or_without_markers():
    text = "1. Why do volcanoes erupt?\n2. What is lava made of?\n3. Where is the largest volcano?"
    assert passes(text, "questions", 3) == dict.fromkeys(s3.CHECKS, True)
    bare = "Why do volcanoes erupt?\nWhat is lava made of?"
    assert all(passes(bare, "questions", 2).values())
    assert not passes(bare, "questions", 3)["count_ok"]


def test_questions_reject_statements_and_trailing_text():
    stray = "Why do volcanoes erupt?\nWhat is lava made of?\nVolcanoes are mountains."
    result = passes(stray, "questions", 2)
    assert result["count_ok"] and not result["format_ok"]  # two questions, but not only questions
    assert not passes("Volcanoes erupt.\nLava is hot.", "questions", 2)["count_ok"]


def test_header_line_is_not_an_item():
    text = "Here are two questions about volcanoes:\n- Why do volcanoes erupt?\n- What is magma?"
    assert all(passes(text, "questions", 2).values())
    only_header = "Here are two questions about volcanoes:"
    assert not passes(only_header, "questions", 2)["format_ok"]


@pytest.mark.parametrize("marker", ["- ", "* ", "1. ", "1) "])
def test_list_markers(marker):
    numbered = marker[0].isdigit()
    lines = [(f"{i}{marker[1:]}" if numbered else marker) + text for i, text in
             enumerate(["Lava flows slowly downhill.", "Magma cools into rock.",
                        "Ash clouds block sunlight."], start=1)]
    assert all(passes("\n".join(lines), "list", 3).values())
    assert all(passes("\n".join(lines), "examples", 3).values())


def test_list_items_must_be_marked_and_numbered_in_order():
    unmarked = "Lava flows slowly downhill.\nMagma cools into rock."
    assert passes(unmarked, "list", 2)["count_ok"] is False
    assert passes(unmarked, "examples", 2)["format_ok"] is False
    jumbled = "2. Lava flows slowly downhill.\n1. Magma cools into rock."
    result = passes(jumbled, "list", 2)
    assert result["count_ok"] and not result["format_ok"]
    extra = "- Lava flows slowly downhill.\n- Magma cools into rock.\nI hope this helps!"
    assert not passes(extra, "list", 2)["format_ok"]
    assert not passes(extra.replace("I hope this helps!", "- Ash falls."), "list", 2)["count_ok"]


MCQ = ("Which liquid rock flows out of an erupting volcano?\n"
       "A. Lava\nB. Granite\nC. Sand\nD. Clay\nAnswer: A")


def test_mcq_well_formed():
    assert all(passes(MCQ, "mcq", 1).values())
    styles = MCQ.replace("A. ", "A) ").replace("B. ", "B) ").replace("C. ", "(C) ").replace(
        "Answer: A", "Answer: (A) Lava")
    assert all(passes(styles, "mcq", 1).values())


@pytest.mark.parametrize("broken, count_ok", [
    (MCQ.replace("D. Clay\n", ""), False),                      # three options
    (MCQ.replace("D. Clay\n", "D. Clay\nE. Ice\n"), False),     # five options
    (MCQ.replace("B. Granite", "C. Granite"), False),           # labels not A-D
    (MCQ.replace("Answer: A", "Answer: E"), False),             # answer is not an option
    (MCQ.replace("Answer: A", "The answer is lava."), False),   # no answer line
    (MCQ + "\nThis question tests basic geology.", True),       # text after the item
])
def test_mcq_format_failures(broken, count_ok):
    result = passes(broken, "mcq", 1)
    assert not result["format_ok"] and result["count_ok"] is count_ok


def test_mcq_two_items_and_wrong_count():
    second = ("What is molten rock called while it is still underground?\n"
              "A. Lava\nB. Magma\nC. Basalt\nD. Steam\nAnswer: B")
    two = f"1. {MCQ}\n\n2. {second}"
    assert all(passes(two, "mcq", 2).values())
    result = passes(two, "mcq", 1)
    assert not result["count_ok"] and result["format_ok"]


def test_mcq_duplicate_options_are_not_distinct():
    dup = MCQ.replace("B. Granite", "B. lava")
    assert passes(dup, "mcq", 1)["distinct_items"] is False


def test_topic_relevance_uses_stems_and_phrases():
    assert s3.mentions_topic("The eruptions were huge.", ["eruption"])
    assert s3.mentions_topic("Volcanoes are mountains.", ["volcano"])
    assert s3.mentions_topic("Plants absorb carbon dioxide.", ["carbon dioxide"])
    assert not s3.mentions_topic("Plants absorb carbon and dioxide.", ["carbon dioxide"])
    assert not s3.mentions_topic("Cats sleep all day.", VOLCANO_KEYWORDS)
    off = "- Cats sleep all day.\n- Dogs like long walks."
    assert passes(off, "list", 2) == {**dict.fromkeys(s3.CHECKS, True), "on_topic": False}


def test_near_duplicate_items_fail_distinctness():
    dup = "- Lava is very hot rock.\n- Lava is very hot rock indeed."
    assert passes(dup, "list", 2)["distinct_items"] is False
    assert passes("- Lava is hot.\n- Magma is underground.", "list", 2)["distinct_items"] is True


def test_distinctness_follows_the_run_threshold():
    close = "- Lava flows slowly downhill.\n- Lava flows slowly into the sea."
    assert passes(close, "list", 2)["distinct_items"] is True
    assert s3.check_response(close, spec("list", 2), threshold=0.5)["distinct_items"] is False


def test_unusable_reasons():
    guard = TemplateGuard()
    assert s3.unusable_reason("", guard, []) == "empty"
    assert s3.unusable_reason("- Lava.\nInstruction: write more", guard, []) == "prompt scaffolding"
    assert s3.unusable_reason("- Lava <|im_end|>", guard, []) == "chat markup"
    assert s3.unusable_reason("- lava lava lava lava lava lava lava lava lava", guard, []) \
        == "repetitive line"
    # repeated items are a distinct_items failure, not noise: still usable as a rejected sample
    repeated = "\n".join(["- Why do volcanoes erupt so often?"] * 4)
    assert s3.unusable_reason(repeated, guard, []) is None


# tasks, topics and the split ---------------------------------------------------------------------

POOL = s3.load_pool()


def topic(name, source="pool", examples="famous things", keywords=("thing",)):
    return {"name": name, "examples": examples, "keywords": list(keywords), "source": source}


def test_render_task_is_deterministic_and_carries_its_spec():
    t = topic("volcanoes", examples="famous volcanoes", keywords=VOLCANO_KEYWORDS)
    for kind in s3.KINDS:
        a = s3.render_task(t, kind, random.Random(3), POOL)
        assert a == s3.render_task(t, kind, random.Random(3), POOL)
        assert a.extra["spec"]["kind"] == kind and a.extra["spec"]["keywords"] == VOLCANO_KEYWORDS
        assert a.kind == kind and a.stage == 3 and a.source == "pool"
        assert "volcanoes" in a.text and "{" not in a.text
        low, high = (1, 3) if kind == "mcq" else s3.item_counts(s3.Stage3Settings())[kind]
        assert low <= a.extra["spec"]["count"] <= high


def test_item_counts_come_from_the_settings():
    counts = s3.item_counts(s3.Stage3Settings(item_counts=(4, 4), mcq_item_counts=(3, 3)))
    topics = [topic(f"topic number {w}") for w in ["alpha", "beta", "gamma"]]
    tasks = s3.tasks_for(topics, 16, "train", POOL, 0, counts)
    assert {t.extra["spec"]["count"] for t in tasks if t.kind != "mcq"} == {4}
    assert {t.extra["spec"]["count"] for t in tasks if t.kind == "mcq"} <= {1, 3}
    default = s3.tasks_for(topics, 16, "train", POOL, 0)
    assert default == s3.tasks_for(topics, 16, "train", POOL, 0,
                                   s3.item_counts(s3.Stage3Settings()))
    for bad in ((3, 2), (0, 2), (2, 3, 4)):
        with pytest.raises(UsageError, match="stage3.item_counts"):
            s3.item_counts(s3.Stage3Settings(item_counts=bad))


def test_model_topics_never_get_examples_templates():
    t = topic("tide pools", source="model", examples=None, keywords=["tide", "pools"])
    for seed in range(40):
        task = s3.render_task(t, "examples", random.Random(seed), POOL)
        assert "None" not in task.text and "tide pools" in task.text
        assert task.source == "model"


def test_topic_filter():
    f = NearDuplicateFilter(0.7)
    f.kept.append("the solar system")
    guard, probes = TemplateGuard(), ["Write 3 questions about volcanoes."]
    assert s3.topic_problem("the Solar System", guard, f, probes) == "near-duplicate"
    assert s3.topic_problem("Topic 7: tides", guard, f, probes) == "list scaffolding"
    assert s3.topic_problem("the and of", guard, f, probes) == "no content words"
    assert s3.topic_problem("a b c d e f g h", guard, f, probes) == "more than 6 words"
    assert s3.topic_problem("Volcano", guard, f, probes) == "topic of an evaluation probe"
    assert s3.topic_problem("tide pools", guard, f, probes) is None and "tide pools" in f.kept
    assert s3.clean_topic(' "tide pools." ') == "tide pools"


def test_probe_topics_match_as_a_phrase():
    probes = ["Write 5 questions a student might ask about the solar system.",
              "List 4 tips for sleeping better."]
    assert s3.is_probe_topic("the solar system", probes)
    assert s3.is_probe_topic("Sleep", probes)
    assert not s3.is_probe_topic("the immune system", probes)  # one shared word is not a topic


def test_split_is_by_topic_and_leakage_is_checked():
    topics = [topic(f"topic number {w}") for w in
              ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]]
    held, train = s3.split_topics(topics, limit=6, heldout=2)
    assert len(held) == 2 and not {t["name"] for t in held} & {t["name"] for t in train}
    assert s3.split_topics(list(reversed(topics)), 6, 2) == (held, train)  # stable
    tasks = (s3.tasks_for(held, 2, "heldout", POOL, 0) + s3.tasks_for(train, 6, "train", POOL, 0))
    assert [t.split for t in tasks].count("heldout") == 2
    assert len({t.id for t in tasks}) == len(tasks)
    assert {t.extra["spec"]["kind"] for t in tasks if t.split == "train"} == set(s3.KINDS)
    s3.check_leakage(tasks)
    leaked = tasks + [dataclasses.replace(tasks[0], id="gother", split="train")]
    with pytest.raises(RunFailure, match="leaks into training"):
        s3.check_leakage(leaked)


def test_exemplar_shots_include_the_task_kind():
    for seed in range(10):
        shots = s3.exemplar_shots(POOL, "mcq", random.Random(seed))
        assert 3 <= len(shots) <= 4
        assert sum("Answer:" in response for _, response in shots) >= 1


def test_a_numbered_answer_opens_with_one_and_passes_only_when_written_on():
    t = topic("volcanoes", examples="famous volcanoes", keywords=VOLCANO_KEYWORDS)
    tasks = [s3.render_task(t, kind, random.Random(seed), POOL)
             for kind in s3.KINDS for seed in range(12)]
    single_mcq = [x for x in tasks if x.kind == "mcq" and x.extra["spec"]["count"] == 1]
    assert single_mcq and all(s3.task_opening(x) == "" for x in single_mcq)
    assert all(s3.task_opening(x) == "1." for x in tasks if x not in single_mcq)
    # a list written on from the opening passes; the opening alone is no answer
    assert all(passes("1. Why does lava glow?\n2. What is magma?", "questions", 2).values())
    assert not passes(s3.LIST_OPENING, "questions", 2)["count_ok"]


def test_next_line_of_a_list_written_item_by_item():
    three = spec("questions", 3)
    assert s3.next_line("1. Why does lava glow?", three) == "\n2."
    assert s3.next_line("1. Why does lava glow?\n2. What is magma?", three) == "\n3."
    assert s3.next_line("1. A?\n2. B?\n3. C?", three) is None  # the count is reached
    assert s3.next_line("1. A?\n3. C?", three) is None  # numbering broken: no scaffold
    assert s3.next_line("1. A?\nLava is hot.", three) is None  # prose after the item
    assert s3.next_line("1. A?\n2.", three) is None  # an empty item


def test_next_line_of_a_multiple_choice_item_written_line_by_line():
    one, two = spec("mcq", 1), spec("mcq", 2)
    stem = "Which gas do volcanoes release most?"
    lines = [stem, "A. Water vapour", "B. Helium", "C. Neon", "D. Argon", "Answer: A"]
    expected = ["\nA.", "\nB.", "\nC.", "\nD.", "\nAnswer:", None]
    for k, want in enumerate(expected, start=1):
        assert s3.next_line("\n".join(lines[:k]), one) == want
    item = "\n".join(lines)
    assert s3.next_line("1. " + item, two) == "\n\n2."  # the next item of two
    assert s3.next_line("1. " + item + "\n\n2. " + item.replace("most", "least"), two) is None
    assert all(s3.check_response(item, one).values())  # what the scaffold completes passes
    assert s3.next_line(stem + "\nB. Helium", one) is None  # a label out of order
    assert s3.next_line(stem + "\nThe gas is hot.", one) is None  # a second stem line
    assert s3.next_line(item.replace("Answer: A", "Answer: E"), one) is None  # no such option
    assert s3.next_line("", one) is None


def test_topic_list_prompt_is_a_numbered_continuation():
    assert s3.topic_list_prompt(["tides", "owls"]).endswith("Topic 2: owls\nTopic 3:")


# pairs -------------------------------------------------------------------------------------------

TASK = Task(id="g1", stage=3, split="train", text="Write 2 questions about volcanoes.",
            kind="questions", source="pool", extra={"spec": spec("questions", 2)})
GOOD = "Why do volcanoes erupt?\nWhat is lava made of?"
GOOD_2 = "1. How hot is lava?\n2. Which volcano is the tallest?"


def sample(i, text, unusable=None):
    scored = s3.score_sample(text, TASK.extra["spec"], TemplateGuard(), [])
    return {"task_id": "g1", "sample": i, "text": text, **scored,
            "unusable": unusable or scored["unusable"]}


def judgment(x, y, margin_xy, margin_yx):
    return {"task_id": "g1", "x": x, "y": y, "margin_xy": margin_xy, "margin_yx": margin_yx,
            "winner": consistent_winner(margin_xy, margin_yx)}


def test_chosen_passes_rejected_is_the_failure_passing_most_checks():
    samples = [sample(0, "Cats are nice."),                                  # 2 checks pass
               sample(1, GOOD),
               sample(2, "Why do volcanoes erupt?\nWhat is lava made of?\nIs ash hot?")]  # 3 pass
    pair, reason = s3.choose_pair(TASK, samples, [])
    assert reason == "ok" and pair["chosen"] == GOOD and pair["rejected_sample"] == 2
    assert samples[2]["checks_passed"] > samples[0]["checks_passed"]


def test_training_prompt_is_zero_shot_house_format():
    pair, _ = s3.choose_pair(TASK, [sample(0, GOOD), sample(1, "Lava.")], [])
    assert pair["prompt"] == house_prompt(TASK.text)
    assert pair["prompt"].count("Instruction:") == 1 and "###" not in pair["prompt"]


def counted_task(count, template="Write {count} questions about {topic}."):
    task_spec = {**spec("questions", count), "template": template, "things": "facts",
                 "examples": None, "count_word": True}
    return Task(id="g2", stage=3, split="train", text=s3.task_text(task_spec), kind="questions",
                source="pool", extra={"spec": task_spec})


HINDSIGHT = s3.Hindsight(s3.item_counts(s3.Stage3Settings()))
THREE = "Why do volcanoes erupt?\nWhat is lava made of?\nWhere is the tallest volcano?"


def scored_for(task, texts):
    return [{"task_id": task.id, "sample": i, "text": text,
             **s3.score_sample(text, task.extra["spec"], TemplateGuard(), [])}
            for i, text in enumerate(texts)]


def test_hindsight_restates_the_count_a_good_sample_wrote():
    task = counted_task(4)
    assert task.text == "Write four questions about volcanoes."
    samples = scored_for(task, [THREE, "Volcanoes are hot.\nLava flows."])
    assert s3.choose_pair(task, samples, []) == (None, "no sample passes the checks")
    pair, reason = s3.choose_pair(task, samples, [], HINDSIGHT)
    assert reason == "ok" and pair["source"] == "hindsight"
    assert pair["prompt"] == house_prompt("Write three questions about volcanoes.")
    assert pair["spec"]["count"] == 3 and pair["stated_spec"]["count"] == 4
    assert (pair["chosen_sample"], pair["rejected_sample"]) == (0, 1)
    assert all(s3.check_response(pair["chosen"], pair["spec"]).values())
    assert not all(s3.check_response(pair["rejected"], pair["spec"]).values())
    assert not all(pair["rejected_checks"].values())


def test_hindsight_keeps_to_the_count_range_and_needs_a_failure():
    one = "Why do volcanoes erupt?"  # one item: below the range (2-5) of a questions task
    task = counted_task(4)
    assert s3.choose_pair(task, scored_for(task, [one, "Lava."]), [], HINDSIGHT)[0] is None
    # both samples have three good questions: the restated task has no failure (a tie)
    tie = [THREE, "1. Why do volcanoes erupt?\n2. What is magma?\n3. How hot is lava?"]
    assert s3.choose_pair(task, scored_for(task, tie), [], HINDSIGHT)[0] is None


def test_hindsight_never_restates_a_template_without_a_count():
    task = counted_task(1, template="Make a multiple-choice question about {topic}.")
    samples = scored_for(task, [THREE, "Lava."])
    assert s3.hindsight_pair(task, samples, HINDSIGHT) is None


def test_no_pair_without_a_passer_or_without_a_failure():
    assert s3.choose_pair(TASK, [sample(0, "Lava."), sample(1, "Ash.")], [])[1] \
        == "no sample passes the checks"
    assert s3.choose_pair(TASK, [sample(0, GOOD), sample(1, GOOD_2)], [])[1] \
        == "every usable sample passes (no rejected)"
    unusable = [sample(0, GOOD), sample(1, "Lava.", unusable="copies an exemplar")]
    assert s3.choose_pair(TASK, unusable, [])[1] == "every usable sample passes (no rejected)"


def test_judge_tie_leaves_the_first_passer():
    samples = [sample(0, GOOD), sample(1, GOOD_2), sample(2, "Lava.")]
    tie = [judgment(0, 1, 0.0, 0.0)]
    assert s3.choose_pair(TASK, samples, tie)[0]["chosen_sample"] == 0


def test_verdict_holding_in_one_order_only_is_dropped():
    samples = [sample(0, GOOD), sample(1, GOOD_2), sample(2, "Lava.")]
    one_order = [judgment(0, 1, -0.9, 0.4)]  # y wins when shown second... but not when first
    assert winning_sample(one_order[0]) is None
    assert s3.choose_pair(TASK, samples, one_order)[0]["chosen_sample"] == 0


def test_verdict_in_both_orders_for_the_second_response_chooses_it():
    samples = [sample(0, GOOD), sample(1, GOOD_2), sample(2, "Lava.")]
    both = [judgment(0, 1, -0.4, -0.3)]
    assert winning_sample(both[0]) == 1
    pair, _ = s3.choose_pair(TASK, samples, both)
    assert pair["chosen"] == GOOD_2


def test_judge_audit_comparison_never_lets_a_failure_win():
    samples = [sample(0, GOOD), sample(1, "Lava.")]
    failure_wins = [judgment(0, 1, -2.0, -2.0)]  # the judge prefers the failure in both orders
    pair, _ = s3.choose_pair(TASK, samples, failure_wins)
    assert pair["chosen"] == GOOD
    audit = s3.judge_audit([{**failure_wins[0], "winner": "y"}], samples)
    assert audit["agrees_with_checks"]["rate"] == 0.0
    assert audit["comparisons"] == 1 and audit["order_consistent"]["rate"] == 1.0


def test_comparisons_rank_passers_and_audit_one_failure():
    samples = [sample(0, GOOD), sample(1, GOOD_2), sample(2, "Lava."), sample(3, GOOD),
               sample(4, "Why do volcanoes erupt?\nWhat is lava?\nIs ash hot?")]
    assert s3.comparisons_for(samples) == [(0, 1), (0, 4)]  # sample 3 repeats 0; 4 fails least


def test_comparisons_respect_max_judged_samples():
    samples = [sample(0, GOOD), sample(1, GOOD_2), sample(2, "Lava."),
               sample(3, "1. Is lava hot?\n2. Can volcanoes sleep?")]
    assert s3.comparisons_for(samples) == [(0, 1), (0, 3), (1, 3), (0, 2)]
    assert s3.comparisons_for(samples, max_judged=2) == [(0, 1), (0, 2)]


def test_pair_filter_identical_markup_scaffolding_and_exemplar_copies():
    guard = TemplateGuard()
    exemplars = s3.exemplar_texts(POOL)
    base = {"prompt": house_prompt(TASK.text), "chosen": GOOD, "rejected": "Lava."}
    assert s3.pair_problem(base, guard, exemplars) is None
    assert s3.pair_problem({**base, "rejected": GOOD.replace("\n", "  \n ")}, guard, []) \
        == "identical"
    assert s3.pair_problem({**base, "chosen": GOOD + "<|im_start|>"}, guard, []) \
        == "chosen: chat markup"
    assert s3.pair_problem({**base, "rejected": "Lava.\nTopic 4: owls"}, guard, []) \
        == "rejected: prompt scaffolding"
    copied = POOL["response_exemplars"][0]["response"]
    assert s3.pair_problem({**base, "chosen": copied}, guard, exemplars) \
        == "chosen: copies an exemplar"
    assert s3.pair_problem({**base, "prompt": "<|im_start|>user\nhi"}, guard, []) \
        == "chat markup in prompt"


def test_make_pairs_fails_clearly_when_no_task_yields_a_pair(tmp_path, tiny_dir):
    from core.constitution import load_constitution
    from core.context import StageContext
    from core.io import write_jsonl
    from core.models import PROJECT_ROOT
    from core.records import TASKS_FILE, write_tasks
    from registry.models import profile_by_name

    ctx = StageContext(run_dir=tmp_path, number=3, model_path=str(tiny_dir), origin="test",
                       profile=profile_by_name("tiny-qwen2"), seed=0, limit=1, heldout=1,
                       constitution=load_constitution(PROJECT_ROOT / "constitution.yaml"),
                       settings=s3.Stage3Settings(), log=lambda _: None)
    write_tasks(ctx.path(TASKS_FILE), [TASK])
    write_jsonl(ctx.path("scores.jsonl"), [sample(0, "Lava."), sample(1, "Ash.")])
    write_jsonl(ctx.path("judgments.jsonl"), [])
    with pytest.raises(NoPairsError, match="no preference pairs"):
        s3.make_pairs(ctx, POOL)
    assert "no sample passes" in ctx.path("pairs_dropped.jsonl").read_text()


def test_earlier_stages_heldout_items_are_read_when_present(tmp_path):
    from types import SimpleNamespace

    from core.records import MissingEarlierOutputError, write_tasks

    ctx = SimpleNamespace(run_dir=tmp_path)
    assert s3.earlier_heldout(ctx) == []
    write_tasks(tmp_path / "stage_1" / "tasks.jsonl",
                [Task("t1", 1, "heldout", "Describe rain. Use two sentences.", "instruction",
                      "model", {"instruction": "Describe rain.", "constraints": []}),
                 Task("t2", 1, "train", "Describe snow.", "instruction", "model",
                      {"instruction": "Describe snow.", "constraints": []})])
    write_tasks(tmp_path / "stage_2" / "tasks.jsonl",
                [Task("q1", 2, "heldout", "Why is the sea salty?", "question", "model", {})])
    assert s3.earlier_heldout(ctx) == [("stage1:t1", "Describe rain. Use two sentences."),
                                       ("stage2:q1", "Why is the sea salty?")]
    # a DONE earlier stage without its tasks is an error, not "that stage has not run"
    (tmp_path / "stage_2" / "tasks.jsonl").unlink()
    (tmp_path / "stage_2" / "DONE").touch()
    with pytest.raises(MissingEarlierOutputError, match="stage_2"):
        s3.earlier_heldout(ctx)


def test_assessment_summary_has_headline_and_every_check():
    class Backend:  # a stand-in that answers one held-out task well and one badly
        source = cache_id = "fake"

        def generate(self, prompts, settings, seeds, on_finish):
            from core.backend import Completion

            for i, prompt in enumerate(prompts):
                on_finish(i, Completion(GOOD if "volcanoes" in prompt else "Owls.", "eos", 3))

    tasks = [TASK, Task("g2", 3, "heldout", "List 2 facts about owls.", "list", "pool",
                        {"spec": {**spec("list", 2), "topic": "owls", "keywords": ["owl"]}})]
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        out = s3.assess_generation(Backend(), TemplateGuard(), tasks, Path(tmp) / "c.jsonl",
                                   16, 4, "test")
    assert set(out["summary"]) == {"task_success", *s3.CHECKS, "distinct_items_when_count_ok"}
    assert out["summary"]["task_success"]["k"] == 1 and out["summary"]["task_success"]["n"] == 2
    # "Owls." has no two items to repeat: distinct, but not a list of the asked length
    assert out["summary"]["distinct_items"]["k"] == 2
    assert out["summary"]["distinct_items_when_count_ok"] == rate(1, 1)
    assert [i["passed"] for i in out["items"]] == [True, False]


def test_pair_material_is_what_the_stated_rule_needs():
    """A task draws another round of samples exactly when the stated rule finds no pair."""
    guard = TemplateGuard()

    def material(texts, exemplars=()):
        samples = [{"text": t} for t in texts]
        return s3.pair_material(TASK, samples, guard, list(exemplars))

    assert material([GOOD, "Lava."])
    assert not material(["Lava.", "Ash."])  # no passer
    assert not material([GOOD, GOOD_2])  # no failure
    # a failure that copies an exemplar is unusable: it cannot be the rejected side
    assert not material([GOOD, "Lava flows down the hill."], ["Lava flows down the hill."])
    for texts in (["Lava.", "Ash."], [GOOD, GOOD_2], [GOOD, "Lava."]):
        pair, _ = s3.choose_pair(TASK, [sample(i, t) for i, t in enumerate(texts)], [])
        assert (pair is not None) == material(texts)
