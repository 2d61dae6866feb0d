"""Stage 1's instruction, split and pair rules on hand-written cases."""
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.constraints import compatible, response_opening
from core.errors import RunFailure
from core.guards import TemplateGuard
from core.records import TASKS_FILE, Task, read_tasks, write_tasks
from stages import stage1_explicit_instructions as s1

LOWER = [{"kind": "lowercase", "params": {}}]
POOL_EXEMPLAR = "The water cycle moves water between oceans, air and land through evaporation and rain."


def sample(i, text, passed, unusable=None, fraction=None):
    return {"sample": i, "text": text, "passed": passed, "unusable": unusable,
            "pass_fraction": fraction if fraction is not None else float(passed),
            "constraint_results": [passed], "flaw": s1.chosen_flaw(text, LOWER)}


def scored(task_, texts):
    """Samples scored by the stage's own scorer against the task's stated constraints."""
    return [{"sample": i, "text": text, **s1.score_sample(text, task_.extra["constraints"],
                                                        NO_MARKUP, [POOL_EXEMPLAR])}
            for i, text in enumerate(texts)]


class NoMarkup:
    """A guard for rule tests on plain English texts (the real guard is tested below)."""

    def is_clean(self, text):
        return "<|" not in text


NO_MARKUP = NoMarkup()


def task(constraints):
    return Task(id="t1", stage=1, split="train",
                text=s1.instruction_with_constraints("Describe rain.", constraints),
                kind="instruction", source="model",
                extra={"instruction": "Describe rain.", "constraints": constraints})


def test_chosen_passes_and_rejected_fails():
    samples = [sample(0, "Rain Falls From Clouds.", False), sample(1, "rain falls from clouds.", True)]
    pair, reason = s1.choose_pair(task(LOWER), samples, [])
    assert reason == "ok"
    assert pair["chosen"] == "rain falls from clouds." and pair["rejected"] == "Rain Falls From Clouds."
    assert pair["prompt"] == "Instruction: Describe rain. " + s1.instruction_with_constraints("", LOWER).strip() \
        + "\n\nResponse:\n"


def test_training_prompt_is_zero_shot_house_format():
    pair, _ = s1.choose_pair(task(LOWER), [sample(0, "rain is wet.", True),
                                           sample(1, "Rain is wet.", False)], [])
    assert pair["prompt"].startswith("Instruction: Describe rain.")
    assert pair["prompt"].count("Instruction:") == 1 and "###" not in pair["prompt"]


def test_no_pair_when_nothing_passes_or_everything_passes():
    assert s1.choose_pair(task(LOWER), [sample(0, "A.", False), sample(1, "B.", False)], [])[0] is None
    assert s1.choose_pair(task(LOWER), [sample(0, "a b.", True), sample(1, "c d.", True)], [])[1] \
        == "every usable sample passes (no rejected)"


LOOP = "rain falls from the sky. rain falls from the sky. rain falls from the sky."


def test_a_passing_loop_is_never_chosen():
    samples = [sample(0, LOOP, True), sample(1, "Rain Falls.", False)]
    assert samples[0]["flaw"] == "repeats a sentence"
    assert s1.choose_pair(task(LOWER), samples, []) == \
        (None, "every passing sample is flawed (loops or echoes)")
    samples.append(sample(2, "rain is water from clouds.", True))
    assert s1.choose_pair(task(LOWER), samples, [])[0]["chosen_sample"] == 2


def test_a_sample_that_parrots_its_constraint_is_never_chosen():
    start = [{"kind": "start_with", "params": {"phrase": "To begin with"}}]
    parrot = ("To begin with. To begin with the best job is to begin your response with the "
              "exact phrase to begin with.")
    t = task(start)
    samples = scored(t, [parrot, "Rain is water.", "To begin with, rain is water from clouds."])
    assert samples[0]["passed"] and samples[0]["flaw"] == "echoes a constraint sentence"
    assert samples[2]["flaw"] is None
    assert s1.choose_pair(t, samples, [])[0]["chosen_sample"] == 2


# Hindsight relabelling --------------------------------------------------------------------------

TWO = LOWER + [{"kind": "no_commas", "params": {}}]


def test_hindsight_drops_the_unmet_constraint():
    # Nothing meets both stated constraints; sample 0 meets "lowercase", sample 1 meets neither.
    t = task(TWO)
    samples = scored(t, ["rain falls softly, then it stops.", "Rain, Rain, Go Away."])
    assert s1.choose_pair(t, samples, []) == (None, "no sample passes the checks")
    pair, reason = s1.choose_pair(t, samples, [], hindsight_seed=0)
    assert reason == "ok" and pair["source"] == "hindsight"
    assert (pair["chosen_sample"], pair["rejected_sample"]) == (0, 1)
    assert pair["constraints"] == LOWER and pair["stated_constraints"] == TWO
    assert pair["prompt"] == s1.house_prompt(s1.instruction_with_constraints("Describe rain.", LOWER))
    assert "commas" not in pair["prompt"]


def test_hindsight_adds_a_constraint_the_chosen_meets_and_the_rejected_fails():
    t = task(LOWER)  # both samples are lowercase: no rejected under the stated constraint
    samples = scored(t, ["rain falls.", "rain falls from grey clouds, over the hills, "
                                        "and over the sea, for hours."])
    assert s1.choose_pair(t, samples, [])[1] == "every usable sample passes (no rejected)"
    pair, _ = s1.choose_pair(t, samples, [], hindsight_seed=0)
    labels = [s1.constraint_from_dict(c) for c in pair["constraints"]]
    assert pair["constraints"][0] == LOWER[0] and len(labels) == 2
    assert all(c.check(pair["chosen"]) for c in labels)
    assert not all(c.check(pair["rejected"]) for c in labels)
    assert s1.instruction_with_constraints("Describe rain.", pair["constraints"]) in pair["prompt"]
    again, _ = s1.choose_pair(t, samples, [], hindsight_seed=0)
    assert again == pair  # seeded: the same relabelling on a rerun


def test_hindsight_tie_gives_no_pair():
    # The two texts meet exactly the same catalogue constraints: nothing separates them.
    t = task(LOWER)
    samples = scored(t, ["rain falls.", "rain drops."])
    assert s1.choose_pair(t, samples, [], hindsight_seed=0) == \
        (None, "every usable sample passes (no rejected)")


def test_hindsight_never_uses_an_exemplar_copy_or_a_loop():
    t = task(LOWER)
    samples = scored(t, [POOL_EXEMPLAR, "rain falls."])
    assert samples[0]["unusable"] == "copies an exemplar"
    assert s1.choose_pair(t, samples, [], hindsight_seed=0)[0] is None
    samples = scored(t, [LOOP, "Rain falls."])
    pair, _ = s1.choose_pair(t, samples, [], hindsight_seed=0)
    assert pair is None or pair["chosen_sample"] == 1


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(texts=st.lists(st.text(alphabet=st.sampled_from(list("abc ABC,.-\n\"1P.S<>")), max_size=60),
                      min_size=2, max_size=4),
       stated=st.sampled_from([[], LOWER, TWO, [{"kind": "min_words", "params": {"n": 3}}]]),
       seed=st.integers(0, 3))
def test_hindsight_pair_always_separates_chosen_from_rejected(texts, stated, seed):
    t = task(stated)
    pair, reason = s1.choose_pair(t, scored(t, texts), [], hindsight_seed=seed)
    if pair is None or pair["source"] != "hindsight":
        return
    labels = [s1.constraint_from_dict(c) for c in pair["constraints"]]
    assert labels and all(c.check(pair["chosen"]) for c in labels)
    assert not all(c.check(pair["rejected"]) for c in labels)
    assert s1.looping_reason(pair["chosen"]) is None
    kinds = [c.kind for c in labels]
    assert all(compatible(a, b) for i, a in enumerate(kinds) for b in kinds[i + 1:])


def test_unusable_samples_are_never_used():
    samples = [sample(0, "rain.", True, unusable="empty"), sample(1, "Rain.", False)]
    assert s1.choose_pair(task(LOWER), samples, [])[1] == "no sample passes the checks"


def test_hardest_failure_is_rejected():
    two = LOWER + [{"kind": "no_commas", "params": {}}]
    samples = [sample(0, "rain falls softly.", True), sample(1, "Rain, Rain.", False, fraction=0.0),
               sample(2, "Rain falls softly.", False, fraction=0.5)]
    pair, _ = s1.choose_pair(task(two), samples, [])
    assert pair["rejected_sample"] == 2


def test_judge_tie_drops_unconstrained_task():
    samples = [sample(0, "Rain is water falling.", False), sample(1, "It rains a lot.", False)]
    tie = [{"task_id": "t1", "x": 0, "y": 1, "winner": "tie", "margin_xy": 0.4, "margin_yx": -0.2}]
    pair, reason = s1.choose_pair(task([]), samples, tie)
    assert pair is None and reason == "judge tie in both orders"


def test_judge_wrong_order_verdict_is_respected():
    # y wins in both orders: y is chosen even though x was shown first.
    samples = [sample(0, "Rain is water falling.", False), sample(1, "It rains a lot.", False)]
    verdict = [{"task_id": "t1", "x": 0, "y": 1, "winner": "y", "margin_xy": -0.4, "margin_yx": -0.3}]
    pair, _ = s1.choose_pair(task([]), samples, verdict)
    assert pair["chosen"] == "It rains a lot." and pair["source"] == "judge"


def test_judge_ranks_passers():
    samples = [sample(0, "rain falls.", True), sample(1, "rain is wet and cold.", True),
               sample(2, "RAIN.", False)]
    verdict = [{"task_id": "t1", "x": 0, "y": 1, "winner": "y", "margin_xy": -1, "margin_yx": -1}]
    assert s1.choose_pair(task(LOWER), samples, verdict)[0]["chosen_sample"] == 1


@pytest.fixture(scope="module")
def guard(tiny_backend):
    return TemplateGuard(tiny_backend.tokenizer)


def test_pair_filter_drops_identical_markup_scaffolding_and_exemplar_copies(guard):
    base = {"prompt": "Instruction: Describe rain.\n\nResponse:\n", "chosen": "rain falls.",
            "rejected": "Rain falls."}
    assert s1.pair_problem(base, guard, [POOL_EXEMPLAR]) is None
    assert s1.pair_problem({**base, "rejected": "rain  falls."}, guard, []) == "identical"
    assert s1.pair_problem({**base, "chosen": "<|im_start|>assistant rain"}, guard, []) \
        == "chosen: chat markup"
    assert s1.pair_problem({**base, "rejected": "ok\nTask 4: write"}, guard, []) \
        == "rejected: prompt scaffolding"
    assert s1.pair_problem({**base, "chosen": POOL_EXEMPLAR}, guard, [POOL_EXEMPLAR]) \
        == "chosen: copies an exemplar"
    assert s1.pair_problem({**base, "chosen": ""}, guard, []) == "chosen: empty"


def test_instruction_filter(guard):
    f = s1.NearDuplicateFilter(0.7)
    f.kept.append("Explain why the sky looks blue during the day.")
    assert s1.instruction_problem("Explain why the sky looks blue during the day time.", guard, f) \
        == "near-duplicate"
    assert s1.instruction_problem("Task 5: write a poem", guard, f) == "list scaffolding"
    assert s1.instruction_problem("hi", guard, f) == "fewer than 4 words"
    assert s1.instruction_problem("Write a haiku about autumn leaves falling.", guard, f) is None
    assert "Write a haiku about autumn leaves falling." in f.kept


WEIGHTS = s1.Stage1Settings().constraint_count_weights


def test_split_is_stable_and_leakage_checked():
    tasks = s1.attach_constraints([f"Write a story about a {w} who learns to fly." for w in
                                   ["cat", "dog", "fish", "horse", "bird", "cow"]], 0, WEIGHTS)
    split = s1.split_tasks(tasks, heldout=2)
    assert sum(t.split == "heldout" for t in split) == 2
    assert {t.id for t in split if t.split == "heldout"} == set(sorted(t.id for t in tasks)[:2])
    assert s1.split_tasks(list(reversed(tasks)), heldout=2) == sorted(
        split, key=lambda t: [x.id for x in reversed(tasks)].index(t.id))
    with pytest.raises(RunFailure, match="leaks into training"):
        s1.check_leakage(split, 0.7)  # these six differ by one word: ROUGE-L > 0.7
    s1.check_leakage(split, 0.99)  # not near-identical at a stricter threshold


def test_constraints_are_attached_deterministically():
    a = s1.attach_constraints(["Describe a sunny day at the beach."], 3, WEIGHTS)
    b = s1.attach_constraints(["Describe a sunny day at the beach."], 3, WEIGHTS)
    assert a == b and 0 <= len(a[0].extra["constraints"]) <= 2
    assert a[0].text.startswith("Describe a sunny day at the beach.")
    assert a[0].text == s1.instruction_with_constraints(a[0].extra["instruction"],
                                                        a[0].extra["constraints"])
    assert (a[0].stage, a[0].kind, a[0].source) == (1, "instruction", "model")
    assert a[0].extra["instruction"] == "Describe a sunny day at the beach."


def test_tasks_file_round_trips(tmp_path):
    tasks = s1.split_tasks(s1.attach_constraints(
        ["Describe a sunny day at the beach.", "List three uses of a paperclip at home."],
        0, WEIGHTS), heldout=1)
    write_tasks(tmp_path / TASKS_FILE, tasks)
    assert read_tasks(tmp_path / TASKS_FILE) == tasks
    assert [t.split for t in read_tasks(tmp_path / TASKS_FILE, "heldout")] == ["heldout"]


def test_list_prompt_is_a_numbered_continuation():
    prompt = s1.list_prompt(["A.", "B."])
    assert prompt.endswith("Task 2: B.\nTask 3:")


def test_each_response_prompt_shows_an_exemplar_of_every_constraint_kind_its_task_carries():
    import random

    exemplars = s1.load_pool()["response_exemplars"]
    constraints = [{"kind": "lowercase", "params": {}},
                   {"kind": "postscript", "params": {"marker": "P.S."}}]

    def kinds(exemplar):
        return {c["kind"] for c in exemplar.get("constraints") or []}

    drawn = [s1.draw_matching_exemplars(exemplars, constraints, random.Random(seed))
             for seed in range(40)]
    for shots in drawn:
        assert 3 <= len(shots) <= 4 and len({id(e) for e in shots}) == len(shots)
        assert any("lowercase" in kinds(e) for e in shots)
        assert any("postscript" in kinds(e) for e in shots)
    # the matched exemplars do not always stand in the same place, and the rest vary
    assert len({tuple(exemplars.index(e) for e in shots) for shots in drawn}) > 20
    # an unconstrained task (or a kind the pool never shows) gets 3-4 random exemplars
    plain = s1.draw_matching_exemplars(exemplars, [{"kind": "nonesuch", "params": {}}],
                                       random.Random(0))
    assert 3 <= len(plain) <= 4


def test_the_first_samples_of_a_task_with_a_fixed_beginning_start_from_its_opening():
    titled = Task(id="t2", stage=1, split="train", text="Write about rain.", kind="instruction",
                  source="model", extra={"instruction": "Write about rain.",
                                         "constraints": [{"kind": "title", "params": {}}]})
    from core.generation import GenRequest
    from core.sampling import sample_openings, with_openings

    def stated(task_):
        return response_opening(task_.extra["constraints"])

    openings = sample_openings([task(LOWER), titled], 4, 2, stated)
    assert openings == {"t2-0": "<<", "t2-1": "<<"}
    assert sample_openings([titled], 4, 0, stated) == {}
    assert sample_openings([titled], 1, 2, stated) == {"t2-0": "<<"}
    requests = [GenRequest(f"{t}-{j}", "Instruction: ...\n\nResponse:\n", 0)
                for t in ("t1", "t2") for j in range(4)]
    opened = with_openings(requests, openings)
    assert [r.prompt.endswith("Response:\n<<") for r in opened] == [False] * 4 + [True] * 2 + \
        [False] * 2
    assert [r.opening for r in opened] == [""] * 4 + ["<<"] * 2 + [""] * 2


def test_an_opened_passer_is_chosen_over_an_unopened_failure():
    titled = task([{"kind": "title", "params": {}}])
    samples = scored(titled, ["<<Rain>>\n\nRain is water that falls from clouds onto the land.",
                              "Rain is water that falls from clouds onto the fields and roads."])
    pair, reason = s1.choose_pair(titled, samples, [])
    assert reason == "ok" and pair["source"] == "checks"
    assert pair["chosen"].startswith("<<Rain>>") and pair["rejected"].startswith("Rain is")
    assert pair["prompt"] == s1.house_prompt(titled.text)  # the opening never reaches it


def test_hindsight_never_chooses_an_opened_sample_that_fails_its_openings_constraint():
    titled = task([{"kind": "title", "params": {}}])
    texts = ["<<Rain and clouds\n\nRain is water that falls from the clouds above us.",
             "Rain is water. It falls. It falls from clouds. It wets the roads. It fills rivers. "
             "It feeds plants.",
             "Rain falls from clouds when their droplets grow heavy enough to drop to the ground."]
    samples = [{"sample": i, "text": text, **s1.score_sample(
        text, titled.extra["constraints"], NO_MARKUP, [POOL_EXEMPLAR], "<<" if i == 0 else "")}
        for i, text in enumerate(texts)]
    assert samples[0]["flaw"] == "fails the constraint its opening came from"
    assert s1.score_sample(texts[0], titled.extra["constraints"], NO_MARKUP, [],
                           "")["flaw"] is None  # the same text without an opening is fine
    for seed in range(20):
        pair = s1.hindsight_pair(titled, samples, [], seed)
        assert pair is not None and pair["chosen_sample"] != 0
    closed = "<<Rain>>\n\nRain is water that falls from the clouds above us."
    assert s1.score_sample(closed, titled.extra["constraints"], NO_MARKUP, [], "<<")["flaw"] is None


def test_constraints_met_by_kind_counts_every_stated_constraint_of_every_sample():
    two = task([{"kind": "title", "params": {}}, {"kind": "min_words", "params": {"n": 3}}])
    samples = [{"task_id": "t1", "sample": 0, "constraint_results": [True, True], "opening": "<<"},
               {"task_id": "t1", "sample": 1, "constraint_results": [False, True]}]
    assert s1.met_by_kind([two], samples) == {"min_words": "2/2 (opened 1/1)",
                                              "title": "1/2 (opened 1/1)"}
