"""Stage 5 end to end on the tiny model, in a tmp run directory, with stage 1 material present.

The tiny model can neither revise nor judge revisions: its revisions never keep a draft's
content (ROUGE-L against the draft stays below 0.2) and its A/B verdicts flip with the order every
time, so with the tiny model alone the stage stops at `pairs` with a RuntimeError that says so
(tests/test_stage5_rules.py::test_no_pairs_is_a_clear_error). To run every step, `Reviser` wraps
the tiny model and stands in for a capable model in exactly two places: on about half of the
revision samples it returns the draft with a programmatic fix, and on judge prompts it prefers a
revision it fixed. Everything else is the tiny model's own: the drafts, the failing revisions, DPO
training on its weights, the merge and the (honest, unwrapped) assessment.
"""
import json
import re
from pathlib import Path

import pytest

from core.backend import Completion
from core.io import read_jsonl, write_jsonl
from core.judge import option_token_ids
from stages import stage5_revision_tasks as s5

pytestmark = pytest.mark.slow
NO_COMMAS = {"kind": "no_commas", "params": {}}
LOWER = {"kind": "lowercase", "params": {}}
ENDS = {"kind": "end_with", "params": {"phrase": "I hope this helps."}}


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


class Reviser:
    """The tiny model, plus a programmatic reviser and a judge that recognises its fixes."""

    def __init__(self, inner, tasks_path: Path):
        self.inner, self.tasks_path, self.fixed = inner, tasks_path, set()

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def generate(self, prompts, settings, seeds, on_finish=None):
        completions = self.inner.generate(prompts, settings, seeds)
        out = []
        for prompt, seed, completion in zip(prompts, seeds, completions):
            fixed = self.fixed_revision(prompt) if seed % 2 == 0 else None
            out.append(Completion(fixed, "stop", completion.tokens) if fixed else completion)
        for i, completion in enumerate(out):
            if on_finish:
                on_finish(i, completion)
        return out

    def fixed_revision(self, prompt: str) -> str | None:
        target = prompt.rsplit("Instruction: ", 1)[-1]
        if not target.startswith("Rewrite the draft"):
            return None
        draft = target.split("\n\nDraft: ", 1)[1].split("\n\nCritique: ", 1)[0]
        task = {t["draft"]: t for t in read_jsonl(self.tasks_path)}[draft]
        text = fix(draft, task["checks"])
        if not s5.revision_checks(text, task)["passed"]:
            return None
        self.fixed.add(text.strip())
        return text

    def next_token_logprobs(self, prompts):
        logp = self.inner.next_token_logprobs(prompts).clone()
        a_id, b_id = option_token_ids(self.inner.tokenizer)
        for row, prompt in enumerate(prompts):
            if "\n\nResponse A:\n" not in prompt:  # the chat-template probe
                continue
            a, rest = prompt.rsplit("\n\nResponse A:\n", 1)[1].split("\n\nResponse B:\n", 1)
            b = rest.split("\n\nWhich response follows", 1)[0]
            if (a.strip() in self.fixed) != (b.strip() in self.fixed):
                logp[row, a_id], logp[row, b_id] = (0.0, -9.0) if a.strip() in self.fixed \
                    else (-9.0, 0.0)
        return logp


def write_stage1(run_dir: Path) -> None:
    """Stage 1 material: three instructions, two failing samples each, one passing sample."""
    rows = [
        ("t1", "Describe your favourite season.", [NO_COMMAS], [
            "Autumn is lovely, with crisp air, golden leaves and warm soup.",
            "Spring, with its blossom and longer days, is the season I like best.",
            "Winter is best because of snow and quiet evenings by the fire."]),
        ("t2", "Give advice for a long car journey.", [ENDS], [
            "Take a break every two hours, drink water and share the driving if you can.",
            "Plan your stops before you leave and keep snacks within reach."]),
        ("t3", "Explain what a thermometer does.", [LOWER], [
            "A thermometer measures temperature. Most digital ones use a small sensor.",
            "It tells you how hot or cold something is, in degrees Celsius or Fahrenheit."]),
    ]
    instructions, scores = [], []
    for task_id, instruction, constraints, texts in rows:
        instructions.append({"id": task_id, "instruction": instruction, "constraints": constraints,
                             "prompt_instruction": instruction, "split": "train"})
        for k, text in enumerate(texts):
            results = [s5.constraint_from_dict(c).check(text) for c in constraints]
            scores.append({"task_id": task_id, "sample": k, "text": text, "passed": all(results),
                           "constraint_results": results, "unusable": None,
                           "pass_fraction": sum(results) / len(results)})
    write_jsonl(run_dir / "stage_1" / "instructions.jsonl", instructions)
    write_jsonl(run_dir / "stage_1" / "scores.jsonl", scores)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_dir, tiny_backend) -> Path:
    from core.constitution import load_constitution
    from core.context import StageContext
    from core.models import PROJECT_ROOT
    from registry.models import profile_by_name

    run_dir = tmp_path_factory.mktemp("stage5") / "run"
    write_stage1(run_dir)
    ctx = StageContext(run_dir=run_dir, number=s5.NUMBER, model_path=str(tiny_dir), origin="test",
                       profile=profile_by_name("tiny-qwen2"), seed=0, limit=6, heldout=4,
                       constitution=load_constitution(PROJECT_ROOT / "constitution.yaml"),
                       data_dir=PROJECT_ROOT.parent / "shared" / "data")
    ctx._backend = Reviser(tiny_backend, ctx.path("tasks.jsonl"))
    s5.run(ctx)
    return run_dir


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_stage_completes_with_pairs(run_dir):
    stage = run_dir / "stage_5"
    assert (stage / "DONE").is_file()
    pairs = lines(stage / "pairs.jsonl")
    assert pairs and all({"prompt", "chosen", "rejected", "task_id"} <= set(p) for p in pairs)
    tasks = {t["id"]: t for t in lines(stage / "tasks.jsonl")}
    for pair in pairs:  # chosen fixes the critique and keeps the content; rejected does not
        assert s5.revision_checks(pair["chosen"], tasks[pair["task_id"]])["passed"]
        assert not s5.revision_checks(pair["rejected"], tasks[pair["task_id"]])["passed"]


def test_tasks_come_from_stage1_the_pool_and_model_drafts(run_dir):
    stage = run_dir / "stage_5"
    tasks = lines(stage / "tasks.jsonl")
    assert sum(t["split"] == "train" for t in tasks) == 6
    assert sum(t["split"] == "heldout" for t in tasks) == 4
    assert len(lines(stage / "drafts.jsonl")) > 0  # stage 1 left 4 of 10 tasks missing
    assert {t["source"] for t in tasks if t["split"] == "train"} == set(s5.SOURCES)


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
    held = [t for t in lines(stage / "tasks.jsonl") if t["split"] == "heldout"]
    for pair in lines(stage / "pairs.jsonl"):
        assert pair["task_id"] not in {t["id"] for t in held}
        assert not any(t["draft"] in pair["prompt"] or t["request"] in pair["prompt"]
                       for t in held)


def test_merged_model_loads_and_metrics(run_dir):
    from transformers import AutoModelForCausalLM

    stage = run_dir / "stage_5"
    model = AutoModelForCausalLM.from_pretrained(str(stage / "merged"))
    assert model.config.model_type == "qwen2"
    metrics = json.loads((stage / "metrics.json").read_text())
    assert metrics["dpo"]["steps"] > 0
    assessment = metrics["assessment"]
    assert assessment["headline"] == "revision_success"
    for side in ("before", "after"):
        summary = assessment[side]["summary"]
        assert {"revision_success", "fixes_critique", "keeps_content"} <= set(summary)
        assert summary["revision_success"]["n"] == 4
    assert metrics["data"]["judge"]["comparisons"] > 0
    assert "Stage 5" in (stage / "report.md").read_text()
