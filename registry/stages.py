"""The curriculum: the six stages in order. Adding a stage is one line here."""
from __future__ import annotations

from core.stage import Stage
from stages import (stage1_explicit_instructions, stage2_implicit_instructions,
                    stage3_generation_tasks, stage4_evaluation_tasks, stage5_revision_tasks,
                    stage6_constitutional)

STAGES: tuple[Stage, ...] = (
    stage1_explicit_instructions.STAGE,
    stage2_implicit_instructions.STAGE,
    stage3_generation_tasks.STAGE,
    stage4_evaluation_tasks.STAGE,
    stage5_revision_tasks.STAGE,
    stage6_constitutional.STAGE,
)
