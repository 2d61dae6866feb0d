from core.stats import mcnemar_exact, rate, wilson_interval
from core.text import (NearDuplicateFilter, copies_exemplar, degenerate_reason, looping_reason,
                       normalize, rouge_l)


def test_near_duplicates_are_dropped_at_rouge_l_07():
    f = NearDuplicateFilter(0.7)
    assert f.offer("Write a short poem about the sea at night.")
    assert not f.offer("Write a short poem about the sea at night time.")
    assert f.offer("Explain how vaccines train the immune system.")
    assert rouge_l("a b c d", "a b c d") == 1.0


def test_degenerate_outputs():
    assert degenerate_reason("") == "empty"
    assert degenerate_reason("   ") == "empty"
    assert degenerate_reason("!!! ??? ... ###") is not None
    assert degenerate_reason("the the the the the the the the the the") == "repetitive"
    assert degenerate_reason("go to the shop go to the shop go to the shop go to the shop") == "repetitive"
    assert degenerate_reason("Rain forms when water vapour condenses into droplets.") is None
    assert degenerate_reason("Two words", min_words=4) == "fewer than 4 words"


def test_loops_that_pass_the_loose_degeneracy_test_are_caught():
    # Both shapes were chosen responses in a gemma-3-270m run: each passed its constraint
    # ("at least 60 words", lowercase) and degenerate_reason, and each teaches repetition.
    said_twice = ("Dear editor,\nI have a secret to give to you. I have a secret that you will "
                  "never tell anyone else about. I have a secret that you will never tell "
                  "anyone else about.")
    listed_twice = "a) shoes\nb) pants\nc) boots\nd) coats\ne) shoes\nf) hats"
    assert degenerate_reason(said_twice) is None and degenerate_reason(listed_twice) is None
    assert looping_reason(said_twice) == "repeats a sentence"
    assert looping_reason(listed_twice) == "repeats a list item"
    assert looping_reason("1. Shoes\n2. Pants\n3. Boots") is None
    assert looping_reason("Rain falls. It falls again. Rain falls!") is None  # too short to count
    assert looping_reason("- yes\n- yes") is None  # two items are not a list that loops
    assert looping_reason("It rains. The ground gets wet. Then it dries.") is None


def test_exemplar_copies_are_detected():
    exemplar = "The water cycle moves water between oceans, air and land through evaporation."
    assert copies_exemplar(exemplar, [exemplar])
    assert copies_exemplar("Sure. " + exemplar + " More.", [exemplar])
    assert not copies_exemplar("Clouds form from condensed vapour.", [exemplar])
    assert normalize("Hello,  World!") == "hello world"


def test_wilson_interval_matches_published_values():
    low, high = wilson_interval(81, 263)  # Wilson example used in many references
    assert round(low, 3) == 0.255 and round(high, 3) == 0.366
    assert wilson_interval(0, 0) == (0.0, 1.0)
    assert rate(0, 5)["ci95"][0] == 0.0 and rate(5, 5)["ci95"][1] == 1.0


def test_mcnemar_exact():
    before = [False] * 10 + [True] * 5
    after = [True] * 10 + [True] * 5
    result = mcnemar_exact(before, after)
    assert result["gained"] == 10 and result["lost"] == 0
    assert abs(result["p_value"] - 2 / 1024) < 1e-12
    assert mcnemar_exact([True, False], [True, False])["p_value"] == 1.0
