"""Tests for core.constitution: the shipped file, sampling, lookup and validation."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest
import yaml

from core.constitution import (
    CATEGORIES,
    Constitution,
    ConstitutionError,
    Principle,
    load_constitution,
)

SHIPPED = Path(__file__).resolve().parent.parent / "constitution.yaml"
EXPECTED_NAMES = [
    "helpful_accurate", "avoid_harm", "respect_privacy", "acknowledge_uncertainty",
    "refuse_malicious", "clarity_conciseness", "avoid_bias", "constructive_dialogue",
    "prioritize_safety", "no_misinformation", "respect_ip", "appropriate_content",
    "transparency", "user_autonomy", "ethical_standards",
]


def _principle(name: str = "be_good", category: str = "helpfulness") -> dict[str, str]:
    return {
        "name": name,
        "category": category,
        "critique_request": "Identify ways the response falls short.",
        "revision_request": "Rewrite the response to fix them.",
    }


def _write(tmp_path: Path, data: object) -> Path:
    path = tmp_path / "constitution.yaml"
    text = data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False)
    path.write_text(text, encoding="utf-8")
    return path


def _problems(path: Path) -> list[str]:
    with pytest.raises(ConstitutionError) as info:
        load_constitution(path)
    err = info.value
    message = str(err)
    assert message.startswith(f"{path} is invalid ({len(err.problems)} problem")
    assert message.endswith("Fix the file and run again.")
    for problem in err.problems:
        assert f"\n  - {problem}" in message
    return err.problems


def _assert_one(problems: list[str], location: str, *fragments: str) -> None:
    matching = [p for p in problems if p.startswith(f"{location}:")]
    assert matching, f"no problem at {location!r} in {problems}"
    assert any(all(f in p for f in fragments) for p in matching), matching


# --- the shipped file -----------------------------------------------------------------


@pytest.fixture(scope="module")
def shipped() -> Constitution:
    return load_constitution(SHIPPED)


def test_shipped_file_loads_in_order(shipped: Constitution) -> None:
    assert shipped.version == 1
    assert [p.name for p in shipped.principles] == EXPECTED_NAMES
    assert all(isinstance(p, Principle) for p in shipped.principles)


def test_shipped_file_covers_all_categories(shipped: Constitution) -> None:
    assert {p.category for p in shipped.principles} == set(CATEGORIES)


def test_shipped_requests_are_substantive(shipped: Constitution) -> None:
    for p in shipped.principles:
        assert len(p.critique_request) > 40 and len(p.revision_request) > 40, p.name
        assert "\n" not in p.critique_request and "\n" not in p.revision_request, p.name


def test_accepts_str_path_and_is_frozen(shipped: Constitution) -> None:
    assert load_constitution(str(SHIPPED)) == shipped
    with pytest.raises(AttributeError):
        shipped.version = 2  # type: ignore[misc]
    assert re.fullmatch(r"[0-9a-f]{64}", shipped.sha256)


# --- sample / by_name -----------------------------------------------------------------


def test_sample_is_deterministic_under_seed(shipped: Constitution) -> None:
    first = shipped.sample(random.Random(7), count=3)
    second = shipped.sample(random.Random(7), count=3)
    assert first == second


def test_sample_returns_distinct_principles(shipped: Constitution) -> None:
    rng = random.Random(0)
    for _ in range(50):
        picked = shipped.sample(rng)
        assert len(picked) == 2 and picked[0] != picked[1]
    everything = shipped.sample(rng, count=len(shipped.principles))
    assert sorted(p.name for p in everything) == sorted(EXPECTED_NAMES)


@pytest.mark.parametrize("count", [0, -1, 16])
def test_sample_rejects_bad_count(shipped: Constitution, count: int) -> None:
    with pytest.raises(ValueError, match="count must be between 1 and 15"):
        shipped.sample(random.Random(0), count=count)


def test_by_name(shipped: Constitution) -> None:
    assert shipped.by_name("avoid_harm").category == "harmlessness"
    with pytest.raises(KeyError) as info:
        shipped.by_name("be_evil")
    message = str(info.value)
    assert "no principle named 'be_evil'" in message
    assert "avoid_harm" in message


# --- sha256 ---------------------------------------------------------------------------


def test_sha256_changes_when_file_changes(tmp_path: Path) -> None:
    path = _write(tmp_path, {"version": 1, "principles": [_principle(), _principle("be_kind")]})
    before = load_constitution(path).sha256
    assert load_constitution(path).sha256 == before
    path.write_text(path.read_text() + "# a comment\n")
    assert load_constitution(path).sha256 != before


# --- validation: one problem at a time ------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    problems = _problems(tmp_path / "nope.yaml")
    _assert_one(problems, "(file)", "not found")


def test_invalid_yaml_reports_line(tmp_path: Path) -> None:
    path = _write(tmp_path, "version: 1\nprinciples:\n  - name: [unclosed\n")
    problems = _problems(path)
    assert len(problems) == 1
    assert re.match(r"line \d+, column \d+: not valid YAML", problems[0]), problems


@pytest.mark.parametrize("text", ["", "- just\n- a list\n", "hello\n"])
def test_top_level_not_mapping(tmp_path: Path, text: str) -> None:
    _assert_one(_problems(_write(tmp_path, text)), "(top level)")


def test_unknown_top_level_key(tmp_path: Path) -> None:
    path = _write(tmp_path, {"version": 1, "principles": [_principle()], "extra": 1})
    _assert_one(_problems(path), "extra", "unknown top-level key")


@pytest.mark.parametrize(
    ("version", "fragment"),
    [(None, "missing"), ("one", "not an integer"), (1.5, "not an integer"),
     (True, "not an integer"), (0, "not positive"), (-3, "not positive")],
)
def test_bad_version(tmp_path: Path, version: object, fragment: str) -> None:
    data: dict[str, object] = {"principles": [_principle()]}
    if version is not None:
        data["version"] = version
    _assert_one(_problems(_write(tmp_path, data)), "version", fragment)


@pytest.mark.parametrize(
    ("principles", "fragment"),
    [(None, "missing"), ([], "non-empty list"), ({"a": 1}, "non-empty list"), ("x", "non-empty list")],
)
def test_bad_principles_list(tmp_path: Path, principles: object, fragment: str) -> None:
    data: dict[str, object] = {"version": 1}
    if principles is not None:
        data["principles"] = principles
    _assert_one(_problems(_write(tmp_path, data)), "principles", fragment)


def test_principle_not_mapping(tmp_path: Path) -> None:
    path = _write(tmp_path, {"version": 1, "principles": [_principle(), "oops"]})
    _assert_one(_problems(path), "principles[1]", "expected a mapping")


@pytest.mark.parametrize("field", ["name", "category", "critique_request", "revision_request"])
def test_missing_field(tmp_path: Path, field: str) -> None:
    entry = _principle()
    del entry[field]
    path = _write(tmp_path, {"version": 1, "principles": [_principle("first"), entry]})
    _assert_one(_problems(path), f"principles[1].{field}", "missing")


@pytest.mark.parametrize("field", ["name", "category", "critique_request", "revision_request"])
def test_empty_field(tmp_path: Path, field: str) -> None:
    entry = _principle()
    entry[field] = "   "
    path = _write(tmp_path, {"version": 1, "principles": [entry]})
    _assert_one(_problems(path), f"principles[0].{field}", "empty")


def test_non_string_field(tmp_path: Path) -> None:
    entry: dict[str, object] = dict(_principle())
    entry["critique_request"] = 42
    path = _write(tmp_path, {"version": 1, "principles": [entry]})
    _assert_one(_problems(path), "principles[0].critique_request", "expected a string")


def test_unknown_field(tmp_path: Path) -> None:
    entry: dict[str, object] = dict(_principle())
    entry["weight"] = 2
    path = _write(tmp_path, {"version": 1, "principles": [entry]})
    _assert_one(_problems(path), "principles[0]", "unknown field 'weight'")


def test_bad_category(tmp_path: Path) -> None:
    path = _write(tmp_path, {"version": 1, "principles": [_principle(category="helpfull")]})
    _assert_one(
        _problems(path),
        "principles[0].category",
        "'helpfull' is not one of helpfulness, harmlessness, honesty",
    )


def test_duplicate_name(tmp_path: Path) -> None:
    principles = [_principle("avoid_harm"), _principle("other"), _principle("avoid_harm")]
    path = _write(tmp_path, {"version": 1, "principles": principles})
    _assert_one(_problems(path), "principles[2]", "duplicate name 'avoid_harm'", "principles[0]")


@pytest.mark.parametrize("name", ["AvoidHarm", "avoid-harm", "1st", "avoid__harm", "_x", "avoid harm"])
def test_name_not_snake_case(tmp_path: Path, name: str) -> None:
    path = _write(tmp_path, {"version": 1, "principles": [_principle(name)]})
    _assert_one(_problems(path), "principles[0].name", "not a snake_case identifier")


# --- validation: many problems at once ------------------------------------------------


def test_one_principle_is_too_few_for_stage_6(tmp_path: Path) -> None:
    problems = _problems(_write(tmp_path, {"version": 1, "principles": [_principle()]}))
    _assert_one(problems, "principles", "1 given; at least 2 are needed", "stage 6")


def test_reports_every_problem_at_once(tmp_path: Path) -> None:
    bad_category = _principle("b", category="helpfull")
    unknown_field: dict[str, object] = {**_principle("c"), "extra": True}
    missing_revision = _principle("d")
    del missing_revision["revision_request"]
    data = {
        "version": 0,
        "principles": [
            _principle("a"), bad_category, unknown_field, missing_revision,
            "not a mapping", _principle("a"), _principle("Bad-Name"),
        ],
    }
    problems = _problems(_write(tmp_path, data))
    _assert_one(problems, "version", "not positive")
    _assert_one(problems, "principles[1].category", "'helpfull'")
    _assert_one(problems, "principles[2]", "unknown field 'extra'")
    _assert_one(problems, "principles[3].revision_request", "missing")
    _assert_one(problems, "principles[4]", "expected a mapping")
    _assert_one(problems, "principles[5]", "duplicate name 'a'")
    _assert_one(problems, "principles[6].name", "snake_case")
    assert len(problems) == 7
    assert "(7 problems)" in str(ConstitutionError("x", problems))
