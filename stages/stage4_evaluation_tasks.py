"""Stage 4 - evaluation tasks.

The model learns to judge which of two responses better serves a request, and to say why in one
sentence, zero-shot, in the house format. Steps (each resumable, each marked done only when
complete):

1. tasks         Labelled pairs (a request and two responses, the better one known) from
                 earlier stages' check outcomes: for each scored task of stages 1-3 whose files
                 are present (their tasks.jsonl and scores.jsonl; EARLIER_STAGES names each
                 stage's pass field), a sample that passes every check against one that fails,
                 under the task's text as the request; then the pool's own labelled
                 pairs (so the stage runs alone); and, held-out only, pairs from the earlier
                 stages' held-out assessments: where a stage's input and its trained model
                 split on a held-out item's check, the passing output against the failing one
                 (outputs on another stage's held-out items never train). One pair per
                 request; pairs whose zero-shot prompt would not fit the profile's
                 `max_length` are dropped. Split by a hash of the normalized request:
                 `ctx.heldout` held-out pairs (the held-out-only ones first, core.split.top_up),
                 `ctx.limit` training pairs; training requests that nearly equal a held-out one
                 are dropped, then leakage is checked. Each pair becomes two judge tasks
                 (tasks.jsonl, kind "judge"), the better response shown first (label A) and
                 second (label B). With
                 `ctx.data_dir`, single-turn HH-RLHF harmless *test* pairs are picked by hash as
                 an extra held-out set: assessment only, never training (the file is an
                 evaluation set and decontamination indexes it).
2. verdicts      K verdicts per task (critique temperature, one line) from a few-shot completion
                 prompt: 3-4 pool exemplars, each rendered in a random order with the letters
                 balanced, answering "A. <reason>".
3. scores        Each verdict is parsed (first letter A/B followed by a non-letter; ties and
                 anything else do not parse), its letter checked against the task's label, and
                 its reason checked: present, non-degenerate, one finished sentence, not a copy
                 of either response.
4. pairs         Per task: chosen = a verdict with the right letter *for that order* and a good
                 reason; rejected = a wrong-letter verdict (preferred), else a right-letter one
                 whose reason is missing or degenerate. A verdict picks a *response*, so when an
                 order has no chosen (or no wrong verdict) of its own, a verdict written for the
                 other order of the same pair stands in with its letter mapped to the same
                 response - only when its reason holds in both orders (it names no position:
                 no "A"/"B", "first", "second"...); a verdict that holds in one order only is
                 never carried over. This keeps a position-biased model's data balanced: it says
                 "A" in both orders, so the better-second order has no right verdict of its own.
                 Verdicts that do not parse, carry chat markup or prompt scaffolding, or copy an
                 exemplar are never used; identical pairs are dropped. The training prompt is
                 the zero-shot house prompt: exemplars never reach it.
5. decontaminate Template state and EOS agreement; 13-gram overlap with every evaluation set and
                 with the held-out requests and responses; exemplar copies (core/lifecycle.py).
6. train         DPO on a LoRA.
7. merge         into a full-precision copy of the input model, with a parity check.
8. assess        input vs merged model on the held-out labelled pairs, both orders, zero-shot,
                 greedy: accuracy per order, accuracy in both orders (headline), the position-bias
                 gap (better-first minus better-second accuracy), parse and reason rates; the
                 same on the HH-RLHF held-out pairs when present; the baseline suite.
9. report        metrics.json and report.md; then DONE.

Steps 5-9 are the shared tail (core/stage.py, core/lifecycle.py); this module answers what only
stage 4 knows, in `STAGE` at the bottom.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import yaml

from core.assess import generate_greedy
from core.contamination import Protected
from core.context import StageContext
from core.errors import RunFailure, TooLittleDataError
from core.generation import GenRequest
from core.io import read_json, read_jsonl, write_jsonl
from core.pairs import group_by_task, same_text, shared_pair_problem, write_pairs
from core.prompting import RESPONSE_STOPS, draw, house_prompt
from core.records import (TASKS_FILE, Task, earlier_json, earlier_records, earlier_tasks,
                          read_tasks, write_tasks)
from core.sampling import few_shot_requests, sample_to_file
from core.split import top_up
from core.stage import Stage, StageSettings, Step, Work, WorkPlan, setting
from core.stats import rate
from core.text import (copies_exemplar, degenerate_reason, first_near_same, near_same, normalize,
                       rouge_l)

POOL_PATH = Path(__file__).with_name("pools") / "stage4.yaml"
HH_PATH = Path("hh-rlhf-harmless") / "harmless-base-test.jsonl.gz"
HH_SOURCE = "hh-rlhf-harmless-test"
VERDICT_STOPS: tuple[str, ...] = ("\n",) + RESPONSE_STOPS  # a verdict is one line
LETTERS = ("A", "B")  # a task's label: where the better response is shown


@dataclass(frozen=True)
class Stage4Settings(StageSettings):
    verdict_tokens: int = setting(64, "tokens left in the profile's max_length for the verdict "
                                      "after the prompt (longer labelled pairs are dropped)")
    hh_max_words: int = setting(80, "longest HH-RLHF response (in words) an assessment pair may "
                                    "show; keeps the assessment prompts short")


@dataclass(frozen=True)
class EarlierStage:
    """An earlier stage whose tasks (its tasks.jsonl: the request shown is `task.text`, also the
    dedup and leakage key) and check outcomes stage 4 reads. Its scores.jsonl holds `task_id`,
    `sample`, `text` and the boolean `passed_field`."""

    number: int
    passed_field: str


EARLIER_STAGES = (EarlierStage(1, "passed"), EarlierStage(2, "answers"), EarlierStage(3, "passed"))
TASK_TEMPLATE = (
    "Here is a request and two responses.\n\nRequest: {request}\n\nResponse A:\n{a}\n\n"
    "Response B:\n{b}\n\nWhich response serves the request better? Answer with A or B, then "
    "give the reason in one sentence."
)
SCAFFOLDING = re.compile(r"^(Task \d+:|Instruction:|Request:|Response( [AB])?:|Answer:|###)",
                         re.MULTILINE)
VERDICT = re.compile(r"^\(?([AB])\)?(?![A-Za-z0-9'])[\s.:,;!)\-\u2013\u2014]*(.*)$", re.DOTALL)
TIE = re.compile(r"^(?:(?:a|it's a|it is a)\s+)?(?:tie|draw)\b|^(?:both|neither|equal)",
                 re.IGNORECASE)
SENTENCE_BREAK = re.compile(r"[.!?][\"')\]]*\s+(?=[\"'(\[]?[A-Z0-9])")
SENTENCE_END = re.compile(r"[.!?][\"')\]]*$")
# A reason that names a position holds in its own order only.
POSITION = re.compile(r"\b(?:[AB]|(?i:first|second|former|latter))\b")


def load_pool() -> dict:
    """The project-written pool: verdict exemplars (shots) and labelled pairs (task material)."""
    return yaml.safe_load(POOL_PATH.read_text(encoding="utf-8"))


def exemplar_texts(pool: dict) -> list[str]:
    """Every shot string, for the exemplar-copy filter (labelled pairs are task data, not
    exemplars: they may appear in training prompts)."""
    return [e[field] for e in pool["verdict_exemplars"]
            for field in ("request", "better", "worse", "reason")]


# 1. tasks ----------------------------------------------------------------------------------------

def judge_text(request: str, a: str, b: str) -> str:
    """The judge task in words (the house prompt wraps it)."""
    return TASK_TEMPLATE.format(request=request.strip(), a=a.strip(), b=b.strip())


def ordered(pair: dict, label: str) -> tuple[str, str]:
    """(response A, response B) for a task whose label says where the better response is."""
    return (pair["better"], pair["worse"]) if label == "A" else (pair["worse"], pair["better"])


def labelled_id(key: str) -> str:
    return "l" + hashlib.sha256(normalize(key).encode()).hexdigest()[:10]


def response_problem(text: str, guard) -> str | None:
    """Why an earlier stage's sample cannot be shown to the judge (None when it can)."""
    if reason := degenerate_reason(text):
        return reason
    if not guard.is_clean(text):
        return "chat markup"
    if SCAFFOLDING.search(text):
        return "prompt scaffolding"
    return None


def pick_known_pair(samples: list[dict], passed_field: str, guard) -> tuple[dict, dict] | None:
    """(passer, failer) of one task: the first usable sample that passes every check and the
    first usable one that fails, with different texts; None when the label is not known."""
    usable = [s for s in sorted(samples, key=lambda s: s["sample"])
              if response_problem(s["text"], guard) is None]
    passer = next((s for s in usable if s[passed_field] is True), None)
    if passer is None:
        return None
    failer = next((s for s in usable if s[passed_field] is False
                   and same_text(s["text"]) != same_text(passer["text"])), None)
    return (passer, failer) if failer else None


def labelled_from_stage(run_dir: Path, stage: EarlierStage, guard) -> list[dict]:
    """Labelled pairs from an earlier stage's check outcomes (none when its files are absent)."""
    scores = earlier_records(run_dir, stage.number, "scores.jsonl", reader=4)
    tasks = earlier_tasks(run_dir, stage.number, reader=4)
    if scores is None or tasks is None:
        return []
    by_task = group_by_task(scores)
    pairs = []
    for task in tasks:
        known = pick_known_pair(by_task.get(task.id, []), stage.passed_field, guard)
        if known is None:
            continue
        better, worse = known
        pairs.append({"id": labelled_id(task.text), "source": f"stage_{stage.number}",
                      "key": task.text, "request": task.text,
                      "better": better["text"], "worse": worse["text"],
                      "origin": {"task_id": task.id, "better_sample": better["sample"],
                                 "worse_sample": worse["sample"]}})
    return pairs


def labelled_from_assessment(run_dir: Path, number: int, guard) -> list[dict]:
    """Held-out-only labelled pairs from an earlier stage's held-out assessment: on each held-out
    item where the stage's input and its trained model split on the check (`passed` True for one
    and False for the other), the passing output against the failing one, under the item's task
    text. Empty when the stage has not been assessed in this run."""
    assessment = earlier_json(run_dir, number, "assessment.json", reader=4)
    tasks = earlier_tasks(run_dir, number, reader=4)
    if assessment is None or tasks is None:
        return []
    held = {t.id: t for t in tasks if t.split == "heldout"}
    before = {item["id"]: item for item in assessment["before"]["items"]}
    pairs = []
    for after in assessment["after"]["items"]:
        task, other = held.get(after["id"]), before.get(after["id"])
        if task is None or other is None or {after["passed"], other["passed"]} != {True, False}:
            continue
        better, worse = (after, other) if after["passed"] else (other, after)
        texts = better["response"], worse["response"]
        if any(response_problem(t, guard) for t in texts) \
                or same_text(texts[0]) == same_text(texts[1]):
            continue
        pairs.append({"id": labelled_id(task.text), "source": f"stage_{number}_heldout",
                      "key": task.text, "request": task.text, "better": texts[0],
                      "worse": texts[1],
                      "origin": {"task_id": task.id,
                                 "better_model": "after" if after["passed"] else "before"}})
    return pairs


def heldout_only(pair: dict) -> bool:
    """A pair made of outputs on an earlier stage's held-out item: never trained on."""
    return pair["source"].endswith("_heldout")


def labelled_from_pool(pool: dict) -> list[dict]:
    return [{"id": labelled_id(p["request"]), "source": "pool", "key": p["request"],
             "request": p["request"], "better": p["better"], "worse": p["worse"],
             "origin": {"pool_index": i, "kind": p["kind"]}}
            for i, p in enumerate(pool["labelled_pairs"])]


def prompt_tokens(tokenizer, pair: dict) -> int:
    """Tokens of the longer zero-shot prompt of the pair's two orders."""
    return max(len(tokenizer(house_prompt(judge_text(pair["request"], *ordered(pair, label))),
                             add_special_tokens=False)["input_ids"]) for label in LETTERS)


def split_labelled(pairs: list[dict], limit: int, heldout: int,
                   threshold: float = 0.7) -> tuple[list[dict], list[dict]]:
    """(kept pairs with "split", dropped): held-out = the held-out-only pairs with the smallest
    ids, topped up to `heldout` with the other pairs' smallest ids (core.split.top_up);
    training = the next `limit` of the others by id; training pairs that nearly equal a held-out
    request (ROUGE-L > `threshold`) are dropped."""
    reserved = sorted((p for p in pairs if heldout_only(p)), key=lambda p: p["id"])[:heldout]
    others = sorted((p for p in pairs if not heldout_only(p)), key=lambda p: p["id"])
    count = top_up(len(reserved), len(others), heldout)
    held = [{**p, "split": "heldout"} for p in reserved + others[:count]]
    kept, dropped = [], []
    for pair in others[count:]:
        if len(kept) == limit:
            break
        if any(near_same(pair["key"], h["key"], threshold) for h in held):
            dropped.append({"id": pair["id"], "reason": "near a held-out request"})
        else:
            kept.append({**pair, "split": "train"})
    return held + kept, dropped


def check_leakage(pairs: list[dict], threshold: float = 0.7) -> None:
    """No held-out request may equal or nearly equal (ROUGE-L > `threshold`) a training one."""
    train = [p for p in pairs if p["split"] == "train"]
    for held in (p for p in pairs if p["split"] == "heldout"):
        if other := first_near_same(held["key"], [p["key"] for p in train], threshold):
            raise RunFailure(f"held-out pair {held['id']} leaks into training: "
                             f"{held['key']!r} ~ {other!r}")


def judge_tasks(pairs: list[dict]) -> list[Task]:
    """Two tasks per labelled pair, one per order: the judge request as shown, the labelled
    pair's origin as source, and the pair id, label and bare request in `extra`."""
    return [Task(id=f"{p['id']}-{label}", stage=4, split=p["split"],
                 text=judge_text(p["request"], *ordered(p, label)), kind="judge",
                 source=p["source"],
                 extra={"pair_id": p["id"], "label": label, "instruction": p["key"]})
            for p in pairs for label in LETTERS]


def hh_pair(line: str) -> dict | None:
    """Request / chosen / rejected of a single-turn HH-RLHF record (None for multi-turn)."""
    record = json.loads(line)
    turns = []
    for side in ("chosen", "rejected"):
        text = record[side]
        if text.count("\n\nHuman:") != 1 or text.count("\n\nAssistant:") != 1:
            return None
        human, assistant = text.split("\n\nAssistant:", 1)
        turns.append((human.split("\n\nHuman:", 1)[1].strip(), assistant.strip()))
    (request, better), (other_request, worse) = turns
    if request != other_request:
        return None
    return {"request": request, "better": better, "worse": worse}


def read_hh_pairs(path: Path) -> dict[int, dict]:
    """{row: pair} for every single-turn record of the HH-RLHF harmless test file."""
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        rows = [line for line in handle if line.strip()]
    return {row: pair for row, line in enumerate(rows) if (pair := hh_pair(line)) is not None}


def pick_hh_heldout(pairs: dict[int, dict], count: int, guard,
                    max_words: int = 80) -> list[dict]:
    """`count` usable single-turn rows (each response at most `max_words` words), picked by
    hash; only ids and row numbers are kept."""
    def usable(pair: dict) -> bool:
        sides = (pair["better"], pair["worse"])
        return all(side and len(side.split()) <= max_words
                   and response_problem(side, guard) is None for side in sides) \
            and same_text(sides[0]) != same_text(sides[1]) and guard.is_clean(pair["request"])

    rows = sorted((row for row, pair in pairs.items() if usable(pair)),
                  key=lambda row: hashlib.sha256(f"hh-{row}".encode()).hexdigest())
    return [{"id": f"hh-{row}", "row": row} for row in rows[:count]]


def make_tasks(ctx: StageContext, pool: dict) -> None:
    guard = ctx.guard()
    tokenizer, _ = ctx.input_tokenizer_and_generation_config()
    candidates: dict[str, dict] = {}
    for stage in EARLIER_STAGES:  # a held-out request is never a training pair's
        for pair in labelled_from_assessment(ctx.run_dir, stage.number, guard):
            candidates.setdefault(pair["id"], pair)
    for stage in EARLIER_STAGES:
        for pair in labelled_from_stage(ctx.run_dir, stage, guard):
            candidates.setdefault(pair["id"], pair)
    for pair in labelled_from_pool(pool):
        candidates.setdefault(pair["id"], pair)
    budget = ctx.profile.max_length - ctx.settings.verdict_tokens
    too_long = {i for i, p in candidates.items() if prompt_tokens(tokenizer, p) > budget}
    pairs, near = split_labelled([p for i, p in candidates.items() if i not in too_long],
                                 ctx.limit, ctx.heldout, ctx.near_duplicate)
    long_ = [{"id": i, "reason": f"prompt longer than {budget} tokens"} for i in too_long]
    write_jsonl(ctx.path("tasks_dropped.jsonl"), long_ + near)
    check_leakage(pairs, ctx.near_duplicate)
    if sum(p["split"] == "train" for p in pairs) < 2:
        raise TooLittleDataError(f"stage 4 found only {len(pairs)} labelled pairs whose prompt "
                                 f"fits max_length {ctx.profile.max_length} "
                                 f"(see {ctx.path('tasks_dropped.jsonl')})")
    write_jsonl(ctx.path("labelled.jsonl"), pairs)
    write_tasks(ctx.path(TASKS_FILE), judge_tasks(pairs))
    hh_file = ctx.data_dir / HH_PATH if ctx.data_dir else None
    hh = pick_hh_heldout(read_hh_pairs(hh_file), ctx.heldout, guard, ctx.settings.hh_max_words) \
        if hh_file and hh_file.is_file() else []
    write_jsonl(ctx.path("hh_heldout.jsonl"), hh)
    sources = Counter(f"{p['source']}/{p['split']}" for p in pairs)
    ctx.log(f"tasks: labelled pairs {dict(sources)}, HH-RLHF held-out {len(hh)}")


def load_tasks(ctx: StageContext, split: str) -> list[Task]:
    return read_tasks(ctx.path(TASKS_FILE), split)


def load_labelled(ctx: StageContext, split: str) -> list[dict]:
    return [p for p in read_jsonl(ctx.path("labelled.jsonl")) if p["split"] == split]


# 2. verdicts -------------------------------------------------------------------------------------

def verdict_text(letter: str, reason: str) -> str:
    return f"{letter}. {reason.strip()}"


def verdict_shots(pool: dict, rng: random.Random) -> list[tuple[str, str]]:
    """3-4 exemplars, each shown in a random order, with as many A as B answers (+-1)."""
    exemplars = draw(pool["verdict_exemplars"], rng, 3, 4)
    letters = [LETTERS[i % 2] for i in range(len(exemplars))]
    rng.shuffle(letters)
    return [(judge_text(e["request"], *ordered(e, letter)), verdict_text(letter, e["reason"]))
            for e, letter in zip(exemplars, letters)]


def verdict_requests(ctx: StageContext, pool: dict, tasks: list[Task]) -> list[GenRequest]:
    return few_shot_requests(ctx.seed, tasks, ctx.profile.responses_per_task, "verdict",
                             lambda task, rng: verdict_shots(pool, rng))


def make_verdicts(ctx: StageContext, pool: dict) -> None:
    tasks = load_tasks(ctx, "train")
    sample_to_file(ctx, tasks, verdict_requests(ctx, pool, tasks),
                   ctx.profile.temperature_critique, VERDICT_STOPS, "verdicts")


# 3. scores ---------------------------------------------------------------------------------------

def parse_verdict(text: str) -> tuple[str | None, str]:
    """(letter, reason): the letter is the first character when it is A or B and not the start
    of a word; a tie, or anything else, gives (None, "")."""
    stripped = text.strip()
    match = VERDICT.match(stripped)
    if TIE.match(stripped) or match is None:
        return None, ""
    return match.group(1), match.group(2).strip()


def reason_problem(reason: str, responses: tuple[str, str], finish: str = "stop",
                   threshold: float = 0.7) -> str | None:
    """Why a verdict's reason is not one good sentence (None when it is); a reason nearly equal
    (ROUGE-L > `threshold`) to either response copies it."""
    if not reason:
        return "no reason"
    if finish == "length":
        return "cut off"
    if "\n" in reason:
        return "more than one line"
    if problem := degenerate_reason(reason, min_words=4, max_words=60):
        return problem
    if not SENTENCE_END.search(reason):
        return "unfinished sentence"
    if SENTENCE_BREAK.search(reason):
        return "more than one sentence"
    if any(normalize(reason) == normalize(r) or rouge_l(reason, r) > threshold
           for r in responses):
        return "copies a response"
    return None


def unusable_reason(text: str, guard, exemplars: list[str]) -> str | None:
    """Why a verdict can be neither chosen nor rejected (None when usable)."""
    if not text.strip():
        return "empty"
    if not guard.is_clean(text):
        return "chat markup"
    if SCAFFOLDING.search(text):
        return "prompt scaffolding"
    if copies_exemplar(text, exemplars):
        return "copies an exemplar"
    return None


def score_verdict(text: str, finish: str, label: str, responses: tuple[str, str], guard,
                  exemplars: list[str], threshold: float = 0.7) -> dict:
    """Parsed letter, correctness for this order, reason check; `passed` = may be chosen;
    `both_orders` = a good reason that names no position (it holds in either order)."""
    letter, reason = parse_verdict(text)
    unusable = unusable_reason(text, guard, exemplars) or (None if letter else "does not parse")
    problem = reason_problem(reason, responses, finish, threshold) if letter else None
    correct = letter == label if letter else None
    return {"letter": letter, "reason": reason, "correct": correct, "reason_problem": problem,
            "unusable": unusable, "passed": unusable is None and bool(correct) and problem is None,
            "both_orders": unusable is None and problem is None and not POSITION.search(reason)}


def make_scores(ctx: StageContext, pool: dict) -> None:
    tasks = {t.id: t for t in load_tasks(ctx, "train")}
    pairs = {p["id"]: p for p in load_labelled(ctx, "train")}
    guard, exemplars = ctx.guard(), exemplar_texts(pool)
    scored = []
    for verdict in read_jsonl(ctx.path("verdicts.jsonl")):
        task = tasks[verdict["task_id"]]
        pair_id, label = task.extra["pair_id"], task.extra["label"]
        responses = ordered(pairs[pair_id], label)
        scored.append({**verdict, "pair_id": pair_id, "label": label,
                       **score_verdict(verdict["text"], verdict["finish"], label,
                                       responses, guard, exemplars, ctx.near_duplicate)})
    write_jsonl(ctx.path("scores.jsonl"), scored)


# 4. pairs ----------------------------------------------------------------------------------------

def other_letter(letter: str) -> str:
    return LETTERS[1 - LETTERS.index(letter)]


def carried_over(sample: dict) -> dict:
    """A verdict of the other order, restated for this one: same response, other letter."""
    return {**sample, "text": verdict_text(other_letter(sample["letter"]), sample["reason"]),
            "letter": other_letter(sample["letter"]), "order": "other"}


def rejected_rank(sample: dict) -> int:
    """0: wrong letter, good reason; 1: wrong letter, poor reason; 2: the other order's wrong
    verdict carried over; 3: right letter, poor reason."""
    if sample["order"] == "other":
        return 2
    if not sample["correct"]:
        return 0 if sample["reason_problem"] is None else 1
    return 3


def choose_pair(task: Task, samples: list[dict], other: list[dict]) -> tuple[dict | None, str]:
    """(pair, reason): the pair rule for one task, from its own scored verdicts and, where those
    lack a chosen or a wrong verdict, the other order's verdicts whose reasons hold in both."""
    def usable(group: list[dict]) -> list[dict]:
        return sorted((s for s in group if s["unusable"] is None), key=lambda s: s["sample"])

    own = [{**s, "order": "this"} for s in usable(samples)]
    carried = [carried_over(s) for s in usable(other) if s["both_orders"]]
    if not own and not carried:
        return None, "no usable verdict parses"
    chosen = next((s for s in own + carried if s["passed"]), None)
    if chosen is None:
        return None, "no verdict with the right letter and a one-sentence reason"
    rejects = [s for s in own if not s["passed"]] + [c for c in carried if not c["correct"]]
    rejects = [s for s in rejects if same_text(s["text"]) != same_text(chosen["text"])]
    if not rejects:
        return None, "every usable verdict is right (no rejected)"
    rejected = min(rejects, key=lambda s: (rejected_rank(s), s["sample"]))
    return {"prompt": house_prompt(task.text), "chosen": chosen["text"],
            "rejected": rejected["text"], "task_id": task.id, "pair_id": task.extra["pair_id"],
            "label": task.extra["label"], "source": task.source,
            "chosen_sample": chosen["sample"], "chosen_order": chosen["order"],
            "rejected_sample": rejected["sample"], "rejected_order": rejected["order"],
            "rejected_kind": "wrong letter" if not rejected["correct"] else
            f"reason: {rejected['reason_problem']}"}, "ok"


def pair_problem(pair: dict, guard, exemplars: list[str]) -> str | None:
    """Shared last filter: identical, contaminated or exemplar-copying pairs."""
    return shared_pair_problem(pair, guard, lambda text: unusable_reason(text, guard, exemplars))


def make_pairs(ctx: StageContext, pool: dict) -> None:
    by_task = group_by_task(read_jsonl(ctx.path("scores.jsonl")))
    guard, exemplars = ctx.guard(), exemplar_texts(pool)

    def choose(task: Task) -> tuple[dict | None, str]:
        other = f"{task.extra['pair_id']}-{other_letter(task.extra['label'])}"
        return choose_pair(task, by_task.get(task.id, []), by_task.get(other, []))

    write_pairs(ctx, load_tasks(ctx, "train"), choose,
                lambda pair, task: pair_problem(pair, guard, exemplars), "judge tasks",
                "the model wrote no verdict with the right letter and a one-sentence reason "
                "next to a wrong one; raise --limit")


# assessment and report helpers ------------------------------------------------------------------

def heldout_texts(pairs: list[dict]) -> list[tuple[str, str]]:
    """Held-out requests and responses, for the 13-gram index."""
    return [(f"{p['id']}/{field}", p[field]) for p in pairs for field in ("key", "better", "worse")]


def judge_verdicts(backend, guard, pairs: list[dict], cache_path: Path, max_new_tokens: int,
                   batch_size: int, where: str, threshold: float = 0.7) -> list[dict]:
    """Zero-shot greedy verdicts on both orders of each pair: letters, correctness, reasons."""
    prompts = {f"{p['id']}-{label}": house_prompt(judge_text(p["request"], *ordered(p, label)))
               for p in pairs for label in LETTERS}
    texts = generate_greedy(backend, guard, cache_path, prompts, max_new_tokens, batch_size, where)
    rows = []
    for pair in pairs:
        row = {"id": pair["id"], "source": pair["source"]}
        for label in LETTERS:
            text = texts[f"{pair['id']}-{label}"]
            letter, reason = parse_verdict(text)
            row[label] = {"text": text, "letter": letter, "correct": letter == label,
                          "reason_ok": letter == label and
                          reason_problem(reason, ordered(pair, label),
                                         threshold=threshold) is None}
        rows.append(row)
    return rows


def judging_summary(rows: list[dict], prefix: str = "") -> dict:
    """Accuracy in each order and in both, parse and reason rates (rate dicts)."""
    n = len(rows)
    verdicts = [row[label] for row in rows for label in LETTERS]
    return {
        f"{prefix}accuracy_both_orders": rate(sum(row["A"]["correct"] and row["B"]["correct"]
                                                  for row in rows), n),
        f"{prefix}accuracy_better_first": rate(sum(row["A"]["correct"] for row in rows), n),
        f"{prefix}accuracy_better_second": rate(sum(row["B"]["correct"] for row in rows), n),
        f"{prefix}verdict_parsed": rate(sum(v["letter"] is not None for v in verdicts),
                                        len(verdicts)),
        f"{prefix}reason_ok": rate(sum(v["reason_ok"] for v in verdicts), len(verdicts)),
    }


def position_bias_gap(rows: list[dict]) -> float | None:
    """Accuracy with the better response shown first minus shown second."""
    if not rows:
        return None
    first = sum(row["A"]["correct"] for row in rows)
    second = sum(row["B"]["correct"] for row in rows)
    return (first - second) / len(rows)


def assessed_items(rows: list[dict], paired: bool) -> list[dict]:
    """Per-pair outcomes; `passed` (correct in both orders) feeds McNemar only when `paired`.
    HH rows keep letters and outcomes only, never texts."""
    items = []
    for row in rows:
        both = row["A"]["correct"] and row["B"]["correct"]
        item = {"id": row["id"], "source": row["source"], "passed": both if paired else None,
                "correct_both": both}
        for label in LETTERS:
            item[f"better_{'first' if label == 'A' else 'second'}"] = (
                row[label] if paired else {k: v for k, v in row[label].items() if k != "text"})
        items.append(item)
    return items


def load_hh_heldout(ctx: StageContext) -> list[dict]:
    chosen = read_jsonl(ctx.path("hh_heldout.jsonl"))
    if not chosen:
        return []
    pairs = read_hh_pairs(ctx.data_dir / HH_PATH)
    return [{"id": c["id"], "source": HH_SOURCE, **pairs[c["row"]]} for c in chosen]


def fewshot_audit(scored: list[dict]) -> dict:
    """How the input model judged few-shot while making the data: parse rate and letter
    accuracy per order (its position bias in context)."""
    parsed = [s for s in scored if s["letter"] is not None]
    return {"samples": len(scored), "parsed": rate(len(parsed), len(scored)),
            **{f"right_letter_better_{'first' if label == 'A' else 'second'}":
               rate(sum(s["correct"] for s in parsed if s["label"] == label),
                    sum(s["label"] == label for s in parsed)) for label in LETTERS}}


# What the shared tail needs from stage 4 ---------------------------------------------------------

def protected_sets(ctx: StageContext) -> Protected:
    """Exemplars, the held-out requests and responses, and the shared sets."""
    return Protected(exemplar_texts(load_pool()), heldout_texts(load_labelled(ctx, "heldout")),
                     ctx.data_dir)


def merge_probes(ctx: StageContext) -> list[str]:
    tasks = read_tasks(ctx.path(TASKS_FILE))
    return [house_prompt(t.text) for t in tasks[:8]]


def assess_heldout(ctx: StageContext, backend, label: str) -> dict:
    """Held-out labelled pairs (and HH-RLHF held-out pairs), both orders, zero-shot, greedy."""
    labelled, hh = load_labelled(ctx, "heldout"), load_hh_heldout(ctx)
    p = ctx.profile
    rows = judge_verdicts(backend, ctx.guard(), labelled + hh,
                          ctx.heldout_cache(label), p.max_new_tokens,
                          p.gen_batch_size, f"stage 4 assess {label}", ctx.near_duplicate)
    own = [r for r in rows if r["source"] != HH_SOURCE]
    other = [r for r in rows if r["source"] == HH_SOURCE]
    summary = judging_summary(own)
    if other:
        summary.update({k: v for k, v in judging_summary(other, "hh_").items()
                        if "accuracy" in k})
    return {"summary": summary,
            "position_bias_gap": {"labelled": position_bias_gap(own),
                                  "hh": position_bias_gap(other)},
            "items": assessed_items(own, True) + assessed_items(other, False)}


def report_data(ctx: StageContext) -> dict:
    labelled = read_jsonl(ctx.path("labelled.jsonl"))
    scored = read_jsonl(ctx.path("scores.jsonl"))
    pairs = read_jsonl(ctx.path("pairs.jsonl"))
    assessment = read_json(ctx.path("assessment.json"))
    return {
        "labelled_pairs": dict(Counter(f"{p['source']} {p['split']}" for p in labelled)),
        "tasks_train": len(load_tasks(ctx, "train")),
        "hh_heldout": len(read_jsonl(ctx.path("hh_heldout.jsonl"))),
        "verdicts": fewshot_audit(scored),
        "pairs_dropped": dict(Counter(d["reason"]
                                      for d in read_jsonl(ctx.path("pairs_dropped.jsonl")))),
        "chosen_letters": dict(Counter(p["label"] for p in pairs)),
        "carried_from_other_order": {side: sum(p[f"{side}_order"] == "other" for p in pairs)
                                     for side in ("chosen", "rejected")},
        "position_bias_gap": {side: assessment[side]["position_bias_gap"]["labelled"]
                              for side in ("before", "after")},
    }


def plan_work(ctx: StageContext) -> WorkPlan:
    """The most work stage 4's own steps do (for --dry-run; nothing is loaded): two judge tasks
    (one per order) per labelled training pair; held-out pairs are assessed in both orders, and
    so are the HH-RLHF held-out pairs when the shared data is there."""
    p = ctx.profile
    tasks = 2 * ctx.limit
    heldout_sets = 2 if ctx.data_dir is not None else 1
    return WorkPlan(
        work=(Work("verdicts", prompts=tasks * p.responses_per_task, new_tokens=p.max_new_tokens,
                   note=f"{p.responses_per_task} per judge task, 2 tasks per labelled pair"),),
        max_pairs=tasks, heldout_prompts=2 * ctx.heldout * heldout_sets)


STAGE = Stage(
    number=4,
    name="evaluation-tasks",
    summary="judge which of two responses better serves a request, and say why in one sentence",
    settings=Stage4Settings,
    load_pool=load_pool,
    data_steps=(Step("tasks", make_tasks), Step("verdicts", make_verdicts),
                Step("scores", make_scores), Step("pairs", make_pairs)),
    protected=protected_sets,
    merge_probes=merge_probes,
    assess_heldout=assess_heldout,
    headline="accuracy_both_orders",
    report_data=report_data,
    plan_work=plan_work,
)
