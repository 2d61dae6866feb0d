"""Command line: parse, then call one function. Run `python cli.py --help`."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from core.constitution import ConstitutionError
from core.guards import TemplateContaminationError
from core.merge import MergeParityError
from core.models import PROJECT_ROOT, ModelResolutionError
from core.pipeline import StageSelectionError, run_stage, run_status
from core.run import RunDirError
from registry.stages import STAGES

USER_ERRORS = (ConstitutionError, ModelResolutionError, StageSelectionError, RunDirError,
               TemplateContaminationError, MergeParityError)


def fail(error: Exception) -> None:
    click.echo(f"error: {error}", err=True)
    sys.exit(2)


@click.group()
def main() -> None:
    """Bootstrap a base language model into a constitutionally aligned assistant."""


@main.group()
def stage() -> None:
    """List or run curriculum stages."""


@stage.command("list")
def stage_list() -> None:
    """Print the six stages in order."""
    for entry in STAGES:
        state = "built" if entry.module else "not built yet"
        click.echo(f"{entry.number}  {entry.name:<28} {state:<14} learns to {entry.learns}")


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
def stage_run(number: int, run_dir: Path | None, model: str | None, limit: int | None,
              heldout: int | None, seed: int | None, constitution_path: Path) -> None:
    """Run (or resume) stage NUMBER."""
    try:
        done = run_stage(number, run_dir, model, limit, seed, heldout, constitution_path)
    except USER_ERRORS as error:
        fail(error)
    click.echo(f"stage {number} complete: {done / f'stage_{number}'}")


@main.command()
@click.option("--run-dir", type=click.Path(path_type=Path, exists=True, file_okay=False),
              required=True)
def status(run_dir: Path) -> None:
    """Show each stage's steps and their state."""
    for number, name, steps, done in run_status(run_dir):
        click.echo(f"stage {number} ({name}): {'DONE' if done else 'not done'}")
        for step, state in steps:
            click.echo(f"  {step:<13} {state}")


if __name__ == "__main__":
    main()
