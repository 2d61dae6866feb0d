"""The curriculum: the six stages in order. A stage is built when it has a module."""
from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

from stages import (stage1_explicit_instructions, stage2_implicit_instructions,
                    stage3_generation_tasks, stage4_evaluation_tasks, stage5_revision_tasks,
                    stage6_constitutional)


@dataclass(frozen=True)
class StageEntry:
    number: int
    name: str
    learns: str
    module: ModuleType | None  # None: not built yet


STAGES: tuple[StageEntry, ...] = (
    StageEntry(1, "explicit-instructions", stage1_explicit_instructions.SUMMARY,
               stage1_explicit_instructions),
    StageEntry(2, "implicit-instructions", stage2_implicit_instructions.SUMMARY,
               stage2_implicit_instructions),
    StageEntry(3, "generation-tasks", stage3_generation_tasks.SUMMARY, stage3_generation_tasks),
    StageEntry(4, "evaluation-tasks", stage4_evaluation_tasks.SUMMARY, stage4_evaluation_tasks),
    StageEntry(5, "revision-tasks", stage5_revision_tasks.SUMMARY, stage5_revision_tasks),
    StageEntry(6, "constitutional-integration", stage6_constitutional.SUMMARY,
               stage6_constitutional),
)


def stage_by_number(number: int) -> StageEntry | None:
    for entry in STAGES:
        if entry.number == number:
            return entry
    return None
