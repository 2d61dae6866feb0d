"""Tests for core.constraints: checkers, serialisation, validation and sampling."""

from __future__ import annotations

import json
import random

import pytest

from core.constraints import (
    END_PHRASES,
    EXCLUDED_WORDS,
    INCOMPATIBLE,
    KEYWORDS,
    KINDS,
    START_PHRASES,
    Constraint,
    compatible,
    constraint_from_dict,
    count_sentences,
    hindsight_constraints,
    response_opening,
    sample_constraints,
)

# (kind, params, passing response, failing response)
CASES: list[tuple[str, dict, str, str]] = [
    ("lowercase", {}, "all quiet on the river.", "All quiet on the river."),
    ("uppercase", {}, "ALL QUIET, 42 TIMES!", "ALL QUIET, 42 TIMEs!"),
    ("max_words", {"n": 3}, "one  two\nthree", "one two three four"),
    ("min_words", {"n": 3}, "one two three", "one two"),
    ("max_sentences", {"n": 2}, "First one. Second one!", "One. Two? Three!"),
    ("max_sentences", {"n": 1}, "Version 1.5 is out", "Hi. There"),
    ("max_sentences", {"n": 3}, "1. Mix it.\n2. Bake it.\n3. Eat it.", "A. B. C. D."),
    ("include_keywords", {"keywords": ["river", "future"]}, "The RIVER of the future.", "A river."),
    ("include_keywords", {"keywords": ["river"]}, "A river, indeed.", "Many rivers here."),
    ("exclude_keywords", {"keywords": ["very", "stuff"]}, "All is fine.", "That is Very good."),
    ("exclude_keywords", {"keywords": ["thing"]}, "Nothing and things.", "One thing only."),
    ("start_with", {"phrase": "Here is my answer:"}, "  Here is my answer: yes.", "Answer: yes."),
    ("end_with", {"phrase": "I hope this helps."}, "I hope this helps.\n", "I hope this helps. No"),
    ("bullet_count", {"n": 2}, "Intro\n- one\n* two\nend", "- one\n- two\n- three"),
    ("bullet_count", {"n": 1}, "- only", "-not a bullet\n**bold**"),
    ("paragraph_count", {"n": 2}, "First para.\n\n\n  \nSecond para.\n", "One.\nStill one."),
    ("paragraph_count", {"n": 3}, "A\n\nB\n \nC", "A\n\nB"),
    ("json_format", {}, '{"a": [1, 2]}', "{'a': 1}"),
    ("json_format", {}, '```json\n[1, 2, 3]\n```', '"just a string"'),
    ("json_format", {}, '```\n{"x": true}\n```', "Here: {\"x\": true}"),
    ("no_commas", {}, "No commas here.", "Yes, one comma."),
    ("wrap_in_quotes", {}, '  "Quoted answer."  ', 'Quoted "answer."'),
    ("wrap_in_quotes", {}, '"ok"', '""'),
    ("title", {}, "<<Poem of Joy>>\nLa la.", "<< >> and <no title>"),
    ("postscript", {}, "Main text.\n\nP.S. See you soon.", "Main text. P.S. inline is not enough."),
    ("numbered_steps", {"n": 3}, "Steps:\n1. Mix\n2. Bake\n3. Eat", "1. Mix\n3. Bake\n2. Eat"),
    ("numbered_steps", {"n": 2}, "1. Mix\n2. Bake", "1. Mix\n2. Bake\n3. Eat"),
]


@pytest.mark.parametrize(("kind", "params", "good", "bad"), CASES)
def test_checker_pass_and_fail(kind: str, params: dict, good: str, bad: str) -> None:
    constraint = Constraint(kind, params)
    assert constraint.check(good)
    assert not constraint.check(bad)


def test_every_kind_has_cases() -> None:
    assert {case[0] for case in CASES} == set(KINDS)
    assert len(KINDS) >= 14


@pytest.mark.parametrize(("kind", "params"), [(case[0], case[1]) for case in CASES])
@pytest.mark.parametrize("blank", ["", "   ", "\n\t\n"])
def test_blank_response_fails_everything(kind: str, params: dict, blank: str) -> None:
    assert not Constraint(kind, params).check(blank)


def test_count_sentences() -> None:
    assert count_sentences("One. Two!! Three?") == 3
    assert count_sentences("e.g.this stays one") == 1
    assert count_sentences("...") == 0


@pytest.mark.parametrize(("kind", "params"), [(case[0], case[1]) for case in CASES])
def test_round_trip(kind: str, params: dict) -> None:
    constraint = Constraint(kind, params)
    data = json.loads(json.dumps(constraint.to_dict()))
    assert data == {"kind": kind, "params": params}
    assert constraint_from_dict(data) == constraint


def test_params_are_copied() -> None:
    keywords = ["river"]
    constraint = Constraint("include_keywords", {"keywords": keywords})
    keywords.append("future")
    constraint.to_dict()["params"]["keywords"].append("planet")
    assert constraint.params == {"keywords": ["river"]}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"kind": "shout", "params": {}}, "unknown constraint kind 'shout'"),
        ({"params": {}}, "missing 'kind'"),
        ({"kind": "lowercase", "params": {}, "extra": 1}, "unexpected keys ['extra']"),
        ({"kind": "lowercase", "params": {"n": 1}}, "'lowercase' expects params []"),
        ({"kind": "max_words", "params": {}}, "'max_words' expects params ['n']"),
        ({"kind": "max_words", "params": {"n": 0}}, "'max_words' param 'n' must be a positive"),
        ({"kind": "max_words", "params": {"n": "5"}}, "param 'n' must be a positive integer"),
        ({"kind": "max_words", "params": {"n": True}}, "param 'n' must be a positive integer"),
        ({"kind": "start_with", "params": {"phrase": " "}}, "'phrase' must be a non-empty string"),
        ({"kind": "include_keywords", "params": {"keywords": []}}, "must be a non-empty list"),
        ({"kind": "exclude_keywords", "params": {"keywords": "very"}}, "must be a non-empty list"),
        ({"kind": "lowercase", "params": []}, "params must be a dict"),
        (["lowercase"], "constraint must be a dict"),
    ],
)
def test_bad_input_raises(data: object, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        constraint_from_dict(data)  # type: ignore[arg-type]


def test_incompatibility_table_is_symmetric_and_complete() -> None:
    assert set(INCOMPATIBLE) == set(KINDS)
    for kind, others in INCOMPATIBLE.items():
        assert kind in others
        for other in others:
            assert kind in INCOMPATIBLE[other]
    assert not compatible("lowercase", "uppercase")
    assert not compatible("json_format", "postscript")
    assert not compatible("min_words", "max_words")
    assert compatible("no_commas", "end_with")


def test_sampling_is_deterministic() -> None:
    first = [c.to_dict() for c in sample_constraints(random.Random(7), 3)]
    second = [c.to_dict() for c in sample_constraints(random.Random(7), 3)]
    assert first == second
    assert sample_constraints(random.Random(1), 0) == []


def test_sampling_never_pairs_incompatible_kinds() -> None:
    for seed in range(2000):
        a, b = sample_constraints(random.Random(seed), 2)
        assert b.kind not in INCOMPATIBLE[a.kind], (seed, a.kind, b.kind)


def test_sampling_larger_sets_are_pairwise_compatible() -> None:
    for seed in range(300):
        kinds = [c.kind for c in sample_constraints(random.Random(seed), 4)]
        for i, kind in enumerate(kinds):
            assert not set(kinds[i + 1:]) & INCOMPATIBLE[kind], (seed, kinds)


def test_sampling_covers_every_kind() -> None:
    rng = random.Random(0)
    seen = {c.kind for _ in range(500) for c in sample_constraints(rng, 2)}
    assert seen == set(KINDS)


def test_sampled_descriptions_are_sentences() -> None:
    rng = random.Random(3)
    for _ in range(500):
        for constraint in sample_constraints(rng, 3):
            text = constraint.describe()
            assert text and text[0].isupper() and text.endswith("."), text
            assert "\n" not in text


def test_sampled_phrases_respect_case_and_commas() -> None:
    for seed in range(3000):
        sampled = sample_constraints(random.Random(seed), 3)
        kinds = {c.kind for c in sampled}
        for c in sampled:
            if c.kind not in ("start_with", "end_with"):
                continue
            phrase = c.params["phrase"]
            assert "no_commas" not in kinds or "," not in phrase
            assert "lowercase" not in kinds or phrase == phrase.lower()
            assert "uppercase" not in kinds or phrase == phrase.upper()


def test_sampled_constraints_round_trip() -> None:
    for constraint in sample_constraints(random.Random(11), 5):
        assert constraint_from_dict(constraint.to_dict()) == constraint


def test_pools_do_not_clash() -> None:
    assert not set(KEYWORDS) & set(EXCLUDED_WORDS)
    banned = Constraint("exclude_keywords", {"keywords": list(EXCLUDED_WORDS)})
    for phrase in START_PHRASES + END_PHRASES:
        assert banned.check(phrase), phrase


def test_sampling_rejects_impossible_counts() -> None:
    with pytest.raises(ValueError, match="non-negative"):
        sample_constraints(random.Random(0), -1)
    with pytest.raises(ValueError, match="mutually compatible"):
        sample_constraints(random.Random(0), len(KINDS))


# (kind, params, what a model might write after the opening) -> opening + text passes
OPENED = [
    ("start_with", {"phrase": "Here is my answer:"}, " yes, gladly."),
    ("wrap_in_quotes", {}, 'Rain is water falling from clouds."'),
    ("json_format", {}, '"rain": "water falling from clouds"}'),
    ("title", {}, "Rain>>\n\nRain is water falling from clouds."),
    ("numbered_steps", {"n": 2}, " Open the umbrella.\n2. Hold it up."),
    ("bullet_count", {"n": 2}, " Umbrella\n- Coat"),
]


@pytest.mark.parametrize(("kind", "params", "rest"), OPENED)
def test_an_opening_begins_a_passing_response(kind: str, params: dict, rest: str) -> None:
    constraint = Constraint(kind, params)
    opening = constraint.opening()
    assert opening and constraint.check(opening + rest)
    assert not constraint.check(rest)  # the opening is what makes it pass


def test_kinds_without_a_fixed_beginning_have_no_opening() -> None:
    assert {kind for kind in KINDS if Constraint(kind, sample_params(kind)).opening()} == \
        {case[0] for case in OPENED}
    assert response_opening([{"kind": "lowercase", "params": {}}]) == ""
    assert response_opening([]) == ""


def test_the_opening_of_two_constraints_follows_the_fixed_order() -> None:
    title = {"kind": "title", "params": {}}
    steps = {"kind": "numbered_steps", "params": {"n": 3}}
    start = {"kind": "start_with", "params": {"phrase": "Sure thing."}}
    assert response_opening([steps, title]) == response_opening([title, steps]) == "<<"
    assert response_opening([title, start]) == "Sure thing."
    assert response_opening([{"kind": "no_commas", "params": {}}, steps]) == "1."


def sample_params(kind: str) -> dict:
    rng = random.Random(0)
    while True:
        drawn = sample_constraints(rng, 1)[0]
        if drawn.kind == kind:
            return drawn.params


def test_hindsight_never_names_what_an_unmet_by_text_already_does():
    chosen = "rain falls softly on the quiet town."
    other = "RAIN, WIND AND HAIL BATTER THE COAST ALL NIGHT, AND THE RIVERS RISE FAST."
    rng = random.Random(0)
    labels = hindsight_constraints(chosen, [other], [], rng)
    assert labels and all(c.check(chosen) for c in labels)
    assert not all(c.check(other) for c in labels)
    # a draft meeting everything the chosen text meets leaves nothing to name
    assert hindsight_constraints(chosen, [other], [], random.Random(0), unmet_by=(chosen,)) is None
    draft = "Rain falls softly, on the quiet town."
    for seed in range(20):
        labels = hindsight_constraints(chosen, [other], [], random.Random(seed), unmet_by=(draft,))
        assert labels and not any(c.check(draft) for c in labels)
