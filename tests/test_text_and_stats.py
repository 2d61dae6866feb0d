from core.stats import mcnemar_exact, rate, wilson_interval
from core.text import NearDuplicateFilter, copies_exemplar, degenerate_reason, normalize, rouge_l


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
