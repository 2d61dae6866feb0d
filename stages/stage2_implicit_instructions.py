"""Stage 2 - implicit instructions.

The model learns to treat a bare question or request (no "please", no "write", no constraint) as
an instruction and to answer it, zero-shot, in the house format. Steps (each resumable, each
marked done only when complete):

1. questions     Bare questions from two sources. (a) Real question sets under ctx.data_dir, when
                 given: Self-Instruct seed tasks without an instance input, TruthfulQA questions
                 and MT-Bench first turns. Each set is split once, by a hash of the item id, into
                 a train part and a held-out part (`heldout_share`; core.realsets: stage 5
                 holds out the same parts); held-out parts never train.
                 (b) Model-written questions by few-shot *list continuation* of pool seeds plus
                 already-accepted questions; degenerate items, chat markup, list scaffolding and
                 near-duplicates (ROUGE-L above the run's near-duplicate threshold against
                 everything kept: pool questions, stage 1's instructions when stage 1 ran here,
                 real questions) are dropped, and the held-out ones are those with the smallest
                 id hashes (core.split.split_smallest_ids). About half of each split is real
                 when data is given.
                 Held-out and training questions are checked for leakage, then all of them go
                 to tasks.jsonl (core.records.Task: text = the question, kind "question",
                 source = the real set's name or "generated").
2. responses     K samples per training question from a few-shot completion prompt (3-4 (bare
                 question, direct answer) exemplars from the pool, then the target), plus
                 `zero_shot_samples` samples of the zero-shot house prompt itself: what the model
                 does today without a scaffold, the natural source of rejected responses.
3. scores        The answer checks on every sample (`check_answer`): not degenerate, does not
                 continue the question, carry prompt scaffolding, repeat the question, ask a new
                 question or go on to a list of them, dodge ("I don't know", "That is a good
                 question") or drift off topic (no content word shared with the question). The
                 log-probability A/B judge, asked in both orders, ranks up to three distinct
                 passing samples and checks the planned chosen against the planned rejected.
4. pairs         chosen = the passer the judge ranks best (consistent wins; ties count for
                 nobody); rejected = a failing sample, most instructive failure first
                 (continues > repeats > asks > new questions > scaffolding > dodge > off topic >
                 degenerate), zero-shot samples before few-shot ones. Dropped: no passer, no
                 failure, a judge that prefers the rejected in both orders, identical texts,
                 chat markup, empty texts, exemplar copies. The training prompt is the zero-shot
                 `house_prompt(question)`: exemplars never reach it.
5. decontaminate 13-gram overlap with every evaluation set, this stage's held-out questions, the
                 whole held-out parts of the real sets and stage 1's held-out instructions;
                 exemplar copies; template state (core/lifecycle.py).
6. train         DPO on a LoRA.
7. merge         into a full-precision copy of the input model, with a parity check.
8. assess        input model vs merged model on the held-out questions, zero-shot, greedy:
                 answer_rate (headline; the checks, since real sets have no gold answer here),
                 on_topic, non_degenerate, and the answer rate per source.
9. report        metrics.json and report.md; then DONE.

Steps 5-9 are the shared tail (core/stage.py, core/lifecycle.py); this module answers what only
stage 2 knows, in `STAGE` at the bottom.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from core.assess import generate_greedy
from core.contamination import Protected
from core.context import StageContext
from core.errors import RunFailure, TooLittleDataError, UsageError
from core.generation import GenRequest
from core.io import read_jsonl, write_jsonl
from core.judge import judge_audit as core_judge_audit
from core.judge import judge_many, judge_prefix, round_robin_prompts, winning_sample
from core.listgen import ListGrowth, grow_list, growth_work
from core.pairs import (first_of_each_text, group_by_task, judge_wins, shared_pair_problem,
                        write_pairs)
from core.realsets import (HELDOUT_SHARE, MAX_QUESTION_WORDS, load_real_questions, pick_real,
                           short_hash)
from core.records import TASKS_FILE, Task, earlier_tasks, read_tasks, write_tasks
from core.prompting import RESPONSE_STOPS, draw, few_shot_prompt, house_prompt, seed_for
from core.split import split_smallest_ids
from core.stage import Stage, StageSettings, Step, Work, WorkPlan, setting
from core.stats import rate
from core.text import (NearDuplicateFilter, copies_exemplar, degenerate_reason, first_near_same,
                       normalize, rouge_l)

POOL_PATH = Path(__file__).with_name("pools") / "stage2.yaml"


@dataclass(frozen=True)
class Stage2Settings(StageSettings):
    question_temperature: float = setting(0.9, "sampling temperature for new questions")
    max_question_rounds: int = setting(6, "list-continuation rounds before giving up on "
                                          "reaching --limit + --heldout questions")
    oversample: float = setting(1.3, "questions requested per round, as a multiple of those "
                                     "still needed")
    heldout_share: float = setting(HELDOUT_SHARE, "share of each real question set held "
                                                  "out, by a hash of the item id (the same "
                                                  "items in every run; stage 5 holds out the "
                                                  "same part)")
    max_question_words: int = setting(MAX_QUESTION_WORDS, "longest real question used, in "
                                                          "words (longer items, e.g. MT-Bench "
                                                          "passages, do not fit the training "
                                                          "budget)")
    zero_shot_samples: int = setting(2, "zero-shot samples per training question, besides the "
                                        "few-shot ones (the natural source of rejected responses)")
    max_judged_samples: int = setting(3, "passing samples per question the judge ranks "
                                         "round-robin (3: 3 comparisons, 6 judge prompts)")
    short_answer_words: int = setting(6, "answers of at most this many words (\"Lisbon.\", "
                                         "\"36.\") are exempt from the topic check")
    topic_window_words: int = setting(60, "the topic check reads this many words from the "
                                          "start of a response")
    dev_questions: int = setting(100, "real questions in the dev split (`tune --retention`): "
                                      "training-part items this run did not train on")


def load_pool() -> dict:
    """The project-written exemplar pool (question seeds, answer and judge exemplars)."""
    return yaml.safe_load(POOL_PATH.read_text(encoding="utf-8"))


def exemplar_texts(pool: dict) -> list[str]:
    """Every exemplar string, for the exemplar-copy filter."""
    texts = list(pool["question_seeds"])
    for ex in pool["answer_exemplars"]:
        texts += [ex["question"], ex["answer"]]
    for ex in pool["judge_exemplars"]:
        texts += [ex["question"], ex["response_a"], ex["response_b"]]
    return texts


# 1. questions ------------------------------------------------------------------------------------

def list_prompt(items: list[str]) -> str:
    """A numbered list of bare questions the base model continues with one more item."""
    lines = ["Below are questions and requests that people sent to a knowledgeable friend, "
             "written exactly as they typed them. Every one is new and different from the others.",
             ""]
    lines += [f"{i}. {item}" for i, item in enumerate(items, start=1)]
    lines.append(f"{len(items) + 1}.")
    return "\n".join(lines)


def clean_question(text: str) -> str:
    return " ".join(text.strip().split())


LIST_SCAFFOLDING = re.compile(r"^(\d+[.)]|question\b|task\b|instruction\b|response\b|answer\b|q:|a:)",
                              re.IGNORECASE)


def question_problem(text: str, guard, filter_: NearDuplicateFilter) -> str | None:
    """Why a generated question is dropped (None when it is kept; keeping it records it)."""
    reason = degenerate_reason(text, min_words=3, max_words=40)
    if reason:
        return reason
    if not guard.is_clean(text):
        return "chat markup"
    if LIST_SCAFFOLDING.match(text):
        return "list scaffolding"
    if not filter_.offer(text):
        return "near-duplicate"
    return None


def generate_questions(ctx: StageContext, pool: dict, needed: int,
                       filter_: NearDuplicateFilter) -> list[str]:
    """Up to `needed` new bare questions written by the model (list continuation)."""
    guard = ctx.guard()
    growth = ListGrowth(prompt=list_prompt, clean=clean_question,
                        problem=lambda text: question_problem(text, guard, filter_),
                        temperature=ctx.settings.question_temperature,
                        rounds=ctx.settings.max_question_rounds,
                        oversample=ctx.settings.oversample, cache="questions.jsonl",
                        seed_names=("question-prompt", "question"), where="stage 2 questions")
    accepted, audit = grow_list(ctx, growth, list(pool["question_seeds"]), needed)
    write_jsonl(ctx.path("questions_audit.jsonl"), audit)
    return accepted


def question_task(item: dict) -> Task:
    """A question item (id, source, question, split: a real one or a generated one) as the
    stage's task record: text = the question, kind "question", source = the item's source; any
    further field of the item goes into extra."""
    extra = {k: v for k, v in item.items() if k not in ("id", "split", "question", "source")}
    return Task(id=item["id"], stage=2, split=item["split"], text=item["question"],
                kind="question", source=item["source"], extra=extra)


def generated_tasks(questions: list[str], heldout: int) -> list[Task]:
    """Model-written questions as tasks; the `heldout` smallest id hashes are held out (a
    quarter, at least one, when fewer than two would train: core.split.split_smallest_ids)."""
    items = split_smallest_ids([{"id": "q" + short_hash(normalize(q)), "source": "generated",
                                 "question": q} for q in questions], heldout)
    return [question_task(item) for item in items]


def stage1_instructions(ctx: StageContext) -> list[Task]:
    """Stage 1's tasks in this run (empty when stage 1 has not written them here)."""
    return earlier_tasks(ctx.run_dir, 1, 2) or []


def make_questions(ctx: StageContext, pool: dict) -> None:
    guard, settings = ctx.guard(), ctx.settings
    filter_ = NearDuplicateFilter(ctx.near_duplicate)
    filter_.kept.extend(pool["question_seeds"] + [e["question"] for e in pool["answer_exemplars"]]
                        + [t.extra["instruction"] for t in stage1_instructions(ctx)])
    real = load_real_questions(ctx.data_dir, settings.heldout_share)
    taken: set[str] = set()

    def pick(split: str, count: int) -> list[dict]:
        return pick_real(real, split, count, filter_, guard, taken, ctx.seed,
                         settings.max_question_words)

    real_held = pick("heldout", ctx.heldout // 2)
    real_train = pick("train", ctx.limit // 2)
    wanted_held = ctx.heldout - len(real_held)
    wanted = ctx.limit - len(real_train) + wanted_held
    questions = generate_questions(ctx, pool, wanted, filter_) if wanted > 0 else []
    held_share = round(len(questions) * wanted_held / wanted) if wanted else 0
    generated = generated_tasks(questions, held_share)
    count = {s: sum(t.split == s for t in generated) for s in ("train", "heldout")}
    real_held += pick("heldout", ctx.heldout - len(real_held) - count["heldout"])
    real_train += pick("train", ctx.limit - len(real_train) - count["train"])
    tasks = [question_task(item) for item in real_held + real_train] + generated
    train_count = sum(t.split == "train" for t in tasks)
    if train_count < 2 or len(tasks) - train_count < 1:
        raise TooLittleDataError(
            f"stage 2 has only {train_count} training and {len(tasks) - train_count} held-out "
            f"questions (model-written ones are audited in {ctx.path('questions_audit.jsonl')}); "
            f"the model is not producing distinct questions - pass the shared data directory, "
            f"or try another --seed or model")
    check_leakage(tasks, ctx.near_duplicate)
    write_tasks(ctx.path(TASKS_FILE), tasks)


def check_leakage(tasks: list[Task], threshold: float) -> None:
    """No held-out question may equal or nearly equal (ROUGE-L > threshold) a training one."""
    train = [t.text for t in tasks if t.split == "train"]
    for task in (t for t in tasks if t.split == "heldout"):
        if other := first_near_same(task.text, train, threshold):
            raise RunFailure(f"held-out question {task.id} leaks into training: "
                             f"{task.text!r} ~ {other!r}")


def load_tasks(ctx: StageContext, split: str | None = None) -> list[Task]:
    """The stage's questions (only `split` when given), in the order make_questions wrote them."""
    return read_tasks(ctx.path(TASKS_FILE), split)


# 2. responses ------------------------------------------------------------------------------------

def sample_plan(task_id: str, k: int, zero_shot: int) -> list[tuple[str, str]]:
    """(request id, prompting) of every sample of a task, in sample order: `k` few-shot samples,
    then `zero_shot` zero-shot ones."""
    return [(f"{task_id}-f{i}", "few-shot") for i in range(k)] + \
           [(f"{task_id}-z{i}", "zero-shot") for i in range(zero_shot)]


def response_request(ctx: StageContext, pool: dict, task: Task, request_id: str,
                     prompting: str) -> GenRequest:
    """A few-shot completion prompt (3-4 exemplars, then the target), or the zero-shot one."""
    if prompting == "zero-shot":
        return GenRequest(request_id, house_prompt(task.text),
                          seed_for(ctx.seed, "zero-shot-answer", request_id))
    rng = random.Random(seed_for(ctx.seed, "answer-exemplars", request_id))
    shots = [(e["question"], e["answer"]) for e in draw(pool["answer_exemplars"], rng, 3, 4)]
    return GenRequest(request_id, few_shot_prompt(shots, task.text),
                      seed_for(ctx.seed, "answer", request_id))


def make_responses(ctx: StageContext, pool: dict) -> None:
    tasks = load_tasks(ctx, "train")
    plans = {t.id: sample_plan(t.id, ctx.profile.responses_per_task,
                               ctx.settings.zero_shot_samples) for t in tasks}
    requests = [response_request(ctx, pool, t, rid, prompting)
                for t in tasks for rid, prompting in plans[t.id]]
    settings = ctx.sampling(ctx.profile.temperature_answer, ctx.profile.max_new_tokens,
                            RESPONSE_STOPS)
    results = ctx.generate(requests, settings, "responses.jsonl", "stage 2 responses")
    records = []
    for task in tasks:
        for sample, (request_id, prompting) in enumerate(plans[task.id]):
            result = results[request_id]
            records.append({"task_id": task.id, "sample": sample, "prompting": prompting,
                            "text": result["text"].strip(), "finish": result["finish"]})
    write_jsonl(ctx.path("responses.jsonl"), records)


# 3. scores: the answer checks --------------------------------------------------------------------

STOPWORDS = frozenset("""
a about above after again all also am an and any anything are as at be because been before being
below best better between both but by can could did do does doing done down during each either
else even ever every few for from get gets getting give go going good got had has have having he
her here hers him his how however i if in into is it its just know kind let like lot many may me
might more most much must my need no nor not now of off often on once one only or other our out
over own please quite rather really same say shall she should so some something such tell than
that the their them then there these they thing things this those through to too under until up
upon us use used using very want was way ways we well were what when where whether which while who
whom whose why will with would yes yet you your yours ideas idea tips explain describe list write
make made don doesn isn aren won didn wasn
""".split())
_TOKEN = re.compile(r"[a-z]+|\d{2,}")
_LIST_MARK = re.compile(r"^\s*(?:[-*\u2022]|\d+[.)])\s*")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
CONTINUATION_START = tuple(",;:)]}?") + ("...", "\u2026")
CODE_START = re.compile(r"^(?:def|class|import|function|const|var|public)\s|^#include|"
                        r"^from \S+ import ")  # code may start in lower case
SCAFFOLDING = re.compile(r"^\s*(?:###|(?:Instruction|Response|Question|Answer|Task|Q|A)\s*\d*\s*:)",
                         re.MULTILINE)
DODGE = re.compile(
    r"^\W*(?:well,?\s+|honestly,?\s+|hmm+,?\s+)?(?:"
    r"i (?:do not|don't|really don't|really do not) know|i'm not (?:sure|certain)|"
    r"i am not (?:sure|certain)|i have no (?:idea|clue)|no idea|not sure|who knows|nobody knows|"
    r"no one knows|(?:that's|that is|this is|what) (?:a |an )?(?:very |really )?"
    r"(?:good|great|interesting|excellent|tough|difficult|hard|fascinating) question|"
    r"(?:good|great|interesting|excellent) question|it depends|(?:it's |it is )?hard to say|"
    r"(?:it's |it is )?difficult to say|i can(?:not|'t) (?:say|answer|tell)|"
    r"i (?:am|'m) (?:not able|unable) to answer|you should ask|ask (?:someone|somebody|an expert)|"
    r"(?:just )?(?:google|look) it up)",
    re.IGNORECASE)


def stem(word: str) -> str:
    """A light stem: one common suffix off, a doubled final consonant undone."""
    for suffix in ("ing", "ed", "es", "s", "e"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3 and not word.endswith("ss"):
            word = word[: -len(suffix)]
            if suffix in ("ing", "ed") and len(word) >= 4 and word[-1] == word[-2] \
                    and word[-1] not in "aeiousl":
                word = word[:-1]
            break
    return word


def content_words(text: str) -> set[str]:
    """Stems of the words that carry a text's topic (numbers kept whole)."""
    words = _TOKEN.findall(text.lower().replace("\u2019", "'"))
    return {w if w.isdigit() else stem(w) for w in words
            if w.isdigit() or (len(w) >= 3 and w not in STOPWORDS)}


def related(a: str, b: str) -> bool:
    """Two stems name the same thing: equal numbers, or a shared prefix of up to 5 letters."""
    if a.isdigit() or b.isdigit():
        return a == b
    k = min(len(a), len(b), 5)
    return k >= 3 and a[:k] == b[:k]


def shares_topic(question: str, text: str,
                 window: int = Stage2Settings.topic_window_words) -> bool:
    """True when the first `window` words of the text name at least one content word of the
    question (or the question has none to name)."""
    wanted = content_words(question)
    found = content_words(" ".join(text.split()[:window]))
    return not wanted or any(related(w, f) for w in wanted for f in found)


def sentences(text: str) -> list[str]:
    """Sentences, with list markers stripped from the start of each line."""
    found = []
    for line in text.splitlines():
        line = _LIST_MARK.sub("", line).strip()
        found += [s.strip() for s in _SENTENCE_END.split(line) if s.strip()]
    return found


def degenerate_answer(text: str, short_words: int = Stage2Settings.short_answer_words
                      ) -> str | None:
    """core.text.degenerate_reason, except that a short numeric answer ("36.", "144") is fine."""
    reason = degenerate_reason(text)
    if reason in ("mostly non-letters", "fewer than 1 words") and any(ch.isdigit() for ch in text) \
            and len(text.split()) <= short_words:
        return None
    return reason


def continues_question(text: str) -> bool:
    """The text picks up mid-sentence, as if it were the rest of the question."""
    start = text.lstrip()
    if not start or CODE_START.match(start):
        return False
    return start[0].islower() or start.startswith(CONTINUATION_START)


def repeats_question(question: str, first: str, text: str) -> bool:
    return normalize(text).startswith(normalize(question)) or rouge_l(first, question) > 0.85


def is_dodge(question: str, text: str, window: int = Stage2Settings.topic_window_words) -> bool:
    """Opens with a dodge and says nothing about the question's topic afterwards."""
    match = DODGE.match(text.strip().replace("\u2019", "'"))
    if not match:
        return False
    rest = text.strip()[match.end():]
    return len(rest.split()) < 4 or not shares_topic(question, rest, window)


def check_answer(question: str, text: str,
                 short_words: int = Stage2Settings.short_answer_words,
                 topic_window: int = Stage2Settings.topic_window_words) -> dict:
    """The stage's answer checks: {"non_degenerate", "on_topic", "problem"} where `problem` is
    the first failed check (None: the text answers the question). Answers of at most
    `short_words` words are exempt from the topic check, which reads the first `topic_window`
    words."""
    parts = sentences(text)
    first = parts[0] if parts else ""
    short = len(text.split()) <= short_words
    on_topic = bool(text.strip()) and (short or shares_topic(question, text, topic_window))
    degenerate = degenerate_answer(text, short_words)
    checks = [
        (not text.strip(), "empty"),
        (continues_question(text), "continues the question"),
        (SCAFFOLDING.search(text), "prompt scaffolding"),
        (repeats_question(question, first, text), "repeats the question"),
        (first.endswith("?"), "asks a question instead of answering"),
        (any(p.endswith("?") for p in parts[1:]), "goes on to new questions"),
        (is_dodge(question, text, topic_window), "dodges the question"),
        (degenerate, degenerate),
        (not on_topic, "off topic"),
    ]
    problem = next((reason for failed, reason in checks if failed), None)
    return {"non_degenerate": degenerate is None, "on_topic": on_topic, "problem": problem}


def unusable_reason(text: str, guard, exemplars: list[str]) -> str | None:
    """Why a sample can be neither chosen nor rejected (None when usable)."""
    if not text.strip():
        return "empty"
    if not guard.is_clean(text):
        return "chat markup"
    if copies_exemplar(text, exemplars):
        return "copies an exemplar"
    return None


def answer_checks(settings: Stage2Settings):
    """`check_answer` with the run's settings."""
    return lambda question, text: check_answer(question, text, settings.short_answer_words,
                                               settings.topic_window_words)


def score_sample(question: str, text: str, guard, exemplars: list[str],
                 check=check_answer) -> dict:
    checks = check(question, text)
    return {**checks, "answers": checks["problem"] is None,
            "unusable": unusable_reason(text, guard, exemplars)}


# 3. scores: choosing with the judge --------------------------------------------------------------

REJECTED_PRIORITY = ("continues the question", "repeats the question",
                     "asks a question instead of answering", "goes on to new questions",
                     "prompt scaffolding", "dodges the question", "off topic")


def passers_of(samples: list[dict]) -> list[dict]:
    return first_of_each_text([s for s in samples if s["unusable"] is None and s["answers"]])


def failers_of(samples: list[dict]) -> list[dict]:
    return [s for s in samples if s["unusable"] is None and not s["answers"]]


def rank_comparisons(samples: list[dict],
                     max_judged: int = Stage2Settings.max_judged_samples) -> list[tuple[int, int]]:
    """Round-robin among the first `max_judged` distinct passers."""
    ids = [s["sample"] for s in passers_of(samples)][:max_judged]
    return [(a, b) for i, a in enumerate(ids) for b in ids[i + 1:]]


def pick_chosen(samples: list[dict], rank_judgments: list[dict]) -> dict | None:
    """The passer with the most consistent judge wins (then the earliest sample)."""
    passers = passers_of(samples)
    wins = judge_wins(rank_judgments)
    return max(passers, key=lambda s: (wins.get(s["sample"], 0), -s["sample"]), default=None)


def pick_rejected(samples: list[dict]) -> dict | None:
    """The most instructive failure: by REJECTED_PRIORITY, zero-shot first, then earliest."""
    def order(s: dict) -> tuple:
        reason = REJECTED_PRIORITY.index(s["problem"]) if s["problem"] in REJECTED_PRIORITY \
            else len(REJECTED_PRIORITY)
        return reason, s["prompting"] != "zero-shot", s["sample"]

    return min(failers_of(samples), key=order, default=None)


def judge_shots(ctx: StageContext, pool: dict, task_id: str, a: int, b: int) -> str:
    """Two judge exemplars drawn per comparison (one says A, one says B: no answer prior)."""
    rng = random.Random(seed_for(ctx.seed, "judge-exemplars", task_id, a, b))
    shots = [rng.choice([e for e in pool["judge_exemplars"] if e["better"] == side])
             for side in ("A", "B")]
    rng.shuffle(shots)
    return judge_prefix([{**e, "instruction": e["question"]} for e in shots])


def run_judge(ctx: StageContext, pool: dict, tasks: dict[str, Task], by_task: dict,
              jobs: list[tuple[str, int, int]], kind: str) -> list[dict]:
    """Judge (task, x, y) jobs in both orders; one judgment record per job."""
    if not jobs:
        return []
    items = [(judge_shots(ctx, pool, t, a, b), tasks[t].text,
              by_task[t][a]["text"], by_task[t][b]["text"]) for t, a, b in jobs]
    verdicts = judge_many(ctx.backend(), ctx.guard(), items, ctx.profile.judge_batch_size,
                          f"stage 2 judge ({kind})")
    return [{"task_id": t, "kind": kind, "x": a, "y": b, "winner": v.winner,
             "margin_xy": v.margin_xy, "margin_yx": v.margin_yx}
            for (t, a, b), v in zip(jobs, verdicts)]


def make_scores(ctx: StageContext, pool: dict) -> None:
    tasks = {t.id: t for t in load_tasks(ctx, "train")}
    guard, exemplars, check = ctx.guard(), exemplar_texts(pool), answer_checks(ctx.settings)
    scored = [{**r, **score_sample(tasks[r["task_id"]].text, r["text"], guard, exemplars,
                                   check)}
              for r in read_jsonl(ctx.path("responses.jsonl"))]
    by_task = group_by_task(scored)
    rank_jobs = [(t, a, b) for t, samples in by_task.items()
                 for a, b in rank_comparisons(samples, ctx.settings.max_judged_samples)]
    judgments = run_judge(ctx, pool, tasks, by_task, rank_jobs, "rank")
    check_jobs = []
    for t, samples in by_task.items():
        chosen = pick_chosen(samples, [j for j in judgments if j["task_id"] == t])
        rejected = pick_rejected(samples)
        if chosen and rejected:
            check_jobs.append((t, chosen["sample"], rejected["sample"]))
    judgments += run_judge(ctx, pool, tasks, by_task, check_jobs, "check")
    write_jsonl(ctx.path("judgments.jsonl"), judgments)
    write_jsonl(ctx.path("scores.jsonl"), scored)


# 4. pairs ----------------------------------------------------------------------------------------

def choose_pair(task: Task, samples: list[dict], judgments: list[dict]) -> tuple[dict | None, str]:
    """(pair, reason): the stage's pair rule applied to one task's scored samples."""
    rank = [j for j in judgments if j["kind"] == "rank"]
    chosen, rejected = pick_chosen(samples, rank), pick_rejected(samples)
    if chosen is None:
        return None, "no sample answers the question"
    if rejected is None:
        return None, "every usable sample answers (no rejected)"
    for j in judgments:
        if j["kind"] == "check" and (j["x"], j["y"]) == (chosen["sample"], rejected["sample"]) \
                and winning_sample(j) == rejected["sample"]:
            return None, "the judge prefers the rejected sample in both orders"
    return _pair(task, chosen, rejected), "ok"


def _pair(task: Task, chosen: dict, rejected: dict) -> dict:
    return {"prompt": house_prompt(task.text), "chosen": chosen["text"],
            "rejected": rejected["text"], "task_id": task.id, "source": task.source,
            "chosen_sample": chosen["sample"], "rejected_sample": rejected["sample"],
            "chosen_prompting": chosen["prompting"], "rejected_prompting": rejected["prompting"],
            "rejected_problem": rejected["problem"]}


def pair_problem(pair: dict, question: str, guard, exemplars: list[str],
                 check=check_answer) -> str | None:
    """Shared last filter: identical, marked-up, empty or exemplar-copying pairs, and a chosen
    side that does not answer."""
    if problem := shared_pair_problem(pair, guard,
                                      lambda text: unusable_reason(text, guard, exemplars)):
        return problem
    if problem := check(question, pair["chosen"])["problem"]:
        return f"chosen: {problem}"
    return None


def make_pairs(ctx: StageContext, pool: dict) -> None:
    scored = group_by_task(read_jsonl(ctx.path("scores.jsonl")))
    judgments = group_by_task(read_jsonl(ctx.path("judgments.jsonl")))
    guard, exemplars, check = ctx.guard(), exemplar_texts(pool), answer_checks(ctx.settings)
    write_pairs(ctx, load_tasks(ctx, "train"),
                lambda task: choose_pair(task, scored.get(task.id, []),
                                         judgments.get(task.id, [])),
                lambda pair, task: pair_problem(pair, task.text, guard, exemplars, check),
                "questions", "raise --limit so more questions yield a pair")


# 8. assess: the answer checks on zero-shot greedy answers --------------------------------------

def assess_questions(backend, guard, items: list[Task], cache_path: Path, max_new_tokens: int,
                     batch_size: int, where: str, check=check_answer) -> dict:
    """A zero-shot greedy answer to each held-out question, scored by the answer checks."""
    texts = generate_greedy(backend, guard, cache_path,
                            {item.id: house_prompt(item.text) for item in items},
                            max_new_tokens, batch_size, where)
    scored = []
    for item in items:
        text = texts[item.id]
        checks = check(item.text, text)
        scored.append({"id": item.id, "source": item.source, "response": text,
                       "passed": checks["problem"] is None, **checks})
    return {"summary": summarize(scored), "items": scored}


def summarize(scored: list[dict]) -> dict:
    summary = {
        "answer_rate": rate(sum(s["passed"] for s in scored), len(scored)),
        "on_topic": rate(sum(s["on_topic"] for s in scored), len(scored)),
        "non_degenerate": rate(sum(s["non_degenerate"] for s in scored), len(scored)),
    }
    for source in sorted({s["source"] for s in scored}):
        mine = [s for s in scored if s["source"] == source]
        summary[f"answer_rate_{source.replace('-', '_')}"] = rate(sum(s["passed"] for s in mine),
                                                                  len(mine))
    return summary


def count_by(records: list, key) -> dict[str, int]:
    counts: dict[str, int] = {}
    for record in records:
        counts[key(record)] = counts.get(key(record), 0) + 1
    return dict(sorted(counts.items()))


def judge_audit(judgments: list[dict], scored: list[dict]) -> dict:
    """How often the judge was order-consistent, and how often, where the answer checks tell the
    two samples apart (the chosen-vs-rejected checks), it agreed with them."""
    answers = {(s["task_id"], s["sample"]): s["answers"] for s in scored}
    return core_judge_audit(judgments, lambda j, sample: answers.get((j["task_id"], sample)))


# What the shared tail needs from stage 2 ---------------------------------------------------------

def protected_texts(ctx: StageContext) -> list[tuple[str, str]]:
    """(id, text) never to train on: this stage's held-out questions, the held-out parts of the
    real sets, and stage 1's held-out instructions (when stage 1 ran in this run)."""
    texts = [(t.id, t.text) for t in load_tasks(ctx, "heldout")]
    texts += [(i["id"], i["question"])
              for i in load_real_questions(ctx.data_dir, ctx.settings.heldout_share)
              if i["split"] == "heldout"]
    texts += [(f"stage1:{t.id}", t.text) for t in stage1_instructions(ctx)
              if t.split == "heldout"]
    return texts


def protected_sets(ctx: StageContext) -> Protected:
    """Training records may not copy the exemplars, the protected texts or the shared sets."""
    return Protected(exemplar_texts(load_pool()), protected_texts(ctx), ctx.data_dir)


def merge_probes(ctx: StageContext) -> list[str]:
    return [house_prompt(t.text) for t in load_tasks(ctx)[:8]]


def assess_heldout(ctx: StageContext, backend, label: str) -> dict:
    """Held-out questions, zero-shot and greedy: answer rate, on-topic and non-degenerate."""
    p = ctx.profile
    return assess_questions(backend, ctx.guard(), load_tasks(ctx, "heldout"),
                            ctx.heldout_cache(label), p.max_new_tokens,
                            p.gen_batch_size, f"stage 2 assess {label}",
                            answer_checks(ctx.settings))


def dev_questions(ctx: StageContext) -> list[Task]:
    """The dev split, for tuning later stages against forgetting (`tune --retention`): up to
    `dev_questions` real questions from the sets' training parts that this run did not take as
    tasks and that are not near-duplicates of its questions (never trained on, never reported).
    Empty without the shared data directory."""
    filter_ = NearDuplicateFilter(ctx.near_duplicate)
    tasks = load_tasks(ctx)
    filter_.kept.extend(t.text for t in tasks)
    real = load_real_questions(ctx.data_dir, ctx.settings.heldout_share)
    picked = pick_real(real, "train", ctx.settings.dev_questions, filter_, ctx.guard(),
                       {t.id for t in tasks}, ctx.seed, ctx.settings.max_question_words)
    return [question_task(item) for item in picked]


def assess_dev(ctx: StageContext, backend, cache: Path) -> dict:
    """The dev questions on `backend`'s model, scored as the held-out ones."""
    items = dev_questions(ctx)
    if not items:
        raise UsageError(f"stage 2 of {ctx.run_dir} has no dev questions: they are real "
                         f"questions from the shared data directory, and this run has none "
                         f"(made with --no-eval-sets, or its data dir {ctx.data_dir} lacks the "
                         f"question sets); leave out --retention")
    p = ctx.profile
    return assess_questions(backend, ctx.guard(), items, cache, p.max_new_tokens,
                            p.gen_batch_size, "stage 2 dev", answer_checks(ctx.settings))


def report_data(ctx: StageContext) -> dict:
    tasks = load_tasks(ctx)
    scored = read_jsonl(ctx.path("scores.jsonl"))
    return {
        "tasks_train": sum(t.split == "train" for t in tasks),
        "tasks_heldout": sum(t.split == "heldout" for t in tasks),
        "questions_by_source": count_by(tasks, lambda t: f"{t.source} ({t.split})"),
        "responses": len(scored),
        "sample_answer_rate": {p: rate(sum(s["answers"] for s in scored if s["prompting"] == p),
                                       sum(s["prompting"] == p for s in scored))
                               for p in ("few-shot", "zero-shot")},
        "sample_failures": count_by([s for s in scored if not s["answers"]],
                                    lambda s: s["problem"]),
        "pairs_dropped": count_by(read_jsonl(ctx.path("pairs_dropped.jsonl")),
                                  lambda d: d["reason"]),
        "judge": judge_audit(read_jsonl(ctx.path("judgments.jsonl")), scored),
    }


def plan_work(ctx: StageContext) -> WorkPlan:
    """The most work stage 2's own steps do (for --dry-run; nothing is loaded). With the shared
    data about half the questions are real ones, so the model writes the rest."""
    s, p = ctx.settings, ctx.profile
    written = ctx.limit + ctx.heldout
    if ctx.data_dir is not None:
        written -= ctx.limit // 2 + ctx.heldout // 2
    samples = p.responses_per_task + s.zero_shot_samples
    judge = round_robin_prompts(s.max_judged_samples)
    return WorkPlan(
        work=(growth_work("questions", ctx, written, s.oversample, s.max_question_rounds),
              Work("responses", prompts=ctx.limit * samples, new_tokens=p.max_new_tokens,
                   note=f"{p.responses_per_task} few-shot + {s.zero_shot_samples} zero-shot "
                        f"per question"),
              Work("scores", scored=ctx.limit * judge, note=f"at most {judge} judge prompts "
                                                             f"per question")),
        max_pairs=ctx.limit, heldout_prompts=ctx.heldout)


STAGE = Stage(
    number=2,
    name="implicit-instructions",
    summary="treat a bare question or request as an instruction and answer it, zero-shot",
    settings=Stage2Settings,
    load_pool=load_pool,
    data_steps=(Step("questions", make_questions), Step("responses", make_responses),
                Step("scores", make_scores), Step("pairs", make_pairs)),
    protected=protected_sets,
    merge_probes=merge_probes,
    assess_heldout=assess_heldout,
    assess_dev=assess_dev,
    headline="answer_rate",
    report_data=report_data,
    plan_work=plan_work,
)
