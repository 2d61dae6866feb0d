"""Stage 5 - revision tasks.

The model learns, given a request, a draft response and a critique, to write a revision that
fixes what the critique names and keeps the draft's content, zero-shot, in the house format.
Steps (each resumable, each marked done only when complete):

1. drafts        The model drafts answers from a few-shot completion prompt, and each draft
                 gets a sampled constraint (core.constraints) it fails. Training drafts answer
                 pool requests, only where earlier stages leave too few failures (always when
                 the stage runs alone). Held-out drafts (`real_heldout`, with the shared data
                 sets) answer real questions from the sets' fixed held-out parts
                 (core.realsets; the part stage 2 holds out too, never trained on by any stage),
                 so the held-out set reaches --heldout whatever the pool's size.
2. tasks         Revision tasks from four sources: stage 1's samples that fail some of their
                 constraints (the critique names the failed ones, phrased by
                 Constraint.describe()), the pool's hand-written tasks, the model's drafts of
                 pool requests, and its drafts of the real held-out questions (held-out only).
                 Each task carries its machine check (the constraint dicts). Drafts that are
                 degenerate, carry markup or scaffolding, or copy an exemplar are dropped. The
                 split is by a hash of the normalized request (one request, one side):
                 held-out takes one task per request, the real held-out questions' drafts
                 first, topped up from the other sources taking turns so each is represented
                 (at most a quarter of them: core.split.top_up); training tasks whose request
                 nearly equals (or whose draft equals) a held-out one are dropped, and leakage
                 is checked. All tasks (train and
                 held-out) go to tasks.jsonl as core.records.Task: text = the revision request
                 as the house prompt shows it, kind "revision", source = stage1/pool/
                 model-draft/set-draft, extra = request, draft, critique, checks, origin.
3. revisions     K revisions per training task from a few-shot completion prompt (3-4 pool
                 exemplars: request, draft, critique, revision; then the target). Where the
                 task's checks fix how a passing revision begins ("<<" for a title, "1." for
                 numbered steps), the first `opened_samples` prompts end with that opening,
                 as in stage 1; the revision's text begins with it.
4. scores        Checks on every revision: passes the named constraints; keeps the draft's
                 content (ROUGE-L >= 0.2); differs from the draft. A revision is unusable when
                 degenerate, when it starts with a meta-prefix ("Here is a revised ...",
                 "Revised response:", "Sure,", "Certainly" ...), carries scaffolding or chat
                 markup, or copies exemplar text. A log-probability A/B judge (the input model:
                 stage 4's merged model when chained), asked in both orders, compares up to 3
                 passing revisions with the task's rejected revision: which better fixes the
                 critique while keeping the content.
                 A task none of whose usable revisions passes is restated in hindsight
                 (`hindsight`; Zhang et al. 2023): when a revision keeps the draft's content,
                 changes it and meets requirements the draft fails while another revision does
                 not (the stated checks it meets, else one catalogue constraint), the critique
                 is rewritten to name those (hindsight_tasks.jsonl), the revisions are checked
                 against it, and the judge compares them under it, as for a stated task.
5. pairs         chosen = a revision that passes every check AND wins the judgment in both
                 orders; rejected = a failing revision, preferring one that keeps the content but
                 misses the fix. A task without such a pair takes its hindsight restatement's
                 pair, by the same rule (rule "hindsight"; the training prompt then carries the
                 restated critique). Ties, judge-prefers-failure, identical, unusable and
                 exemplar-copying pairs are dropped. The training prompt is the zero-shot house
                 prompt: exemplars never reach it.
6. decontaminate Template state and EOS agreement; 13-gram overlap with evaluation sets and the
                 held-out requests and drafts; exemplar copies.
7. train         DPO on a LoRA.
8. merge         into a full-precision copy of the input model, with a parity check.
9. assess        input vs merged model on the held-out tasks, zero-shot and greedy:
                 "revision_success" (headline), "fixes_critique", "keeps_content".
10. report       metrics.json and report.md; then DONE.

Steps 6-10 are the shared tail (core/stage.py, core/lifecycle.py); this module answers what only
stage 5 knows, in `STAGE` at the bottom.
"""
from __future__ import annotations

import hashlib
import math
import random
import re
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import yaml

from core.assess import greedy
from core.constraints import (constraint_from_dict, hindsight_constraints, response_opening,
                              sample_constraints)
from core.contamination import Protected
from core.context import StageContext
from core.errors import RunFailure, TooLittleDataError
from core.generation import GenRequest, generate_cached
from core.io import read_jsonl, write_jsonl
from core.judge import judge_audit as core_judge_audit
from core.judge import judge_many, judge_prefix, round_robin_prompts, winning_sample
from core.pairs import group_by_task, shared_pair_problem, write_pairs
from core.prompting import RESPONSE_STOPS, draw, few_shot_prompt, house_prompt, seed_for
from core.realsets import HELDOUT_SHARE, load_real_questions, pick_real
from core.records import TASKS_FILE, Task, earlier_records, earlier_tasks, read_tasks, write_tasks
from core.sampling import few_shot_requests, sample_openings, sample_to_file, with_openings
from core.stage import Stage, StageSettings, Step, Work, WorkPlan, setting
from core.split import in_turn, top_up
from core.stats import rate
from core.suites.baseline import REVISION_TEXT
from core.text import (NearDuplicateFilter, copies_exemplar, degenerate_reason, near_same,
                       normalize, rouge_l)

POOL_PATH = Path(__file__).with_name("pools") / "stage5.yaml"


@dataclass(frozen=True)
class Stage5Settings(StageSettings):
    keeps_content: float = setting(0.2, "ROUGE-L between a revision and its draft at or above "
                                        "which the revision keeps the draft's content")
    max_tasks_per_request: int = setting(2, "revision tasks kept per request from stage 1's "
                                            "failures (it fails one instruction many times: "
                                            "keep requests diverse)")
    draft_oversample: float = setting(1.5, "model drafts requested, as a multiple of the tasks "
                                           "the earlier stages leave missing")
    constraint_tries: int = setting(4, "constraints sampled per model draft until one it fails "
                                       "is found")
    max_judged_revisions: int = setting(3, "passing revisions per task the judge compares with "
                                           "the rejected one")
    opened_samples: int = setting(2, "of the K revisions of a task whose checks fix how a "
                                     "response begins, how many start from that opening "
                                     "(0: none)")
    real_heldout: bool = setting(True, "with the shared data sets, held-out tasks are drafts of "
                                       "real questions from the sets' held-out parts (the "
                                       "pool alone leaves fewer than 30 held-out requests)")
    real_heldout_share: float = setting(HELDOUT_SHARE, "the sets' held-out part, by a hash "
                                                       "of the item id: keep it equal to "
                                                       "stage2.heldout_share")
    hindsight: bool = setting(True, "restate a task none of whose revisions passes with a "
                                    "critique naming what a good revision did fix (hindsight "
                                    "relabelling); judged like a stated task")


HINDSIGHT_FILE = "hindsight_tasks.jsonl"  # training tasks restated in hindsight (scores step)
SOURCES = ("stage1", "model-draft", "pool")  # the order sources take turns in the split
HELDOUT_SOURCE = "set-draft"  # drafts of real held-out questions: held-out only, never trained
JUDGE_CRITERION = "The better revision fixes what the critique names and keeps the draft's content."

# Lines of prompt scaffolding a revision or draft must never contain.
SCAFFOLDING = re.compile(r"^\s*(?:(?:Request|Draft|Critique|Revision|Instruction|Answer|"
                         r"Response(?: [AB])?|Task \d+):|Rewrite the draft so that)",
                         re.MULTILINE | re.IGNORECASE)
# Talk about the revision instead of the revision ("drop those").
META_PREFIX = re.compile(
    r"(?:here(?:'s| is| are)\b[^\n:]{0,40}?\b(?:revis|rewr|updat|correct|improv|edit|fix|new|"
    r"version)\w*"
    r"|(?:revised|rewritten|updated|corrected|improved|edited)\b[^\n:]{0,25}:"
    r"|revision\s*:"
    r"|i(?: have|'ve)\s+(?:revised|rewritten|updated|corrected|fixed|edited)"
    r"|(?:sure|okay|ok)\s*[,!.:]|certainly\b|of course\b|absolutely\b[,!.]?)",
    re.IGNORECASE)


def load_pool() -> dict:
    """The project-written pool: revision exemplars, judge exemplars, tasks, requests."""
    return yaml.safe_load(POOL_PATH.read_text(encoding="utf-8"))


def exemplar_texts(pool: dict) -> list[str]:
    """Every exemplar text a generation prompt shows, for the exemplar-copy filter. Critiques are
    left out: the templated ones are shared by design with the tasks' critiques."""
    texts = []
    for e in pool["revision_exemplars"]:
        texts += [e["request"], e["draft"], e["revision"]]
    for e in pool["judge_exemplars"]:
        texts += [e["request"], e["draft"], e["revision_a"], e["revision_b"]]
    return texts


# shared text rules -------------------------------------------------------------------------------

def same_text(text: str) -> str:
    """Identity key: spaces folded within lines, line and paragraph breaks, case and punctuation
    kept (they carry constraints)."""
    lines = "\n".join(" ".join(line.split()) for line in text.strip().splitlines())
    return re.sub(r"\n{3,}", "\n\n", lines)


def critique_for(checks: list[dict]) -> str:
    """The critique naming failed constraints, phrased by Constraint.describe()."""
    sentences = " ".join(constraint_from_dict(c).describe() for c in checks)
    what = "this requirement" if len(checks) == 1 else "these requirements"
    return (f"The response does not follow {what}: {sentences} "
            f"Rewrite it so that it does, keeping its content.")


def revision_text(request: str, draft: str, critique: str) -> str:
    """The revision request (the baseline suite's wording): request, draft, critique. A task's
    `text` is this, as the house prompt shows it."""
    return REVISION_TEXT.format(instruction=request.strip(), response=draft.strip(),
                                critique=critique.strip())


def exemplar_text(exemplar: dict) -> str:
    """The revision request of a pool exemplar (request, draft, critique)."""
    return revision_text(exemplar["request"], exemplar["draft"], exemplar["critique"])


def meta_prefix(text: str, draft: str, checks: list[dict]) -> str | None:
    """The meta-prefix `text` starts with, or None. A phrase the checks demand at the start, or
    one the draft already began with, is content, not a meta-prefix."""
    body = text.lstrip()
    for check in checks:
        phrase = check["params"].get("phrase", "") if check["kind"] == "start_with" else ""
        if phrase and body.startswith(phrase):
            body = body[len(phrase):].lstrip(" \t\n,;:-")
    match = META_PREFIX.match(body)
    if match is None or normalize(draft).startswith(normalize(match.group(0))):
        return None
    return match.group(0)


def draft_problem(draft: str, guard, exemplars: list[str]) -> str | None:
    """Why a draft cannot become a revision task (None when it can)."""
    if reason := degenerate_reason(draft):
        return reason
    if not guard.is_clean(draft):
        return "chat markup"
    if SCAFFOLDING.search(draft):
        return "prompt scaffolding"
    if copies_exemplar(draft, exemplars):
        return "copies an exemplar"
    return None


def revision_checks(text: str, task: Task, keeps_content: float = 0.2) -> dict:
    """The objective checks of one revision against its task (it keeps the draft's content when
    their ROUGE-L is at least `keeps_content`)."""
    draft = task.extra["draft"]
    results = [constraint_from_dict(c).check(text) for c in task.extra["checks"]]
    similarity = rouge_l(text, draft)
    fixes, keeps = all(results), similarity >= keeps_content
    changed = same_text(text) != same_text(draft)
    return {"constraint_results": results, "fixes_critique": fixes, "keeps_content": keeps,
            "changed": changed, "rouge_draft": round(similarity, 4),
            "passed": fixes and keeps and changed}


def unusable_reason(text: str, task: Task, guard, exemplars: list[str]) -> str | None:
    """Why a revision can be neither chosen nor rejected (None when usable)."""
    if reason := degenerate_reason(text):
        return reason
    if not guard.is_clean(text):
        return "chat markup"
    if SCAFFOLDING.search(text):
        return "prompt scaffolding"
    if prefix := meta_prefix(text, task.extra["draft"], task.extra["checks"]):
        return f"meta-prefix {prefix.strip()!r}"
    if copies_exemplar(text, exemplars):
        return "copies an exemplar"
    return None


# 1. drafts ---------------------------------------------------------------------------------------

def make_task(request: str, draft: str, checks: list[dict], source: str,
              critique: str | None = None, origin: str | None = None,
              split: str = "train") -> Task:
    """A revision task; its id hashes the request and the draft. Its text is the revision
    request; extra holds request, draft, critique, checks (constraint dicts) and origin. A
    candidate carries split "train" until `split_tasks` places it."""
    key = normalize(request) + "\x1f" + same_text(draft)
    critique = critique or critique_for(checks)
    return Task(id="r" + hashlib.sha256(key.encode()).hexdigest()[:10], stage=5, split=split,
                text=revision_text(request, draft, critique), kind="revision", source=source,
                extra={"request": request.strip(), "draft": draft.strip(), "critique": critique,
                       "checks": checks, "origin": origin})


def stage1_failures(run_dir: Path, per_request: int = 2) -> list[Task]:
    """Stage 1's usable samples that fail some of their task's constraints, as revision tasks,
    at most `per_request` per request (empty when stage 1 has not run in this run directory).
    The request is the stage 1 task's bare instruction (extra["instruction"]), the checks its
    failed constraints (extra["constraints"])."""
    written = earlier_tasks(run_dir, 1, reader=5)
    scores = earlier_records(run_dir, 1, "scores.jsonl", reader=5)
    if scores is None or written is None:
        return []
    instructions = {t.id: t for t in written}
    tasks = []
    for sample in scores:
        task = instructions[sample["task_id"]]
        failed = [c for c, ok in zip(task.extra["constraints"], sample["constraint_results"])
                  if not ok]
        if failed and sample["unusable"] is None:
            tasks.append(make_task(task.extra["instruction"], sample["text"], failed, "stage1",
                                   origin=f"{sample['task_id']}-{sample['sample']}"))
    return cap_per_request(tasks, per_request)


def cap_per_request(tasks: list[Task], per_request: int) -> list[Task]:
    """At most `per_request` tasks per normalized request, one per task id."""
    kept: dict[str, list[Task]] = {}
    for task in sorted({t.id: t for t in tasks}.values(), key=lambda t: t.id):
        group = kept.setdefault(normalize(task.extra["request"]), [])
        if len(group) < per_request:
            group.append(task)
    return [t for group in kept.values() for t in group]


def failing_constraint(draft: str, request: str, seed: int, tries: int = 4) -> list[dict] | None:
    """A sampled constraint the draft fails (`tries` constraints sampled), as check dicts."""
    for attempt in range(tries):
        rng = random.Random(seed_for(seed, "draft-constraint", normalize(request), attempt))
        constraint = sample_constraints(rng, 1)[0]
        if not constraint.check(draft):
            return [constraint.to_dict()]
    return None


def heldout_requests(ctx: StageContext, pool: dict) -> list[str]:
    """Real questions of the shared sets' held-out parts to draft for held-out tasks:
    `draft_oversample` x --heldout of them (drafts that pass their sampled constraint, or are
    degenerate, become no task), none near a pool request or exemplar. Empty without the sets
    or with `real_heldout` off."""
    settings = ctx.settings
    if not settings.real_heldout:
        return []
    filter_ = NearDuplicateFilter(ctx.near_duplicate)
    filter_.kept.extend(list(pool["requests"]) + [t["request"] for t in pool["tasks"]]
                        + [e["request"] for e in pool["revision_exemplars"]])
    real = load_real_questions(ctx.data_dir, settings.real_heldout_share)
    picked = pick_real(real, "heldout", math.ceil(ctx.heldout * settings.draft_oversample),
                       filter_, ctx.guard(), set(), ctx.seed)
    return [item["question"] for item in picked]


def training_requests(ctx: StageContext, pool: dict, real_heldout: int) -> list[str]:
    """Pool requests to draft, as many as the earlier stages leave missing (held-out tasks
    count as missing too when no real held-out question supplies them)."""
    settings = ctx.settings
    missing = ctx.limit + max(0, ctx.heldout - real_heldout) - len(
        stage1_failures(ctx.run_dir, settings.max_tasks_per_request))
    requests = list(pool["requests"])
    random.Random(seed_for(ctx.seed, "draft-requests")).shuffle(requests)
    return requests[: max(0, math.ceil(missing * settings.draft_oversample))]


def make_drafts(ctx: StageContext, pool: dict) -> None:
    """Model drafts of pool requests (training) and of real held-out questions (held-out)."""
    held = heldout_requests(ctx, pool)
    train = training_requests(ctx, pool, len(held))
    jobs = [(f"d{i}", r, "model-draft") for i, r in enumerate(train)] \
        + [(f"h{i}", r, HELDOUT_SOURCE) for i, r in enumerate(held)]
    records = []
    if jobs:
        shots_pool = [(e["request"], e["draft"]) for e in pool["revision_exemplars"]]
        gen = [GenRequest(key, few_shot_prompt(
                   draw(shots_pool, random.Random(seed_for(ctx.seed, "draft-exemplars", r))), r),
                   seed_for(ctx.seed, "draft", r)) for key, r, _ in jobs]
        sampling = ctx.sampling(ctx.profile.temperature_answer, ctx.profile.max_new_tokens,
                                RESPONSE_STOPS)
        results = ctx.generate(gen, sampling, "drafts.jsonl", "stage 5 drafts")
        for key, request, source in jobs:
            draft = results[key]["text"].strip()
            records.append({"request": request, "draft": draft, "source": source,
                            "checks": failing_constraint(draft, request, ctx.seed,
                                                         ctx.settings.constraint_tries)})
    write_jsonl(ctx.path("drafts.jsonl"), records)
    ctx.log(f"drafts: {len(train)} of pool requests, {len(held)} of real held-out questions")


# 2. tasks ----------------------------------------------------------------------------------------

def pool_tasks(pool: dict) -> list[Task]:
    return [make_task(t["request"], t["draft"], t["check"], "pool", critique=t["critique"])
            for t in pool["tasks"]]


def drafted_tasks(ctx: StageContext) -> list[Task]:
    """Tasks of the drafts that fail a sampled constraint (drafts written before held-out
    drafts existed carry no source: they are pool drafts)."""
    return [make_task(d["request"], d["draft"], d["checks"], d.get("source", "model-draft"))
            for d in read_jsonl(ctx.path("drafts.jsonl")) if d["checks"]]


def request_key(request: str) -> str:
    return hashlib.sha256(normalize(request).encode()).hexdigest()


def split_tasks(tasks: list[Task], limit: int, heldout: int, threshold: float = 0.7) -> list[Task]:
    """Held-out: one task from each of `heldout` requests, the real held-out questions' drafts
    (HELDOUT_SOURCE) first, topped up from the other sources; training: the other requests'
    tasks (minus near-duplicates, ROUGE-L > `threshold`, of a held-out request, or copies of a
    held-out draft), at most `limit`, never a HELDOUT_SOURCE task. The other sources take turns
    (stage 1, model drafts, pool), each in hash order, so every source is represented whatever
    the limit. Stable under resume and input order."""
    groups: dict[str, list[Task]] = {}
    for task in sorted(tasks, key=lambda t: t.id):
        groups.setdefault(request_key(task.extra["request"]), []).append(task)
    reserved = [k for k in sorted(groups) if groups[k][0].source == HELDOUT_SOURCE][:heldout]
    keys = in_turn([k for k in sorted(groups) if groups[k][0].source == source]
                   for source in SOURCES)
    extra = top_up(len(reserved), len(keys), heldout)
    held = [groups[k][0] for k in reserved + keys[:extra]]
    train = {source: [t for _, _, t in sorted(
                 (rank, t.id, t) for k in keys[extra:] for rank, t in enumerate(groups[k])
                 if t.source == source and not near_heldout(t, held, threshold))]
             for source in SOURCES}
    chosen = in_turn(train.values())[:limit]
    return ([replace(t, split="heldout") for t in held]
            + [replace(t, split="train") for t in chosen])


def near_heldout(task: Task, held: list[Task], threshold: float) -> bool:
    """The task's request nearly equals (ROUGE-L > threshold), or its draft equals, a held-out
    one."""
    return any(rouge_l(task.extra["request"], h.extra["request"]) > threshold or
               same_text(task.extra["draft"]) == same_text(h.extra["draft"]) for h in held)


def check_leakage(tasks: list[Task], threshold: float) -> None:
    """No held-out request may equal or nearly equal (ROUGE-L > threshold) a training one, nor
    a held-out draft equal a training one."""
    train = [t for t in tasks if t.split == "train"]
    for task in (t for t in tasks if t.split == "heldout"):
        for other in train:
            if near_same(other.extra["request"], task.extra["request"], threshold) or \
                    same_text(other.extra["draft"]) == same_text(task.extra["draft"]):
                raise RunFailure(f"held-out task {task.id} leaks into training: "
                                 f"{task.extra['request']!r} ~ {other.extra['request']!r}")


def make_tasks(ctx: StageContext, pool: dict) -> None:
    guard, exemplars = ctx.guard(), exemplar_texts(pool)
    stage1 = stage1_failures(ctx.run_dir, ctx.settings.max_tasks_per_request)
    candidates = list({t.id: t for t in stage1 + pool_tasks(pool)
                       + drafted_tasks(ctx)}.values())
    audit = [{"id": t.id, "source": t.source,
              "dropped": draft_problem(t.extra["draft"], guard, exemplars)} for t in candidates]
    usable = [t for t, a in zip(candidates, audit) if a["dropped"] is None]
    write_jsonl(ctx.path("tasks_audit.jsonl"), audit)
    tasks = split_tasks(usable, ctx.limit, ctx.heldout, ctx.near_duplicate)
    check_leakage(tasks, ctx.near_duplicate)
    if not any(t.split == "train" for t in tasks):
        raise TooLittleDataError(
            f"stage 5 has no training tasks (see {ctx.path('tasks_audit.jsonl')})")
    write_tasks(ctx.path(TASKS_FILE), tasks)
    ctx.log(f"tasks: {dict(Counter(t.split for t in tasks))} from "
            f"{dict(Counter(t.source for t in tasks))}")


def load_tasks(ctx: StageContext, split: str) -> list[Task]:
    return read_tasks(ctx.path(TASKS_FILE), split)


# 3. revisions ------------------------------------------------------------------------------------

def revision_requests(ctx: StageContext, pool: dict, tasks: list[Task]) -> list[GenRequest]:
    """K few-shot revision requests per task; the first `opened_samples` of a task whose checks
    fix how a passing revision begins ("<<" for a title the critique asks for) end with that
    opening, as stage 1's responses do."""
    k = ctx.profile.responses_per_task
    requests = few_shot_requests(
        ctx.seed, tasks, k, "revision",
        lambda task, rng: [(exemplar_text(e), e["revision"])
                           for e in draw(pool["revision_exemplars"], rng)])
    openings = sample_openings(tasks, k, ctx.settings.opened_samples,
                               lambda task: response_opening(task.extra["checks"]))
    return with_openings(requests, openings)


def make_revisions(ctx: StageContext, pool: dict) -> None:
    tasks = load_tasks(ctx, "train")
    sample_to_file(ctx, tasks, revision_requests(ctx, pool, tasks),
                   ctx.profile.temperature_answer, RESPONSE_STOPS, "revisions")


# 4. scores ---------------------------------------------------------------------------------------

def score_revision(text: str, task: Task, guard, exemplars: list[str],
                   keeps_content: float = 0.2) -> dict:
    return {**revision_checks(text, task, keeps_content),
            "unusable": unusable_reason(text, task, guard, exemplars)}


def distinct_usable(samples: list[dict]) -> list[dict]:
    """Usable samples, the first of each text only."""
    seen: set[str] = set()
    kept = []
    for sample in samples:
        if sample["unusable"] is None and same_text(sample["text"]) not in seen:
            seen.add(same_text(sample["text"]))
            kept.append(sample)
    return kept


def rejected_revision(failers: list[dict]) -> dict:
    """The failing revision to reject: one that keeps the content and changes the draft but
    misses the fix first, then the one closest to passing the named checks."""
    return max(failers, key=lambda s: (s["keeps_content"] and s["changed"],
                                       sum(s["constraint_results"]), s["rouge_draft"],
                                       -s["sample"]))


def judge_jobs(task_id: str, samples: list[dict], seed: int,
               max_judged: int = 3) -> list[tuple[str, int, int, int]]:
    """(task id, x, y, passer) comparisons: up to `max_judged` passing revisions against the
    rejected one; which is shown first is a seeded coin (both orders are asked anyway)."""
    usable = distinct_usable(samples)
    passers = [s["sample"] for s in usable if s["passed"]][:max_judged]
    failers = [s for s in usable if not s["passed"]]
    if not passers or not failers:
        return []
    rejected = rejected_revision(failers)["sample"]
    jobs = []
    for passer in passers:
        first = seed_for(seed, "judge-order", task_id, passer) % 2 == 0
        x, y = (passer, rejected) if first else (rejected, passer)
        jobs.append((task_id, x, y, passer))
    return jobs


def judge_instruction(text: str) -> str:
    """The judge's request: a revision request (a task's text) and the criterion."""
    return text + "\n\n" + JUDGE_CRITERION


def judge_shots(ctx: StageContext, pool: dict, task_id: str, x: int, y: int) -> str:
    """Two judge exemplars per comparison (one says A, one says B: no answer prior)."""
    rng = random.Random(seed_for(ctx.seed, "judge-exemplars", task_id, x, y))
    shots = [rng.choice([e for e in pool["judge_exemplars"] if e["better"] == side])
             for side in ("A", "B")]
    rng.shuffle(shots)
    return judge_prefix([{"instruction": judge_instruction(exemplar_text(e)),
                          "response_a": e["revision_a"], "response_b": e["revision_b"],
                          "better": e["better"]} for e in shots])


def judgment_records(jobs: list[tuple[str, int, int, int]], verdicts: list) -> list[dict]:
    return [{"task_id": t, "x": x, "y": y, "passer": passer, "winner": v.winner,
             "margin_xy": v.margin_xy, "margin_yx": v.margin_yx}
            for (t, x, y, passer), v in zip(jobs, verdicts)]


def make_scores(ctx: StageContext, pool: dict) -> None:
    tasks = {t.id: t for t in load_tasks(ctx, "train")}
    guard, exemplars = ctx.guard(), exemplar_texts(pool)
    settings = ctx.settings
    scored = [{**r, **score_revision(r["text"], tasks[r["task_id"]], guard, exemplars,
                                     settings.keeps_content)}
              for r in read_jsonl(ctx.path("revisions.jsonl"))]
    by_task = group_by_task(scored)
    restated = [r for task_id, samples in by_task.items() if settings.hindsight
                and (r := hindsight_task(tasks[task_id], samples, ctx.seed))]
    judged = {**{t: (tasks[t], samples) for t, samples in by_task.items()},
              **{f"{r.id}@hindsight": (r, rescored(by_task[r.id], r, settings.keeps_content))
                 for r in restated}}
    jobs = [job for key, (_, samples) in judged.items()
            for job in judge_jobs(key, samples, ctx.seed, settings.max_judged_revisions)]
    items = [(judge_shots(ctx, pool, key, x, y), judge_instruction(judged[key][0].text),
              judged[key][1][x]["text"], judged[key][1][y]["text"]) for key, x, y, _ in jobs]
    verdicts = judge_many(ctx.backend(), guard, items, ctx.profile.judge_batch_size,
                          "stage 5 scores") if items else []
    write_jsonl(ctx.path("judgments.jsonl"), judgment_records(jobs, verdicts))
    write_tasks(ctx.path(HINDSIGHT_FILE), restated)
    write_jsonl(ctx.path("scores.jsonl"), scored)


def hindsight_task(task: Task, samples: list[dict], seed: int) -> Task | None:
    """Hindsight relabelling of the critique (Zhang et al. 2023) for a task none of whose usable
    revisions passes: the first revision that keeps the draft's content and changes it, and
    meets requirements the draft fails while another revision does not, makes the task restated
    with a critique naming those (`core.constraints.hindsight_constraints`: the stated checks it
    meets, else one catalogue constraint). Revisions meeting most stated checks come first.
    None when no revision qualifies."""
    usable = distinct_usable(samples)
    if any(s["passed"] for s in usable):
        return None
    stated = [constraint_from_dict(c) for c in task.extra["checks"]]
    rng = random.Random(seed_for(seed, "hindsight", task.id))
    ranked = sorted((s for s in usable if s["keeps_content"] and s["changed"]),
                    key=lambda s: (-sum(s["constraint_results"]), s["sample"]))
    for chosen in ranked:
        others = [s["text"] for s in usable if s is not chosen]
        labels = hindsight_constraints(chosen["text"], others, stated, rng,
                                       unmet_by=(task.extra["draft"],))
        if labels:
            checks = [c.to_dict() for c in labels]
            critique = critique_for(checks)
            return replace(task, text=revision_text(task.extra["request"], task.extra["draft"],
                                                    critique),
                           extra={**task.extra, "checks": checks, "critique": critique,
                                  "stated_checks": task.extra["checks"]})
    return None


def restated_tasks(ctx: StageContext) -> dict[str, Task]:
    """{task id: the task restated in hindsight} (none from a scores step made before
    hindsight existed)."""
    path = ctx.path(HINDSIGHT_FILE)
    return {t.id: t for t in read_tasks(path)} if path.is_file() else {}


def rescored(samples: list[dict], task: Task, keeps_content: float) -> list[dict]:
    """The samples with their checks against `task` (a task restated in hindsight)."""
    return [{**s, **revision_checks(s["text"], task, keeps_content)} for s in samples]


# 5. pairs ----------------------------------------------------------------------------------------

def choose_pair(task: Task, samples: list[dict], judgments: list[dict]) -> tuple[dict | None, str]:
    """(pair, reason): chosen passes the checks and wins the judgment in both orders against
    the rejected failing revision."""
    usable = distinct_usable(samples)
    passers = {s["sample"]: s for s in usable if s["passed"]}
    failers = [s for s in usable if not s["passed"]]
    if not passers:
        return None, "no revision passes the checks"
    if not failers:
        return None, "no failing revision (no rejected)"
    rejected = rejected_revision(failers)
    judged = [j for j in judgments if {j["x"], j["y"]} - {rejected["sample"]} <= set(passers)
              and rejected["sample"] in (j["x"], j["y"])]
    if not judged:
        return None, "not judged"
    wins = [j for j in judged if winning_sample(j) in passers]
    if not wins:
        if all(j["winner"] == "tie" for j in judged):
            return None, "judge tie (orders disagree)"
        return None, "judge prefers the failing revision"
    best = max(wins, key=lambda j: abs(j["margin_xy"] + j["margin_yx"]))
    return make_pair(task, passers[winning_sample(best)], rejected, best), "ok"


def make_pair(task: Task, chosen: dict, rejected: dict, judgment: dict) -> dict:
    return {"prompt": house_prompt(task.text), "chosen": chosen["text"],
            "rejected": rejected["text"], "task_id": task.id, "source": task.source,
            "origin": task.extra["origin"], "checks": task.extra["checks"],
            "chosen_sample": chosen["sample"], "rejected_sample": rejected["sample"],
            "rejected_keeps_content": rejected["keeps_content"] and rejected["changed"],
            "judge_margin": round((judgment["margin_xy"] + judgment["margin_yx"]) / 2, 4)}


def pair_problem(pair: dict, task: Task, guard, exemplars: list[str]) -> str | None:
    """Shared last filter: identical, markup, unusable or exemplar-copying pairs."""
    return shared_pair_problem(pair, guard,
                               lambda text: unusable_reason(text, task, guard, exemplars),
                               key=same_text)


def make_pairs(ctx: StageContext, pool: dict) -> None:
    scored = read_jsonl(ctx.path("scores.jsonl"))
    judgments = read_jsonl(ctx.path("judgments.jsonl"))
    guard, exemplars = ctx.guard(), exemplar_texts(pool)
    scored_by, judged_by = group_by_task(scored), group_by_task(judgments)
    restated = restated_tasks(ctx)

    def choose(task: Task) -> tuple[dict | None, str]:
        pair, reason = choose_pair(task, scored_by.get(task.id, []), judged_by.get(task.id, []))
        if pair is not None or task.id not in restated:
            return pair, reason
        again = restated[task.id]
        pair, why = choose_pair(again, rescored(scored_by[task.id], again,
                                                ctx.settings.keeps_content),
                                judged_by.get(f"{task.id}@hindsight", []))
        if pair is None:
            return None, f"restated in hindsight, then: {why}"
        return {**pair, "rule": "hindsight", "stated_checks": task.extra["checks"]}, "ok"

    write_pairs(ctx, load_tasks(ctx, "train"), choose,
                lambda pair, task: pair_problem(pair, restated.get(task.id, task)
                                                if pair.get("rule") == "hindsight" else task,
                                                guard, exemplars), "tasks",
                no_pairs_hint(scored, judgments))


def no_pairs_hint(scored: list[dict], judgments: list[dict]) -> str:
    """Why no pair came out, in numbers: the checks, then the judge."""
    usable = [s for s in scored if s["unusable"] is None]
    ties = sum(j["winner"] == "tie" for j in judgments)
    return (f"of {len(scored)} revisions {len(usable)} are usable, "
            f"{sum(s['fixes_critique'] for s in usable)} fix the critique, "
            f"{sum(s['keeps_content'] and s['changed'] for s in usable)} keep the draft's content "
            f"and change it, {sum(s['passed'] for s in usable)} pass every check; the judge tied "
            f"(orders disagree) on {ties} of {len(judgments)} comparisons. The input model cannot "
            f"yet revise or judge revisions: use a stronger model, or raise --limit")




# held-out assessment rules -----------------------------------------------------------------------

def assessed_item(task: Task, text: str, keeps_content: float = 0.2) -> dict:
    """One held-out revision scored: success = fixes the critique, keeps the content, changes
    the draft, is not degenerate and has no meta-prefix."""
    checks = revision_checks(text, task, keeps_content)
    degenerate = degenerate_reason(text)
    prefix = meta_prefix(text, task.extra["draft"], task.extra["checks"])
    return {"id": task.id, "revision": text, **checks, "degenerate": degenerate,
            "meta_prefix": prefix,
            "passed": checks["passed"] and degenerate is None and prefix is None}


def summarize_assessment(items: list[dict]) -> dict:
    n = len(items)
    return {"revision_success": rate(sum(i["passed"] for i in items), n),
            "fixes_critique": rate(sum(i["fixes_critique"] for i in items), n),
            "keeps_content": rate(sum(i["keeps_content"] for i in items), n),
            "changed": rate(sum(i["changed"] for i in items), n),
            "non_degenerate": rate(sum(i["degenerate"] is None for i in items), n)}


# What the shared tail needs from stage 5 ---------------------------------------------------------

def protected_sets(ctx: StageContext) -> Protected:
    """Held-out requests and drafts are evaluation text: training records may not share them.
    (Critiques are left out: their template wording is shared by design.)"""
    heldout = [(f"{t.id}-{part}", t.extra[part]) for t in load_tasks(ctx, "heldout")
               for part in ("request", "draft")]
    return Protected(exemplar_texts(load_pool()), heldout, ctx.data_dir)


def merge_probes(ctx: StageContext) -> list[str]:
    tasks = read_tasks(ctx.path(TASKS_FILE))
    return [house_prompt(t.text) for t in tasks[:8]]


def assess_heldout(ctx: StageContext, backend, label: str) -> dict:
    """Held-out tasks, zero-shot and greedy: revision success and its parts."""
    p = ctx.profile
    tasks = load_tasks(ctx, "heldout")
    requests = [GenRequest(t.id, house_prompt(t.text), 0) for t in tasks]
    results = generate_cached(backend, requests, greedy(p.max_new_tokens),
                              ctx.heldout_cache(label), ctx.guard(),
                              p.gen_batch_size, f"stage 5 assess {label}")
    items = [assessed_item(t, results[t.id]["text"].strip(), ctx.settings.keeps_content)
             for t in tasks]
    return {"summary": summarize_assessment(items), "items": items}


def report_data(ctx: StageContext) -> dict:
    tasks = read_tasks(ctx.path(TASKS_FILE))
    scored = read_jsonl(ctx.path("scores.jsonl"))
    dropped = read_jsonl(ctx.path("pairs_dropped.jsonl"))
    return {
        "tasks_train": sum(t.split == "train" for t in tasks),
        "tasks_heldout": sum(t.split == "heldout" for t in tasks),
        "train_sources": dict(Counter(t.source for t in tasks if t.split == "train")),
        "heldout_sources": dict(Counter(t.source for t in tasks if t.split == "heldout")),
        "drafts": len(read_jsonl(ctx.path("drafts.jsonl"))),
        "revisions": len(scored),
        "revisions_passing": sum(s["passed"] and s["unusable"] is None for s in scored),
        "revisions_unusable": dict(Counter(s["unusable"].split(" '")[0] for s in scored
                                           if s["unusable"])),
        "pairs_dropped": len(dropped),
        "pairs_dropped_reasons": dict(Counter(d["reason"] for d in dropped)),
        "judge": judge_audit(read_jsonl(ctx.path("judgments.jsonl"))),
        "restated_in_hindsight": len(restated_tasks(ctx)),
        "pairs_by_rule": dict(Counter(p.get("rule", "stated")
                                      for p in read_jsonl(ctx.path("pairs.jsonl")))),
    }


def judge_audit(judgments: list[dict]) -> dict:
    """How often the judge was order-consistent, and how often a consistent verdict preferred
    the revision that passes the checks (each comparison pits a passer against a failure)."""
    return core_judge_audit(judgments, lambda j, sample: sample == j["passer"])


def plan_work(ctx: StageContext) -> WorkPlan:
    """The most work stage 5's own steps do (for --dry-run; nothing is loaded). Pool drafts are
    written only where stage 1 left too few failures: counted here as if it left none, and
    at most one per pool request; held-out drafts as if the real sets supplied them all."""
    s, p = ctx.settings, ctx.profile
    held = math.ceil(ctx.heldout * s.draft_oversample) if s.real_heldout else 0
    pool_requests = len(load_pool()["requests"])
    drafts = held + min(pool_requests, math.ceil(
        (ctx.limit + (0 if held else ctx.heldout)) * s.draft_oversample))
    judge = round_robin_prompts(0, s.max_judged_revisions)
    return WorkPlan(
        work=(Work("drafts", prompts=drafts, new_tokens=p.max_new_tokens,
                   note="pool requests earlier stages leave missing, real held-out "
                        "questions"),
              Work("revisions", prompts=ctx.limit * p.responses_per_task,
                   new_tokens=p.max_new_tokens, note=f"{p.responses_per_task} per task"),
              Work("scores", scored=ctx.limit * judge, note=f"at most {judge} judge prompts "
                                                             f"per task")),
        max_pairs=ctx.limit, heldout_prompts=ctx.heldout)


STAGE = Stage(
    number=5,
    name="revision-tasks",
    summary="revise a response so that it fixes what a critique names while keeping its content",
    settings=Stage5Settings,
    load_pool=load_pool,
    data_steps=(Step("drafts", make_drafts), Step("tasks", make_tasks),
                Step("revisions", make_revisions), Step("scores", make_scores),
                Step("pairs", make_pairs)),
    protected=protected_sets,
    merge_probes=merge_probes,
    assess_heldout=assess_heldout,
    headline="revision_success",
    report_data=report_data,
    plan_work=plan_work,
)
