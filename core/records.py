"""The records stages pass on: the task and the preference pair every stage writes, and one way
to read an earlier stage's outputs in the same run.

A `Task` is one line of `stage_N/tasks.jsonl`, the one task file of every stage, train and
held-out together: `id`, `stage`, `split` ("train" or "heldout"), `text` (the request exactly as
the zero-shot house prompt shows it), `kind` (the stage's kind of task), `source` (where the task
came from) and `extra` (the stage's own fields: constraints, a spec, a label, principles ...).

A `Pair` is what `core.pairs.write_pairs` writes for every stage (pairs_candidates.jsonl, then
pairs.jsonl after decontamination): `prompt`, `chosen`, `rejected` (what DPO reads), `stage`,
`task_id` and `input_model_sha256` (the weights that generated both sides), then the stage's own
provenance (sample ids, check results, judge margins, principles) as further keys of the same
JSON object, so that `datasets` and TRL read the file as it is.

A later stage may draw on an earlier stage's files (stage 3 keeps stages 1-2's held-out items out
of its training data; stage 4 labels pairs from stages 1-3's scored samples; stage 5 revises
stage 1's failures). Whether that output exists is a fact to report, not to guess:
`earlier_records` returns the records when the file is there, None when the earlier stage did
not get that far in this run (not run, under way, or SKIPPED before it), and raises
`MissingEarlierOutputError` when the earlier stage is DONE but the file is missing, or when a
line of it is not JSON.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.errors import RunFailure
from core.io import DamagedFileError, read_json, read_jsonl, write_jsonl

PAIR_TEXT_FIELDS = ("prompt", "chosen", "rejected", "task_id")
TASKS_FILE = "tasks.jsonl"
SPLITS = ("train", "heldout")


@dataclass(frozen=True)
class Task:
    """One task of one stage."""

    id: str
    stage: int
    split: str  # "train" or "heldout"
    text: str  # the request as the zero-shot house prompt shows it
    kind: str
    source: str
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise RunFailure(f"task {self.id!r} of stage {self.stage} has split "
                             f"{self.split!r}; expected one of {SPLITS}")

    def to_json(self) -> dict:
        return {"id": self.id, "stage": self.stage, "split": self.split, "text": self.text,
                "kind": self.kind, "source": self.source, "extra": self.extra}

    @classmethod
    def from_json(cls, data: dict, where: str) -> "Task":
        """A task read back from tasks.jsonl; `where` (file and line) names a bad record."""
        expected = {"id": str, "stage": int, "split": str, "text": str, "kind": str,
                    "source": str, "extra": dict}
        problems = [f"{key} missing" if key not in data else f"{key} is not {kind.__name__}"
                    for key, kind in expected.items()
                    if key not in data or not isinstance(data[key], kind)]
        if problems:
            raise MissingEarlierOutputError(f"{where}: not a task record ({', '.join(problems)})")
        return cls(**{key: data[key] for key in expected})


def write_tasks(path: Path, tasks: list[Task]) -> None:
    """tasks.jsonl, atomically."""
    write_jsonl(path, [task.to_json() for task in tasks])


def read_tasks(path: Path, split: str | None = None) -> list[Task]:
    """The tasks in a stage's tasks.jsonl (only `split` when given)."""
    if not path.is_file():
        raise MissingEarlierOutputError(f"{path} is missing: the stage's tasks step has not "
                                        f"written it (rerun the stage to make it)")
    tasks = [Task.from_json(record, f"{path} line {i}")
             for i, record in enumerate(read_records(path, "reading tasks"), start=1)]
    return [t for t in tasks if split is None or t.split == split]


def earlier_tasks(run_dir: Path, number: int, reader: int) -> list[Task] | None:
    """Stage `number`'s tasks in this run for stage `reader`; None when it has not written them
    (see `earlier_records`)."""
    records = earlier_records(run_dir, number, TASKS_FILE, reader)
    if records is None:
        return None
    path = run_dir / f"stage_{number}" / TASKS_FILE
    return [Task.from_json(r, f"{path} line {i}") for i, r in enumerate(records, start=1)]


@dataclass(frozen=True)
class Pair:
    """One preference pair with its provenance."""

    prompt: str  # the zero-shot house prompt: exemplars never reach training
    chosen: str
    rejected: str
    stage: int
    task_id: str
    input_model_sha256: str | None  # the weights that generated chosen and rejected
    extra: dict[str, Any] = field(default_factory=dict)  # the stage's own provenance

    @classmethod
    def from_stage(cls, record: dict, stage: int, input_model_sha256: str | None) -> "Pair":
        """A stage's pair dict as a Pair; a missing or non-text core field is a bug in the stage."""
        bad = [k for k in PAIR_TEXT_FIELDS if not isinstance(record.get(k), str)]
        if bad:
            raise RunFailure(f"stage {stage} made a pair without text in {bad} (task "
                             f"{record.get('task_id')!r}); this is a bug in the stage module")
        reserved = {"stage", "input_model_sha256"} & set(record)
        if reserved:
            raise RunFailure(f"stage {stage}'s pair for task {record['task_id']!r} sets "
                             f"{sorted(reserved)}, which the pair record fills in itself")
        extra = {k: v for k, v in record.items() if k not in PAIR_TEXT_FIELDS}
        return cls(record["prompt"], record["chosen"], record["rejected"], stage,
                   record["task_id"], input_model_sha256, extra)

    def to_json(self) -> dict:
        return {"prompt": self.prompt, "chosen": self.chosen, "rejected": self.rejected,
                "stage": self.stage, "task_id": self.task_id,
                "input_model_sha256": self.input_model_sha256, **self.extra}


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
    return read_records(path, f"stage {reader} reading stage {number}'s output")


def earlier_json(run_dir: Path, number: int, name: str, reader: int) -> dict | None:
    """The JSON object `stage_<number>/<name>` for stage `reader`; None when stage `number` has
    not written it in `run_dir` and is not DONE (then a missing or damaged file is an error)."""
    path = run_dir / f"stage_{number}" / name
    if not path.is_file() and not (path.parent / "DONE").is_file():
        return None
    try:
        return read_json(path)
    except (OSError, ValueError) as error:
        raise MissingEarlierOutputError(
            f"stage {reader} reads {path}, which stage {number} of this run wrote, and cannot "
            f"({error}); restore it, or rerun stage {number} in a new --run-dir") from None


def read_records(path: Path, who: object) -> list[dict]:
    """JSON lines of `path`; a damaged line is a MissingEarlierOutputError naming it."""
    try:
        return read_jsonl(path)
    except DamagedFileError as error:
        raise MissingEarlierOutputError(f"{who}: {error}") from None
