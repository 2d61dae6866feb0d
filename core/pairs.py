"""What every stage does between its scored samples and `pairs_candidates.jsonl`: group samples
by task, drop repeated texts, rank by order-consistent judge wins, apply the last shared filter,
and write kept pairs (as core.records.Pair records) and dropped ones (stopping the stage when
nothing is kept)."""
from __future__ import annotations

from typing import Callable

from core.context import StageContext
from core.errors import NoPairsError
from core.guards import TemplateGuard
from core.io import read_json, write_jsonl
from core.records import Pair, Task
from core.text import looping_reason

Choice = tuple[dict | None, str]  # (pair, "ok") or (None, why no pair)


def same_text(text: str) -> str:
    """Identity key: whitespace folded, case and punctuation kept (they carry constraints)."""
    return " ".join(text.split())


def group_by_task(records: list[dict]) -> dict[str, list[dict]]:
    """Records by their `task_id`, in file order."""
    grouped: dict[str, list[dict]] = {}
    for record in records:
        grouped.setdefault(record["task_id"], []).append(record)
    return grouped


def first_of_each_text(samples: list[dict], key: Callable[[str], str] = same_text) -> list[dict]:
    """Drop repeated texts, keeping the first sample of each."""
    seen: set[str] = set()
    kept = []
    for sample in samples:
        if key(sample["text"]) not in seen:
            seen.add(key(sample["text"]))
            kept.append(sample)
    return kept


def judge_wins(judgments: list[dict]) -> dict[int, int]:
    """Order-consistent wins minus losses per sample; a tie (the two orders disagree) counts for
    nobody. Each judgment names samples `x` and `y` and a `winner` of "x", "y" or "tie"."""
    wins: dict[int, int] = {}
    for j in judgments:
        if j["winner"] == "tie":
            continue
        winner, loser = (j["x"], j["y"]) if j["winner"] == "x" else (j["y"], j["x"])
        wins[winner] = wins.get(winner, 0) + 1
        wins[loser] = wins.get(loser, 0) - 1
    return wins


def shared_pair_problem(pair: dict, guard: TemplateGuard,
                        unusable: Callable[[str], str | None],
                        key: Callable[[str], str] = same_text) -> str | None:
    """The last filter every stage applies: identical sides, chat markup in the prompt, a side
    its stage finds unusable (degenerate, marked up, scaffolding, an exemplar copy ...), or a
    chosen side that loops (core.text.looping_reason)."""
    if key(pair["chosen"]) == key(pair["rejected"]):
        return "identical"
    if not guard.is_clean(pair["prompt"]):
        return "chat markup in prompt"
    for side in ("chosen", "rejected"):
        if reason := unusable(pair[side]):
            return f"{side}: {reason}"
    if reason := looping_reason(pair["chosen"]):
        return f"chosen: {reason}"
    return None


def write_pairs(ctx: StageContext, tasks: list[Task], choose: Callable[[Task], Choice],
                problem: Callable[[dict, Task], str | None] | None, what: str,
                hint: str) -> list[dict]:
    """`choose(task)` per task, then `problem(pair, task)` (the stage's last filter) on what it
    chose: kept pairs into `pairs_candidates.jsonl`, the reasons for the rest into
    `pairs_dropped.jsonl`. Raises NoPairsError (saying why, with `hint`) when none is kept."""
    pairs, dropped = [], []
    for task in tasks:
        pair, reason = choose(task)
        if pair is not None and problem is not None:
            reason = problem(pair, task) or "ok"
        if reason == "ok":
            pairs.append(pair)
        else:
            dropped.append({"task_id": task.id, "reason": reason})
    write_jsonl(ctx.path("pairs_dropped.jsonl"), dropped)
    if not pairs:
        raise NoPairsError(
            f"stage {ctx.number} produced no preference pairs from {len(tasks)} {what} (reasons "
            f"in {ctx.path('pairs_dropped.jsonl')}); {hint}")
    sha = input_weights_sha256(ctx)
    pairs = [Pair.from_stage(pair, ctx.number, sha).to_json() for pair in pairs]
    write_jsonl(ctx.path("pairs_candidates.jsonl"), pairs)
    ctx.log(f"pairs: {len(pairs)} kept, {len(dropped)} dropped")
    return pairs


def input_weights_sha256(ctx: StageContext) -> str | None:
    """The weights hash of the stage's input model, as recorded in input.json (None when the
    stage runs without that record, or the model is a Hub id)."""
    record = ctx.path("input.json")
    return read_json(record).get("weights_sha256") if record.is_file() else None
