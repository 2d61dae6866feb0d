"""The `assess` and `check contamination` commands (the CLI only parses and calls these)."""
from __future__ import annotations

import json
from functools import partial
from pathlib import Path

from core.backend import load_backend
from core.contamination import (ContaminationError, chat_template_probe, check_records,
                                evaluation_index, template_problems, template_state,
                                write_findings_tsv)
from core.context import StageContext
from core.guards import TemplateGuard
from core.io import read_json, read_jsonl, write_json
from core.models import PROJECT_ROOT, local_model_dir, weights_tag
from app.pipeline import saved_sections, select_stage
from core.report import fmt_rate
from core.errors import UsageError
from core.run import RunDirError, RunLock, require_config
from core.stage import Stage
from core.suites.runner import compare_results, run_suite
from registry.models import resolve_model
from registry.stages import STAGES


def assess_model(model: str, suite: str, limit: int | None, out: Path | None,
                 data_dir: Path | None, max_new_tokens: int | None,
                 compare_to: Path | None, log=print) -> dict:
    """Run `suite` on any model (profile, HF id, local path, or a run's stage directory)."""
    resolved = resolve_model(_stage_model(model))
    log(f"model: {resolved.profile.name} ({resolved.source}) - {resolved.reason}")
    path = local_model_dir(resolved.source)
    backend = load_backend(path, resolved.profile)
    guard = TemplateGuard(backend.tokenizer)
    tokens = max_new_tokens or (256 if suite == "ifeval" else resolved.profile.max_new_tokens)
    out = out or default_out(resolved.profile.name, path, suite)
    cache = suite_cache_path(out, suite, path)
    result = run_suite(suite, backend, guard, cache, limit, tokens,
                       resolved.profile.gen_batch_size, data_dir)
    if compare_to:
        result["paired_vs"] = {"file": str(compare_to),
                               "tests": compare_results(json.loads(compare_to.read_text()), result)}
    write_json(out, result)
    result["out"] = str(out)
    return result


def suite_cache_path(out: Path, suite: str, path: str) -> Path:
    """OUT_DIR/cache/SUITE-TAG.jsonl, TAG from the weight files' sizes and modification times:
    the cache keys hold the model's path, so a model rewritten at the same path (a merge redone
    with --redo-from) would otherwise be assessed from the old weights' outputs."""
    return out.parent / "cache" / f"{suite}-{weights_tag(path)}.jsonl"


def _stage_model(model: str) -> str:
    """A run's stage directory stands for its merged model."""
    merged = Path(model) / "merged"
    return str(merged) if (merged / "config.json").is_file() else model


def default_out(name: str, path: str, suite: str) -> Path:
    """artifacts/assess/NAME-HASH-SUITE.json; the hash of the model path keeps two merged models
    from overwriting each other."""
    import hashlib

    slug = "".join(c if c.isalnum() or c in "-." else "_" for c in name)
    digest = hashlib.sha256(str(Path(path).resolve() if Path(path).exists() else path).encode()).hexdigest()[:8]
    return PROJECT_ROOT / "artifacts" / "assess" / f"{slug}-{digest}-{suite}.json"


def stage_context(run_dir: Path, config: dict, stage: int,
                  curriculum: tuple[Stage, ...] = STAGES, log=print) -> StageContext:
    """The context a stage of this run was given (its input model, saved settings, data dir)."""
    from core.constitution import load_constitution

    stage_dir = run_dir / f"stage_{stage}"
    input_record = stage_dir / "input.json"
    model_path = read_json(input_record)["path"] if input_record.is_file() else config["model"]["path"]
    run = config["run"]
    sections = saved_sections(config, curriculum)
    select_stage(stage, curriculum)
    return StageContext(run_dir=run_dir, number=stage, model_path=model_path, origin="recorded",
                        profile=sections["profile"], seed=run["seed"], limit=run["limit"],
                        heldout=run["heldout"],
                        constitution=load_constitution(Path(config["constitution"]["path"])),
                        data_dir=Path(config["data_dir"]) if config.get("data_dir") else None,
                        baseline_limit=run.get("baseline_limit"),
                        settings=sections[f"stage{stage}"],
                        near_duplicate=sections["run"].near_duplicate, log=log)


def tune_stage(run_dir: Path, number: int, grid: tuple[str, ...], dev_share: float,
               retention: bool = False, log=print, backend_loader=load_backend) -> dict:
    """`tune`: the DPO grid on a dev split of stage `number`'s pairs (core/tune.py), trained
    from the stage's input model with the run's own settings (and the earlier stages' pairs
    the point's replay_share adds); with `retention`, each point is also measured on the
    earlier stages' dev items. Results in stage_N/tune/."""
    from core.config import apply_overrides
    from core.lifecycle import decontaminated, replay_candidates
    from core.tune import TuneJob, parse_grid, tune_dpo

    config = require_config(run_dir)
    if not 0 < dev_share < 1:
        raise UsageError(f"--dev-share must be between 0 and 1 (exclusive), got {dev_share}")
    points = parse_grid(grid)
    stage = select_stage(number)
    ctx = stage_context(run_dir, config, number)
    if not (ctx.stage_dir / "steps" / "decontaminate.done").is_file():
        raise RunDirError(
            f"stage {number} of {run_dir} has no decontaminated pairs yet; run it through its "
            f"decontaminate step first (`python cli.py stage run {number} --run-dir {run_dir}`)")
    records = read_jsonl(ctx.path("pairs.jsonl"))
    shares = [apply_overrides({"profile": ctx.profile}, p.items)["profile"].replay_share
              for p in points]
    if min(shares) < 0:
        raise UsageError(f"--grid: profile.replay_share must be 0 or more, got {min(shares)}")
    with RunLock(run_dir / ".lock"):
        replay = decontaminated(ctx, stage.protected(ctx), replay_candidates(
            ctx, len(records), max(shares)))[0] if max(shares) > 0 else []
        job = TuneJob(records=records, replay=replay, model_path=ctx.model_path,
                      profile=ctx.profile, seed=ctx.seed, guard=ctx.guard(),
                      work_dir=ctx.path("tune"), load_backend=backend_loader,
                      retention=retention_metrics(run_dir, config, number, log) if retention
                      else (), merge_probes=tuple(stage.merge_probes(ctx)))
        return tune_dpo(job, points, dev_share, log)


def retention_metrics(run_dir: Path, config: dict, number: int, log=print) -> tuple:
    """The dev items of every finished stage before `number` that has them (core.tune.DevMetric)."""
    from core.tune import DevMetric

    metrics = []
    for earlier in STAGES[:number - 1]:
        if earlier.assess_dev and (run_dir / f"stage_{earlier.number}" / "DONE").is_file():
            ctx = stage_context(run_dir, config, earlier.number, log=log)
            metrics.append(DevMetric(f"stage {earlier.number} {earlier.headline}",
                                     earlier.headline, partial(earlier.assess_dev, ctx)))
    if not metrics:
        with_dev = ", ".join(str(s.number) for s in STAGES if s.assess_dev)
        raise UsageError(
            f"--retention: no finished stage before stage {number} of {run_dir} has dev items "
            f"(stages with them: {with_dev}); tune a later stage, or leave out --retention")
    return tuple(metrics)


def summary_rows(result: dict) -> list[tuple[str, str]]:
    rows = []
    for key, value in result["summary"].items():
        if isinstance(value, dict) and "rate" in value:
            rows.append((f"{key} ({value['metric']})" if "metric" in value else key, fmt_rate(value)))
    return rows


def check_contamination(run_dir: Path, stage: int, probe: bool, log=print) -> dict:
    """Re-check a stage's training records; True in result["ok"] when nothing is found."""
    config = require_config(run_dir)
    stage_dir = run_dir / f"stage_{stage}"
    records_path = next((p for p in (stage_dir / "pairs.jsonl", stage_dir / "pairs_candidates.jsonl")
                         if p.is_file()), None)
    if records_path is None and (stage_dir / "SKIPPED").is_file():
        raise RunDirError(f"stage {stage} of {run_dir} was skipped (it kept no preference pairs; "
                          f"see {stage_dir / 'SKIPPED'}): there are no training records to check")
    if records_path is None:
        raise RunDirError(f"{stage_dir} has no pairs yet; run the stage up to its pairs step")
    from transformers import AutoTokenizer, GenerationConfig

    ctx = stage_context(run_dir, config, stage)
    model_path = ctx.model_path
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    try:
        generation_config = GenerationConfig.from_pretrained(model_path)
    except OSError:
        generation_config = None
    records = read_jsonl(records_path)
    protected = select_stage(stage).protected(ctx)
    guard = TemplateGuard(tokenizer)
    findings = check_records(records, evaluation_index(protected.data_dir, protected.heldout),
                             protected.exemplars, guard)
    state = template_state(tokenizer, generation_config)
    problems = template_problems(state)
    write_findings_tsv(stage_dir / "contamination_check.tsv", findings, records)
    result = {"records": str(records_path), "count": len(records), "findings": len(findings),
              "by_check": {c: sum(f.check == c for f in findings) for c in ("data", "exemplar", "template")},
              "template": state, "template_problems": problems}
    if probe:
        result["probes"] = {}
        for label, path in (("input", model_path), ("merged", str(stage_dir / "merged"))):
            if label == "merged" and not (stage_dir / "merged" / "config.json").is_file():
                continue
            from core.suites.baseline import load_probes

            questions = [p.text for p in load_probes()[0] if p.capability == "bare_questions"][:8]
            backend = load_backend(path, ctx.profile)
            result["probes"][label] = chat_template_probe(backend, questions)
    result["eval_sets"] = str(protected.data_dir) if protected.data_dir else None
    result["complete"] = protected.data_dir is not None
    result["ok"] = not findings and not problems and result["complete"]
    write_json(stage_dir / "contamination_check.json", result)
    return result


__all__ = ["assess_model", "check_contamination", "summary_rows", "ContaminationError"]
