"""Tuning the DPO recipe on a dev split of a stage's own pairs, never on its held-out tasks.

A stage's `pairs.jsonl` is split by a hash of each pair's task id: a `share` of the tasks
form the dev split and are never trained on. Each point of a grid over the profile's training
fields (`--grid profile.learning_rate=5e-5,2e-4`) trains a fresh LoRA from the stage's input
model on the rest, then TRL evaluates it on the dev pairs: how many it ranks right (implicit
reward of chosen above rejected, against the reference), the mean reward margin, and how the
chosen responses' log-probability moved. The held-out tasks the stage reports on are not
involved, so picking the best point here does not bias the stage's reported result.

A point trains on what the stage would: its training pairs plus `replay_share` x as many of the
earlier stages' pairs (decontaminated, in replay order), so `replay_share` is tunable too. With
`retention` (`tune --retention`), each point's adapter is also merged and the earlier stages'
*dev* items (items of theirs never trained on and never reported; stage 2 has them) are assessed
on it and paired with the stage's input model: what the recipe keeps of the earlier stages,
measured without touching any held-out split.
"""
from __future__ import annotations

import itertools
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from core.config import SettingsError, apply_overrides
from core.dpo import train_dpo
from core.errors import TooLittleDataError
from core.guards import TemplateGuard
from core.io import read_json, write_json
from core.lifecycle import dpo_settings_for, paired_outcomes
from core.merge import merge_adapter
from core.models import weights_tag
from core.profile import ModelProfile
from core.split import in_fixed_heldout
from core.stats import rate

TUNABLE = ("learning_rate", "beta", "epochs", "lora_r", "lora_alpha", "lora_dropout",
           "sft_weight", "train_batch_size", "grad_accum", "replay_share")


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


@dataclass(frozen=True)
class DevMetric:
    """An earlier stage's dev items (never trained on, never reported): `assess(backend,
    cache)` gives that stage's assessment of `backend`'s model ({"summary", "items"}), whose
    `headline` rate measures what a point keeps of the stage."""

    name: str  # e.g. "stage 2 answer_rate"
    headline: str
    assess: Callable[[object, Path], dict]


@dataclass(frozen=True)
class TuneJob:
    """What every grid point trains from and is measured on."""

    records: list[dict]  # the stage's own pairs (split into train and dev)
    replay: list[dict]  # earlier stages' pairs, decontaminated, in replay order
    model_path: str  # the stage's input model
    profile: ModelProfile
    seed: int
    guard: TemplateGuard
    work_dir: Path
    load_backend: Callable[[str, ModelProfile], object]
    retention: tuple[DevMetric, ...] = ()  # measured on each point's merged model
    merge_probes: tuple[str, ...] = ()


def tune_dpo(job: TuneJob, grid: list[GridPoint], share: float, log=print) -> dict:
    """Train and evaluate every grid point (a point already evaluated in `job.work_dir` is read
    back, not retrained); write and return {"train_pairs", "dev_pairs", "points": [...]}."""
    train, dev = split_dev(job.records, share)
    log(f"tune: {len(train)} training pairs, {len(dev)} dev pairs, {len(grid)} grid points"
        + (f", {len(job.replay)} replayable pairs" if job.replay else ""))
    reference = dev_reference(job, log) if job.retention else {}
    points = [tune_point(point, train, dev, job, reference, log) for point in grid]
    result = {"dev_share": share, "train_pairs": len(train), "dev_pairs": len(dev),
              "dev_task_ids": sorted({r["task_id"] for r in dev}), "points": points,
              "best": best_point(points)}
    if reference:
        result["retention_reference"] = {m.name: reference[m.name]["summary"][m.headline]
                                         for m in job.retention}
    write_json(job.work_dir / "results.json", result)
    return result


def dev_reference(job: TuneJob, log) -> dict[str, dict]:
    """Each retention metric on the stage's input model: what a point can keep at most."""
    log(f"tune: the earlier stages' dev items on the input model {job.model_path}")
    backend = job.load_backend(job.model_path, job.profile)
    # generation caches are keyed by model path: name this one by the weights too, so a
    # stage redone at the same path is not measured from its old outputs
    folder = job.work_dir / f"reference-{weights_tag(job.model_path)}"
    return {m.name: m.assess(backend, folder / f"dev-{slug(m.name)}.jsonl")
            for m in job.retention}


def tune_point(point: GridPoint, train: list[dict], dev: list[dict], job: TuneJob,
               reference: dict, log) -> dict:
    folder = job.work_dir / point.label
    profile = apply_overrides({"profile": job.profile}, point.items)["profile"]
    if (folder / "point.json").is_file():
        row = read_json(folder / "point.json")
        if job.retention and "retention_dev" not in row:  # trained before --retention was asked
            row["retention_dev"] = point_retention(job, profile, folder, reference, log)
            write_json(folder / "point.json", row)
        log(f"tune {point.label}: done (read back)")
        return row
    replay = job.replay[:round(profile.replay_share * len(train))]
    log(f"tune {point.label}: training on {len(train)} pairs"
        + (f" and {len(replay)} replayed" if replay else ""))
    summary = train_dpo(job.load_backend(job.model_path, profile), train + replay,
                        dpo_settings_for(profile, job.seed), folder / "train",
                        folder / "adapter", job.guard, dev_records=dev)
    d = summary["dev"]
    row = {"label": point.label, "set": list(point.items), "steps": summary["steps"],
           "replay_pairs": len(replay), "train_loss": summary["train_loss"],
           "dev_ranked_right": rate(d["ranked_right"], d["pairs"]),
           "dev_margin": d["margin"], "dev_chosen_logratio": d["chosen_logratio"],
           "dev_rejected_logratio": d["rejected_logratio"], "dev_loss": d["loss"],
           "warnings": summary["health"]["warnings"]}
    if job.retention:
        row["retention_dev"] = point_retention(job, profile, folder, reference, log)
    write_json(folder / "point.json", row)
    return row


def point_retention(job: TuneJob, profile: ModelProfile, folder: Path, reference: dict,
                    log) -> dict:
    """The point's adapter merged (then deleted again), and each earlier stage's dev items
    assessed on it, paired item by item with the input model's outcomes."""
    merged = folder / "merged"
    for stale in folder.glob("dev-*.jsonl"):  # outputs of a merge this run replaces
        stale.unlink()
    log(f"tune: merging {folder.name} to assess the earlier stages' dev items")
    merge_adapter(job.model_path, folder / "adapter", merged, profile.dtype,
                  list(job.merge_probes), profile.parity_tolerance)
    backend = job.load_backend(str(merged), profile)
    rows = {}
    for metric in job.retention:
        result = metric.assess(backend, folder / f"dev-{slug(metric.name)}.jsonl")
        before = reference[metric.name]
        now, then = result["summary"][metric.headline], before["summary"][metric.headline]
        rows[metric.name] = {"rate": now, "input_model": then,
                             "change_points": round(100 * (now["rate"] - then["rate"]), 1),
                             "vs_input_model": paired_outcomes(before["items"], result["items"])}
    del backend
    shutil.rmtree(merged)
    return rows


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def best_point(points: list[dict]) -> str:
    """The label ranking most dev pairs right (ties: the larger dev margin). With retention,
    the largest sum of that share and the mean rate of the earlier stages' dev items: learning
    the stage and keeping the earlier ones weigh the same."""
    def score(p: dict) -> tuple:
        kept = [r["rate"]["rate"] for r in p.get("retention_dev", {}).values()]
        ranked = p["dev_ranked_right"]["rate"] or 0.0
        return (ranked + sum(kept) / len(kept) if kept else p["dev_ranked_right"]["k"],
                p["dev_margin"])
    return max(points, key=score)["label"]
