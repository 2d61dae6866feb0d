"""Offline IFEval scorer (Zhou et al. 2023, arXiv 2311.07911).

The project's own implementation of the paper's 25 verifiable instruction types, written
from the published definitions. Nothing here touches the network: sentences are split by
a small rule-based splitter and languages are detected by langdetect with a fixed seed.

Strict scoring checks the response as given; loose scoring (paper section 3) passes an
instruction when any of eight transformed responses passes strictly: the response, it
without its first line, without its last line, without both, and each of those four with
every "*" removed. Empty (whitespace-only) responses and variants never pass.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from langdetect import DetectorFactory, detect
from langdetect.lang_detect_exception import LangDetectException

from core.errors import UsageError
from core.stats import rate

Checker = Callable[[str, dict, str], bool]

CONSTRAINED_ANSWERS = ("My answer is yes.", "My answer is no.", "My answer is maybe.")
_ABBREVIATIONS = frozenset({"mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "vs", "e.g", "i.e",
                            "inc", "ltd", "fig", "approx", "dept", "est", "mt", "cf"})
_TERMINATOR = re.compile(r"[.!?\u3002\uff01\uff1f]+[\"'\u201d\u2019)\]]*(?=\s|$)")
_WORD = re.compile(r"\w+")
_HIGHLIGHT = re.compile(r"(\*\*|\*)(?=[^\s*])[^\n*]*?[^\s*]\1")
_PLACEHOLDER = re.compile(r"\[[^\[\]\n]+\]")
_BULLET = re.compile(r"^[ \t]*[*-][ \t]+\S", re.MULTILINE)
_TITLE = re.compile(r"<<[^\n<>]*\S[^\n<>]*>>")
_JSON_FENCE = re.compile(r"^```(?:json)?[ \t]*\n?(.*?)\n?[ \t]*```$", re.DOTALL | re.IGNORECASE)


@dataclass(frozen=True)
class IFEvalItem:
    """One IFEval prompt with its instructions and their keyword arguments."""

    key: int
    prompt: str
    instruction_ids: tuple[str, ...]
    kwargs: tuple[dict, ...]


# ---------------------------------------------------------------- loading

class MissingDataError(UsageError, FileNotFoundError):
    """An evaluation data file the command needs is not where it was told to look."""


def load_ifeval(path: str | Path, limit: int | None = None) -> list[IFEvalItem]:
    """Read IFEval's input_data.jsonl; null kwargs are dropped, missing kwargs become {}."""
    path = Path(path)
    if not path.is_file():
        raise MissingDataError(
            f"IFEval data not found at {path}. Fetch it on a connected machine from Hugging Face "
            f"(dataset google/IFEval, e.g. datasets.load_dataset('google/IFEval', split='train')"
            f".to_json('input_data.jsonl')) and copy it to {path}.")
    items: list[IFEvalItem] = []
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if limit is not None and len(items) >= limit:
                break
            if line.strip():
                items.append(_parse_row(json.loads(line)))
    return items


def _parse_row(row: dict) -> IFEvalItem:
    ids = tuple(row["instruction_id_list"])
    raw = row.get("kwargs") or [{}] * len(ids)
    if len(raw) != len(ids):
        raise ValueError(f"IFEval row {row.get('key')}: {len(ids)} instructions, {len(raw)} kwargs")
    kwargs = tuple({k: v for k, v in (kw or {}).items() if v is not None} for kw in raw)
    return IFEvalItem(key=int(row["key"]), prompt=row["prompt"], instruction_ids=ids, kwargs=kwargs)


# ---------------------------------------------------------------- shared helpers

def _arg(kwargs: dict, name: str) -> Any:
    value = kwargs.get(name)
    if value is None:
        raise ValueError(f"IFEval instruction needs kwarg {name!r} (got {sorted(kwargs)})")
    return value


def _compare(count: int, relation: str, threshold: Any) -> bool:
    """'less than' is count < N; 'at least' is count >= N."""
    relation = relation.strip().lower()
    if relation == "less than":
        return count < int(threshold)
    if relation == "at least":
        return count >= int(threshold)
    raise ValueError(f"unknown IFEval relation {relation!r}")


def _words(text: str) -> list[str]:
    """Word tokens: maximal runs of \\w characters."""
    return _WORD.findall(text)


def _whole_word(word: str) -> re.Pattern:
    return re.compile(rf"(?<!\w){re.escape(word.strip())}(?!\w)", re.IGNORECASE)


def split_sentences(text: str) -> list[str]:
    """Rule-based splitter: line breaks and terminal punctuation followed by space end a
    sentence, except after common abbreviations and single-letter initials."""
    sentences: list[str] = []
    for line in text.split("\n"):
        start = 0
        for match in _TERMINATOR.finditer(line):
            if _is_abbreviation(line[start:match.start()], match.group(), line[match.end():]):
                continue
            sentences.append(line[start:match.end()])
            start = match.end()
        sentences.append(line[start:])
    return [s.strip() for s in sentences if _WORD.search(s)]


def _is_abbreviation(before: str, terminator: str, after: str) -> bool:
    """A lone "." after a known abbreviation or an initial, or after a dotted token such as
    "p.m" when the next word is lower-case, does not end a sentence."""
    if terminator != ".":
        return False
    tokens = before.split()
    if not tokens:
        return False
    token = tokens[-1].lstrip("([\"'").lower()
    if token in _ABBREVIATIONS or (len(token) == 1 and token.isalpha()):
        return True
    return "." in token and after.strip()[:1].islower()


def detect_language(text: str) -> str | None:
    """ISO code from langdetect with DetectorFactory seeded to 0; None when undetectable."""
    DetectorFactory.seed = 0
    try:
        return detect(text)
    except LangDetectException:
        return None


def _same_language(detected: str | None, expected: str) -> bool:
    if detected is None:
        return False
    return detected.split("-")[0].lower() == expected.split("-")[0].lower()


def _paragraphs(text: str, separator: str) -> list[str] | None:
    """Split on `separator` (a regex); empty leading/trailing pieces are dropped, an empty
    piece in the middle makes the split invalid (None)."""
    pieces = [p.strip() for p in re.split(separator, text)]
    while pieces and not pieces[0]:
        pieces.pop(0)
    while pieces and not pieces[-1]:
        pieces.pop()
    return None if any(not p for p in pieces) else pieces


# ---------------------------------------------------------------- checkers (text, kwargs, prompt)

def _keywords_existence(text: str, kw: dict, prompt: str) -> bool:
    return all(_whole_word(word).search(text) for word in _arg(kw, "keywords"))


def _keywords_frequency(text: str, kw: dict, prompt: str) -> bool:
    count = len(_whole_word(_arg(kw, "keyword")).findall(text))
    return _compare(count, _arg(kw, "relation"), _arg(kw, "frequency"))


def _forbidden_words(text: str, kw: dict, prompt: str) -> bool:
    return not any(_whole_word(word).search(text) for word in _arg(kw, "forbidden_words"))


def _letter_frequency(text: str, kw: dict, prompt: str) -> bool:
    count = text.lower().count(str(_arg(kw, "letter")).lower())
    return _compare(count, _arg(kw, "let_relation"), _arg(kw, "let_frequency"))


def _response_language(text: str, kw: dict, prompt: str) -> bool:
    return _same_language(detect_language(text), _arg(kw, "language"))


def _number_sentences(text: str, kw: dict, prompt: str) -> bool:
    return _compare(len(split_sentences(text)), _arg(kw, "relation"), _arg(kw, "num_sentences"))


def _number_paragraphs(text: str, kw: dict, prompt: str) -> bool:
    paragraphs = _paragraphs(text, r"\*{3,}")
    return paragraphs is not None and len(paragraphs) == int(_arg(kw, "num_paragraphs"))


def _number_words(text: str, kw: dict, prompt: str) -> bool:
    return _compare(len(_words(text)), _arg(kw, "relation"), _arg(kw, "num_words"))


def _nth_paragraph_first_word(text: str, kw: dict, prompt: str) -> bool:
    paragraphs = [p.strip() for p in re.split(r"\n[ \t]*\n", text) if p.strip()]
    nth = int(_arg(kw, "nth_paragraph"))
    if len(paragraphs) != int(_arg(kw, "num_paragraphs")) or not 1 <= nth <= len(paragraphs):
        return False
    first = re.sub(r"^\W+|\W+$", "", paragraphs[nth - 1].split()[0]).lower()
    return first == str(_arg(kw, "first_word")).strip().lower()


def _number_placeholders(text: str, kw: dict, prompt: str) -> bool:
    return len(_PLACEHOLDER.findall(text)) >= int(_arg(kw, "num_placeholders"))


def _postscript(text: str, kw: dict, prompt: str) -> bool:
    pattern = "".join(r"\.\s?" if ch == "." else r"\s*" if ch.isspace() else re.escape(ch)
                      for ch in str(_arg(kw, "postscript_marker")).strip())
    return re.search(rf"^\s*{pattern}", text, re.MULTILINE | re.IGNORECASE) is not None


def _number_bullet_lists(text: str, kw: dict, prompt: str) -> bool:
    return len(_BULLET.findall(text)) == int(_arg(kw, "num_bullets"))


def _constrained_response(text: str, kw: dict, prompt: str) -> bool:
    return any(answer in text for answer in CONSTRAINED_ANSWERS)


def _number_highlighted_sections(text: str, kw: dict, prompt: str) -> bool:
    count = sum(1 for _ in _HIGHLIGHT.finditer(text))
    return count >= int(_arg(kw, "num_highlights"))


def _multiple_sections(text: str, kw: dict, prompt: str) -> bool:
    marker = re.compile(rf"(?<!\w){re.escape(str(_arg(kw, 'section_spliter')).strip())}\s*\d+")
    return len(marker.findall(text)) == int(_arg(kw, "num_sections"))


def _json_format(text: str, kw: dict, prompt: str) -> bool:
    body = text.strip()
    fenced = _JSON_FENCE.match(body)
    if fenced:
        body = fenced.group(1)
    try:
        json.loads(body)
    except ValueError:
        return False
    return True


def _title(text: str, kw: dict, prompt: str) -> bool:
    return _TITLE.search(text) is not None


def _two_responses(text: str, kw: dict, prompt: str) -> bool:
    parts = _paragraphs(text, re.escape("******"))
    return parts is not None and len(parts) == 2 and parts[0] != parts[1]


def _repeat_prompt(text: str, kw: dict, prompt: str) -> bool:
    target = kw.get("prompt_to_repeat") or prompt
    return text.strip().lower().startswith(target.strip().lower())


def _end_checker(text: str, kw: dict, prompt: str) -> bool:
    ending = text.strip().strip("\"\u201c\u201d").strip().lower()
    return ending.endswith(str(_arg(kw, "end_phrase")).strip().lower())


def _quotation(text: str, kw: dict, prompt: str) -> bool:
    body = text.strip()
    return len(body) >= 2 and (body[0], body[-1]) in {('"', '"'), ("\u201c", "\u201d")}


def _capital_word_frequency(text: str, kw: dict, prompt: str) -> bool:
    count = sum(1 for word in _words(text) if word.isupper())
    return _compare(count, _arg(kw, "capital_relation"), _arg(kw, "capital_frequency"))


def _english_capital(text: str, kw: dict, prompt: str) -> bool:
    return text.isupper() and _same_language(detect_language(text.lower()), "en")


def _english_lowercase(text: str, kw: dict, prompt: str) -> bool:
    return text.islower() and _same_language(detect_language(text), "en")


def _no_comma(text: str, kw: dict, prompt: str) -> bool:
    return "," not in text and "\uff0c" not in text


CHECKERS: dict[str, Checker] = {
    "keywords:existence": _keywords_existence,
    "keywords:frequency": _keywords_frequency,
    "keywords:forbidden_words": _forbidden_words,
    "keywords:letter_frequency": _letter_frequency,
    "language:response_language": _response_language,
    "length_constraints:number_sentences": _number_sentences,
    "length_constraints:number_paragraphs": _number_paragraphs,
    "length_constraints:number_words": _number_words,
    "length_constraints:nth_paragraph_first_word": _nth_paragraph_first_word,
    "detectable_content:number_placeholders": _number_placeholders,
    "detectable_content:postscript": _postscript,
    "detectable_format:number_bullet_lists": _number_bullet_lists,
    "detectable_format:constrained_response": _constrained_response,
    "detectable_format:number_highlighted_sections": _number_highlighted_sections,
    "detectable_format:multiple_sections": _multiple_sections,
    "detectable_format:json_format": _json_format,
    "detectable_format:title": _title,
    "combination:two_responses": _two_responses,
    "combination:repeat_prompt": _repeat_prompt,
    "startend:end_checker": _end_checker,
    "startend:quotation": _quotation,
    "change_case:capital_word_frequency": _capital_word_frequency,
    "change_case:english_capital": _english_capital,
    "change_case:english_lowercase": _english_lowercase,
    "punctuation:no_comma": _no_comma,
}
INSTRUCTION_IDS: tuple[str, ...] = tuple(CHECKERS)


# ---------------------------------------------------------------- scoring

def _checker(instruction_id: str) -> Checker:
    try:
        return CHECKERS[instruction_id]
    except KeyError:
        raise ValueError(f"unknown IFEval instruction id {instruction_id!r}") from None


def check_instruction(instruction_id: str, kwargs: dict, response: str, prompt: str) -> bool:
    """Strict check of one instruction; a whitespace-only response never passes."""
    checker = _checker(instruction_id)
    kwargs = {k: v for k, v in (kwargs or {}).items() if v is not None}
    return bool(response.strip()) and checker(response, kwargs, prompt)


def loose_variants(response: str) -> list[str]:
    """The eight loose-scoring variants of a response (paper section 3)."""
    lines = response.split("\n")
    base = [response, "\n".join(lines[1:]).strip(), "\n".join(lines[:-1]).strip(),
            "\n".join(lines[1:-1]).strip()]
    return base + [variant.replace("*", "") for variant in base]


def check_instruction_loose(instruction_id: str, kwargs: dict, response: str, prompt: str) -> bool:
    """Loose check: any of the eight variants passes strictly."""
    return any(check_instruction(instruction_id, kwargs, variant, prompt)
               for variant in loose_variants(response))


def score_item(item: IFEvalItem, response: str) -> dict:
    """Per-instruction strict/loose results and prompt-level passes for one response."""
    pairs = list(zip(item.instruction_ids, item.kwargs))
    strict = [check_instruction(iid, kw, response, item.prompt) for iid, kw in pairs]
    loose = [check_instruction_loose(iid, kw, response, item.prompt) for iid, kw in pairs]
    return {"key": item.key, "instruction_ids": list(item.instruction_ids), "strict": strict,
            "loose": loose, "prompt_strict": all(strict), "prompt_loose": all(loose)}


def summarize(scores: list[dict]) -> dict:
    """Prompt- and instruction-level strict/loose rates (Wilson 95% CIs) and per-type strict rates."""
    strict = [ok for s in scores for ok in s["strict"]]
    loose = [ok for s in scores for ok in s["loose"]]
    return {
        "prompt_level_strict": rate(sum(s["prompt_strict"] for s in scores), len(scores)),
        "prompt_level_loose": rate(sum(s["prompt_loose"] for s in scores), len(scores)),
        "instruction_level_strict": rate(sum(strict), len(strict)),
        "instruction_level_loose": rate(sum(loose), len(loose)),
        "per_type": _per_type(scores),
    }


def _per_type(scores: list[dict]) -> dict:
    tally: dict[str, list[int]] = {}
    for s in scores:
        for iid, ok in zip(s.get("instruction_ids", ()), s["strict"]):
            counts = tally.setdefault(iid, [0, 0])
            counts[0] += int(ok)
            counts[1] += 1
    order = {iid: i for i, iid in enumerate(INSTRUCTION_IDS)}
    return {iid: rate(*tally[iid]) for iid in sorted(tally, key=lambda i: order.get(i, len(order)))}
