"""The curriculum: the six stages in order. A stage is built when it has a module."""
from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

from stages import stage1_explicit_instructions


@dataclass(frozen=True)
class StageEntry:
    number: int
    name: str
    learns: str
    module: ModuleType | None  # None: not built yet


STAGES: tuple[StageEntry, ...] = (
    StageEntry(1, "explicit-instructions", stage1_explicit_instructions.SUMMARY,
               stage1_explicit_instructions),
    StageEntry(2, "implicit-instructions", "treat a bare question or request as an instruction", None),
    StageEntry(3, "generation-tasks", "produce examples on demand", None),
    StageEntry(4, "evaluation-tasks", "judge which of two responses is better, and why", None),
    StageEntry(5, "revision-tasks", "improve a response given a critique", None),
    StageEntry(6, "constitutional-integration",
               "critique and revise its answers against two random principles", None),
)


def stage_by_number(number: int) -> StageEntry | None:
    for entry in STAGES:
        if entry.number == number:
            return entry
    return None
