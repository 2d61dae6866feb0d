"""Stage 1 - explicit instructions.

The base model learns to follow imperative instructions that carry verifiable constraints,
zero-shot, in the house format. Steps (each resumable, each marked done only when complete):

1. instructions  The model writes instructions by few-shot *list continuation*: a numbered list of
                 pool seeds plus a few already-accepted instructions (steering it away from
                 repeats), and it writes the next item. Degenerate items, chat markup, and
                 near-duplicates (ROUGE-L > 0.7 against everything kept, pool seeds included) are
                 dropped. Each instruction gets 0-2 constraints from core/constraints.py. The set
                 is split train / held-out by a hash of the normalized instruction, checked for
                 leakage, and written to tasks.jsonl as `core.records.Task`s: text = the
                 instruction with its constraint sentences (what the house prompt shows), kind
                 "instruction", source "model", extra = {instruction (bare), constraints}.
2. responses     K samples per training instruction from a few-shot completion prompt (3-4
                 exemplars from the pool, then the target): one exemplar showing each kind
                 of constraint the task carries (so the model has a format to imitate), the
                 rest drawn at random, in random order. Where the task's constraints fix how
                 a response begins ("<<" for a title, "1." for numbered steps, the phrase of
                 start_with), the first `opened_samples` prompts end with that opening and
                 the model writes on from it; the other samples begin as the model likes, so a
                 task can pair an opened passer with an unopened failure. The opening is a
                 generation scaffold like the exemplars: training prompts never show it.
3. scores        Constraint checkers on every sample, and the chosen gate: a sample that loops
                 (a sentence or list item said twice), parrots a constraint sentence, or began
                 from an opening and fails the constraint it came from ("<<Title" unclosed)
                 may pass "at least 60 words" but is never chosen; a log-probability A/B
                 self-judge, asked in both orders, ranks samples where the checkers cannot
                 (several passers, or an instruction without constraints) and is audited
                 against the checkers.
4. pairs         chosen = passes and clears the chosen gate, rejected = fails (the failure closest to
                 passing); for unconstrained instructions the judge's consistent winner and
                 loser. A task with no such pair is relabelled in hindsight: restated with the
                 constraints its best sample meets (unmet ones dropped, or one catalogue
                 constraint added that separates it from another sample), source "hindsight".
                 Ties, identical, degenerate, contaminated and exemplar-copying pairs are
                 dropped. The training prompt is the zero-shot house prompt: exemplars never
                 reach it.
5. decontaminate Template state and EOS agreement (a failure stops the stage unless overridden);
                 13-gram overlap with every evaluation set and exemplar copies remove records
                 (listed in contamination.tsv); a probe of the chat template's effect.
6. train         DPO on a LoRA (core/dpo.py).
7. merge         into a full-precision copy of the input model, with a parity check.
8. assess        input model vs merged model on the held-out instructions, zero-shot, greedy;
                 the baseline suite on both, the few-shot reference on the input model.
9. report        metrics.json and report.md; then DONE.

Steps 5-9 are the shared tail (core/stage.py, core/lifecycle.py); this module answers what only
stage 1 knows, in `STAGE` at the bottom.
"""
from __future__ import annotations

import hashlib
import random
import re
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import yaml

from core.assess import assess_instructions
from core.constraints import (constraint_from_dict, hindsight_constraints,
                              instruction_with_constraints, response_opening, sample_constraints)
from core.contamination import Protected
from core.context import StageContext
from core.errors import RunFailure, TooLittleDataError
from core.generation import GenRequest
from core.io import read_jsonl, write_jsonl
from core.listgen import ListGrowth, grow_list, growth_work
from core.judge import judge_audit as core_judge_audit
from core.judge import judge_many, judge_prefix, round_robin_prompts
from core.pairs import (first_of_each_text, group_by_task, judge_wins, shared_pair_problem,
                        write_pairs)
from core.prompting import RESPONSE_STOPS, draw, house_prompt, seed_for
from core.records import TASKS_FILE, Task, read_tasks, write_tasks
from core.sampling import few_shot_requests, sample_openings, sample_to_file, with_openings
from core.split import split_smallest_ids
from core.stage import Stage, StageSettings, Step, Work, WorkPlan, setting
from core.text import (NearDuplicateFilter, copies_exemplar, degenerate_reason, first_near_same,
                       looping_reason, normalize)

POOL_PATH = Path(__file__).with_name("pools") / "stage1.yaml"


@dataclass(frozen=True)
class Stage1Settings(StageSettings):
    instruction_temperature: float = setting(0.9, "sampling temperature for new instructions")
    max_instruction_rounds: int = setting(6, "list-continuation rounds before giving up on "
                                             "reaching --limit + --heldout instructions")
    oversample: float = setting(1.3, "instructions requested per round, as a multiple of "
                                     "those still needed")
    constraint_count_weights: tuple[float, ...] = setting(
        (0.2, 0.5, 0.3), "relative weights of attaching 0, 1, 2, ... constraints to an "
                         "instruction")
    max_judged_samples: int = setting(3, "samples per task the judge compares round-robin "
                                         "(3: 3 comparisons, 6 judge prompts)")
    hindsight: bool = setting(True, "relabel a task whose stated constraints give no pair with "
                                    "constraints chosen after sampling (hindsight relabelling)")
    matched_exemplars: bool = setting(True, "each response prompt shows an exemplar of every "
                                            "constraint kind its task carries (False: all "
                                            "exemplars drawn at random)")
    opened_samples: int = setting(2, "of the K samples of a task whose constraints fix how a "
                                     "response begins, how many start from that opening "
                                     "(0: none)")


def load_pool() -> dict:
    """The project-written exemplar pool (seeds, response exemplars, judge exemplars)."""
    return yaml.safe_load(POOL_PATH.read_text(encoding="utf-8"))


def exemplar_texts(pool: dict) -> list[str]:
    """Every exemplar string, for the exemplar-copy filter."""
    texts = list(pool["instruction_seeds"])
    for ex in pool["response_exemplars"]:
        texts += [ex["instruction"], ex["response"]]
    return texts


# 1. instructions ---------------------------------------------------------------------------------

def list_prompt(items: list[str]) -> str:
    """A numbered task list the base model continues with one more item."""
    lines = ["Below is a list of different tasks that people gave to a helpful assistant. "
             "Every task is new and different from the others.", ""]
    lines += [f"Task {i}: {item}" for i, item in enumerate(items, start=1)]
    lines.append(f"Task {len(items) + 1}:")
    return "\n".join(lines)


def clean_instruction(text: str) -> str:
    return " ".join(text.strip().split())


def instruction_problem(text: str, guard, filter_: NearDuplicateFilter) -> str | None:
    """Why a generated instruction is dropped (None when it is kept; keeping it records it)."""
    reason = degenerate_reason(text, min_words=4, max_words=60)
    if reason:
        return reason
    if not guard.is_clean(text):
        return "chat markup"
    if text.lower().startswith(("task ", "instruction", "response")):
        return "list scaffolding"
    if not filter_.offer(text):
        return "near-duplicate"
    return None


def make_instructions(ctx: StageContext, pool: dict) -> None:
    seeds = list(pool["instruction_seeds"])
    filter_ = NearDuplicateFilter(ctx.near_duplicate)
    filter_.kept.extend(seeds)  # exemplar copies count as duplicates
    guard = ctx.guard()
    growth = ListGrowth(prompt=list_prompt, clean=clean_instruction,
                        problem=lambda text: instruction_problem(text, guard, filter_),
                        temperature=ctx.settings.instruction_temperature,
                        rounds=ctx.settings.max_instruction_rounds,
                        oversample=ctx.settings.oversample, cache="instructions.jsonl",
                        seed_names=("instruction-prompt", "instruction"),
                        where="stage 1 instructions")
    needed = ctx.limit + ctx.heldout
    accepted, audit = grow_list(ctx, growth, seeds, needed)
    write_jsonl(ctx.path("instructions_audit.jsonl"), audit)
    if len(accepted) < 3:
        raise TooLittleDataError(
            f"stage 1 kept only {len(accepted)} usable instructions after "
            f"{ctx.settings.max_instruction_rounds} rounds (see {ctx.path('instructions_audit.jsonl')}); the "
            f"model is not producing distinct instructions - try another --seed or model")
    constrained = attach_constraints(accepted, ctx.seed, ctx.settings.constraint_count_weights)
    tasks = split_tasks(constrained, ctx.heldout)
    check_leakage(tasks, ctx.near_duplicate)
    write_tasks(ctx.path(TASKS_FILE), tasks)


def attach_constraints(instructions: list[str], seed: int,
                       count_weights: tuple[float, ...]) -> list[Task]:
    """0, 1, 2, ... constraints per instruction (`count_weights[n]`: weight of n), seeded by
    the instruction itself; every task in the training split until `split_tasks` holds some out."""
    tasks = []
    for instruction in instructions:
        rng = random.Random(seed_for(seed, "constraints", normalize(instruction)))
        count = rng.choices(range(len(count_weights)), count_weights)[0]
        constraints = [c.to_dict() for c in sample_constraints(rng, count)]
        tasks.append(Task(
            id="t" + hashlib.sha256(normalize(instruction).encode()).hexdigest()[:10],
            stage=1, split="train",
            text=instruction_with_constraints(instruction, constraints),
            kind="instruction", source="model",
            extra={"instruction": instruction, "constraints": constraints}))
    return tasks


def split_tasks(tasks: list[Task], heldout: int) -> list[Task]:
    """The `heldout` smallest ids held out (core.split.split_smallest_ids), the rest train."""
    splits = {t["id"]: t["split"] for t in split_smallest_ids([{"id": t.id} for t in tasks],
                                                              heldout)}
    return [replace(t, split=splits[t.id]) for t in tasks]


def check_leakage(tasks: list[Task], threshold: float) -> None:
    """No held-out instruction may equal or nearly equal (ROUGE-L > threshold) a training one."""
    train = [t.extra["instruction"] for t in tasks if t.split == "train"]
    for task in (t for t in tasks if t.split == "heldout"):
        if other := first_near_same(task.extra["instruction"], train, threshold):
            raise RunFailure(f"held-out instruction {task.id} leaks into training: "
                             f"{task.extra['instruction']!r} ~ {other!r}")


def load_tasks(ctx: StageContext, split: str) -> list[Task]:
    return read_tasks(ctx.path(TASKS_FILE), split)


# 2. responses ------------------------------------------------------------------------------------

def response_requests(ctx: StageContext, pool: dict, tasks: list[Task]) -> list[GenRequest]:
    """3-4 response exemplars (with their constraints spelled out), then the task."""
    exemplars = pool["response_exemplars"]
    matched = ctx.settings.matched_exemplars

    def shots(task: Task, rng: random.Random) -> list[tuple[str, str]]:
        drawn = (draw_matching_exemplars(exemplars, task.extra["constraints"], rng) if matched
                 else draw(exemplars, rng, 3, 4))
        return [(instruction_with_constraints(e["instruction"], e.get("constraints") or []),
                 e["response"]) for e in drawn]

    k = ctx.profile.responses_per_task
    openings = sample_openings(tasks, k, ctx.settings.opened_samples,
                               lambda task: response_opening(task.extra["constraints"]))
    return with_openings(few_shot_requests(ctx.seed, tasks, k, "response", shots), openings)


def draw_matching_exemplars(exemplars: list[dict], constraints: list[dict],
                            rng: random.Random) -> list[dict]:
    """3-4 exemplars in random order: for each constraint kind of the task, one exemplar that
    carries that kind (where the pool has one), then exemplars drawn at random."""
    picked: list[dict] = []
    for kind in dict.fromkeys(c["kind"] for c in constraints):
        showing = [e for e in exemplars if e not in picked
                   and kind in {c["kind"] for c in e.get("constraints") or []}]
        if showing:
            picked.append(rng.choice(showing))
    rest = [e for e in exemplars if e not in picked]
    count = rng.randint(3, 4)
    picked += rng.sample(rest, max(0, min(len(rest), count - len(picked))))
    rng.shuffle(picked)
    return picked


def make_responses(ctx: StageContext, pool: dict) -> None:
    tasks = load_tasks(ctx, "train")
    sample_to_file(ctx, tasks, response_requests(ctx, pool, tasks),
                   ctx.profile.temperature_answer, RESPONSE_STOPS, "responses")


# 3. scores ---------------------------------------------------------------------------------------

SCAFFOLDING = re.compile(r"^(Task \d+:|Instruction:|Response( [AB])?:|Answer:)", re.MULTILINE)


def unusable_reason(text: str, guard, exemplars: list[str]) -> str | None:
    """Why a sampled response can be neither chosen nor rejected (None when usable)."""
    if reason := degenerate_reason(text):
        return reason
    if not guard.is_clean(text):
        return "chat markup"
    if SCAFFOLDING.search(text):
        return "prompt scaffolding"
    if copies_exemplar(text, exemplars):
        return "copies an exemplar"
    return None


def score_sample(text: str, constraints: list[dict], guard, exemplars: list[str],
                 opening: str = "") -> dict:
    """Checks, usability and chosen flaw of one sample (`opening`: what its prompt ended with)."""
    results = [constraint_from_dict(c).check(text) for c in constraints]
    unusable = unusable_reason(text, guard, exemplars)
    return {"constraint_results": results, "passed": bool(results) and all(results),
            "pass_fraction": sum(results) / len(results) if results else None,
            "unusable": unusable, "flaw": chosen_flaw(text, constraints, opening)}


def chosen_flaw(text: str, constraints: list[dict], opening: str = "") -> str | None:
    """Why a usable sample must still never be chosen: it loops (core.text.looping_reason),
    parrots a constraint sentence of its prompt ("To begin with. Begin your response with the
    exact phrase ..."), or began from an opening and fails the constraint that gave it (an
    unclosed "<<Title"). Each can pass other checks, hindsight relabelling could state those
    alone, and each is what DPO would teach."""
    if reason := looping_reason(text):
        return reason
    built = [constraint_from_dict(c) for c in constraints]
    if copies_exemplar(text, [c.describe() for c in built], min_chars=30):
        return "echoes a constraint sentence"
    if opening and not all(c.check(text) for c in built if c.opening() == opening):
        return "fails the constraint its opening came from"
    return None


def may_be_chosen(sample: dict) -> bool:
    """Usable and without a `chosen_flaw`."""
    return sample["unusable"] is None and sample["flaw"] is None


def comparisons_for(task: Task, samples: list[dict],
                    max_judged: int = 3) -> list[tuple[int, int]]:
    """Which sample pairs the judge compares: passers that may be chosen among themselves (to
    pick the best), the first of them against the hardest failure (an audit of the judge), or,
    without constraints, every pair of the first usable samples."""
    usable = [s for s in samples if s["unusable"] is None]
    distinct = first_of_each_text(usable)
    if not task.extra["constraints"]:
        ids = [s["sample"] for s in distinct][:max_judged]
        return [(a, b) for i, a in enumerate(ids) for b in ids[i + 1:]]
    passers = [s["sample"] for s in distinct if s["passed"] and may_be_chosen(s)][:max_judged]
    failers = [s["sample"] for s in distinct if not s["passed"]]
    pairs = [(a, b) for i, a in enumerate(passers) for b in passers[i + 1:]]
    if passers and failers:
        pairs.append((passers[0], hardest_failure(distinct)["sample"]))
    return pairs


def hardest_failure(samples: list[dict]) -> dict:
    failers = [s for s in samples if not s["passed"] and s["unusable"] is None]
    return max(failers, key=lambda s: (s["pass_fraction"], -s["sample"]))


def judge_shots(ctx: StageContext, pool: dict, task_id: str, a: int, b: int) -> str:
    """Two judge exemplars drawn per comparison (one says A, one says B: no answer prior)."""
    rng = random.Random(seed_for(ctx.seed, "judge-exemplars", task_id, a, b))
    shots = [rng.choice([e for e in pool["judge_exemplars"] if e["better"] == side])
             for side in ("A", "B")]
    rng.shuffle(shots)
    return judge_prefix([{**e, "instruction": instruction_with_constraints(
        e["instruction"], e["constraints"])} for e in shots])


def make_scores(ctx: StageContext, pool: dict) -> None:
    tasks = {t.id: t for t in load_tasks(ctx, "train")}
    guard, exemplars = ctx.guard(), exemplar_texts(pool)
    scored = [{**r, **score_sample(r["text"], tasks[r["task_id"]].extra["constraints"], guard,
                                   exemplars, r.get("opening", ""))}
              for r in read_jsonl(ctx.path("responses.jsonl"))]
    by_task = group_by_task(scored)
    jobs = [(task_id, a, b) for task_id, samples in by_task.items()
            for a, b in comparisons_for(tasks[task_id], samples, ctx.settings.max_judged_samples)]
    items = [(judge_shots(ctx, pool, t, a, b), tasks[t].text,
              by_task[t][a]["text"], by_task[t][b]["text"]) for t, a, b in jobs]
    verdicts = judge_many(ctx.backend(), guard, items, ctx.profile.judge_batch_size,
                          "stage 1 scores") if items else []
    judgments = [{"task_id": t, "x": a, "y": b, "winner": v.winner,
                  "margin_xy": v.margin_xy, "margin_yx": v.margin_yx}
                 for (t, a, b), v in zip(jobs, verdicts)]
    write_jsonl(ctx.path("judgments.jsonl"), judgments)
    write_jsonl(ctx.path("scores.jsonl"), scored)


# 4. pairs ----------------------------------------------------------------------------------------

def choose_pair(task: Task, samples: list[dict], judgments: list[dict],
                hindsight_seed: int | None = None) -> tuple[dict | None, str]:
    """(pair, reason): the stated-constraint rule; when it finds no pair and `hindsight_seed`
    is given, hindsight relabelling (`hindsight_pair`) on the same samples."""
    pair, reason = stated_pair(task, samples, judgments)
    if pair is None and hindsight_seed is not None:
        relabelled = hindsight_pair(task, samples, judgments, hindsight_seed)
        if relabelled is not None:
            return relabelled, "ok"
    return pair, reason


def stated_pair(task: Task, samples: list[dict], judgments: list[dict]) -> tuple[dict | None, str]:
    """chosen passes the task's constraints, rejected is the usable failure closest to passing;
    without constraints, the judge's most confident order-consistent winner and its loser."""
    usable = [s for s in samples if s["unusable"] is None]
    by_id = {s["sample"]: s for s in samples}
    if not task.extra["constraints"]:
        consistent = [j for j in judgments if j["winner"] != "tie"]
        if not consistent:
            return None, "judge tie in both orders" if judgments else "fewer than two usable samples"
        ranked = sorted(consistent, key=lambda j: -abs(j["margin_xy"] + j["margin_yx"]))
        for best in ranked:
            win, lose = (best["x"], best["y"]) if best["winner"] == "x" else (best["y"], best["x"])
            if may_be_chosen(by_id[win]):
                return _pair(task, by_id[win], by_id[lose], "judge"), "ok"
        return None, "the judge's winner is flawed (loops or echoes)"
    passers = [s for s in usable if s["passed"]]
    if not passers:
        return None, "no sample passes the checks"
    if not any(not s["passed"] for s in usable):
        return None, "every usable sample passes (no rejected)"
    good = [s for s in passers if may_be_chosen(s)]
    if not good:
        return None, "every passing sample is flawed (loops or echoes)"
    good_ids = {s["sample"] for s in good}
    wins = judge_wins([j for j in judgments if {j["x"], j["y"]} <= good_ids])
    chosen = max(good, key=lambda s: (wins.get(s["sample"], 0), -s["sample"]))
    return _pair(task, chosen, hardest_failure(usable), "checks"), "ok"


def hindsight_pair(task: Task, samples: list[dict], judgments: list[dict],
                   seed: int) -> dict | None:
    """Hindsight relabelling (Zhang et al. 2023, "The Wisdom of Hindsight Makes Language Models
    Better Instruction Followers"): restate the task with constraints chosen *after* sampling,
    so that a good sample satisfies them and another sample does not.

    Candidates for chosen: usable, non-looping samples, those meeting most stated constraints
    first (closest to what was asked), then by judge wins. For each, `hindsight_constraints`
    gives the new constraint list; the rejected side is the sample that fails it while meeting
    the most of it (a near miss). None when no sample can be separated from another."""
    distinct = first_of_each_text([s for s in samples if s["unusable"] is None])
    wins = judge_wins(judgments)
    stated = [constraint_from_dict(c) for c in task.extra["constraints"]]
    rng = random.Random(seed_for(seed, "hindsight", task.id))
    ranked = sorted((s for s in distinct if may_be_chosen(s)),
                    key=lambda s: (-(s["pass_fraction"] or 0.0), -wins.get(s["sample"], 0),
                                   s["sample"]))
    for chosen in ranked:
        others = [s for s in distinct if s is not chosen]
        labels = hindsight_constraints(chosen["text"], [s["text"] for s in others], stated, rng)
        if labels is None:
            continue
        met = {s["sample"]: [c.check(s["text"]) for c in labels] for s in others}
        rejected = max((s for s in others if not all(met[s["sample"]])),
                       key=lambda s: (sum(met[s["sample"]]), -s["sample"]))
        relabelled = [c.to_dict() for c in labels]
        task_as_relabelled = replace(task, text=instruction_with_constraints(
            task.extra["instruction"], relabelled), extra={**task.extra, "constraints": relabelled})
        return {**_pair(task_as_relabelled, chosen, rejected, "hindsight"),
                "stated_constraints": task.extra["constraints"]}
    return None


def _pair(task: Task, chosen: dict, rejected: dict, source: str) -> dict:
    return {"prompt": house_prompt(task.text), "chosen": chosen["text"],
            "rejected": rejected["text"], "task_id": task.id, "source": source,
            "constraints": task.extra["constraints"],
            "chosen_sample": chosen["sample"], "rejected_sample": rejected["sample"]}


def pair_problem(pair: dict, guard, exemplars: list[str]) -> str | None:
    """Shared last filter: identical, degenerate, contaminated or exemplar-copying pairs."""
    return shared_pair_problem(pair, guard, lambda text: unusable_reason(text, guard, exemplars))


def make_pairs(ctx: StageContext, pool: dict) -> None:
    scored = group_by_task(read_jsonl(ctx.path("scores.jsonl")))
    judgments = group_by_task(read_jsonl(ctx.path("judgments.jsonl")))
    guard, exemplars = ctx.guard(), exemplar_texts(pool)
    write_pairs(ctx, load_tasks(ctx, "train"),
                lambda task: choose_pair(task, scored.get(task.id, []), judgments.get(task.id, []),
                                         ctx.seed if ctx.settings.hindsight else None),
                lambda pair, task: pair_problem(pair, guard, exemplars),
                "tasks", "raise --limit so more tasks yield a pair")


# What the shared tail needs from stage 1 ---------------------------------------------------------

def protected_sets(ctx: StageContext) -> Protected:
    """Training records may not copy the exemplars, the held-out instructions or the shared sets."""
    return Protected(exemplar_texts(load_pool()),
                     [(t.id, t.extra["instruction"]) for t in load_tasks(ctx, "heldout")],
                     ctx.data_dir)


def merge_probes(ctx: StageContext) -> list[str]:
    return [house_prompt(t.text) for t in read_tasks(ctx.path(TASKS_FILE))[:8]]


def assess_heldout(ctx: StageContext, backend, label: str) -> dict:
    """Held-out tasks, zero-shot and greedy: prompt-level and constraint-level pass rates."""
    p = ctx.profile
    items = [{"id": t.id, "prompt_instruction": t.text, "constraints": t.extra["constraints"]}
             for t in load_tasks(ctx, "heldout")]
    return assess_instructions(backend, ctx.guard(), items,
                               ctx.heldout_cache(label), p.max_new_tokens,
                               p.gen_batch_size, f"stage 1 assess {label}")


def report_data(ctx: StageContext) -> dict:
    judgments = read_jsonl(ctx.path("judgments.jsonl"))
    scores = read_jsonl(ctx.path("scores.jsonl"))  # one record per sampled response
    train = load_tasks(ctx, "train")
    return {
        "tasks_train": len(train),
        "tasks with a pair by the stated constraints alone": stated_rule_count(
            train, scores, judgments),
        "tasks_heldout": len(load_tasks(ctx, "heldout")),
        "responses": len(scores),
        "samples": sample_funnel(scores),
        "constraints met by the samples, by kind": met_by_kind(train, scores),
        "pairs_dropped": len(read_jsonl(ctx.path("pairs_dropped.jsonl"))),
        "judge": judge_audit(judgments, scores),
    }


def stated_rule_count(tasks: list[Task], scores: list[dict], judgments: list[dict]) -> int:
    """Tasks the stated-constraint rule alone gives a pair (before the last filter): the
    hindsight ablation, computed on the same samples."""
    scored, judged = group_by_task(scores), group_by_task(judgments)
    return sum(stated_pair(t, scored.get(t.id, []), judged.get(t.id, []))[0] is not None
               for t in tasks)


def sample_funnel(scores: list[dict]) -> dict:
    """What the sample gates removed: unusable (by reason), usable, usable but flawed (by
    flaw), the usable samples that pass their task's stated constraints, and how many samples
    began from an opening and of those passed."""
    usable = [s for s in scores if s["unusable"] is None]
    unusable = Counter(s["unusable"] for s in scores if s["unusable"] is not None)
    return {"total": len(scores), "usable": len(usable),
            **{f"unusable ({reason})": n for reason, n in unusable.most_common()},
            **{f"usable but never chosen ({flaw})": n for flaw, n in
               Counter(s["flaw"] for s in usable if s["flaw"]).most_common()},
            "usable and passing": sum(bool(s["passed"]) for s in usable),
            "opened (began from the constraints' opening)": sum("opening" in s for s in scores),
            "opened, usable and passing": sum(bool(s["passed"]) and "opening" in s
                                              for s in usable)}


def met_by_kind(tasks: list[Task], scores: list[dict]) -> dict[str, str]:
    """For each constraint kind, "met/stated" over the samples of tasks that state it, and the
    same over the opened samples: where the few-shot model can and cannot write a format."""
    kinds = {t.id: [c["kind"] for c in t.extra["constraints"]] for t in tasks}
    stated, met, opened, opened_met = Counter(), Counter(), Counter(), Counter()
    for sample in scores:
        for kind, result in zip(kinds[sample["task_id"]], sample["constraint_results"]):
            stated[kind] += 1
            met[kind] += result
            if "opening" in sample:
                opened[kind] += 1
                opened_met[kind] += result
    return {kind: f"{met[kind]}/{stated[kind]}" + (
        f" (opened {opened_met[kind]}/{opened[kind]})" if opened[kind] else "")
        for kind in sorted(stated)}


def judge_audit(judgments: list[dict], scored: list[dict]) -> dict:
    """How often the judge was order-consistent, and how often it agreed with the checkers."""
    passed = {(s["task_id"], s["sample"]): s["passed"] for s in scored}
    return core_judge_audit(judgments, lambda j, sample: passed[(j["task_id"], sample)])


def plan_work(ctx: StageContext) -> WorkPlan:
    """The most work stage 1's own steps do (for --dry-run; nothing is loaded)."""
    s, p = ctx.settings, ctx.profile
    judge = round_robin_prompts(s.max_judged_samples)
    return WorkPlan(
        work=(growth_work("instructions", ctx, ctx.limit + ctx.heldout, s.oversample,
                          s.max_instruction_rounds),
              Work("responses", prompts=ctx.limit * p.responses_per_task,
                   new_tokens=p.max_new_tokens, note=f"{p.responses_per_task} per task"),
              Work("scores", scored=ctx.limit * judge, note=f"at most {judge} judge prompts "
                                                             f"per task")),
        max_pairs=ctx.limit, heldout_prompts=ctx.heldout)


STAGE = Stage(
    number=1,
    name="explicit-instructions",
    summary="follow imperative instructions with verifiable constraints, zero-shot",
    settings=Stage1Settings,
    load_pool=load_pool,
    data_steps=(Step("instructions", make_instructions), Step("responses", make_responses),
                Step("scores", make_scores), Step("pairs", make_pairs)),
    protected=protected_sets,
    merge_probes=merge_probes,
    assess_heldout=assess_heldout,
    headline="prompt_level",
    report_data=report_data,
    plan_work=plan_work,
)
