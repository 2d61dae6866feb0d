"""The project's two held-out split rules, each stable under resume and independent of the order
in which items were made.

- Generated items (instructions, questions): the `heldout` items with the smallest ids (ids are
  hashes of the normalized text) are held out.
- Items of a fixed data set (real questions, red-team prompts): an item is held out when the
  hash of its key falls below `share`, whatever the seed, limit, model or stage.
"""
from __future__ import annotations

import hashlib
from typing import Iterable


def split_smallest_ids(tasks: list[dict], heldout: int) -> list[dict]:
    """Each task with `split` set: "heldout" for the `heldout` smallest ids, else "train". When
    fewer than two training tasks would remain, a quarter (at least one) is held out instead."""
    held = {t["id"] for t in sorted(tasks, key=lambda t: t["id"])[:top_up(0, len(tasks), heldout)]}
    return [{**t, "split": "heldout" if t["id"] in held else "train"} for t in tasks]


def top_up(reserved: int, others: int, heldout: int) -> int:
    """How many of `others` items a held-out set takes besides `reserved` held-out-only ones
    (outputs on another stage's held-out items, drafts of a set's held-out questions) to reach
    `heldout`. Held-out-only items exist to spare the training material, so the top-up takes at
    most a quarter of the others. With none reserved, the rule of split_smallest_ids: `heldout`
    exactly, or a quarter (at least one) when fewer than two would be left to train."""
    wanted = max(0, heldout - reserved)
    if reserved:
        return min(wanted, others // 4)
    if others - wanted < 2:
        return min(others, max(1, others // 4))
    return wanted


def in_fixed_heldout(key: str, share: float) -> bool:
    """Whether an item of a fixed data set is in its held-out part (`share` of all items)."""
    return int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:8], 16) / 16**8 < share


def in_turn(lists: Iterable[list]) -> list:
    """Interleave the lists: the first of each, then the second of each, and so on (every source
    represented whatever the cut-off)."""
    lists = list(lists)
    return [item for i in range(max(map(len, lists), default=0)) for item in
            (lst[i] for lst in lists if i < len(lst))]
