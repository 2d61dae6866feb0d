"""Stage 4 end to end on the tiny model, run alone through `app.pipeline.run_stage` with a scripted
backend (core/scripted.py).

No earlier stage has run in the run directory, so the labelled pairs come from the stage's own
pool (and the HH-RLHF held-out pairs from the shared data, when present). The tiny model writes
near-gibberish and almost never starts a line with "A." or "B.", so the script answers every
few-shot verdict prompt in its place, recognised by the judge task at the end of the prompt; the
known label comes from the pool pair the task shows. Half the labelled pairs get a
position-biased judge (it says "A" in both orders, with a reason that names no position, plus a
tie and a bare letter); the other half a judge that knows the answer in both orders but also
writes a wrong verdict, a bare letter and a tie. The stage then runs its real steps on those
verdicts: parsing and checks (scores), the pair rule (own verdicts, and for the biased pairs a
verdict carried over from the other order), decontaminate, train, merge, assess (the real
tiny model answers the zero-shot assessment prompts) and report."""
import json
from pathlib import Path

import pytest
import torch

from app.pipeline import run_stage
from core.models import PROJECT_ROOT
from core.prompting import EXEMPLAR_END
from core.records import read_tasks
from core.scripted import Script, ScriptedBackend
from stages import stage4_evaluation_tasks as module

pytestmark = pytest.mark.slow
DATA_DIR = PROJECT_ROOT.parent / "shared" / "data"
HAS_DATA = (DATA_DIR / module.HH_PATH).is_file()
REASON = "It does what the request asks, and the other one falls short of it."
WRONG_REASON = "It misses part of what the request asks, so it is the weaker reply."
QUESTION = "Which response serves the request better?"
# One epoch and four verdicts per task keep the test short; the rules do not depend on them.
OVERRIDES = ("profile.epochs=1", "profile.responses_per_task=4")


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


class VerdictScript:
    """Answers the stage's few-shot verdict prompts; None (the real model) for anything else."""

    def __init__(self):
        self.better = {p["request"].strip(): p["better"].strip()
                       for p in module.load_pool()["labelled_pairs"]}
        self.kind: dict[str, str] = {}  # request -> "biased" | "informed", alternating
        self.seen: dict[str, int] = {}  # target -> verdicts written so far
        self.answered = 0

    def label(self, target: str) -> tuple[str, str]:
        """(request, label) of the judge task at the end of a verdict prompt."""
        request = target.split("Request: ", 1)[1].split("\n\nResponse A:\n", 1)[0]
        shown_first = target.split("\n\nResponse A:\n", 1)[1].split("\n\nResponse B:\n", 1)[0]
        return request, "A" if shown_first == self.better[request] else "B"

    def complete(self, prompt: str) -> str | None:
        if EXEMPLAR_END not in prompt:
            return None  # zero-shot prompts (assessment, baseline suite): the real model
        target = prompt.rsplit(EXEMPLAR_END, 1)[1]
        if QUESTION not in target:
            return None
        request, label = self.label(target)
        kind = self.kind.setdefault(request, ("biased", "informed")[len(self.kind) % 2])
        k = self.seen[target] = self.seen.get(target, -1) + 1
        wrong = module.other_letter(label)
        if kind == "biased":  # "A" whatever the order
            verdicts = [f"A. {REASON}", "A tie: both are fine.", "A.", "Both are fine."]
        else:
            verdicts = [f"{label}. {REASON}", f"{wrong}. {WRONG_REASON}", f"{label}.",
                        "Neither is perfect."]
        self.answered += 1
        return verdicts[k % len(verdicts)]


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_dir) -> tuple[Path, VerdictScript]:
    run_dir = tmp_path_factory.mktemp("stage4") / "run"
    script = VerdictScript()
    run_stage(4, run_dir, model="tiny-qwen2", limit=6, heldout=4, seed=0, log=lambda _: None,
              overrides=OVERRIDES, backend_loader=ScriptedBackend.loader(Script(script.complete)))
    return run_dir / "stage_4", script


@pytest.fixture(scope="module")
def stage(run) -> Path:
    return run[0]


def test_every_verdict_prompt_was_scripted(run):
    stage, script = run
    verdicts = lines(stage / "verdicts.jsonl")
    assert len(verdicts) == 12 * 4  # 6 pairs x 2 orders x 4 verdicts
    assert script.answered == len(verdicts)
    assert set(script.kind.values()) == {"biased", "informed"}
    scores = lines(stage / "scores.jsonl")
    informed = sum(kind == "informed" for kind in script.kind.values())
    # per task, two ties from the biased judge and one from the informed one
    assert sum(s["letter"] is None for s in scores) == 2 * (2 * (6 - informed) + informed)
    for s in scores:
        if s["letter"] is not None:
            assert s["correct"] == (s["letter"] == s["label"])


def test_stage_finishes_with_pairs(run):
    stage, script = run
    assert (stage / "DONE").is_file()
    pairs = lines(stage / "pairs.jsonl")
    assert len(pairs) == 12  # one per judge task: both orders of the six training pairs
    assert all({"prompt", "chosen", "rejected", "task_id", "pair_id", "label"} <= set(p)
               for p in pairs)
    assert {p["label"] for p in pairs} == {"A", "B"}
    for pair in pairs:
        assert module.parse_verdict(pair["chosen"])[0] == pair["label"]
        assert module.parse_verdict(pair["rejected"])[0] != pair["label"]
    labelled = {p["id"]: p for p in lines(stage / "labelled.jsonl")}
    assert sum(p["split"] == "train" for p in labelled.values()) == 6
    assert sum(p["split"] == "heldout" for p in labelled.values()) == 4
    assert {p["source"] for p in labelled.values()} == {"pool"}  # no earlier stage in this run
    for pair in pairs:
        kind = script.kind[labelled[pair["pair_id"]]["request"].strip()]
        if kind == "informed":  # right and wrong verdicts of its own order
            assert (pair["chosen_order"], pair["rejected_order"]) == ("this", "this")
            assert pair["rejected_kind"] == "wrong letter"
        elif pair["label"] == "A":  # biased: the wrong verdict comes from the other order
            assert (pair["chosen_order"], pair["rejected_order"]) == ("this", "other")
        else:  # biased, better shown second: the right verdict comes from the other order
            assert (pair["chosen_order"], pair["rejected_order"]) == ("other", "this")
            assert pair["chosen"] == f"B. {REASON}" and pair["rejected"] == f"A. {REASON}"


def test_pairs_pass_the_guard_and_prompts_are_zero_shot(stage, tiny_dir):
    from transformers import AutoTokenizer

    from core.guards import TemplateGuard

    guard = TemplateGuard(AutoTokenizer.from_pretrained(str(tiny_dir)))
    shots = module.exemplar_texts(module.load_pool())
    for pair in lines(stage / "pairs.jsonl"):
        guard.check_record(pair, "pairs.jsonl")
        prompt = pair["prompt"]
        assert prompt.startswith("Instruction: Here is a request and two responses.")
        assert prompt.count("Instruction:") == 1 and prompt.count("\nResponse:\n") == 1
        assert "###" not in prompt and not any(shot in prompt for shot in shots)


def test_heldout_pairs_never_train(stage):
    held = [p for p in lines(stage / "labelled.jsonl") if p["split"] == "heldout"]
    pairs = lines(stage / "pairs.jsonl")
    assert not {p["id"] for p in held} & {p["pair_id"] for p in pairs}
    for pair in pairs:
        assert not any(h["request"] in pair["prompt"] for h in held)
    train_tasks = read_tasks(stage / "tasks.jsonl", "train")
    assert not {p["id"] for p in held} & {t.extra["pair_id"] for t in train_tasks}


def test_merged_model_loads_and_differs_from_the_input(stage, tiny_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(stage / "merged"))
    base = AutoModelForCausalLM.from_pretrained(str(tiny_dir))
    assert model.config.model_type == "qwen2"
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), base.parameters()))


def test_metrics_and_assessment(stage):
    metrics = json.loads((stage / "metrics.json").read_text())
    assert metrics["stage"] == 4 and metrics["name"] == "evaluation-tasks"
    assert metrics["dpo"]["steps"] > 0
    assessment = metrics["assessment"]
    assert assessment["headline"] == "accuracy_both_orders"
    for side in ("before", "after"):
        summary = assessment[side]["summary"]
        assert summary["accuracy_both_orders"]["n"] == 4
        assert {"accuracy_better_first", "accuracy_better_second", "verdict_parsed",
                "reason_ok"} <= set(summary)
        hh_items = [i for i in assessment[side]["items"] if i["id"].startswith("hh-")]
        if not HAS_DATA:  # the HH-RLHF held-out set is read only when the shared data exists
            assert not hh_items and "hh_accuracy_both_orders" not in summary
            continue
        assert summary["hh_accuracy_both_orders"]["n"] == 4
        assert set(assessment[side]["position_bias_gap"]) == {"labelled", "hh"}
        assert len(hh_items) == 4 and all(i["passed"] is None for i in hh_items)
        assert all("text" not in i["better_first"] for i in hh_items)
    assert assessment["paired"]["items"] == 4
    data = metrics["data"]
    assert data["hh_heldout"] == (4 if HAS_DATA else 0)
    assert data["tasks_train"] == 12 and data["labelled_pairs"] == {"pool heldout": 4,
                                                                    "pool train": 6}
    assert data["chosen_letters"] == {"A": 6, "B": 6}
    assert data["carried_from_other_order"]["chosen"] > 0
    assert data["carried_from_other_order"]["rejected"] > 0
    assert data["verdicts"]["samples"] == 48
    assert set(data["position_bias_gap"]) == {"before", "after"}
    assert "Stage 4: evaluation-tasks" in (stage / "report.md").read_text()


def test_check_judge_asks_each_model_of_the_run_about_the_heldout_pairs(stage, tmp_path):
    import shutil

    from click.testing import CliRunner

    import cli
    from app.judge_check import JUDGE_CHECK_FILE, check_judge
    from core.errors import UsageError
    from core.judge import consistent_winner
    from core.stats import mcnemar_exact

    run_dir = stage.parent
    result = check_judge(run_dir, log=lambda _: None)
    held = [p for p in lines(stage / "labelled.jsonl") if p["split"] == "heldout"]
    assert result["pairs"] == len(held) == 4
    assert set(result["models"]) == {"base", "stage 4"}
    for r in result["models"].values():
        judgments = r["judgments"]
        assert [j["id"] for j in judgments] == [p["id"] for p in held]
        assert all(j["winner"] == consistent_winner(j["margin_xy"], j["margin_yx"])
                   for j in judgments)
        right = [j["winner"] == "x" for j in judgments]  # x is the better response
        assert r["right_both_orders"] == {**r["right_both_orders"], "k": sum(right), "n": 4}
        assert r["first_shown"]["n"] == 8 and r["order_consistent"]["n"] == 4
    base, trained = (result["models"][m]["judgments"] for m in ("base", "stage 4"))
    assert [j["margin_xy"] for j in base] != [j["margin_xy"] for j in trained]  # DPO moved it
    assert result["models"]["stage 4"]["vs_base"] == mcnemar_exact(
        [j["winner"] == "x" for j in base], [j["winner"] == "x" for j in trained])
    assert json.loads((run_dir / JUDGE_CHECK_FILE).read_text()) == result
    only = check_judge(run_dir, models=("stage 4",), log=lambda _: None)
    assert list(only["models"]) == ["stage 4"]
    assert only["models"]["stage 4"]["judgments"] == trained  # the same judge, the same margins
    with pytest.raises(UsageError, match="not a model of"):
        check_judge(run_dir, models=("stage 9",), log=lambda _: None)
    outcome = CliRunner().invoke(cli.main, ["check", "judge", "--run-dir", str(run_dir),
                                            "--model", "base"])
    assert outcome.exit_code == 0 and "right in both orders" in outcome.output
    bare = tmp_path / "run"  # a run whose stage 4 has not made its tasks
    bare.mkdir()
    shutil.copy(run_dir / "config.yaml", bare / "config.yaml")
    outcome = CliRunner().invoke(cli.main, ["check", "judge", "--run-dir", str(bare)])
    assert outcome.exit_code == 2 and "stage_4/labelled.jsonl is missing" in outcome.output
