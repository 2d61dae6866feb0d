"""Real questions from the shared data sets (Self-Instruct seed tasks without input, TruthfulQA,
MT-Bench first turns), each in a fixed train or held-out part.

The held-out part of a set is chosen by a hash of the item id (core.split.in_fixed_heldout), so
it is the same in every run, stage and seed: a stage that holds a real question out and a stage
that trains on real questions agree on which is which as long as they use the same share.
"""
from __future__ import annotations

import csv
import hashlib
from pathlib import Path

from core.io import read_jsonl
from core.prompting import seed_for
from core.split import in_fixed_heldout
from core.text import NearDuplicateFilter, normalize

HELDOUT_SHARE = 0.3  # the share of each real question set held out (stages 2 and 5)
MAX_QUESTION_WORDS = 60  # longer items (MT-Bench passages) do not fit the training budget


def short_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:10]


def load_real_questions(data_dir: Path | None,
                        heldout_share: float = HELDOUT_SHARE) -> list[dict]:
    """Bare questions from the shared sets that exist under `data_dir`, each with its split: the
    fixed held-out part of each set (`heldout_share` of its items, by a hash of the item id) is
    independent of seed, limit and stage."""
    if data_dir is None or not data_dir.is_dir():
        return []
    items = []
    seeds = data_dir / "self-instruct" / "seed_tasks.jsonl"
    if seeds.is_file():
        for row in read_jsonl(seeds):
            if all(not i["input"].strip() for i in row["instances"]):
                items.append(("self-instruct", f"self-instruct:{row['id']}", row["instruction"]))
    truthful = data_dir / "truthfulqa" / "TruthfulQA.csv"
    if truthful.is_file():
        with open(truthful, newline="", encoding="utf-8") as handle:
            for row in csv.DictReader(handle):
                question = row["Question"]
                items.append(("truthfulqa", f"truthfulqa:{short_hash(normalize(question))}",
                              question))
    mt_bench = data_dir / "mt-bench" / "question.jsonl"
    if mt_bench.is_file():
        for row in read_jsonl(mt_bench):
            items.append(("mt-bench", f"mt-bench:{row['question_id']}", row["turns"][0]))
    return [{"id": item_id, "source": source, "question": question.strip(),
             "split": "heldout" if in_fixed_heldout(item_id, heldout_share) else "train"}
            for source, item_id, question in items]


def pick_real(candidates: list[dict], split: str, count: int, filter_: NearDuplicateFilter,
              guard, taken: set[str], seed: int,
              max_words: int = MAX_QUESTION_WORDS) -> list[dict]:
    """Up to `count` real questions of `split`, round-robin over sources in a seeded order,
    skipping long, marked-up and near-duplicate items (kept ones join the filter)."""
    by_source: dict[str, list[dict]] = {}
    for item in sorted(candidates, key=lambda i: seed_for(seed, "real-question", i["id"])):
        if item["split"] == split and item["id"] not in taken:
            by_source.setdefault(item["source"], []).append(item)
    queues = [by_source[s] for s in sorted(by_source)]
    picked: list[dict] = []
    while len(picked) < count and any(queues):
        for queue in queues:
            if len(picked) >= count or not queue:
                continue
            item = queue.pop(0)
            taken.add(item["id"])
            text = item["question"]
            if len(text.split()) <= max_words and guard.is_clean(text) \
                    and filter_.offer(text):
                picked.append(item)
    return picked
