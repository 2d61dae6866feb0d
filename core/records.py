"""Reading another stage's outputs in the same run, one way for every stage.

A later stage may draw on an earlier stage's files (stage 3 keeps stages 1-2's held-out items out
of its training data; stage 4 labels pairs from stages 1-3's scored samples; stage 5 revises
stage 1's failures). Whether that output exists is a fact to report, not to guess:
`earlier_records` returns the records when the file is there, None when the earlier stage did
not get that far in this run (not run, under way, or SKIPPED before it), and raises
`MissingEarlierOutputError` when the earlier stage is DONE but the file is missing, or when a
line of it is not JSON.
"""
from __future__ import annotations

import json
from pathlib import Path

from core.errors import RunFailure


class MissingEarlierOutputError(RunFailure):
    """An earlier stage of this run is DONE but an output a later stage reads is missing, or a
    line of it is unreadable."""


def earlier_records(run_dir: Path, number: int, name: str, reader: int) -> list[dict] | None:
    """The records of `stage_<number>/<name>` for stage `reader`; None when stage `number` has
    not written that file in `run_dir` and is not DONE."""
    stage_dir = run_dir / f"stage_{number}"
    path = stage_dir / name
    if not path.is_file():
        if (stage_dir / "DONE").is_file():
            raise MissingEarlierOutputError(
                f"stage {reader} reads {path}, which stage {number} of this run wrote but is "
                f"missing now; restore it, or rerun stage {number} in a new --run-dir")
        return None
    records = []
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise MissingEarlierOutputError(
                    f"stage {reader} cannot read {path} line {line_number} ({error.msg}); the "
                    f"file is damaged: rerun stage {number} in a new --run-dir") from None
    return records
