"""Run directories: resolved config, a lock, and resumable steps with done markers.

Layout:
    runs/NAME/config.yaml            resolved config, seed, package versions, git commit
    runs/NAME/.lock                  held while a command works on the run
    runs/NAME/stage_N/steps/S.done   written only after step S's outputs are complete; it
                                     lists them (bytes, and sha256 up to HASH_LIMIT bytes)
    runs/NAME/stage_N/DONE           written last, when every step is done

A resume verifies every done step's outputs against its marker before trusting it: an output
that is missing, truncated or changed makes that step and every later one run again.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import platform
import subprocess
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Callable

import yaml

from core.errors import UsageError
from core.io import atomic_write_text, write_yaml

PINNED_SETTINGS = ("model", "seed", "limit", "heldout", "baseline_limit")
PACKAGES = ("torch", "transformers", "trl", "peft", "datasets", "accelerate", "tokenizers",
            "safetensors", "unsloth", "bitsandbytes")


class RunDirError(UsageError):
    """The run directory cannot be used as asked (different model, locked, ...)."""


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def git_commit(root: Path) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=10)
    except OSError:
        return None
    return out.stdout.strip() or None


def default_run_dir(root: Path) -> Path:
    return root / "runs" / datetime.now().strftime("%Y%m%d-%H%M%S")


def read_config(run_dir: Path) -> dict | None:
    path = run_dir / "config.yaml"
    return yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else None


def require_config(run_dir: Path) -> dict:
    """The run's config; a folder without one is refused (RunDirError) as no run directory."""
    config = read_config(run_dir)
    if config is None:
        raise RunDirError(f"{run_dir} is not a run directory (it has no config.yaml); pass the "
                          f"--run-dir a `stage run` or `run` command created")
    return config


def check_resume(saved: dict, requested: dict) -> None:
    """Refuse to resume a run with different pinned settings; say how to proceed."""
    problems = []
    for key in PINNED_SETTINGS:
        if requested.get(key) is not None and saved["run"].get(key) != requested[key]:
            problems.append(f"{key}: the run has {saved['run'].get(key)!r}, "
                            f"this command asks for {requested[key]!r}")
    if saved["constitution"]["sha256"] != requested["constitution_sha256"]:
        problems.append("constitution: constitution.yaml changed since the run started "
                        f"(was sha256 {saved['constitution']['sha256'][:12]}...)")
    if problems:
        raise RunDirError(
            "this run directory was started with other settings and cannot be resumed with "
            "these:\n  - " + "\n  - ".join(problems)
            + "\nResume with the run's own settings (omit the option), or use a new --run-dir."
        )


@dataclass
class RunLock:
    """An exclusive, non-blocking lock on a run directory."""

    path: Path

    def __enter__(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = open(self.path, "a+")
        try:
            fcntl.flock(self._handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._handle.seek(0)
            holder = self._handle.read().strip() or "unknown"
            self._handle.close()
            raise RunDirError(f"{self.path.parent} is in use by another command ({holder}; lock "
                              f"{self.path}); wait for it to finish") from None
        self._handle.seek(0)
        self._handle.truncate()
        self._handle.write(f"pid {os.getpid()} since {datetime.now(timezone.utc).isoformat()}")
        self._handle.flush()
        return self

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self._handle, fcntl.LOCK_UN)
        self._handle.close()


def write_config(run_dir: Path, config: dict) -> None:
    write_yaml(run_dir / "config.yaml", config)


Step = tuple[str, Callable[[], None]]
HASH_LIMIT = 256 * 2**20  # larger outputs (model shards) are checked by size: hashing a 32B
                          # model's 65 GB on every resume would take minutes
# markers, append-only caches and training checkpoints (resumable state a user may delete to
# free disk once the step is done; nothing downstream reads them)
NOT_OUTPUTS = ("steps/", "cache/", "train/checkpoints/", "DONE", "SKIPPED")


def file_states(stage_dir: Path) -> dict[str, tuple[int, int]]:
    """(bytes, mtime_ns) of every file under `stage_dir` a step may count as its output."""
    if not stage_dir.is_dir():
        return {}
    states = {}
    for path in stage_dir.rglob("*"):
        rel = path.relative_to(stage_dir).as_posix()
        if path.is_file() and not rel.startswith(NOT_OUTPUTS) and not path.name.startswith("."):
            stat = path.stat()
            states[rel] = (stat.st_size, stat.st_mtime_ns)
    return states


def file_record(path: Path) -> dict:
    """What a done marker keeps of one output: its size, and its sha256 when it is small
    enough to hash on every resume."""
    size = path.stat().st_size
    return {"bytes": size, "sha256": file_sha256(path) if size <= HASH_LIMIT else None}


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(2**20):
            digest.update(chunk)
    return digest.hexdigest()


def output_problem(stage_dir: Path, rel: str, recorded: dict) -> str | None:
    """Why a recorded output no longer matches its record (None when it does)."""
    path = stage_dir / rel
    if not path.is_file():
        return f"{rel} is missing"
    size = path.stat().st_size
    if size != recorded["bytes"]:
        return f"{rel} has {size} bytes, the step wrote {recorded['bytes']}"
    if recorded["sha256"] is not None and file_sha256(path) != recorded["sha256"]:
        return f"{rel} changed since the step wrote it (sha256 differs)"
    return None


SHARED_TAIL = ("decontaminate", "train", "merge", "assess", "report")  # every stage's last steps


class StageSteps:
    """Runs a stage's ordered steps, skipping those whose done marker exists and whose outputs
    still match it."""

    def __init__(self, stage_dir: Path, names: list[str]):
        self.stage_dir = stage_dir
        self.names = names

    def marker(self, name: str) -> Path:
        return self.stage_dir / "steps" / f"{name}.done"

    def is_done(self, name: str) -> bool:
        return self.marker(name).is_file()

    def state(self, name: str, partial: Callable[[str], bool] | None = None) -> str:
        if self.is_done(name):
            return "done"
        if partial and partial(name):
            return "partial"
        return "pending"

    def outputs(self, name: str) -> dict[str, dict]:
        """The outputs step `name`'s marker lists (empty for markers written before outputs
        were recorded)."""
        return json.loads(self.marker(name).read_text(encoding="utf-8")).get("outputs", {})

    def broken_step(self) -> tuple[str, str] | None:
        """(step, why) for the first done step whose outputs no longer match its marker. A
        file belongs to the last step that wrote it."""
        owner: dict[str, tuple[str, dict]] = {}
        for name in self.names:
            if self.is_done(name):
                owner.update({rel: (name, rec) for rel, rec in self.outputs(name).items()})
        for name in self.names:
            for rel, (step, recorded) in owner.items():
                if step == name and (problem := output_problem(self.stage_dir, rel, recorded)):
                    return name, problem
        return None

    @property
    def last_error_path(self) -> Path:
        return self.stage_dir / "steps" / "last_error.json"

    def record_failure(self, name: str, error: BaseException) -> None:
        """steps/last_error.json: the step that stopped, why and when (removed when a step
        next finishes)."""
        message = str(error).splitlines()[0][:500] if str(error) else ""
        try:
            atomic_write_text(self.last_error_path, json.dumps(
                {"step": name, "error": type(error).__name__, "message": message,
                 "at": datetime.now(timezone.utc).isoformat()}) + "\n")
        except OSError:
            pass  # a full disk cannot take the record; the original error still propagates

    def last_error(self) -> dict | None:
        """What stopped the last attempt, when it did not finish its step."""
        path = self.last_error_path
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None

    def redo_from(self, name: str) -> None:
        """Forget step `name` and every later step (and the stage's DONE), so they run again."""
        for later in self.names[self.names.index(name):]:
            self.marker(later).unlink(missing_ok=True)
        (self.stage_dir / "DONE").unlink(missing_ok=True)

    def verify(self, log: Callable[[str], None]) -> None:
        """Check the done steps' outputs; on a mismatch, log it and redo from that step."""
        broken = self.broken_step()
        if broken is None:
            return
        name, problem = broken
        later = self.names[self.names.index(name):]
        log(f"step {name}: {problem}; running {', '.join(later)} again")
        self.redo_from(name)

    def run(self, steps: list[Step], log: Callable[[str], None]) -> None:
        self.verify(log)
        for name, action in steps:
            if self.is_done(name):
                log(f"step {name}: done (skipped)")
                continue
            log(f"step {name}: running")
            before = file_states(self.stage_dir)
            started = time.time()
            try:
                action()
            except BaseException as error:  # Ctrl-C too: status shows where a run stopped
                self.record_failure(name, error)
                raise
            self.last_error_path.unlink(missing_ok=True)
            seconds = round(time.time() - started, 2)
            after = file_states(self.stage_dir)
            written = sorted(rel for rel, state in after.items() if before.get(rel) != state)
            atomic_write_text(self.marker(name), json.dumps(
                {"finished": datetime.now(timezone.utc).isoformat(), "seconds": seconds,
                 "outputs": {rel: file_record(self.stage_dir / rel) for rel in written}}) + "\n")
            log(f"step {name}: done in {seconds:.1f}s")
