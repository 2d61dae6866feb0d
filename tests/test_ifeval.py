"""IFEval scorer: every instruction type passes and fails on hand-made responses."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.ifeval import (INSTRUCTION_IDS, IFEvalItem, check_instruction, check_instruction_loose,
                         detect_language, load_ifeval, loose_variants, score_item, split_sentences,
                         summarize)

DATA = Path("/work/shared/data/ifeval/input_data.jsonl")
PROMPT = "Write a short note about the weather."

GERMAN = "Heute scheint die Sonne und wir gehen zusammen in den Park, um dort zu spielen."
ENGLISH = "Today the sun is shining and we are going to the park together to play games."

# (instruction id, kwargs, a passing response, a failing response)
CASES = [
    ("keywords:existence", {"keywords": ["climate", "energy"]},
     "Climate policy shapes how we use energy.", "Climate policy matters a great deal."),
    ("keywords:existence", {"keywords": ["le"]},
     "He said le mot juste.", "The table is level."),
    ("keywords:frequency", {"relation": "at least", "keyword": "forest", "frequency": 3},
     "The forest is deep. Forest paths wind. I love the FOREST.",
     "The forest is deep. Forests everywhere; the forestry office agrees."),
    ("keywords:frequency", {"relation": "less than", "keyword": "brand", "frequency": 2},
     "Our brand stands for quality.", "Our brand is a brand you can trust."),
    ("keywords:forbidden_words", {"forbidden_words": ["bad", "underperform"]},
     "The badge was badly made but it works.", "The results were Bad this quarter."),
    ("keywords:letter_frequency", {"letter": "q", "let_relation": "at least", "let_frequency": 2},
     "Quiet queens quarrel.", "A quiet day."),
    ("keywords:letter_frequency", {"letter": "e", "let_relation": "less than", "let_frequency": 3},
     "A cat sat on a mat.", "Every evening the elephants eat."),
    ("language:response_language", {"language": "de"}, GERMAN, ENGLISH),
    ("length_constraints:number_sentences", {"relation": "less than", "num_sentences": 3},
     "Dr. Smith arrived at 3.15 p.m. today. He left soon after!",
     "One sentence. Two sentences? Three sentences!"),
    ("length_constraints:number_sentences", {"relation": "at least", "num_sentences": 3},
     "It rained. It poured.\nThen the sun came out", "It rained. It poured."),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 3},
     "First part.\n***\nSecond part.\n***\nThird part.",
     "First part.\n***\nSecond part.\n***\n\n***\nThird part."),
    ("length_constraints:number_words", {"relation": "at least", "num_words": 5},
     "Rain falls gently on rooftops.", "Rain falls gently."),
    ("length_constraints:number_words", {"relation": "less than", "num_words": 5},
     "Rain falls gently.", "Rain falls gently on the rooftops tonight."),
    ("length_constraints:nth_paragraph_first_word",
     {"num_paragraphs": 3, "nth_paragraph": 2, "first_word": "weekend"},
     "Plans are set.\n\n**Weekend** trips are fun.\n\nSee you then.",
     "Plans are set.\n\nThe weekend trips are fun.\n\nSee you then."),
    ("length_constraints:nth_paragraph_first_word",
     {"num_paragraphs": 2, "nth_paragraph": 1, "first_word": "summary"},
     "Summary: all good.\n\nDetails follow.", "Summary: all good.\n\nDetails.\n\nMore details."),
    ("detectable_content:number_placeholders", {"num_placeholders": 2},
     "Dear [name], we will meet at [address].", "Dear [name], we will meet soon."),
    ("detectable_content:postscript", {"postscript_marker": "P.S."},
     "See you soon.\n\nP.S. Bring snacks.", "See you soon. Remember the P.S. rule."),
    ("detectable_content:postscript", {"postscript_marker": "P.P.S"},
     "Bye.\nP.S. one\np.p.s. two", "Bye.\nP.S. one"),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2},
     "Items:\n* apples\n- pears\n**Done**", "Items:\n* apples\n* pears\n* plums"),
    ("detectable_format:constrained_response", {},
     "After thinking it over, My answer is maybe.", "My answer is probably yes."),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2},
     "*Intro* text and **Key point** here.", "* bullet one\n*Intro* only one highlight."),
    ("detectable_format:multiple_sections", {"section_spliter": "SECTION", "num_sections": 2},
     "SECTION 1\nHello.\nSECTION 2\nWorld.", "SECTION 1\nHello.\nSECTION 2\nWorld.\nSECTION 3\n!"),
    ("detectable_format:json_format", {},
     '```json\n{"weather": "sunny", "temp": 21}\n```', '{"weather": "sunny", temp: 21}'),
    ("detectable_format:json_format", {},
     '{"a": [1, 2]}', 'Here is the JSON: {"a": [1, 2]}'),
    ("detectable_format:title", {},
     "<<Sunny Days>>\nIt is warm.", "<< >>\nIt is warm. <Sunny>"),
    ("combination:two_responses", {},
     "It is sunny.\n******\nThe sky is clear.", "It is sunny.\n******\nIt is sunny."),
    ("combination:two_responses", {},
     "One answer.\n******\nTwo answers.", "One answer.\n******\nTwo.\n******\nThree."),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Write a short note about the weather."},
     "write a short note about the weather. It is sunny.", "Sure! Write a short note about the weather."),
    ("startend:end_checker", {"end_phrase": "Is there anything else I can help with?"},
     "It is sunny. Is there anything else I can help with?  ",
     "Is there anything else I can help with? It is sunny."),
    ("startend:quotation", {}, '"It is sunny today."', '"It is sunny" today.'),
    ("change_case:capital_word_frequency", {"capital_relation": "at least", "capital_frequency": 2},
     "This is VERY IMPORTANT news.", "This is VERY important news."),
    ("change_case:capital_word_frequency", {"capital_relation": "less than", "capital_frequency": 2},
     "This is VERY important news.", "This is VERY IMPORTANT NEWS."),
    ("change_case:english_capital", {}, ENGLISH.upper(), ENGLISH),
    ("change_case:english_capital", {}, ENGLISH.upper(), GERMAN.upper()),
    ("change_case:english_lowercase", {}, ENGLISH.lower(), ENGLISH),
    ("change_case:english_lowercase", {}, ENGLISH.lower(), GERMAN.lower()),
    ("punctuation:no_comma", {}, "No commas here at all.", "Well, there is one."),
]


def test_every_instruction_type_is_covered() -> None:
    assert len(INSTRUCTION_IDS) == 25
    assert {case[0] for case in CASES} == set(INSTRUCTION_IDS)


@pytest.mark.parametrize("iid,kwargs,good,bad", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_strict_pass_and_fail(iid: str, kwargs: dict, good: str, bad: str) -> None:
    assert check_instruction(iid, kwargs, good, PROMPT) is True
    assert check_instruction(iid, kwargs, bad, PROMPT) is False


def test_empty_response_never_passes() -> None:
    assert check_instruction("punctuation:no_comma", {}, "  \n", PROMPT) is False
    assert check_instruction_loose("keywords:forbidden_words", {"forbidden_words": ["x"]}, "", PROMPT) is False


def test_unknown_id_raises() -> None:
    with pytest.raises(ValueError, match="keywords:nonsense"):
        check_instruction("keywords:nonsense", {}, "text", PROMPT)


def test_null_kwargs_are_ignored_and_missing_required_kwarg_raises() -> None:
    kwargs = {"num_highlights": 1, "keywords": None, "relation": None}
    assert check_instruction("detectable_format:number_highlighted_sections", kwargs, "*hi*", PROMPT)
    with pytest.raises(ValueError, match="num_words"):
        check_instruction("length_constraints:number_words", {"relation": "at least"}, "hi", PROMPT)


WRAPPED = "Sure, here it is:\n{body}\nHope this helps, let me know!"


@pytest.mark.parametrize("iid,kwargs,body", [
    ("punctuation:no_comma", {}, "The sky is blue and the sun is out."),
    ("startend:quotation", {}, '"The sky is blue."'),
    ("detectable_format:json_format", {}, '{"sky": "blue"}'),
    ("combination:repeat_prompt", {"prompt_to_repeat": PROMPT}, PROMPT + " The sky is blue."),
    ("change_case:english_lowercase", {}, "the sky is blue and the sun is shining over the quiet town."),
])
def test_loose_passes_where_strict_fails(iid: str, kwargs: dict, body: str) -> None:
    response = WRAPPED.format(body=body)
    assert check_instruction(iid, kwargs, response, PROMPT) is False
    assert check_instruction_loose(iid, kwargs, response, PROMPT) is True


def test_loose_removes_asterisks() -> None:
    response = "**The sky is blue and calm.**"
    kwargs = {"end_phrase": "calm."}
    assert not check_instruction("startend:end_checker", kwargs, response, PROMPT)
    assert check_instruction_loose("startend:end_checker", kwargs, response, PROMPT)


def test_loose_variants_are_eight() -> None:
    variants = loose_variants("intro\n*body*\noutro")
    assert len(variants) == 8
    assert "*body*" in variants and "body" in variants


def test_sentence_splitter() -> None:
    text = ("Mr. Brown paid $3.50 for tea at 5 p.m. yesterday. Was it good? Yes! It was, e.g. hot."
            " It ended at 6 p.m. Then we left.\n- a bullet line\n\n")
    assert split_sentences(text) == ["Mr. Brown paid $3.50 for tea at 5 p.m. yesterday.",
                                     "Was it good?", "Yes!", "It was, e.g. hot.", "It ended at 6 p.m.",
                                     "Then we left.", "- a bullet line"]


def test_language_detection_is_deterministic() -> None:
    short = "ciao come stai"
    results = {detect_language(short) for _ in range(5)}
    assert len(results) == 1
    assert detect_language(GERMAN) == "de"
    assert detect_language("12345 !!!") is None


def _items() -> list[IFEvalItem]:
    return [
        IFEvalItem(key=1, prompt="Say hi without commas in under 5 words.",
                   instruction_ids=("punctuation:no_comma", "length_constraints:number_words"),
                   kwargs=({}, {"relation": "less than", "num_words": 5})),
        IFEvalItem(key=2, prompt="Wrap your answer in double quotes.",
                   instruction_ids=("startend:quotation",), kwargs=({},)),
    ]


def test_score_item_and_summarize() -> None:
    first, second = _items()
    s1 = score_item(first, "Hi there, friend")
    s2 = score_item(second, 'Sure:\n"hello"\nBye.')
    assert s1["strict"] == [False, True] and s1["loose"] == [False, True]
    assert not s1["prompt_strict"] and not s1["prompt_loose"]
    assert s2["strict"] == [False] and s2["loose"] == [True] and s2["prompt_loose"]
    summary = summarize([s1, s2])
    assert summary["prompt_level_strict"]["k"] == 0 and summary["prompt_level_strict"]["n"] == 2
    assert summary["prompt_level_loose"]["k"] == 1
    assert summary["instruction_level_strict"] == {**summary["instruction_level_strict"], "k": 1, "n": 3}
    assert summary["instruction_level_loose"]["k"] == 2
    assert set(summary["per_type"]) == {"punctuation:no_comma", "length_constraints:number_words",
                                        "startend:quotation"}
    assert summary["per_type"]["length_constraints:number_words"]["rate"] == 1.0
    low, high = summary["prompt_level_loose"]["ci95"]
    assert 0.0 <= low < 0.5 < high <= 1.0


def test_load_ifeval_limit_and_nulls(tmp_path: Path) -> None:
    rows = [{"key": 7, "prompt": "p", "instruction_id_list": ["punctuation:no_comma", "detectable_format:title"],
             "kwargs": [{"num_words": None}, {}]},
            {"key": 8, "prompt": "q", "instruction_id_list": ["detectable_format:title"], "kwargs": [{}]}]
    path = tmp_path / "input_data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    items = load_ifeval(path)
    assert [i.key for i in items] == [7, 8] and items[0].kwargs == ({}, {})
    assert len(load_ifeval(path, limit=1)) == 1


def test_load_ifeval_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match="google/IFEval") as err:
        load_ifeval(missing)
    assert str(missing) in str(err.value)


def test_load_shared_file() -> None:
    if not DATA.is_file():
        pytest.skip(f"{DATA} absent")
    items = load_ifeval(DATA)
    assert len(items) == 541
    assert {iid for item in items for iid in item.instruction_ids} <= set(INSTRUCTION_IDS)
    assert len(load_ifeval(DATA, limit=10)) == 10
    for item in items:  # every row's kwargs are accepted by its checker
        score_item(item, "A plain response, with a comma.")
