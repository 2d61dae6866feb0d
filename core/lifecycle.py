"""The steps every stage shares once its preference pairs exist:

    decontaminate -> train -> merge -> assess -> report

core/stage.py runs them after a stage's own data steps, passing what only the stage knows (its
exemplars and held-out texts, its merge probes, how to assess its held-out tasks)."""
from __future__ import annotations

import dataclasses
import hashlib
import random
import shutil
from collections import Counter
from pathlib import Path
from typing import Callable

from core import contamination
from core.context import StageContext
from core.dpo import DPOSettings, train_dpo, train_dpo_launched
from core.io import atomic_write_text, read_json, read_jsonl, write_json, write_jsonl
from core.merge import merge_adapter
from core.models import weights_sha256
from core.profile import ModelProfile
from core.run import file_sha256
from core.errors import NoPairsError, RunFailure
from core.prompting import seed_for
from core.records import earlier_records
from core.split import in_turn
from core.stats import mcnemar_exact

AssessHeldout = Callable[[object, str], dict]  # (backend, "before"|"after") -> {"summary", "items"}


def probe_questions() -> list[str]:
    """Requests for the chat-template probe: the baseline's bare questions."""
    from core.suites.baseline import load_probes

    return [p.text for p in load_probes()[0] if p.capability == "bare_questions"][:8]


REPLAY_FILE = "replay.jsonl"  # earlier stages' pairs replayed in this stage's training


def decontaminate_pairs(ctx: StageContext, protected: contamination.Protected) -> None:
    """pairs_candidates.jsonl -> pairs.jsonl, and the earlier stages' pairs replayed in training
    -> replay.jsonl: template failures stop the stage (unless overridden); 13-gram overlaps with
    evaluation sets (this stage's held-out tasks among them) and exemplar copies are removed and
    listed in contamination.tsv."""
    candidates = read_jsonl(ctx.path("pairs_candidates.jsonl"))
    replayed = replay_candidates(ctx, len(candidates), ctx.profile.replay_share)
    records = candidates + replayed
    clean, findings, summary = decontaminated(ctx, protected, records)
    contamination.write_findings_tsv(ctx.path("contamination.tsv"), findings, records)
    own = [r for r in clean if "replayed_from" not in r]
    replay = [r for r in clean if "replayed_from" in r]
    summary["replay"] = {"candidates": len(replayed), "kept": len(replay),
                         "by_stage": {str(k): v for k, v in sorted(
                             Counter(r["replayed_from"] for r in replay).items())}}
    summary["template_probe"] = contamination.chat_template_probe(ctx.backend(), probe_questions())
    write_json(ctx.path("contamination.json"), summary)
    if not own:
        raise NoPairsError(f"stage {ctx.number}: decontamination removed every pair (see "
                           f"{ctx.path('contamination.tsv')})")
    write_jsonl(ctx.path(REPLAY_FILE), replay)
    write_jsonl(ctx.path("pairs.jsonl"), own)
    ctx.log(f"decontaminate: {summary['removed']} of {summary['records']} pairs removed"
            + (f" ({len(replayed)} of them replayed from earlier stages, {len(replay)} kept)"
               if replayed else ""))


def decontaminated(ctx: StageContext, protected: contamination.Protected,
                   records: list[dict]) -> tuple[list[dict], list, dict]:
    """(clean records, findings, summary): `records` checked against the stage's evaluation
    texts, exemplars and template guard (core.contamination.decontaminate)."""
    index = contamination.evaluation_index(protected.data_dir, protected.heldout)
    tokenizer, generation_config = ctx.input_tokenizer_and_generation_config()
    template = contamination.template_state(tokenizer, generation_config)
    return contamination.decontaminate(records, index, protected.exemplars, ctx.guard(),
                                       template, ctx.allow_contamination)


def replay_candidates(ctx: StageContext, own: int, share: float) -> list[dict]:
    """Rehearsal against forgetting: `share` x `own` of the pairs this run's earlier stages
    kept, taken from each earlier stage in turn (each stage's pairs in a seeded order), marked
    `replayed_from`. Empty for stage 1, a share of 0, or a stage run on its own."""
    if share < 0:
        raise RunFailure(f"profile.replay_share is {share}; it must be 0 (no replay) or more, "
                         f"e.g. --set profile.replay_share=0.5")
    want = round(share * own)
    queues = []
    for number in range(1, ctx.number):
        records = earlier_records(ctx.run_dir, number, "pairs.jsonl", ctx.number) or []
        order = random.Random(seed_for(ctx.seed, "replay", ctx.number, number))
        queues.append([{**r, "replayed_from": number}
                       for r in order.sample(records, len(records))])
    return in_turn(queues)[:want]


def training_records(ctx: StageContext) -> tuple[list[dict], str]:
    """(the stage's pairs and the replayed ones, a hash of both files): what DPO trains on."""
    own, replay_path = read_jsonl(ctx.path("pairs.jsonl")), ctx.path(REPLAY_FILE)
    replay = read_jsonl(replay_path) if replay_path.is_file() else []  # none before replay
    digest = file_sha256(ctx.path("pairs.jsonl"))
    if replay:
        digest = hashlib.sha256((digest + file_sha256(replay_path)).encode()).hexdigest()
    return own + replay, digest


def dpo_settings(ctx: StageContext) -> DPOSettings:
    return dpo_settings_for(ctx.profile, ctx.seed)


def dpo_settings_for(p: ModelProfile, seed: int) -> DPOSettings:
    """The DPO and LoRA settings a profile gives."""
    return DPOSettings(learning_rate=p.learning_rate, beta=p.beta, epochs=p.epochs,
                       batch_size=p.train_batch_size, grad_accum=p.grad_accum,
                       max_length=p.max_length, save_steps=p.save_steps, lora_r=p.lora_r,
                       lora_alpha=p.lora_alpha, lora_dropout=p.lora_dropout, seed=seed,
                       sft_weight=p.sft_weight)


def train_adapter(ctx: StageContext) -> None:
    """DPO on pairs.jsonl and replay.jsonl into adapter/ (resumes from train/checkpoints made
    with the same settings and pairs; other checkpoints are discarded, never resumed)."""
    records, pairs_sha = training_records(ctx)
    settings = dpo_settings(ctx)
    discard_foreign_checkpoints(ctx, settings, pairs_sha)
    # a LoRA checkpoint (adapter, Adam moments, RNG) of a model is a few percent of its
    # weights; up to three exist while the oldest is rotated out: 15% is a safe estimate
    check_free_space(ctx.path("train"), int(weights_bytes(ctx.model_path) * 0.15),
                     "training checkpoints")
    run_name = f"{ctx.run_dir.name}-stage{ctx.number}"
    if ctx.profile.accelerate_config:
        ctx.release_backend()  # every launched process loads its own copy
        ctx.guard().check_records(records, "pairs.jsonl")  # refused before any process starts
        training_file = ctx.path("train/train_pairs.jsonl")
        write_jsonl(training_file, records)
        summary = train_dpo_launched(ctx.profile.accelerate_config, ctx.model_path, ctx.profile,
                                     training_file, settings, ctx.path("train"),
                                     ctx.path("adapter"), ctx.report_to, run_name)
    else:
        summary = train_dpo(ctx.backend(), records, settings, ctx.path("train"),
                            ctx.path("adapter"), ctx.guard(), report_to=ctx.report_to,
                            run_name=run_name)
    for warning in summary["health"]["warnings"]:
        ctx.log(f"training warning: {warning}")
    ctx.release_backend()


def discard_foreign_checkpoints(ctx: StageContext, settings: DPOSettings, pairs_sha: str) -> None:
    """train/settings.json records the DPO settings and the pairs file (`pairs_sha`) the
    checkpoints were made with; when either differs (a changed setting accepted on resume, a
    redo that made other pairs), the old checkpoints are removed so that training starts over
    instead of mixing two recipes or two data sets."""
    record, checkpoints = ctx.path("train/settings.json"), ctx.path("train/checkpoints")
    current = {**dataclasses.asdict(settings), "pairs_sha256": pairs_sha}
    if ctx.profile.accelerate_config:  # another process count is another batch size
        current["accelerate_config"] = ctx.profile.accelerate_config
    if checkpoints.exists() and record.is_file() and read_json(record) != current:
        shutil.rmtree(checkpoints)
        ctx.log("train: checkpoints made with other DPO settings or other pairs removed; "
                "training starts over")
    write_json(record, current)


def check_free_space(folder: Path, need: int, what: str) -> None:
    """Refuse (RunFailure) to start writing `need` bytes into `folder` when the disk has less
    free space, instead of failing half-way through with a damaged file."""
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if free < need:
        raise RunFailure(f"{what} needs about {size(need)} free in {folder}, and the disk has "
                         f"{size(free)}; free space and rerun the same command (finished steps "
                         f"are kept)")


def size(n: int) -> str:
    """Bytes as GiB, or MiB under one GiB."""
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def weights_bytes(model_path: str) -> int:
    """Bytes of a local model's weight files (0 for a Hub id)."""
    folder = Path(model_path)
    return sum(p.stat().st_size for p in folder.glob("*.safetensors")) if folder.is_dir() else 0


def merge_model(ctx: StageContext, probes: list[str]) -> None:
    """adapter/ merged into a full-precision copy of the input model, checked on `probes`."""
    ctx.release_backend()
    # the merged copy has the input's size (a full-precision input in the same dtype), plus
    # 10% for the tokenizer and slack; a Hub id's size is unknown here (0: not checked)
    check_free_space(ctx.stage_dir, int(weights_bytes(ctx.model_path) * 1.1), "the merge")
    parity = merge_adapter(ctx.model_path, ctx.path("adapter"), ctx.path("merged"),
                           ctx.profile.dtype, probes, ctx.profile.parity_tolerance)
    write_json(ctx.path("merge.json"), {"base": ctx.model_path, "parity": parity,
                                        "weights_sha256": weights_sha256(str(ctx.path("merged")))})
    ctx.log(f"merge parity: max |dlogp| {parity['max_abs_logprob_diff']:.2e} "
            f"(tolerance {parity['tolerance']})")


def assess_models(ctx: StageContext, assess_heldout: AssessHeldout, headline: str) -> None:
    """The stage's held-out assessment and the baseline suite on the input and the merged model,
    the few-shot reference on the input model, the chat-template probe on the merged model."""
    from core.suites.runner import compare_results, run_suite

    outcomes: dict = {"headline": headline}
    baseline: dict = {}
    p = ctx.profile
    for label, path in (("before", ctx.model_path), ("after", str(ctx.path("merged")))):
        backend = ctx.backend_loader(path, p)
        sha = ctx.weights_sha(label)
        outcomes[label] = {**assess_heldout(backend, label), "model": path}
        baseline[label] = run_suite("baseline", backend, ctx.guard(),
                                    suite_cache(ctx, "baseline", sha, label),
                                    ctx.baseline_limit, p.max_new_tokens, p.gen_batch_size)
        if label == "before":
            baseline["fewshot_reference"] = run_suite(
                "fewshot-reference", backend, ctx.guard(),
                suite_cache(ctx, "fewshot", sha, label), ctx.baseline_limit,
                p.max_new_tokens, p.gen_batch_size)
        else:
            baseline["template_probe_after"] = contamination.chat_template_probe(
                backend, probe_questions())
        del backend
    outcomes["paired"] = paired_outcomes(outcomes["before"]["items"], outcomes["after"]["items"])
    baseline["paired"] = compare_results(baseline["before"], baseline["after"])
    write_json(ctx.path("baseline.json"), baseline)
    write_json(ctx.path("assessment.json"), outcomes)


def suite_cache(ctx: StageContext, suite: str, sha: str | None, label: str) -> Path:
    """Where a suite's generations are cached: per model weights (`sha`) at the run level, so
    stage N reuses stage N-1's "after" outputs for its "before" (greedy decoding, same weights,
    same prompts); per stage for a model without local weights (sha None)."""
    if sha is None:
        return ctx.path(f"cache/assess_{suite}_{label}.jsonl")
    return ctx.run_dir / "cache" / f"{suite}-{sha[:16]}.jsonl"


def paired_outcomes(before: list[dict], after: list[dict]) -> dict:
    """Exact McNemar over held-out items scored in both (items whose `passed` is not None);
    where the items record `degenerate`, also over every item's non-degenerate outcome; where
    they record a `checks` dict (stage 3), also over each check's outcome."""
    test, items = mcnemar_by_id(before, after, lambda item: item["passed"])
    paired = {"mcnemar": test, "items": items}
    if all("degenerate" in item for item in before + after):
        test, items = mcnemar_by_id(before, after, lambda item: item["degenerate"] is None)
        paired["non_degenerate"] = {**test, "items": items}
    if before and all(isinstance(item.get("checks"), dict) for item in before + after):
        paired["checks"] = {}
        for name in before[0]["checks"]:
            test, items = mcnemar_by_id(before, after, lambda item, name=name: item["checks"][name])
            paired["checks"][name] = {**test, "items": items}
    return paired


def mcnemar_by_id(before: list[dict], after: list[dict],
                  outcome: Callable[[dict], bool | None]) -> tuple[dict, int]:
    """Exact McNemar on `outcome` over the items (by id) both lists score (outcome not None),
    and how many those are."""
    b = {i["id"]: o for i in before if (o := outcome(i)) is not None}
    a = {i["id"]: o for i in after if (o := outcome(i)) is not None}
    ids = sorted(set(a) & set(b))
    return mcnemar_exact([b[i] for i in ids], [a[i] for i in ids]), len(ids)


def baseline_table(baseline: dict) -> dict:
    """Per capability: the input model, the merged model, the few-shot reference, McNemar."""
    return {cap: {"metric": row["metric"], "before": row, "after": baseline["after"]["summary"][cap],
                  "fewshot_reference": baseline["fewshot_reference"]["summary"][cap],
                  "paired": baseline["paired"].get(cap)}
            for cap, row in baseline["before"]["summary"].items()}


def write_stage_report(ctx: StageContext, name: str, data: dict) -> None:
    """metrics.json, dpo_curves.png and report.md for the stage, then DONE."""
    from core.report import plot_dpo, stage_report

    pairs = read_jsonl(ctx.path("pairs.jsonl"))
    contamination_result = read_json(ctx.path("contamination.json"))
    replay = contamination_result.get("replay")  # absent in runs made before replay
    metrics = {
        "stage": ctx.number,
        "name": name,
        "input_model": read_json(ctx.path("input.json")) if ctx.path("input.json").is_file() else None,
        "data": {**data, "pairs": len(pairs), "replayed_pairs": replay["kept"] if replay else 0},
        "funnel": pair_funnel(ctx, len(pairs)),
        "dpo": read_json(ctx.path("train/dpo_metrics.json")),
        "merge": read_json(ctx.path("merge.json"))["parity"],
        "assessment": read_json(ctx.path("assessment.json")),
        "baseline": baseline_table(read_json(ctx.path("baseline.json"))),
        "contamination": contamination_result,
    }
    plot_dpo(metrics["dpo"]["per_step"], ctx.path("dpo_curves.png"))
    write_json(ctx.path("metrics.json"), metrics)
    atomic_write_text(ctx.path("report.md"), stage_report(ctx.number, name, metrics, pairs[:3]))


def pair_funnel(ctx: StageContext, kept: int, top: int = 5) -> dict:
    """Where a stage's pairs were lost after its data steps: tasks given to the pair rule, pairs
    it chose (and by which of its rules, where pairs name a `source`), the most common reasons
    it chose none (pairs_dropped.jsonl), what decontamination removed of them, and the stage's
    own pairs trained on (`kept`; replayed ones are not counted)."""
    dropped = read_jsonl(ctx.path("pairs_dropped.jsonl"))
    candidates = read_jsonl(ctx.path("pairs_candidates.jsonl"))
    reasons = Counter(record["reason"] for record in dropped).most_common(top)
    sources = Counter(record["source"] for record in candidates if "source" in record)
    return {"tasks": len(dropped) + len(candidates), "pairs_chosen": len(candidates),
            "pairs_by_rule": dict(sorted(sources.items())),
            "no_pair_reasons": dict(reasons),
            "removed_by_decontamination": len(candidates) - kept,
            "pairs_kept": kept}
