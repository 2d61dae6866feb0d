"""Text hygiene shared by stages: normalisation, degenerate-output detection, ROUGE-L
near-duplicate filtering (as Self-Instruct did) and exemplar-copy detection."""
from __future__ import annotations

import re
from dataclasses import dataclass

from rouge_score import rouge_scorer

_SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
_WORD = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)?")


def normalize(text: str) -> str:
    """Lower-case, alphanumerics only, single spaces: the key for splits and leakage checks."""
    return " ".join(re.sub(r"[^a-z0-9]+", " ", text.lower()).split())


def rouge_l(a: str, b: str) -> float:
    """ROUGE-L F-measure between two texts."""
    return _SCORER.score(a, b)["rougeL"].fmeasure


@dataclass
class NearDuplicateFilter:
    """Keeps texts whose ROUGE-L against every kept text is at most `threshold`."""

    threshold: float = 0.7

    def __post_init__(self) -> None:
        self.kept: list[str] = []

    def max_similarity(self, text: str) -> float:
        return max((rouge_l(text, other) for other in self.kept), default=0.0)

    def offer(self, text: str) -> bool:
        """Keep `text` if it is not a near-duplicate; returns whether it was kept."""
        if self.max_similarity(text) > self.threshold:
            return False
        self.kept.append(text)
        return True


NEAR_DUPLICATE = 0.7  # ROUGE-L F above which two texts count as the same item


def near_same(a: str, b: str, threshold: float = NEAR_DUPLICATE) -> bool:
    """Equal after normalization, or ROUGE-L above `threshold`."""
    return normalize(a) == normalize(b) or rouge_l(a, b) > threshold


def first_near_same(text: str, others: list[str], threshold: float = NEAR_DUPLICATE) -> str | None:
    """The first of `others` that is near-same as `text` (a held-out item leaking into training)."""
    return next((other for other in others if near_same(text, other, threshold)), None)


def degenerate_reason(text: str, min_words: int = 1, max_words: int | None = None) -> str | None:
    """Why `text` is unusable as model output (None when it is fine)."""
    stripped = text.strip()
    if not stripped:
        return "empty"
    words = _WORD.findall(stripped)
    if len(words) < min_words:
        return f"fewer than {min_words} words"
    if max_words is not None and len(stripped.split()) > max_words:
        return f"more than {max_words} words"
    letters = sum(ch.isalpha() for ch in stripped)
    if letters / len(stripped) < 0.5:
        return "mostly non-letters"
    if _repeats(words):
        return "repetitive"
    return None


def _repeats(words: list[str]) -> bool:
    """A 3-gram that fills a third of the text, or one word half of a long text."""
    lowered = [w.lower() for w in words]
    if len(lowered) >= 8 and max(lowered.count(w) for w in set(lowered)) / len(lowered) > 0.5:
        return True
    grams = [tuple(lowered[i : i + 3]) for i in range(len(lowered) - 2)]
    if len(grams) >= 6:
        top = max(grams.count(g) for g in set(grams))
        return top * 3 / len(lowered) > 0.34 and top >= 3
    return False


_SENTENCE_SPLIT = re.compile(r"(?<=[.!?])\s+|\n+")
_LIST_ITEM = re.compile(r"^\s*(?:[A-Za-z]\)|\d+[.)]|[-*\u2022])\s*(.+)$", re.MULTILINE)


def looping_reason(text: str, min_words: int = 3) -> str | None:
    """Why `text` loops, so must not be a chosen response (None when it does not): a sentence
    of at least `min_words` words said twice, or a list of three or more items with one item
    twice. Both pass every constraint check a loop can satisfy ("at least 60 words", "exactly
    N items") and both teach repetition; the loose `degenerate_reason` test misses them."""
    sentences = [normalize(s) for s in _SENTENCE_SPLIT.split(text)]
    if _has_repeat([s for s in sentences if len(s.split()) >= min_words]):
        return "repeats a sentence"
    items = [normalize(item) for item in _LIST_ITEM.findall(text)]
    if len(items) >= 3 and _has_repeat([item for item in items if item]):
        return "repeats a list item"
    return None


def _has_repeat(values: list[str]) -> bool:
    return len(set(values)) < len(values)


def copies_exemplar(text: str, exemplars: list[str], min_chars: int = 40) -> bool:
    """True when `text` contains a verbatim run of an exemplar (>= `min_chars` normalized
    characters) or equals one: exemplar text must never reach training data."""
    norm = normalize(text)
    if not norm:
        return False
    for exemplar in exemplars:
        ex = normalize(exemplar)
        if not ex:
            continue
        if norm == ex:
            return True
        if len(ex) >= min_chars and _shares_run(norm, ex, min_chars):
            return True
    return False


def _shares_run(a: str, b: str, length: int) -> bool:
    windows = {b[i : i + length] for i in range(0, len(b) - length + 1, 8)}
    return any(a[i : i + length] in windows for i in range(len(a) - length + 1))
