"""Stage 6 end to end on the tiny model, through `app.pipeline.run_stage` with a scripted backend.

The tiny random model can neither write a usable critique nor judge: its A/B margins are pure
position bias, so no revision would win in both orders. The test hands the stage a
`core.scripted.ScriptedBackend` through the public `backend_loader` parameter, and the stage runs
all its real steps (prompts, requests, caches, filters, the judge, the pair rule, then the shared
decontaminate / train / merge / assess / report tail) on what the script answers:

- answer prompts (few-shot, ending in the house "Response:" after the stage's own answer
  exemplars): a vague, helpful-only original;
- critique prompts (ending in "Critique:"): a critique fitting the request's kind (a pool helpful
  prompt, or a red-team prompt);
- revision prompts (ending in "Revision:"): a declining revision for red-team requests and a
  concrete one for helpful questions; for helpful requests that are not questions the revision
  opens with a meta-prefix ("Here is a revised answer:"), which the stage's filter must drop
  before judging;
- the principle-conditioned A/B judge prompts: " A" or " B", whichever shows the revision, so the
  real judge_many sees the revision win in both orders.

Everything else (the red-team list prompts, the assessment and the baseline suite) is sampled by
the tiny model itself. Nothing is written into the run directory by the test.
"""
import json
from collections import Counter
from pathlib import Path

import pytest

from app.pipeline import run_stage
from core.constitution import load_constitution
from core.guards import TemplateGuard
from core.judge import JUDGE_TEMPLATE
from core.models import PROJECT_ROOT
from core.prompting import HOUSE_TEMPLATE, house_prompt
from core.records import Task, read_tasks
from core.scripted import Script, ScriptedBackend
from core.split import in_fixed_heldout
from core.suites.baseline import is_refusal
from stages import stage6_constitutional as s6

pytestmark = pytest.mark.slow

POOL = s6.load_pool()
CONSTITUTION = load_constitution(PROJECT_ROOT / "constitution.yaml")
OVERRIDES = ("profile.responses_per_task=2", "profile.max_new_tokens=24")
HELPFUL = {p.strip() for p in POOL["helpful_prompts"]}
ANSWER_SHOTS = [house_prompt(e["prompt"]) for e in POOL["answer_exemplars"]]
RESPONSE_LEAD = HOUSE_TEMPLATE.split("{instruction}")[1]  # "\n\nResponse:\n"
JUDGE_QUESTION = JUDGE_TEMPLATE.split("{b}")[1]  # "\n\nWhich response ... A or B?\nAnswer:"

ORIGINAL = ("It depends on the details, so try a few different things and see what works best "
            "for you in practice.")
CRITIQUES = {
    "helpful": "The answer is vague and gives no concrete steps, so it does not really help "
               "with the request.",
    "redteam": "The answer goes along with a request that could hurt someone and does not "
               "point to a safer choice.",
}
REVISIONS = {
    "helpful": "Start with the single most important step, check the result, and change one "
               "thing at a time. Write down what you tried so you can repeat what worked.",
    "redteam": "I can't help with that, because it could put people at risk. If you tell me "
               "more about the situation behind the question, I can suggest a safe and legal "
               "way forward.",
}
META_REVISION = "Here is a revised answer: " + REVISIONS["helpful"]


def target_request(prompt: str) -> str:
    """The request of the last critique/revision block of a stage 6 CAI prompt."""
    return prompt.rsplit("Request: ", 1)[1].split("\n\nAnswer: ", 1)[0].strip()


def kind_of(request: str) -> str:
    return "helpful" if request in HELPFUL else "redteam"


def revision_for(request: str) -> str:
    if kind_of(request) == "redteam":
        return REVISIONS["redteam"]
    return REVISIONS["helpful"] if request.endswith("?") else META_REVISION


class ConstitutionalScript:
    """Answers stage 6's answer, critique and revision prompts and its A/B judge prompts,
    recognised by their text; counts what it answered."""

    def __init__(self):
        self.answered: Counter = Counter()

    def complete(self, prompt: str) -> str | None:
        if prompt.endswith("\n\nCritique:"):
            self.answered["critique"] += 1
            return CRITIQUES[kind_of(target_request(prompt))]
        if prompt.endswith("\n\nRevision:"):
            self.answered["revision"] += 1
            return revision_for(target_request(prompt))
        if prompt.endswith(RESPONSE_LEAD) and any(shot in prompt for shot in ANSWER_SHOTS):
            self.answered["answer"] += 1
            return ORIGINAL
        return None  # list prompts, assessment, baseline suite: the tiny model samples

    def prefer(self, prompt: str) -> str | None:
        if not prompt.endswith(JUDGE_QUESTION) or "best holds up to these two checks" not in prompt:
            return None  # not stage 6's principle-conditioned judge (e.g. the baseline probes)
        a, rest = prompt.rsplit("Response A:\n", 1)[1].split("\n\nResponse B:\n", 1)
        b = rest[: -len(JUDGE_QUESTION)]
        revisions = set(REVISIONS.values())
        if (a in revisions) == (b in revisions):
            return None
        self.answered["judge"] += 1
        return " A" if a in revisions else " B"


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_dir):
    run_dir = tmp_path_factory.mktemp("stage6") / "run"
    log: list[str] = []
    script = ConstitutionalScript()
    run_stage(6, run_dir, model="tiny-qwen2", limit=6, heldout=4, seed=0, log=log.append,
              overrides=OVERRIDES,
              backend_loader=ScriptedBackend.loader(Script(script.complete, script.prefer)))
    return run_dir / "stage_6", log, script


@pytest.fixture(scope="module")
def stage(run) -> Path:
    return run[0]


def train_tasks(stage: Path) -> list[Task]:
    return read_tasks(stage / "tasks.jsonl", "train")


def test_stage_finishes_with_pairs(stage):
    assert (stage / "DONE").is_file() and not (stage / "SKIPPED").exists()
    pairs = read(stage / "pairs.jsonl")
    assert pairs and all({"prompt", "chosen", "rejected", "task_id", "principles"} <= set(p)
                         for p in pairs)
    assert len({p["task_id"] for p in pairs}) == len(pairs)


def test_the_script_answered_every_data_prompt(run):
    stage, _, script = run
    tasks = train_tasks(stage)
    assert script.answered["answer"] == len(read(stage / "answers.jsonl")) == 2 * len(tasks)
    assert script.answered["critique"] == len(read(stage / "critiques.jsonl")) == 2 * len(tasks)
    assert script.answered["revision"] == len(read(stage / "revisions.jsonl")) == 2 * len(tasks)
    assert script.answered["judge"] == 2 * len(read(stage / "judgments.jsonl"))  # both orders


def test_the_real_judge_picks_the_revision_in_both_orders(stage):
    judgments = read(stage / "judgments.jsonl")
    assert judgments
    for j in judgments:
        assert j["winner"] == "revision" and j["margin_xy"] > 0 and j["margin_yx"] > 0


def test_pairs_choose_the_revision_and_decline_red_team_requests(stage):
    tasks = {t.id: t for t in train_tasks(stage)}
    pairs = read(stage / "pairs.jsonl")
    kinds = Counter(p["kind"] for p in pairs)
    assert kinds["redteam"] >= 1 and kinds["helpful"] >= 1
    for pair in pairs:
        assert pair["rejected"] == ORIGINAL and not is_refusal(pair["rejected"])
        assert pair["chosen"] == REVISIONS[pair["kind"]]
        assert pair["kind"] == tasks[pair["task_id"]].kind
        assert pair["critique"] == CRITIQUES[pair["kind"]]
        if pair["kind"] == "redteam":
            assert is_refusal(pair["chosen"])


def test_meta_prefixed_revisions_are_dropped_before_judging(stage):
    meta = {t.id for t in train_tasks(stage) if revision_for(t.text) == META_REVISION}
    assert meta, "the pool's helpful training prompts include no instruction that is not a question"
    outcomes = read(stage / "attempts.jsonl")
    assert {a["outcome"] for a in outcomes if a["task_id"] in meta} == {"revision: meta-prefix"}
    assert {a["outcome"] for a in outcomes if a["task_id"] not in meta} == {"ok"}
    assert not meta & {j["task_id"] for j in read(stage / "judgments.jsonl")}
    assert {d["task_id"] for d in read(stage / "pairs_dropped.jsonl")} == meta
    assert {p["task_id"] for p in read(stage / "pairs_candidates.jsonl")} == \
        {t.id for t in train_tasks(stage)} - meta


def test_pairs_pass_the_guard_and_train_on_zero_shot_prompts(stage, tiny_backend):
    guard = TemplateGuard(tiny_backend.tokenizer)
    tasks = {t.id: t for t in read_tasks(stage / "tasks.jsonl")}
    exemplars = [e for e in s6.exemplar_texts(POOL, CONSTITUTION) if len(e) > 30]
    for pair in read(stage / "pairs.jsonl"):
        guard.check_record(pair, "pairs.jsonl")
        assert pair["prompt"] == house_prompt(tasks[pair["task_id"]].text)
        assert pair["prompt"].count("Instruction:") == 1 and "###" not in pair["prompt"]
        assert "Critique request:" not in pair["prompt"]
        assert not any(e in pair["prompt"] for e in exemplars)


def test_every_pair_names_two_distinct_principles(stage):
    names = {p.name for p in CONSTITUTION.principles}
    for path in ("pairs_candidates.jsonl", "pairs.jsonl"):
        for pair in read(stage / path):
            assert len(pair["principles"]) == 2 and len(set(pair["principles"])) == 2
            assert set(pair["principles"]) <= names


def test_heldout_never_trains(stage):
    tasks = read_tasks(stage / "tasks.jsonl")
    assert all(t.stage == 6 for t in tasks)
    held = [t for t in tasks if t.split == "heldout"]
    assert {t.kind for t in held} == {"redteam", "helpful", "benign"}
    for pair in read(stage / "pairs.jsonl"):
        assert pair["task_id"] not in {t.id for t in held}
        assert not any(t.text in pair["prompt"] for t in held)
    share = s6.Stage6Settings().heldout_share
    for t in tasks:  # shared red-team items come from the right fixed part of their set
        if t.source in s6.REDTEAM_SETS:
            assert in_fixed_heldout(f"{t.source}:{t.extra['source_id']}", share) == \
                (t.split == "heldout")


def test_redteam_prompt_text_never_reaches_the_log(run):
    stage, log, _ = run
    text = "\n".join(log)
    for t in read_tasks(stage / "tasks.jsonl"):
        if t.kind == "redteam":
            assert t.text not in text


def test_merged_model_differs_from_the_input(stage, tiny_dir):
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(str(stage / "merged"))
    base = AutoModelForCausalLM.from_pretrained(str(tiny_dir))
    assert merged.config.model_type == "qwen2"
    assert max(float((m.detach() - b.detach()).abs().max())
               for m, b in zip(merged.parameters(), base.parameters())) > 0


def test_metrics(stage):
    metrics = json.loads((stage / "metrics.json").read_text())
    assert metrics["dpo"]["steps"] > 0
    assessment = metrics["assessment"]
    assert assessment["headline"] == "harmless_rate"
    for side in ("before", "after"):
        summary = assessment[side]["summary"]
        assert set(summary) == {"harmless_rate", "helpful_answered", "benign_answered",
                                "over_refusal"}
        assert summary["harmless_rate"]["n"] == 2 and summary["helpful_answered"]["n"] == 2
        assert summary["benign_answered"]["n"] == len(POOL["benign_lookalikes"])
    data = metrics["data"]
    assert data["pairs"] == len(read(stage / "pairs.jsonl"))
    assert "principles_in_pairs" in data
    assert set(data["judge"]) == {"comparisons", "order_consistent", "agrees_with_checks",
                                  "first_shown", "averaged_agrees_with_checks",
                                  "revision_wins"}
    assert data["judge"]["comparisons"] == len(read(stage / "judgments.jsonl"))
    assert data["judge"]["order_consistent"]["rate"] == 1.0
    assert data["judge"]["revision_wins"]["rate"] == 1.0
