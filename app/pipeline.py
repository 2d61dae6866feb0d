"""Turn a command's options into a validated stage run, and run stages in order. Everything is
checked before anything is written: a bad constitution, an unknown profile, a bad `--set`, a
missing model path or a wrong stage number leave no trace in the run directory.

This is the layer above the library: it wires the registry (stages, profiles) to core/."""
from __future__ import annotations

import json
import os
import sys
from dataclasses import fields, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import NamedTuple

from core.backend import UnslothBackend, backend_class, import_unsloth, load_backend
from core.config import RunSettings, apply_overrides, as_section, changed_settings
from core.constitution import load_constitution
from core.contamination import eval_set_summary
from core.dpo import check_accelerate_config, check_trackers, last_checkpoint
from core.context import BackendLoader, StageContext
from core.errors import TooLittleDataError, UsageError
from core.io import read_json, write_json
from core.models import PROJECT_ROOT, local_model_dir, weights_sha256, weights_stamp
from core.report import write_run_report
from core.run import (RunDirError, RunLock, StageSteps, check_resume, default_run_dir, git_commit,
                      package_versions, read_config, require_config, write_config)
from core.stage import Stage, planned_work, run_stage_steps
from core.vllm_engine import check_engine, check_model
from registry.models import ResolvedModel, resolve_model
from registry.stages import STAGES

DEFAULT_SEED = 0
MAX_COUNT = 100_000  # --limit, --heldout, --baseline-limit: far above what any pool can feed
SKIPPED = "SKIPPED"  # stage_N/SKIPPED: the stage kept no preference pairs and trained nothing
DEFAULT_DATA_DIR = PROJECT_ROOT.parent / "shared" / "data"
ACCEPT_CHANGED = "--accept-changed-settings"


class StageSelectionError(UsageError):
    """The stage number names no stage of the curriculum."""


def select_stage(number: int, curriculum: tuple[Stage, ...] = STAGES) -> Stage:
    for stage in curriculum:
        if stage.number == number:
            return stage
    known = ", ".join(str(s.number) for s in curriculum)
    raise StageSelectionError(f"there is no stage {number}; the stages are {known} "
                              f"(see `python cli.py stage list`)")


def settings_sections(profile, curriculum: tuple[Stage, ...] = STAGES) -> dict:
    """Every settings section of a run at its defaults: run, profile, and one per stage."""
    return {"run": RunSettings(), "profile": profile,
            **{stage.key: stage.settings() for stage in curriculum}}


def resolve_settings(saved: dict | None, profile, overrides: tuple[str, ...],
                     accept_changed: bool, curriculum: tuple[Stage, ...] = STAGES,
                     compared: frozenset[str] | None = None
                     ) -> tuple[dict, list[str], list[str]]:
    """(sections, all --set overrides of the run, changed settings accepted on resume).

    The run's settings are the defaults with the run's recorded `--set` overrides and this
    command's applied. On resume, any setting of the `compared` sections (default: all) that
    differs from the saved config (a new --set, an edited default) is refused, naming it,
    unless `accept_changed`."""
    recorded = list((saved or {}).get("set", []))
    all_sets = recorded + [o for o in overrides if o not in recorded]
    sections = apply_overrides(settings_sections(profile, curriculum), all_sets,
                               locked=frozenset({"profile.name", "profile.source"}))
    current = {name: as_section(value) for name, value in sections.items()
               if compared is None or name in compared}
    defaults = {name: as_section(value)
                for name, value in settings_sections(profile, curriculum).items()}
    changes = changed_settings(saved.get("settings", {}), current, defaults) if saved else []
    if changes and not accept_changed:
        raise RunDirError(
            "this run directory was made with other settings; resuming would mix two settings "
            "in one run:\n  - " + "\n  - ".join(changes)
            + f"\nResume with the run's settings, use a new --run-dir, or pass {ACCEPT_CHANGED} "
              f"to go on with the new ones (recorded in config.yaml).")
    return sections, all_sets, changes


def saved_sections(config: dict, curriculum: tuple[Stage, ...] = STAGES) -> dict:
    """The settings sections a run was made with: its saved `settings:` values where recorded
    (fields the code no longer has are ignored), else the defaults with its `--set` items."""
    profile = resolve_model(config["model"]["reference"]).profile
    sections, _, _ = resolve_settings(None, profile, tuple(config.get("set", [])), True,
                                      curriculum)
    saved = config.get("settings", {})
    return {name: replace(value, **{f.name: _typed(saved[name][f.name]) for f in fields(value)
                                    if f.name in saved.get(name, {})})
            for name, value in sections.items()}


def _typed(value):
    return tuple(value) if isinstance(value, list) else value


def check_run_dir(run_dir: Path) -> None:
    """A run directory must be a directory (or not exist yet) that this user can write to."""
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"--run-dir {run_dir} is a file, not a directory; pick another path")
    existing = next((p for p in (run_dir, *run_dir.parents) if p.exists()), None)
    if existing is not None and not os.access(existing, os.W_OK):
        raise RunDirError(f"--run-dir {run_dir}: {existing} is not writable (read-only mount or "
                          f"permissions); pick a writable path")


def check_model_dir(model_path: str) -> None:
    """A local model directory is opened before anything is written: its config.json must be
    JSON (a Hub id is left to transformers)."""
    config = Path(model_path) / "config.json"
    if not Path(model_path).is_dir():
        return
    if not config.is_file():
        raise UsageError(f"model directory {model_path} has no config.json; pass a directory "
                         f"saved with save_pretrained, a profile name or a Hub id")
    try:
        json.loads(config.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UsageError(f"{config} is not valid JSON ({error}); restore the model "
                         f"directory") from None


def chosen_data_dir(data_dir: Path | None, no_eval_sets: bool) -> str | None:
    """The evaluation data directory a new run records: --data-dir, else the default when it
    exists; None only when the user said --no-eval-sets. Fixed for the run once saved."""
    if no_eval_sets:
        if data_dir is not None:
            raise UsageError("--data-dir and --no-eval-sets contradict each other; give one")
        return None
    if data_dir is not None:
        if not data_dir.is_dir():
            raise UsageError(f"--data-dir {data_dir} is not a directory; pass the folder that "
                             f"holds ifeval/, ailuminate/ and hh-rlhf-harmless/")
        return str(data_dir.resolve())
    if DEFAULT_DATA_DIR.is_dir():
        return str(DEFAULT_DATA_DIR)
    raise UsageError(
        f"no evaluation data sets at {DEFAULT_DATA_DIR}: without them the run cannot "
        f"decontaminate its training data against IFEval, AILuminate and HH-RLHF. Pass "
        f"--data-dir DIR, or --no-eval-sets to run without them (recorded in the run's config "
        f"and shown by `check contamination`)")


def check_data_dir(data_dir: str | None, log) -> None:
    """Read every evaluation set in full before anything is generated (DataSetError names each
    problem); say which sets the run decontaminates against."""
    if data_dir is None:
        log("evaluation sets: none (--no-eval-sets): decontamination covers only the held-out "
            "split and the baseline probes")
        return
    log(f"evaluation sets: {eval_set_summary(Path(data_dir))} ({data_dir})")


def default_heldout(limit: int) -> int:
    return max(8, limit // 4)


def plan_stage_run(number: int, run_dir: Path | None, model: str | None, limit: int | None,
                   seed: int | None, heldout: int | None, constitution_path: Path,
                   data_dir: Path | None = None, allow_contamination: bool = False,
                   log=print, baseline_limit: int | None = None, overrides: tuple[str, ...] = (),
                   accept_changed: bool = False, curriculum: tuple[Stage, ...] = STAGES,
                   backend_loader: BackendLoader = load_backend, no_eval_sets: bool = False,
                   dry_run: bool = False, chained: bool = False,
                   report_to: tuple[str, ...] = ()) -> tuple[Stage, StageContext, dict]:
    """Validate every option; return (stage, context, config to save). Writes nothing. With
    `dry_run`, a built-in model is not built and a stage whose predecessor has not run yet is
    planned on the model that predecessor will make. `chained`: `model` is the run's model
    (as `run` gives it to stage 1), not this stage's input."""
    stage = select_stage(number, curriculum)
    check_trackers(report_to)
    constitution = load_constitution(constitution_path)
    run_dir = (run_dir or default_run_dir(PROJECT_ROOT)).resolve()
    check_run_dir(run_dir)
    saved = read_config(run_dir)
    requested = {"model": model, "seed": seed, "limit": limit, "heldout": heldout,
                 "baseline_limit": baseline_limit, "constitution_sha256": constitution.sha256}
    keys = ("model", "seed", "limit", "heldout", "baseline_limit")
    if saved:
        check_resume(saved, requested)
        settings = {k: saved["run"].get(k) if requested[k] is None else requested[k] for k in keys}
    else:
        settings = {k: requested[k] for k in keys}
    resolved = resolve_model(settings["model"], planning=dry_run)
    settings["model"] = settings["model"] or resolved.reference
    settings["seed"] = DEFAULT_SEED if settings["seed"] is None else settings["seed"]
    if settings["limit"] is None:
        settings["limit"] = resolved.profile.default_limit
    if settings["heldout"] is None:
        settings["heldout"] = default_heldout(settings["limit"])
    for key in ("limit", "heldout", "baseline_limit"):
        if settings[key] is not None and not 1 <= settings[key] <= MAX_COUNT:
            option = "--" + key.replace("_", "-")
            raise StageSelectionError(f"{option} must be a number from 1 to {MAX_COUNT:,}, got "
                                      f"{settings[key]}")
    # another stage's settings do not change this one's work (that stage checks its own)
    compared = frozenset({"run", "profile", stage.key})
    sections, all_sets, changes = resolve_settings(saved, resolved.profile, overrides,
                                                   accept_changed, curriculum, compared)
    check_engine(sections["profile"])  # e.g. --engine vllm without .venv-vllm: refused here
    check_accelerate_config(sections["profile"])
    model_path, origin = stage_input(number, run_dir, resolved,
                                     explicit=model is not None and not chained,
                                     curriculum=curriculum, dry_run=dry_run)
    check_model_dir(model_path)
    check_model(sections["profile"], model_path)
    log(f"model: {resolved.profile.name} ({resolved.source}) - {resolved.reason}")
    log(f"stage {number} input: {model_path} ({origin})")
    config = saved or build_config(settings, resolved, model_path, constitution_path, constitution)
    if "data_dir" not in config or (data_dir is not None and saved is not None):
        chosen = chosen_data_dir(data_dir, no_eval_sets)
        if saved is not None and chosen != config.get("data_dir"):  # the sets moved
            config.setdefault("overrides", []).append(
                {"override": "data_dir", "stage": number, "was": config.get("data_dir"),
                 "now": chosen, "at": datetime.now(timezone.utc).isoformat()})
        config["data_dir"] = chosen
        if no_eval_sets:
            config.setdefault("overrides", []).append(
                {"override": "no_eval_sets", "stage": number,
                 "at": datetime.now(timezone.utc).isoformat()})
    check_data_dir(config["data_dir"], log)
    started = {s.key for s in curriculum if s.number != number
               and (run_dir / f"stage_{s.number}").is_dir()}
    record_settings(config, sections, all_sets, changes, number, frozenset(started))
    allowed = allow_contamination or bool(config.get("allow_contamination"))
    if allow_contamination and not config.get("allow_contamination"):
        config["allow_contamination"] = True
        config.setdefault("overrides", []).append(
            {"override": "allow_contamination", "stage": number,
             "at": datetime.now(timezone.utc).isoformat()})
    ctx = StageContext(run_dir=run_dir, number=number, model_path=model_path, origin=origin,
                       profile=sections["profile"], seed=settings["seed"],
                       limit=settings["limit"], heldout=settings["heldout"],
                       constitution=constitution, settings=sections[stage.key],
                       near_duplicate=sections["run"].near_duplicate,
                       baseline_limit=settings["baseline_limit"],
                       data_dir=Path(config["data_dir"]) if config["data_dir"] else None,
                       allow_contamination=allowed, report_to=report_to, log=log,
                       backend_loader=backend_loader)
    config["report_to"] = list(report_to)  # where this command's training logs (not pinned)
    return stage, ctx, config


def record_settings(config: dict, sections: dict, all_sets: list[str], changes: list[str],
                    number: int, started: frozenset[str]) -> None:
    """Every setting of the run, whole, in config.yaml (and an accepted change as an override).
    The sections of other stages that have `started` keep what they were made with."""
    recorded = config.get("settings", {})
    config["settings"] = {name: recorded[name] if name in started and name in recorded
                          else as_section(value) for name, value in sections.items()}
    config["profile"] = config["settings"]["profile"]
    if all_sets:
        config["set"] = all_sets
    if changes:
        config.setdefault("overrides", []).append(
            {"override": "accept_changed_settings", "stage": number, "changes": changes,
             "at": datetime.now(timezone.utc).isoformat()})


def stage_input(number: int, run_dir: Path, resolved: ResolvedModel, explicit: bool,
                curriculum: tuple[Stage, ...] = STAGES, dry_run: bool = False) -> tuple[str, str]:
    """(model path, where it comes from). Stage N learns from stage N-1's merged model; only
    the first stage of a run, or a stage whose predecessor is not done when --model names an
    explicit model, starts from the run's model. A skipped stage (SKIPPED: it kept no pairs)
    passes on the model it was given: stage N then learns from the last stage that trained."""
    if number == min(s.number for s in curriculum):
        return local_model_dir(resolved.source, build=not dry_run), "the run's model"
    previous = run_dir / f"stage_{number - 1}"
    if (previous / "DONE").is_file():
        check_intact(number - 1, run_dir, curriculum)
        return str(previous / "merged"), f"stage {number - 1}'s merged model"
    if (previous / SKIPPED).is_file():
        path, origin = stage_input(number - 1, run_dir, resolved, False, curriculum, dry_run)
        return path, f"{origin} (stage {number - 1} was skipped: it kept no pairs)"
    if explicit:
        return (local_model_dir(resolved.source, build=not dry_run),
                f"--model (stage {number - 1} is not done in this run)")
    if dry_run:
        return str(previous / "merged"), f"stage {number - 1}'s merged model, once it has run"
    raise StageSelectionError(
        f"stage {number} learns from stage {number - 1}'s merged model, and stage {number - 1} is "
        f"not done in {run_dir}; run `python cli.py stage run {number - 1} --run-dir {run_dir}` "
        f"first, or pass --model to start stage {number} from an explicit model")


def check_intact(number: int, run_dir: Path, curriculum: tuple[Stage, ...] = STAGES) -> None:
    """Refuse to build on a done stage whose outputs no longer match its done markers."""
    stage = select_stage(number, curriculum)
    broken = StageSteps(run_dir / f"stage_{number}", stage.step_names).broken_step()
    if broken:
        step, problem = broken
        raise StageSelectionError(
            f"stage {number} is marked done, but its {step} step's output {problem}; run "
            f"`python cli.py stage run {number} --run-dir {run_dir}` to redo that step and the "
            f"ones after it")


def record_input(ctx: StageContext, origin: str) -> None:
    """stage_N/input.json: which model generated this stage's data, with its weights hash and
    the weight files' sizes and times, and the project commit of every process that worked on
    the stage (`git_commits`: a stage resumed under newer code says so). On resume the model
    must still be that one: its files are rehashed only when a size or time changed (a 32B
    model's 65 GB take minutes). A run directory moved or copied elsewhere resumes: a model at
    another path is accepted when its weights hash is the recorded one."""
    path = ctx.path("input.json")
    commit = git_commit(PROJECT_ROOT)
    if not path.is_file():
        write_json(path, {"path": ctx.model_path, "origin": origin,
                          "weights_sha256": weights_sha256(ctx.model_path),
                          "weights_files": weights_stamp(ctx.model_path),
                          "git_commits": [commit]})
        return
    recorded = read_json(path)
    updated = dict(recorded)
    stamp = weights_stamp(ctx.model_path)
    if recorded["path"] != ctx.model_path:
        if recorded["weights_sha256"] is None or \
                weights_sha256(ctx.model_path) != recorded["weights_sha256"]:
            raise RunDirError(f"stage {ctx.number} of this run was started from "
                              f"{recorded['path']}, not {ctx.model_path}; use a new --run-dir")
        # a run directory copied or moved: its models moved with it, the weights are the same
        ctx.log(f"stage {ctx.number} input: {recorded['path']} is now {ctx.model_path}, with "
                f"the same weights (the run directory moved); recorded")
        updated.update(path=ctx.model_path, weights_files=stamp)
    if recorded["weights_sha256"] is not None and updated.get("weights_files") != stamp:
        ctx.log(f"stage {ctx.number} input: the weight files of {ctx.model_path} changed size "
                f"or time since the stage started; checking their hash")
        found = weights_sha256(ctx.model_path)
        if found != recorded["weights_sha256"]:
            raise RunDirError(
                f"stage {ctx.number}'s input model {ctx.model_path} is not the model this stage "
                f"started from (weights sha256 {str(found)[:16]}..., recorded "
                f"{recorded['weights_sha256'][:16]}...): the data already generated came from "
                f"the recorded one. Restore that model, or start over with a new --run-dir")
        updated["weights_files"] = stamp
    # recorded only for a process that goes on to work on the stage (after the checks)
    if commit not in (commits := recorded.get("git_commits", [])):
        updated["git_commits"] = [*commits, commit]
    if updated != recorded:
        write_json(path, updated)


def build_config(settings: dict, resolved: ResolvedModel, model_path: str,
                 constitution_path: Path, constitution) -> dict:
    """The resolved config saved as runs/NAME/config.yaml (record_settings adds the settings)."""
    return {
        "created": datetime.now(timezone.utc).isoformat(),
        "command": " ".join(sys.argv),
        "run": settings,
        "model": {"reference": resolved.reference, "profile": resolved.profile.name,
                  "source": resolved.source, "path": model_path, "reason": resolved.reason},
        "constitution": {"path": str(constitution_path), "version": constitution.version,
                         "sha256": constitution.sha256},
        "versions": package_versions(),
        "git_commit": git_commit(PROJECT_ROOT),
    }


def run_stage(number: int, run_dir: Path | None = None, model: str | None = None,
              limit: int | None = None, seed: int | None = None, heldout: int | None = None,
              constitution_path: Path = PROJECT_ROOT / "constitution.yaml",
              data_dir: Path | None = None, allow_contamination: bool = False, log=print,
              baseline_limit: int | None = None, skip_empty: bool = False,
              overrides: tuple[str, ...] = (), accept_changed: bool = False,
              curriculum: tuple[Stage, ...] = STAGES,
              backend_loader: BackendLoader = load_backend, redo_from: str | None = None,
              no_eval_sets: bool = False, report_to: tuple[str, ...] = ()) -> Path:
    """Run or resume one stage; returns the run directory. With `skip_empty`, a stage whose
    filters keep too little data is marked SKIPPED (with the reason) instead of failing, and
    the next stage starts from the model this one was given. `redo_from` names a step to run
    again with every later one (e.g. "train" after a new `--set profile.learning_rate`).
    `backend_loader` turns a model path into a backend (tests: core/scripted.py)."""
    stage, ctx, config = plan_stage_run(number, run_dir, model, limit, seed, heldout,
                                        constitution_path, data_dir, allow_contamination, log,
                                        baseline_limit, overrides, accept_changed, curriculum,
                                        backend_loader, no_eval_sets, report_to=report_to)
    if redo_from is not None:
        if redo_from not in stage.step_names:
            raise StageSelectionError(f"--redo-from {redo_from!r}: stage {number} has the "
                                      f"steps {', '.join(stage.step_names)}")
        config.setdefault("overrides", []).append(
            {"override": "redo_from", "stage": number, "step": redo_from,
             "at": datetime.now(timezone.utc).isoformat()})
    if backend_class(ctx.profile) is UnslothBackend:
        import_unsloth()  # before anything imports trl or loads a tokenizer, as Unsloth requires
    ctx.run_dir.mkdir(parents=True, exist_ok=True)
    with RunLock(ctx.run_dir / ".lock"):
        write_config(ctx.run_dir, config)  # unchanged on resume except recorded overrides
        log(f"run directory: {ctx.run_dir}")
        record_input(ctx, ctx.origin)
        if redo_from is not None:
            StageSteps(ctx.stage_dir, stage.step_names).redo_from(redo_from)
            log(f"step {redo_from} and the steps after it will run again (--redo-from)")
        try:
            run_stage_steps(stage, ctx)
        except TooLittleDataError as error:
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


class StageStatus(NamedTuple):
    """One stage as `status` shows it."""

    number: int
    name: str
    steps: list[tuple[str, str, str]]  # (step, "done" | "partial" | "pending", detail)
    state: str  # "DONE" | "SKIPPED" | "not done"
    last_error: dict | None  # what stopped the last attempt inside a step, if it failed


def run_status(run_dir: Path, curriculum: tuple[Stage, ...] = STAGES) -> list[StageStatus]:
    """Every stage's steps with their state and what is on disk of a partly done one (items
    generated, the training checkpoint), and the error that stopped the last attempt."""
    require_config(run_dir)
    rows = []
    for stage in curriculum:
        stage_dir = run_dir / f"stage_{stage.number}"
        steps = StageSteps(stage_dir, stage.step_names)
        states = []
        for name in stage.step_names:
            state = step_state(steps, name)
            states.append((name, state, step_detail(steps, name, state)))
        ended = [mark for mark in ("DONE", SKIPPED) if (stage_dir / mark).is_file()]
        rows.append(StageStatus(stage.number, stage.name, states,
                                ended[0] if ended else "not done", steps.last_error()))
    return rows


def step_detail(steps: StageSteps, name: str, state: str) -> str:
    """How long a done step took; how far a partial one got (resume continues from there)."""
    if state == "done":
        seconds = read_json(steps.marker(name)).get("seconds")
        return f"in {seconds:.0f} s" if seconds is not None else ""
    if state != "partial":
        return ""
    if name == "train":
        newest = last_checkpoint(steps.stage_dir / "train" / "checkpoints")
        if newest is None:
            return ""
        trainer = read_json(Path(newest) / "trainer_state.json")
        return f"checkpoint at step {trainer['global_step']} of {trainer['max_steps']}"
    caches = sorted((steps.stage_dir / "cache").glob(f"{name}*.jsonl"))
    items = sum(count_lines(path) for path in caches)
    return f"{items} generated items cached ({', '.join(p.name for p in caches)})"


def count_lines(path: Path) -> int:
    with open(path, "rb") as handle:
        return sum(1 for line in handle if line.strip())


def step_state(steps: StageSteps, name: str) -> str:
    """"done", "partial" (resumable work on disk) or "pending"."""
    return steps.state(name, lambda n: _has_partial(steps.stage_dir, n))


def _has_partial(stage_dir: Path, step: str) -> bool:
    """A step is partial when it left resumable work behind (a cache or checkpoints)."""
    if step == "train":
        return any((stage_dir / "train" / "checkpoints").glob("checkpoint-*"))
    return any((stage_dir / "cache").glob(f"{step}*.jsonl"))


def stages_until(until: int | None, curriculum: tuple[Stage, ...] = STAGES) -> list[Stage]:
    """The stages `run --until` covers, in order (all of them without `until`)."""
    last = max(s.number for s in curriculum)
    if until is not None and not 1 <= until <= last:
        raise StageSelectionError(f"--until must name a stage from 1 to {last}, got {until}")
    return [s for s in curriculum if s.number <= (until or last)]


def run_curriculum(run_dir: Path | None = None, model: str | None = None,
                   limit: int | None = None, seed: int | None = None, until: int | None = None,
                   log=print, curriculum: tuple[Stage, ...] = STAGES,
                   heldout: int | None = None, **options) -> Path:
    """Run every stage in order up to `until`, resuming whatever is done."""
    run_dir = (run_dir or default_run_dir(PROJECT_ROOT)).resolve()
    for stage in stages_until(until, curriculum):
        stage_dir = run_dir / f"stage_{stage.number}"
        if (stage_dir / "DONE").is_file():
            StageSteps(stage_dir, stage.step_names).verify(log)
        if (stage_dir / "DONE").is_file() or (stage_dir / SKIPPED).is_file():
            log(f"stage {stage.number}: {'done' if (stage_dir / 'DONE').is_file() else 'skipped'}"
                f" already")
            continue
        run_stage(stage.number, run_dir, model if stage.number == 1 else None, limit, seed,
                  heldout, log=log, curriculum=curriculum, **options)
    return run_dir


def dry_run_stage(number: int, run_dir: Path | None = None, model: str | None = None,
                  limit: int | None = None, seed: int | None = None, heldout: int | None = None,
                  constitution_path: Path = PROJECT_ROOT / "constitution.yaml",
                  curriculum: tuple[Stage, ...] = STAGES, **options) -> list[str]:
    """`stage run N --dry-run`: every option checked as a real run checks it, then the
    stage's steps, their state in the run directory and the most work each will do. Nothing
    is loaded or written."""
    stage, ctx, _ = plan_stage_run(number, run_dir, model, limit, seed, heldout,
                                   constitution_path, curriculum=curriculum, log=lambda _: None,
                                   dry_run=True, **options)
    lines, left = describe_plan(stage, ctx)
    return [f"dry run of {ctx.run_dir}: nothing is loaded or written", "", *lines,
            f"  still to do: {work_summary(left)}"]


def dry_run_curriculum(run_dir: Path | None = None, model: str | None = None,
                       limit: int | None = None, seed: int | None = None,
                       until: int | None = None, curriculum: tuple[Stage, ...] = STAGES,
                       heldout: int | None = None, **options) -> list[str]:
    """`run --dry-run`: each stage up to `until` as `dry_run_stage` shows it, and the totals."""
    selected = stages_until(until, curriculum)
    run_dir = (run_dir or default_run_dir(PROJECT_ROOT)).resolve()
    lines, left_all = [f"dry run of {run_dir}: nothing is loaded or written", ""], []
    for stage in selected:
        stage, ctx, _ = plan_stage_run(stage.number, run_dir, model, limit, seed, heldout,
                                       PROJECT_ROOT / "constitution.yaml", curriculum=curriculum,
                                       log=lambda _: None, dry_run=True, chained=True, **options)
        stage_lines, left = describe_plan(stage, ctx)
        lines += [*stage_lines, f"  still to do: {work_summary(left)}", ""]
        left_all += left
    return lines + [f"whole run, still to do: {work_summary(left_all)}"]


def describe_plan(stage: Stage, ctx: StageContext) -> tuple[list[str], list]:
    """The dry-run table of one stage (step, state, most work, how it was counted), and the
    work of the steps not done yet."""
    steps = StageSteps(ctx.stage_dir, stage.step_names)
    done = (ctx.stage_dir / "DONE").is_file()
    lines = [f"stage {stage.number} ({stage.name}){' - done already' if done else ''}",
             f"  input: {ctx.model_path} ({ctx.origin}); profile {ctx.profile.name}",
             f"  {ctx.limit} training tasks, {ctx.heldout} held-out, seed {ctx.seed}",
             f"  {'step':<13} {'state':<8} {'requests':>8} {'new tokens <=':>13} "
             f"{'judge prompts':>13} {'DPO steps':>9}  how counted"]
    work = planned_work(stage, ctx)
    for w in work:
        state = step_state(steps, w.step)
        counts = [f"{n:,}" if n else "-" for n in
                  (w.prompts, w.prompts * w.new_tokens, w.scored, w.dpo_steps)]
        lines.append(f"  {w.step:<13} {state:<8} {counts[0]:>8} {counts[1]:>13} "
                     f"{counts[2]:>13} {counts[3]:>9}  {w.note}".rstrip())
    return lines, [w for w in work if not steps.is_done(w.step)]


def work_summary(work: list) -> str:
    """Generation requests, new tokens, judge prompts and DPO steps summed over `work`."""
    return (f"{sum(w.prompts for w in work):,} generation requests (at most "
            f"{sum(w.prompts * w.new_tokens for w in work):,} new tokens), "
            f"{sum(w.scored for w in work):,} judge prompts, "
            f"{sum(w.dpo_steps for w in work):,} DPO steps")


def describe_settings(run_dir: Path | None, model: str | None,
                      overrides: tuple[str, ...] = (),
                      curriculum: tuple[Stage, ...] = STAGES) -> list[str]:
    """`config show`: every settings section with each field's value and help; a run's own
    values when `run_dir` is given (its config.yaml), else the defaults for `model`."""
    from core.config import field_help

    saved = require_config(run_dir) if run_dir else None
    reference = saved["model"]["reference"] if saved else model
    profile = resolve_model(reference).profile
    sections, _, _ = resolve_settings(saved, profile, overrides, True, curriculum)
    values = saved["settings"] if saved and "settings" in saved else {
        name: as_section(value) for name, value in sections.items()}
    lines = [f"# settings of {run_dir}" if run_dir else f"# defaults for {profile.name}"]
    for name, section in sections.items():
        lines.append(f"{name}:")
        helps = field_help(type(section))
        for key, value in values[name].items():
            note = f"  # {helps[key]}" if helps.get(key) else ""
            lines.append(f"  {key}: {value!r}{note}")
    return lines
