"""Stage 5 end to end on the tiny model, through `app.pipeline.run_stage`, with stage 1 material
made by a real stage 1 run in the same run directory.

The tiny model can neither revise nor judge revisions: its revisions never keep a draft's
content (ROUGE-L against the draft stays below 0.2) and its A/B verdicts flip with the order every
time, so with the tiny model alone the stage stops at `pairs` with a NoPairsError that says so
(tests/test_stage5_rules.py::test_no_pairs_is_a_clear_error). To run every step, the test hands
both stages a scripted backend (core/scripted.py) through the public `backend_loader` parameter:

- stage 1 (run first, `skip_empty`): the script writes its instruction list items and answers
  each instruction with one fixed response that misses some of its constraints. With no passing
  sample and one distinct sample per task stage 1 keeps no pair and is marked SKIPPED after its
  scores step; its tasks.jsonl and scores.jsonl are real stage 1 outputs, and their
  failing samples become stage 5's "stage1" revision tasks.
- stage 5 (started from the tiny model with an explicit --model): on about half of the few-shot
  revision prompts of training tasks (a hash of the prompt decides) the script writes the draft
  with a programmatic `fix` that passes the task's checks; after an A/B judge prompt where exactly
  one response is such a fix, it prefers that one (" A" or " B"). Everything else is the tiny
  model's own: the model drafts, the failing revisions, the judge elsewhere, DPO training on its
  weights, the merge, and the held-out assessment (zero-shot prompts of held-out tasks, which the
  script never answers).

The stage's real steps then read the scripted answers: its checks, the judge in both orders, the
pair rules, decontamination, training, merge, assessment and report.
"""
import hashlib
import json
import re
from pathlib import Path

import pytest
import yaml

from core.constraints import response_opening
from core.io import read_jsonl
from core.models import PROJECT_ROOT, weights_sha256
from core.realsets import load_real_questions
from core.records import read_tasks
from core.sampling import sample_openings
from core.scripted import Script, ScriptedBackend
from stages import stage5_revision_tasks as s5

pytestmark = pytest.mark.slow
LIMIT, HELDOUT = 6, 4
DATA_DIR = PROJECT_ROOT.parent / "shared" / "data"
HAS_DATA = DATA_DIR.is_dir()

# Stage 1's instructions (list items the script writes), each with the one response it gets: long
# sentences with commas and capitals, which miss most constraints stage 1 attaches.
STAGE1 = {
    "Describe your favourite season and what you like to do during it.":
        "Autumn is lovely, with crisp air, golden leaves and warm soup. I like long walks, hot "
        "tea, and reading by the window in the evening.",
    "Give some advice for a long car journey with small children.":
        "Take a break every two hours, drink plenty of water and share the driving if you can. "
        "Pack snacks, games, and a pillow for each child.",
    "Explain what a thermometer does and how people use it.":
        "A thermometer measures temperature. Doctors, cooks, and weather stations use it to check "
        "how hot or cold something is, in degrees Celsius or Fahrenheit.",
    "Describe how a honeybee colony prepares for winter.":
        "Bees store honey, seal the cracks in the hive, and cluster together around the queen. "
        "They shiver their wings to make heat, and they eat the stored honey until spring.",
    "Explain why bread goes stale after a few days.":
        "Bread goes stale because its starch slowly crystallises, pushing water out. The crust "
        "softens, the crumb dries, and the loaf turns hard, even in a sealed bag.",
    "Suggest a weekend routine for someone who wants to sleep better.":
        "Go to bed at the same time, even on Saturday, and get outside in the morning light. "
        "Skip coffee after lunch, keep the bedroom cool, and read a paper book before sleep.",
    "Tell me how a lighthouse keeper spent a typical night in the past.":
        "The keeper lit the lamp at dusk, wound the clockwork, and trimmed the wick every few "
        "hours. Between rounds, he wrote the log, watched the sea, and cleaned the lens.",
    "Describe the sounds of a busy market on a Saturday morning.":
        "Traders shout their prices, carts rattle over the stones, and radios play old songs. "
        "Children laugh, coins clink, and a dog barks at the pigeons near the fruit stall.",
    "Explain how a compass helps hikers find their way.":
        "A compass needle points to magnetic north, so a hiker can line up the map, find a "
        "bearing, and walk in a straight line. In fog, at night, or in a forest, it is the "
        "safest guide.",
    "Give three reasons to learn to play a musical instrument.":
        "Playing music trains memory, patience, and coordination. It gives you a way to relax "
        "after work, and it lets you meet people in bands, choirs, or orchestras.",
    "Describe what makes a good neighbour in an apartment building.":
        "A good neighbour keeps the noise down at night, says hello in the hallway, and takes in "
        "parcels. They share the laundry room fairly, and they warn you before a party.",
    "Explain why leaves change colour in autumn.":
        "In autumn, trees stop making chlorophyll, so the green fades. Yellow and orange "
        "pigments, hidden all summer, show through, and some trees make red ones as days cool.",
    "Suggest a few ways to reuse old glass jars at home.":
        "Clean jars make good spice pots, pen holders, and candle cases. You can grow herbs in "
        "them, store buttons, or fill them with cookies as a gift.",
    "Explain how a submarine dives and comes back to the surface.":
        "A submarine fills its ballast tanks with sea water to dive, and it blows them out with "
        "compressed air to rise. Small fins, called planes, tilt it up or down as it moves.",
}


def fix(draft: str, checks: list[dict]) -> str:
    """A programmatic revision for the constraint kinds it knows (others stay unfixed)."""
    text = draft
    for check in checks:
        kind, params = check["kind"], check["params"]
        if kind == "lowercase":
            text = text.lower()
        elif kind == "uppercase":
            text = text.upper()
        elif kind == "no_commas":
            text = text.replace(",", "")
        elif kind == "exclude_keywords":
            text = re.sub(r"\b(?:%s)\b" % "|".join(params["keywords"]), "", text, flags=re.I)
        elif kind == "include_keywords":
            text = f"{text} ({' '.join(params['keywords'])})"
        elif kind == "start_with":
            text = f"{params['phrase']} {text}"
        elif kind == "end_with":
            text = f"{text} {params['phrase']}"
        elif kind == "postscript":
            text = f"{text}\nP.S. Thank you."
        elif kind == "title":
            text = f"<<Notes>>\n{text}"
        elif kind == "wrap_in_quotes":
            text = '"' + text.replace('"', "") + '"'
        elif kind == "max_words":
            text = " ".join(text.split()[: params["n"]])
        elif kind == "max_sentences":
            text = re.sub(r"[.!?]+(?=\s)", ";", text)
        elif kind == "json_format":
            text = json.dumps({"answer": text})
    return text


def target(prompt: str) -> str:
    """The last (target) block of a few-shot or house-format prompt, after "Instruction: "."""
    return prompt.rsplit("Instruction: ", 1)[-1]


class Author:
    """The script both stages run on: what it writes, and which judge verdicts it gives."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.items = iter(STAGE1)  # stage 1 list items, in order
        self.fixed: set[str] = set()  # the revisions it wrote (each passes its task's checks)

    def complete(self, prompt: str) -> str | None:
        if prompt.startswith("Below is a list of different tasks"):  # stage 1 instructions
            item = next(self.items, None)
            return None if item is None else " " + item
        last = target(prompt)
        for instruction, response in STAGE1.items():  # stage 1 responses
            if last.startswith(instruction):
                return response
        if last.startswith("Rewrite the draft") and "\n###\n" in prompt:  # stage 5 revisions
            return self.revision(prompt, last)
        return None

    def revision(self, prompt: str, last: str) -> str | None:
        """A passing revision of a training task's draft on half of its prompts."""
        if int(hashlib.sha256(prompt.encode()).hexdigest()[:8], 16) % 2:
            return None
        draft = last.split("\n\nDraft: ", 1)[1].split("\n\nCritique: ", 1)[0]
        tasks = {t.extra["draft"]: t
                 for t in read_tasks(self.run_dir / "stage_5" / "tasks.jsonl", "train")}
        task = tasks.get(draft)
        text = fix(draft, task.extra["checks"]) if task else None
        if text is None or not s5.revision_checks(text, task)["passed"]:
            return None
        self.fixed.add(text.strip())
        opening = response_opening(task.extra["checks"])
        if opening and prompt.endswith(opening):  # an opened prompt: write on from it
            return text[len(opening):] if text.startswith(opening) else None
        return text

    def prefer(self, prompt: str) -> str | None:
        """After an A/B judge prompt: the response the script wrote, when exactly one is."""
        if "\n\nResponse A:\n" not in prompt:
            return None
        a, rest = prompt.rsplit("\n\nResponse A:\n", 1)[1].split("\n\nResponse B:\n", 1)
        b = rest.split("\n\nWhich response follows", 1)[0]
        a_fixed, b_fixed = a.strip() in self.fixed, b.strip() in self.fixed
        return None if a_fixed == b_fixed else " A" if a_fixed else " B"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_dir) -> Path:
    from app.pipeline import run_stage

    run_dir = tmp_path_factory.mktemp("stage5") / "run"
    author = Author(run_dir)
    loader = ScriptedBackend.loader(Script(complete=author.complete, prefer=author.prefer))
    options = dict(model=str(tiny_dir), limit=LIMIT, heldout=HELDOUT, seed=0,
                   log=lambda _: None, backend_loader=loader)
    run_stage(1, run_dir, skip_empty=True, **options)
    run_stage(5, run_dir, skip_empty=False, data_dir=DATA_DIR if HAS_DATA else None, **options)
    return run_dir


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_stage1_ran_for_real_and_stage5_started_from_the_model(run_dir, tiny_dir):
    stage1 = run_dir / "stage_1"
    assert (stage1 / "SKIPPED").is_file() and not (stage1 / "DONE").exists()
    assert len(read_tasks(stage1 / "tasks.jsonl")) == LIMIT + HELDOUT
    inputs = json.loads((run_dir / "stage_5" / "input.json").read_text())
    assert inputs["path"] == str(tiny_dir) and "--model" in inputs["origin"]
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["settings"]["stage5"] == {"keeps_content": 0.2, "max_tasks_per_request": 2,
                                            "draft_oversample": 1.5, "constraint_tries": 4,
                                            "max_judged_revisions": 3, "opened_samples": 2,
                                            "real_heldout": True, "real_heldout_share": 0.3,
                                            "hindsight": True}


def test_stage_completes_with_pairs(run_dir):
    stage = run_dir / "stage_5"
    assert (stage / "DONE").is_file()
    pairs = lines(stage / "pairs.jsonl")
    assert pairs and all({"prompt", "chosen", "rejected", "task_id"} <= set(p) for p in pairs)
    tasks = {t.id: t for t in read_tasks(stage / "tasks.jsonl")}
    for pair in pairs:  # chosen fixes the critique and keeps the content; rejected does not
        assert s5.revision_checks(pair["chosen"], tasks[pair["task_id"]])["passed"]
        assert not s5.revision_checks(pair["rejected"], tasks[pair["task_id"]])["passed"]


def test_tasks_come_from_stage1_the_pool_and_model_drafts(run_dir):
    stage = run_dir / "stage_5"
    tasks = read_tasks(stage / "tasks.jsonl")
    assert sum(t.split == "train" for t in tasks) == LIMIT
    assert sum(t.split == "heldout" for t in tasks) == HELDOUT
    assert all(t.stage == 5 and t.kind == "revision" for t in tasks)
    assert any(d["source"] == "model-draft"  # stage 1 left training tasks missing
               for d in lines(stage / "drafts.jsonl"))
    audit = lines(stage / "tasks_audit.jsonl")  # every source with a usable task trains
    usable = {a["source"] for a in audit if a["dropped"] is None} - {s5.HELDOUT_SOURCE}
    assert {"stage1", "pool"} <= usable
    assert {t.source for t in tasks if t.split == "train"} == usable
    samples = {f"{s['task_id']}-{s['sample']}": s
               for s in read_jsonl(run_dir / "stage_1" / "scores.jsonl")}
    for task in (t for t in tasks if t.source == "stage1"):  # a failing stage 1 sample
        origin = samples[task.extra["origin"]]
        assert task.extra["request"] in STAGE1 and origin["text"] == task.extra["draft"]
        assert not origin["passed"]


@pytest.mark.skipif(not HAS_DATA, reason="needs ../shared/data")
def test_heldout_tasks_are_drafts_of_the_real_sets_heldout_questions(run_dir):
    stage = run_dir / "stage_5"
    real = {q["question"]: q["split"] for q in load_real_questions(DATA_DIR, 0.3)}
    drafts = lines(stage / "drafts.jsonl")
    held_drafts = [d for d in drafts if d["source"] == s5.HELDOUT_SOURCE]
    assert len(held_drafts) == 6  # draft_oversample x --heldout, the model's own drafts
    assert all(real[d["request"]] == "heldout" for d in held_drafts)
    tasks = read_tasks(stage / "tasks.jsonl")
    held = [t for t in tasks if t.split == "heldout"]
    assert len(held) == HELDOUT and {t.source for t in held} == {s5.HELDOUT_SOURCE}
    assert {t.extra["draft"] for t in held} <= {d["draft"] for d in held_drafts}
    assert not any(t.source == s5.HELDOUT_SOURCE for t in tasks if t.split == "train")
    assert not any(real.get(t.extra["request"]) == "heldout" for t in tasks if t.split == "train")


def test_the_first_revisions_of_a_task_whose_checks_fix_a_beginning_start_from_it(run_dir):
    stage = run_dir / "stage_5"
    revisions = lines(stage / "revisions.jsonl")
    opened = {f"{r['task_id']}-{r['sample']}": r["opening"] for r in revisions if "opening" in r}
    config = yaml.safe_load((run_dir / "config.yaml").read_text())["settings"]
    expected = sample_openings(read_tasks(stage / "tasks.jsonl", "train"),
                               config["profile"]["responses_per_task"],
                               config["stage5"]["opened_samples"],
                               lambda task: response_opening(task.extra["checks"]))
    assert expected and opened == expected
    assert all(r["text"].startswith(r["opening"]) for r in revisions if "opening" in r)


def test_pairs_pass_guards_and_prompts_are_zero_shot(run_dir, tiny_backend):
    from core.guards import TemplateGuard

    guard = TemplateGuard(tiny_backend.tokenizer)
    exemplars = s5.exemplar_texts(s5.load_pool())
    for pair in lines(run_dir / "stage_5" / "pairs.jsonl"):
        guard.check_record(pair, "pairs.jsonl")
        prompt = pair["prompt"]
        assert prompt.startswith("Instruction: Rewrite the draft so that it follows the critique.")
        assert prompt.count("Instruction:") == 1 and prompt.count("Response:") == 1
        assert "###" not in prompt
        assert not any(len(ex) > 30 and ex.strip() in prompt for ex in exemplars)


def test_heldout_never_trains(run_dir):
    stage = run_dir / "stage_5"
    held = read_tasks(stage / "tasks.jsonl", "heldout")
    for pair in lines(stage / "pairs.jsonl"):
        assert pair["task_id"] not in {t.id for t in held}
        assert not any(t.extra["draft"] in pair["prompt"] or t.extra["request"] in pair["prompt"]
                       for t in held)


def test_merged_model_loads_and_metrics(run_dir, tiny_dir):
    from transformers import AutoModelForCausalLM

    stage = run_dir / "stage_5"
    model = AutoModelForCausalLM.from_pretrained(str(stage / "merged"))
    assert model.config.model_type == "qwen2"
    merge = json.loads((stage / "merge.json").read_text())
    assert merge["weights_sha256"] == weights_sha256(str(stage / "merged"))
    assert merge["weights_sha256"] != weights_sha256(str(tiny_dir))  # training changed weights
    metrics = json.loads((stage / "metrics.json").read_text())
    assert metrics["dpo"]["steps"] > 0
    assessment = metrics["assessment"]
    assert assessment["headline"] == "revision_success"
    for side in ("before", "after"):
        summary = assessment[side]["summary"]
        assert {"revision_success", "fixes_critique", "keeps_content"} <= set(summary)
        assert summary["revision_success"]["n"] == HELDOUT
    judge = metrics["data"]["judge"]
    assert set(judge) == {"comparisons", "order_consistent", "agrees_with_checks",
                          "first_shown", "averaged_agrees_with_checks"}
    assert judge["comparisons"] > 0 and judge["agrees_with_checks"]["k"] > 0
    assert "Stage 5" in (stage / "report.md").read_text()
