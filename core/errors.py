"""The project's one error hierarchy. The CLI prints `error: <message>` for every `CurriculumError`
and exits with its `exit_code`; anything else is a bug and keeps its traceback.

- `UsageError` (exit 2): the command, its options or its inputs are wrong; nothing ran.
- `RunFailure` (exit 1): a run started and could not finish.
- `TooLittleDataError` (exit 1): a stage's filters left too little data to go on; the one kind
  of failure `--skip-empty` turns into a SKIPPED stage.
"""
from __future__ import annotations


class CurriculumError(Exception):
    """Base of every error the CLI reports as one line."""

    exit_code = 1


class UsageError(CurriculumError):
    """Bad command, option or input file: fix it and run again."""

    exit_code = 2


class RunFailure(CurriculumError):
    """A run could not finish (a broken invariant, a failed check, an unusable model)."""

    exit_code = 1


class TooLittleDataError(RunFailure):
    """A stage kept too little data (instructions, tasks, pairs) to go on."""


class NoPairsError(TooLittleDataError):
    """A stage's filters kept no preference pair (or decontamination removed every one)."""
