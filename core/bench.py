"""Generation benchmark: our batched sampling loop against one-sequence-at-a-time generation and
against transformers' own `generate`, on the same prompts, in one run."""
from __future__ import annotations

import time

import torch

from core.backend import SamplingSettings
from core.prompting import house_prompt


def bench_prompts(count: int) -> list[str]:
    from core.suites.baseline import load_probes

    probes = [p for p in load_probes()[0] if p.capability != "judging"]
    return [house_prompt(p.text) for p in probes[:count]]


def _timed(action) -> tuple[float, int]:
    started = time.perf_counter()
    tokens = action()
    return time.perf_counter() - started, tokens


def bench_generation(backend, count: int, max_new_tokens: int,
                     batch_sizes: tuple[int, ...]) -> list[dict]:
    """Rows of {engine, batch, seconds, tokens, tokens_per_s, speedup vs one-at-a-time}. Stop
    strings are off so every engine produces exactly `max_new_tokens` per sequence."""
    prompts = bench_prompts(count)
    settings = SamplingSettings(0.7, 0.95, max_new_tokens, ())
    seeds = list(range(len(prompts)))

    def ours(batch: int) -> int:
        total = 0
        for start in range(0, len(prompts), batch):
            out = backend.generate(prompts[start : start + batch], settings, seeds[start : start + batch])
            total += sum(c.tokens for c in out)
        return total

    def hf_generate(batch: int) -> int:
        tok, total = backend.tokenizer, 0
        tok.padding_side = "left"
        for start in range(0, len(prompts), batch):
            enc = tok(prompts[start : start + batch], return_tensors="pt", padding=True).to(backend.device)
            with torch.no_grad():
                out = backend.model.generate(**enc, do_sample=True, temperature=0.7, top_p=0.95,
                                             max_new_tokens=max_new_tokens,
                                             min_new_tokens=max_new_tokens,
                                             pad_token_id=tok.pad_token_id)
            total += (out.shape[1] - enc["input_ids"].shape[1]) * out.shape[0]
        return total

    backend.generate(prompts[:2], settings, seeds[:2])  # warm-up: first-call allocations
    rows = []
    for engine, run in (("ours", ours), ("transformers generate", hf_generate)):
        for batch in batch_sizes:
            seconds, tokens = _timed(lambda: run(batch))
            rows.append({"engine": engine, "batch": batch, "seconds": round(seconds, 2),
                         "tokens": tokens, "tokens_per_s": round(tokens / seconds, 1)})
    base = next(r for r in rows if r["engine"] == "ours" and r["batch"] == batch_sizes[0])
    for row in rows:
        row["speedup_vs_ours_batch_%d" % batch_sizes[0]] = round(row["tokens_per_s"] / base["tokens_per_s"], 2)
    return rows
