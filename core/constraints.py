"""Verifiable response constraints: describe, check and sample them.

Each constraint kind has a plain-English description appended to an instruction
and a deterministic checker, so stage 1 can verify instruction following
without a model. Definitions are written from scratch in the spirit of IFEval.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from typing import Any, Callable

KINDS: tuple[str, ...] = (
    "lowercase",
    "uppercase",
    "max_words",
    "min_words",
    "max_sentences",
    "include_keywords",
    "exclude_keywords",
    "start_with",
    "end_with",
    "bullet_count",
    "paragraph_count",
    "json_format",
    "no_commas",
    "wrap_in_quotes",
    "title",
    "postscript",
    "numbered_steps",
)

KEYWORDS: tuple[str, ...] = (
    "river", "balance", "future", "garden", "window", "journey", "signal", "harvest",
    "bridge", "memory", "lantern", "pattern", "winter", "market", "silver", "planet",
)
EXCLUDED_WORDS: tuple[str, ...] = (
    "very", "really", "basically", "actually", "literally", "obviously",
    "simply", "thing", "stuff", "awesome", "nice", "totally",
)
START_PHRASES: tuple[str, ...] = (
    "Here is my answer:",
    "Sure, here is what you asked for:",
    "Let me explain.",
    "To begin with",
    "My response is as follows:",
)
END_PHRASES: tuple[str, ...] = (
    "Is there anything else I can help with?",
    "Let me know if you have further questions.",
    "That is all, thank you.",
    "I hope this helps.",
    "Any other questions?",
)

# Which kinds may not be combined, declared once per pair; INCOMPATIBLE below is
# the symmetric closure (plus each kind with itself).
_LAYOUT_KINDS = frozenset({
    "bullet_count", "paragraph_count", "numbered_steps", "start_with", "end_with",
    "wrap_in_quotes", "title", "postscript", "uppercase", "lowercase",
})
_CONFLICTS: dict[str, frozenset[str]] = {
    "lowercase": frozenset({"uppercase", "postscript"}),  # "P.S." has capitals
    "max_words": frozenset({"min_words"}),
    "json_format": _LAYOUT_KINDS,
    "wrap_in_quotes": frozenset({
        "start_with", "end_with", "json_format", "bullet_count", "numbered_steps",
        "paragraph_count",
    }),
    "bullet_count": frozenset({"numbered_steps", "paragraph_count"}),
}


def _symmetric(conflicts: dict[str, frozenset[str]]) -> dict[str, frozenset[str]]:
    """Close a one-way conflict declaration under symmetry and self-conflict."""
    table = {kind: {kind} for kind in KINDS}
    for kind, others in conflicts.items():
        for other in others:
            table[kind].add(other)
            table[other].add(kind)
    return {kind: frozenset(others) for kind, others in table.items()}


INCOMPATIBLE: dict[str, frozenset[str]] = _symmetric(_CONFLICTS)


def compatible(a: str, b: str) -> bool:
    """True when kinds `a` and `b` may appear together in one instruction."""
    return b not in INCOMPATIBLE[a]


# ---------------------------------------------------------------- text helpers

_SENTENCE_END = re.compile(r"[.!?]+(?=\s|$)")
_LIST_MARKER = re.compile(r"^[ \t]*(?:\d+\.|[-*])[ \t]+", re.MULTILINE)
_BULLET = re.compile(r"^[ \t]*[-*] ", re.MULTILINE)
_STEP = re.compile(r"^[ \t]*(\d+)\.(?=\s|$)", re.MULTILINE)
_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")
_FENCE = re.compile(r"\A```(?:json)?\s*(.*?)\s*```\Z", re.DOTALL | re.IGNORECASE)
_TITLE = re.compile(r"<<([^<>\n]+)>>")
_POSTSCRIPT = re.compile(r"^[ \t]*P\.S\.", re.MULTILINE)


def count_words(text: str) -> int:
    """Number of whitespace-separated words."""
    return len(text.split())


def count_sentences(text: str) -> int:
    """Number of non-empty parts after splitting on runs of . ! ? before whitespace or end.

    Leading list markers ("1.", "- ") are removed first so list numbering is not
    counted as sentences.
    """
    parts = _SENTENCE_END.split(_LIST_MARKER.sub("", text))
    return sum(1 for part in parts if part.strip())


def _has_word(text: str, word: str) -> bool:
    return re.search(rf"\b{re.escape(word)}\b", text, re.IGNORECASE) is not None


def _is_json(text: str) -> bool:
    stripped = text.strip()
    fenced = _FENCE.match(stripped)
    try:
        value = json.loads(fenced.group(1) if fenced else stripped)
    except json.JSONDecodeError:
        return False
    return isinstance(value, (dict, list))


def _is_quoted(text: str) -> bool:
    stripped = text.strip()
    return len(stripped) > 2 and stripped[0] == '"' and stripped[-1] == '"'


def _has_title(text: str) -> bool:
    return any(title.strip() for title in _TITLE.findall(text))


def _steps_in_order(text: str, n: int) -> bool:
    numbers = [int(number) for number in _STEP.findall(text)]
    return numbers == list(range(1, n + 1))


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _quoted_list(words: list[str], conjunction: str) -> str:
    quoted = [f'"{word}"' for word in words]
    return quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} {conjunction} {quoted[-1]}"


# ------------------------------------------------------------- param sampling

Params = dict[str, Any]
Sampler = Callable[[random.Random, frozenset[str]], Params]


def _adapt_phrase(phrase: str, others: frozenset[str]) -> str:
    if "lowercase" in others:
        return phrase.lower()
    if "uppercase" in others:
        return phrase.upper()
    return phrase


def _phrase_sampler(pool: tuple[str, ...]) -> Sampler:
    def sample(rng: random.Random, others: frozenset[str]) -> Params:
        options = [p for p in pool if "no_commas" not in others or "," not in p]
        return {"phrase": _adapt_phrase(rng.choice(options), others)}
    return sample


def _count_sampler(choices: tuple[int, ...]) -> Sampler:
    return lambda rng, others: {"n": rng.choice(choices)}


def _words_sampler(pool: tuple[str, ...]) -> Sampler:
    return lambda rng, others: {"keywords": rng.sample(pool, rng.randint(1, 2))}


def _no_params(rng: random.Random, others: frozenset[str]) -> Params:
    return {}


def _counts(choices: tuple[int, ...]) -> tuple[Sampler, tuple[Params, ...]]:
    """The sampler and the hindsight grid of a count kind (the same choices)."""
    return _count_sampler(choices), tuple({"n": n} for n in choices)


def _words(pool: tuple[str, ...]) -> tuple[Sampler, tuple[Params, ...]]:
    """Sampled: one or two words of `pool`; hindsight grid: each word alone."""
    return _words_sampler(pool), tuple({"keywords": [word]} for word in pool)


def _phrases(pool: tuple[str, ...]) -> tuple[Sampler, tuple[Params, ...]]:
    return _phrase_sampler(pool), tuple({"phrase": phrase} for phrase in pool)


# --------------------------------------------------------------- kind registry


@dataclass(frozen=True)
class _Spec:
    params: dict[str, str]  # param name -> type tag: "count", "text" or "words"
    check: Callable[[str, Params], bool]
    describe: Callable[[Params], str]
    sample: Sampler
    grid: tuple[Params, ...] = ({},)  # parameter choices hindsight relabelling may state
    # how every response meeting the constraint begins (None: no fixed beginning)
    opening: Callable[[Params], str] | None = None


_SPECS: dict[str, _Spec] = {
    "lowercase": _Spec(
        {},
        lambda r, p: not any(c.isupper() for c in r),
        lambda p: "Your entire response must be in lowercase letters, with no capitals at all.",
        _no_params,
    ),
    "uppercase": _Spec(
        {},
        lambda r, p: not any(c.islower() for c in r),
        lambda p: "Your entire response must be in capital letters, with no lowercase at all.",
        _no_params,
    ),
    "max_words": _Spec(
        {"n": "count"},
        lambda r, p: count_words(r) <= p["n"],
        lambda p: f"Your response must contain at most {_plural(p['n'], 'word')}.",
        *_counts((60, 80, 100, 150, 200, 300)),
    ),
    "min_words": _Spec(
        {"n": "count"},
        lambda r, p: count_words(r) >= p["n"],
        lambda p: f"Your response must contain at least {_plural(p['n'], 'word')}.",
        *_counts((20, 40, 60, 100, 150)),
    ),
    "max_sentences": _Spec(
        {"n": "count"},
        lambda r, p: count_sentences(r) <= p["n"],
        lambda p: f"Your response must contain at most {_plural(p['n'], 'sentence')}.",
        *_counts((5, 6, 8, 10, 12)),
    ),
    "include_keywords": _Spec(
        {"keywords": "words"},
        lambda r, p: all(_has_word(r, w) for w in p["keywords"]),
        lambda p: (
            f"Include the {'keyword' if len(p['keywords']) == 1 else 'keywords'} "
            f"{_quoted_list(p['keywords'], 'and')} in your response."
        ),
        *_words(KEYWORDS),
    ),
    "exclude_keywords": _Spec(
        {"keywords": "words"},
        lambda r, p: not any(_has_word(r, w) for w in p["keywords"]),
        lambda p: (
            f"Do not use the {'word' if len(p['keywords']) == 1 else 'words'} "
            f"{_quoted_list(p['keywords'], 'or')} anywhere in your response."
        ),
        *_words(EXCLUDED_WORDS),
    ),
    "start_with": _Spec(
        {"phrase": "text"},
        lambda r, p: r.lstrip().startswith(p["phrase"]),
        lambda p: f'Begin your response with the exact phrase "{p["phrase"]}".',
        *_phrases(START_PHRASES),
        opening=lambda p: p["phrase"],
    ),
    "end_with": _Spec(
        {"phrase": "text"},
        lambda r, p: r.rstrip().endswith(p["phrase"]),
        lambda p: (
            f'Finish your response with the exact phrase "{p["phrase"]}" '
            "and write nothing after it."
        ),
        *_phrases(END_PHRASES),
    ),
    "bullet_count": _Spec(
        {"n": "count"},
        lambda r, p: len(_BULLET.findall(r)) == p["n"],
        lambda p: (
            f"Your response must contain exactly {_plural(p['n'], 'bullet point')}, "
            'each on its own line starting with "- ".'
        ),
        *_counts((2, 3, 4, 5)),
        opening=lambda p: "-",
    ),
    "paragraph_count": _Spec(
        {"n": "count"},
        lambda r, p: sum(1 for part in _PARAGRAPH_BREAK.split(r.strip()) if part.strip()) == p["n"],
        lambda p: (
            f"Your response must have exactly {_plural(p['n'], 'paragraph')}, "
            "separated by blank lines."
        ),
        *_counts((2, 3, 4)),
    ),
    "json_format": _Spec(
        {},
        lambda r, p: _is_json(r),
        lambda p: "Your entire response must be valid JSON: a single object or array.",
        _no_params,
        opening=lambda p: "{",
    ),
    "no_commas": _Spec(
        {},
        lambda r, p: "," not in r,
        lambda p: "Do not use any commas in your response.",
        _no_params,
    ),
    "wrap_in_quotes": _Spec(
        {},
        lambda r, p: _is_quoted(r),
        lambda p: "Wrap your entire response in double quotation marks.",
        _no_params,
        opening=lambda p: '"',
    ),
    "title": _Spec(
        {},
        lambda r, p: _has_title(r),
        lambda p: (
            "Your response must include a title wrapped in double angular brackets, "
            "such as <<My Title>>."
        ),
        _no_params,
        opening=lambda p: "<<",
    ),
    "postscript": _Spec(
        {},
        lambda r, p: _POSTSCRIPT.search(r) is not None,
        lambda p: 'Add a postscript to your response on its own line starting with "P.S.".',
        _no_params,
    ),
    "numbered_steps": _Spec(
        {"n": "count"},
        lambda r, p: _steps_in_order(r, p["n"]),
        lambda p: (
            f"Your response must contain exactly {_plural(p['n'], 'numbered step')}, "
            'one per line, numbered "1.", "2." and so on.'
        ),
        *_counts((3, 4, 5)),
        opening=lambda p: "1.",
    ),
}


# ------------------------------------------------------------------ validation


def _validate_param(kind: str, name: str, tag: str, value: Any) -> None:
    where = f"constraint {kind!r} param {name!r}"
    if tag == "count":
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{where} must be a positive integer, got {value!r}")
    elif tag == "text":
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{where} must be a non-empty string, got {value!r}")
    elif not (
        isinstance(value, list)
        and value
        and all(isinstance(word, str) and word.strip() for word in value)
    ):
        raise ValueError(f"{where} must be a non-empty list of non-empty strings, got {value!r}")


def _validate(kind: Any, params: Any) -> None:
    if kind not in _SPECS:
        raise ValueError(f"unknown constraint kind {kind!r}; expected one of {', '.join(KINDS)}")
    if not isinstance(params, dict):
        raise ValueError(f"constraint {kind!r} params must be a dict, got {type(params).__name__}")
    expected = _SPECS[kind].params
    if set(params) != set(expected):
        raise ValueError(
            f"constraint {kind!r} expects params {sorted(expected)}, got {sorted(params)}"
        )
    for name, tag in expected.items():
        _validate_param(kind, name, tag, params[name])


# ------------------------------------------------------------------ public API


@dataclass(frozen=True)
class Constraint:
    """One verifiable constraint on a response: a kind plus its parameters."""

    kind: str
    params: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        _validate(self.kind, self.params)
        copied = {k: list(v) if isinstance(v, list) else v for k, v in self.params.items()}
        object.__setattr__(self, "params", copied)

    def describe(self) -> str:
        """One English sentence stating the constraint, to append to an instruction."""
        return _SPECS[self.kind].describe(self.params)

    def check(self, response: str) -> bool:
        """True when `response` satisfies the constraint; blank responses never do."""
        if not response.strip():
            return False
        return _SPECS[self.kind].check(response, self.params)

    def opening(self) -> str | None:
        """The text every response meeting the constraint begins with ('<<' for a title,
        the phrase of start_with), or None when a passing response may begin anyhow."""
        spec = _SPECS[self.kind]
        return spec.opening(self.params) if spec.opening else None

    def to_dict(self) -> dict:
        """JSON-serialisable form: {"kind": ..., "params": ...}."""
        params = {k: list(v) if isinstance(v, list) else v for k, v in self.params.items()}
        return {"kind": self.kind, "params": params}


def constraint_from_dict(data: dict) -> Constraint:
    """Build a Constraint from to_dict() output; raise ValueError on bad input."""
    if not isinstance(data, dict):
        raise ValueError(f"constraint must be a dict, got {type(data).__name__}")
    if "kind" not in data:
        raise ValueError("constraint dict is missing 'kind'")
    extra = set(data) - {"kind", "params"}
    if extra:
        raise ValueError(f"constraint dict has unexpected keys {sorted(extra)}")
    return Constraint(data["kind"], data.get("params", {}))


def _sample_kinds(rng: random.Random, count: int) -> list[str]:
    chosen: list[str] = []
    for _ in range(count):
        options = [k for k in KINDS if all(compatible(k, c) for c in chosen)]
        if not options:
            raise ValueError(f"could not find {count} mutually compatible constraint kinds")
        chosen.append(rng.choice(options))
    return chosen


def sample_constraints(rng: random.Random, count: int) -> list[Constraint]:
    """Draw `count` mutually compatible constraints, all randomness taken from `rng`."""
    if count < 0:
        raise ValueError(f"count must be non-negative, got {count}")
    kinds = _sample_kinds(rng, count)
    result = []
    for kind in kinds:
        others = frozenset(kinds) - {kind}
        result.append(Constraint(kind, _SPECS[kind].sample(rng, others)))
    return result


def instruction_with_constraints(instruction: str, constraints: list[dict]) -> str:
    """The instruction text with each constraint's sentence appended (as a model sees it)."""
    sentences = [constraint_from_dict(c).describe() for c in constraints]
    return " ".join([instruction.strip(), *sentences])


# where two constraints each fix how a response begins, the first of these kinds decides
OPENING_ORDER = ("start_with", "wrap_in_quotes", "json_format", "title", "numbered_steps",
                 "bullet_count")


def response_opening(constraints: list[dict]) -> str:
    """How a response to an instruction with `constraints` may begin so that it can meet them
    (a generation scaffold: "<<" for a title, the phrase of start_with); "" when none fixes it."""
    built = sorted((constraint_from_dict(c) for c in constraints),
                   key=lambda c: OPENING_ORDER.index(c.kind) if c.kind in OPENING_ORDER
                   else len(OPENING_ORDER))
    return next((opening for c in built if (opening := c.opening()) is not None), "")


def hindsight_candidates(kinds_in_use: frozenset[str] = frozenset()) -> list[Constraint]:
    """Every constraint the catalogue states with one choice from its grid (each count the
    sampler uses, each keyword alone, each phrase), compatible with `kinds_in_use`: what
    hindsight relabelling may attach to an instruction after its responses are sampled."""
    return [Constraint(kind, params) for kind in KINDS
            if all(compatible(kind, other) for other in kinds_in_use)
            for params in _SPECS[kind].grid]


def hindsight_constraints(chosen: str, others: list[str], stated: list[Constraint],
                          rng: random.Random, max_constraints: int = 3,
                          unmet_by: tuple[str, ...] = ()) -> list[Constraint] | None:
    """The constraints a task restated in hindsight names: the stated ones `chosen` meets, when
    another text fails one of them; otherwise those plus one catalogue constraint (a kind drawn
    uniformly, then its parameters) that `chosen` meets and another text fails. None when there
    is none. A catalogue constraint must also be failed by every text of `unmet_by` (a revision's
    draft: a critique names only what the draft gets wrong)."""
    kept = [c for c in stated if c.check(chosen)]
    if kept and any(not all(c.check(text) for c in kept) for text in others):
        return kept
    if len(kept) >= max_constraints:
        return None
    options = [c for c in hindsight_candidates(frozenset(c.kind for c in kept))
               if c.check(chosen) and any(not c.check(text) for text in others)
               and not any(c.check(text) for text in unmet_by)]
    if not options:
        return None
    kind = rng.choice(sorted({c.kind for c in options}))
    return kept + [rng.choice([c for c in options if c.kind == kind])]
