"""Stage 3 - generation tasks.

The model learns to produce examples on demand, zero-shot, in the house format: "Write N
questions about X", "Give N examples of Y", "List N <things> related to X", "Make a
multiple-choice question about Z". Steps (each resumable, each marked done only when complete):

1. topics        The pool's topics, plus topics the model proposes by few-shot *list
                 continuation* (pool topics and accepted proposals as the list; about one
                 proposal per four tasks, at most 16). Degenerate items, chat markup, list
                 scaffolding, topics of the baseline suite's generation probes (evaluation
                 data) and near-duplicates (ROUGE-L > 0.7 against pool topics, exemplar topics
                 and every accepted proposal) are dropped.
2. tasks         Pool templates crossed with topics and counts (2-5; a multiple-choice template
                 asks for one item or for 2-3). Each task carries a machine-readable spec
                 {kind, count, topic, keywords}. Train / held-out are split by *topic* (the
                 smallest topic hashes are held out), so every held-out task is about a topic
                 that training never saw; leakage is checked. All tasks go to tasks.jsonl as
                 `core.records.Task`s: text = the rendered request, kind = the spec's kind,
                 source = where the topic came from ("pool" or "model"), extra = {"spec"}.
3. responses     K samples per training task from a few-shot completion prompt: 3-4 pool
                 exemplars (task + ideal output, one of them of the task's kind), then the target.
                 The first `opened_samples` prompts of a task whose answer is a numbered list
                 (every kind but a one-item multiple-choice task) end with the opening "1." and
                 the model writes on from it; the other samples begin as the model likes, so a
                 task can pair an opened list with an unopened failure. Those first samples are
                 then written on line by line where they stop short of the form
                 (`item_by_item`): the prompt and the text so far, then "k+1." after k < N
                 numbered items, or in a multiple-choice item the next option label ("B."),
                 "Answer:" after four options, and the model continues. Openings, numbers and
                 labels are generation scaffolds like the exemplars: every word of an item is
                 the model's, every check still applies, and training prompts never show them.
                 A task whose samples hold no usable one passing every check, or none failing
                 (what the pair rule needs), draws another round of K the same way (samples
                 K .. 2K-1, their first `opened_samples` opened), up to `sample_rounds` rounds:
                 difficulty-aware sampling, more samples where a task is hard.
4. scores        Four objective checks per sample (see `check_response`): count_ok, format_ok,
                 on_topic, distinct_items. A log-probability A/B self-judge, asked in both orders,
                 ranks the passers of a task and is audited once per task against the checks.
5. pairs         chosen = a passer (the judge's order-consistent favourite among passers),
                 rejected = a failure (the one passing the most checks). A verdict that flips
                 with the order counts for nobody. A task with no such pair is restated in
                 hindsight with the number of items a good sample wrote ("Write four
                 questions" -> "Write three questions", within the kind's count range) when
                 another sample fails the restated task; source "hindsight". Identical, degenerate, marked-up,
                 scaffolding or exemplar-copying pairs are dropped. The training prompt is the
                 zero-shot house prompt: exemplars never reach it.
6. decontaminate Template state and EOS agreement; 13-gram overlap with the evaluation sets,
                 the held-out tasks and (when this run has them) the text of stage 1's and
                 stage 2's held-out tasks (read from their tasks.jsonl); exemplar copies.
7. train         DPO on a LoRA.
8. merge         into a full-precision copy of the input model, with a parity check.
9. assess        input vs merged model on the held-out tasks, zero-shot, greedy: task_success
                 (all four checks pass) and each check's rate; the baseline suite on both.
10. report       metrics.json and report.md; then DONE.

Checks (a response is split into non-empty lines; an opening line ending in ":" is a header):
- questions: every line is a question (ends with "?", list marker optional);
- examples, list: every line is a list item ("-", "*", "N." or "N)"), numbers run 1, 2, 3...;
- mcq: per item a stem, options labelled exactly A-D, then "Answer: <letter>" naming one of them;
- count_ok: exactly N items of the right form; format_ok: nothing else in the response;
- on_topic: a topic keyword, or a word sharing its Porter stem, appears in the items;
- distinct_items: ROUGE-L between any two items (MCQ: any two options, any two stems) <= the
  run's near-duplicate threshold (0.7).

Steps 6-10 are the shared tail (core/stage.py, core/lifecycle.py); this module answers what only
stage 3 knows, in `STAGE` at the bottom.
"""
from __future__ import annotations

import hashlib
import math
import random
import re
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path

import yaml
from nltk.stem.porter import PorterStemmer

from core.assess import generate_greedy
from core.contamination import Protected
from core.context import StageContext
from core.errors import RunFailure, TooLittleDataError, UsageError
from core.generation import GenRequest
from core.guards import TemplateGuard
from core.io import read_jsonl, write_jsonl
from core.listgen import ListGrowth, grow_list, growth_work
from core.judge import judge_audit as core_judge_audit
from core.judge import judge_many, judge_prefix, round_robin_prompts
from core.pairs import first_of_each_text, group_by_task, judge_wins, shared_pair_problem, write_pairs
from core.prompting import RESPONSE_STOPS, draw, house_prompt, seed_for
from core.records import TASKS_FILE, Task, earlier_tasks, read_tasks, write_tasks
from core.sampling import few_shot_requests, generate_samples, sample_openings, with_openings
from core.stage import Stage, StageSettings, Step, Work, WorkPlan, setting
from core.stats import rate
from core.text import (NearDuplicateFilter, copies_exemplar, degenerate_reason, first_near_same,
                       normalize, rouge_l)

POOL_PATH = Path(__file__).with_name("pools") / "stage3.yaml"
KINDS = ("questions", "examples", "list", "mcq")
CHECKS = ("count_ok", "format_ok", "on_topic", "distinct_items")
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}
# earlier stages whose held-out tasks join decontamination
EARLIER_HELDOUT = (1, 2)
STOPWORDS = frozenset(
    "the and for with about from into onto that this these those their its how what why who "
    "when where which our your are was were has have had not but all any some more most".split())


@dataclass(frozen=True)
class Stage3Settings(StageSettings):
    topic_temperature: float = setting(0.9, "sampling temperature for proposed topics")
    topic_proposals: int = setting(16, "most topics the model is asked to propose (besides the "
                                       "pool's)")
    tasks_per_proposal: int = setting(4, "one proposed topic is wanted per this many tasks "
                                         "(--limit + --heldout), up to topic_proposals")
    max_topic_rounds: int = setting(2, "list-continuation rounds before settling for the topics "
                                       "proposed so far")
    oversample: float = setting(1.5, "topics requested per round, as a multiple of those still "
                                     "needed")
    item_counts: tuple[int, ...] = setting(
        (2, 5), "fewest and most items a questions, examples or list task asks for")
    mcq_item_counts: tuple[int, ...] = setting(
        (2, 3), "fewest and most items a counted multiple-choice task asks for (its other "
                "templates ask for one)")
    max_judged_samples: int = setting(3, "passers per task the judge compares round-robin "
                                         "(3: 3 comparisons, 6 judge prompts)")
    hindsight: bool = setting(True, "restate a task without a pair with the number of items a "
                                    "good sample wrote (hindsight relabelling of the count)")
    sample_rounds: int = setting(3, "rounds of K samples a task may draw: a task whose samples "
                                    "so far hold no usable sample passing every check, or none "
                                    "failing, draws K more (difficulty-aware sampling); 1: one "
                                    "round")
    opened_samples: int = setting(2, "of the K samples of a task whose answer is a numbered "
                                     "list, how many start from its opening \"1.\" (0: none)")
    item_by_item: bool = setting(True, "write the first opened_samples samples of a task on "
                                       "line by line where they stop short of the form: after "
                                       "k < N numbered list items \"k+1.\"; in a multiple-"
                                       "choice item the next option label, then \"Answer:\"")


def item_counts(settings: Stage3Settings) -> dict[str, tuple[int, int]]:
    """{kind: (fewest, most)} items a counted task of that kind asks for."""
    for name in ("item_counts", "mcq_item_counts"):
        bounds = getattr(settings, name)
        if len(bounds) != 2 or not 1 <= bounds[0] <= bounds[1]:
            raise UsageError(f"stage3.{name} must be [fewest, most] with 1 <= fewest <= most, "
                             f"got {list(bounds)}")
    return {kind: tuple(settings.mcq_item_counts if kind == "mcq" else settings.item_counts)
            for kind in KINDS}


def load_pool() -> dict:
    """The project-written pool (topics, things, templates, response and judge exemplars)."""
    return yaml.safe_load(POOL_PATH.read_text(encoding="utf-8"))


def exemplar_texts(pool: dict) -> list[str]:
    """Every exemplar output, for the exemplar-copy filter. (Exemplar *instructions* share the
    task templates, so a training prompt may legitimately share long runs with them.)"""
    texts = [e["response"] for e in pool["response_exemplars"]]
    for e in pool["judge_exemplars"]:
        texts += [e["response_a"], e["response_b"]]
    return texts


def exemplar_topics(pool: dict) -> list[str]:
    return sorted({e["spec"]["topic"] for e in pool["response_exemplars"] + pool["judge_exemplars"]})


# 1. topics ---------------------------------------------------------------------------------------

def topic_list_prompt(items: list[str]) -> str:
    """A numbered topic list the base model continues with one more item."""
    lines = ["Below is a list of topics for quiz questions and classroom exercises. Every topic "
             "is different from the others.", ""]
    lines += [f"Topic {i}: {item}" for i, item in enumerate(items, start=1)]
    lines.append(f"Topic {len(items) + 1}:")
    return "\n".join(lines)


def clean_topic(text: str) -> str:
    return " ".join(text.split()).strip(" .,;\"'")


def content_words(text: str) -> list[str]:
    """Lower-case words of 3+ letters that are not stop words: a proposed topic's keywords."""
    words = re.findall(r"[a-z]+", text.lower())
    return list(dict.fromkeys(w for w in words if len(w) >= 3 and w not in STOPWORDS))


def probe_requests() -> list[str]:
    """The baseline suite's generation-task probes (evaluation data: their topics never train)."""
    from core.suites.baseline import load_probes

    return [p.text for p in load_probes()[0] if p.capability == "generation_tasks"]


def is_probe_topic(name: str, probes: list[str]) -> bool:
    """True when the topic's content words, as a phrase (stems allowed), occur in a probe."""
    phrase = " ".join(content_words(name))
    return bool(phrase) and any(mentions_topic(probe, [phrase]) for probe in probes)


def topic_problem(text: str, guard: TemplateGuard, filter_: NearDuplicateFilter,
                  probes: list[str]) -> str | None:
    """Why a proposed topic is dropped (None when it is kept; keeping it records it)."""
    if reason := degenerate_reason(text, min_words=1, max_words=6):
        return reason
    if not guard.is_clean(text):
        return "chat markup"
    if ":" in text or text.lower().startswith(("topic", "instruction", "response")):
        return "list scaffolding"
    if not content_words(text):
        return "no content words"
    if is_probe_topic(text, probes):
        return "topic of an evaluation probe"
    if not filter_.offer(text):
        return "near-duplicate"
    return None


def make_topics(ctx: StageContext, pool: dict) -> None:
    names = [t["name"] for t in pool["topics"]]
    settings = ctx.settings
    wanted = min(settings.topic_proposals,
                 math.ceil((ctx.limit + ctx.heldout) / settings.tasks_per_proposal))
    filter_ = NearDuplicateFilter(ctx.near_duplicate)
    filter_.kept.extend(names + exemplar_topics(pool))  # copies of pool topics count as repeats
    probes = probe_requests()
    guard = ctx.guard()
    growth = ListGrowth(prompt=topic_list_prompt, clean=clean_topic,
                        problem=lambda text: topic_problem(text, guard, filter_, probes),
                        temperature=settings.topic_temperature,
                        rounds=settings.max_topic_rounds, oversample=settings.oversample,
                        cache="topics.jsonl",
                        seed_names=("topic-prompt", "topic"), where="stage 3 topics")
    accepted, audit = grow_list(ctx, growth, names, wanted)
    audit += [{"id": "pool", "text": t["name"], "dropped": "topic of an evaluation probe"}
              for t in pool["topics"] if is_probe_topic(t["name"], probes)]
    topics = [{**t, "source": "pool"} for t in pool["topics"] if not is_probe_topic(t["name"], probes)]
    topics += [{"name": name, "examples": None, "keywords": content_words(name), "source": "model"}
               for name in accepted]
    write_jsonl(ctx.path("topics_audit.jsonl"), audit)
    write_jsonl(ctx.path("topics.jsonl"), topics)


# 2. tasks ----------------------------------------------------------------------------------------

def topic_key(topic: dict) -> str:
    return hashlib.sha256(normalize(topic["name"]).encode()).hexdigest()


def split_topics(topics: list[dict], limit: int, heldout: int) -> tuple[list[dict], list[dict]]:
    """(held-out topics, training topics): the topics with the smallest hashes are held out, in
    proportion to heldout / (limit + heldout), at least one on each side."""
    ordered = sorted(topics, key=topic_key)
    held = round(len(ordered) * heldout / max(1, limit + heldout))
    held = min(len(ordered) - 1, max(1, held))
    return ordered[:held], ordered[held:]


def render_task(topic: dict, kind: str, rng: random.Random, pool: dict,
                counts: dict[str, tuple[int, int]] | None = None, split: str = "train") -> Task:
    """One task of `split`: a template of `kind` filled with the topic, a count and (lists) a
    kind of thing. `counts` ({kind: (fewest, most)}, `item_counts` of the default settings when
    None) bounds a counted template's count; other templates ask for one item."""
    counts = counts or item_counts(Stage3Settings())
    templates = [t for t in pool["templates"][kind] if topic["examples"] or "{examples}" not in t]
    template = rng.choice(templates)
    count = rng.randint(*counts[kind]) if "{count}" in template else 1
    count_word = rng.random() < 0.5 and count in NUMBER_WORDS
    things = rng.choice(pool["things"])
    spec = {"kind": kind, "count": count, "topic": topic["name"],
            "keywords": list(topic["keywords"]), "template": template, "things": things,
            "examples": topic["examples"], "count_word": count_word}
    instruction = task_text(spec)
    return Task(id="g" + hashlib.sha256(normalize(instruction).encode()).hexdigest()[:10],
                stage=3, split=split, text=instruction, kind=kind, source=topic["source"],
                extra={"spec": spec})


def task_text(spec: dict) -> str:
    """The request a spec renders to (its template filled with count, topic and things)."""
    count = NUMBER_WORDS[spec["count"]] if spec["count_word"] else str(spec["count"])
    return spec["template"].format(count=count, topic=spec["topic"], examples=spec["examples"],
                                   things=spec["things"])


def tasks_for(topics: list[dict], n: int, split: str, pool: dict, seed: int,
              counts: dict[str, tuple[int, int]] | None = None) -> list[Task]:
    """`n` distinct tasks cycling through `topics`; a topic's next visit takes the next kind."""
    tasks: list[Task] = []
    seen: set[str] = set()
    for i in range(10 * n):
        if len(tasks) >= n:
            break
        topic = topics[i % len(topics)]
        kind = KINDS[(i + i // len(topics)) % len(KINDS)]
        task = render_task(topic, kind, random.Random(seed_for(seed, "task", split, i)), pool,
                           counts, split)
        if task.id not in seen:
            seen.add(task.id)
            tasks.append(task)
    return tasks


def check_leakage(tasks: list[Task], threshold: float = 0.7) -> None:
    """No held-out task may share (or nearly share) its topic or its id with a training task."""
    train = [t for t in tasks if t.split == "train"]
    train_ids = {t.id for t in train}
    train_topics = {t.extra["spec"]["topic"] for t in train}
    for task in tasks:
        if task.split != "heldout":
            continue
        topic = task.extra["spec"]["topic"]
        if task.id in train_ids:
            raise RunFailure(f"held-out task {task.id} is also a training task")
        if other := first_near_same(topic, sorted(train_topics), threshold):
            raise RunFailure(f"held-out task {task.id} leaks into training: its topic "
                               f"{topic!r} ~ training topic {other!r}")


def make_tasks(ctx: StageContext, pool: dict) -> None:
    topics = read_jsonl(ctx.path("topics.jsonl"))
    if len(topics) < 2:
        raise TooLittleDataError(
            f"stage 3 has only {len(topics)} usable topics (see {ctx.path('topics_audit.jsonl')}); "
            f"it needs at least one for training and one held out")
    held, train_topics = split_topics(topics, ctx.limit, ctx.heldout)
    counts = item_counts(ctx.settings)
    tasks = (tasks_for(held, ctx.heldout, "heldout", pool, ctx.seed, counts)
             + tasks_for(train_topics, ctx.limit, "train", pool, ctx.seed, counts))
    check_leakage(tasks, ctx.near_duplicate)
    write_tasks(ctx.path(TASKS_FILE), tasks)
    ctx.log(f"tasks: {sum(t.split == 'train' for t in tasks)} train on {len(train_topics)} "
            f"topics, {sum(t.split == 'heldout' for t in tasks)} held out on {len(held)} topics")


def load_tasks(ctx: StageContext, split: str) -> list[Task]:
    return read_tasks(ctx.path(TASKS_FILE), split)


# 3. responses ------------------------------------------------------------------------------------

def exemplar_shots(pool: dict, kind: str, rng: random.Random) -> list[tuple[str, str]]:
    """One exemplar of the task's kind and 2-3 of other kinds, in random order."""
    exemplars = pool["response_exemplars"]
    same = [e for e in exemplars if e["spec"]["kind"] == kind]
    shots = [rng.choice(same)] + draw([e for e in exemplars if e["spec"]["kind"] != kind], rng, 2, 3)
    rng.shuffle(shots)
    return [(e["instruction"], e["response"]) for e in shots]


LIST_OPENING = "1."


def task_opening(task: Task) -> str:
    """How a numbered answer to the task begins ("1."): every kind but a multiple-choice task
    asking for one item, whose stem may begin anyhow ("" for none)."""
    spec = task.extra["spec"]
    return "" if spec["kind"] == "mcq" and spec["count"] == 1 else LIST_OPENING


def response_requests(ctx: StageContext, pool: dict, tasks: list[Task],
                      first: int = 0) -> list[GenRequest]:
    """K few-shot requests per task (samples first .. first+K-1); the first `opened_samples`
    of them end with the task's opening."""
    k = ctx.profile.responses_per_task
    requests = few_shot_requests(ctx.seed, tasks, k, "response",
                                 lambda task, rng: exemplar_shots(pool, task.kind, rng), first)
    return with_openings(requests, sample_openings(tasks, k, ctx.settings.opened_samples,
                                                   task_opening, first))


def make_responses(ctx: StageContext, pool: dict) -> None:
    """K samples per training task (written on item by item); a task whose samples give no
    pair yet draws K more, up to `sample_rounds` rounds."""
    if ctx.settings.sample_rounds < 1:
        raise UsageError(f"stage3.sample_rounds must be at least 1, got "
                         f"{ctx.settings.sample_rounds}")
    tasks = load_tasks(ctx, "train")
    k = ctx.profile.responses_per_task
    guard, exemplars = ctx.guard(), exemplar_texts(pool)
    samples: list[dict] = []
    due = tasks
    for round_ in range(ctx.settings.sample_rounds):
        if round_:
            ctx.log(f"responses: {len(due)} tasks without a pair draw {k} more samples "
                    f"(round {round_ + 1})")
        samples += sample_round(ctx, pool, due, round_ * k)
        by_task = group_by_task(samples)
        due = [t for t in due if not pair_material(t, by_task[t.id], guard, exemplars,
                                                   ctx.near_duplicate)]
        if not due:
            break
    order = {t.id: i for i, t in enumerate(tasks)}
    samples.sort(key=lambda s: (order[s["task_id"]], s["sample"]))
    write_jsonl(ctx.path("responses.jsonl"), samples)


def sample_round(ctx: StageContext, pool: dict, tasks: list[Task], first: int) -> list[dict]:
    """Samples first .. first+K-1 of each task, written on item by item where set."""
    requests = response_requests(ctx, pool, tasks, first)
    samples = generate_samples(ctx, tasks, requests, ctx.profile.temperature_answer,
                               RESPONSE_STOPS, "responses", first)
    return write_items_on(ctx, tasks, requests, samples) if ctx.settings.item_by_item else samples


def pair_material(task: Task, samples: list[dict], guard: TemplateGuard, exemplars: list[str],
                  threshold: float = 0.7) -> bool:
    """True when the samples hold what the stated pair rule needs: a usable sample passing
    every check and a usable one failing."""
    scored = [score_sample(s["text"], task.extra["spec"], guard, exemplars, threshold)
              for s in samples]
    usable = [s["passed"] for s in scored if s["unusable"] is None]
    return any(usable) and not all(usable)


def next_line(text: str, spec: dict) -> str | None:
    """What a scaffolded sample is given to write on from, or None when it is complete or off
    the form: "\nk+1." after k < N well-numbered list items; for a multiple-choice task the next
    option label ("\nA." ... "\nD."), "\nAnswer:" after four options, and "\n\nk+1." after k
    < N complete items."""
    if spec["kind"] == "mcq":
        return next_mcq_line(content_lines(text), spec["count"])
    items = [parse_item(line) for line in content_lines(text)]
    numbered = [i.number for i in items if i.marked]
    if len(numbered) != len(items) or numbered != list(range(1, len(items) + 1)):
        return None
    return f"\n{len(items) + 1}." if len(items) < spec["count"] else None


def next_mcq_line(lines: list[str], count: int) -> str | None:
    """`next_line` for multiple-choice items: each a one-line stem, options A-D, an answer."""
    done, options = 0, None  # options: labels so far of the item being written (None: none)
    for line in lines:
        option, answer = OPTION.match(line), ANSWER.match(line)
        if options is None and not (option or answer):
            options = []  # a stem
        elif option and options is not None and len(options) < 4 \
                and option["label"].upper() == "ABCD"[len(options)]:
            options.append(option["label"].upper())
        elif answer and options == list("ABCD") and answer["label"] in "ABCD":
            done, options = done + 1, None
        else:
            return None
    if options is None:
        return f"\n\n{done + 1}." if 0 < done < count else None
    return f"\n{'ABCD'[len(options)]}." if len(options) < 4 else "\nAnswer:"


def write_items_on(ctx: StageContext, tasks: list[Task], requests: list[GenRequest],
                   samples: list[dict]) -> list[dict]:
    """The samples, the first `opened_samples` of each task's K written on line by line where they
    stopped short of the form (`next_line`): the prompt and the text so far, then the next
    number or label, and the model continues (cached in cache/items.jsonl). A sample hitting
    the token limit is left as it is. `scaffolded` counts the lines given to a sample."""
    specs = {t.id: t.extra["spec"] for t in tasks}
    prompts = {r.id: r.prompt for r in requests}
    k = ctx.profile.responses_per_task
    settings = ctx.sampling(ctx.profile.temperature_answer, ctx.profile.max_new_tokens,
                            RESPONSE_STOPS)
    while True:
        due = []
        for sample in samples:
            key = f"{sample['task_id']}-{sample['sample']}"
            if sample["sample"] % k < ctx.settings.opened_samples and sample["finish"] != "length" \
                    and (line := next_line(sample["text"], specs[sample["task_id"]])):
                written = sample["text"][len(sample.get("opening", "")):]
                step = sample.get("scaffolded", 0) + 1
                due.append((sample, line, GenRequest(f"{key}+{step}", prompts[key] + written + line,
                                                     seed_for(ctx.seed, "item", key, step))))
        if not due:
            return samples
        results = ctx.generate([request for _, _, request in due], settings, "items.jsonl",
                               "stage 3 items")
        for sample, line, request in due:
            result = results[request.id]
            sample["text"] = f"{sample['text']}{line}{result['text'].rstrip()}"
            sample["finish"] = result["finish"]
            sample["scaffolded"] = sample.get("scaffolded", 0) + 1


# checks ------------------------------------------------------------------------------------------

LIST_ITEM = re.compile(r"^(?:(?P<bullet>[-*])|(?P<number>\d{1,2})[.)])\s+(?P<text>\S.*)$")
OPTION = re.compile(r"^\(?(?P<label>[A-Za-z])[.):]\s+(?P<text>\S.*)$")
ANSWER = re.compile(r"^(?i:(?:correct\s+)?answer)\s*:\s*\(?(?P<label>[A-Z])\)?(?![A-Za-z])")
_STEMMER = PorterStemmer()


@dataclass(frozen=True)
class Item:
    """One line of a list-shaped response, its list marker removed."""

    text: str
    marked: bool
    number: int | None = None


@dataclass
class McqItem:
    """One multiple-choice item: stem lines, (label, text) options and the answer's letter."""

    stem: list[str]
    options: list[tuple[str, str]] = field(default_factory=list)
    answer: str | None = None


def content_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def without_header(lines: list[str]) -> list[str]:
    """Drop an opening line such as "Here are three questions:" (it is not an item)."""
    if len(lines) > 1 and lines[0].endswith(":") and not LIST_ITEM.match(lines[0]):
        return lines[1:]
    return lines


def parse_item(line: str) -> Item:
    match = LIST_ITEM.match(line)
    if match is None:
        return Item(line, marked=False)
    return Item(match["text"].strip(), True, int(match["number"]) if match["number"] else None)


def is_question(text: str) -> bool:
    return text.rstrip("\"')\u201d ").endswith("?")


def well_formed(item: Item, kind: str) -> bool:
    """Questions end with "?" (a list marker is optional); examples and list items are marked."""
    return is_question(item.text) if kind == "questions" else item.marked


def numbering_ok(items: list[Item]) -> bool:
    numbers = [i.number for i in items if i.number is not None]
    return numbers == list(range(1, len(numbers) + 1))


@lru_cache(maxsize=65536)
def stem(word: str) -> str:
    return _STEMMER.stem(word)


def _word_matches(word: str, keyword_stem: str) -> bool:
    return stem(word) == keyword_stem or (len(keyword_stem) >= 4 and word.startswith(keyword_stem))


def mentions_topic(text: str, keywords: list[str]) -> bool:
    """True when a keyword (multi-word keywords as a phrase) or a word sharing its stem appears."""
    words = re.findall(r"[a-z0-9]+", text.lower())
    for keyword in keywords:
        parts = [stem(w) for w in re.findall(r"[a-z0-9]+", keyword.lower())]
        for i in range(len(words) - len(parts) + 1):
            if parts and all(_word_matches(words[i + j], p) for j, p in enumerate(parts)):
                return True
    return False


def all_distinct(texts: list[str], threshold: float = 0.7) -> bool:
    """No two texts have ROUGE-L above the near-duplicate threshold."""
    return all(rouge_l(a, b) <= threshold for i, a in enumerate(texts) for b in texts[i + 1:])


def check_list_response(text: str, spec: dict, threshold: float = 0.7) -> dict[str, bool]:
    items = [parse_item(line) for line in without_header(content_lines(text))]
    good = [i for i in items if well_formed(i, spec["kind"])]
    texts = [i.text for i in items]
    return {"count_ok": len(good) == spec["count"],
            "format_ok": bool(items) and len(good) == len(items) and numbering_ok(items),
            "on_topic": mentions_topic(" ".join(texts), spec["keywords"]),
            "distinct_items": all_distinct(texts, threshold)}


def parse_mcq(text: str) -> tuple[list[McqItem], int]:
    """(complete items, stray lines): an item is stem lines, option lines, then an answer line.
    Lines that fit nowhere, and an item left without an answer, count as stray."""
    items: list[McqItem] = []
    stray = 0
    current: McqItem | None = None
    for line in content_lines(text):
        answer, option = ANSWER.match(line), OPTION.match(line)
        if answer:
            if current is None or not current.options:
                stray += 1
                current = None
                continue
            current.answer = answer["label"]
            items.append(current)
            current = None
        elif option and current is not None:
            current.options.append((option["label"].upper(), option["text"].strip()))
        elif current is None:
            current = McqItem([parse_item(line).text])
        elif current.options:
            stray += 1
        else:
            current.stem.append(line)
    return items, stray + (current is not None)


def mcq_well_formed(item: McqItem) -> bool:
    labels = [label for label, _ in item.options]
    return labels == ["A", "B", "C", "D"] and item.answer in labels


def check_mcq_response(text: str, spec: dict, threshold: float = 0.7) -> dict[str, bool]:
    items, stray = parse_mcq(text)
    stems = [" ".join(i.stem) for i in items]
    options = [[o for _, o in i.options] for i in items]
    return {"count_ok": sum(mcq_well_formed(i) for i in items) == spec["count"],
            "format_ok": bool(items) and stray == 0 and all(mcq_well_formed(i) for i in items),
            "on_topic": mentions_topic(" ".join(stems + [o for opts in options for o in opts]),
                                       spec["keywords"]),
            "distinct_items": all_distinct(stems, threshold)
            and all(all_distinct(o, threshold) for o in options)}


def check_response(text: str, spec: dict, threshold: float = 0.7) -> dict[str, bool]:
    """The four checks of a response against its task's spec {kind, count, keywords}; two items
    whose ROUGE-L exceeds `threshold` (the run's near-duplicate threshold) are not distinct."""
    if spec["kind"] == "mcq":
        return check_mcq_response(text, spec, threshold)
    return check_list_response(text, spec, threshold)


# 4. scores ---------------------------------------------------------------------------------------

SCAFFOLDING = re.compile(r"^(Task \d+:|Topic \d+:|Instruction:|Response( [AB])?:|###)", re.MULTILINE)


def unusable_reason(text: str, guard: TemplateGuard, exemplars: list[str]) -> str | None:
    """Why a sample can be neither chosen nor rejected (None when usable). Repeated *items* are
    not noise but a distinct_items failure, so only a line repeating itself is degenerate."""
    reason = degenerate_reason(text)
    if reason and reason != "repetitive":
        return reason
    if any(degenerate_reason(line) == "repetitive" for line in content_lines(text)):
        return "repetitive line"
    if not guard.is_clean(text):
        return "chat markup"
    if SCAFFOLDING.search(text):
        return "prompt scaffolding"
    if copies_exemplar(text, exemplars):
        return "copies an exemplar"
    return None


def score_sample(text: str, spec: dict, guard: TemplateGuard, exemplars: list[str],
                 threshold: float = 0.7) -> dict:
    checks = check_response(text, spec, threshold)
    return {"checks": checks, "passed": all(checks.values()),
            "checks_passed": sum(checks.values()), "unusable": unusable_reason(text, guard, exemplars)}


def hardest_failure(samples: list[dict]) -> dict:
    """The usable failure that passes the most checks (the lowest sample number on a tie)."""
    failers = [s for s in samples if not s["passed"] and s["unusable"] is None]
    return max(failers, key=lambda s: (s["checks_passed"], -s["sample"]))


def comparisons_for(samples: list[dict], max_judged: int = 3) -> list[tuple[int, int]]:
    """Passers among themselves (to pick the best passer), plus the first passer against the
    hardest failure (an audit of the judge against the checks)."""
    distinct = first_of_each_text([s for s in samples if s["unusable"] is None])
    passers = [s["sample"] for s in distinct if s["passed"]][:max_judged]
    pairs = [(a, b) for i, a in enumerate(passers) for b in passers[i + 1:]]
    if passers and any(not s["passed"] for s in distinct):
        pairs.append((passers[0], hardest_failure(distinct)["sample"]))
    return pairs


def judge_shots(ctx: StageContext, pool: dict, task_id: str, a: int, b: int) -> str:
    """Two judge exemplars drawn per comparison (one says A, one says B: no answer prior)."""
    rng = random.Random(seed_for(ctx.seed, "judge-exemplars", task_id, a, b))
    shots = [rng.choice([e for e in pool["judge_exemplars"] if e["better"] == side])
             for side in ("A", "B")]
    rng.shuffle(shots)
    return judge_prefix(shots)


def make_scores(ctx: StageContext, pool: dict) -> None:
    tasks = {t.id: t for t in load_tasks(ctx, "train")}
    guard, exemplars = ctx.guard(), exemplar_texts(pool)
    scored = [{**r, **score_sample(r["text"], tasks[r["task_id"]].extra["spec"], guard, exemplars,
                                   ctx.near_duplicate)}
              for r in read_jsonl(ctx.path("responses.jsonl"))]
    by_task = group_by_task(scored)
    jobs = [(task_id, a, b) for task_id, samples in by_task.items()
            for a, b in comparisons_for(samples, ctx.settings.max_judged_samples)]
    items = [(judge_shots(ctx, pool, t, a, b), tasks[t].text,
              by_task[t][a]["text"], by_task[t][b]["text"]) for t, a, b in jobs]
    verdicts = judge_many(ctx.backend(), guard, items, ctx.profile.judge_batch_size,
                          "stage 3 scores") if items else []
    judgments = [{"task_id": t, "x": a, "y": b, "winner": v.winner,
                  "margin_xy": v.margin_xy, "margin_yx": v.margin_yx}
                 for (t, a, b), v in zip(jobs, verdicts)]
    write_jsonl(ctx.path("judgments.jsonl"), judgments)
    write_jsonl(ctx.path("scores.jsonl"), scored)


# 5. pairs ----------------------------------------------------------------------------------------

def choose_pair(task: Task, samples: list[dict], judgments: list[dict],
                hindsight: Hindsight | None = None) -> tuple[dict | None, str]:
    """(pair, reason): the stated rule (`stated_pair`); when it finds no pair and `hindsight`
    is given, the count relabelling (`hindsight_pair`) on the same samples."""
    pair, reason = stated_pair(task, samples, judgments)
    if pair is None and hindsight is not None:
        relabelled = hindsight_pair(task, samples, hindsight)
        if relabelled is not None:
            return relabelled, "ok"
    return pair, reason


@dataclass(frozen=True)
class Hindsight:
    """What count relabelling may ask for: counts within the task kind's own range, and the
    run's near-duplicate threshold for the distinct-items check."""

    counts: dict[str, tuple[int, int]]
    threshold: float = 0.7


def stated_pair(task: Task, samples: list[dict], judgments: list[dict]) -> tuple[dict | None, str]:
    """chosen passes every check, rejected fails (the hardest failure)."""
    usable = [s for s in samples if s["unusable"] is None]
    passers = [s for s in usable if s["passed"]]
    if not passers:
        return None, "no sample passes the checks"
    if all(s["passed"] for s in usable):
        return None, "every usable sample passes (no rejected)"
    passer_ids = {s["sample"] for s in passers}
    wins = judge_wins([j for j in judgments if {j["x"], j["y"]} <= passer_ids])
    chosen = max(passers, key=lambda s: (wins.get(s["sample"], 0), -s["sample"]))
    return make_pair(task, chosen, hardest_failure(usable)), "ok"


def hindsight_pair(task: Task, samples: list[dict], hindsight: Hindsight) -> dict | None:
    """Hindsight relabelling of the count (Zhang et al. 2023): a sample that is well-formed,
    on topic and distinct but has another number of items than asked becomes the chosen side
    of the task restated with *its* count ("Write four questions ..." -> "... three ..."),
    when that count is within the kind's range and another sample fails the restated task.
    Samples passing most checks come first; rejected is the restated task's hardest failure.
    None when no sample qualifies, or the template asks for one item (no count to restate)."""
    spec = task.extra["spec"]
    if "{count}" not in spec.get("template", ""):  # runs before templates were recorded: none
        return None
    low, high = hindsight.counts[spec["kind"]]
    distinct = first_of_each_text([s for s in samples if s["unusable"] is None])
    for chosen in sorted(distinct, key=lambda s: (-s["checks_passed"], s["sample"])):
        count = well_formed_items(chosen["text"], spec["kind"])
        if count == spec["count"] or not low <= count <= high:
            continue
        restated = {**spec, "count": count}
        checks = {s["sample"]: check_response(s["text"], restated, hindsight.threshold)
                  for s in distinct}
        failers = [s for s in distinct if not all(checks[s["sample"]].values())]
        if not all(checks[chosen["sample"]].values()) or not failers:
            continue
        rejected = max(failers, key=lambda s: (sum(checks[s["sample"]].values()), -s["sample"]))
        task_restated = replace(task, text=task_text(restated), extra={**task.extra,
                                                                       "spec": restated})
        return {**make_pair(task_restated, chosen,
                            {**rejected, "checks": checks[rejected["sample"]]}),
                "source": "hindsight", "stated_spec": spec}
    return None


def well_formed_items(text: str, kind: str) -> int:
    """How many items of the task's form a response holds (what count_ok counts)."""
    if kind == "mcq":
        return sum(mcq_well_formed(item) for item in parse_mcq(text)[0])
    items = [parse_item(line) for line in without_header(content_lines(text))]
    return sum(well_formed(item, kind) for item in items)


def make_pair(task: Task, chosen: dict, rejected: dict) -> dict:
    return {"prompt": house_prompt(task.text), "chosen": chosen["text"],
            "rejected": rejected["text"], "task_id": task.id, "source": "checks",
            "spec": task.extra["spec"], "chosen_sample": chosen["sample"],
            "rejected_sample": rejected["sample"], "rejected_checks": rejected["checks"]}


def pair_problem(pair: dict, guard: TemplateGuard, exemplars: list[str]) -> str | None:
    """Shared last filter: identical, degenerate, marked-up, scaffolding or exemplar copies."""
    return shared_pair_problem(pair, guard, lambda text: unusable_reason(text, guard, exemplars))


def make_pairs(ctx: StageContext, pool: dict) -> None:
    scored = group_by_task(read_jsonl(ctx.path("scores.jsonl")))
    judgments = group_by_task(read_jsonl(ctx.path("judgments.jsonl")))
    guard, exemplars = ctx.guard(), exemplar_texts(pool)
    hindsight = (Hindsight(item_counts(ctx.settings), ctx.near_duplicate)
                 if ctx.settings.hindsight else None)
    write_pairs(ctx, load_tasks(ctx, "train"),
                lambda task: choose_pair(task, scored.get(task.id, []),
                                         judgments.get(task.id, []), hindsight),
                lambda pair, task: pair_problem(pair, guard, exemplars), "tasks",
                "no task had both a sample passing every check and a failing one; raise "
                "--limit, or the model cannot yet write lists in the asked form even with "
                "exemplars")


# What the shared tail needs from stage 3 ---------------------------------------------------------

def earlier_heldout(ctx: StageContext) -> list[tuple[str, str]]:
    """Held-out items of the earlier stages of this run, where they exist: they stay out of this
    stage's training data too, so re-assessing those stages later remains clean."""
    items = []
    for number in EARLIER_HELDOUT:
        tasks = earlier_tasks(ctx.run_dir, number, reader=3) or []
        items += [(f"stage{number}:{t.id}", t.text) for t in tasks if t.split == "heldout"]
    return items


def protected_sets(ctx: StageContext) -> Protected:
    """Exemplars, this stage's and the earlier stages' held-out items, and the shared sets."""
    heldout = [(t.id, t.text) for t in load_tasks(ctx, "heldout")]
    return Protected(exemplar_texts(load_pool()), heldout + earlier_heldout(ctx), ctx.data_dir)


def merge_probes(ctx: StageContext) -> list[str]:
    return [house_prompt(t.text) for t in read_tasks(ctx.path(TASKS_FILE))[:8]]


def assess_generation(backend, guard: TemplateGuard, tasks: list[Task], cache_path: Path,
                      max_new_tokens: int, batch_size: int, where: str,
                      threshold: float = 0.7) -> dict:
    """A zero-shot, greedy response per held-out task, scored by the four checks."""
    texts = generate_greedy(backend, guard, cache_path,
                            {t.id: house_prompt(t.text) for t in tasks},
                            max_new_tokens, batch_size, where)
    items = []
    for task in tasks:
        text = texts[task.id]
        checks = check_response(text, task.extra["spec"], threshold)
        items.append({"id": task.id, "kind": task.kind, "response": text,
                      "checks": checks, "passed": all(checks.values())})
    summary = {"task_success": rate(sum(i["passed"] for i in items), len(items))}
    summary.update({c: rate(sum(i["checks"][c] for i in items), len(items)) for c in CHECKS})
    # A one-sentence answer has no two items to repeat, so distinct_items is vacuously true for
    # a model that writes no list; among lists of the asked length it measures repetition.
    counted = [i for i in items if i["checks"]["count_ok"]]
    summary["distinct_items_when_count_ok"] = rate(
        sum(i["checks"]["distinct_items"] for i in counted), len(counted))
    return {"summary": summary, "items": items}


def assess_heldout(ctx: StageContext, backend, label: str) -> dict:
    """Held-out tasks (unseen topics), zero-shot and greedy: task success and per-check rates."""
    p = ctx.profile
    return assess_generation(backend, ctx.guard(), load_tasks(ctx, "heldout"),
                             ctx.heldout_cache(label), p.max_new_tokens,
                             p.gen_batch_size, f"stage 3 assess {label}", ctx.near_duplicate)


def report_data(ctx: StageContext) -> dict:
    k = ctx.profile.responses_per_task
    topics = read_jsonl(ctx.path("topics.jsonl"))
    audit = read_jsonl(ctx.path("topics_audit.jsonl"))
    scored = read_jsonl(ctx.path("scores.jsonl"))
    pairs = read_jsonl(ctx.path("pairs.jsonl"))
    return {
        "topics": {"pool": sum(t["source"] == "pool" for t in topics),
                   "model_proposed": sum(t["source"] == "model" for t in topics),
                   "dropped": sum(a["dropped"] is not None for a in audit)},
        "tasks_train": len(load_tasks(ctx, "train")),
        "tasks_heldout": len(load_tasks(ctx, "heldout")),
        "responses": len(scored),
        "sample_checks": sample_check_rates(scored),
        "sample_checks_opened": sample_check_rates([s for s in scored if "opening" in s]),
        "sample_checks_unopened": sample_check_rates([s for s in scored if "opening" not in s]),
        "sample_checks_scaffolded": sample_check_rates([s for s in scored if "scaffolded" in s]),
        "pairs_chosen_opened": chosen_opened(pairs, scored),
        "tasks_resampled": len({s["task_id"] for s in scored if s["sample"] >= k}),
        "pairs_chosen_resampled": sum(p["chosen_sample"] >= k for p in pairs),
        "pairs_dropped": len(read_jsonl(ctx.path("pairs_dropped.jsonl"))),
        "earlier_heldout_items_decontaminated": len(earlier_heldout(ctx)),
        "judge": judge_audit(read_jsonl(ctx.path("judgments.jsonl")), scored),
    }


def sample_check_rates(scored: list[dict]) -> dict:
    """How often the few-shot samples were usable, and passed each check and all of them."""
    usable = [s for s in scored if s["unusable"] is None]
    rates = {"usable": rate(len(usable), len(scored)),
             "all_checks": rate(sum(s["passed"] for s in usable), len(usable))}
    rates.update({c: rate(sum(s["checks"][c] for s in usable), len(usable)) for c in CHECKS})
    return rates


def chosen_opened(pairs: list[dict], scored: list[dict]) -> int:
    """How many kept pairs chose a sample that began from the task's opening."""
    opened = {(s["task_id"], s["sample"]) for s in scored if "opening" in s}
    return sum((p["task_id"], p["chosen_sample"]) in opened for p in pairs)


def judge_audit(judgments: list[dict], scored: list[dict]) -> dict:
    """How often the judge was order-consistent, and how often it agreed with the checks."""
    passed = {(s["task_id"], s["sample"]): s["passed"] for s in scored}
    return core_judge_audit(judgments, lambda j, sample: passed[(j["task_id"], sample)])


def plan_work(ctx: StageContext) -> WorkPlan:
    """The most work stage 3's own steps do (for --dry-run; nothing is loaded)."""
    s, p = ctx.settings, ctx.profile
    topics = min(s.topic_proposals, math.ceil((ctx.limit + ctx.heldout) / s.tasks_per_proposal))
    judge = round_robin_prompts(s.max_judged_samples)
    return WorkPlan(
        work=(growth_work("topics", ctx, topics, s.oversample, s.max_topic_rounds),
              Work("responses", prompts=ctx.limit * p.responses_per_task * s.sample_rounds,
                   new_tokens=p.max_new_tokens, note=f"{p.responses_per_task} per task, up to "
                                                     f"{s.sample_rounds} rounds"),
              Work("scores", scored=ctx.limit * judge, note=f"at most {judge} judge prompts "
                                                             f"per task")),
        max_pairs=ctx.limit, heldout_prompts=ctx.heldout)


STAGE = Stage(
    number=3,
    name="generation-tasks",
    summary=("produce examples on demand (N questions, examples or list items, or a "
             "multiple-choice item about a topic) in exactly the asked form, zero-shot"),
    settings=Stage3Settings,
    load_pool=load_pool,
    data_steps=(Step("topics", make_topics), Step("tasks", make_tasks),
                Step("responses", make_responses), Step("scores", make_scores),
                Step("pairs", make_pairs)),
    protected=protected_sets,
    merge_probes=merge_probes,
    assess_heldout=assess_heldout,
    headline="task_success",
    report_data=report_data,
    plan_work=plan_work,
)
