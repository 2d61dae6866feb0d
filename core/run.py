"""Run directories: resolved config, a lock, and resumable steps with done markers.

Layout:
    runs/NAME/config.yaml            resolved config, seed, package versions, git commit
    runs/NAME/.lock                  held while a command works on the run
    runs/NAME/stage_N/steps/S.done   written only after step S's outputs are complete
    runs/NAME/stage_N/DONE           written last, when every step is done
"""
from __future__ import annotations

import fcntl
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


class StageSteps:
    """Runs a stage's ordered steps, skipping those whose done marker exists."""

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

    def run(self, steps: list[Step], log: Callable[[str], None]) -> None:
        for name, action in steps:
            if self.is_done(name):
                log(f"step {name}: done (skipped)")
                continue
            log(f"step {name}: running")
            started = time.time()
            action()
            seconds = round(time.time() - started, 2)
            atomic_write_text(self.marker(name), json.dumps(
                {"finished": datetime.now(timezone.utc).isoformat(), "seconds": seconds}) + "\n")
            log(f"step {name}: done in {seconds:.1f}s")
