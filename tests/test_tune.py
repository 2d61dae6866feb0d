"""The DPO grid and its dev split (core/tune.py): parsing, the split rule, and a real tuning
run on the tiny model's stage-1 pairs."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from core.config import SettingsError
from core.errors import TooLittleDataError
from core.tune import GridPoint, parse_grid, split_dev

ROOT = Path(__file__).resolve().parent.parent


def test_grid_is_every_combination_of_the_given_values():
    grid = parse_grid(["profile.learning_rate=1e-4,5e-4", "profile.epochs=1,2"])
    assert [p.label for p in grid] == ["learning_rate=1e-4,epochs=1", "learning_rate=1e-4,epochs=2",
                                       "learning_rate=5e-4,epochs=1", "learning_rate=5e-4,epochs=2"]
    assert parse_grid([]) == [GridPoint(())]


def test_grid_problems_are_reported_together():
    with pytest.raises(SettingsError) as error:
        parse_grid(["profile.name=x", "stage1.hindsight=true,false", "profile.beta=",
                    "profile.learning_rate=1e-4"])
    message = str(error.value)
    assert "'profile.name=x'" in message and "'stage1.hindsight=true,false'" in message
    assert "'profile.beta=': no values" in message and "learning_rate=1e-4'" not in message


def test_dev_split_is_by_task_and_stable():
    records = [{"task_id": f"t{i}", "prompt": "p", "chosen": "c", "rejected": "r"}
               for i in range(40)]
    train, dev = split_dev(records, 0.25)
    assert len(train) + len(dev) == 40 and 4 <= len(dev) <= 16
    assert not {r["task_id"] for r in train} & {r["task_id"] for r in dev}
    assert split_dev(list(reversed(records)), 0.25)[1] == list(reversed(dev))
    with pytest.raises(TooLittleDataError, match="leaves"):
        split_dev(records[:1], 0.25)


@pytest.mark.slow
def test_tune_command_trains_each_point_on_train_and_scores_dev(tmp_path, stage1_reference):
    run_dir = tmp_path / "run"
    shutil.copytree(stage1_reference, run_dir, ignore=shutil.ignore_patterns("merged", "adapter"))
    tune = [sys.executable, str(ROOT / "cli.py"), "tune", "--run-dir", str(run_dir), "--stage",
            "1", "--grid", "profile.learning_rate=1e-5,2e-3", "--dev-share", "0.5"]
    out = subprocess.run(tune, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    stage = run_dir / "stage_1"
    result = json.loads((stage / "tune" / "results.json").read_text())
    pairs = [json.loads(line) for line in (stage / "pairs.jsonl").read_text().splitlines()]
    assert result["train_pairs"] + result["dev_pairs"] == len(pairs)
    dev_ids = set(result["dev_task_ids"])
    assert dev_ids and dev_ids < {p["task_id"] for p in pairs}
    labels = [p["label"] for p in result["points"]]
    assert labels == ["learning_rate=1e-5", "learning_rate=2e-3"]
    for point in result["points"]:
        assert point["steps"] > 0 and point["dev_ranked_right"]["n"] == result["dev_pairs"]
        trained = (stage / "tune" / point["label"] / "train" / "dpo_log.jsonl").read_text()
        assert len(trained.splitlines()) == point["steps"]
    low, high = result["points"]
    assert abs(high["dev_chosen_logratio"]) > abs(low["dev_chosen_logratio"])  # lr matters
    assert "| learning_rate=2e-3 |" in out.stdout and "best on dev:" in out.stdout
    again = subprocess.run(tune, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stdout.count("| learning_rate=") == 2
    assert "done (read back)" in again.stderr + again.stdout
