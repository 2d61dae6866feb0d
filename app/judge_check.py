"""`check judge`: does the log-probability self-judge carry signal, model by model?

Stages 1-3, 5 and 6 choose pairs with core.judge.judge_many (a few-shot A/B prompt, the next
token's log-probabilities, both orders; a verdict counts only when the orders agree). Stages 5
and 6 need the judge itself to choose, so when it carries no signal they keep no pairs. This
check asks that judge about labelled pairs whose better response is known and that no stage
trained on: stage 4's held-out labelled pairs (earlier stages' check outcomes and the pool's
pairs). Each model of the run (the base and every trained stage's merged model) judges every
pair in both orders. Reported per model (core.judge.judge_audit, Wilson intervals): right in
both orders (the rule stages 5-6 apply), order-consistent, right among the consistent ones,
how often the response shown first won (0.5: no position bias) and how often the order-averaged
margin favours the better response (0.5: no signal); right-in-both-orders is paired with the
base model item by item (exact McNemar). Results go to runs/NAME/judge_check.json.
"""
from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from app.pipeline import saved_sections
from core.backend import load_backend
from core.context import BackendLoader
from core.errors import UsageError
from core.guards import TemplateGuard
from core.io import read_jsonl, write_json
from core.judge import judge_audit, judge_many, judge_prefix
from core.models import weights_sha256
from core.report import stage_files
from core.run import RunDirError, RunLock, require_config
from core.stats import mcnemar_exact, rate
from stages.stage4_evaluation_tasks import load_pool

JUDGE_CHECK_FILE = "judge_check.json"
LABELLED = "stage_4/labelled.jsonl"


def judge_shots(pool: dict) -> str:
    """Two of stage 4's verdict exemplars as judge shots, the better response first in one
    and second in the other (letters balanced)."""
    first, second = pool["verdict_exemplars"][:2]
    return judge_prefix([
        {"instruction": first["request"], "response_a": first["better"],
         "response_b": first["worse"], "better": "A"},
        {"instruction": second["request"], "response_a": second["worse"],
         "response_b": second["better"], "better": "B"}])


def heldout_pairs(run_dir: Path) -> list[dict]:
    """Stage 4's held-out labelled pairs in this run (a UsageError with the fix otherwise)."""
    path = run_dir / LABELLED
    if not path.is_file():
        raise RunDirError(f"{path} is missing: `check judge` asks the judge about stage 4's "
                          f"held-out labelled pairs; run stage 4 through its tasks step first "
                          f"(`python cli.py stage run 4 --run-dir {run_dir}`)")
    return [p for p in read_jsonl(path) if p["split"] == "heldout"]


def run_models(run_dir: Path, config: dict, only: tuple[str, ...]) -> dict[str, str]:
    """{label: path}: "base" (the run's model) and "stage N" for every stage with a merged
    model (DONE), or only those named in `only`."""
    models = {"base": config["model"]["path"]}
    for n, done in stage_files(run_dir, "DONE").items():
        if (done.parent / "merged" / "config.json").is_file():
            models[f"stage {n}"] = str(done.parent / "merged")
    unknown = [label for label in only if label not in models]
    if unknown:
        raise UsageError(f"--model {', '.join(unknown)}: not a model of {run_dir} (its models: "
                         f"{', '.join(models)})")
    return {label: path for label, path in models.items() if not only or label in only}


def judged(backend, pairs: list[dict], prefix: str, batch_size: int, label: str) -> list[dict]:
    """One judgment record per pair (x = the better response, sample 0; y = the worse)."""
    guard = TemplateGuard(backend.tokenizer)
    items = [(prefix, p["request"], p["better"], p["worse"]) for p in pairs]
    verdicts = judge_many(backend, guard, items, batch_size, f"check judge {label}")
    return [{"id": p["id"], "x": 0, "y": 1, "winner": v.winner, "margin_xy": v.margin_xy,
             "margin_yx": v.margin_yx} for p, v in zip(pairs, verdicts)]


def model_summary(judgments: list[dict]) -> dict:
    """judge_audit's rates plus right-in-both-orders over every pair."""
    audit = judge_audit(judgments, lambda j, sample: sample == 0)
    right = sum(j["winner"] == "x" for j in judgments)
    return {"right_both_orders": rate(right, len(judgments)), **audit}


def check_judge(run_dir: Path, models: tuple[str, ...] = (), log=print,
                backend_loader: BackendLoader = load_backend) -> dict:
    """Judge stage 4's held-out labelled pairs with each model of the run; write
    judge_check.json and return it."""
    run_dir = run_dir.resolve()
    config = require_config(run_dir)
    pairs = heldout_pairs(run_dir)
    if not pairs:
        raise RunDirError(f"{run_dir / LABELLED} holds no held-out pair")
    profile = saved_sections(config)["profile"]
    prefix = judge_shots(load_pool())
    results: dict[str, dict] = {}
    with RunLock(run_dir / ".lock"):
        for label, path in run_models(run_dir, config, models).items():
            log(f"check judge: {label} ({path})")
            backend = backend_loader(path, profile)
            records = judged(backend, pairs, prefix, profile.judge_batch_size, label)
            del backend
            results[label] = {"path": path, "weights_sha256": weights_sha256(path),
                              **model_summary(records), "judgments": records}
        base = [j["winner"] == "x" for j in results["base"]["judgments"]] \
            if "base" in results else None
        for label, result in results.items():
            if base is not None and label != "base":
                result["vs_base"] = mcnemar_exact(
                    base, [j["winner"] == "x" for j in result["judgments"]])
        out = {"at": datetime.now(timezone.utc).isoformat(), "pairs": len(pairs),
               "pair_sources": sorted({p["source"] for p in pairs}), "models": results}
        write_json(run_dir / JUDGE_CHECK_FILE, out)
    return out
