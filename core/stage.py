"""The contract a stage fulfils, and the lifecycle that runs it.

A stage module reads top to bottom: its typed settings, its own data steps (each a function of
the stage context and the stage's exemplar pool), its rules, and at the bottom one `Stage`
value that names them. The shared tail (decontaminate -> train -> merge -> assess -> report) is
not written in any stage: `Stage.step_names` appends it and `run_stage_steps` runs it, with the
stage's answers to the four questions only it can answer (what its training records must not
contain, which prompts check the merge, how its held-out tasks are assessed, what its report
adds).

    STAGE = Stage(number=1, name="explicit-instructions", summary="...",
                  settings=Stage1Settings, load_pool=load_pool,
                  data_steps=(Step("instructions", make_instructions), ...),
                  protected=protected_sets, merge_probes=merge_probes,
                  assess_heldout=assess_heldout, headline="prompt_level",
                  report_data=report_data)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Protocol

from core import lifecycle
from core.contamination import Protected
from core.context import StageContext
from core.io import atomic_write_text
from core.run import StageSteps

SHARED_TAIL = ("decontaminate", "train", "merge", "assess", "report")


class HeldoutAssessment(Protocol):
    def __call__(self, ctx: StageContext, backend: Any, label: str) -> dict:
        """{"summary": {...}, "items": [{"id", "passed", ...}]} for the "before" or "after"
        model on the stage's held-out tasks (zero-shot, greedy)."""


@dataclass(frozen=True)
class Step:
    """One of a stage's own data steps: `action(ctx, pool)` writes the step's outputs."""

    name: str
    action: Callable[[StageContext, dict], None]


@dataclass(frozen=True)
class StageSettings:
    """Base of a stage's typed settings (a frozen dataclass; each field's `help` metadata is
    what `config show` prints). A stage without settings of its own uses this class."""


def setting(default: Any, help: str) -> Any:
    """A settings field with its help text."""
    return field(default=default, metadata={"help": help})


def no_pool() -> dict:
    return {}


@dataclass(frozen=True)
class Stage:
    """Everything the lifecycle needs from one stage."""

    number: int
    name: str
    summary: str  # what the model learns, one line
    data_steps: tuple[Step, ...]
    protected: Callable[[StageContext], Protected]  # what training records must not contain
    merge_probes: Callable[[StageContext], list[str]]  # prompts for the merge parity check
    assess_heldout: HeldoutAssessment
    headline: str  # the held-out summary key the run report leads with
    report_data: Callable[[StageContext], dict]  # the stage's own numbers for metrics.json
    settings: type[StageSettings] = StageSettings
    load_pool: Callable[[], dict] = no_pool

    def __post_init__(self) -> None:
        names = [s.name for s in self.data_steps]
        clash = sorted(set(names) & set(SHARED_TAIL)) or sorted(
            n for n in set(names) if names.count(n) > 1)
        if clash:
            raise ValueError(f"stage {self.number}: step names {clash} are repeated or belong "
                             f"to the shared tail {SHARED_TAIL}")

    @property
    def key(self) -> str:
        """The stage's section in config.yaml and in `--set` (e.g. "stage1")."""
        return f"stage{self.number}"

    @property
    def step_names(self) -> list[str]:
        return [s.name for s in self.data_steps] + list(SHARED_TAIL)


def run_stage_steps(stage: Stage, ctx: StageContext) -> None:
    """Run (or resume) the stage's data steps and the shared tail in order, then write DONE."""
    pool = stage.load_pool()
    actions: dict[str, Callable[[], None]] = {
        s.name: partial(s.action, ctx, pool) for s in stage.data_steps}
    actions.update({
        "decontaminate": lambda: lifecycle.decontaminate_pairs(ctx, stage.protected(ctx)),
        "train": lambda: lifecycle.train_adapter(ctx),
        "merge": lambda: lifecycle.merge_model(ctx, stage.merge_probes(ctx)),
        "assess": lambda: lifecycle.assess_models(
            ctx, partial(stage.assess_heldout, ctx), stage.headline),
        "report": lambda: lifecycle.write_stage_report(ctx, stage.name, stage.report_data(ctx)),
    })
    StageSteps(ctx.stage_dir, stage.step_names).run(
        [(name, actions[name]) for name in stage.step_names], ctx.log)
    atomic_write_text(ctx.path("DONE"), f"stage {ctx.number} complete\n")
