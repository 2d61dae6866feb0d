"""Zero-shot assessment in the house format: objective checks, rates with 95% intervals, and a
paired McNemar test between the stage's input model and its merged model."""
from __future__ import annotations

from pathlib import Path

from core.backend import SamplingSettings
from core.constraints import constraint_from_dict
from core.generation import generate_cached, GenRequest
from core.guards import TemplateGuard
from core.prompting import RESPONSE_STOPS, house_prompt
from core.stats import rate
from core.text import degenerate_reason


def greedy(max_new_tokens: int) -> SamplingSettings:
    """Assessment decodes greedily so before/after differ only by the model."""
    return SamplingSettings(temperature=0.0, top_p=1.0, max_new_tokens=max_new_tokens,
                            stop=RESPONSE_STOPS)


def score_response(text: str, constraints: list[dict]) -> dict:
    """Per-constraint outcomes and whether the response passes them all."""
    results = [constraint_from_dict(c).check(text) for c in constraints]
    return {"constraint_results": results, "passed": all(results) if results else None,
            "degenerate": degenerate_reason(text)}


def generate_greedy(backend, guard: TemplateGuard, cache_path: Path, prompts: dict[str, str],
                    max_new_tokens: int, batch_size: int, where: str) -> dict[str, str]:
    """{id: stripped greedy completion} for {id: prompt}, cached in `cache_path`."""
    requests = [GenRequest(key, prompt, 0) for key, prompt in prompts.items()]
    results = generate_cached(backend, requests, greedy(max_new_tokens), cache_path,
                              guard, batch_size, where)
    return {key: results[key]["text"].strip() for key in prompts}


def assess_instructions(backend, guard: TemplateGuard, items: list[dict], cache_path: Path,
                        max_new_tokens: int, batch_size: int, where: str) -> dict:
    """Generate a zero-shot response for each held-out item and score it."""
    texts = generate_greedy(backend, guard, cache_path,
                            {item["id"]: house_prompt(item["prompt_instruction"]) for item in items},
                            max_new_tokens, batch_size, where)
    scored = [{"id": item["id"], "response": texts[item["id"]],
               **score_response(texts[item["id"]], item["constraints"])} for item in items]
    return {"summary": summarize(items, scored), "items": scored}


def summarize(items: list[dict], scored: list[dict]) -> dict:
    constrained = [s for item, s in zip(items, scored) if item["constraints"]]
    checks = [ok for s in constrained for ok in s["constraint_results"]]
    return {
        "prompt_level": rate(sum(s["passed"] for s in constrained), len(constrained)),
        "constraint_level": rate(sum(checks), len(checks)),
        "non_degenerate": rate(sum(s["degenerate"] is None for s in scored), len(scored)),
    }
