"""`check retention`: does a later stage keep what an earlier stage taught?

Each stage measures its own held-out tasks on its input and its merged model. A later stage
trains on other data, and can undo that gain without any report noticing. This check assesses
every finished stage's held-out tasks again on each later stage's merged model (zero-shot,
greedy, the stage's own scoring) and pairs the outcomes item by item with the stage's own
"after" outcomes (exact McNemar). A metric more than `DROP_POINTS` below the stage's own
result is flagged. Results go to runs/NAME/retention.json and into the run report's capability
table; generations are cached per stage and per model weights, so a rerun loads the models
again but generates nothing again.
"""
from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from app.commands import stage_context
from core.backend import load_backend
from core.context import BackendLoader, StageContext
from core.errors import UsageError
from core.io import read_json, write_json
from core.lifecycle import paired_outcomes
from core.report import RETENTION_FILE, write_run_report
from core.run import RunLock, require_config
from core.stage import Stage
from registry.stages import STAGES

DROP_POINTS = 5.0  # a later model this far below the stage's own result is flagged


def finished_stages(run_dir: Path, curriculum: tuple[Stage, ...]) -> list[Stage]:
    return [s for s in curriculum if (run_dir / f"stage_{s.number}" / "DONE").is_file()]


def check_retention(run_dir: Path, log=print, backend_loader: BackendLoader = load_backend,
                    curriculum: tuple[Stage, ...] = STAGES,
                    after_stages: tuple[int, ...] = ()) -> dict:
    """Assess each finished stage's held-out tasks on every later finished stage's merged model
    (or only on the models of `after_stages`); write retention.json (earlier results for other
    models are kept) and refresh the run report. Returns what retention.json holds."""
    run_dir = run_dir.resolve()
    config = require_config(run_dir)
    done = finished_stages(run_dir, curriculum)
    if len(done) < 2:
        raise UsageError(
            f"{run_dir} has {len(done)} finished stage(s); retention compares a stage's held-out "
            f"result with a later stage's model, so it needs two (run `python cli.py run "
            f"--run-dir {run_dir}` further first)")
    later_models = [s for s in done[1:] if not after_stages or s.number in after_stages]
    unknown = sorted(set(after_stages) - {s.number for s in done[1:]})
    if unknown:
        raise UsageError(
            f"--after-stage {', '.join(map(str, unknown))}: a later model must be a finished "
            f"stage after the first; finished stages in {run_dir}: "
            f"{', '.join(str(s.number) for s in done)}")
    contexts = {s.number: stage_context(run_dir, config, s.number, curriculum, log)
                for s in done[:-1]}
    rows = []
    with RunLock(run_dir / ".lock"):
        for later in later_models:
            merged = str(run_dir / f"stage_{later.number}" / "merged")
            log(f"retention: loading stage {later.number}'s merged model")
            backend = backend_loader(merged, contexts[done[0].number].profile)
            for earlier in (s for s in done if s.number < later.number):
                rows.append(retention_row(earlier, contexts[earlier.number], backend,
                                          later.number))
            del backend
        path = run_dir / RETENTION_FILE
        made = {(r["stage"], r["later_stage"]) for r in rows}
        kept = [r for r in read_json(path)["rows"] if (r["stage"], r["later_stage"]) not in made] \
            if path.is_file() else []
        result = {"at": datetime.now(timezone.utc).isoformat(), "drop_points": DROP_POINTS,
                  "rows": sorted(kept + rows, key=lambda r: (r["later_stage"], r["stage"]))}
        write_json(path, result)
        write_run_report(run_dir)
    return result


def retention_row(stage: Stage, ctx: StageContext, backend, later: int) -> dict:
    """Stage `stage`'s held-out tasks on stage `later`'s merged model, paired with the stage's
    own before and after outcomes (the headline, and non-degenerate outcomes and per-check
    outcomes where the stage's items record them)."""
    label = f"after stage {later}"
    own = read_json(ctx.path("assessment.json"))
    result = stage.assess_heldout(ctx, backend, label)
    key = own["headline"]
    now, mine = result["summary"][key], own["after"]["summary"][key]
    change = None if now["rate"] is None or mine["rate"] is None else \
        round(100 * (now["rate"] - mine["rate"]), 1)
    outcome_fields = ("id", "passed", "degenerate", "checks")
    return {"stage": stage.number, "name": stage.name, "metric": key, "model": label,
            "later_stage": later,
            "model_weights_sha256": ctx.weights_sha(label),
            "stage_weights_sha256": ctx.weights_sha("after"),
            "before": own["before"]["summary"][key], "own_after": mine, "later": now,
            "change_points": change,
            "falls_more_than_drop": change is not None and change < -DROP_POINTS,
            "vs_own_after": paired_outcomes(own["after"]["items"], result["items"]),
            "vs_before": paired_outcomes(own["before"]["items"], result["items"]),
            "later_summary": result["summary"],
            "later_items": [{k: i[k] for k in outcome_fields if k in i} for i in result["items"]]}
