"""The stage 1 exemplar pool: shape, constraint validity and prompt hygiene."""

from __future__ import annotations

import re
from functools import lru_cache
from itertools import combinations
from pathlib import Path

import pytest
import yaml

from core.constraints import KINDS, compatible, constraint_from_dict, count_words

POOL_PATH = Path(__file__).resolve().parent.parent / "stages/pools/stage1.yaml"

FORBIDDEN = (
    "<|", "|>", "<start_of_turn>", "\nInstruction:", "\nResponse:", "###", "User:", "Assistant:",
)
# Lines that would look like prompt scaffolding to a base model.
SCAFFOLD_LINE = re.compile(r"^\s*(?:Instruction|Response|Task)\b", re.MULTILINE)


@lru_cache(maxsize=1)
def _pool() -> dict:
    return yaml.safe_load(POOL_PATH.read_text(encoding="utf-8"))


def _strings(node) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for key, value in node.items() for s in [str(key), *_strings(value)]]
    if isinstance(node, list):
        return [s for value in node for s in _strings(value)]
    return []


def _constraints(entry: dict) -> list:
    raw = entry.get("constraints") or []
    assert isinstance(raw, list)
    return [constraint_from_dict(item) for item in raw]


def test_top_level_shape() -> None:
    pool = _pool()
    assert pool["version"] == 1
    assert set(pool) == {"version", "instruction_seeds", "response_exemplars", "judge_exemplars"}


def test_instruction_seeds() -> None:
    seeds = _pool()["instruction_seeds"]
    assert len(seeds) == 60
    assert all(isinstance(seed, str) and seed.strip() == seed for seed in seeds)
    assert len({seed.casefold() for seed in seeds}) == 60
    for seed in seeds:
        assert 6 <= count_words(seed) <= 25, seed
        assert "\n" not in seed, seed


def test_response_exemplars() -> None:
    exemplars = _pool()["response_exemplars"]
    assert len(exemplars) == 20
    seen_kinds: set[str] = set()
    unconstrained = 0
    for entry in exemplars:
        assert set(entry) == {"instruction", "constraints", "response"}, entry
        assert entry["instruction"].strip() and entry["response"].strip()
        constraints = _constraints(entry)
        assert len(constraints) <= 2, entry["instruction"]
        unconstrained += not constraints
        for a, b in combinations(constraints, 2):
            assert compatible(a.kind, b.kind), (entry["instruction"], a.kind, b.kind)
        for constraint in constraints:
            seen_kinds.add(constraint.kind)
            assert constraint.check(entry["response"]), (entry["instruction"], constraint.kind)
        assert 20 <= count_words(entry["response"]) <= 120, entry["instruction"]
    assert set(KINDS) <= seen_kinds, sorted(set(KINDS) - seen_kinds)
    assert 3 <= unconstrained <= 5
    instructions = [entry["instruction"].casefold() for entry in exemplars]
    assert len(set(instructions)) == len(instructions)


def test_judge_exemplars() -> None:
    exemplars = _pool()["judge_exemplars"]
    assert len(exemplars) == 6
    verdicts = [entry["better"] for entry in exemplars]
    assert verdicts.count("A") == 3 and verdicts.count("B") == 3
    for entry in exemplars:
        assert set(entry) == {"instruction", "constraints", "response_a", "response_b", "better"}
        constraints = _constraints(entry)
        assert 1 <= len(constraints) <= 2, entry["instruction"]
        for a, b in combinations(constraints, 2):
            assert compatible(a.kind, b.kind), (entry["instruction"], a.kind, b.kind)
        better = entry["response_a"] if entry["better"] == "A" else entry["response_b"]
        worse = entry["response_b"] if entry["better"] == "A" else entry["response_a"]
        assert all(c.check(better) for c in constraints), entry["instruction"]
        assert not all(c.check(worse) for c in constraints), entry["instruction"]


@pytest.mark.parametrize("marker", FORBIDDEN)
def test_no_chat_markup(marker: str) -> None:
    for text in _strings(_pool()):
        assert marker not in text, (marker, text[:80])


def test_no_scaffold_lines() -> None:
    for text in _strings(_pool()):
        assert not SCAFFOLD_LINE.search(text), text[:80]
        assert "As an AI" not in text, text[:80]
