"""Opt-in tracking: --report-to wandb / trackio pass through to the trainer (one run per stage,
offline or local here), and a tracker that cannot log is refused before anything loads."""
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from core.dpo import check_trackers
from core.errors import UsageError

ROOT = Path(__file__).resolve().parent.parent


TRAIN = """
import json, sys
sys.path.insert(0, {root!r})
from pathlib import Path
from core.backend import load_backend
from core.dpo import train_dpo
from core.guards import TemplateGuard
from registry.models import profile_by_name
from tests.test_dpo_health import settings
from tests.test_dpo_merge import RECORDS
backend = load_backend({model!r}, profile_by_name("tiny-qwen2"))
work = Path({work!r})
metrics = train_dpo(backend, RECORDS, settings(), work / "train", work / "adapter",
                    TemplateGuard(backend.tokenizer), report_to=({tracker!r},),
                    run_name="myrun-stage1")
print(json.dumps(metrics["steps"]))
"""


def train_reporting(tiny_dir, tmp_path, tracker: str, env: dict) -> int:
    """DPO steps of a training that reports to `tracker`, in its own process (the trackers
    read their environment once, at import)."""
    script = TRAIN.format(root=str(ROOT), model=str(tiny_dir), work=str(tmp_path),
                          tracker=tracker)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=600, env={**os.environ, **env})
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_wandb_offline_logs_the_stage_run_locally(tiny_dir, tmp_path):
    steps = train_reporting(tiny_dir, tmp_path, "wandb",
                            {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path),
                             "WANDB_API_KEY": ""})
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    log = next(runs[0].glob("run-*.wandb")).read_bytes()  # what `wandb sync` uploads
    for logged in (b"myrun-stage1", b"bootstrap-curriculum", b"train/loss", b"learning_rate"):
        assert logged in log
    assert (tmp_path / "train" / "tensorboard").is_dir()  # TensorBoard is still written
    assert steps >= 1


def test_trackio_logs_each_step_to_its_local_store(tiny_dir, tmp_path):
    steps = train_reporting(tiny_dir, tmp_path, "trackio", {"TRACKIO_DIR": str(tmp_path / "t")})
    databases = list((tmp_path / "t").rglob("bootstrap-curriculum*.db"))
    assert len(databases) == 1
    with sqlite3.connect(databases[0]) as db:
        rows = db.execute("SELECT run_name, metrics FROM metrics").fetchall()
    assert {name for name, _ in rows} == {"myrun-stage1"}
    logged = [json.loads(m) for _, m in rows]
    assert sum("train/loss" in m for m in logged) == steps


def test_trackers_that_cannot_log_are_refused_at_once(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(UsageError) as error:
        check_trackers(("wandb", "mlflow"))
    assert "no W&B credentials" in str(error.value) and "--report-to mlflow" in str(error.value)
    monkeypatch.setenv("WANDB_MODE", "offline")
    check_trackers(("wandb", "trackio"))
