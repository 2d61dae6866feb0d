"""The batched sampling loop: one left-padded batch decoded with a KV cache, one RNG per sequence
(so a sequence's tokens do not depend on its batch), stop strings on decoded text. The prompts'
forward pass runs in groups of similar length, so a short prompt is not padded to the longest."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class SamplingSettings:
    """How one generation call samples. Part of every cache key."""

    temperature: float
    top_p: float
    max_new_tokens: int
    stop: tuple[str, ...]

    def as_dict(self) -> dict:
        return {"temperature": self.temperature, "top_p": self.top_p,
                "max_new_tokens": self.max_new_tokens, "stop": list(self.stop)}


@dataclass(frozen=True)
class Completion:
    text: str
    finish: str  # "stop" (a stop string), "eos", or "length"
    tokens: int


OnFinish = Callable[[int, Completion], None]


# Prompts per group of the prompt pass (see `prefill`). Smaller groups pad less but multiply
# fewer rows at once; 16 kept the forward's matrices large enough on the CPU bench.
PREFILL_ROWS = 16


@torch.no_grad()
def sample_batch(model, tokenizer, prompts: list[str], settings: SamplingSettings,
                 seeds: list[int], on_finish: OnFinish | None = None,
                 prefill_rows: int | None = PREFILL_ROWS) -> list[Completion]:
    """Decode a left-padded batch with a KV cache, one RNG per sequence, stop strings on text.
    `on_finish(i, completion)` is called as soon as sequence i ends. `prefill_rows`: prompts
    per group of the prompt pass (None: the whole batch in one forward)."""
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
    last_logits, past = prefill(model, input_ids, mask, position_ids, prefill_rows or n)
    for step in range(settings.max_new_tokens):
        if step:
            out = model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                        past_key_values=past, use_cache=True, logits_to_keep=1)
            last_logits, past = out.logits[:, -1, :], out.past_key_values
        active = [i for i in range(n) if results[i] is None]
        logits = last_logits if len(active) == n else last_logits[active]
        picked = pick_tokens(logits.float().cpu(), settings, [generators[i] for i in active])
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


def prefill(model, input_ids: torch.Tensor, mask: torch.Tensor, position_ids: torch.Tensor,
            group_rows: int):
    """The prompts' forward pass -> (last-position logits [n, vocab], KV cache).

    Prompts run in groups of `group_rows`, longest first, each group cut to its own longest
    prompt; the groups' caches are then spliced into the cache that one forward over the whole
    left-padded batch makes. Only padding differs (zeros instead of computed states), and the
    attention mask hides padding, so decoding goes on exactly as after one forward; the
    forward no longer computes a short prompt's padding up to the longest prompt."""
    lengths = mask.sum(-1)
    if len(lengths) <= group_rows:
        groups = (torch.arange(len(lengths), device=mask.device),)
    else:
        groups = torch.argsort(lengths, descending=True, stable=True).split(group_rows)
    logits = None
    caches = []
    for rows in groups:
        width = max(int(lengths[rows].max()), 1)
        out = model(input_ids=input_ids[rows, -width:], attention_mask=mask[rows, -width:],
                    position_ids=position_ids[rows, -width:], use_cache=True, logits_to_keep=1)
        if logits is None:
            logits = out.logits.new_empty((len(lengths), out.logits.shape[-1]))
        logits[rows] = out.logits[:, -1, :]
        caches.append(out.past_key_values)
    if len(groups) > 1:
        splice_caches(caches, groups)
    return logits, caches[0]


def splice_caches(caches: list, groups: tuple[torch.Tensor, ...]) -> None:
    """Write every group's keys and values into the first cache, left-padded with zeros to its
    length (the first group holds the longest prompt, so its cache is as long as the batch's;
    a sliding-window layer keeps at most its window at any prompt length)."""
    for index, layer in enumerate(caches[0].layers):
        parts = [cache.layers[index] for cache in caches]
        layer.keys = _left_padded_rows([part.keys for part in parts], groups)
        layer.values = _left_padded_rows([part.values for part in parts], groups)


def _left_padded_rows(parts: list[torch.Tensor], groups: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """[n, heads, length, dim] from each group's [rows, heads, <= length, dim] (the first is
    the longest), each right-aligned in the time dimension."""
    first = parts[0]
    spliced = first.new_zeros((sum(len(rows) for rows in groups), *first.shape[1:]))
    length = first.shape[-2]
    for part, rows in zip(parts, groups):
        spliced[rows, :, length - part.shape[-2]:] = part
    return spliced


NUCLEUS_CANDIDATES = 1024
# Bumped whenever the same seed may draw a different token: it is part of the generation cache
# key (core/generation.py), so a resumed run never mixes completions of two samplers.
SAMPLER_VERSION = 2


def pick_tokens(logits: torch.Tensor, settings: SamplingSettings,
                generators: list[torch.Generator]) -> list[int]:
    """One token per row: greedy at temperature 0; otherwise temperature + nucleus (top-p)
    sampling, each row drawing from its own generator, so a row's token does not depend on the
    other rows of the batch.

    The whole batch is normalised and its top NUCLEUS_CANDIDATES tokens found in two batched
    calls; each row then draws among its nucleus only. A row whose nucleus is wider than the
    candidates (or top_p >= 1) is sampled from its fully sorted vocabulary instead."""
    if settings.temperature <= 0:
        return logits.argmax(dim=-1).tolist()
    scaled = logits.div(settings.temperature)
    log_norm = torch.logsumexp(scaled, dim=-1, keepdim=True)
    top_logits, top_ids = scaled.topk(min(NUCLEUS_CANDIDATES, scaled.shape[-1]), dim=-1)
    top_probs = torch.exp(top_logits - log_norm)
    picked = []
    for i, generator in enumerate(generators):
        if settings.top_p >= 1.0:  # every token kept: draw over the vocabulary as it is
            full = torch.exp(scaled[i] - log_norm[i])
            picked.append(int(torch.multinomial(full, 1, generator=generator)))
            continue
        probs, ids = top_probs[i], top_ids[i]
        if float(probs.sum()) < settings.top_p:
            probs, ids = torch.sort(torch.exp(scaled[i] - log_norm[i]), descending=True)
        picked.append(draw_from_nucleus(probs, ids, settings.top_p, generator))
    return picked


def draw_from_nucleus(probs: torch.Tensor, ids: torch.Tensor, top_p: float,
                      generator: torch.Generator) -> int:
    """Draw one id from the smallest prefix of `probs` (sorted descending) whose mass reaches
    `top_p`. The kept ids are put back in vocabulary order before the draw, so the token a seed
    draws does not depend on how ties were ordered by the sort."""
    keep = probs.cumsum(-1) - probs < top_p
    kept_ids, order = ids[keep].sort()
    return int(kept_ids[torch.multinomial(probs[keep][order], 1, generator=generator)])


def _eos_ids(model, tokenizer) -> set[int]:
    return eos_ids(tokenizer.eos_token_id, model.generation_config.eos_token_id)


def eos_ids(eos_token_id: int | None, configured: int | list[int] | None) -> set[int]:
    """The tokenizer's EOS and the generation config's EOS id(s): any of them ends a sequence."""
    ids = {eos_token_id}
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
