"""Tuning the DPO recipe on a dev split of a stage's own pairs, never on its held-out tasks.

A stage's `pairs.jsonl` is split by a hash of each pair's task id: a `share` of the tasks
form the dev split and are never trained on. Each point of a grid over the profile's training
fields (`--grid profile.learning_rate=5e-5,2e-4`) trains a fresh LoRA from the stage's input
model on the rest, then TRL evaluates it on the dev pairs: how many it ranks right (implicit
reward of chosen above rejected, against the reference), the mean reward margin, and how the
chosen responses' log-probability moved. The held-out tasks the stage reports on are not
involved, so picking the best point here does not bias the stage's reported result.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from core.config import SettingsError, apply_overrides
from core.dpo import train_dpo
from core.errors import TooLittleDataError
from core.guards import TemplateGuard
from core.io import read_json, write_json
from core.lifecycle import dpo_settings_for
from core.profile import ModelProfile
from core.split import in_fixed_heldout
from core.stats import rate

TUNABLE = ("learning_rate", "beta", "epochs", "lora_r", "lora_alpha", "lora_dropout",
           "sft_weight", "train_batch_size", "grad_accum")


@dataclass(frozen=True)
class GridPoint:
    """One combination of grid values, as `--set` items."""

    items: tuple[str, ...]

    @property
    def label(self) -> str:
        return ",".join(item.removeprefix("profile.") for item in self.items) or "profile"


def parse_grid(specs: tuple[str, ...] | list[str]) -> list[GridPoint]:
    """`profile.FIELD=V1,V2,...` per spec -> every combination. Only the training fields in
    TUNABLE may be tuned; every problem is reported at once (SettingsError, exit 2)."""
    axes, problems = [], []
    for spec in specs:
        key, sep, values = spec.partition("=")
        section, _, name = key.strip().partition(".")
        if not sep or section != "profile" or name not in TUNABLE:
            problems.append(f"--grid {spec!r}: expected profile.FIELD=V1,V2,... with FIELD one "
                            f"of {', '.join(TUNABLE)}")
            continue
        choices = [v.strip() for v in values.split(",") if v.strip()]
        if not choices:
            problems.append(f"--grid {spec!r}: no values after '='")
            continue
        axes.append([f"profile.{name}={value}" for value in choices])
    if problems:
        raise SettingsError("\n".join(problems))
    return [GridPoint(tuple(combo)) for combo in itertools.product(*axes)] or [GridPoint(())]


def split_dev(records: list[dict], share: float) -> tuple[list[dict], list[dict]]:
    """(train, dev): a pair is dev when the hash of its task id falls below `share`, so the
    split is stable and all pairs of one task fall on the same side."""
    is_dev = [in_fixed_heldout(f"dev:{r['task_id']}", share) for r in records]
    dev = [r for r, held in zip(records, is_dev) if held]
    train = [r for r, held in zip(records, is_dev) if not held]
    if not dev or not train:
        raise TooLittleDataError(
            f"a dev share of {share} of {len(records)} pairs leaves {len(train)} to train on and "
            f"{len(dev)} to judge by; tune on a stage with more pairs (a larger --limit) or "
            f"change --dev-share")
    return train, dev


def tune_dpo(records: list[dict], profile: ModelProfile, grid: list[GridPoint], share: float,
             seed: int, work_dir: Path, load_backend: Callable[[ModelProfile], object],
             guard: TemplateGuard, log=print) -> dict:
    """Train and evaluate every grid point (a point already evaluated in `work_dir` is read
    back, not retrained); write and return {"train_pairs", "dev_pairs", "points": [...]}."""
    train, dev = split_dev(records, share)
    log(f"tune: {len(train)} training pairs, {len(dev)} dev pairs, {len(grid)} grid points")
    points = [tune_point(point, train, dev, profile, seed, work_dir, load_backend, guard, log)
              for point in grid]
    result = {"dev_share": share, "train_pairs": len(train), "dev_pairs": len(dev),
              "dev_task_ids": sorted({r["task_id"] for r in dev}), "points": points,
              "best": best_point(points)}
    write_json(work_dir / "results.json", result)
    return result


def tune_point(point: GridPoint, train: list[dict], dev: list[dict], base: ModelProfile,
               seed: int, work_dir: Path, load_backend, guard, log) -> dict:
    folder = work_dir / point.label
    if (folder / "point.json").is_file():
        log(f"tune {point.label}: done (read back)")
        return read_json(folder / "point.json")
    profile = apply_overrides({"profile": base}, point.items)["profile"]
    log(f"tune {point.label}: training on {len(train)} pairs")
    summary = train_dpo(load_backend(profile), train, dpo_settings_for(profile, seed),
                        folder / "train", folder / "adapter", guard, dev_records=dev)
    d = summary["dev"]
    row = {"label": point.label, "set": list(point.items), "steps": summary["steps"],
           "train_loss": summary["train_loss"],
           "dev_ranked_right": rate(d["ranked_right"], d["pairs"]),
           "dev_margin": d["margin"], "dev_chosen_logratio": d["chosen_logratio"],
           "dev_rejected_logratio": d["rejected_logratio"], "dev_loss": d["loss"],
           "warnings": summary["health"]["warnings"]}
    write_json(folder / "point.json", row)
    return row


def best_point(points: list[dict]) -> str:
    """The label ranking most dev pairs right; ties go to the larger dev margin."""
    return max(points, key=lambda p: (p["dev_ranked_right"]["k"], p["dev_margin"]))["label"]
