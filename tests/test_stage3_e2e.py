"""Stage 3 end to end on the tiny model, through `app.pipeline.run_stage` with a scripted backend
(core/scripted.py), slow.

The tiny model writes near-gibberish and never passes all four checks (count, format, topic,
distinctness), so on its own the stage stops at `pairs` with NoPairsError. Here a script stands
in for a capable model where it has an answer, through the public `backend_loader` parameter;
nothing is written into the stage's caches or outputs and no stage function is replaced:

- topic list prompts ("... Topic N:"): five proposals, three good ones, one in list scaffolding
  and one repeating a pool topic, so the real topic filter keeps three and drops two;
- few-shot response prompts (exemplar blocks, then the target instruction): the script reads the
  target task (kind, count, topic) back from the pool's templates and answers the first four of
  a task's K=8 prompts with two different responses that pass every check ("plain" and
  "preferred"), one with an item too many ("extra": fails count_ok only) and one off topic
  ("off_topic": fails on_topic only); the tiny model samples the other four. (The prompt does
  not say which sample number it is, so the test knows the samples by their text.) The first
  two prompts of a numbered task end with the opening "1.": the script writes on from it as a
  numbered list, the "plain" list one item per prompt (the stage then asks for "2.", "3." ...)
  and the "extra" list in one go;
  Questions tasks are the hard ones: the script leaves the whole first round of their K
  prompts to the tiny model, so they have no pair after it and draw a second round of K, whose
  first four the script answers as above;
- A/B judge prompts on those responses: the script favours the one that passes the checks, and
  between two passers the "preferred" one, in whichever order they are shown.

The stage's real checks, self-judge and pair rule then pick each pair: chosen is the "preferred"
passer (the judge's order-consistent favourite, whatever its sample number), rejected one of the
two scripted failures (the usable failure passing the most checks: 3 of 4). Everything else (the
other samples, decontamination, DPO, merge, assessment of held-out tasks and of the baseline
suite, zero-shot and greedy) is the tiny model's own work.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest
from safetensors.torch import load_file

from core.guards import TemplateGuard
from core.io import read_jsonl
from core.judge import JUDGE_END, winning_sample
from core.prompting import house_prompt
from core.records import read_tasks
from core.scripted import Script, ScriptedBackend
from stages import stage3_generation_tasks as s3

pytestmark = pytest.mark.slow
LIMIT, HELDOUT = 6, 4
POOL = s3.load_pool()

# Topic proposals, in the order the stage asks for them (one list-continuation round of 5).
PROPOSALS = [" tide pools", " Topic 9: owls", " origami", " Glaciers", " beekeeping"]
KEPT_PROPOSALS = ["tide pools", "origami", "beekeeping"]

QUESTIONS = [["What is the most surprising fact about {k}?", "How has {k} changed over the years?",
              "Why do scientists still argue about {k}?", "Where should a beginner start with {k}?",
              "Which famous person is linked to {k}?", "When did people first write about {k}?"],
             ["Who would enjoy a day spent learning about {k}?", "Is {k} older than most people think?",
              "Could a child explain {k} to a friend?", "What tools help us study {k} today?",
              "Does {k} matter for everyday life?", "Are there myths about {k} worth hearing?"]]
STATEMENTS = [["{K} appears in the news almost every week.", "Schools teach {k} to young children.",
               "Museums often run exhibitions on {k}.", "Many hobbies grew out of an interest in {k}.",
               "Researchers publish new findings about {k} each year.",
               "Libraries keep whole shelves of books on {k}."],
              ["A good documentary can make {k} exciting.", "Travellers plan whole trips around {k}.",
               "Artists have painted scenes inspired by {k}.", "Some families pass down stories of {k}.",
               "Local clubs meet to talk about {k}.", "Podcasts explain {k} in plain words."]]
OPTIONS = [["A. It is studied by scientists", "B. It was invented last Tuesday",
            "C. It exists only on Mars", "D. It is made of cheese"],
           ["A. Only penguins care about it", "B. It is found in school lessons",
            "C. It was banned in every country", "D. It is a kind of sandwich"]]
OFF_TOPIC = ["What do cats dream about at night?", "Why do people enjoy sunny beaches?",
             "How long can a goldfish remember things?", "Which colour do most people prefer?",
             "Where do lost socks end up?"]
OFF_TOPIC_OPTIONS = ["A. A sunny afternoon", "B. A quiet library", "C. A noisy classroom",
                     "D. A long nap"]
NUMBER_WORDS = {word: n for n, word in s3.NUMBER_WORDS.items()}


def respond(kind: str, count: int, keyword: str, variant: int, extra: int = 0) -> str:
    """`count + extra` items of `kind` about `keyword` (extra=0: passes every check)."""
    n, k = count + extra, keyword
    if kind == "questions":
        return "\n".join(f"{i}. {q.format(k=k)}" for i, q in
                         enumerate(QUESTIONS[variant][:n], start=1))
    if kind == "mcq":
        return "\n\n".join("\n".join([QUESTIONS[variant][i].format(k=k), *OPTIONS[variant],
                                      "Answer: B" if variant else "Answer: A"]) for i in range(n))
    return "\n".join("- " + s.format(k=k, K=k.capitalize()) for s in STATEMENTS[variant][:n])


def off_topic(kind: str, count: int) -> str:
    """Well-formed items of the right count that mention nothing of the topic."""
    if kind == "questions":
        return "\n".join(OFF_TOPIC[:count])
    if kind == "mcq":
        return "\n\n".join("\n".join([OFF_TOPIC[i], *OFF_TOPIC_OPTIONS, "Answer: C"])
                           for i in range(count))
    return "\n".join(f"- {q[:-1]}." for q in OFF_TOPIC[:count])


MARKER = re.compile(r"^(?:[-*]|\d+[.)]) ")


def numbered(kind: str, text: str) -> str:
    """The same items as a numbered list: what a model writes on from the opening "1."."""
    if kind == "mcq":
        return "\n\n".join(f"{i}. {block}" for i, block in enumerate(text.split("\n\n"), 1))
    return "\n".join(f"{i}. {MARKER.sub('', line)}" for i, line in enumerate(text.splitlines(), 1))


def template_pattern(template: str) -> re.Pattern:
    """A pool template as a regex that reads a task's count, topic or examples back."""
    parts = re.split(r"(\{\w+\})", template)
    fields = {"{count}": r"(?P<count>\d+|one|two|three|four|five)", "{topic}": r"(?P<topic>.+)",
              "{examples}": r"(?P<examples>.+)", "{things}": r"(?P<things>.+)"}
    return re.compile("".join(fields.get(p, re.escape(p)) for p in parts) + "$")


PATTERNS = [(kind, template_pattern(t)) for kind, ts in POOL["templates"].items() for t in ts]
TOPIC_KEYWORDS = {t["name"]: t["keywords"] for t in POOL["topics"]}
TOPIC_KEYWORDS.update({name: s3.content_words(name) for name in KEPT_PROPOSALS})
EXAMPLES_TOPIC = {t["examples"]: t["name"] for t in POOL["topics"]}


def read_task(instruction: str) -> dict | None:
    """The spec of a stage 3 task, read from its instruction (None: not one of its tasks)."""
    for kind, pattern in PATTERNS:
        match = pattern.match(instruction.strip())
        if not match:
            continue
        fields = match.groupdict()
        topic = fields.get("topic") or EXAMPLES_TOPIC.get(fields.get("examples"))
        if topic not in TOPIC_KEYWORDS:
            continue
        count = fields.get("count")
        count = 1 if count is None else NUMBER_WORDS.get(count) or int(count)
        return {"kind": kind, "count": count, "topic": topic, "keywords": TOPIC_KEYWORDS[topic]}
    return None


ANSWERS = ("plain", "extra", "preferred", "off_topic")  # a task's first four response prompts
K = 8  # the tiny-qwen2 profile's samples per task and round
HARD = "questions"  # the kind whose first round the script leaves to the tiny model
EXPECTED_CHECKS = {"plain": dict.fromkeys(s3.CHECKS, True),
                   "preferred": dict.fromkeys(s3.CHECKS, True),
                   "extra": {**dict.fromkeys(s3.CHECKS, True), "count_ok": False},
                   "off_topic": {**dict.fromkeys(s3.CHECKS, True), "on_topic": False}}


class CapableModel:
    """The script: what a capable model would write, and which response it would prefer."""

    def __init__(self):
        self.proposals = iter(PROPOSALS)
        self.calls: Counter[str] = Counter()  # response prompts seen per target instruction
        self.written: dict[str, str] = {}  # response text (stripped) -> what it was meant to be
        self.item_by_item: set[str] = set()  # opened lists written one item per prompt

    def complete(self, prompt: str) -> str | None:
        if prompt.startswith("Below is a list of topics") and re.search(r"Topic \d+:$", prompt):
            return next(self.proposals, None)
        if "###" not in prompt or "\n\nResponse:\n" not in prompt:
            return None  # zero-shot prompts (assessment) and anything else: the tiny model
        instruction, _, opening = prompt.rsplit("Instruction: ", 1)[1].partition(
            "\n\nResponse:\n")
        spec = read_task(instruction)
        if opening not in ("", s3.LIST_OPENING):
            return self.next_item(opening)  # a list written item by item: "1. ...\n2."
        if spec is None:
            return None  # e.g. the baseline suite's few-shot reference prompts
        nth = self.calls[instruction] - (K if spec["kind"] == HARD else 0)
        self.calls[instruction] += 1
        if not 0 <= nth < len(ANSWERS):
            return None
        kind, count, keyword = spec["kind"], spec["count"], spec["keywords"][0]
        text = {"plain": lambda: respond(kind, count, keyword, 0),
                "extra": lambda: respond(kind, count, keyword, 0, extra=1),
                "preferred": lambda: respond(kind, count, keyword, 1),
                "off_topic": lambda: off_topic(kind, count)}[ANSWERS[nth]]()
        if opening:
            text = numbered(kind, text)
        self.written[text.strip()] = ANSWERS[nth]
        if opening and kind != "mcq" and ANSWERS[nth] != "extra":
            self.item_by_item.add(text)  # stops after its first item; the stage asks for more
            return text.split("\n", 1)[0][len(opening):]
        return text[len(opening):]  # an opened prompt: the model writes on from its opening

    def next_item(self, so_far: str) -> str | None:
        """The next item of a list this script writes item by item (`so_far` ends "k.")."""
        text = next((t for t in self.item_by_item if t.startswith(so_far)), None)
        return None if text is None else text[len(so_far):].split("\n", 1)[0]

    def prefer(self, prompt: str) -> str | None:
        block = prompt.rsplit(JUDGE_END, 1)[-1]
        match = re.fullmatch(r"Instruction: (?P<i>.*?)\n\nResponse A:\n(?P<a>.*?)\n\nResponse B:\n"
                             r"(?P<b>.*)\n\nWhich response follows the instruction better, A or "
                             r"B\?\nAnswer:", block, re.DOTALL)
        if not match or not {match["a"], match["b"]} & set(self.written):
            return None
        spec = read_task(match["i"])
        if spec is None:
            return None
        a_ok, b_ok = (all(s3.check_response(match[x], spec).values()) for x in "ab")
        if a_ok != b_ok:
            return " A" if a_ok else " B"
        if a_ok:
            return " A" if self.written.get(match["a"]) == "preferred" else " B"
        return None


@pytest.fixture(scope="module")
def stage(tmp_path_factory, tiny_dir) -> tuple[Path, CapableModel]:
    from app.pipeline import run_stage

    script = CapableModel()
    run_dir = tmp_path_factory.mktemp("stage3") / "run"
    run_stage(3, run_dir, model="tiny-qwen2", limit=LIMIT, heldout=HELDOUT, seed=0,
              log=lambda _: None, backend_loader=ScriptedBackend.loader(
                  Script(complete=script.complete, prefer=script.prefer)))
    return run_dir / "stage_3", script


def test_stage_completes_with_pairs_chosen_by_checks_and_judge(stage):
    stage_dir, script = stage
    assert (stage_dir / "DONE").is_file()
    pairs = read_jsonl(stage_dir / "pairs.jsonl")
    train = read_tasks(stage_dir / "tasks.jsonl", "train")
    assert len(pairs) == len(train) == LIMIT  # every training task yields its pair
    assert all(script.calls[t.text] == (2 * K if t.kind == HARD else K) for t in train)
    scored = {(s["task_id"], s["sample"]): s for s in read_jsonl(stage_dir / "scores.jsonl")}
    for pair in pairs:
        assert script.written[pair["chosen"]] == "preferred"  # the judge's pick among passers
        assert all(s3.check_response(pair["chosen"], pair["spec"]).values())
        rejected = script.written[pair["rejected"]]
        assert rejected in ("extra", "off_topic")
        assert s3.check_response(pair["rejected"], pair["spec"]) == EXPECTED_CHECKS[rejected]
        failures = [s for (task, _), s in scored.items() if task == pair["task_id"]
                    and not s["passed"] and s["unusable"] is None]
        hardest = max(failures, key=lambda s: (s["checks_passed"], -s["sample"]))
        assert pair["rejected_sample"] == hardest["sample"]


def test_judge_was_asked_and_agrees_with_the_checks(stage):
    stage_dir, script = stage
    text = {(s["task_id"], s["sample"]): s["text"] for s in read_jsonl(stage_dir / "scores.jsonl")}
    judgments = read_jsonl(stage_dir / "judgments.jsonl")
    assert len(judgments) == 2 * LIMIT
    for task_id in {j["task_id"] for j in judgments}:
        # the two passers against each other, then the first passer against the hardest failure
        passers, audit = [j for j in judgments if j["task_id"] == task_id]
        kinds = {script.written[text[(task_id, j[side])]]: j[side]
                 for j in (passers, audit) for side in "xy"}
        assert {script.written[text[(task_id, passers[s])]] for s in "xy"} == {"plain", "preferred"}
        assert winning_sample(passers) == kinds["preferred"]
        assert script.written[text[(task_id, audit["y"])]] in ("extra", "off_topic")
        assert winning_sample(audit) == audit["x"] == passers["x"]
    judge = json.loads((stage_dir / "metrics.json").read_text())["data"]["judge"]
    assert judge["comparisons"] == 2 * LIMIT
    assert judge["order_consistent"]["rate"] == 1.0 and judge["agrees_with_checks"]["rate"] == 1.0
    assert judge["agrees_with_checks"]["n"] == LIMIT


def test_topic_filter_ran_on_the_proposals(stage):
    stage_dir, _ = stage
    topics = read_jsonl(stage_dir / "topics.jsonl")
    assert sorted(t["name"] for t in topics if t["source"] == "model") == sorted(KEPT_PROPOSALS)
    dropped = {a["text"]: a["dropped"] for a in read_jsonl(stage_dir / "topics_audit.jsonl")
               if a["id"] != "pool"}
    assert dropped == {"tide pools": None, "origami": None, "beekeeping": None,
                       "Topic 9: owls": "list scaffolding", "Glaciers": "near-duplicate"}


def test_samples_are_scored_by_the_real_checks(stage):
    stage_dir, script = stage
    scored = read_jsonl(stage_dir / "scores.jsonl")
    hard = {t.id for t in read_tasks(stage_dir / "tasks.jsonl", "train") if t.kind == HARD}
    assert hard and len(scored) == (LIMIT + len(hard)) * K  # one round, two for the hard tasks
    for task_id in {s["task_id"] for s in scored}:
        samples = [s for s in scored if s["task_id"] == task_id]
        written = [script.written.get(s["text"]) for s in samples]
        assert sorted(w for w in written if w) == sorted(ANSWERS)
        assert written.count(None) == len(samples) - len(ANSWERS)
        for sample, meant in zip(samples, written):
            if meant:
                assert sample["checks"] == EXPECTED_CHECKS[meant] and sample["unusable"] is None
            else:
                assert not sample["passed"]  # the tiny model never passes every check


def test_the_first_samples_of_a_numbered_task_start_from_its_opening(stage):
    stage_dir, script = stage
    responses = read_jsonl(stage_dir / "responses.jsonl")
    tasks = read_tasks(stage_dir / "tasks.jsonl", "train")
    opened = {f"{r['task_id']}-{r['sample']}": r["opening"] for r in responses if "opening" in r}
    assert opened == {f"{t.id}-{j}": "1." for t in tasks
                      for j in ([0, 1, K, K + 1] if t.kind == HARD else [0, 1])
                      if not (t.kind == "mcq" and t.extra["spec"]["count"] == 1)}
    # the scripted model wrote on from the opening: its opened lists pass what they were meant to
    scored = {(s["task_id"], s["sample"]): s for s in read_jsonl(stage_dir / "scores.jsonl")}
    written = [(scored[(r["task_id"], r["sample"])], script.written[r["text"]])
               for r in responses if "opening" in r and r["text"] in script.written]
    assert written and all(s["text"].startswith("1.") for s, _ in written)
    assert all(s["checks"] == EXPECTED_CHECKS[meant] for s, meant in written)
    # a list written one item per prompt got the next number until it had the count asked for;
    # one that overshot in one go ("extra") was left as it was
    specs = {t.id: t.extra["spec"] for t in tasks}
    stepped = [s for s, _ in written if s["text"] in script.item_by_item]
    assert stepped and all(s["scaffolded"] == specs[s["task_id"]]["count"] - 1 for s in stepped)
    assert all("scaffolded" not in s for s, meant in written if meant == "extra")
    assert (stage_dir / "cache" / "items.jsonl").is_file()
    data = json.loads((stage_dir / "metrics.json").read_text())["data"]
    assert data["sample_checks_opened"]["usable"]["n"] == len(opened)
    assert data["pairs_chosen_opened"] == sum(
        (p["task_id"], p["chosen_sample"]) in {k for k, s in scored.items() if "opening" in s}
        for p in read_jsonl(stage_dir / "pairs.jsonl"))


def test_a_task_without_a_pair_after_one_round_draws_another(stage):
    stage_dir, script = stage
    train = read_tasks(stage_dir / "tasks.jsonl", "train")
    responses = read_jsonl(stage_dir / "responses.jsonl")
    for task in train:
        numbers = [r["sample"] for r in responses if r["task_id"] == task.id]
        assert numbers == list(range(2 * K if task.kind == HARD else K))
    pairs = {p["task_id"]: p for p in read_jsonl(stage_dir / "pairs.jsonl")}
    hard = [t for t in train if t.kind == HARD]
    # the first round (the tiny model's) had no passer: the pair comes from the second
    assert all(pairs[t.id]["chosen_sample"] >= K for t in hard)
    data = json.loads((stage_dir / "metrics.json").read_text())["data"]
    assert data["tasks_resampled"] == data["pairs_chosen_resampled"] == len(hard)


def test_pairs_pass_the_template_guard(stage, tiny_backend):
    stage_dir, _ = stage
    guard = TemplateGuard(tiny_backend.tokenizer)
    for pair in read_jsonl(stage_dir / "pairs.jsonl"):
        guard.check_record(pair, "stage 3 pairs.jsonl")


def test_training_prompts_are_zero_shot(stage):
    stage_dir, _ = stage
    tasks = {t.id: t for t in read_tasks(stage_dir / "tasks.jsonl")}
    exemplars = s3.exemplar_texts(POOL)
    instructions = [e["instruction"] for e in POOL["response_exemplars"]]
    for pair in read_jsonl(stage_dir / "pairs.jsonl"):
        assert pair["prompt"] == house_prompt(tasks[pair["task_id"]].text)
        assert pair["prompt"].count("Instruction:") == 1 and "###" not in pair["prompt"]
        assert not any(text.strip() in pair["prompt"] for text in exemplars + instructions)


def test_heldout_never_trains(stage):
    stage_dir, _ = stage
    tasks = read_tasks(stage_dir / "tasks.jsonl")
    held = [t for t in tasks if t.split == "heldout"]
    assert len(held) == HELDOUT and sum(t.split == "train" for t in tasks) == LIMIT
    assert all(t.stage == 3 and t.kind == t.extra["spec"]["kind"] and t.source in ("pool", "model")
               for t in tasks)
    held_topics = {t.extra["spec"]["topic"] for t in held}
    assert not held_topics & {t.extra["spec"]["topic"] for t in tasks if t.split == "train"}
    for pair in read_jsonl(stage_dir / "pairs.jsonl"):
        assert pair["task_id"] not in {t.id for t in held}
        assert not any(t.text in pair["prompt"] for t in held)


def test_training_changed_the_merged_weights(stage, tiny_dir):
    from transformers import AutoModelForCausalLM

    stage_dir, _ = stage
    model = AutoModelForCausalLM.from_pretrained(str(stage_dir / "merged"))
    assert model.config.model_type == "qwen2"

    def weights(folder: Path) -> dict:
        out = {}
        for shard in sorted(folder.glob("*.safetensors")):
            out.update(load_file(str(shard)))
        return out

    before, after = weights(Path(tiny_dir)), weights(stage_dir / "merged")
    assert before.keys() == after.keys()
    assert any(not before[k].equal(after[k]) for k in before)


def test_metrics(stage):
    stage_dir, _ = stage
    metrics = json.loads((stage_dir / "metrics.json").read_text())
    assert metrics["name"] == "generation-tasks" and metrics["dpo"]["steps"] > 0
    assessment = metrics["assessment"]
    assert assessment["headline"] == "task_success"
    for side in ("before", "after"):
        summary = assessment[side]["summary"]
        assert set(summary) == {"task_success", *s3.CHECKS, "distinct_items_when_count_ok"}
        assert summary["task_success"]["n"] == HELDOUT
    data = metrics["data"]
    assert data["tasks_train"] == LIMIT and data["tasks_heldout"] == HELDOUT
    assert data["pairs"] == LIMIT and data["topics"]["model_proposed"] == len(KEPT_PROPOSALS)
    assert data["sample_checks"]["all_checks"]["k"] == 2 * LIMIT
    assert "Stage 3" in (stage_dir / "report.md").read_text()
