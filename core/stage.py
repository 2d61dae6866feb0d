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
                  report_data=report_data, plan_work=plan_work)

`plan_work` says, without loading a model, how much model work the stage's own steps will do
at most (`--dry-run` prints it with the shared tail's part).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Protocol

from core import lifecycle
from core.contamination import Protected
from core.context import StageContext
from core.io import atomic_write_text
from core.run import SHARED_TAIL, StageSteps


class HeldoutAssessment(Protocol):
    def __call__(self, ctx: StageContext, backend: Any, label: str) -> dict:
        """{"summary": {...}, "items": [{"id", "passed", ...}]} for the model `label` names
        ("before", "after", or "after stage K" when `check retention` assesses a later
        stage's model) on the stage's held-out tasks (zero-shot, greedy); generations are
        cached in `ctx.heldout_cache(label)`."""


class DevAssessment(Protocol):
    def __call__(self, ctx: StageContext, backend: Any, cache: Path) -> dict:
        """Like HeldoutAssessment, on the stage's dev items instead: items never trained on
        and never reported, on which `tune --retention` measures what a later stage's recipe
        keeps of this stage (generations cached in `cache`). UsageError: the run has none."""


@dataclass(frozen=True)
class Step:
    """One of a stage's own data steps: `action(ctx, pool)` writes the step's outputs."""

    name: str
    action: Callable[[StageContext, dict], None]


@dataclass(frozen=True)
class Work:
    """The most model work one step will do: `prompts` generation requests of up to
    `new_tokens` new tokens each, `scored` prompts whose next-token log-probabilities are read
    (the A/B judge: nothing generated), `dpo_steps` optimizer steps. `note` says how."""

    step: str
    prompts: int = 0
    new_tokens: int = 0
    scored: int = 0
    dpo_steps: int = 0
    note: str = ""


@dataclass(frozen=True)
class WorkPlan:
    """What a dry run says about a stage before anything is loaded."""

    work: tuple[Work, ...]  # the stage's own data steps
    max_pairs: int  # the most preference pairs its pairs step can keep
    heldout_prompts: int  # held-out generations per model in the assess step


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
    plan_work: Callable[[StageContext], WorkPlan]  # the most work its data steps will do
    settings: type[StageSettings] = StageSettings
    load_pool: Callable[[], dict] = no_pool
    assess_dev: DevAssessment | None = None  # dev items for `tune --retention` (stage 2 only)

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


def planned_work(stage: Stage, ctx: StageContext) -> list[Work]:
    """Every step's most work, in step order: the stage's own plan, then the shared tail's
    (training from the most pairs the stage can keep, the assessment of both models)."""
    from core.suites.baseline import probe_counts

    plan = stage.plan_work(ctx)
    p = ctx.profile
    per_step = p.train_batch_size * p.grad_accum
    # with rehearsal, up to replay_share x its own pairs from earlier stages (stage 1 has none)
    trained = plan.max_pairs + (round(p.replay_share * plan.max_pairs) if ctx.number > 1 else 0)
    generated, judging = probe_counts(ctx.baseline_limit)
    own = {w.step: w for w in plan.work}
    tail = {
        "train": Work("train", dpo_steps=math.ceil(trained / per_step) * p.epochs,
                      note=f"at most {plan.max_pairs} pairs"
                           + (f" and {trained - plan.max_pairs} replayed"
                              if trained > plan.max_pairs else "")
                           + f", {per_step} per step, {p.epochs} epoch(s)"),
        # before and after: held-out + baseline; before only: the few-shot reference
        "assess": Work("assess", prompts=2 * plan.heldout_prompts + 3 * generated,
                       new_tokens=p.max_new_tokens, scored=3 * 2 * judging,
                       note=f"{plan.heldout_prompts} held-out and {generated} baseline "
                            f"prompts on both models, the few-shot reference on the input"),
    }
    return [own.get(name) or tail.get(name) or Work(name) for name in stage.step_names]
