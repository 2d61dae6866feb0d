"""Stage 2 end to end on the tiny model, through `app.pipeline.run_stage` with the shared question
sets (when present): interface files, guards, zero-shot training prompts and the held-out split.

The tiny model cannot write bare questions or answer them, so the run uses the scripted backend
(core/scripted.py), handed to the stage through the public `backend_loader` parameter. The
script recognises the stage's prompts by their text and answers only these:

- the question list prompt ("Below are questions and requests ...", ending "N."): the next of
  QUESTIONS, each a distinct bare question;
- the few-shot answer prompt (stage 2's own answer exemplars, then the target question): for the
  k-th such prompt of a question, an on-topic direct answer or a typical failure (continuing the
  question, asking one back, dodging), cycling through FEW_SHOT_PLAN;
- the A/B judge prompt: " A" or " B" for the response that passes the stage's answer checks,
  and between two passers the longer one (the same in both orders).

Everything else (the zero-shot samples, the held-out assessment, the baseline suite) is the
real tiny model. The stage runs its real steps on these answers: its filters, split, answer
checks, judge, pair rule, decontamination, DPO, merge and assessment."""
import json
import re
from itertools import count
from pathlib import Path

import pytest

from app.pipeline import run_stage
from core.guards import TemplateGuard
from core.judge import JUDGE_END, JUDGE_TEMPLATE
from core.models import PROJECT_ROOT, weights_sha256
from core.prompting import EXEMPLAR_END
from core.records import read_tasks
from core.scripted import Script, ScriptedBackend
from core.split import in_fixed_heldout
from registry.models import profile_by_name
from stages import stage2_implicit_instructions as s2

pytestmark = pytest.mark.slow

DATA_DIR = PROJECT_ROOT.parent / "shared" / "data"
LIMIT, HELDOUT = 6, 4
QUESTIONS = [
    "How do octopuses change color so fast?",
    "Cheapest way to heat a drafty bedroom in winter",
    "How long should sourdough starter rest before baking?",
    "Is it safe to kayak alone on a calm lake?",
    "What makes a violin sound different from a viola?",
    "Good habits for keeping houseplants alive while traveling",
    "Can cooked rice be frozen and reheated safely?",
    "How do submarines stay level underwater?",
    "Which spices pair well with roasted carrots?",
    "Where do hummingbirds sleep at night?",
    "Why are flamingos pink?",
    "How can a beginner learn juggling quickly?",
    "What keeps a bicycle upright while it is moving?",
    "Best way to store fresh basil for a week",
]
QUESTION_LIST_HEAD = "Below are questions and requests that people sent to a knowledgeable friend"
# What the k-th few-shot prompt the script sees for a question gets (cycling): answers (distinct
# texts of different lengths), a repeated answer (a duplicate the stage drops), and failures of
# the answer checks.
FEW_SHOT_PLAN = ("short", "continues", "medium", "asks", "long", "dodges", "short", "continues")
JUDGE_TAIL = JUDGE_TEMPLATE.split("{b}")[1]
JUDGE_LAST = re.compile(r"Instruction: (?P<q>.*)\n\nResponse A:\n(?P<a>.*)\n\nResponse B:\n"
                        r"(?P<b>.*)" + re.escape(JUDGE_TAIL) + r"$", re.DOTALL)


def topic_of(question: str) -> str:
    """A content word of the question, so that an answer stays on its topic."""
    words = [w for w in re.findall(r"[A-Za-z]+", question)
             if len(w) >= 3 and w.lower() not in s2.STOPWORDS]
    return words[0].lower() if words else "this"


def scripted_answer(question: str, kind: str) -> str:
    topic = topic_of(question)
    return {
        "short": f"Mostly, {topic} comes down to a few plain facts.",
        "medium": f"People who study {topic} usually give the same account: look at the "
                  f"evidence first, then decide.",
        "long": f"The main thing to know about {topic} is simple. Start with the basic facts, "
                f"check them against what you see yourself, and adjust as you learn more.",
        "continues": "and what else should I know before I start",
        "asks": "What made you curious about that in the first place?",
        "dodges": "I don't know, sorry.",
    }[kind]


def stage2_script() -> Script:
    new_question = iter(QUESTIONS)
    sampled: dict[str, count] = {}
    exemplar_questions = {e["question"] for e in s2.load_pool()["answer_exemplars"]}

    def complete(prompt: str) -> str | None:
        if prompt.startswith(QUESTION_LIST_HEAD) and re.search(r"\n\d+\.$", prompt):
            return next(new_question, "")  # out of questions: an empty item, dropped
        blocks = prompt.split(EXEMPLAR_END)
        first = re.match(r"Instruction: (.*)\n\nResponse:\n", blocks[0])
        target = re.fullmatch(r"Instruction: (.*)\n\nResponse:\n", blocks[-1], re.DOTALL)
        if len(blocks) > 1 and first and first.group(1) in exemplar_questions and target:
            question = target.group(1)
            k = next(sampled.setdefault(question, count()))
            return scripted_answer(question, FEW_SHOT_PLAN[k % len(FEW_SHOT_PLAN)])
        return None  # zero-shot answers, assessment, baseline: the real tiny model

    def prefer(prompt: str) -> str | None:
        match = JUDGE_LAST.search(prompt.split(JUDGE_END)[-1])
        if not match:
            return None

        def merit(text: str) -> tuple[bool, int]:
            return s2.check_answer(match["q"], text)["problem"] is None, len(text)

        return " A" if merit(match["a"]) >= merit(match["b"]) else " B"

    return Script(complete=complete, prefer=prefer)


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def stage(tmp_path_factory, tiny_dir) -> Path:
    run_dir = tmp_path_factory.mktemp("stage2") / "run"
    # --model names the tiny profile (its hyper-parameters; its model is tiny_dir): a bare path
    # would take the CPU default profile's. Stage 1 has not run here: stage 2 starts from
    # --model and reads no stage 1 instructions.
    run_stage(2, run_dir, model="tiny-qwen2", limit=LIMIT, heldout=HELDOUT, seed=0,
              data_dir=DATA_DIR if DATA_DIR.is_dir() else None, baseline_limit=1,
              log=lambda _: None, backend_loader=ScriptedBackend.loader(stage2_script()))
    return run_dir / "stage_2"


def test_interface_files(stage, tiny_dir):
    for name in ("DONE", "input.json", "tasks.jsonl", "questions_audit.jsonl",
                 "responses.jsonl", "scores.jsonl", "judgments.jsonl", "pairs_candidates.jsonl",
                 "pairs_dropped.jsonl", "pairs.jsonl", "metrics.json", "report.md",
                 "contamination.tsv", "adapter/adapter_config.json", "merged/config.json"):
        assert (stage / name).exists(), name
    metrics = json.loads((stage / "metrics.json").read_text())
    assert metrics["dpo"]["steps"] > 0
    assert metrics["assessment"]["headline"] == "answer_rate"
    for side in ("before", "after"):
        summary = metrics["assessment"][side]["summary"]
        assert {"answer_rate", "on_topic", "non_degenerate"} <= set(summary)
        assert summary["answer_rate"]["n"] == metrics["data"]["tasks_heldout"] == HELDOUT
    data = metrics["data"]
    assert data["tasks_train"] == LIMIT
    assert {"questions_by_source", "responses", "sample_answer_rate", "sample_failures",
            "pairs_dropped", "judge"} <= set(data)
    assert set(data["judge"]) == {"comparisons", "order_consistent", "agrees_with_checks",
                          "first_shown", "averaged_agrees_with_checks"}
    # the scripted judge follows the answer checks, in both orders
    assert data["judge"]["order_consistent"]["rate"] == 1.0
    assert data["judge"]["agrees_with_checks"]["rate"] == 1.0
    recorded = json.loads((stage / "input.json").read_text())
    assert Path(recorded["path"]).resolve() == tiny_dir.resolve()
    merge = json.loads((stage / "merge.json").read_text())
    assert merge["weights_sha256"] != weights_sha256(str(tiny_dir))  # training changed weights


def test_samples_follow_the_plan_and_the_checks(stage):
    scored = lines(stage / "scores.jsonl")
    per_task = {}
    for s in scored:
        per_task.setdefault(s["task_id"], []).append(s)
    k = profile_by_name("tiny-qwen2").responses_per_task
    plan = [FEW_SHOT_PLAN[i % len(FEW_SHOT_PLAN)] for i in range(k)]
    problems = {"short": None, "medium": None, "long": None,
                "continues": "continues the question",
                "asks": "asks a question instead of answering", "dodges": "dodges the question"}
    assert len(per_task) == LIMIT
    for samples in per_task.values():
        assert [s["prompting"] for s in samples] == \
            ["few-shot"] * k + ["zero-shot"] * s2.Stage2Settings().zero_shot_samples
        # the script answers in call order (batches are sorted), so compare as multisets
        assert sorted(map(str, (s["problem"] for s in samples[:k]))) == \
            sorted(str(problems[kind]) for kind in plan)
    judgments = lines(stage / "judgments.jsonl")
    kinds = [j["kind"] for j in judgments]
    assert kinds.count("rank") == 3 * LIMIT  # three distinct passers: a round-robin of three
    assert kinds.count("check") == LIMIT


def test_pairs_are_clean_and_zero_shot(stage, tiny_backend):
    guard = TemplateGuard(tiny_backend.tokenizer)
    pool = s2.load_pool()
    exemplar_questions = [e["question"] for e in pool["answer_exemplars"]]
    candidates = lines(stage / "pairs_candidates.jsonl")
    assert len(candidates) == LIMIT  # every training question has a passer and a failure
    pairs = lines(stage / "pairs.jsonl")
    assert pairs and all({"prompt", "chosen", "rejected", "task_id"} <= set(p) for p in pairs)
    questions = {t.id: t.text for t in read_tasks(stage / "tasks.jsonl")}
    for pair in pairs:
        guard.check_record(pair, "pairs.jsonl")
        question = questions[pair["task_id"]]
        assert pair["prompt"] == s2.house_prompt(question)
        assert pair["prompt"].count("Instruction:") == 1 and "###" not in pair["prompt"]
        assert not any(q in pair["prompt"] for q in exemplar_questions)
        assert s2.check_answer(question, pair["chosen"])["problem"] is None
        assert s2.check_answer(question, pair["rejected"])["problem"] is not None
        # the judge's ranking picked the longest answer
        assert pair["chosen"] == scripted_answer(question, "long")


def test_heldout_never_trains(stage):
    tasks = read_tasks(stage / "tasks.jsonl")
    assert {(t.stage, t.kind) for t in tasks} == {(2, "question")}
    held = {t.id: t.text for t in tasks if t.split == "heldout"}
    assert [t.id for t in read_tasks(stage / "tasks.jsonl", "heldout")] == list(held)
    real_sets_read = any(t.source != "generated" for t in tasks)
    assert held and real_sets_read == DATA_DIR.is_dir()
    share = s2.Stage2Settings().heldout_share
    for task in tasks:
        if task.source != "generated":
            assert (task.split == "heldout") == in_fixed_heldout(task.id, share)
        else:
            assert task.text in QUESTIONS
    generated = sorted(t.id for t in tasks if t.source == "generated")
    held_generated = [i for i in generated if i in held]
    assert held_generated == generated[:len(held_generated)]  # the smallest ids
    for pair in lines(stage / "pairs.jsonl"):
        assert pair["task_id"] not in held
        assert not any(q in pair["prompt"] for q in held.values())


def test_merged_model_loads(stage):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(stage / "merged"))
    assert model.config.model_type == "qwen2"
