"""Batched, seeded generation with decoded stop strings and an on-disk cache.

- Batches are left-padded and sorted by prompt length.
- Each sequence samples from its own `torch.Generator`, seeded per item, so a sequence's tokens
  do not depend on which other items share its batch: a resumed run matches an uninterrupted one.
- Stop strings act on the *decoded* text of each sequence, never on a token id (a stop
  sequence's last sub-token, e.g. a bare ':', must not end generation).
- Every finished item is appended (fsynced) to a cache keyed by a hash of model, prompt, sampling
  settings and seed; a crash never costs finished work.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from core.backend import Completion, SamplingSettings
from core.guards import TemplateGuard
from core.io import AppendLog, read_jsonl


OnFinish = Callable[[int, Completion], None]


@dataclass(frozen=True)
class GenRequest:
    """One item to generate: `id` names it in outputs; `seed` makes its sampling reproducible."""

    id: str
    prompt: str
    seed: int


def cache_key(model_id: str, prompt: str, settings: SamplingSettings, seed: int) -> str:
    payload = json.dumps([model_id, prompt, settings.as_dict(), seed], ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class GenerationCache:
    """Finished completions on disk, one JSON line each, keyed by `cache_key`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.entries: dict[str, dict] = {}
        if self.path.exists():
            for record in read_jsonl(self.path):
                self.entries[record["key"]] = record
        self._log = AppendLog(self.path)

    def get(self, key: str) -> dict | None:
        return self.entries.get(key)

    def put(self, key: str, completion: Completion) -> None:
        record = {"key": key, "text": completion.text, "finish": completion.finish,
                  "tokens": completion.tokens}
        self._log.append(record)
        self.entries[key] = record

    def close(self) -> None:
        self._log.close()


def generate_all(backend, requests: list[GenRequest], settings: SamplingSettings,
                 cache: GenerationCache, guard: TemplateGuard, batch_size: int,
                 where: str) -> dict[str, dict]:
    """Generate every request not yet in the cache; return {request id: cached record}."""
    from tqdm.auto import tqdm

    for request in requests:
        guard.check_prompt(request.prompt, f"{where} item {request.id}")
    keyed = [(cache_key(backend.source, r.prompt, settings, r.seed), r) for r in requests]
    todo = [(key, r) for key, r in keyed if cache.get(key) is None]
    todo.sort(key=lambda kr: (-len(kr[1].prompt), kr[1].id))
    progress = tqdm(total=len(requests), initial=len(requests) - len(todo), desc=where,
                    unit="item", disable=None)
    for start in range(0, len(todo), batch_size):
        batch = todo[start : start + batch_size]
        def finished(index: int, completion: Completion, batch=batch) -> None:
            cache.put(batch[index][0], completion)  # on disk the moment the sequence ends
            progress.update(1)

        backend.generate([r.prompt for _, r in batch], settings, [r.seed for _, r in batch],
                         on_finish=finished)
    progress.close()
    return {r.id: cache.get(key) for key, r in keyed}


def generate_cached(backend, requests: list[GenRequest], settings: SamplingSettings,
                    cache_path: Path, guard: TemplateGuard, batch_size: int,
                    where: str) -> dict[str, dict]:
    """`generate_all` with a cache file opened for this one call and always closed."""
    cache = GenerationCache(cache_path)
    try:
        return generate_all(backend, requests, settings, cache, guard, batch_size, where)
    finally:
        cache.close()


@torch.no_grad()
def sample_batch(model, tokenizer, prompts: list[str], settings: SamplingSettings,
                 seeds: list[int], on_finish: OnFinish | None = None) -> list[Completion]:
    """Decode a left-padded batch with a KV cache, one RNG per sequence, stop strings on text.
    `on_finish(i, completion)` is called as soon as sequence i ends."""
    device = next(model.parameters()).device
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    input_ids = enc["input_ids"].to(device)
    mask = enc["attention_mask"].to(device)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    eos_ids = _eos_ids(model, tokenizer)
    n = len(prompts)
    tokens: list[list[int]] = [[] for _ in range(n)]
    results: list[Completion | None] = [None] * n
    past = None
    for _ in range(settings.max_new_tokens):
        out = model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                    past_key_values=past, use_cache=True, logits_to_keep=1)
        past = out.past_key_values
        active = [i for i in range(n) if results[i] is None]
        picked = pick_tokens(out.logits[active, -1, :].float().cpu(), settings,
                             [generators[i] for i in active])
        next_ids = [tokenizer.pad_token_id] * n
        for i, token in zip(active, picked):
            next_ids[i] = token
            results[i] = _finish_if_done(tokenizer, tokens[i], token, eos_ids, settings.stop)
            if results[i] is not None and on_finish:
                on_finish(i, results[i])
        if all(r is not None for r in results):
            break
        input_ids = torch.tensor(next_ids, device=device)[:, None]
        mask = torch.cat([mask, torch.ones((n, 1), dtype=mask.dtype, device=device)], dim=1)
        position_ids = position_ids[:, -1:] + 1
    for i, result in enumerate(results):
        if result is None:
            results[i] = _completion(tokenizer, tokens[i], "length")
            if on_finish:
                on_finish(i, results[i])
    return results


NUCLEUS_CANDIDATES = 1024


def pick_tokens(logits: torch.Tensor, settings: SamplingSettings,
                generators: list[torch.Generator]) -> list[int]:
    """One token per row: greedy at temperature 0; otherwise temperature + nucleus (top-p)
    sampling, each row drawing from its own generator."""
    if settings.temperature <= 0:
        return logits.argmax(dim=-1).tolist()
    return [sample_row(row, settings, generator) for row, generator in zip(logits, generators)]


def sample_row(logits: torch.Tensor, settings: SamplingSettings, generator: torch.Generator) -> int:
    """Nucleus sampling over one row. The nucleus is found among the top NUCLEUS_CANDIDATES
    tokens (a full sort only when the nucleus is wider), then sampled in vocabulary order, so the
    result equals sorting the whole vocabulary."""
    probs = torch.softmax(logits / settings.temperature, dim=-1)
    if settings.top_p < 1.0:
        top, order = probs.topk(min(NUCLEUS_CANDIDATES, probs.shape[-1]))
        if float(top.sum()) < settings.top_p:
            top, order = torch.sort(probs, descending=True)
        keep = top.cumsum(-1) - top < settings.top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], top[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


def _eos_ids(model, tokenizer) -> set[int]:
    ids = {tokenizer.eos_token_id}
    configured = model.generation_config.eos_token_id
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(configured)
    return {i for i in ids if i is not None}


def _finish_if_done(tokenizer, tokens: list[int], token: int, eos_ids: set[int],
                    stops: tuple[str, ...]) -> Completion | None:
    if token in eos_ids:
        return _completion(tokenizer, tokens, "eos")
    tokens.append(token)
    text = tokenizer.decode(tokens, skip_special_tokens=False)
    cut = stop_offset(text, stops)
    if cut >= 0:
        return Completion(text[:cut], "stop", len(tokens))
    return None


def stop_offset(text: str, stops: tuple[str, ...]) -> int:
    """Where the earliest stop string starts (-1 if none). A stop that begins with a newline
    also matches at the very start of the text (the prompt supplied that newline)."""
    hits = [text.find(s) for s in stops if s in text]
    hits += [0 for s in stops if s.startswith("\n") and len(s) > 1 and text.startswith(s[1:])]
    return min(hits) if hits else -1


def _completion(tokenizer, tokens: list[int], finish: str) -> Completion:
    return Completion(tokenizer.decode(tokens, skip_special_tokens=False), finish, len(tokens))
