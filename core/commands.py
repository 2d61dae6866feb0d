"""The `assess` and `check contamination` commands (the CLI only parses and calls these)."""
from __future__ import annotations

import json
from pathlib import Path

from core.backend import load_backend
from core.contamination import (ContaminationError, chat_template_probe, check_records,
                                evaluation_index, template_problems, template_state,
                                write_findings_tsv)
from core.guards import TemplateGuard
from core.io import read_json, read_jsonl, write_json
from core.models import PROJECT_ROOT, local_model_dir, resolve_model
from core.report import fmt_rate
from core.run import read_config, RunDirError
from core.suites.runner import compare_results, run_suite


def assess_model(model: str, suite: str, limit: int | None, out: Path | None,
                 data_dir: Path | None, max_new_tokens: int | None,
                 compare_to: Path | None, log=print) -> dict:
    """Run `suite` on any model (profile, HF id, local path, or a run's stage directory)."""
    resolved = resolve_model(_stage_model(model))
    log(f"model: {resolved.profile.name} ({resolved.source}) - {resolved.reason}")
    path = local_model_dir(resolved)
    backend = load_backend(path, resolved.profile)
    guard = TemplateGuard(backend.tokenizer)
    tokens = max_new_tokens or (256 if suite == "ifeval" else resolved.profile.max_new_tokens)
    out = out or default_out(resolved.profile.name, path, suite)
    cache = out.parent / "cache" / f"{suite}.jsonl"
    result = run_suite(suite, backend, guard, cache, limit, tokens,
                       resolved.profile.gen_batch_size, data_dir)
    if compare_to:
        result["paired_vs"] = {"file": str(compare_to),
                               "tests": compare_results(json.loads(compare_to.read_text()), result)}
    write_json(out, result)
    result["out"] = str(out)
    return result


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


def pool_texts(stage: int) -> list[str]:
    """Every string of the stage's own exemplar pool (its few-shot exemplars and more)."""
    import yaml

    from core.models import yaml_strings

    pool = PROJECT_ROOT / "stages" / "pools" / f"stage{stage}.yaml"
    texts = yaml_strings(yaml.safe_load(pool.read_text(encoding="utf-8")))
    return [t for t in texts if len(t) >= 20]


def summary_rows(result: dict) -> list[tuple[str, str]]:
    rows = []
    for key, value in result["summary"].items():
        if isinstance(value, dict) and "rate" in value:
            rows.append((f"{key} ({value['metric']})" if "metric" in value else key, fmt_rate(value)))
    return rows


def check_contamination(run_dir: Path, stage: int, probe: bool, log=print) -> dict:
    """Re-check a stage's training records; True in result["ok"] when nothing is found."""
    config = read_config(run_dir)
    if config is None:
        raise RunDirError(f"{run_dir} has no config.yaml: not a run directory")
    stage_dir = run_dir / f"stage_{stage}"
    records_path = next((p for p in (stage_dir / "pairs.jsonl", stage_dir / "pairs_candidates.jsonl")
                         if p.is_file()), None)
    if records_path is None:
        raise RunDirError(f"{stage_dir} has no pairs yet; run the stage up to its pairs step")
    from transformers import AutoTokenizer, GenerationConfig

    input_record = stage_dir / "input.json"
    model_path = read_json(input_record)["path"] if input_record.is_file() else config["model"]["path"]
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    try:
        generation_config = GenerationConfig.from_pretrained(model_path)
    except OSError:
        generation_config = None
    records = read_jsonl(records_path)
    heldout = [(t["id"], t["instruction"]) for t in read_jsonl(stage_dir / "instructions.jsonl")
               if t["split"] == "heldout"]
    data_dir = Path(config["data_dir"]) if config.get("data_dir") else None
    guard = TemplateGuard(tokenizer)
    findings = check_records(records, evaluation_index(data_dir, heldout), pool_texts(stage), guard)
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
            backend = load_backend(path, resolve_model(config["model"]["reference"]).profile)
            result["probes"][label] = chat_template_probe(backend, questions)
    result["ok"] = not findings and not problems
    write_json(stage_dir / "contamination_check.json", result)
    return result


__all__ = ["assess_model", "check_contamination", "summary_rows", "ContaminationError"]
