"""Run an assessment suite on a loaded model and compare two results with paired tests."""
from __future__ import annotations

import time
from pathlib import Path

from core.assess import generate_greedy
from core.errors import UsageError
from core.guards import TemplateGuard
from core.ifeval import load_ifeval, score_item
from core.ifeval import summarize as summarize_ifeval
from core.judge import option_token_ids
from core.prompting import HOUSE_TEMPLATE, house_prompt
from core.stats import mcnemar_exact, rate
from core.suites.baseline import (CAPABILITIES, METRIC_NAMES, SCORERS, fewshot_prefix,
                                  load_probes, swapped_judging_text)

SUITES = ("baseline", "fewshot-reference", "ifeval")
RESPONSE_LEAD = HOUSE_TEMPLATE.split("{instruction}")[1]  # "\n\nResponse:\n"


def run_suite(name: str, backend, guard: TemplateGuard, cache_path: Path, limit: int | None,
              max_new_tokens: int, batch_size: int, data_dir: Path | None = None) -> dict:
    """Run one suite; the result holds per-item outcomes, a summary of rates with 95% Wilson
    intervals, the suite's content hash, and the wall time."""
    started = time.time()
    if name == "ifeval":
        result = run_ifeval(backend, guard, cache_path, limit, max_new_tokens, batch_size,
                            data_dir)
    elif name in ("baseline", "fewshot-reference"):
        result = run_baseline(backend, guard, cache_path, limit, max_new_tokens, batch_size,
                              fewshot=name == "fewshot-reference")
    else:
        raise ValueError(f"unknown suite {name!r}; choose one of {', '.join(SUITES)}")
    return {"suite": name, "model": backend.source, "limit": limit,
            "max_new_tokens": max_new_tokens, **result,
            "seconds": round(time.time() - started, 1)}


def run_baseline(backend, guard: TemplateGuard, cache_path: Path, limit: int | None,
                 max_new_tokens: int, batch_size: int, fewshot: bool) -> dict:
    probes, exemplars, sha = load_probes()
    if limit:
        probes = [p for cap in CAPABILITIES for p in [q for q in probes if q.capability == cap][:limit]]
    prefix = {cap: fewshot_prefix(cap, exemplars) if fewshot else "" for cap in CAPABILITIES}
    generated = [p for p in probes if p.capability != "judging"]
    texts = generate_greedy(backend, guard, cache_path,
                      {p.id: prefix[p.capability] + house_prompt(p.text) for p in generated},
                      max_new_tokens, batch_size, "baseline probes")
    items = [{"id": p.id, "capability": p.capability, "response": texts[p.id],
              "passed": SCORERS[p.capability](texts[p.id], p.spec)} for p in generated]
    judging = [p for p in probes if p.capability == "judging"]
    items += judge_probes(backend, guard, judging, prefix["judging"], batch_size)
    summary = {cap: {"metric": METRIC_NAMES[cap], **rate(
        sum(i["passed"] for i in items if i["capability"] == cap),
        sum(1 for i in items if i["capability"] == cap))} for cap in CAPABILITIES}
    picked_a = [o for i in items if i["capability"] == "judging" for o in i["picked"]]
    return {"probes_sha256": sha, "summary": summary, "items": items,
            "judge_position_bias": {"share_answering_A": rate(picked_a.count("A"), len(picked_a))}}


def judge_probes(backend, guard: TemplateGuard, probes: list, prefix: str,
                 batch_size: int) -> list[dict]:
    """Zero-shot judging: log p("A") vs log p("B") as the response's first token, asked in both
    orders; correct only when both orders pick the labelled response."""
    if not probes:
        return []
    a_id, b_id = option_token_ids(backend.tokenizer, RESPONSE_LEAD, ("A", "B"))
    prompts = []
    for p in probes:
        prompts += [prefix + house_prompt(p.text), prefix + house_prompt(swapped_judging_text(p.spec))]
    for i, prompt in enumerate(prompts):
        guard.check_prompt(prompt, f"judging probe {i}")
    picks = []
    for start in range(0, len(prompts), batch_size):
        logp = backend.option_logprobs(prompts[start : start + batch_size], (a_id, b_id))
        picks += ["A" if a >= b else "B" for a, b in logp.tolist()]
    items = []
    for k, p in enumerate(probes):
        first, second = picks[2 * k], picks[2 * k + 1]
        label = p.spec["better"]
        swapped_label = "B" if label == "A" else "A"
        items.append({"id": p.id, "capability": "judging", "picked": [first, second],
                      "passed": first == label and second == swapped_label})
    return items


def run_ifeval(backend, guard: TemplateGuard, cache_path: Path, limit: int | None,
               max_new_tokens: int, batch_size: int, data_dir: Path | None) -> dict:
    path = (data_dir or Path()) / "ifeval" / "input_data.jsonl"
    items = load_ifeval(path, limit)
    texts = generate_greedy(backend, guard, cache_path,
                      {str(i.key): house_prompt(i.prompt) for i in items}, max_new_tokens,
                      batch_size, "ifeval")
    scores = [{"id": str(item.key), "response": texts[str(item.key)],
               **score_item(item, texts[str(item.key)])} for item in items]
    for s in scores:
        s["passed"] = s["prompt_strict"]
    return {"data": str(path), "summary": summarize_ifeval(scores), "items": scores}


class SuiteMismatchError(UsageError):
    """Two results cannot be compared item by item."""


def compare_results(before: dict, after: dict) -> dict:
    """Paired exact McNemar per capability (baseline) or on prompt-level strict (IFEval),
    over the items both results share."""
    if before.get("suite") != after.get("suite") or \
            before.get("probes_sha256") != after.get("probes_sha256"):
        raise SuiteMismatchError(
            f"cannot pair a {before.get('suite')} result with a {after.get('suite')} result "
            f"(or probe sets differ: {before.get('probes_sha256')} vs {after.get('probes_sha256')}); "
            f"compare results of the same suite and probe version")
    b = {i["id"]: i for i in before["items"]}
    a = {i["id"]: i for i in after["items"]}
    shared = [k for k in b if k in a]
    groups: dict[str, list[str]] = {}
    for key in shared:
        groups.setdefault(b[key].get("capability", "prompt_level_strict"), []).append(key)
    return {group: mcnemar_exact([b[k]["passed"] for k in keys], [a[k]["passed"] for k in keys])
            for group, keys in groups.items()}
