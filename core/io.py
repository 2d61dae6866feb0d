"""Atomic file writes and JSON-lines helpers: a crash never leaves a half-written output."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable

import yaml

from core.errors import RunFailure


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same folder, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | Path, data: Any) -> None:
    """Atomically write pretty JSON."""
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False, sort_keys=False) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def write_yaml(path: str | Path, data: Any) -> None:
    """Atomically write YAML, keeping key order."""
    atomic_write_text(path, yaml.safe_dump(data, sort_keys=False, allow_unicode=True))


def write_jsonl(path: str | Path, records: Iterable[dict]) -> int:
    """Atomically write one JSON object a line; returns the number of records."""
    lines = [json.dumps(record, ensure_ascii=False) for record in records]
    atomic_write_text(path, "".join(line + "\n" for line in lines))
    return len(lines)


class DamagedFileError(RunFailure):
    """A JSON-lines file the run wrote has a line that is not a JSON object."""


def read_jsonl(path: str | Path) -> list[dict]:
    """Read every complete line; a torn last line (crash mid-append) is ignored. A complete
    line that is not a JSON object raises DamagedFileError naming the file and line."""
    records = []
    try:
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.endswith("\n"):
                    break
                records.append(_json_object(line, path, number))
    except UnicodeDecodeError:
        raise DamagedFileError(f"{path}: not UTF-8 text after line {len(records)}; rerun the "
                               f"step that wrote it (stage run N --redo-from STEP)") from None
    return records


def _json_object(line: str, path, number: int) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise DamagedFileError(f"{path}:{number}: not a JSON line ({error.msg}); the file is "
                               f"damaged: rerun the step that wrote it (stage run N --redo-from "
                               f"STEP)") from None
    if not isinstance(record, dict):
        raise DamagedFileError(f"{path}:{number}: a JSON {type(record).__name__}, not an "
                               f"object; rerun the step that wrote it")
    return record


class AppendLog:
    """An append-only JSON-lines file where each record is flushed and fsynced on write."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._drop_torn_tail()
        self._handle = open(self.path, "a", encoding="utf-8")

    def _drop_torn_tail(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            keep = data[: data.rfind(b"\n") + 1]
            self.path.write_bytes(keep)

    def append(self, record: dict) -> None:
        self._handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> "AppendLog":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
