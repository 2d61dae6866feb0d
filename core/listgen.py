"""New items (instructions, questions, topics, red-team prompts) written by list continuation.

The base model sees a numbered list of 3-4 seed items plus up to 2 items it already wrote, and
writes the next one. Rounds repeat, oversampled, until enough items pass the stage's filter; every
offer is audited with the reason it was dropped (None when kept)."""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Callable

from core.context import StageContext
from core.generation import GenRequest
from core.prompting import draw, seed_for
from core.stage import Work


@dataclass(frozen=True)
class ListGrowth:
    """How one stage grows one list."""

    prompt: Callable[[list[str]], str]  # items -> a list prompt ending where the next item goes
    clean: Callable[[str], str]  # raw completion -> candidate item
    problem: Callable[[str], str | None]  # why a candidate is dropped (None keeps it)
    temperature: float
    rounds: int
    oversample: float
    cache: str  # cache file name under the stage's cache/
    seed_names: tuple[str, str]  # seed labels: (which items are shown, the sampling)
    where: str  # for progress and guard messages
    id_prefix: str = ""


def grow_list(ctx: StageContext, growth: ListGrowth, seeds: list[str],
              needed: int) -> tuple[list[str], list[dict]]:
    """Up to `needed` accepted items, in order, and the audit of every offer."""
    settings = ctx.sampling(growth.temperature, ctx.profile.instruction_max_new_tokens, ("\n",))
    accepted: list[str] = []
    audit: list[dict] = []
    for round_ in range(growth.rounds):
        missing = needed - len(accepted)
        if missing <= 0:
            break
        requests = [list_request(ctx.seed, growth, seeds, accepted, round_, i)
                    for i in range(math.ceil(missing * growth.oversample))]
        results = ctx.generate(requests, settings, growth.cache, growth.where)
        for request in requests:
            text = growth.clean(results[request.id]["text"])
            problem = growth.problem(text)
            audit.append({"id": request.id, "text": text, "dropped": problem})
            if problem is None:
                accepted.append(text)
        ctx.log(f"{growth.where} round {round_}: {len(accepted)}/{needed} accepted")
    return accepted[:needed], audit


def list_request(seed: int, growth: ListGrowth, seeds: list[str], accepted: list[str],
                 round_: int, i: int) -> GenRequest:
    shown, sampled = growth.seed_names
    rng = random.Random(seed_for(seed, shown, round_, i))
    items = draw(seeds, rng, 3, 4) + rng.sample(accepted, min(2, len(accepted)))
    rng.shuffle(items)
    return GenRequest(f"{growth.id_prefix}r{round_}-{i}", growth.prompt(items),
                      seed_for(seed, sampled, round_, i))


def growth_work(step: str, ctx: StageContext, needed: int, oversample: float,
                rounds: int) -> Work:
    """A dry run's estimate of growing a list of `needed` items: its first round's requests
    (later rounds ask only for the items still missing)."""
    return Work(step, prompts=math.ceil(needed * oversample) if needed > 0 else 0,
                new_tokens=ctx.profile.instruction_max_new_tokens,
                note=f"list continuation for {needed} items, first round (up to {rounds} "
                     f"rounds while items are missing)")
