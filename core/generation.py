"""Cached generation: requests in length-sorted batches through a backend, each finished item
on disk at once. (The sampling loop itself, with one RNG per sequence and stop strings on decoded
text, is core/sampler.py.)

- Every finished item is appended (fsynced) to a cache keyed by a hash of model, prompt, sampling
  settings and seed; a crash never costs finished work.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from core.guards import TemplateGuard
from core.io import AppendLog, read_jsonl
from core.progress import Progress
from core.sampler import Completion, SamplingSettings


@dataclass(frozen=True)
class GenRequest:
    """One item to generate: `id` names it in outputs; `seed` makes its sampling reproducible;
    `opening` is text the prompt ends with that begins the response (the completion goes on
    from it; core.sampling.with_openings)."""

    id: str
    prompt: str
    seed: int
    opening: str = ""


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
    for request in requests:
        guard.check_prompt(request.prompt, f"{where} item {request.id}")
    keyed = [(cache_key(backend.cache_id, r.prompt, settings, r.seed), r) for r in requests]
    todo = [(key, r) for key, r in keyed if cache.get(key) is None]
    todo.sort(key=lambda kr: (-len(kr[1].prompt), kr[1].id))
    with Progress(len(requests), where, done=len(requests) - len(todo)) as progress:
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            def finished(index: int, completion: Completion, batch=batch) -> None:
                cache.put(batch[index][0], completion)  # on disk the moment the sequence ends
                progress.update(1)

            backend.generate([r.prompt for _, r in batch], settings, [r.seed for _, r in batch],
                             on_finish=finished)
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
