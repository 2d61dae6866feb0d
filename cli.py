"""Command line: parse, then call one function. Run `python cli.py --help`."""
from __future__ import annotations

import errno
import sys
from pathlib import Path
from typing import Callable

import click

from app.pipeline import DEFAULT_DATA_DIR, run_curriculum, run_stage, run_status
from core.errors import CurriculumError, TooLittleDataError, UsageError
from core.models import PROJECT_ROOT
from registry.presets import preset_by_name, preset_names
from registry.stages import STAGES

USER_ERRORS = CurriculumError


def interrupted() -> None:
    """Ctrl-C: finished work is on disk (every generated item, every checkpoint); say how to go on."""
    command = " ".join(["python", "cli.py", *sys.argv[1:]])
    click.echo(f"\ninterrupted: finished work is kept; resume with the same command:\n  {command}",
               err=True)
    sys.exit(130)


ENVIRONMENT_ERRNOS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up",
                      errno.EROFS: "the file system is read-only",
                      errno.EACCES: "permission denied"}


def environment_fault(error: OSError) -> None:
    """A full disk, a read-only mount or a permission error while a run writes: one line with
    what to do, exit 1 (finished steps and generated items are on disk). Any other OSError is
    a bug and keeps its traceback."""
    if error.errno not in ENVIRONMENT_ERRNOS:
        raise error
    where = f" writing {error.filename}" if error.filename else ""
    click.echo(f"error: {ENVIRONMENT_ERRNOS[error.errno]}{where}; fix that and rerun the same "
               f"command to resume (finished work is kept)", err=True)
    sys.exit(1)


def fail(error: CurriculumError) -> None:
    """One `error:` line (and a hint where there is one); exit 2 for usage and input errors, 1
    for run failures."""
    hint = ("\nTo go on without this stage (the next one starts from the model it was given), "
            "rerun with --skip-empty." if isinstance(error, TooLittleDataError) else "")
    click.echo(f"error: {error}{hint}", err=True)
    sys.exit(error.exit_code)


def show(lines: Callable[[], list[str]]) -> None:
    """Print the lines a read-only command computes (an input error: one line, exit 2)."""
    try:
        computed = lines()
    except USER_ERRORS as error:
        fail(error)
    for line in computed:
        click.echo(line)


def table_console():
    """A rich console for result tables: a log file (no terminal) gets wide lines, so no
    number is cut to fit 80 columns."""
    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=240)


@click.group()
def main() -> None:
    """Bootstrap a base language model into a constitutionally aligned assistant."""


@main.group()
def stage() -> None:
    """List or run curriculum stages."""


@stage.command("list")
def stage_list() -> None:
    """Print the six stages in order."""
    for stage in STAGES:
        click.echo(f"{stage.number}  {stage.name:<28} learns to {stage.summary}")


SKIP_EMPTY = click.option(
    "--skip-empty", is_flag=True,
    help="Mark a stage that keeps no preference pair SKIPPED (stage_N/SKIPPED says why) and go "
         "on from the model it was given, instead of stopping with an error.")
SET = click.option(
    "--set", "overrides", multiple=True, metavar="SECTION.FIELD=VALUE",
    help="Change one setting for this run (repeatable), e.g. --set stage1.max_judged_samples=4 "
         "or --set profile.learning_rate=1e-5; see `python cli.py config show`. Recorded in "
         "config.yaml.")
ACCEPT_CHANGED = click.option(
    "--accept-changed-settings", "accept_changed", is_flag=True,
    help="Resume a run even though a setting differs from the one it was made with (the "
         "change is recorded in config.yaml); without it such a resume is refused.")
REPORT_TO = click.option(
    "--report-to", "report_to", multiple=True, type=click.Choice(["wandb", "trackio"]),
    help="Also log training to Weights & Biases or Trackio (repeatable; one run per stage, "
         "named RUN-stageN, project bootstrap-curriculum; WANDB_MODE=offline is respected). "
         "TensorBoard logs are always written to stage_N/train/tensorboard.")
DRY_RUN = click.option(
    "--dry-run", is_flag=True,
    help="Check every option, then print the steps, their state and the most work each will "
         "do (generation requests, new tokens, judge prompts, DPO steps); load and write "
         "nothing.")
ENGINE = click.option(
    "--engine", type=click.Choice(["hf", "vllm"]), default=None,
    help="Generation engine, the same as --set profile.engine=ENGINE: hf (the project's "
         "sampling loop) or vllm (needs .venv-vllm: bash scripts/setup.sh --vllm). Recorded "
         "in config.yaml.")


def with_engine(overrides: tuple[str, ...], engine: str | None) -> tuple[str, ...]:
    """--engine as the --set override it stands for."""
    return overrides + (f"profile.engine={engine}",) if engine else overrides


PRESET = click.option(
    "--preset", type=click.Choice(preset_names()), default=None,
    help="A named set of options (registry/presets.py): `demo` runs the six stages on "
         "gemma-3-270m sized for held-out sets of 100+ items. Options given here win; its "
         "--set items come before yours.")


def with_preset(name: str | None, model: str | None, limit: int | None, heldout: int | None,
                baseline_limit: int | None, overrides: tuple[str, ...]):
    """(model, limit, heldout, baseline_limit, overrides) with the preset filling what the
    command line left out."""
    if name is None:
        return model, limit, heldout, baseline_limit, overrides
    preset = preset_by_name(name)
    return (model or preset.model, preset.limit if limit is None else limit,
            preset.heldout if heldout is None else heldout,
            preset.baseline_limit if baseline_limit is None else baseline_limit,
            preset.overrides + overrides)


BASELINE_LIMIT = click.option(
    "--baseline-limit", type=int, default=None,
    help="Baseline probes per capability in each stage's assessment (default: all; a smaller "
         "number makes CPU runs shorter and the intervals wider).")


@stage.command("run")
@click.argument("number", type=int)
@click.option("--run-dir", type=click.Path(path_type=Path), default=None,
              help="Run directory (default runs/<timestamp>); an existing one is resumed.")
@click.option("--model", default=None,
              help="Profile name, Hugging Face id or local model directory "
                   "(default: qwen2.5-32b with CUDA, gemma-3-270m without).")
@click.option("--limit", type=int, default=None, help="Number of training tasks for the stage.")
@click.option("--heldout", type=int, default=None, help="Number of held-out assessment tasks.")
@click.option("--seed", type=int, default=None, help="Seed for every random choice (default 0).")
@click.option("--constitution", "constitution_path", type=click.Path(path_type=Path),
              default=PROJECT_ROOT / "constitution.yaml", show_default=True)
@click.option("--data-dir", type=click.Path(path_type=Path), default=None,
              help=f"Evaluation sets for decontamination (default {DEFAULT_DATA_DIR} if present).")
@click.option("--no-eval-sets", is_flag=True,
              help="Run without the external evaluation sets (no decontamination against "
                   "IFEval, AILuminate, HH-RLHF); recorded in the run.")
@click.option("--allow-contamination", is_flag=True,
              help="Train even if a template contamination check fails (recorded in config.yaml).")
@BASELINE_LIMIT
@SKIP_EMPTY
@SET
@ACCEPT_CHANGED
@click.option("--redo-from", default=None, metavar="STEP",
              help="Run this step of the stage again, and every step after it (e.g. train, "
                   "after changing a training setting with --set and "
                   "--accept-changed-settings).")
@REPORT_TO
@ENGINE
@PRESET
@DRY_RUN
def stage_run(number: int, run_dir: Path | None, model: str | None, limit: int | None,
              heldout: int | None, seed: int | None, constitution_path: Path,
              data_dir: Path | None, no_eval_sets: bool, allow_contamination: bool,
              baseline_limit: int | None, skip_empty: bool, overrides: tuple[str, ...],
              accept_changed: bool, redo_from: str | None, report_to: tuple[str, ...],
              engine: str | None, preset: str | None, dry_run: bool) -> None:
    """Run (or resume) stage NUMBER."""
    model, limit, heldout, baseline_limit, overrides = with_preset(
        preset, model, limit, heldout, baseline_limit, with_engine(overrides, engine))
    if dry_run:
        from app.pipeline import dry_run_stage

        show(lambda: dry_run_stage(number, run_dir, model, limit, seed, heldout,
                                   constitution_path, data_dir=data_dir,
                                   allow_contamination=allow_contamination,
                                   baseline_limit=baseline_limit, overrides=overrides,
                                   accept_changed=accept_changed, no_eval_sets=no_eval_sets,
                                   report_to=report_to))
        return
    try:
        done = run_stage(number, run_dir, model, limit, seed, heldout, constitution_path,
                         data_dir, allow_contamination, baseline_limit=baseline_limit,
                         skip_empty=skip_empty, overrides=overrides,
                         accept_changed=accept_changed, redo_from=redo_from,
                         no_eval_sets=no_eval_sets, report_to=report_to)
    except USER_ERRORS as error:
        fail(error)
    except KeyboardInterrupt:
        interrupted()
    except OSError as error:
        environment_fault(error)
    ended = "skipped" if (done / f"stage_{number}" / "SKIPPED").is_file() else "complete"
    click.echo(f"stage {number} {ended}: {done / f'stage_{number}'}")


@main.command("run")
@click.option("--run-dir", type=click.Path(path_type=Path), default=None,
              help="Run directory (default runs/<timestamp>); an existing one is resumed.")
@click.option("--model", default=None, help="The base model (profile, HF id or local path).")
@click.option("--limit", type=int, default=None, help="Training tasks per stage.")
@click.option("--heldout", type=int, default=None,
              help="Held-out assessment tasks per stage (default: a quarter of --limit, at "
                   "least 8).")
@click.option("--seed", type=int, default=None, help="Seed (default 0).")
@click.option("--until", type=int, default=None, help="Last stage to run (default: all built).")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None)
@click.option("--no-eval-sets", is_flag=True,
              help="Run without the external evaluation sets (recorded in the run).")
@click.option("--allow-contamination", is_flag=True)
@BASELINE_LIMIT
@SKIP_EMPTY
@SET
@ACCEPT_CHANGED
@REPORT_TO
@ENGINE
@PRESET
@DRY_RUN
def run_all(run_dir: Path | None, model: str | None, limit: int | None, heldout: int | None,
            seed: int | None, until: int | None, data_dir: Path | None, no_eval_sets: bool,
            allow_contamination: bool, baseline_limit: int | None, skip_empty: bool,
            overrides: tuple[str, ...], accept_changed: bool, report_to: tuple[str, ...],
            engine: str | None, preset: str | None, dry_run: bool) -> None:
    """Run the curriculum's stages in order, each learning from the previous merged model."""
    model, limit, heldout, baseline_limit, overrides = with_preset(
        preset, model, limit, heldout, baseline_limit, with_engine(overrides, engine))
    if dry_run:
        from app.pipeline import dry_run_curriculum

        show(lambda: dry_run_curriculum(run_dir, model, limit, seed, until, heldout=heldout,
                                        data_dir=data_dir,
                                        no_eval_sets=no_eval_sets,
                                        allow_contamination=allow_contamination,
                                        baseline_limit=baseline_limit, overrides=overrides,
                                        accept_changed=accept_changed, report_to=report_to))
        return
    try:
        done = run_curriculum(run_dir, model, limit, seed, until, heldout=heldout,
                              data_dir=data_dir,
                              no_eval_sets=no_eval_sets,
                              allow_contamination=allow_contamination,
                              baseline_limit=baseline_limit, skip_empty=skip_empty,
                              overrides=overrides, accept_changed=accept_changed,
                              report_to=report_to)
    except USER_ERRORS as error:
        fail(error)
    except KeyboardInterrupt:
        interrupted()
    except OSError as error:
        environment_fault(error)
    click.echo(f"curriculum report: {done / 'report.md'}")


@main.command()
@click.option("--run-dir", type=click.Path(path_type=Path, exists=True, file_okay=False),
              required=True)
def status(run_dir: Path) -> None:
    """Show each stage's steps and their state."""
    try:
        rows = run_status(run_dir)
    except USER_ERRORS as error:
        fail(error)
    for row in rows:
        click.echo(f"stage {row.number} ({row.name}): {row.state}")
        for step, state, detail in row.steps:
            click.echo(f"  {step:<13} {state:<8} {detail}".rstrip())
        if row.last_error and row.state == "not done":
            e = row.last_error
            click.echo(f"  last attempt stopped in step {e['step']} at {e['at'][:19]}: "
                       f"{e['error']}: {e['message']}")


@main.command()
@click.option("--model", required=True,
              help="Profile, HF id, local model directory, or a run's stage directory "
                   "(runs/NAME/stage_1 means its merged model).")
@click.option("--suite", type=click.Choice(["baseline", "ifeval", "fewshot-reference"]),
              default="baseline", show_default=True)
@click.option("--limit", type=int, default=None,
              help="Items to run (per capability for baseline suites).")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="JSON result file (default artifacts/assess/MODEL-SUITE.json).")
@click.option("--data-dir", type=click.Path(path_type=Path), default=DEFAULT_DATA_DIR,
              show_default=True, help="Folder holding ifeval/input_data.jsonl.")
@click.option("--max-new-tokens", type=int, default=None)
@click.option("--compare-to", type=click.Path(path_type=Path, exists=True, dir_okay=False),
              default=None, help="An earlier result of the same suite: adds paired McNemar tests.")
def assess(model: str, suite: str, limit: int | None, out: Path | None, data_dir: Path,
           max_new_tokens: int | None, compare_to: Path | None) -> None:
    """Run an assessment suite on any model and print its rates with 95% intervals."""
    from app.commands import assess_model, summary_rows

    try:
        result = assess_model(model, suite, limit, out, data_dir, max_new_tokens, compare_to)
    except USER_ERRORS as error:
        fail(error)
    from rich.table import Table

    table = Table(title=f"{suite} on {result['model']} ({result['seconds']} s)")
    table.add_column("metric")
    table.add_column("rate [95% CI] (k/n)")
    for name, value in summary_rows(result):
        table.add_row(name, value)
    table_console().print(table)
    for group, test in result.get("paired_vs", {}).get("tests", {}).items():
        click.echo(f"paired vs {result['paired_vs']['file']}: {group}: +{test['gained']} "
                   f"-{test['lost']} p={test['p_value']:.3g}")
    click.echo(f"written: {result['out']}")


@main.group()
def bench() -> None:
    """Benchmarks that print side-by-side ratios."""


@bench.command("generation")
@click.option("--model", default="tiny-qwen2", show_default=True)
@click.option("--prompts", "count", type=int, default=16, show_default=True)
@click.option("--max-new-tokens", type=int, default=32, show_default=True)
@click.option("--batch-sizes", default="1,4,16", show_default=True)
@click.option("--vllm/--no-vllm", "with_vllm", default=None,
              help="Also benchmark the vllm engine (default: when .venv-vllm exists).")
def bench_generation_command(model: str, count: int, max_new_tokens: int, batch_sizes: str,
                             with_vllm: bool | None) -> None:
    """Batched sampling loop vs one-at-a-time vs transformers' generate (and vLLM), on the
    same prompts."""
    from contextlib import nullcontext
    from dataclasses import replace

    from rich.table import Table

    from core.backend import load_backend
    from core.bench import bench_generation, compute_limit
    from core.models import local_model_dir
    from core.vllm_engine import VLLM_VENV
    from registry.models import resolve_model

    try:
        resolved = resolve_model(model)
    except USER_ERRORS as error:
        fail(error)
    path = local_model_dir(resolved.source)
    backend = load_backend(path, resolved.profile)
    sizes = tuple(int(b) for b in batch_sizes.split(","))
    vllm = None
    if with_vllm or (with_vllm is None and (VLLM_VENV / "bin" / "python").is_file()):
        try:
            vllm = load_backend(path, replace(resolved.profile, engine="vllm"))
        except USER_ERRORS as error:
            if with_vllm:
                fail(error)
            click.echo(f"vllm left out: {error}")
    limit = compute_limit(backend.model)
    with vllm or nullcontext():
        rows = bench_generation(backend, count, max_new_tokens, sizes, vllm, limit)
    table = Table(title=f"generation on {resolved.profile.name}: {count} prompts x "
                        f"{max_new_tokens} new tokens")
    for column in rows[0]:
        table.add_column(column)
    for row in rows:
        table.add_row(*(str(v) for v in row.values()))
    table_console().print(table)
    click.echo(f"compute limit: {limit['matmul_gflops']:.1f} GFLOP/s measured matmul rate / "
               f"{limit['gflop_per_token']:.3f} GFLOP per token = "
               f"{limit['tokens_per_s']:.1f} tokens/s")
    if vllm is not None:
        click.echo(f"vllm worker start-up (not in the rows): {vllm.startup_s:.0f} s")


@bench.command("train")
@click.option("--model", default="tiny-qwen2", show_default=True)
@click.option("--pairs", "pairs_file", required=True, type=click.Path(exists=True, dir_okay=False),
              help="A stage's pairs.jsonl (e.g. runs/NAME/stage_1/pairs.jsonl).")
@click.option("--steps", type=int, default=3, show_default=True)
def bench_train_command(model: str, pairs_file: str, steps: int) -> None:
    """DPO with the project's settings vs with the reference log-probs precomputed vs TRL's
    defaults, on the same pairs: pairs/s and peak memory, each variant in its own process."""
    from rich.table import Table

    from core.bench import bench_train
    from core.io import read_jsonl
    from core.models import local_model_dir
    from registry.models import resolve_model

    try:
        resolved = resolve_model(model)
    except USER_ERRORS as error:
        fail(error)
    pairs = read_jsonl(Path(pairs_file))
    if not pairs or steps < 1:
        fail(UsageError(f"--pairs {pairs_file} holds no pairs or --steps {steps} < 1; pass a "
                        f"stage's pairs.jsonl and a positive step count"))
    rows = bench_train(local_model_dir(resolved.source), resolved.profile, pairs, steps)
    table = Table(title=f"DPO on {resolved.profile.name}: {steps} steps, pairs from {pairs_file}")
    columns = [c for c in rows[0] if any(row[c] is not None for row in rows)]  # no GPU: no GPU peak
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*(str(row[c]) for c in columns))
    table_console().print(table)


@main.group()
def check() -> None:
    """Checks between stages."""


@check.command("contamination")
@click.option("--run-dir", type=click.Path(path_type=Path, exists=True, file_okay=False),
              required=True)
@click.option("--stage", type=int, default=1, show_default=True)
@click.option("--probe/--no-probe", default=False,
              help="Also load the models and measure the chat template's effect.")
def check_contamination_command(run_dir: Path, stage: int, probe: bool) -> None:
    """Template, data (13-gram) and exemplar contamination of a stage's training records."""
    from app.commands import check_contamination

    try:
        result = check_contamination(run_dir, stage, probe)
    except USER_ERRORS as error:
        fail(error)
    click.echo(f"{result['records']}: {result['count']} records, {result['findings']} findings "
               f"{result['by_check']}")
    for problem in result["template_problems"]:
        click.echo(f"template problem: {problem}")
    for label, probe_result in result.get("probes", {}).items():
        click.echo(f"chat-template probe ({label}): {probe_result['finding']}")
    if not result["complete"]:
        click.echo("contamination check INCOMPLETE: this run has no external evaluation sets "
                   "(--no-eval-sets); only the held-out split, the baseline probes and the "
                   "exemplars were checked", err=True)
        sys.exit(1)
    if not result["ok"]:
        click.echo("contamination check FAILED (details in contamination_check.tsv)", err=True)
        sys.exit(1)
    click.echo(f"contamination check passed (evaluation sets in {result['eval_sets']})")


@check.command("retention")
@click.option("--run-dir", type=click.Path(path_type=Path, exists=True, file_okay=False),
              required=True)
@click.option("--after-stage", "after_stages", type=int, multiple=True, metavar="K",
              help="Assess only on stage K's merged model (repeatable; default: every later "
                   "finished stage).")
def check_retention_command(run_dir: Path, after_stages: tuple[int, ...]) -> None:
    """Each finished stage's held-out tasks on every later stage's merged model, paired with
    the stage's own result; exits 1 when a metric falls more than 5 points."""
    from app.retention import check_retention
    from core.report import RETENTION_FILE, fmt_rate

    try:
        result = check_retention(run_dir, after_stages=after_stages)
    except USER_ERRORS as error:
        fail(error)
    except KeyboardInterrupt:
        interrupted()
    for r in result["rows"]:
        own = r["vs_own_after"]["mcnemar"]
        click.echo(f"stage {r['stage']} {r['metric']} {r['model']}: {fmt_rate(r['own_after'])} -> "
                   f"{fmt_rate(r['later'])} ({r['change_points']} points; +{own['gained']} "
                   f"-{own['lost']}, p={own['p_value']:.3g})")
    falls = [r for r in result["rows"] if r["falls_more_than_drop"]]
    click.echo(f"written: {run_dir / RETENTION_FILE} and the run report")
    if falls:
        click.echo(f"{len(falls)} held-out metric(s) fall more than {result['drop_points']:g} "
                   f"points on a later model", err=True)
        sys.exit(1)


@check.command("judge")
@click.option("--run-dir", type=click.Path(path_type=Path, exists=True, file_okay=False),
              required=True)
@click.option("--model", "models", multiple=True, metavar="LABEL",
              help="Only this model of the run: base or 'stage N' (repeatable; default: the "
                   "base and every trained stage's merged model).")
def check_judge_command(run_dir: Path, models: tuple[str, ...]) -> None:
    """The self-judge of stages 1-3, 5 and 6 (few-shot A/B log-probabilities, both orders) on
    stage 4's held-out labelled pairs, for each model of the run."""
    from app.judge_check import JUDGE_CHECK_FILE, check_judge
    from core.report import fmt_rate

    try:
        result = check_judge(run_dir, models)
    except USER_ERRORS as error:
        fail(error)
    except KeyboardInterrupt:
        interrupted()
    from rich.table import Table

    table = Table(title=f"the self-judge on {result['pairs']} held-out labelled pairs "
                        f"({', '.join(result['pair_sources'])})")
    for column in ("model", "right in both orders", "order-consistent", "first shown wins",
                   "averaged margin right", "vs base (McNemar)"):
        table.add_column(column)
    for label, r in result["models"].items():
        test = r.get("vs_base")
        table.add_row(label, fmt_rate(r["right_both_orders"]), fmt_rate(r["order_consistent"]),
                      fmt_rate(r["first_shown"]), fmt_rate(r["averaged_agrees_with_checks"]),
                      f"+{test['gained']} / -{test['lost']}, p = {test['p_value']:.3g}"
                      if test else "-")
    table_console().print(table)
    click.echo(f"written: {run_dir / JUDGE_CHECK_FILE}")


@main.command()
@click.option("--run-dir", type=click.Path(path_type=Path, exists=True, file_okay=False),
              required=True)
@click.option("--stage", "number", type=int, default=1, show_default=True)
@click.option("--grid", multiple=True, metavar="profile.FIELD=V1,V2",
              help="Values to try for one training field (repeatable: every combination runs; "
                   "none: the run's own settings only).")
@click.option("--dev-share", type=float, default=0.25, show_default=True,
              help="Share of the stage's tasks whose pairs form the dev split.")
@click.option("--retention", is_flag=True,
              help="Also merge each point and assess the earlier stages' dev items on it "
                   "(what the recipe keeps of them; stage 2 has dev items).")
def tune(run_dir: Path, number: int, grid: tuple[str, ...], dev_share: float,
         retention: bool) -> None:
    """Tune the DPO recipe on a dev split of a stage's pairs (never on its held-out tasks)."""
    from app.commands import tune_stage
    from core.report import fmt_rate

    try:
        result = tune_stage(run_dir, number, grid, dev_share, retention)
    except USER_ERRORS as error:
        fail(error)
    except KeyboardInterrupt:
        interrupted()
    kept = list(result.get("retention_reference", {}))
    click.echo(f"{result['train_pairs']} training pairs, {result['dev_pairs']} dev pairs "
               f"(dev share {result['dev_share']})")
    for name in kept:
        click.echo(f"{name} on the input model (dev items): "
                   f"{fmt_rate(result['retention_reference'][name])}")
    click.echo("| grid point | steps | replayed | train loss | dev ranked right | dev margin | "
               "dev chosen dlogp | warnings |" + "".join(f" {n} (dev) |" for n in kept))
    click.echo("|---|---|---|---|---|---|---|---|" + "---|" * len(kept))
    for p in result["points"]:  # a point tuned before replay was tunable has no replay_pairs
        click.echo(f"| {p['label']} | {p['steps']} | {p.get('replay_pairs', 0)} | "
                   f"{p['train_loss']:.3f} | {fmt_rate(p['dev_ranked_right'])} | "
                   f"{p['dev_margin']:.3f} | {p['dev_chosen_logratio']:.2f} | "
                   f"{len(p['warnings'])} |" + "".join(
                       f" {fmt_rate(p['retention_dev'][n]['rate'])} "
                       f"({p['retention_dev'][n]['change_points']:+g} points) |" for n in kept))
    click.echo(f"best on dev: {result['best']} (results in "
               f"{run_dir / f'stage_{number}' / 'tune' / 'results.json'})")


@main.group()
def config() -> None:
    """Show the settings a run uses."""


@config.command("show")
@click.option("--run-dir", type=click.Path(path_type=Path, exists=True, file_okay=False),
              default=None, help="Show the settings this run was made with (else the defaults).")
@click.option("--model", default=None, help="Profile whose defaults to show (no --run-dir).")
@SET
def config_show(run_dir: Path | None, model: str | None, overrides: tuple[str, ...]) -> None:
    """Print every setting (run, profile, each stage) with its value and help."""
    from app.pipeline import describe_settings

    show(lambda: describe_settings(run_dir, model, overrides))


@main.command("export")
@click.option("--run-dir", type=click.Path(path_type=Path, exists=True, file_okay=False),
              required=True)
@click.option("--stage", "number", type=int, required=True, help="The finished stage to export.")
@click.option("--to", "out", type=click.Path(path_type=Path), required=True,
              help="New or empty directory: OUT/model and OUT/dataset are written there.")
@click.option("--format", "data_format", type=click.Choice(["jsonl", "parquet"]),
              default="jsonl", show_default=True, help="File format of the pairs.")
@click.option("--push-to-hub", "repo", default=None, metavar="REPO",
              help="Also push: the model to the Hub model repo REPO, the pairs to the dataset "
                   "repo of the same id (token from HF_TOKEN only).")
@click.option("--dataset-repo", default=None, metavar="REPO",
              help="Push the pairs to this dataset repo instead of the --push-to-hub id.")
@click.option("--private", is_flag=True, help="Create the Hub repos private.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty --to directory.")
def export(run_dir: Path, number: int, out: Path, data_format: str, repo: str | None,
           dataset_repo: str | None, private: bool, overwrite: bool) -> None:
    """Export a finished stage: the merged model and its pairs, with Hub cards."""
    from app.export import export_stage

    try:
        written = export_stage(run_dir, number, out, data_format, repo, dataset_repo, private,
                               overwrite)
    except USER_ERRORS as error:
        fail(error)
    except OSError as error:
        environment_fault(error)
    click.echo(f"model: {written['model']} (card: {written['model_card']})")
    click.echo(f"dataset: {written['data_file']}, {written['pairs']} pairs "
               f"(card: {written['dataset_card']})")
    for url in written.get("pushed", []):
        click.echo(f"pushed: {url}")


if __name__ == "__main__":
    main()
