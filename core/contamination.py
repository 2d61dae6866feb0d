"""Contamination detection between stages.

- template: the tokenizer's chat-template state, chat markup in prompts and training records,
  EOS agreement between tokenizer and generation config, and a model-level probe of how much the
  chat template changes behaviour versus the raw house format.
- data: normalized 13-gram overlap (as in GPT-3's decontamination) between generated training
  text and every evaluation set in use; contaminated records are removed before training.
- exemplar leakage: outputs that copy few-shot exemplar text verbatim are excluded.

`apply_chat_template` appears here only to *measure* the template's effect in the probe.
"""
from __future__ import annotations

import csv
import gzip
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from core.errors import RunFailure, UsageError
from core.guards import TemplateGuard, chat_special_tokens, template_injected_text
from core.text import copies_exemplar

DEFAULT_N = 13
MIN_SHORT = 6  # evaluation items shorter than n tokens are matched whole, if at least this long
_TOKEN = re.compile(r"[a-z0-9]+")


def tokens(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


def ngrams(text: str, n: int = DEFAULT_N) -> set[tuple[str, ...]]:
    """Word n-grams of lower-cased alphanumeric tokens (punctuation and case ignored)."""
    words = tokens(text)
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


@dataclass
class NgramIndex:
    """Every n-gram of the evaluation texts, mapped to where it came from."""

    n: int = DEFAULT_N
    grams: dict[tuple[str, ...], tuple[str, str]] = field(default_factory=dict)
    short: dict[tuple[str, ...], tuple[str, str]] = field(default_factory=dict)
    sources: dict[str, int] = field(default_factory=dict)

    def add(self, source: str, item_id: str, text: str) -> None:
        words = tokens(text)
        if MIN_SHORT <= len(words) < self.n:  # too short for an n-gram: match it whole
            self.short.setdefault(tuple(words), (source, item_id))
        for gram in ngrams(text, self.n):
            self.grams.setdefault(gram, (source, item_id))
        self.sources[source] = self.sources.get(source, 0) + 1

    def first_hit(self, text: str) -> tuple[str, str, str] | None:
        """(source, item id, the shared text) for the first overlap, or None."""
        words = tokens(text)
        lengths = sorted({self.n, *(len(k) for k in self.short)}, reverse=True)
        for size in lengths:
            table = self.grams if size == self.n else self.short
            for i in range(len(words) - size + 1):
                window = tuple(words[i : i + size])
                if window in table:
                    source, item_id = table[window]
                    return source, item_id, " ".join(window)
        return None


# evaluation sets -------------------------------------------------------------------------------

EVAL_FILES = {
    "ifeval": "ifeval/input_data.jsonl",
    "ailuminate": "ailuminate/airr_official_1.0_demo_en_us_prompt_set_release.csv",
    "hh-rlhf-harmless-test": "hh-rlhf-harmless/harmless-base-test.jsonl.gz",
}
MAX_PROBLEMS_PER_FILE = 5


class DataSetError(UsageError):
    """An external evaluation set is missing or cannot be read (every problem, by file and
    line)."""


def load_eval_texts(data_dir: Path) -> dict[str, list[tuple[str, str]]]:
    """{set name: [(item id, text)]} for every set of EVAL_FILES under `data_dir`. A missing
    file, a line that is not JSON, a missing field, a bad CSV header or row, text that is not
    UTF-8 or a truncated gzip raises one DataSetError naming every problem (file, line,
    field) and how to fix it."""
    sets: dict[str, list[tuple[str, str]]] = {}
    problems: list[str] = []
    readers = {"ifeval": _read_ifeval, "ailuminate": _read_ailuminate,
               "hh-rlhf-harmless-test": _read_harmless}
    for name, rel in EVAL_FILES.items():
        path = data_dir / rel
        if not path.is_file():
            problems.append(f"{path}: missing")
            continue
        items, found = readers[name](path)
        sets[name] = items
        problems += found[:MAX_PROBLEMS_PER_FILE]
    if problems:
        raise DataSetError(
            f"the evaluation data sets under {data_dir} cannot be used:\n  - "
            + "\n  - ".join(problems)
            + "\nRestore the files (see ../shared/data/README.md), pass --data-dir with a "
              "complete copy, or --no-eval-sets to run without them (recorded in the run).")
    return sets


def _json_lines(path: Path, lines, fields_: tuple[str, ...]) -> tuple[list[tuple[int, dict]], list[str]]:
    """(line number, record) for each non-blank line that is a JSON object with `fields_`."""
    rows, problems = [], []
    try:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                problems.append(f"{path}:{number}: not a JSON line ({error.msg})")
                continue
            missing = [f for f in fields_ if not isinstance(record, dict) or f not in record]
            if missing:
                problems.append(f"{path}:{number}: no field {missing[0]!r}")
                continue
            rows.append((number, record))
    except UnicodeDecodeError as error:
        problems.append(f"{path}: not UTF-8 text (byte {error.start} of a block)")
    except (EOFError, gzip.BadGzipFile, OSError) as error:
        problems.append(f"{path}: cannot be decompressed ({error}); the file is truncated "
                        f"or not gzip")
    return rows, problems


def _read_ifeval(path: Path) -> tuple[list[tuple[str, str]], list[str]]:
    with open(path, encoding="utf-8") as handle:
        rows, problems = _json_lines(path, handle, ("key", "prompt"))
    return [(str(r["key"]), r["prompt"]) for _, r in rows], problems


def _read_harmless(path: Path) -> tuple[list[tuple[str, str]], list[str]]:
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        rows, problems = _json_lines(path, handle, ("chosen",))
    return [(str(i), first_human_turn(r["chosen"])) for i, (_, r) in enumerate(rows)], problems


def _read_ailuminate(path: Path) -> tuple[list[tuple[str, str]], list[str]]:
    items, problems = [], []
    columns = ("release_prompt_id", "prompt_text")
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            lacking = [c for c in columns if c not in (reader.fieldnames or [])]
            if lacking:
                return [], [f"{path}: the header has no column {lacking[0]!r} (columns: "
                            f"{', '.join(reader.fieldnames or [])})"]
            for row in reader:
                if not row.get("release_prompt_id") or row.get("prompt_text") is None:
                    problems.append(f"{path}:{reader.line_num}: a row without "
                                    f"release_prompt_id or prompt_text")
                    continue
                items.append((row["release_prompt_id"], row["prompt_text"]))
    except UnicodeDecodeError as error:
        problems.append(f"{path}: not UTF-8 text (byte {error.start} of a block)")
    except csv.Error as error:
        problems.append(f"{path}: not valid CSV ({error})")
    return items, problems


def eval_set_summary(data_dir: Path) -> str:
    """"ifeval 541, ailuminate 1200, ..." after a full, strict read (DataSetError otherwise)."""
    return ", ".join(f"{name} {len(items)}" for name, items in load_eval_texts(data_dir).items())


def first_human_turn(transcript: str) -> str:
    """The first human turn of an HH-RLHF transcript."""
    text = transcript.split("\n\nHuman:", 1)[-1]
    return text.split("\n\nAssistant:", 1)[0].strip()


def build_index(eval_sets: dict[str, list[tuple[str, str]]], n: int = DEFAULT_N) -> NgramIndex:
    index = NgramIndex(n)
    for source, items in eval_sets.items():
        for item_id, text in items:
            index.add(source, item_id, text)
    return index


def probe_texts() -> list[tuple[str, str]]:
    """The baseline probes' own content (not the shared constraint sentences)."""
    from core.suites.baseline import CAPABILITIES, load_probes

    probes, _, _ = load_probes()
    fields = ("instruction", "question", "prompt", "response", "response_a", "response_b",
              "critique", "example_revision")
    return [(p.id, p.spec[f]) for p in probes for f in fields if f in p.spec and
            p.capability in CAPABILITIES]


@dataclass(frozen=True)
class Protected:
    """What one stage's training records must not contain: its few-shot exemplar texts, its
    held-out items (id, text), and the shared evaluation sets under `data_dir` (None: none)."""

    exemplars: list[str]
    heldout: list[tuple[str, str]]
    data_dir: Path | None


def evaluation_index(data_dir: Path | None, heldout: list[tuple[str, str]],
                     n: int = DEFAULT_N) -> NgramIndex:
    """Every evaluation text in use: the shared sets that exist under `data_dir`, the stage's
    held-out split, and the baseline probes."""
    sets = load_eval_texts(data_dir) if data_dir else {}
    sets["heldout"] = heldout
    sets["baseline-probes"] = probe_texts()
    return build_index(sets, n)


# data + exemplar checks on training records ----------------------------------------------------

@dataclass(frozen=True)
class Finding:
    record: int  # 0-based line in the records list
    check: str  # "data" | "exemplar" | "template"
    field: str
    source: str
    item: str
    evidence: str


def check_records(records: list[dict], index: NgramIndex, exemplars: list[str],
                  guard: TemplateGuard) -> list[Finding]:
    """Every contamination finding in training records (prompt, chosen, rejected)."""
    findings = []
    for i, record in enumerate(records):
        for name in ("prompt", "chosen", "rejected"):
            text = record[name]
            markup = guard.find(text)
            if markup:
                findings.append(Finding(i, "template", name, "chat markup", "-", markup[0].marker))
            hit = index.first_hit(text)
            if hit:
                findings.append(Finding(i, "data", name, hit[0], hit[1], hit[2]))
            if copies_exemplar(text, exemplars):
                findings.append(Finding(i, "exemplar", name, "exemplar pool", "-", text[:80]))
    return findings


class ContaminationError(RunFailure):
    """A contamination check failed and no override was given."""


def decontaminate(records: list[dict], index: NgramIndex, exemplars: list[str],
                  guard: TemplateGuard, template: dict, allow: bool) -> tuple[list[dict], list[Finding], dict]:
    """(clean records, findings, summary). Data and exemplar findings remove the record;
    template findings (markup, EOS disagreement) stop the stage unless `allow`."""
    findings = check_records(records, index, exemplars, guard)
    problems = template_problems(template) + [
        f"chat markup {f.evidence!r} in record {f.record} field {f.field}"
        for f in findings if f.check == "template"]
    if problems and not allow:
        raise ContaminationError(
            "template contamination check failed:\n  - " + "\n  - ".join(problems)
            + "\nFix the cause, or rerun with --allow-contamination to train anyway (the "
              "override is recorded in the run's config.yaml).")
    removed = {f.record for f in findings}
    clean = [r for i, r in enumerate(records) if i not in removed]
    counts = {check: sum(1 for f in findings if f.check == check)
              for check in ("data", "exemplar", "template")}
    summary = {"records": len(records), "removed": len(removed), "kept": len(clean),
               "findings": counts, "n": index.n, "eval_sets": index.sources,
               "template": template, "template_problems": problems, "overridden": bool(problems)}
    return clean, findings, summary


def write_findings_tsv(path: Path, findings: list[Finding], records: list[dict]) -> None:
    """One row per finding: record, check, field, source, item, evidence, task id."""
    from core.io import atomic_write_text

    rows = ["record\tcheck\tfield\tsource\titem\tevidence\ttask_id"]
    for f in findings:
        evidence = f.evidence.replace("\t", " ").replace("\n", " ")
        task = records[f.record].get("task_id", "")
        rows.append(f"{f.record}\t{f.check}\t{f.field}\t{f.source}\t{f.item}\t{evidence}\t{task}")
    atomic_write_text(path, "\n".join(rows) + "\n")


# template state --------------------------------------------------------------------------------

def template_state(tokenizer, generation_config) -> dict:
    """What the tokenizer's template would inject, and whether EOS agrees across configs."""
    configured = generation_config.eos_token_id if generation_config is not None else None
    configured_ids = [configured] if isinstance(configured, int) else list(configured or [])
    eos_ok = tokenizer.eos_token_id is not None and (
        not configured_ids or tokenizer.eos_token_id in configured_ids)
    return {
        "has_chat_template": bool(tokenizer.chat_template),
        "template_injects": template_injected_text(tokenizer),
        "chat_special_tokens": chat_special_tokens(tokenizer),
        "eos": {"tokenizer": tokenizer.eos_token, "tokenizer_id": tokenizer.eos_token_id,
                "generation_config_ids": configured_ids, "consistent": eos_ok},
    }


def template_problems(state: dict) -> list[str]:
    """Failures in the template state (a chat template existing is reported, not a failure)."""
    eos = state["eos"]
    if eos["consistent"]:
        return []
    return [f"EOS disagreement: the tokenizer ends sequences with {eos['tokenizer']!r} "
            f"(id {eos['tokenizer_id']}) but generation_config.eos_token_id is "
            f"{eos['generation_config_ids']}; DPO appends the tokenizer's EOS to every chosen "
            f"response, so a trained model would never emit the token generation stops on. Fix "
            f"generation_config.json or the tokenizer's eos_token in the model directory."]


def chat_template_probe(backend, prompts: list[str], max_new_tokens: int = 32) -> dict:
    """How much wrapping the same requests in the tokenizer's chat template changes behaviour:
    mean KL between first-token distributions and the share of greedy outputs that differ."""
    tokenizer = backend.tokenizer
    if not tokenizer.chat_template:
        return {"has_chat_template": False,
                "finding": "no chat template: the raw house format is the only format"}
    from core.backend import SamplingSettings
    from core.prompting import RESPONSE_STOPS, house_prompt

    raw = [house_prompt(p) for p in prompts]
    templated = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                               add_generation_prompt=True) for p in prompts]
    p_raw, p_chat = backend.next_token_logprobs(raw), backend.next_token_logprobs(templated)
    kl = float((p_raw.exp() * (p_raw - p_chat)).sum(-1).mean())
    greedy = SamplingSettings(0.0, 1.0, max_new_tokens, RESPONSE_STOPS)
    out_raw = backend.generate(raw, greedy, [0] * len(raw))
    out_chat = backend.generate(templated, greedy, [0] * len(raw))
    differ = sum(a.text.strip() != b.text.strip() for a, b in zip(out_raw, out_chat))
    eos_chat = sum(c.finish == "eos" for c in out_chat)
    return {
        "has_chat_template": True, "probes": len(prompts), "mean_first_token_kl": kl,
        "greedy_outputs_differ": differ, "chat_outputs_ending_in_eos": eos_chat,
        "finding": (f"the chat template changes behaviour (KL {kl:.3g}, {differ}/{len(prompts)} "
                    f"greedy outputs differ): the model reacts to chat markup, which is why "
                    f"base-model prompts never carry it") if kl > 0.05 or differ else
                   "the chat template barely changes behaviour",
    }
