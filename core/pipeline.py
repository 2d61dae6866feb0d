"""Turn a command's options into a validated stage run. Everything is checked before anything is
written: a bad constitution, an unknown profile, a missing model path or a wrong stage number
leave no trace in the run directory."""
from __future__ import annotations

import sys
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

from core.backend import UnslothBackend, backend_class, import_unsloth
from core.constitution import load_constitution
from core.context import StageContext
from core.models import PROJECT_ROOT, ResolvedModel, local_model_dir, resolve_model, weights_sha256
from core.pairs import NoPairsError
from core.report import write_run_report
from core.io import read_json, write_json
from core.run import (RunDirError, RunLock, StageSteps, check_resume, default_run_dir, git_commit,
                      package_versions, read_config, write_config)
from registry.stages import STAGES, StageEntry, stage_by_number

DEFAULT_SEED = 0
SKIPPED = "SKIPPED"  # stage_N/SKIPPED: the stage kept no preference pairs and trained nothing
DEFAULT_DATA_DIR = PROJECT_ROOT.parent / "shared" / "data"


class StageSelectionError(ValueError):
    """The stage number names no built stage."""


def select_stage(number: int) -> StageEntry:
    entry = stage_by_number(number)
    known = ", ".join(str(s.number) for s in STAGES)
    if entry is None:
        raise StageSelectionError(f"there is no stage {number}; the stages are {known} "
                                  f"(see `python cli.py stage list`)")
    if entry.module is None:
        raise StageSelectionError(f"stage {number} ({entry.name}) is not built yet; "
                                  f"built stages: " + ", ".join(
                                      str(s.number) for s in STAGES if s.module))
    return entry


def default_heldout(limit: int) -> int:
    return max(8, limit // 4)


def plan_stage_run(number: int, run_dir: Path | None, model: str | None, limit: int | None,
                   seed: int | None, heldout: int | None, constitution_path: Path,
                   data_dir: Path | None = None, allow_contamination: bool = False,
                   log=print, baseline_limit: int | None = None
                   ) -> tuple[StageEntry, StageContext, dict]:
    """Validate every option; return (stage, context, config to save). Writes nothing."""
    entry = select_stage(number)
    constitution = load_constitution(constitution_path)
    run_dir = (run_dir or default_run_dir(PROJECT_ROOT)).resolve()
    saved = read_config(run_dir)
    requested = {"model": model, "seed": seed, "limit": limit, "heldout": heldout,
                 "baseline_limit": baseline_limit, "constitution_sha256": constitution.sha256}
    keys = ("model", "seed", "limit", "heldout", "baseline_limit")
    if saved:
        check_resume(saved, requested)
        settings = {k: saved["run"].get(k) if requested[k] is None else requested[k] for k in keys}
    else:
        settings = {k: requested[k] for k in keys}
    resolved = resolve_model(settings["model"])
    settings["model"] = settings["model"] or resolved.reference
    settings["seed"] = DEFAULT_SEED if settings["seed"] is None else settings["seed"]
    settings["limit"] = settings["limit"] or resolved.profile.default_limit
    settings["heldout"] = settings["heldout"] or default_heldout(settings["limit"])
    for key in ("limit", "heldout", "baseline_limit"):
        if settings[key] is not None and settings[key] < 1:
            raise StageSelectionError(f"--{key} must be a positive number, got {settings[key]}")
    model_path, origin = stage_input(number, run_dir, resolved, explicit=model is not None)
    log(f"model: {resolved.profile.name} ({resolved.source}) - {resolved.reason}")
    log(f"stage {number} input: {model_path} ({origin})")
    data_dir = data_dir or (DEFAULT_DATA_DIR if DEFAULT_DATA_DIR.is_dir() else None)
    config = saved or build_config(settings, resolved, model_path, constitution_path, constitution)
    config.setdefault("data_dir", str(data_dir) if data_dir else None)
    allowed = allow_contamination or bool(config.get("allow_contamination"))
    if allow_contamination and not config.get("allow_contamination"):
        config["allow_contamination"] = True
        config.setdefault("overrides", []).append(
            {"override": "allow_contamination", "stage": number,
             "at": datetime.now(timezone.utc).isoformat()})
    ctx = StageContext(run_dir=run_dir, number=number, model_path=model_path, origin=origin,
                       profile=resolved.profile, seed=settings["seed"], limit=settings["limit"],
                       heldout=settings["heldout"], constitution=constitution,
                       baseline_limit=settings["baseline_limit"],
                       data_dir=Path(config["data_dir"]) if config["data_dir"] else None,
                       allow_contamination=allowed, log=log)
    return entry, ctx, config


def stage_input(number: int, run_dir: Path, resolved: ResolvedModel,
                explicit: bool) -> tuple[str, str]:
    """(model path, where it comes from). Stage N learns from stage N-1's merged model; only
    the first stage of a run, or a stage whose predecessor is not done when --model names an
    explicit model, starts from the run's model. A skipped stage (SKIPPED: it kept no pairs)
    passes on the model it was given: stage N then learns from the last stage that trained."""
    if number == min(s.number for s in STAGES):
        return local_model_dir(resolved), "the run's model"
    previous = run_dir / f"stage_{number - 1}"
    if (previous / "DONE").is_file():
        return str(previous / "merged"), f"stage {number - 1}'s merged model"
    if (previous / SKIPPED).is_file():
        path, origin = stage_input(number - 1, run_dir, resolved, explicit=False)
        return path, f"{origin} (stage {number - 1} was skipped: it kept no pairs)"
    if explicit:
        return local_model_dir(resolved), "--model (stage {} is not done in this run)".format(number - 1)
    raise StageSelectionError(
        f"stage {number} learns from stage {number - 1}'s merged model, and stage {number - 1} is "
        f"not done in {run_dir}; run `python cli.py stage run {number - 1} --run-dir {run_dir}` "
        f"first, or pass --model to start stage {number} from an explicit model")


def record_input(ctx: StageContext, origin: str) -> None:
    """stage_N/input.json: which model generated this stage's data (written once)."""
    path = ctx.path("input.json")
    if path.is_file():
        recorded = read_json(path)
        if recorded["path"] != ctx.model_path:
            raise RunDirError(f"stage {ctx.number} of this run was started from "
                              f"{recorded['path']}, not {ctx.model_path}; use a new --run-dir")
        return
    write_json(path, {"path": ctx.model_path, "origin": origin,
                      "weights_sha256": weights_sha256(ctx.model_path)})


def build_config(settings: dict, resolved: ResolvedModel, model_path: str,
                 constitution_path: Path, constitution) -> dict:
    """The resolved config saved as runs/NAME/config.yaml."""
    return {
        "created": datetime.now(timezone.utc).isoformat(),
        "command": " ".join(sys.argv),
        "run": settings,
        "model": {"reference": resolved.reference, "profile": resolved.profile.name,
                  "source": resolved.source, "path": model_path, "reason": resolved.reason},
        "profile": asdict(resolved.profile),
        "constitution": {"path": str(constitution_path), "version": constitution.version,
                         "sha256": constitution.sha256},
        "versions": package_versions(),
        "git_commit": git_commit(PROJECT_ROOT),
    }


def run_stage(number: int, run_dir: Path | None = None, model: str | None = None,
              limit: int | None = None, seed: int | None = None, heldout: int | None = None,
              constitution_path: Path = PROJECT_ROOT / "constitution.yaml",
              data_dir: Path | None = None, allow_contamination: bool = False, log=print,
              baseline_limit: int | None = None, skip_empty: bool = False) -> Path:
    """Run or resume one stage; returns the run directory. With `skip_empty`, a stage whose
    filters keep no preference pair is marked SKIPPED (with the reason) instead of failing, and
    the next stage starts from the model this one was given."""
    entry, ctx, config = plan_stage_run(number, run_dir, model, limit, seed, heldout,
                                        constitution_path, data_dir, allow_contamination, log,
                                        baseline_limit)
    if backend_class(ctx.profile) is UnslothBackend:
        import_unsloth()  # before anything imports trl or loads a tokenizer, as Unsloth requires
    ctx.run_dir.mkdir(parents=True, exist_ok=True)
    with RunLock(ctx.run_dir / ".lock"):
        write_config(ctx.run_dir, config)  # unchanged on resume except a recorded override
        log(f"run directory: {ctx.run_dir}")
        record_input(ctx, ctx.origin)
        try:
            entry.module.run(ctx)
        except NoPairsError as error:
            if not skip_empty:
                raise
            mark_skipped(ctx, str(error))
        write_run_report(ctx.run_dir)
    return ctx.run_dir


def mark_skipped(ctx: StageContext, reason: str) -> None:
    """stage_N/SKIPPED (why, when); the run's config.yaml lists it under `overrides`."""
    write_json(ctx.path(SKIPPED), {"stage": ctx.number, "reason": reason,
                                   "at": datetime.now(timezone.utc).isoformat()})
    config = read_config(ctx.run_dir)
    config.setdefault("overrides", []).append(
        {"override": "skip_empty", "stage": ctx.number, "reason": reason})
    write_config(ctx.run_dir, config)
    ctx.log(f"stage {ctx.number} skipped: {reason}")


def run_status(run_dir: Path) -> list[tuple[int, str, list[tuple[str, str]], str]]:
    """(stage number, name, [(step, state)], "DONE" | "SKIPPED" | "not done") per built stage."""
    rows = []
    for entry in STAGES:
        if entry.module is None:
            continue
        stage_dir = run_dir / f"stage_{entry.number}"
        steps = StageSteps(stage_dir, entry.module.STEPS)
        states = [(name, steps.state(name, lambda n: _has_partial(stage_dir, n)))
                  for name in entry.module.STEPS]
        ended = [mark for mark in ("DONE", SKIPPED) if (stage_dir / mark).is_file()]
        rows.append((entry.number, entry.name, states, ended[0] if ended else "not done"))
    return rows


def _has_partial(stage_dir: Path, step: str) -> bool:
    """A step is partial when it left resumable work behind (a cache or checkpoints)."""
    if step == "train":
        return any((stage_dir / "train" / "checkpoints").glob("checkpoint-*"))
    return any((stage_dir / "cache").glob(f"{step}*.jsonl"))


def run_curriculum(run_dir: Path | None = None, model: str | None = None,
                   limit: int | None = None, seed: int | None = None, until: int | None = None,
                   log=print, **options) -> Path:
    """Run every built stage in order up to `until`, resuming whatever is done."""
    run_dir = (run_dir or default_run_dir(PROJECT_ROOT)).resolve()
    last = until or max(s.number for s in STAGES)
    for entry in STAGES:
        if entry.number > last:
            break
        if entry.module is None:
            log(f"stage {entry.number} ({entry.name}) is not built yet; stopping here")
            break
        stage_dir = run_dir / f"stage_{entry.number}"
        if (stage_dir / "DONE").is_file() or (stage_dir / SKIPPED).is_file():
            log(f"stage {entry.number}: {'done' if (stage_dir / 'DONE').is_file() else 'skipped'}"
                f" already")
            continue
        run_stage(entry.number, run_dir, model if entry.number == 1 else None, limit, seed,
                  log=log, **options)
    return run_dir
